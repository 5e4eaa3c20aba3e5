"""The gunicorn worker every function runs on: gthread, but a slow client costs only itself.

gunicorn's gthread worker hands a connection to a pool thread as soon as its first byte arrives;
the thread then reads the request head with a blocking socket and no deadline, so a few clients
sending headers (or a body) byte by byte hold every thread. Here:

- the main (poller) thread reads each request head, and a small body, without blocking into a
  per-connection buffer, and dispatches the connection only once it is complete (gunicorn's
  parser reads those bytes back first); heads that miss ``header_timeout`` get a JSON 408;
- in the pool, every socket read and write of a request waits at most until a deadline (body:
  ``body_timeout`` plus time earned by bytes received; answer: ``send_timeout``); a body that
  misses it reaches the application as :class:`~shared.errors.RequestTimeout` (408);
- a pool thread that has answered on a kept-alive connection, while another thread is free,
  waits up to ``next_request_wait`` for that client's next request and serves it itself: a client
  that sends requests one after the other (queue-proxy, a sequential caller) skips the hand-off
  back to the poller and on to a pool thread;
- the kubelet's probes (``GET /healthz``, ``GET /readyz`` without a body) go to a thread of their
  own, so a replica whose threads are all busy with long requests still answers them: otherwise
  its liveness probe would time out under legitimate load and the kubelet would restart it, with
  the requests in flight;
- every answer gunicorn itself gives (malformed request line or headers, limits, framing) is
  JSON with the right status: 400, 408, 414, 431, never HTML or a traceback; like every other
  answer it carries an ``X-Request-Id`` (the caller's when its headers were parsed, else a new
  one), is logged as an access line and counted in the request metrics (route "unmatched"): it
  never reaches the application, whose :class:`shared.access.AccessLog` does that for the others.

Plain HTTP/1.x only (TLS ends at the ingress). gunicorn is pinned: this subclass relies on
``ThreadWorker`` internals (init_process, accept, enqueue_req (replaced), handle, handle_request, finish_request,
murder_keepalived, _keepalive_after) of that version, and tests/test_hostile.py exercises each path.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import selectors
import socket
import time
import uuid
from concurrent import futures
from functools import partial
from typing import Any

from gunicorn import http, util
from gunicorn.http import errors as parse_errors
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from shared.deadlines import DeadlineSocket, GuardedBody
from shared.errors import BadRequest, ThalamusError
from shared.refusals import method_of, refuse, request_id_of, status_of

log = logging.getLogger("thalamus.server")  # gunicorn's own logger (self.log) says only warnings and up

# accept() errors that say the process (or the kernel) has no room for another connection now.
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_PAUSE_SECONDS = 0.5
STUCK_ACCEPT_SECONDS = 30.0
BARE_LF = re.compile(rb"(?<!\r)\n")
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,9})[ \t]*\r\n", re.I)
CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r]*chunked", re.I)
EXPECT = re.compile(rb"\r\nexpect:", re.I)
# The probes of every Service (shared/http.py's /healthz and /readyz), as the kubelet sends them:
# a GET with no body (a body would hold the probes' thread while it is read and drained).
PROBE = re.compile(rb"(?:\r\n)?GET /(?:healthz|readyz)(?:\?[^ ]*)? HTTP/1\.[01]\r\n")
BODY_FRAMING = re.compile(rb"\r\n(?:content-length|transfer-encoding)[ \t]*:", re.I)
# RFC 9112 3.2: a Host field is uri-host [":" port] of RFC 3986 (an IP literal in brackets, or
# a reg-name), maybe empty; gunicorn refuses a second one, not a missing or malformed one.
HOST = re.compile(r"(?:\[[0-9A-Za-z:.%_~-]{2,63}\]|[A-Za-z0-9\-._~!$&'()*+,;=%]{0,255})(?::[0-9]{0,5})?")


def _ip(address: Any) -> str:
    return str(address[0]) if isinstance(address, tuple) else ""


def is_probe(head: bytes | bytearray) -> bool:
    """Whether ``head`` (a whole request head, maybe with bytes behind it) is a bodiless probe."""
    end = head.find(b"\r\n\r\n")
    return end > 0 and PROBE.match(head) is not None and BODY_FRAMING.search(head, 0, end + 2) is None


class DeadlineWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn has no type information
    """gthread with deadlines; the class attributes are set by shared/server.py from Settings."""

    function = ""  # the function served, whose request metrics count the worker's refusals too
    header_timeout = 10.0  # request head (and a small body) must arrive within this
    body_timeout = 10.0  # the application's body reads, from dispatch (+ bytes / min_rate)
    send_timeout = 30.0  # writing one answer, from its first byte
    min_rate = 64 * 1024.0  # body bytes per second that earn extra time
    max_head = 64 * 1024  # larger heads: 431 from the main thread
    preread_body = 16 * 1024  # bodies with a Content-Length up to this are read before dispatch
    linger_idle = 2.0  # a lingering close ends once the client has sent nothing for this long
    linger_most = 30.0  # and in any case after this long (nginx's lingering_time)
    # How long a pool thread waits for the next request on its kept-alive connection (see
    # next_head): a sequential client's next request comes within a fraction of a millisecond
    # on a local network. Whether a request needs this thread is checked every millisecond
    # (poll's unit: Python rounds a shorter timeout up to it).
    next_request_wait = 0.002
    next_request_slice = 0.001

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        super().check_config(cfg, log)
        if cfg.is_ssl or cfg.http2_cleartext != "off":  # TConn.init() is bypassed, see handle()
            raise RuntimeError("DeadlineWorker serves plain HTTP/1.x only")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: dict[Any, None] = {}  # connections the main thread owns: head, idle, closing
        self.next_sweep = 0.0
        self.next_notify = 0.0
        self.stopped_at: float | None = None
        self.in_flight = 0  # requests handed to the pool and not finished; only the main thread writes it
        self.scratch = bytearray(65536)  # what a lingering close reads and drops (main thread only)
        self.accept_paused_until = self.accept_paused_since = -1e9  # see pause_accepting
        self.full_said_at = -1e9  # when the connection limit was last logged (set_accept_enabled)
        self.connections_open: Any = None  # the gauge of this function's open connections

    # -- main thread -------------------------------------------------------------------------

    def init_process(self) -> None:
        self.probe_pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="probes")
        if self.function:  # counted (not the local gateway): in the process, so after the metrics folder is set
            from shared import metrics  # noqa: PLC0415

            self.connections_open = metrics.CONNECTIONS.labels(self.function)
        super().init_process()

    def notify(self) -> None:
        # gunicorn calls this on every turn of the main loop, several times a request, and each
        # is a syscall (utime of the heartbeat file); the master needs one within `timeout`.
        now = time.monotonic()
        if now >= self.next_notify:
            self.next_notify = now + 1.0
            super().notify()

    def accept(self, listener: socket.socket) -> None:
        try:
            raw, address = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno not in OUT_OF_DESCRIPTORS:
                raise
            self.pause_accepting(exc)
            return
        sock = DeadlineSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
        self.nr_conns += 1
        self.read_head(TConn(self.cfg, sock, address, listener.getsockname()), b"", idle=False)

    def pause_accepting(self, exc: OSError) -> None:
        """Out of file descriptors (or kernel memory): gunicorn's worker would die of the error,
        with every request in flight. Stop accepting for a moment instead; the connections queue
        in the listen backlog while those open now finish and close. If none of its own is open
        and it still cannot accept after STUCK_ACCEPT_SECONDS, what holds the descriptors is not
        its connections (a leak): the worker stops, to be replaced by a fresh process (gunicorn's
        master, or the container's restart)."""
        now = time.monotonic()
        if now >= self.accept_paused_until + 10:  # a new episode: one line for it, not one per try
            self.accept_paused_since = now
            self.log.warning("cannot accept connections (%s): pausing %.1f s at a time until some close",
                             exc.strerror, ACCEPT_PAUSE_SECONDS)  # fmt: skip
        elif now - self.accept_paused_since > STUCK_ACCEPT_SECONDS and self.nr_conns == 0:
            self.log.error("cannot accept connections (%s) for %.0f s with none open here: stopping",
                           exc.strerror, now - self.accept_paused_since)  # fmt: skip
            self.alive = False
        self.accept_paused_until = now + ACCEPT_PAUSE_SECONDS
        self.set_accept_enabled(False)

    def set_accept_enabled(self, enabled: bool) -> None:
        # gunicorn's loop re-enables accepting on every turn while it has room for connections.
        now = time.monotonic()
        if not (enabled and now < self.accept_paused_until):
            super().set_accept_enabled(enabled)
        if not enabled and self.alive and self.nr_conns >= self.worker_connections and now > self.full_said_at + 60:
            # Idle or slow connections (a flood of them) are otherwise seen only as slow answers.
            self.full_said_at = now
            self.log.warning("at the limit of %d open connections: new ones wait in the listen backlog until "
                             "some close (said at most once a minute)", self.worker_connections)  # fmt: skip
        if not enabled and not self.alive:
            # Stopping (SIGTERM): close the listeners now, so that a new connection is refused at
            # once, not left in the backlog unanswered until the drain ends (gunicorn closes them
            # last). With WORKERS > 1 the master holds them too, and closes its own when it stops.
            for listener in self.sockets:
                listener.close()

    def read_head(self, conn: Any, data: bytes, idle: bool) -> None:
        self.begin_head(conn, data)
        conn.closing = False
        conn.idle = idle and not data  # kept alive, next request not begun: the keep-alive timeout
        conn.timeout = time.monotonic() + (self.cfg.keepalive if conn.idle else self.header_timeout)
        conn.sock.setblocking(False)
        self.advance(conn)

    @staticmethod
    def begin_head(conn: Any, data: bytes) -> None:
        """A new request head on ``conn``, beginning with ``data``, for head_status to scan."""
        conn.head, conn.scanned, conn.need, conn.chunked = bytearray(data), 0, None, False

    def advance(self, conn: Any) -> None:
        status = self.head_status(conn)
        if status == 0:
            self.watch(conn)
            return
        self.unwatch(conn)
        if status == 200:
            self.enqueue_req(conn)
        else:
            self.reject(conn, status, "request line too long" if status == 414 else "request headers too large")

    def head_status(self, conn: Any) -> int:
        """0: wait for more, 200: dispatch, 414/431: answer here. Only new bytes are scanned, so
        a head sent byte by byte costs linear time, not quadratic."""
        buf, start, conn.scanned = conn.head, conn.scanned, len(conn.head)
        if conn.need is None:
            end = buf.find(b"\r\n\r\n", max(0, start - 3))
            # In the head only: the body that came with it may be long and hold no newline,
            # and this pattern is tried at every byte it is searched over.
            if BARE_LF.search(buf, start, len(buf) if end < 0 else end + 4):
                return 200  # gunicorn's parser refuses it (400) without reading more
            limit = self.cfg.limit_request_line  # one leading CRLF is allowed: search from 1
            if end < 0 and 0 < limit < len(buf) - 2 and buf.find(b"\r\n", 1) < 0:
                return 414
            if (len(buf) if end < 0 else end) > self.max_head:
                return 431
            if end < 0:
                return 0
            body = self.small_body(bytes(buf[: end + 2]))
            conn.body_at, conn.need = end + 4, end + 4 + max(body, 0)  # chunked: the first chunk
            conn.chunked = body < 0
        if conn.chunked:  # until the last chunk, or more than a small body holds
            return 200 if self.chunks_end(conn) or len(buf) - conn.body_at > self.preread_body else 0
        return 200 if len(buf) >= conn.need else 0

    @staticmethod
    def chunks_end(conn: Any) -> bool:
        """Whether a chunked body's last chunk and trailer have arrived (a request pipelined behind
        them may have too). Each chunk is stepped over once: ``conn.need`` is where the next one
        starts. A size line that is not hex counts as the end: gunicorn's parser refuses it."""
        buf = conn.head
        while (eol := buf.find(b"\r\n", conn.need)) >= 0:
            try:
                size = int(bytes(buf[conn.need : eol]).split(b";", 1)[0], 16)
            except ValueError:
                return True
            if size <= 0:
                return size < 0 or buf.find(b"\r\n\r\n", eol) >= 0  # the trailer ends with a blank line
            conn.need = eol + 2 + size + 2
        return False

    def small_body(self, head: bytes) -> int:
        """How many body bytes to read before dispatch: a Content-Length up to preread_body, -1
        (until the last chunk) for a chunked body, else 0. Only buffering: gunicorn's parser
        still decides the framing, so a wrong guess merely dispatches early. Never with
        "Expect: 100-continue": that client waits for our 100 before it sends the body."""
        if EXPECT.search(head):
            return 0
        if CHUNKED.search(head):
            return -1
        match = CONTENT_LENGTH.search(head)
        size = int(match.group(1)) if match else 0
        return size if size <= self.preread_body else 0

    def on_readable(self, conn: Any, _sock: Any) -> None:
        if conn.closing:
            self.discard(conn)
            return
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close_now(conn)
            return
        if conn.idle:  # first byte of the next request on a kept-alive connection
            conn.idle, conn.timeout = False, time.monotonic() + self.header_timeout
        conn.head += data
        self.advance(conn)

    def reject(self, conn: Any, status: int, message: str) -> None:
        # The head is not whole (or too large): no header of it is read, the request id is new.
        refuse(conn.sock, status, message, uuid.uuid4().hex, method_of(conn.head), self.function, _ip(conn.client))
        self.close(conn)

    def close(self, conn: Any) -> None:
        # gunicorn's graceful close drains in a blocking recv for up to 2 s on the main thread,
        # stalling the whole worker; the same half-close here waits on the poller instead.
        self.unwatch(conn)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close_now(conn)
            return
        now = time.monotonic()
        conn.closing, conn.timeout, conn.linger_until = True, now + self.linger_idle, now + self.body_timeout
        conn.linger_since = now
        conn.sock.setblocking(False)
        self.watch(conn)

    def discard(self, conn: Any) -> None:
        """A lingering close (nginx's): what the client still sends after its answer is read and
        dropped until it closes or sends nothing for ``linger_idle``, for as long as a body being
        read would have (``body_timeout``, and more while it flows at ``min_rate``), at most
        ``linger_most``; when the worker stops, as long as an idle connection is kept. Closing on
        unread bytes sends a reset, which destroys the answer the client has not read yet: a
        client that writes its whole body before it reads (Node's fetch, http.client) got a broken
        pipe instead of its early 401 or 413. Dropping costs the poller, not a thread."""
        try:
            size = conn.sock.recv_into(self.scratch)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if size:
            conn.linger_until = min(conn.linger_until + size / self.min_rate, conn.linger_since + self.linger_most)
            conn.timeout = min(time.monotonic() + self.linger_idle, conn.linger_until)
        else:
            self.close_now(conn)

    def watch(self, conn: Any) -> None:
        if conn not in self.waiting:
            self.waiting[conn] = None
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_readable, conn))

    def unwatch(self, conn: Any) -> None:
        if conn in self.waiting:
            del self.waiting[conn]
            self.poller.unregister(conn.sock)

    def close_now(self, conn: Any) -> None:
        self.unwatch(conn)
        self.nr_conns -= 1
        util.close(conn.sock)

    def is_parent_alive(self) -> bool:
        """Whether what started this process still runs: a server orphaned (its stack or shell
        killed) stops, saying why; as a container's PID 1 its parent never changes."""
        if self.ppid == os.getppid():
            return True
        log.warning("stopping: the process that started it (pid %d) has exited; run it under a supervisor "
                    "(or a container) to keep it serving", self.ppid)  # fmt: skip
        self.alive = False  # the drain as for SIGTERM: listeners closed, idle connections cut soon
        return False

    def murder_keepalived(self, force: bool = False) -> None:
        """Run by ThreadWorker.run() on every loop turn (force=True at exit): the deadlines."""
        now = time.monotonic()
        if now < self.next_sweep and not force:
            return  # a sweep costs one look at every connection: at most 4 a second
        self.next_sweep = now + 0.25
        if self.connections_open is not None:
            self.connections_open.set(self.nr_conns)
        if not self.alive and self.stopped_at is None:
            self.stopped_at = now  # the drain's start, said: a request it cuts short is then explained
            log.info("stopping: new connections refused; open connections: %d, requests in the threads: %d; "
                     "up to %d s to finish (pid %d)", self.nr_conns, self.in_flight, self.cfg.graceful_timeout,
                     os.getpid())  # fmt: skip
        for conn in list(self.waiting):
            deadline = conn.timeout
            if (conn.closing or not conn.head) and self.stopped_at is not None:  # stopping: idle, lingering go soon
                since = max(self.stopped_at, conn.linger_since) if conn.closing else self.stopped_at
                deadline = min(deadline, since + STOP_KEEPALIVE_LINGER)
            if force or (deadline <= now and (conn.closing or not conn.head)):
                self.close_now(conn)
            elif deadline <= now:  # a whole head, then its small body late (need): the body's fault
                self.reject(conn, 408, f"request {'body' if conn.need is not None else 'headers'} not received in time")

    def enqueue_req(self, conn: Any) -> None:
        conn.probe = is_probe(conn.head)
        if conn.probe:  # one request on the probes' thread, then the connection comes back here
            future = self.probe_pool.submit(self.handle_one, conn)
        else:
            self.in_flight += 1
            future = self.tpool.submit(self.handle, conn)
        future.add_done_callback(lambda done: self.method_queue.defer(self.finish_request, conn, done))

    def finish_request(self, conn: Any, future: Any) -> None:
        if not conn.probe:
            self.in_flight -= 1
        if not future.cancelled() and future.exception() is None and future.result():
            # Kept alive: bytes read past this request (pipelining) begin the next head.
            self.read_head(conn, conn.parser.unreader.take_buffered(), idle=True)
        else:
            self.close(conn)

    # -- pool threads ------------------------------------------------------------------------

    def handle(self, conn: Any) -> Any:
        while True:
            keepalive = self.handle_one(conn)
            if not (keepalive and self.alive and self.next_head(conn)):
                return keepalive

    def next_head(self, conn: Any) -> bool:
        """Whether the client's next request (its head, and a small body) arrived on ``conn``
        within ``next_request_wait``, waited for only while another pool thread is free (no
        request waits for this one). Either way what was read stays read: when this returns
        False, the main thread goes on from those bytes, with its own deadlines."""
        self.begin_head(conn, conn.parser.unreader.take_buffered())
        deadline = time.monotonic() + self.next_request_wait
        poller = select.poll()
        poller.register(conn.sock.fileno(), select.POLLIN)
        status = 0  # the free-thread check comes first: a pipelined request waits its turn too
        while self.in_flight < self.cfg.threads and (status := self.head_status(conn)) == 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not poller.poll(min(remaining, self.next_request_slice) * 1000):
                continue
            try:
                data = conn.sock.recv(65536, socket.MSG_DONTWAIT)
            except OSError:
                break  # BlockingIOError (a spurious wake-up) or a reset: the main thread sees it again
            if not data:
                break  # the client closed: the main thread closes too
            conn.head += data
        if status == 200:
            return True
        conn.parser.unreader.unread(bytes(conn.head))  # the main thread's read_head takes them back
        return False

    def handle_one(self, conn: Any) -> Any:
        conn.sock.begin(self.body_timeout, self.send_timeout, self.min_rate)
        # The method as the request line shows it, for handle_error when the parser fails before
        # it has a request: a HEAD is answered without a body even then (RFC 9110 9.3.2).
        conn.sock.method = method_of(conn.head)
        if conn.parser is None:
            conn.initialized = True  # skip TConn.init(): its TLS/h2c sniffing would read the socket
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(conn.head))
        try:
            return super().handle(conn)
        finally:
            conn.sock.end()

    def handle_request(self, request: Any, conn: Any) -> Any:
        # gunicorn accepts gzip, deflate and compress before chunked and hands the body on still
        # coded: no application here would decode it (RFC 9112 6.1: 501 for what is not done).
        host = None
        for name, value in request.headers:
            if name == "HOST":
                host = value
            if name == "TRANSFER-ENCODING" and any(c.strip().lower() != "chunked" for c in value.split(",")):
                raise parse_errors.UnsupportedTransferCoding(value)
            if name == "CONNECTION" and "close" in (option.strip().lower() for option in value.split(",")):
                request.force_close()  # RFC 9112 9.6: close among other options (gunicorn reads it alone)
        if host is None and request.version >= (1, 1):  # RFC 9112 3.2: a 400, as Envoy answers it
            raise BadRequest("an HTTP/1.1 request needs a Host header")
        if host is not None and not HOST.fullmatch(host):
            raise BadRequest("malformed Host header")
        # RFC 9110 6.2: the answer says the highest version this server speaks, HTTP/1.1, not the
        # request's (gunicorn echoed "HTTP/1.7"); HTTP/1.0 and 1.1 are kept as they are.
        request.version = min(request.version, (1, 1))
        if conn.probe:  # one probe a connection, as the kubelet sends them: a client pipelining
            request.force_close()  # probes it never reads the answers of cannot hold the probes' thread
        request.body = conn.body = GuardedBody(request, conn.sock)  # becomes environ["wsgi.input"]
        try:
            return super().handle_request(request, conn)
        except TimeoutError:  # the send deadline; ThreadWorker.handle would log a traceback
            self.log.warning("answer not taken in time by %s; closing", _ip(conn.client))
            return False

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        # The answer is out (a bodiless one's head goes now, before any draining). An unread
        # body that cannot be drained closes the connection: gunicorn would otherwise send a
        # second (error) answer after the first.
        try:
            conn.sock.send_held()
            if (body := getattr(conn, "body", None)) is not None and body.continue_to is not None:
                # "Expect: 100-continue" and the body never read: the client was not asked for
                # it, so it is not drained either (that read would send a 100 after the answer).
                return False
            return bool(super()._keepalive_after(conn, keepalive))
        except (ThalamusError, parse_errors.ParseException, OSError):
            return False

    def handle_error(self, request: Any, client: Any, address: Any, exc: BaseException) -> None:
        status, message = status_of(exc)
        if status == 500:  # a real bug: keep the traceback (a refusal's one line is its access line)
            self.log.exception("error handling a request")
        method = str(getattr(request, "method", None) or getattr(client, "method", ""))[:16]
        refuse(client, status, message, request_id_of(request), method, self.function, _ip(address))
