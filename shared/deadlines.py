"""Sockets and request bodies with deadlines: what lets a pool thread of
:class:`~shared.worker.DeadlineWorker` serve a slow client without being held by it."""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import time
from typing import Any

from gunicorn.http import errors as parse_errors
from gunicorn.http.body import Body, ChunkedReader, LengthReader

from shared.errors import BadRequest, RequestTimeout, ThalamusError

CAMEL_CASE = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def kind_of(exc: BaseException) -> str:
    """What a parse error is about, from its class alone ("invalid header name"): gunicorn's own
    message quotes the request's bytes, which may hold a token or a secret key (a header without
    its colon, ``Authorization Bearer …``), so it is neither answered nor logged."""
    return CAMEL_CASE.sub(" ", type(exc).__name__).lower()


JOIN_BODY_BYTES = 64 * 1024  # a body up to this size goes out in one send with the answer's head
# Chunks of one chunked body. gunicorn's parser costs 3.5-6 µs of Python a chunk, whatever its
# size: 1 MB in one-byte chunks took 3.5 s of CPU, and the body limits count bytes, not chunks.
# At most ~0.4 s; 160 bytes a chunk on average for a 10 MiB upload (clients write KBs at a time).
MAX_BODY_CHUNKS = 65_536


class DeadlineSocket(socket.socket):
    """A plain non-blocking socket for the main thread; while a pool thread serves a request,
    each recv and send waits at most until that direction's deadline.

    Body bytes received earn time (``min_rate`` bytes per second, like Apache's mod_reqtimeout),
    so a large upload that keeps flowing is not cut off; bytes sent earn nothing, as the kernel
    buffers megabytes and would give a client that never reads free time.
    """

    deadlines: dict[str, float | None] | None = None
    held = b""
    method = ""  # the method of the request served, as its request line shows it (DeadlineWorker)
    send_timeout = 30.0
    min_rate = 0.0

    def begin(self, read_timeout: float, send_timeout: float, min_rate: float) -> None:
        # The send clock starts at the first sendall (the answer's head), so the time the
        # application computes is not charged to it.
        self.deadlines = {"recv": time.monotonic() + read_timeout, "send": None}
        self.send_timeout, self.min_rate = send_timeout, min_rate
        self.held = b""

    def end(self) -> None:
        try:
            self.send_held()  # normally sent already (DeadlineWorker._keepalive_after)
        finally:
            self.deadlines = None

    def shutdown(self, how: int) -> None:
        # gunicorn closes this way when the application fails after its answer began; what the
        # client was sent of it stays what it was sent.
        with contextlib.suppress(OSError):
            self.send_held()
        super().shutdown(how)

    def send_held(self) -> None:
        """Send the answer's head if it is still held (an answer with no body)."""
        if self.held:
            held, self.held = self.held, b""
            self._bounded("send", super().sendall, held)

    def _bounded(self, way: str, call: Any, data: Any, *args: Any) -> Any:
        if self.deadlines is None:
            return call(data, *args)
        deadline = self.deadlines[way] or time.monotonic() + self.send_timeout
        self.settimeout(max(deadline - time.monotonic(), 1e-3))  # bounds a whole sendall too
        result = call(data, *args)
        if way == "recv" and self.min_rate:
            self.deadlines["recv"] = (self.deadlines["recv"] or 0.0) + len(result) / self.min_rate
        return result

    def recv(self, size: int, *args: Any) -> bytes:
        return bytes(self._bounded("recv", super().recv, size, *args))

    def send(self, data: Any, *args: Any) -> int:
        self.send_held()
        return int(self._bounded("send", super().send, data, *args))

    def sendall(self, data: Any, *args: Any) -> None:
        if self.deadlines is not None and self.deadlines["send"] is None:
            # The answer's head: held, to go out with the body in one send (one syscall, one
            # wake-up of the client, one GIL hand-off fewer: −0.3 ms of CPU a prediction).
            self.deadlines["send"] = time.monotonic() + self.send_timeout
            self.held = bytes(data)
            return
        if self.held and len(data) <= JOIN_BODY_BYTES:
            data, self.held = self.held + bytes(data), b""
        self.send_held()
        self._bounded("send", super().sendall, data, *args)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        # os.sendfile would wait outside the deadlines: the stdlib's loop over self.send instead.
        return int(self._sendfile_use_send(file, offset, count))  # type: ignore[attr-defined]

    def send_nowait(self, data: bytes) -> None:
        """Send a small error answer if the socket takes it at once; never wait."""
        self.held = b""  # an error answer instead of the one begun
        try:
            self.setblocking(False)
            super().send(data)
        except OSError:
            pass


class TooManyChunks(parse_errors.ParseException):  # type: ignore[misc]
    def __str__(self) -> str:
        return f"chunked body in more than {MAX_BODY_CHUNKS} chunks; send larger chunks, or a Content-Length"


def _counted(parse_chunk_size: Any) -> Any:
    """``ChunkedReader.parse_chunk_size`` that refuses the chunk after MAX_BODY_CHUNKS (the
    last chunk, of size 0, not counted)."""
    lines = itertools.count(1)

    def parse(unreader: Any, data: bytes | None = None) -> Any:
        if next(lines) > MAX_BODY_CHUNKS + 1:  # a size line per chunk, and the last chunk's
            raise TooManyChunks()
        return parse_chunk_size(unreader, data=data)

    return parse


class GuardedBody(Body):  # type: ignore[misc]  # gunicorn has no type information
    """``wsgi.input``: a body read that misses its deadline, breaks its chunked framing or loses
    the connection raises a ThalamusError (408 or 400) the service answers as JSON. Not an
    OSError: werkzeug would turn that into its own "client disconnected" 400."""

    def __init__(self, request: Any, sock: Any) -> None:
        super().__init__(request.body.reader)
        self.request = request
        # "Expect: 100-continue": the 100 goes out with the first read, so after the bearer
        # check, which needs only the head (gunicorn sends it before the application runs,
        # inviting a client the check then refuses to upload its body all the same).
        # A request without a body (no length, or 0, and not chunked) has nothing to invite.
        bodiless = isinstance(request.body.reader, LengthReader) and request.body.reader.length == 0
        self.continue_to = sock if request._expected_100_continue and not bodiless else None
        request._expected_100_continue = False
        if isinstance(reader := request.body.reader, ChunkedReader):
            reader.parse_chunk_size = _counted(reader.parse_chunk_size)

    def close_connection(self) -> None:
        """Close the connection after this answer instead of reading the rest of the body:
        gunicorn ignores an application's ``Connection: close`` header."""
        self.request.force_close()

    def _read_reader(self, size: int) -> bytes:
        error: ThalamusError
        try:
            if (sock := self.continue_to) is not None:
                self.continue_to = None
                sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            return bytes(super()._read_reader(size))
        except TimeoutError:  # only DeadlineSocket sets socket timeouts
            error = RequestTimeout("request body not received in time")
        except OSError:  # NoMoreData, ECONNRESET
            error = BadRequest("connection lost while reading the body")
        except TooManyChunks as exc:
            error = BadRequest(str(exc))
        except parse_errors.ParseException as exc:
            error = BadRequest(f"malformed request body ({kind_of(exc)})")
        self.request.force_close()  # where the next request would start is unknown
        raise error from None
