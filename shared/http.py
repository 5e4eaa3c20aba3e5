"""The HTTP side every function shares: a routing table, auth per route, JSON answers.

A function's factory builds one :class:`Service` from its :class:`Route` table; its ``main.py``
hands the service to :func:`entry_point`, which functions-framework serves. The service adds
``/healthz``, ``/readyz``, ``/openapi.json`` and ``/docs``, authenticates the routes that ask for
it before their body is read, enforces ``MAX_UPLOAD_BYTES``, and maps every
:class:`~shared.errors.ThalamusError` to a JSON answer.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import flask
import functions_framework
from werkzeug import exceptions as wz
from werkzeug.routing import BaseConverter, Map, RequestRedirect, Rule

import shared
from shared import docs, jsonbody, metrics
from shared.access import AccessLog, Exchange, exchange_of
from shared.auth import AuthStore, Session
from shared.config import Settings
from shared.errors import (
    BadRequest,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    ThalamusError,
    UnsupportedMediaType,
    clipped,
)
from shared.multipart import FormParser

log = logging.getLogger("thalamus")

# A body that took longer than this to arrive has its token checked again before the handler
# runs: keys.py says a revocation is in force everywhere tokencache.PROPAGATION_SECONDS after
# it, and a slow upload's token, let through before, must not be answered after that.
RECHECK_AFTER_SECONDS = 0.5


class Request(flask.Request):
    """Flask's request, with multipart bodies split in memory by :mod:`shared.multipart` instead
    of werkzeug's streaming parser."""

    form_data_parser_class = FormParser


@dataclass(frozen=True)
class Call:
    """One request as a handler sees it."""

    request: flask.Request
    # Values of the route's path variables, e.g. {"name": "shapes"}.
    args: dict[str, str]
    # The caller's session on routes with ``auth=True``; None elsewhere.
    session: Session | None = None


# GET /v2: the Open Inference Protocol's server metadata, with the extensions the predict
# functions implement (tritonclient's names).
V2_SERVER = {
    "name": "thalamus",
    "version": shared.__version__,
    "extensions": ["binary_tensor_data", "classification", "model_configuration"],
}

Reply = flask.Response | dict[str, Any] | list[Any]
Handler = Callable[[Call], Reply]


@dataclass(frozen=True)
class Route:
    """One row of a function's routing table."""

    rule: str  # a werkzeug rule: "/models/<name>/predict.json"
    methods: tuple[str, ...]
    handler: Handler
    # A bearer token is required; when the rule has a <name>, the key must be allowed that model.
    auth: bool = False
    # Headers on every answer of the route, refusals included (the token endpoint's no-store).
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def takes_body(self) -> bool:
        """Whether a request of this route may have a body to read (POST, PUT, PATCH)."""
        return not {"POST", "PUT", "PATCH"}.isdisjoint(self.methods)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> flask.Response:
    """``body`` as compact JSON with ``status``."""
    response = flask.Response(json.dumps(body, separators=(",", ":")), status=status, mimetype="application/json")
    response.headers.update(headers or {})
    return response


def error_response(error: ThalamusError) -> flask.Response:
    """The JSON form of ``error``: ``{"error": message}``, its status and headers."""
    return json_response({"error": error.message}, error.status, error.headers)


def read_json(request: flask.Request) -> dict[str, Any]:
    """The request's JSON object body, or BadRequest / UnsupportedMediaType saying what is wrong."""
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("send Content-Type: application/json")
    body = jsonbody.parse(request.get_data(cache=True))
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _read_body(request: flask.Request, limit: int) -> None:
    """Read the request body into memory, at most ``limit`` bytes (more → PayloadTooLarge), and
    let the rest of the request see it as an ordinary body of known length.

    Reading it here, after authentication, means an unauthenticated caller's body is never read,
    and a chunked body (no Content-Length) is bounded like any other.
    """
    environ = request.environ
    length = request.content_length
    if length is None and not environ.get("wsgi.input_terminated"):
        return  # the server does not delimit bodies without a length: there is no body to read
    stream, chunks, size = environ["wsgi.input"], [], 0
    want = limit + 1 if length is None else length
    while size < want and (chunk := stream.read(min(65536, want - size))):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
    if length is not None and size < length:
        raise BadRequest("request body ended early")
    environ["wsgi.input"] = io.BytesIO(b"".join(chunks))
    environ["CONTENT_LENGTH"] = str(size)
    # The stream ends where the body does: werkzeug hands it over as it is, and reading it whole
    # returns the body itself, where a LimitedStream would copy it three times in 64 KiB pieces.
    environ["wsgi.input_terminated"] = True
    environ.pop("HTTP_TRANSFER_ENCODING", None)  # werkzeug ignores Content-Length while this says chunked
    environ["thalamus.body_read"] = True


