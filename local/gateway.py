"""The local gateway on :8000: routes paths to the functions as the cluster's ingress does.

Run by ``./start.sh`` as ``python -m local.gateway --port 8000 --token URL --model NAME=URL``.
It also serves ``/docs`` and ``/openapi.json`` over every function's OpenAPI document, and
``/healthz``/``/readyz``. Like an edge proxy it sets ``X-Forwarded-For`` to the address it saw
(a client's own value is dropped, never appended to), and it runs on the same deadline worker as
the functions, so slow clients cost only themselves here too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import select
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from local import routes
from shared import config, docs, logs
from shared.access import AccessLog, exchange_of
from shared.errors import BadGateway, BadRequest, InternalError, MethodNotAllowed, NotFound, ThalamusError, clipped
from shared.http import has_body
from shared.server import CLIENT_HEADER_FIELDS, Gunicorn, gunicorn_options

log = logging.getLogger("thalamus.gateway")
StartResponse = Callable[..., Any]
Environ = dict[str, Any]

# Not forwarded: hop-by-hop headers (RFC 9110 7.6.1) and the client's own forwarding claims.
DROPPED = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length", "x-forwarded-for", "forwarded", "x-real-ip",
    "x-request-id",  # the gateway's own (kept from the caller when sane) goes on, and comes back
    # Answered here (the client's 100 Continue is the gateway's): a function's own 100 would read
    # as its early answer, and the body stop, while the function waits for it.
    "expect",
}  # fmt: skip
# The address the gateway connects to the functions from: functions trust X-Forwarded-For from
# it alone (TRUSTED_PROXIES), so a local client that calls a function directly, from 127.0.0.1,
# cannot claim another address. Falls back to 127.0.0.1 where 127.0.0.2 is not configured.
SOURCE_ADDRESS = "127.0.0.2"


def hop_by_hop(connection: str) -> set[str]:
    """The headers a ``Connection`` header names: for this hop only, never forwarded (RFC 9110
    7.6.1), whichever side sent them."""
    return {name.strip().lower() for name in connection.split(",") if name.strip()}


def source_address() -> str:
    """SOURCE_ADDRESS when this machine can connect from it, else 127.0.0.1."""
    with socket.socket() as sock:
        try:
            sock.bind((SOURCE_ADDRESS, 0))
        except OSError:
            return "127.0.0.1"
    return SOURCE_ADDRESS


def _json(start_response: StartResponse, status: int, body: Any, headers: list[tuple[str, str]] | None = None,
          close: bool = False) -> list[bytes]:  # fmt: skip
    data = json.dumps(body).encode()
    extra = [*(headers or []), *([("Connection", "close")] if close else [])]
    reason = http.client.responses.get(status, "Error")
    start_response(
        f"{status} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *extra]
    )
    return [data]


class Gateway:
    """A WSGI app that proxies each request to the function serving its path."""

    def __init__(self, token_url: str, model_urls: dict[str, str], *, source: str = "127.0.0.1",
                 timeout: float = 60) -> None:  # fmt: skip
        self.token_url = token_url
        self.model_urls = dict(sorted(model_urls.items()))
        self.source = source
        self.timeout = timeout

    def _functions(self) -> dict[str, str]:
        return {"token": self.token_url, **self.model_urls}

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if ("Connection", "close") in headers:  # gunicorn ignores the header: tell it itself
                close_connection = getattr(environ.get("wsgi.input"), "close_connection", None)
                if close_connection is not None:  # shared.deadlines.GuardedBody
                    close_connection()
            return start_response(status, headers, exc_info)

        try:
            return self._route(environ, start)
        except ThalamusError as error:
            refused = error
        except Exception:
            log.exception("gateway error on %s", environ.get("PATH_INFO"))
            refused = InternalError()
        # Body errors (408, 400), a local 404 or a bug: the body may be partly unread, so close.
        exchange_of(environ).error = refused.detail
        return _json(start, refused.status, {"error": refused.message}, list(refused.headers.items()), True)

    def _route(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"  # an absolute-form target without a path (GET http://x) is /
        page = routes.wants_page(path, environ.get("HTTP_ACCEPT", ""))
        target = None if page else routes.upstream_for(path)
        exchange = exchange_of(environ)
        if target is None:
            exchange.route = (path if page or path in routes.GATEWAY_PATHS
                              else routes.DOCS_ASSETS + "<asset>" if path.startswith(routes.DOCS_ASSETS)
                              else routes.FUNCTION_DOCUMENT.format(function="<name>") if routes.document_of(path)
                              else "unmatched")  # fmt: skip
            return self._local(environ, start_response, path, page)
        kind, model = target
        exchange.route, exchange.model = f"→ {kind}", model
        if kind == "token":
            return self._proxy(environ, start_response, self.token_url)
        if model not in self.model_urls:
            known = ", ".join(self.model_urls) or "none"
            raise NotFound(f"no such model: {clipped(str(model), 64)} (served: {known})")
        return self._proxy(environ, start_response, self.model_urls[str(model)])

    def _local(self, environ: Environ, start_response: StartResponse, path: str, page: bool) -> Iterable[bytes]:
        close = has_body(environ)  # these never read a body: do not let gunicorn wait for one
        if environ["REQUEST_METHOD"] not in ("GET", "HEAD"):
            if (
                page
                or path in routes.GATEWAY_PATHS
                or path.removeprefix(routes.DOCS_ASSETS) in docs.ASSETS
                or self._openapi_of(path)
            ):
                raise MethodNotAllowed(["GET", "HEAD"])  # a path it serves, as a function answers
            raise NotFound(f"no such path: {path}")
        if path == "/healthz":
            return _json(start_response, 200, {"status": "ok"}, close=close)
        if path == "/readyz":
            states = {name: self._ready(url) for name, url in self._functions().items()}
            ready = all(states.values())
            return _json(start_response, 200 if ready else 503, {"functions": states},
                         [] if ready else [("Retry-After", "2")], close)  # fmt: skip
        if page:
            names = self._functions()
            answer = docs.page(routes.documents(list(names)))
            answer.headers["Vary"] = "Accept"  # the root answers a browser so, and others not
            return answer(environ, start_response)
        if path.startswith(routes.DOCS_ASSETS):
            return docs.asset(path.removeprefix(routes.DOCS_ASSETS))(environ, start_response)
        if path == "/openapi.json":
            return _json(start_response, 200, self._merged_openapi(), close=close)
        if base := self._openapi_of(path):
            return _json(start_response, 200, self._fetch_json(base, "/openapi.json"), close=close)
        raise NotFound(f"no such path: {path}")

    def _openapi_of(self, path: str) -> str | None:
        """The URL of the function whose OpenAPI document ``path`` is, if it is one's."""
        name = routes.document_of(path)
        return self._functions().get(name) if name else None

    def _ready(self, base: str) -> bool:
        try:
            conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=3, source_address=(self.source, 0))
            conn.request("GET", "/readyz")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def _fetch_json(self, base: str, path: str) -> Any:
        conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=10, source_address=(self.source, 0))
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            if reply.status != 200:
                raise OSError(reply.status)
            return json.loads(reply.read())
        except (OSError, ValueError):
            raise BadGateway(f"function at {base} is not answering") from None
        finally:
            conn.close()

    def _merged_openapi(self) -> dict[str, Any]:
        """One OpenAPI document for the whole gateway: every function's paths; a schema that two
        functions define differently is kept once per function, renamed ``<function>.<name>``."""
        documents = {name: self._fetch_json(url, "/openapi.json") for name, url in self._functions().items()}
        merged: dict[str, Any] = {
            **documents["token"],
            "paths": {},
            "components": {"schemas": {}, "securitySchemes": {}},
        }
        merged["info"] = {**merged["info"], "title": "Thalamus (every function behind the gateway)"}
        for name, doc in documents.items():
            schemas = doc.get("components", {}).get("schemas", {})
            clashes = {
                key for key, value in schemas.items() if merged["components"]["schemas"].get(key, value) != value
            }
            text = json.dumps(doc)
            for key in clashes:
                text = text.replace(f'"#/components/schemas/{key}"', f'"#/components/schemas/{name}.{key}"')
            renamed = json.loads(text)
            for key in schemas:
                merged["components"]["schemas"][f"{name}.{key}" if key in clashes else key] = renamed["components"][
                    "schemas"
                ][key]
            merged["components"]["securitySchemes"].update(renamed["components"].get("securitySchemes", {}))
            merged["paths"].update(renamed["paths"])
        return merged

    def _proxy(self, environ: Environ, start_response: StartResponse, base: str) -> Iterable[bytes]:
        dropped = DROPPED | hop_by_hop(environ.get("HTTP_CONNECTION", ""))
        headers = {key[5:].replace("_", "-").title(): value for key, value in environ.items()
                   if key.startswith("HTTP_") and key[5:].replace("_", "-").lower() not in dropped}  # fmt: skip
        headers["X-Forwarded-For"] = environ.get("REMOTE_ADDR", "")
        headers["X-Request-Id"] = environ["thalamus.request_id"]
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        length = environ.get("CONTENT_LENGTH")
        conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=self.timeout, source_address=(self.source, 0),
                                          blocksize=65536)  # fmt: skip
        body: Any = None
        if length:
            headers["Content-Length"] = length
            body = _Upload(conn, environ["wsgi.input"], int(length))
        elif has_body(environ):  # chunked
            body = iter(_Upload(conn, environ["wsgi.input"]).read, b"")
        try:
            conn.request(environ["REQUEST_METHOD"], _origin_form(environ), body=body, headers=headers,
                         encode_chunked=body is not None and not length)  # fmt: skip
        except ThalamusError:  # the client's body was late, short or malformed (raised reading it)
            conn.close()
            raise
        except _AnsweredEarly:
            pass  # the function answered (413, 401) before the body was all sent: relay that answer
        except OSError:
            if conn.sock is None:  # never connected: the function is not there
                raise BadGateway(f"function at {base} is not answering") from None
            # Connected, then cut off while sending: the function may have answered early and
            # closed. Read that answer.
        try:
            upstream = conn.getresponse()
        except (OSError, http.client.HTTPException):  # refused, reset, or nothing was sent
            conn.close()
            raise BadGateway(f"function at {base} is not answering") from None
        dropped = DROPPED | hop_by_hop(", ".join(upstream.headers.get_all("Connection") or []))
        reply = [(k, v) for k, v in upstream.getheaders() if k.lower() not in dropped]
        if length := upstream.getheader("Content-Length"):
            reply.append(("Content-Length", length))
        if upstream.getheader("Connection", "").lower() == "close":
            reply.append(("Connection", "close"))  # the function did not read the whole body
        start_response(f"{upstream.status} {upstream.reason}", reply)
        return self._stream(conn, upstream)

    @staticmethod
    def _stream(conn: http.client.HTTPConnection, upstream: http.client.HTTPResponse) -> Iterator[bytes]:
        try:
            while chunk := upstream.read(65536):
                yield chunk
        finally:
            conn.close()


