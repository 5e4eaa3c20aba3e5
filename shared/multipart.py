"""``multipart/form-data`` bodies (RFC 7578), split in memory.

werkzeug's parser streams: it runs the body through a regular-expression state machine in
64 KiB chunks and copies each file into a buffer of its own (a temporary file in ``/tmp`` past
500 KB). Every body that reaches a handler here is already in memory, read and bounded by
``MAX_UPLOAD_BYTES`` in :mod:`shared.http`, so the delimiters are found with ``bytes.find`` and
each file is one slice of the body: 2-4 times less CPU, all of it under the GIL
(``bench/bench_multipart.py``).

:class:`FormParser` plugs this into Flask's request (``request.files``, ``request.form``) in
place of werkzeug's, with werkzeug's limits (``MAX_FORM_PARTS``, ``MAX_FORM_MEMORY_SIZE``) and
bounds of its own on the parts' headers. A body that cannot be split is an empty form, as with
werkzeug. Every limit exceeded (parts, a text field's size, the parts' header lines, bytes of one
part's, bytes of all), and a part without a name (RFC 7578 requires
``Content-Disposition: form-data; name=...``, which werkzeug reads as the name ""), is a
:class:`~shared.errors.BadRequest` saying which.
"""

from __future__ import annotations

import io
from typing import IO, Any

from werkzeug.datastructures import FileStorage, Headers, MultiDict
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.http import parse_options_header

from shared.errors import BadRequest

TAILS = (b"\r\n", b"\n", b"--")  # what follows a delimiter's boundary: its line break, or "--" (the last)
MAX_BOUNDARY = 200  # RFC 2046 allows 70 characters; werkzeug sets no limit
# A part's headers (Content-Disposition, Content-Type, rarely more): each header block, and all of
# them in one body, is bounded, as werkzeug does not, so that headers cannot cost more memory
# (a Headers object per part) or time (their parsing) than the images themselves.
MAX_PART_HEADERS = 16
MAX_HEADER_BYTES = 8 * 1024  # one part's header block, as gunicorn's limit for a request header
# All the parts' header blocks of one body: werkzeug parses each Content-Disposition a character
# per Python loop (1 MiB of long quoted parameters took 0.46 s of CPU); 32 files take ~3 KB.
MAX_FORM_HEADER_BYTES = 64 * 1024
# werkzeug's parser, for its rule on a text field's charset (get_part_charset): the same answers.
WERKZEUG = MultiPartParser()


class FormParser(FormDataParser):
    """Flask's form parser with :func:`split` for multipart bodies (urlencoded ones unchanged)."""

    def _parse_multipart(
        self, stream: IO[bytes], mimetype: str, content_length: int | None, options: dict[str, str]
    ) -> tuple[IO[bytes], MultiDict[str, Any], MultiDict[str, Any]]:
        boundary = options.get("boundary", "").encode("ascii")  # non-ASCII: UnicodeError, a ValueError
        _check(boundary)  # before reading: a form that cannot be split leaves the body to get_data()
        fields, files = split(stream.read(), boundary, self.max_form_parts, self.max_form_memory_size)
        return stream, self.cls(fields), self.cls(files)