class _Segment(BaseConverter):
    """A path variable: one segment without ``:``, which ends a name before TF Serving's
    ``:predict`` verb; otherwise ``/v1/models/<name>`` would also match ``shapes:predict`` and
    405 answers would list its GET in ``Allow``."""

    regex = "[^/:]+"


class _MatchingRule(Rule):
    """A route's rule, made for matching requests. werkzeug compiles two URL builders for every
    rule when a map is made (Python source generated, parsed and compiled: seven eighths of
    making this map, 20 ms of every cold start on a slow day), for ``url_for``, which nothing here
    calls: each is compiled the first time it is used instead."""

    def _compile_builder(self, append_unknown: bool = True) -> Callable[..., tuple[str, str]]:
        compiled: list[Callable[..., tuple[str, str]]] = []

        def build(rule: Rule, **values: Any) -> tuple[str, str]:
            if not compiled:
                compiled.append(Rule._compile_builder(rule, append_unknown))
            return compiled[0](rule, **values)

        return build


class Service:
    """One function's HTTP surface: its routes plus health, readiness and docs."""

    def __init__(
        self,
        settings: Settings,
        routes: Iterable[Route],
        *,
        openapi: Callable[[], dict[str, Any]],
        auth: AuthStore | None = None,
        model: str | None = None,
        max_body: int | None = None,
        function: str = "function",
    ) -> None:
        """``openapi`` builds the function's OpenAPI document (called once, when first asked for);
        ``auth`` checks tokens on ``auth=True`` routes; ``model`` is the one model this function
        serves (a path naming another is 404); ``max_body`` lowers MAX_UPLOAD_BYTES for a
        function whose requests are small; ``function`` names it in logs and metrics."""
        self.settings = settings
        self.function = function
        self.max_body = min(max_body or settings.max_upload_bytes, settings.max_upload_bytes)
        self._openapi = openapi
        self._auth = auth
        self._model = model
        table = [
            *routes,
            Route("/healthz", ("GET",), lambda call: {"status": "ok"}),
            # Ready = this process can serve: it is up and its model loaded before the service
            # existed. Not Redis: Knative would take every pod out of rotation on a Redis blip,
            # and a revision whose Redis is late would never reach its initial scale; a Redis
            # outage is answered by the routes themselves, fast (503 + Retry-After).
            Route("/readyz", ("GET",), lambda call: {"status": "ready"}),
            Route(
                "/metrics",
                ("GET",),
                lambda call: flask.Response(metrics.exposition(), content_type=metrics.CONTENT_TYPE),
            ),
            # The inference protocols' server endpoints: every function answers them, so the
            # cluster may send them to the token function, which is never scaled away. KServe's
            # V1 liveness is the root (its SDK's is_server_live() reads {"status": "alive"}).
            Route("/", ("GET",), lambda call: {"status": "alive"}, headers={"Vary": "Accept"}),  # see local/routes
            Route("/v2", ("GET",), lambda call: V2_SERVER),
            Route("/v2/health/live", ("GET",), lambda call: {"live": True}),
            Route("/v2/health/ready", ("GET",), lambda call: {"ready": True}),
            Route("/openapi.json", ("GET",), lambda call: self.openapi),
            Route("/docs", ("GET",), lambda call: docs.page(["/openapi.json"])),
            Route("/docs/<asset>", ("GET",), lambda call: docs.asset(call.args["asset"])),
        ]
        if any(route.auth for route in table) and auth is None:
            raise ValueError("routes with auth=True need an AuthStore")
        self._routes = {route.rule: route for route in table}
        self._map = Map(
            [_MatchingRule(route.rule, methods=list(route.methods), endpoint=route.rule) for route in table],
            strict_slashes=False,
            merge_slashes=False,
            converters={"default": _Segment},
        )

    @functools.cached_property
    def openapi(self) -> dict[str, Any]:
        """The function's OpenAPI document, built on first use: nobody waits for it at a cold start."""
        return self._openapi()

    def __call__(self, request: flask.Request) -> flask.Response:
        """Route ``request`` and answer; never lets an exception escape as an HTML 500."""
        exchange = exchange_of(request.environ)
        try:
            response = self._dispatch(request, exchange)
        except ThalamusError as error:
            response = error_response(error)
            exchange.error = error.detail
        except wz.RequestEntityTooLarge:  # werkzeug's urlencoded form parser: too many fields or a huge one
            limit = request.max_form_parts
            response = error_response(BadRequest(f"form has too many fields (limit {limit}) or a field too large"))
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                # The process is out of file descriptors (see shared.worker): not this request's fault.
                log.warning("out of file descriptors on %s %s", request.method, request.path)
                response = error_response(ServiceUnavailable("this server is out of file descriptors; retry shortly"))
            else:  # a bug: log it with its traceback, answer without one
                log.exception("unhandled error on %s %s", request.method, request.path)
                response = error_response(InternalError())
        if response.status_code >= 400 and exchange.error is None:
            exchange.error = _error_message(response)
        route = self._routes.get(exchange.route or "")
        if route is not None and request.method in route.methods:
            response.headers.update(route.headers)
        if exchange.session is not None:
            assert self._auth is not None
            response.headers.update(exchange.session.headers)
            self._auth.record_request(exchange.session, exchange.model, response.status_code)
        if not request.environ.get("thalamus.body_read") and has_body(request.environ):
            _leave_body_unread(request, response)
        return response

    def _dispatch(self, request: flask.Request, exchange: Exchange) -> flask.Response:
        """Route, authenticate, read the body, call the handler (noting what it learns in ``exchange``)."""
        route, args = self._match(request, exchange)
        if (request.content_length or 0) > self.max_body:
            raise PayloadTooLarge(self.max_body)
        if exchange.model is not None and self._model is not None and exchange.model != self._model:
            raise NotFound(f"no such model here: {clipped(exchange.model, 64)} (this function serves {self._model})")
        if route.auth:
            assert self._auth is not None  # checked in __init__
            try:
                exchange.session = self._auth.authenticate(request.headers.get("Authorization"), exchange.model)
            except ThalamusError as refused:
                exchange.public_key = refused.public_key
                raise
        if has_body(request.environ) and route.takes_body:  # elsewhere left unread (see __call__)
            checked = time.monotonic()
            _read_body(request, self.max_body)
            if self._auth is not None and route.auth and time.monotonic() - checked > RECHECK_AFTER_SECONDS:
                try:
                    self._auth.authenticate(request.headers.get("Authorization"), exchange.model, count_rate=False)
                except ThalamusError as refused:  # counted as the first check's refusals are
                    exchange.session, exchange.public_key = None, refused.public_key
                    raise
        result = route.handler(Call(request, args, exchange.session))
        return result if isinstance(result, flask.Response) else json_response(result)

    def _match(self, request: flask.Request, exchange: Exchange) -> tuple[Route, dict[str, str]]:
        """The route of ``request`` and its arguments, noted in ``exchange`` (a 405's route too:
        its access line and metrics name the route, not ``unmatched``)."""
        adapter = self._map.bind("localhost")
        try:
            endpoint, args = adapter.match(request.path, method=request.method)
        except wz.MethodNotAllowed as exc:
            allowed = sorted(exc.valid_methods or [])
            # Another model's path is not here at all, whatever the method: 404, as with a GET.
            endpoint, args = adapter.match(request.path, method=allowed[0])
            exchange.route, exchange.model = str(endpoint), args.get("name")
            if self._model is not None and args.get("name", self._model) != self._model:
                raise NotFound(
                    f"no such model here: {clipped(args['name'], 64)} (this function serves {self._model})"
                ) from None
            raise MethodNotAllowed(allowed, self._routes[str(endpoint)].headers) from None
        except wz.NotFound:
            raise NotFound(f"no such path: {request.path}") from None
        exchange.route, exchange.model = str(endpoint), args.get("name")
        return self._routes[str(endpoint)], dict(args)


