"""The answers the worker gives itself, when a request never reaches the application: JSON
with the right status, logged and counted as the application's are."""

from __future__ import annotations

import json
import logging
import re
import uuid
from http import HTTPStatus
from typing import Any

from gunicorn.http import errors as parse_errors

from shared.deadlines import DeadlineSocket, kind_of
from shared.errors import InternalError, ThalamusError
from shared.logs import access_level

# gunicorn's parse errors → status; the first match wins. Response-header errors are ours: 500.
ERROR_STATUS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], int], ...] = (
    (
        (parse_errors.InvalidResponseHeader, parse_errors.InvalidResponseHeaderName, parse_errors.ConfigurationProblem),
        500,
    ),
    (parse_errors.LimitRequestLine, 414),
    (parse_errors.LimitRequestHeaders, 431),
    (parse_errors.ExpectationFailed, 417),
    (parse_errors.UnsupportedTransferCoding, 501),
    (parse_errors.ForbiddenProxyRequest, 403),
    (parse_errors.ParseException, 400),
)
MESSAGES = {
    414: "request line too long",
    431: "request headers too large",
    500: InternalError().message,
    501: "Transfer-Encoding other than chunked is not supported (use Content-Encoding for a compressed body)",
}


ACCESS_LOG = logging.getLogger("thalamus.access")  # shared.access's logger (not imported: see request_id_of)
# A request line's method, when it looks like one, after the one leading CRLF a server allows.
METHOD = re.compile(rb"(?:\r\n)?([A-Z]{1,16})(?= )")


def method_of(head: bytes | bytearray) -> str:
    """The method ``head``'s request line names, or "" (the head is not one gunicorn parsed)."""
    match = METHOD.match(head)
    return match.group(1).decode() if match else ""


def json_error(status: int, message: str, request_id: str, head_only: bool = False) -> bytes:
    """A complete HTTP answer ``{"error": message}`` that closes the connection (its head alone
    for a HEAD request, RFC 9110 9.3.2); ``request_id`` must be a sane id
    (:func:`request_id_of`), as it goes into a header as it is."""
    body = json.dumps({"error": message[:200]}).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-Id: {request_id}\r\nCache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + (b"" if head_only else body)


def request_id_of(request: Any) -> str:
    """The id of an answer the worker gives itself: the caller's (X-Request-Id, else a
    traceparent's trace id, by :func:`shared.access.request_id`'s rules) when gunicorn parsed the
    request's headers, else a new one. shared.access is imported here, not at the top: it
    imports prometheus_client, which shared.server must import only after it has set
    PROMETHEUS_MULTIPROC_DIR, and it is loaded by then (the application imports it)."""
    headers = getattr(request, "headers", None)
    if not headers:
        return uuid.uuid4().hex
    from shared.access import request_id

    environ = {"HTTP_" + str(name).upper().replace("-", "_"): str(value) for name, value in headers}
    return request_id(environ)


def refuse(
    sock: DeadlineSocket, status: int, message: str, request_id: str, method: str, function: str, client: str
) -> None:
    """Answer ``status`` with ``{"error": message}`` on ``sock`` if it takes the answer at once,
    log its access line (the application's lines: :class:`shared.access.AccessLog`; ``client``:
    the peer's address, as no header was believed) and, for a ``function``, count it in its
    request metrics; the route is "unmatched", as for any unknown path. Not in the duration
    histogram: no application ran."""
    answer = json_error(status, message, request_id, head_only=method == "HEAD")
    sock.send_nowait(answer)
    fields = {"event": "access", "method": method, "route": "unmatched", "status": status, "client": client}
    fields.update(request_id=request_id, bytes_in=0, bytes_out=len(answer), error=message)
    ACCESS_LOG.log(access_level(status), f"{status} {method or '-'} unmatched", extra=fields)
    if function:
        from shared import metrics  # not at the top: see request_id_of
        from shared.access import METHODS

        metrics.REQUESTS.labels(function, "unmatched", method if method in METHODS else "other", str(status)).inc()


def status_of(exc: BaseException) -> tuple[int, str]:
    """The status and message that answer ``exc``, raised before or around the application: a
    ThalamusError's own, else by the kind of gunicorn's parse error (500 for any other)."""
    if isinstance(exc, ThalamusError):
        return exc.status, exc.message
    status = next((code for kinds, code in ERROR_STATUS if isinstance(exc, kinds)), 500)
    return status, MESSAGES.get(status) or f"malformed request ({kind_of(exc)})"
