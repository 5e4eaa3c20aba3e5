"""Logs on stdout: one JSON object per line for machines, or one readable line for a person.

Every line carries the function's name and, while a request is served, its request id. The
JSON formatter is python-json-logger's; fields given with ``extra=`` become JSON fields. What
is logged is chosen here and in :mod:`shared.access`: never a secret key, a token or its hash,
a Redis password or image bytes.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from typing import Any

from pythonjsonlogger.json import JsonFormatter

# The id of the request this thread (or context) is serving, for every line logged meanwhile.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# A secret key, a token's SHA-256, or a run of 32 or more base64url characters holding a capital or
# an underscore, as a random token does (all of one, or most: a message may cut a name short, or
# glue it to other characters); not a public key, nor a model name (a lowercase DNS label). A
# line's message and these fields may quote what a client sent (a path, a file or model name, a
# header): a client that put its token or secret key there must not find it in the logs.
SECRET_SHAPED = re.compile(
    r"sk_[A-Za-z0-9_-]{20,}|(?<![0-9a-f])[0-9a-f]{64}"
    r"|(?<![A-Za-z0-9_-])(?!pk_)(?=[A-Za-z0-9_-]*[A-Z_])[A-Za-z0-9_-]{32,}"
)
# Exactly a secret key, a token or a token's SHA-256, standing alone: what an answer to a client
# redacts (SECRET_SHAPED would also hide the file and input names it needs to mend its request).
SECRET_EXACT = re.compile(r"(?<![A-Za-z0-9_-])(?:sk_[A-Za-z0-9_-]{43}|[A-Za-z0-9_-]{43}|[0-9a-f]{64})(?![A-Za-z0-9_-])")
# An X-Request-Id that is a secret key, a token or a token's SHA-256 (it would be logged as it is).
SECRET_ID = re.compile(r"sk_.*|[A-Za-z0-9_-]{43}|[0-9a-f]{64}")
CLIENT_FIELDS = ("error", "model", "method")
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "function", "request_id"}


def redacted(text: str) -> str:
    """``text`` with whatever is shaped like a secret key, a token or its hash replaced."""
    return SECRET_SHAPED.sub("[redacted]", text)


class _Context(logging.Filter):
    """Adds ``function`` and ``request_id`` to every record, and takes anything shaped like a
    secret out of its message and the fields that may quote a client."""

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = function

    def filter(self, record: logging.LogRecord) -> bool:
        record.function = self.function
        if not getattr(record, "request_id", None):
            record.request_id = REQUEST_ID.get()
        # Formatted once, here: the formatter's getMessage then has no arguments to apply.
        record.msg, record.args = redacted(record.getMessage()), None
        for name in CLIENT_FIELDS:
            if isinstance(value := getattr(record, name, None), str):
                setattr(record, name, redacted(value))
        return True


# C0, DEL, C1 (NEL, CSI), line and paragraph separators, the invisible characters that reorder or
# hide what a terminal shows (Unicode's format characters: bidi controls, zero widths, BOM, tags;
# fillers, variation selectors, a soft hyphen), and lone surrogates (which stdout cannot encode:
# the line was lost, with a traceback on stderr).
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u115f\u1160\u180b-\u180f\u200b-\u200f"
    "\u2028-\u202e\u2060-\u206f\u0890\u0891\u08e2\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb"
    "\ud800-\udfff\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff]"
)
# A field's value written bare when it holds none of these, else quoted (logfmt's way): a
# client's path with "  status=200 public_key=…" in it stays inside its own field.
_NEEDS_QUOTES = re.compile(r'[\s="\\]|^$')


def _escaped(control: re.Match[str]) -> str:
    shown = repr(control[0])[1:-1]  # "\n", "\x1b", "\u202e"; a filler or a selector repr keeps as is
    if shown.startswith("\\"):
        return shown
    return f"\\u{ord(control[0]):04x}" if ord(control[0]) <= 0xFFFF else f"\\U{ord(control[0]):08x}"


def _quoted(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if _NEEDS_QUOTES.search(text) else text


class _Text(logging.Formatter):
    """``token  | 02:51:07 INFO  200 POST /token.json 64.8 ms  request_id=… public_key=…``:
    the function first (a predict function's with its model: ``predict-shapes``), then the
    message, then the extra fields; no colours."""

    def __init__(self, model: str = "") -> None:
        super().__init__()
        self.suffix = f"-{model}" if model else ""

    def format(self, record: logging.LogRecord) -> str:
        extras = {key: value for key, value in vars(record).items() if key not in _STANDARD and value is not None}
        if record.request_id:  # type: ignore[attr-defined]
            extras["request_id"] = record.request_id  # type: ignore[attr-defined]
        fields = "  " + " ".join(f"{key}={_quoted(value)}" for key, value in extras.items()) if extras else ""
        name = f"{record.function}{self.suffix}"  # type: ignore[attr-defined]
        line = f"{name:<15}| {self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} "
        # What a client sent (a path in an error, a header) may hold a newline: escaped, it cannot
        # start a line of its own that reads like the service's.
        line += _CONTROL.sub(_escaped, record.getMessage() + fields)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def access_level(status: int, quiet: bool = False) -> int:
    """The level of an access line: WARNING for a 5xx (the service failing: Redis down, a bug),
    so that LOG_LEVEL=WARNING still shows an outage; DEBUG for a ``quiet`` route's success (a
    probe, a scrape); else INFO."""
    return logging.WARNING if status >= 500 else logging.DEBUG if quiet and status < 400 else logging.INFO


def setup(function: str, level: str = "INFO", fmt: str | None = None, model: str = "") -> None:
    """Send every log record of this process to stdout as ``fmt`` ("json" or "text"; default:
    text on a terminal, JSON otherwise) at ``level``; gunicorn's own loggers included. Text
    lines name a predict function with its ``model``, as ``./start.sh`` does (JSON access lines
    carry the model as a field)."""
    fmt = fmt or ("text" if sys.stdout.isatty() else "json")
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_Context(function))
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{function}{message}{request_id}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
    else:
        handler.setFormatter(_Text(model))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("gunicorn", "gunicorn.error", "gunicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


def event(logger: logging.Logger, message: str, **fields: Any) -> None:
    """Log one INFO line with ``fields`` as its JSON fields (``None`` values left out)."""
    logger.info(message, extra={key: value for key, value in fields.items() if value is not None})