def _error_message(response: flask.Response) -> str | None:
    if response.mimetype != "application/json" or response.is_streamed:
        return None
    try:
        body = json.loads(response.get_data())
    except ValueError:
        return None
    return str(body.get("error")) if isinstance(body, dict) and "error" in body else None


def has_body(environ: dict[str, Any]) -> bool:
    """Whether the request has a body: a Content-Length above 0, or chunked (RFC 9112 6.3). Not
    ``wsgi.input_terminated``, which gunicorn sets on every request, a bodiless GET included."""
    length = environ.get("CONTENT_LENGTH") or "0"
    return length != "0" or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()


def _leave_body_unread(request: flask.Request, response: flask.Response) -> None:
    """Answer without reading the request body, and close the connection: functions-framework
    reads the rest of the body after a non-streamed response, and a kept-alive connection would
    too; a streamed response on a closing connection does neither, so an unwanted (or slow)
    upload never reaches memory or holds a thread."""
    body = response.get_data()
    response.response = iter([body])
    response.headers["Connection"] = "close"  # for servers that honour it (the test client)
    close_connection = getattr(request.environ.get("wsgi.input"), "close_connection", None)
    if close_connection is not None:  # shared.deadlines.GuardedBody: tell gunicorn itself
        close_connection()


def entry_point(service: Service, observe: bool = True) -> Callable[[flask.Request], flask.Response]:
    """The ``handle`` function that functions-framework serves for ``service``.

    Called while functions-framework loads ``main.py`` (inside ``create_app``), it also makes the
    framework's own answers JSON: its fixed 404s (``/robots.txt``, ``/favicon.ico``) and routing
    errors get ``{"error": ...}`` (a body left unread), its redirects are 404s, paths with doubled
    slashes reach the service instead of being redirected, and multipart bodies are split by
    :mod:`shared.multipart`.
    """
    if flask.has_app_context():
        app = flask.current_app
        app.url_map.merge_slashes = False
        app.request_class = Request
        app.register_error_handler(wz.HTTPException, _framework_error)
        app.register_error_handler(ThalamusError, error_response)
        app.register_error_handler(500, _framework_error)  # instead of functions-framework's HTML one
        app.before_request(_only_the_function)
        if observe:  # False only to measure what the access log and request metrics cost (bench/)
            app.wsgi_app = AccessLog(app.wsgi_app, service.function, service.settings.trusted_proxies)  # type: ignore[method-assign]

    def handle(request: flask.Request) -> flask.Response:
        return service(request)

    return cast(Callable[[flask.Request], flask.Response], functions_framework.http(handle))


