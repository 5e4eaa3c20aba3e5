"""Serve a function: functions-framework's app for its ``main.py``, on gunicorn, configured here.

    python -m shared.server functions/predict/main.py [--host 0.0.0.0] [--port 8080]

This is what the images run and what ``./start.sh`` starts. It is functions-framework's own
``create_app`` (the same app ``functions-framework --target handle --source …`` serves), with
the server settings in one place instead of the framework's fixed ones, and one line on stderr
instead of a traceback when the function cannot start (no ``MODEL_NAME``, a broken bundle).

With ``WORKERS=1`` (every manifest's setting: Knative scales out by replicas, not processes) the
gunicorn worker runs in this very process, without gunicorn's master: a forked worker would
hold a second copy of every page it writes to (the model's arenas, the heap under Python's
reference counts), and a master only restarts a dead worker, which Kubernetes does for the
container. ``WORKERS`` > 1 runs gunicorn's master and forked workers.
"""

from __future__ import annotations

import gc
import os

if __name__ == "__main__":
    # Start-up makes ~60,000 objects that live as long as the process (modules, the model, the
    # app): the cyclic collector would walk them over and over while they are made (measured:
    # 6 % of the import time). main() freezes them once loaded, then turns it back on.
    gc.disable()
    # NumPy's OpenBLAS starts a thread for every CPU of the node but one at import (the node's,
    # not the pod's quota), and each spins for a while: 90 ms of CPU per start on 2 CPUs, taken
    # from the quota a cold start runs on. No function calls BLAS (the model runs on LiteRT).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # redis-py's asyncio client, which `import redis` runs and no function uses (shared.lazymodules).
    from shared import lazymodules

    lazymodules.defer("redis.asyncio")

import argparse
import fcntl
import logging
import resource
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import functions_framework
import gunicorn.app.base
import gunicorn.glogging
import gunicorn.sock

from shared import cgroup, config, libc, logs
from shared.config import Settings
from shared.errors import StartupError
from shared.worker import DeadlineWorker

log = logging.getLogger("thalamus.server")
PORT = 8080  # without $PORT or --port: Knative's (and functions-framework's) default


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

    def serve(self) -> None:
        """Serve until SIGTERM (graceful) or SIGINT/SIGQUIT: one worker runs in this process
        (see the module's docstring), more are forked by gunicorn's master."""
        if self.cfg.workers > 1:
            self.run()
            return
        # What gunicorn's master does for a worker after forking: same class, settings, hooks.
        # The worker also stops when this process's parent changes (the stack that started it died).
        cfg = self.cfg
        logger = cfg.logger_class(cfg)
        sockets = gunicorn.sock.create_sockets(cfg, logger)
        worker = cfg.worker_class(1, os.getppid(), sockets, self, cfg.timeout / 2.0, cfg, logger)
        worker.pid = os.getpid()
        try:
            worker.init_process()  # serves until told to stop
        finally:
            worker.tmp.close()
            cfg.on_exit(self)


# Header fields a request may carry: a client's 100 (Envoy's default, and the local gateway's),
# and room for those the proxies in front of a function add (an ingress, Knative's queue-proxy,
# the local gateway: X-Forwarded-For, X-Request-Id, tracing), which must not turn it into a 431.
CLIENT_HEADER_FIELDS = 100
FUNCTION_HEADER_FIELDS = CLIENT_HEADER_FIELDS + 28


def gunicorn_options(
    settings: Settings,
    host: str,
    port: int,
    threads: int | None = None,
    function: str = "",
    header_fields: int = FUNCTION_HEADER_FIELDS,
) -> dict[str, Any]:
    """gunicorn's settings for a server: ``WORKERS`` processes × ``THREADS`` threads on
    :class:`~shared.worker.DeadlineWorker`, with the request deadlines and size limits (at most
    ``header_fields`` header fields); the worker counts its own refusals in ``function``'s
    request metrics (none: not counted)."""
    deadlines = {"header_timeout": float(settings.header_timeout), "body_timeout": float(settings.body_timeout)}
    worker = type("Worker", (DeadlineWorker,), {**deadlines, "function": function})
    return {
        "bind": f"{host}:{port}",
        "workers": settings.workers,
        "threads": threads or serving_threads(settings),
        "worker_class": worker,
        # The worker's main loop never blocks (requests run in its threads), so a worker silent
        # this long is stuck and gets replaced; requests themselves are bounded by Knative.
        "timeout": 30,
        "graceful_timeout": 10,  # SIGTERM: in-flight requests get this long to finish
        "keepalive": 5,
        # functions-framework sets no limit on the request line: a client could have an 8 MB
        # path echoed back. These answer 414 and 431 (JSON, from the worker).
        "limit_request_line": 8190,
        "limit_request_fields": header_fields,
        "limit_request_field_size": 8190,
        "loglevel": "warning",
        "logger_class": GunicornLogger,
        # gunicorn 27's control socket lives under $HOME: nothing uses it, and a read-only root
        # filesystem (the restricted pod profile) has nowhere to put it.
        "control_socket_disable": True,
    }


def serving_threads(settings: Settings) -> int:
    """``THREADS``, else one per CPU the process may use, and at least 2 (one can read or send
    while another computes). Every thread beyond the CPUs only queues for the GIL: on 2 CPUs, 2
    threads served the reference network 17 % faster than 4, with a 39 % lower p99."""
    return settings.threads or max(2, cgroup.usable_cpus())