def _origin_form(environ: Environ) -> str:
    """The request's target as the client sent it (not the decoded PATH_INFO: the function decodes
    it the same way), in origin form: an absolute-form target (``GET http://host/path``, RFC 9112
    3.2.2) loses its scheme and host, which http.client would otherwise send as the Host."""
    target = str(environ.get("RAW_URI") or environ.get("PATH_INFO", "/"))
    if target.startswith("/"):
        return target
    try:
        parts = urlsplit(target)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise BadRequest("malformed request target") from None
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


class _AnsweredEarly(Exception):
    """The function answered while its request's body was being sent."""


class _Upload:
    """The client's body as http.client sends it to the function: ``length`` bytes (None:
    chunked, to its end). One that ends early (the client went away) raises, so the function is
    cut off at once instead of left waiting for bytes that never come (gunicorn's reader returns
    what came, without a word). Before each block, a look at the function's socket: an answer
    there (a 401 or 413 given before the body is read) stops the sending, and the answer goes
    to the client at once instead of after the whole upload went to a function that drops it."""

    def __init__(self, conn: http.client.HTTPConnection, stream: Any, length: int | None = None) -> None:
        self.conn, self.stream, self.left = conn, stream, length

    def read(self, size: int = 65536) -> bytes:
        if self.left == 0:
            return b""
        if self.conn.sock is not None:  # poll, not select: a descriptor past 1,023 is fine
            looking = select.poll()
            looking.register(self.conn.sock, select.POLLIN)
            if looking.poll(0):
                raise _AnsweredEarly()
        chunk = self.stream.read(min(size if size > 0 else 65536, self.left or 65536))
        if self.left is not None:
            if not chunk:
                raise BadRequest("request body ended early")
            self.left -= len(chunk)
        return bytes(chunk)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local.gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", required=True, help="base URL of the token function")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=URL")
    parser.add_argument("--source", default="127.0.0.1", help="address to connect to the functions from")
    args = parser.parse_args(argv)
    settings = config.load()
    logs.setup("gateway", settings.log_level, settings.log_format)
    gateway = Gateway(args.token, dict(spec.split("=", 1) for spec in args.model), source=args.source)
    app = AccessLog(gateway, "gateway", settings.trusted_proxies)
    # Many more threads than a function: a proxy thread mostly waits on a function.
    options = gunicorn_options(settings, args.host, args.port, threads=64, header_fields=CLIENT_HEADER_FIELDS)
    Gunicorn(app, options).serve()


if __name__ == "__main__":
    main()
