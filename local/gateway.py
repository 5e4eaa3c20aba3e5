"""The local gateway on :8000: routes paths to the functions as the cluster's ingress does.

Run by ``./start.sh`` as ``python -m local.gateway --port 8000 --token URL --model NAME=URL``.
It also serves ``/docs`` over every function's OpenAPI document, and ``/healthz``/``/readyz``.
"""

from __future__ import annotations

import argparse
import http.client
import json
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from local import routes
from shared import docs

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def _json(start_response, status: str, body: Any, headers: list | None = None) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *(headers or [])])
    return [data]


class Gateway:
    """A WSGI app that proxies each request to the function serving its path."""

    def __init__(self, token_url: str, model_urls: dict[str, str], timeout: float = 60) -> None:
        self.token_url = token_url
        self.model_urls = dict(sorted(model_urls.items()))
        self.timeout = timeout

    def _specs(self) -> dict[str, str]:
        return {"token": self.token_url, **self.model_urls}

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        target = routes.upstream_for(path)
        if target is None:
            return self._local(environ, start_response, path)
        kind, model = target
        if kind == "token":
            return self._proxy(environ, start_response, self.token_url, path)
        if model not in self.model_urls:
            known = ", ".join(self.model_urls) or "none"
            return _json(start_response, "404 Not Found", {"error": f"no such model: {model} (served: {known})"})
        return self._proxy(environ, start_response, self.model_urls[model], path)

    def _local(self, environ: dict, start_response, path: str) -> Iterable[bytes]:
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "ok"})
        if path == "/readyz":
            states = {name: self._ready(url) for name, url in self._specs().items()}
            status = "200 OK" if all(states.values()) else "503 Service Unavailable"
            return _json(
                start_response, status, {"functions": states}, [] if all(states.values()) else [("Retry-After", "2")]
            )
        if path in ("/", "/docs"):
            return self._flask(
                environ, start_response, lambda: docs.page([f"/openapi/{name}.json" for name in self._specs()])
            )
        if path.startswith("/docs/"):
            return self._flask(environ, start_response, lambda: docs.asset(path.removeprefix("/docs/")))
        if path.startswith("/openapi/") and path.endswith(".json"):
            name = path.removeprefix("/openapi/").removesuffix(".json")
            if name in self._specs():
                return self._proxy(environ, start_response, self._specs()[name], "/openapi.json")
        return _json(start_response, "404 Not Found", {"error": f"no such path: {path}"})

    @staticmethod
    def _flask(environ: dict, start_response, make) -> Iterable[bytes]:
        from shared.errors import ThalamusError

        try:
            response = make()
        except ThalamusError as error:  # only NotFound: an unknown docs file
            return _json(start_response, "404 Not Found", {"error": error.message})
        return response(environ, start_response)

    def _ready(self, base: str) -> bool:
        try:
            conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=3)
            conn.request("GET", "/readyz")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def _proxy(self, environ: dict, start_response, base: str, path: str) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING")
        url = path + (f"?{query}" if query else "")
        headers = {
            key[5:].replace("_", "-").title(): value
            for key, value in environ.items()
            if key.startswith("HTTP_") and key[5:].replace("_", "-").lower() not in HOP_BY_HOP
        }
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        peer = environ.get("REMOTE_ADDR", "")
        headers["X-Forwarded-For"] = f"{forwarded}, {peer}" if forwarded else peer
        length = environ.get("CONTENT_LENGTH")
        body: Any = None
        if length:
            headers["Content-Length"] = length
            body = environ["wsgi.input"]
        elif environ.get("wsgi.input_terminated"):
            body = iter(lambda: environ["wsgi.input"].read(65536), b"")
        conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=self.timeout)
        try:
            conn.request(
                environ["REQUEST_METHOD"],
                url,
                body=body,
                headers=headers,
                encode_chunked=body is not None and not length,
            )
            upstream = conn.getresponse()
        except OSError:
            conn.close()
            return _json(
                start_response,
                "502 Bad Gateway",
                {"error": f"function at {base} is not answering"},
                [("Retry-After", "2")],
            )
        reply_headers = [(k, v) for k, v in upstream.getheaders() if k.lower() not in HOP_BY_HOP]
        if length := upstream.getheader("Content-Length"):
            reply_headers.append(("Content-Length", length))
        start_response(f"{upstream.status} {upstream.reason}", reply_headers)
        return self._stream(conn, upstream)

    @staticmethod
    def _stream(conn: http.client.HTTPConnection, upstream: http.client.HTTPResponse) -> Iterator[bytes]:
        try:
            while chunk := upstream.read(65536):
                yield chunk
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> None:
    import gunicorn.app.base

    parser = argparse.ArgumentParser(prog="python -m local.gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", required=True, help="base URL of the token function")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=URL")
    args = parser.parse_args(argv)
    app = Gateway(args.token, dict(spec.split("=", 1) for spec in args.model))

    class Server(gunicorn.app.base.BaseApplication):
        def load_config(self) -> None:
            for key, value in {
                "bind": f"{args.host}:{args.port}",
                "workers": 1,
                "threads": 16,
                "worker_class": "gthread",
                "loglevel": "error",
                "timeout": 0,
            }.items():
                self.cfg.set(key, value)

        def load(self):
            return app

    Server().run()


if __name__ == "__main__":
    main()
