"""One error hierarchy; each class knows its HTTP status and extra headers.

Handlers raise these; :mod:`shared.http` turns them into ``{"error": message}`` responses.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.logs import SECRET_EXACT, SECRET_SHAPED


class StartupError(Exception):
    """A function cannot start (bad setting, missing or broken model bundle): the message is the
    one line the launcher prints before exiting."""


# The most of a message an answer (and its access line) carries. Messages quote what the client
# sent (a V2 input's name, a datatype, a model name) through shown() or clipped(); this is the
# bound on any quote that did not (a path): a 10 KB gzip body once made a 10 MB answer and a 10 MB
# log line.
MESSAGE_CHARS = 600


def clipped(text: str, limit: int = MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, the last one an ellipsis when it was longer, with
    any secret key, token or token hash in it redacted (before the cut: a cut could leave half of
    one, too short to be known as one). An answer never echoes a secret that a client put where
    it does not belong (a path, a model or input name); the logs redact more (SECRET_SHAPED)."""
    if len(text) <= limit:
        return _redacted(text)
    # Cut first (a client's 10 MB string costs the cut, not a scan), past any secret the cut
    # would halve (a secret is under 100 characters), then redacted and cut to the limit. A
    # longer run shaped like one (a token glued to other characters) is cut before, not inside:
    # a piece of it would be too short for the logs to know it.
    end = limit - 1
    for found in SECRET_EXACT.finditer(text, 0, limit + 100):
        if found.start() < end < found.end():
            end = found.end()
    if end == limit - 1:
        for found in SECRET_SHAPED.finditer(text, 0, limit + 100):
            if found.start() < end < found.end():
                end = found.start()
    return f"{_redacted(text[:end])[: limit - 1]}…"


def _redacted(text: str) -> str:
    return SECRET_EXACT.sub("[redacted]", text)


def shown(value: object, limit: int = 60) -> str:
    """``value`` as an error message quotes it (its ``repr``), cut to ``limit`` characters: a
    client's string or list is named, not echoed whole."""
    return clipped(repr(value), limit)


class ThalamusError(Exception):
    """Base of every error a client may see; its message is at most ``MESSAGE_CHARS`` long."""

    status = 500
    # The caller's public key, when the error is about a key the caller proved it holds (a
    # valid token refused for its scopes or rate): for the access log, never for the answer.
    public_key: str | None = None

    def __init__(self, message: str, headers: dict[str, str] | None = None, detail: str | None = None) -> None:
        message = clipped(message)
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        # What the operator sees (the access log, keys.py's line); it may name internal hosts,
        # which the client's ``message`` never does.
        self.detail = clipped(detail) if detail else message


class InternalError(ThalamusError):
    """A bug (logged with its traceback): the client learns nothing of it but its status."""

    def __init__(self) -> None:
        super().__init__("internal error")


class BadRequest(ThalamusError):
    status = 400


class Unauthorized(ThalamusError):
    """No bearer token, or one that is not (or no longer) valid. The challenge says
    ``error="invalid_token"`` when a token was sent (RFC 6750 §3.1: OAuth2 clients fetch a new
    one on it); a request without one gets the bare challenge."""

    status = 401

    def __init__(self, message: str = "invalid or expired token", token_sent: bool = True) -> None:
        challenge = 'Bearer realm="thalamus"' + (', error="invalid_token"' if token_sent else "")
        super().__init__(message, {"WWW-Authenticate": challenge})


class InvalidCredentials(ThalamusError):
    """Wrong, unknown or revoked keypair: one message for all, so keys cannot be probed."""

    status = 401

    def __init__(self) -> None:
        super().__init__("invalid public_key or secret_key")


class RequestTimeout(ThalamusError):
    """The request (its headers or body) did not arrive within its deadline."""

    status = 408


class Forbidden(ThalamusError):
    status = 403


class InsufficientScope(Forbidden):
    """A valid token whose scopes exclude the model it called (RFC 6750 §3.1's challenge)."""

    def __init__(self, model: str) -> None:
        super().__init__(
            f"this token may not call model {model}",
            {"WWW-Authenticate": 'Bearer realm="thalamus", error="insufficient_scope"'},
        )


class InvalidScope(BadRequest):
    """A token asked for with scopes its key does not have, or that are not model names
    (RFC 6749's ``invalid_scope``)."""


class NotFound(ThalamusError):
    status = 404


class MethodNotAllowed(ThalamusError):
    status = 405

    def __init__(self, allowed: list[str], headers: Mapping[str, str] | None = None) -> None:
        """``headers``: the path's own, which its refusals carry too (the token endpoint's no-store)."""
        methods = ", ".join(allowed)
        super().__init__(f"method not allowed; use {methods}", {**(headers or {}), "Allow": methods})


class PayloadTooLarge(ThalamusError):
    status = 413

    def __init__(self, limit: int, what: str = "request body") -> None:
        super().__init__(f"{what} too large (limit {limit} bytes)")


class UnsupportedMediaType(ThalamusError):
    status = 415


class TooManyRequests(ThalamusError):
    status = 429

    def __init__(self, retry_after: int, message: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(
            message or f"too many failed attempts; retry in {retry_after} s",
            {**(headers or {}), "Retry-After": str(retry_after)},
        )


class BadGateway(ThalamusError):
    """A function behind the local gateway did not answer."""

    status = 502

    def __init__(self, message: str) -> None:
        super().__init__(message, {"Retry-After": "2"})


class ServiceUnavailable(ThalamusError):
    status = 503

    def __init__(self, message: str, retry_after: int = 2, detail: str | None = None) -> None:
        super().__init__(message, {"Retry-After": str(retry_after)}, detail)


class OutcomeUnknown(ServiceUnavailable):
    """Redis took a command, then fell silent or dropped the connection before answering: a
    change the command carried may still be made (keys.py keeps a new key's file for that)."""


class UnknownKey(NotFound):
    """The key store has no such public key (revoking twice, a typo)."""