def compact_heap() -> None:
    """Tune glibc's malloc (elsewhere nothing) so that a burst of large requests does not leave
    the process at its peak size; must run before any thread starts.

    - One heap for every thread (M_ARENA_MAX = 1): by default each thread gets an arena of its
      own, and what it once held for a large image partly stays there even after malloc_trim
      (measured: 4 threads decoding a 40 Mpx CMYK JPEG kept 18 MiB each; with one heap, none).
      Threads here mostly wait on the GIL, the network or a model call: one heap costs little.
    - Blocks of 4 MiB and more always mapped on their own (M_MMAP_THRESHOLD; glibc otherwise
      raises this threshold as large blocks are freed), so a large body or image goes back to
      the system when freed instead of growing the heap under smaller live blocks (measured:
      +11 MiB resting after a burst of worst-case images; with it, +1). A normal request never
      allocates a block that large.
    - Up to 8 MiB free at the top of the heap kept (M_TRIM_THRESHOLD): setting the mmap threshold
      pins glibc's trim threshold at 128 KiB, so every request gave its image and tensor pages
      back and faulted them in again (measured: 252 page faults and 0.7 ms of system CPU per
      request on the reference network; with it, none). Large decodes still trim explicitly."""
    if libc.mallopt is not None:
        libc.mallopt(-8, 1)  # M_ARENA_MAX
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 8 << 20)  # M_TRIM_THRESHOLD


METRICS_PREFIX = "thalamus-metrics-"
METRICS_LOCK = "server.lock"


def claim_metrics_folder() -> str:
    """A new metrics folder for this server, locked (``flock``) for as long as the process lives:
    the kernel lets go of the lock however the process ends, so a folder whose lock can be taken
    is an orphan, whatever its name. Forked workers hold the same lock. It is made and locked
    under a hidden name, then renamed: a server starting meanwhile never sees it unlocked."""
    hidden = tempfile.mkdtemp(prefix=f".{METRICS_PREFIX}{os.getpid()}-")
    lock = os.open(os.path.join(hidden, METRICS_LOCK), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # never released or closed: the process's end does both
    folder = os.path.join(os.path.dirname(hidden), os.path.basename(hidden)[1:])
    os.rename(hidden, folder)
    return folder


def remove_orphaned_metrics() -> None:
    """Remove the metrics folders of servers that died without cleaning up (``kill -9``, the OOM
    killer, a port already taken). A server removes its own when it stops. A pod's ``/tmp`` is
    an emptyDir that outlives its container's restarts, and there the server is process 1 each
    time: a process id cannot tell an orphan from a live server, so the folder's lock does."""
    for folder in Path(tempfile.gettempdir()).glob(f"{METRICS_PREFIX}*-*"):
        try:
            if folder.stat().st_uid != os.getuid():
                continue  # another user's
            lock = os.open(folder / METRICS_LOCK, os.O_RDWR)
        except FileNotFoundError:
            if _unlocked_and_dead(folder):
                shutil.rmtree(folder, ignore_errors=True)
            continue
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its server lives
        finally:
            os.close(lock)  # also lets go of a lock taken: the folder goes next
        shutil.rmtree(folder, ignore_errors=True)


def _unlocked_and_dead(folder: Path) -> bool:
    """A folder without a lock, made by a server from before the lock: an orphan when no process
    has its name's id any more (as those servers were told apart)."""
    pid = folder.name.removeprefix(METRICS_PREFIX).split("-", 1)[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # someone else's process
    return False


def allow_open_files() -> None:
    """Raise the soft limit on open files to the hard one (at most 65,536): gunicorn keeps up to
    1,000 connections a worker, and many systems start a process at 1,024 files in all."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main(argv: list[str] | None = None) -> int:
    """Load the function at ``source`` and serve it until SIGTERM; 1 if it cannot start."""
    # Not __doc__: the images run with PYTHONOPTIMIZE=2, which leaves docstrings out.
    parser = argparse.ArgumentParser(prog="python -m shared.server", description="Serve a function on gunicorn.")
    parser.add_argument("source", type=Path, help="the function's main.py")
    parser.add_argument("--host", default="0.0.0.0")  # noqa: S104 (a container listens on all addresses)
    parser.add_argument("--port", type=int, help=f"default: $PORT, else {PORT}")
    args = parser.parse_args(argv)
    function = args.source.resolve().parent.name
    # Each worker writes its Prometheus samples to this folder and /metrics adds them up. It must
    # be set before prometheus_client is imported (by the function, below); one per server.
    compact_heap()
    allow_open_files()
    remove_orphaned_metrics()
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = claim_metrics_folder()
    try:
        settings = config.load()
        # A predict function's text lines name its model (an exported MODEL_NAME is not the token's).
        model = settings.model_name if function == "predict" else ""
        logs.setup(function, settings.log_level, settings.log_format, model)
        app = functions_framework.create_app(target="handle", source=str(args.source))  # type: ignore[no-untyped-call]
    except StartupError as exc:
        print(f"{function}: {exc}", file=sys.stderr)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        return 1
    # What start-up made stays: out of every later collection (which would otherwise walk it
    # each time, and write to its pages in forked workers). The few hundred unreachable objects
    # imports leave (measured: 545) stay with it.
    gc.freeze()
    gc.enable()
    # The start-up line shows the port really served, and the threads.
    port = args.port or settings.port or PORT
    if reason := port_taken(args.host, port):
        print(f"{function}: cannot listen on {args.host}:{port}: {reason}", file=sys.stderr)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        return 1
    settings = settings.replace(port=port, threads=serving_threads(settings))
    options = gunicorn_options(settings, args.host, port, function=function)
    logs.event(log, f"{function} serving on {options['bind']}", event="start", settings=settings.summary())
    Gunicorn(app, {**options, **_hooks(function, metrics_dir)}).serve()
    return 0


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, an address not this machine's), or None.
    Asked before gunicorn binds, which would retry for 5 s and log ten lines before it exits."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


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
