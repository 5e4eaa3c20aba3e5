"""Where a warm prediction's time goes inside a predict function, layer by layer, in-process.

    .venv/bin/python bench/bench_overhead.py [--requests 1000] [--gap-ms 4] [--photo drawing|detailed]

Loads the predict function for the reference network (``bench/reference_model.py``) in this
process as ``shared.server`` loads it (functions-framework's app, the access log, JSON logs, the
Prometheus folder, a throw-away redis-server for the token), and calls its WSGI app with the
bench's 640x480 JPEG (``--photo``, as in ``bench_predict.py``) as a multipart upload and a Bearer
token: no socket and no gunicorn, so what is left is the function's own code. Each layer is
timed without the layers it calls:

- WSGI: building the request's environ, reading the answer, closing it (the bench's own share);
- the access log and request metrics (``shared.access``);
- functions-framework and Flask (execution id, request context, their dispatch);
- the service: routing, reading the body, the handler's checks, the answer's headers;
- the bearer check (``AuthStore.authenticate``: the token cache) and usage counting;
- multipart parsing (Flask's form parser, with shared.multipart splitting the body);
- decoding and the model call (real, or stubbed with their answer computed once);
- the answer: ``pipeline.encode`` and its JSON.

Three columns: the model stubbed and requests back to back (the code in a tight loop), the model
stubbed with --gap-ms of idle before each request, and the real model. Then the floor's two
parts (decode, one model call) in a tight loop, as ``bench_predict.py`` measures the floor, and
with --gap-ms of idle before each, next to the same two inside the function. Medians of
--requests, after 100 unmeasured.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_predict
import reference_model
import replica

from local import ROOT
from local.helpers import RedisServer, free_port

WSGI = "WSGI (the bench's share)"
LAYERS = (
    WSGI,
    "access log + request metrics",
    "functions-framework + Flask",
    "service: routing, body, handler, headers",
    "bearer check (token cache)",
    "usage counting",
    "multipart parsing",
    "decode",
    "model call",
    "answer: encode + JSON",
)


class Layers:
    """Per-request time of each layer, without the wrapped layers it calls."""

    def __init__(self) -> None:
        self._stack: list[float] = []  # per open layer: time spent in the wrapped layers it called
        self.request: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            return self.time(label, original, *args, **kwargs)

        setattr(owner, name, timed)

    def time(self, label: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._stack.append(0.0)
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            self.request[label] += elapsed - self._stack.pop()
            if self._stack:
                self._stack[-1] += elapsed


def load_function(redis_url: str, bundle: Path, metrics_dir: str) -> Any:
    """The predict function's WSGI app, set up as ``shared.server`` sets it up (logs discarded)."""
    os.environ.update(
        REDIS_URL=redis_url, MODEL_NAME=bundle.name, MODEL_DIR=str(bundle), LOG_FORMAT="json",
        PROMETHEUS_MULTIPROC_DIR=metrics_dir,
    )  # fmt: skip
    import functions_framework  # noqa: PLC0415 (after PROMETHEUS_MULTIPROC_DIR)

    from shared import config, logs, server  # noqa: PLC0415

    server.compact_heap()
    settings = config.load()
    logs.setup("predict", settings.log_level, settings.log_format)
    logging.getLogger().handlers[0].setStream(open(os.devnull, "w"))  # noqa: SIM115 (lives as long as the bench)
    source = ROOT / "functions" / "predict" / "main.py"
    return functions_framework.create_app(target="handle", source=str(source))  # type: ignore[no-untyped-call]


def instrument(layers: Layers) -> None:
    """Time every layer of the list in the module's doc."""
    import flask  # noqa: PLC0415
    from functions_framework import execution_id  # noqa: PLC0415
    from werkzeug import formparser  # noqa: PLC0415

    import shared.http  # noqa: PLC0415
    from functions.predict import pipeline  # noqa: PLC0415
    from shared.access import AccessLog  # noqa: PLC0415
    from shared.auth import AuthStore  # noqa: PLC0415

    layers.wrap(AccessLog, "__call__", LAYERS[1])
    layers.wrap(AccessLog, "_done", LAYERS[1])
    layers.wrap(execution_id.WsgiMiddleware, "__call__", LAYERS[2])
    layers.wrap(flask.Flask, "full_dispatch_request", LAYERS[2])
    layers.wrap(shared.http.Service, "__call__", LAYERS[3])
    layers.wrap(AuthStore, "authenticate", LAYERS[4])
    layers.wrap(AuthStore, "record_request", LAYERS[5])
    layers.wrap(formparser.FormDataParser, "parse", LAYERS[6])
    layers.wrap(pipeline, "decode", LAYERS[7])
    layers.wrap(pipeline, "infer", LAYERS[8])
    layers.wrap(pipeline, "encode", LAYERS[9])
    layers.wrap(shared.http, "json_response", LAYERS[9])