def _framework_error(exc: wz.HTTPException) -> flask.Response:
    """What Flask or functions-framework answer before the service runs (their /robots.txt and
    /favicon.ico, a Host they refuse, an Upgrade they do not serve, an error no handler took,
    which Flask logs with its traceback), as the service answers: in JSON, a body left unread and
    its connection closed (functions-framework would read all of it first, whatever its size: no
    token, no MAX_UPLOAD_BYTES)."""
    if exc.code == 500:
        message = InternalError().message  # the service's own words for a bug
    else:
        message = f"no such path: {flask.request.path}" if exc.code == 404 else exc.description or exc.name
    exchange_of(flask.request.environ).error = message
    response = json_response({"error": message}, exc.code or 500)
    if has_body(flask.request.environ):
        _leave_body_unread(flask.request, response)
    return response


def _only_the_function() -> None:
    """What Flask would answer itself, without an error the handlers above see, is a 404 here,
    like any unknown path: its routing's redirects (in HTML, to the host the client names: an
    empty path, as in ``GET http://x HTTP/1.1``, goes to ``/``) and its ``/static/<file>`` route
    (OPTIONS got an empty 200, and functions-framework then read the whole body)."""
    rule = flask.request.url_rule
    if isinstance(flask.request.routing_exception, RequestRedirect) or (rule is not None and rule.endpoint == "static"):
        raise wz.NotFound()
