"""What bench_predict.py measures where a predict function runs: on this machine, or inside its
image, with the image's own Python and packages, as a pod runs it.

    python bench/replica.py cold --port PORT --request DIR [--runs N] [--imports "numpy, redis"] -- COMMAND...
    python bench/replica.py floor BUNDLE JPEG N

``cold``: ``DIR`` holds the request: ``path``, ``headers.json`` and ``body``. Each run times a
Python that only imports ``--imports`` and exits, started as shared.server starts (the
collector off, no OpenBLAS threads, redis-py's asyncio client deferred), then spawns ``COMMAND``
and times it to its first 200 for that request, then stops it. Prints ``{"cold": [seconds, ...],
"imports": [seconds, ...]}``.

``floor``: decode + preprocess + one model call of ``JPEG`` on ``BUNDLE``, in this process, ``N``
times after 30 unmeasured: prints the median in ms (what no server of that model goes below).

The standard library and the project's own modules only: the image holds ``shared/`` and
``functions/``, not ``local/``. The container runtime's own start is left out of a cold start
here (``bench_containers.py`` measures it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def connect(port: int) -> http.client.HTTPConnection:
    """A keep-alive connection that sends at once (TCP_NODELAY), as curl, urllib3, Go and wrk do:
    without it, the last segment of an upload waits for the server's delayed ACK (up to 40 ms)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def post(
    port: int, path: str, body: bytes, headers: dict[str, str], conn: http.client.HTTPConnection | None = None
) -> int:
    """POST ``body`` to ``path`` (on ``conn``, else a new connection); the answer's status."""
    conn = conn or connect(port)
    conn.request("POST", path, body=body, headers=headers)
    reply = conn.getresponse()
    reply.read()
    return reply.status


def spawn_until_ok(
    command: list[str], port: int, path: str, body: bytes, headers: dict[str, str], **popen: Any
) -> tuple[subprocess.Popen[bytes], float]:
    """Spawn ``command`` and post the request until it answers 200: (process, seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    while time.perf_counter() - started < 180:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {' '.join(command)}")
        try:
            if post(port, path, body, headers) == 200:
                return proc, time.perf_counter() - started
        except OSError:  # not listening yet
            time.sleep(0.002)
    proc.kill()
    raise TimeoutError(" ".join(command))


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is not gone within 20 s."""
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# How shared.server starts before it imports anything: the collector off, no OpenBLAS threads,
# redis-py's asyncio client deferred.
SERVER_START = (
    "import gc, os; gc.disable(); os.environ.setdefault('OPENBLAS_NUM_THREADS', '1'); "
    "from shared import lazymodules; lazymodules.defer('redis.asyncio'); "
)


def import_floor(imports: str) -> float:
    """Seconds for a Python to start as shared.server does, import ``imports`` and exit: what no
    cold start of a server built on them goes below."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"{SERVER_START}import {imports}"], check=True)
    return time.perf_counter() - started


def cold_starts(
    command: list[str],
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    runs: int,
    imports: str | None = None,
    **popen: Any,
) -> dict[str, list[float]]:
    """``runs`` cold starts of ``command`` (seconds), each after an import floor of ``imports``
    when given, alternated so that the machine's drift falls on both alike."""
    colds, floors = [], []
    for _ in range(runs):
        if imports:
            floors.append(import_floor(imports))
        proc, seconds = spawn_until_ok(command, port, path, body, headers, **popen)
        colds.append(seconds)
        stop(proc)
    return {"cold": colds, "imports": floors}


def measure_floor(bundle: Path, photo: bytes, n: int) -> float:
    """The floor of ``bundle`` for ``photo`` in this process, in ms: the median of ``n``."""
    from functions.predict.model import load_model, read_metadata  # noqa: PLC0415 (the project's, where this runs)
    from shared.config import Settings  # noqa: PLC0415

    name = read_metadata(bundle)["name"]
    decodes, calls = floor_loop(load_model(Settings(model_name=name, model_dir=bundle)), photo, n)
    return statistics.median(decode + call for decode, call in zip(decodes, calls, strict=True)) * 1000


def floor_loop(model: Any, photo: bytes, n: int, gap: float = 0.0) -> tuple[list[float], list[float]]:
    """Seconds of decoding ``photo`` and of one model call on it, ``n`` times after 30 unmeasured,
    with ``gap`` seconds of idle before each pair (the floor: none)."""
    from functions.predict import pipeline  # noqa: PLC0415
    from shared import imaging  # noqa: PLC0415

    upload, limits = [pipeline.Upload(photo)], imaging.Limits(40_000_000)
    decodes, calls = [], []
    for i in range(n + 30):
        if gap:
            time.sleep(gap)
        started = time.perf_counter()
        batch = pipeline.decode(model, upload, limits)
        decoded = time.perf_counter()
        pipeline.infer(model, batch)
        if i >= 30:
            decodes.append(decoded - started)
            calls.append(time.perf_counter() - decoded)
    return decodes, calls


def main() -> None:
    # No __doc__ here: the images run Python with PYTHONOPTIMIZE=2, which leaves docstrings out.
    parser = argparse.ArgumentParser(description="What bench_predict.py measures where a predict function runs.")
    commands = parser.add_subparsers(dest="what", required=True)
    cold = commands.add_parser("cold", help="cold starts of COMMAND, alternated with the import floor")
    cold.add_argument("--port", type=int, required=True, help="the port COMMAND listens on")
    cold.add_argument("--request", type=Path, required=True, help="folder with path, headers.json, body")
    cold.add_argument("--runs", type=int, default=5)
    cold.add_argument("--imports", help="modules for the import floor (comma-separated)")
    cold.add_argument("command", nargs=argparse.REMAINDER)
    floor = commands.add_parser("floor", help="decode + preprocess + one model call, in this process")
    floor.add_argument("bundle", type=Path)
    floor.add_argument("jpeg", type=Path)
    floor.add_argument("n", type=int)
    args = parser.parse_args()
    if args.what == "floor":
        print(measure_floor(args.bundle, args.jpeg.read_bytes(), args.n))
        return
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    path = (args.request / "path").read_text().strip()
    headers = json.loads((args.request / "headers.json").read_text())
    body = (args.request / "body").read_bytes()
    print(json.dumps(cold_starts(command, args.port, path, body, headers, args.runs, args.imports)))


if __name__ == "__main__":
    main()