def split(
    body: bytes, boundary: bytes, max_parts: int | None = None, max_field_bytes: int | None = None
) -> tuple[list[tuple[str, str]], list[tuple[str, FileStorage]]]:
    """The text fields and the files of a multipart ``body``, in the order sent.

    Raises ValueError when the body is not a whole multipart body for ``boundary`` (no
    boundary, no closing delimiter, a part without its blank line), and BadRequest past
    ``max_parts`` parts, for a text field over ``max_field_bytes``, for a part with over
    MAX_PART_HEADERS header lines or MAX_HEADER_BYTES of them, for more than
    MAX_FORM_HEADER_BYTES of part headers in all, or a part without a name (see :func:`_nameless`).
    Line breaks may be CRLF or LF; a preamble before the first delimiter and an epilogue after
    the last are ignored.
    """
    _check(boundary)
    delimiters = _Delimiters(body, boundary)
    dash = b"--" + boundary
    if body.startswith(dash) and (len(body) == len(dash) or body.startswith(TAILS, len(dash))):
        at = len(dash)
    else:  # a preamble first
        at = delimiters.after(0) + 1 + len(dash)
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, FileStorage]] = []
    header_bytes = 0
    while at < len(body) and not body.startswith(b"--", at):  # "--" after a delimiter: that was the last part
        if len(fields) + len(files) == max_parts:
            raise BadRequest(f"form has too many parts (limit {max_parts}, fields and files)")
        at += 2 if body.startswith(b"\r\n", at) else 1  # the delimiter's line break
        next_at = delimiters.after(at)
        headers_end, content_at = _blank_line(body, at, next_at + 1)
        header_bytes += headers_end - at
        if header_bytes > MAX_FORM_HEADER_BYTES:
            raise BadRequest(f"multipart part headers over {MAX_FORM_HEADER_BYTES // 1024} KiB in all")
        headers = _headers(body[at:headers_end])
        content = body[content_at : _content_end(body, content_at, next_at)]
        disposition = parse_options_header(headers.get("Content-Disposition"))[1]
        name, filename = disposition.get("name", ""), disposition.get("filename")
        if not name:
            raise _nameless(len(fields) + len(files) + 1, headers)
        if filename is None:
            if max_field_bytes is not None and len(content) > max_field_bytes:
                raise BadRequest(f"form field {name[:40]!r} too large (limit {max_field_bytes} bytes)")
            fields.append((name, content.decode(WERKZEUG.get_part_charset(headers), "replace")))
        else:
            files.append((name, FileStorage(io.BytesIO(content), filename, name, headers=headers)))
        at = next_at + 1 + len(dash)
    return fields, files


def _nameless(number: int, headers: Headers) -> BadRequest:
    """The error for part ``number`` (from 1), which has no name."""
    what = "no name in its Content-Disposition" if "Content-Disposition" in headers else "no Content-Disposition"
    return BadRequest(
        f"multipart part {number} has {what}: each part needs 'Content-Disposition: form-data; name=\"...\"' "
        '(an image: name="file"; filename="...", as curl -F file=@photo.jpg sends it)'
    )


def _check(boundary: bytes) -> None:
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise ValueError("missing or invalid boundary")


class _Delimiters:
    """The delimiters of one body, in order: a line break, ``--``, the boundary, then another
    line break or ``--`` (the last). Each of the three forms is searched for
    with ``bytes.find``, each search going on from where that form was last found, so a body is
    scanned at most three times however many parts it has and however often the boundary's text
    appears in it. (RFC 2046's optional spaces before a delimiter's line break, which HTTP
    clients do not send, are not read as a delimiter.)"""

    def __init__(self, body: bytes, boundary: bytes) -> None:
        self._body = body
        self._forms = [b"\n--" + boundary + tail for tail in TAILS]
        self._next = [-2] * len(TAILS)  # where each form is next found; -2: not searched yet, -1: nowhere

    def after(self, start: int) -> int:
        """Where the first delimiter at or after ``start`` begins (its LF). Raises ValueError
        when there is none: the body ended inside a part."""
        first = -1
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


def _blank_line(body: bytes, start: int, delimiter: int) -> tuple[int, int]:
    """(end of a part's headers, start of its content): the first empty line between ``start``
    and the part's ``delimiter``, within MAX_HEADER_BYTES. Raises ValueError when the part has
    none (a malformed body), BadRequest when its headers run on past MAX_HEADER_BYTES."""
    if body.startswith(b"\r\n", start):
        return start, start + 2
    if body.startswith(b"\n", start):
        return start, start + 1
    end = min(delimiter, start + MAX_HEADER_BYTES)
    crlf, lf = body.find(b"\r\n\r\n", start, end), body.find(b"\n\n", start, end)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, crlf + 4
    if lf >= 0:
        return lf, lf + 2
    if end < delimiter:
        raise BadRequest(f"a multipart part's headers are over {MAX_HEADER_BYTES // 1024} KiB")
    raise ValueError("multipart part without the blank line after its headers")


def _headers(block: bytes) -> Headers:
    """A part's header block: ``Name: value`` lines, continuation lines folded in."""
    headers = Headers()
    lines = block.replace(b"\r\n", b"\n").replace(b"\n ", b" ").replace(b"\n\t", b" ").split(b"\n")
    if len(lines) > MAX_PART_HEADERS:
        raise BadRequest(f"a multipart part has over {MAX_PART_HEADERS} header lines")
    for line in lines:
        name, colon, value = line.decode("utf-8", "replace").partition(":")
        if colon:
            headers.add(name.strip(), value.strip())
    return headers
