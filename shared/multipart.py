"""``multipart/form-data`` bodies (RFC 7578), split in one pass over the body in memory.

werkzeug's parser streams: it runs the body through a regular-expression state machine in
64 KiB chunks and copies each file into a buffer of its own (a temporary file in ``/tmp`` past
500 KB). Every body that reaches a handler here is already in memory, read and bounded by
``MAX_UPLOAD_BYTES`` in :mod:`shared.http`, so the delimiters are found with ``bytes.find`` and
each file is one slice of the body: 4-7 times less CPU, all of it under the GIL
(``bench/bench_multipart.py``).

:class:`FormParser` plugs this into Flask's request (``request.files``, ``request.form``) in
place of werkzeug's, with werkzeug's limits (``MAX_FORM_PARTS``, ``MAX_FORM_MEMORY_SIZE``) and
the same answers: a body that cannot be split is an empty form, a limit exceeded is
:class:`werkzeug.exceptions.RequestEntityTooLarge`.
"""

from __future__ import annotations

import io
from typing import IO, Any

from werkzeug.datastructures import FileStorage, Headers, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header

# Text field charsets honoured, as werkzeug's list; anything else is read as UTF-8.
CHARSETS = {"ascii", "us-ascii", "utf-8", "iso-8859-1"}
TAILS = (b"\r\n", b"\n", b"--")  # what follows a delimiter's boundary: its line break, or "--" (the last)
MAX_HEADER_BYTES = 16 * 1024  # a part's header block (gunicorn allows a request header 8 KiB)


class FormParser(FormDataParser):
    """Flask's form parser with :func:`split` for multipart bodies (urlencoded ones unchanged)."""

    def _parse_multipart(
        self, stream: IO[bytes], mimetype: str, content_length: int | None, options: dict[str, str]
    ) -> tuple[IO[bytes], MultiDict[str, Any], MultiDict[str, Any]]:
        boundary = options.get("boundary", "").encode("ascii")  # non-ASCII: UnicodeError, a ValueError
        fields, files = split(stream.read(), boundary, self.max_form_parts, self.max_form_memory_size)
        return stream, self.cls(fields), self.cls(files)


def split(
    body: bytes, boundary: bytes, max_parts: int | None = None, max_field_bytes: int | None = None
) -> tuple[list[tuple[str, str]], list[tuple[str, FileStorage]]]:
    """The text fields and the files of a multipart ``body``, in the order sent.

    Raises ValueError when the body is not a whole multipart body for ``boundary`` (no
    boundary, no closing delimiter, a part without its blank line), and RequestEntityTooLarge
    past ``max_parts`` parts or for a text field over ``max_field_bytes``. Line breaks may be
    CRLF or LF; a preamble before the first delimiter and an epilogue after the last are ignored.
    """
    if not boundary or len(boundary) > 200:  # RFC 2046: 1 to 70 characters; werkzeug allows more
        raise ValueError("missing or invalid boundary")
    delimiters = _Delimiters(body, boundary)
    dash = b"--" + boundary
    if body.startswith(dash) and (len(body) == len(dash) or body.startswith(TAILS, len(dash))):
        at = len(dash)
    else:  # a preamble first
        at = delimiters.after(0) + 1 + len(dash)
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, FileStorage]] = []
    while at < len(body) and not body.startswith(b"--", at):  # "--" after a delimiter: that was the last part
        if len(fields) + len(files) == max_parts:
            raise RequestEntityTooLarge()
        at += 2 if body.startswith(b"\r\n", at) else 1  # the delimiter's line break
        next_at = delimiters.after(at)
        headers_end, content_at = _blank_line(body, at, min(next_at + 1, at + MAX_HEADER_BYTES))
        headers = _headers(body[at:headers_end])
        content = body[content_at : _content_end(body, content_at, next_at)]
        disposition = parse_options_header(headers.get("Content-Disposition"))[1]
        name, filename = disposition.get("name", ""), disposition.get("filename")
        if filename is None:
            if max_field_bytes is not None and len(content) > max_field_bytes:
                raise RequestEntityTooLarge()
            fields.append((name, content.decode(_charset(headers), "replace")))
        else:
            files.append((name, FileStorage(io.BytesIO(content), filename, name, headers=headers)))
        at = next_at + 1 + len(dash)
    return fields, files


class _Delimiters:
    """The delimiters of one body, in order: a line break, ``--``, the boundary, then another
    line break or ``--`` (the last), or the body's end. Each of the three forms is searched for
    with ``bytes.find``, each search going on from where that form was last found, so a body is
    scanned at most three times however many parts it has and however often the boundary's text
    appears in it. (RFC 2046's optional spaces before a delimiter's line break, which HTTP
    clients do not send, are not read as a delimiter.)"""

    def __init__(self, body: bytes, boundary: bytes) -> None:
        self._body = body
        self._forms = [b"\n--" + boundary + tail for tail in TAILS]
        self._next = [-2] * len(TAILS)  # where each form is next found; -2: not searched yet, -1: nowhere
        ending = b"\n--" + boundary  # a delimiter that ends the body, without a line break
        self._last = len(body) - len(ending) if body.endswith(ending) else -1

    def after(self, start: int) -> int:
        """Where the first delimiter at or after ``start`` begins (its LF). Raises ValueError
        when there is none: the body ended inside a part."""
        first = self._last if self._last >= start else -1
        for i, form in enumerate(self._forms):
            at = self._next[i]
            if -1 != at < start:
                at = self._next[i] = self._body.find(form, start)
            if at >= 0 and (first < 0 or at < first):
                first = at
        if first < 0:
            raise ValueError("multipart body without its closing delimiter")
        return first


def _content_end(body: bytes, start: int, delimiter_at: int) -> int:
    """A part's content ends at its delimiter's line break, CRLF or LF (or at once, if the
    delimiter follows the blank line directly)."""
    if delimiter_at > start and body[delimiter_at - 1] == 0x0D:
        return delimiter_at - 1
    return max(start, delimiter_at)


def _blank_line(body: bytes, start: int, end: int) -> tuple[int, int]:
    """(end of a part's headers, start of its content): the first empty line between ``start``
    and ``end`` (the part's delimiter, or MAX_HEADER_BYTES on). Raises ValueError when there is
    none."""
    if body.startswith(b"\r\n", start):
        return start, start + 2
    if body.startswith(b"\n", start):
        return start, start + 1
    crlf, lf = body.find(b"\r\n\r\n", start, end), body.find(b"\n\n", start, end)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, crlf + 4
    if lf >= 0:
        return lf, lf + 2
    raise ValueError("multipart part without the blank line after its headers")


def _headers(block: bytes) -> Headers:
    """A part's header block: ``Name: value`` lines, continuation lines folded in."""
    headers = Headers()
    for line in block.replace(b"\r\n", b"\n").replace(b"\n ", b" ").replace(b"\n\t", b" ").split(b"\n"):
        name, colon, value = line.decode("utf-8", "replace").partition(":")
        if colon:
            headers.add(name.strip(), value.strip())
    return headers


def _charset(headers: Headers) -> str:
    charset = parse_options_header(headers.get("Content-Type"))[1].get("charset", "").lower()
    return charset if charset in CHARSETS else "utf-8"
