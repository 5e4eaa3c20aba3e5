"""The HTTP side every function shares: a routing table, JSON helpers, error mapping.

A function builds one :class:`Service` from its routes and calls it from its
``@functions_framework.http`` entry point. The service adds ``/healthz``, ``/readyz``,
``/openapi.json`` and ``/docs``, maps :class:`~shared.errors.ThalamusError` (and Redis outages)
to JSON responses, and enforces ``MAX_UPLOAD_BYTES`` before anything reads the body.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import flask
from werkzeug import exceptions as wz
from werkzeug.routing import Map, Rule

from shared import docs
from shared.config import IPNetwork, Settings
from shared.errors import (
    BadRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ThalamusError,
    Unauthorized,
    UnsupportedMediaType,
)
from shared.store import REDIS_DOWN, describe

log = logging.getLogger("thalamus")
Handler = Callable[..., flask.Response | tuple[Any, int] | dict | list]


@dataclass(frozen=True)
class Route:
    """One row of a function's routing table: path rule, methods, handler."""

    rule: str
    methods: tuple[str, ...]
    handler: Handler


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> flask.Response:
    """``body`` as compact JSON with ``status``."""
    response = flask.Response(
        json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json"
    )
    response.headers.update(headers or {})
    return response


def error_response(error: ThalamusError) -> flask.Response:
    """The JSON form of ``error``: ``{"error": message}``, its status and headers."""
    response = json_response({"error": error.message}, error.status, error.headers)
    if error.status == 413:
        # functions-framework reads the whole body after non-streamed responses; a streamed
        # body and Connection: close keep an oversized upload out of memory.
        body = response.get_data()
        response.response = iter([body])
        response.headers["Connection"] = "close"
    return response


def read_json(request: flask.Request) -> dict[str, Any]:
    """The request's JSON object body, or BadRequest / UnsupportedMediaType saying what is wrong."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("send Content-Type: application/json")
    try:
        body = json.loads(request.get_data(cache=True) or b"")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def bearer_token(request: flask.Request) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or Unauthorized."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token; send Authorization: Bearer <token>")
    return token.strip()


def client_address(request: flask.Request, trusted: tuple[IPNetwork, ...]) -> str:
    """The caller's address, for per-address limits.

    The socket peer, unless it is one of the ``trusted`` proxy networks: then the right-most
    X-Forwarded-For entry that is not a trusted proxy (each proxy appends the address it saw, so
    entries a client forges stay on the left). However many proxies there are in between.
    """
    peer = request.remote_addr or "unknown"
    if not _is_trusted(peer, trusted):
        return peer
    forwarded = [a.strip() for a in request.headers.get("X-Forwarded-For", "").split(",") if a.strip()]
    for address in reversed(forwarded):
        if not _is_trusted(address, trusted):
            return address[:64]
    return forwarded[0][:64] if forwarded else peer


def _is_trusted(address: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def _buffer_chunked_body(request: flask.Request, limit: int) -> None:
    """Read a body sent without Content-Length (chunked) up to ``limit`` bytes, then let the rest
    of the request see it as an ordinary body of known length; more than ``limit`` → 413."""
    environ = request.environ
    if not environ.get("wsgi.input_terminated"):
        return  # the server does not delimit bodies without a length: there is no body to read
    stream, chunks, size = environ["wsgi.input"], [], 0
    while chunk := stream.read(min(65536, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
    environ["wsgi.input"] = io.BytesIO(b"".join(chunks))
    environ["CONTENT_LENGTH"] = str(size)
    del environ["wsgi.input_terminated"]
    environ.pop("HTTP_TRANSFER_ENCODING", None)  # werkzeug ignores Content-Length while this says chunked


class Service:
    """One function's HTTP surface: its routes plus health, readiness and docs."""

    def __init__(
        self,
        settings: Settings,
        routes: Iterable[Route],
        *,
        ready: Callable[[], None],
        openapi: dict[str, Any],
    ) -> None:
        self.settings = settings
        self._ready = ready
        self.openapi = openapi
        table = [
            *routes,
            Route("/healthz", ("GET",), lambda request: {"status": "ok"}),
            Route("/readyz", ("GET",), self._readyz),
            Route("/openapi.json", ("GET",), lambda request: self.openapi),
            Route("/docs", ("GET",), lambda request: docs.page(["/openapi.json"])),
            Route("/docs/<asset>", ("GET",), lambda request, asset: docs.asset(asset)),
        ]
        self._handlers = {route.rule: route.handler for route in table}
        self._map = Map(
            [Rule(route.rule, methods=list(route.methods), endpoint=route.rule) for route in table],
            strict_slashes=False,
        )

    def _readyz(self, request: flask.Request) -> dict:
        self._ready()  # Redis down → 503 through the mapping in __call__
        return {"status": "ready"}

    def __call__(self, request: flask.Request) -> flask.Response:
        """Route ``request`` and answer; never lets an exception escape as an HTML 500."""
        try:
            if (request.content_length or 0) > self.settings.max_upload_bytes:
                raise PayloadTooLarge(self.settings.max_upload_bytes)
            if request.content_length is None:
                _buffer_chunked_body(request, self.settings.max_upload_bytes)
            endpoint, args = self._match(request)
            result = self._handlers[endpoint](request, **args)
            return result if isinstance(result, flask.Response) else json_response(result)
        except ThalamusError as error:
            return error_response(error)
        except wz.RequestEntityTooLarge:
            return error_response(PayloadTooLarge(self.settings.max_upload_bytes))
        except wz.ClientDisconnected:
            return error_response(BadRequest("request body ended early"))
        except REDIS_DOWN:
            return error_response(
                ServiceUnavailable(f"Redis unreachable at {describe(self.settings.redis_url)}")
            )
        except Exception:  # a bug: log it with its traceback, answer without one
            log.exception("unhandled error on %s %s", request.method, request.path)
            return json_response({"error": "internal error"}, 500)

    def _match(self, request: flask.Request) -> tuple[str, dict[str, str]]:
        adapter = self._map.bind("localhost")
        try:
            endpoint, args = adapter.match(request.path, method=request.method)
        except wz.MethodNotAllowed as exc:
            raise MethodNotAllowed(sorted(exc.valid_methods or [])) from None
        except wz.NotFound:
            raise NotFound(f"no such path: {request.path}") from None
        return endpoint, args
