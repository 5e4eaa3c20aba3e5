"""Serve a function: functions-framework's app for its ``main.py``, on gunicorn, configured here.

    python -m shared.server functions/predict/main.py [--host 0.0.0.0] [--port 8080]

This is what the images run and what ``./start.sh`` starts. It is functions-framework's own
``create_app`` (the same app ``functions-framework --target handle --source …`` serves), with
the server settings in one place instead of the framework's fixed ones, and one line on stderr
instead of a traceback when the function cannot start (no ``MODEL_NAME``, a broken bundle).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import functions_framework
import gunicorn.app.base
import gunicorn.glogging

from shared import config, logs
from shared.config import Settings
from shared.errors import StartupError
from shared.worker import DeadlineWorker

log = logging.getLogger("thalamus.server")


class GunicornLogger(gunicorn.glogging.Logger):  # type: ignore[misc]  # gunicorn has no types
    """gunicorn's messages go through the process's logging setup (shared.logs); its own access
    log stays off, as shared.access logs every request."""

    def setup(self, cfg: Any) -> None:
        self.error_log.setLevel(cfg.loglevel.upper())
        self.error_log.propagate = True
        self.access_log.disabled = True

    def access(self, *args: Any, **kwargs: Any) -> None:
        pass


class Gunicorn(gunicorn.app.base.BaseApplication):  # type: ignore[misc]  # gunicorn has no types
    """gunicorn serving one WSGI ``app`` with ``options`` (see :func:`gunicorn_options`)."""

    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self._app, self._options = app, options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._app


def gunicorn_options(settings: Settings, host: str, port: int, threads: int | None = None) -> dict[str, Any]:
    """gunicorn's settings for a server: ``WORKERS`` processes × ``THREADS`` threads on
    :class:`~shared.worker.DeadlineWorker`, with the request deadlines and size limits."""
    worker = type(
        "Worker",
        (DeadlineWorker,),
        {"header_timeout": float(settings.header_timeout), "body_timeout": float(settings.body_timeout)},
    )
    return {
        "bind": f"{host}:{port}",
        "workers": settings.workers,
        "threads": threads or settings.threads,
        "worker_class": worker,
        # The worker's main loop never blocks (requests run in its threads), so a worker silent
        # this long is stuck and gets replaced; requests themselves are bounded by Knative.
        "timeout": 30,
        "graceful_timeout": 10,  # SIGTERM: in-flight requests get this long to finish
        "keepalive": 5,
        # functions-framework sets no limit on the request line: a client could have an 8 MB
        # path echoed back. These answer 414 and 431 (JSON, from the worker).
        "limit_request_line": 8190,
        "limit_request_fields": 100,
        "limit_request_field_size": 8190,
        "loglevel": "warning",
        "logger_class": GunicornLogger,
        # gunicorn 27's control socket lives under $HOME: nothing uses it, and a read-only root
        # filesystem (the restricted pod profile) has nowhere to put it.
        "control_socket_disable": True,
    }


def main(argv: list[str] | None = None) -> int:
    """Load the function at ``source`` and serve it until SIGTERM; 1 if it cannot start."""
    parser = argparse.ArgumentParser(prog="python -m shared.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the function's main.py")
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 (a container listens on all addresses)
    parser.add_argument("--port", type=int, help="default: $PORT, else 8080")
    args = parser.parse_args(argv)
    function = args.source.resolve().parent.name
    # Each worker writes its Prometheus samples to this folder and /metrics adds them up. It must
    # be set before prometheus_client is imported (by the function, below); one per server.
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="thalamus-metrics-")
    try:
        settings = config.load()
        logs.setup(function, settings.log_level, settings.log_format)
        app = functions_framework.create_app(target="handle", source=str(args.source))  # type: ignore[no-untyped-call]
    except StartupError as exc:
        print(f"{function}: {exc}", file=sys.stderr)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        return 1
    options = gunicorn_options(settings, args.host, args.port or settings.port)
    logs.event(log, f"{function} serving on {options['bind']}", event="start", settings=settings.summary())
    Gunicorn(app, {**options, **_hooks(function, metrics_dir)}).run()
    return 0


def _hooks(function: str, metrics_dir: str) -> dict[str, Any]:
    """gunicorn server hooks: a worker start counted (a cold start is one), a dead worker's live
    samples dropped, the shutdown logged and the metrics folder removed."""
    from shared import metrics  # after PROMETHEUS_MULTIPROC_DIR is set

    def post_worker_init(worker: Any) -> None:
        metrics.STARTS.labels(function).inc()

    def child_exit(server: Any, worker: Any) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

    def on_exit(server: Any) -> None:
        logs.event(log, f"{function} stopped", event="stop")
        shutil.rmtree(metrics_dir, ignore_errors=True)

    return {"post_worker_init": post_worker_init, "child_exit": child_exit, "on_exit": on_exit}


if __name__ == "__main__":
    sys.exit(main())