def floor_parts(model: Any, photo: bytes, n: int, gap: float) -> tuple[float, float]:
    """Median µs of decoding ``photo`` and of one model call, in the floor's loop with ``gap`` s
    of idle before each pair."""
    decodes, calls = replica.floor_loop(model, photo, n, gap)
    return statistics.median(decodes) * 1e6, statistics.median(calls) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--gap-ms", type=float, default=4.0, help="idle before each request, second column")
    parser.add_argument("--photo", choices=sorted(bench_predict.PHOTOS), default="drawing", help="the JPEG sent")
    args = parser.parse_args()

    bundle, photo = reference_model.build(), bench_predict.sample_photo(args.photo)
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisServer(free_port(), Path(tmp) / "redis").start()
        try:
            from shared.auth import AuthStore  # noqa: PLC0415
            from shared.config import Settings  # noqa: PLC0415

            auth = AuthStore(Settings(redis_url=redis_server.url))
            pair = auth.create_key()
            bearer = auth.issue_token(pair.public_key, pair.secret_key, "bench").token
            app = load_function(redis_server.url, bundle, tempfile.mkdtemp(dir=tmp))
            report(app, bundle, photo, bearer, args)
        finally:
            redis_server.stop()


def report(app: Any, bundle: Path, photo: bytes, bearer: str, args: argparse.Namespace) -> None:
    """Measure the three columns and the floor, and print them."""
    from functions.predict import pipeline  # noqa: PLC0415
    from functions.predict.model import load_model  # noqa: PLC0415
    from shared import imaging  # noqa: PLC0415
    from shared.config import Settings  # noqa: PLC0415

    layers = Layers()
    body, content_type = bench_predict.multipart(photo)
    path = f"/models/{bundle.name}/predict.json"

    def request() -> None:
        environ = {
            "REQUEST_METHOD": "POST", "PATH_INFO": path, "SERVER_NAME": "localhost", "SERVER_PORT": "8080",
            "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "CONTENT_LENGTH": str(len(body)),
            "CONTENT_TYPE": content_type, "HTTP_AUTHORIZATION": f"Bearer {bearer}",
        }  # fmt: skip
        status: list[str] = []
        answer = app(environ, lambda line, headers, exc_info=None: status.append(line))
        b"".join(answer)
        answer.close()
        if not status[0].startswith("200"):
            raise SystemExit(f"the function answered {status[0]}")

    def column(n: int, gap: float) -> dict[str, float]:
        runs: dict[str, list[float]] = defaultdict(list)
        for i in range(n + 100):
            if gap:
                time.sleep(gap)
            layers.request.clear()
            layers.time(WSGI, request)
            if i >= 100:
                for label in LAYERS:
                    runs[label].append(layers.request.get(label, 0.0))
                runs["total"].append(sum(layers.request.values()))
        return {label: statistics.median(times) * 1e6 for label, times in runs.items()}

    model = load_model(Settings(model_name=bundle.name, model_dir=bundle))
    upload, limits = [pipeline.Upload(photo)], imaging.Limits(40_000_000)
    tight, idle = (floor_parts(model, photo, args.requests, gap) for gap in (0.0, args.gap_ms / 1000))
    instrument(layers)
    real = pipeline.decode, pipeline.infer
    batch = pipeline.decode(model, upload, limits)
    probabilities = pipeline.infer(model, batch)
    stubs = (lambda *args, **kwargs: batch), (lambda *args, **kwargs: probabilities)
    columns = []
    for (decode, infer), gap in ((stubs, 0.0), (stubs, args.gap_ms / 1000), (real, 0.0)):
        pipeline.decode, pipeline.infer = decode, infer
        columns.append(column(args.requests, gap))

    heads = ("stubbed, back to back", f"stubbed, {args.gap_ms:g} ms idle before", "real model")
    print(f"\nOne warm prediction (reference network, {bundle.name}, 640x480 JPEG), in-process, median µs per request")
    print(f"{'layer':42s}" + "".join(f"{head:>26s}" for head in heads))
    for label in (*LAYERS, "total"):
        print(f"{label:42s}" + "".join(f"{col[label]:26.0f}" for col in columns))
    measured = columns[2]
    print(f"\n{'decode + model call, µs':42s}{'decode':>12s}{'model call':>12s}{'both':>12s}")
    rows = [
        ("floor: in a tight loop", *tight),
        (f"floor: {args.gap_ms:g} ms idle before each", *idle),
        ("inside the function (real model)", measured["decode"], measured["model call"]),
    ]
    for label, decode, call in rows:
        print(f"{label:42s}{decode:12.0f}{call:12.0f}{decode + call:12.0f}")
    rest = measured["total"] - measured["decode"] - measured["model call"]
    print(f"the rest of the function (real model): {rest:.0f} µs")


if __name__ == "__main__":
    main()
