"""Figures of one predict function (one replica), next to the monolith it replaces and KServe.

    .venv/bin/python bench/bench_predict.py [--models shapes,arrows,reference] [--seconds 30]
                                            [--runs 5] [--requests 300] [--no-baseline] [--no-kserve]
                                            [--cpus N]

For each model (``reference`` is a network the size of the original Thalamus classifier:
180x180x3, three conv blocks, dense 128, 5 classes, imported with ``train.py --import``), with a
640x480 JPEG:

- floor: in-process decode + preprocess + one model call (what no server can go below), measured
  again next to each server, as the machine's speed drifts;
- cold start: spawn of the server to the first authenticated 200, median of --runs; for
  Thalamus also the import floor: a Python that only imports the function's third-party
  packages (functions-framework, Flask, redis-py, NumPy, LiteRT, Pillow, prometheus-client,
  gunicorn, python-json-logger: STACK_IMPORTS) and exits, with the collector off as the server
  starts, runs alternated with them;
- warm p50/p99 on one keep-alive connection (a lean client: body encoded once), and the same
  function without its access log and request metrics (``bench/unobserved_function.py``);
- under load, ``wrk`` with 8 connections for --seconds: requests/s, p50/p99, errors, the
  servers' CPU per request, and afterwards their PSS and RSS (all of a server's processes: with
  one process, RSS is everything it holds; PSS splits the pages it shares, its libraries' code
  mostly, with other processes on the machine); throughput is also shown against the machine's
  compute limit (cores x 1000 / floor ms; with --cpus N, every server runs in a cgroup with a
  quota of N CPUs, as a pod's ``limits.cpu`` sets, and the limit is N x 1000 / floor ms);
- the same for the monolith (FastAPI + Keras ``model.predict``, TensorFlow: bench/baseline_app.py)
  and for KServe's Python server running the same ``.tflite`` on LiteRT (bench/kserve_app.py,
  V1 JSON with a base64 image, no token).

Installs nothing into the project venv: ``pip install -r requirements-bench.txt`` once (FastAPI
for the monolith), ``wrk`` from Debian; KServe gets its own venv on first use (bench/kserve_env.py).
"""

from __future__ import annotations

import argparse
import base64
import compileall
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from local import ROOT
from local.helpers import RedisServer, cpu_cgroup, free_port, in_cgroup, percentile_ms, remove_cgroup
from shared.auth import AuthStore
from shared.config import Settings

BIN = Path(sys.executable).parent
WRK_SCRIPT = """
wrk.method = "POST"
local f = io.open("{body}", "rb"); wrk.body = f:read("*all"); f:close()
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d %d %.3f %.3f %.3f\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, 0, 0,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.mean / 1000))
end
"""


@dataclass
class Target:
    """A server to measure and the request that exercises it."""

    name: str
    command: list[str]
    env: dict[str, str]
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    cgroup: Path | None = None  # run inside this cgroup (--cpus: a CPU quota, as a pod's limits.cpu)


def multipart(photo: bytes) -> tuple[bytes, str]:
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    return head + photo + b"\r\n--b--\r\n", "multipart/form-data; boundary=b"


def connect(port: int) -> http.client.HTTPConnection:
    """A keep-alive connection that sends at once (TCP_NODELAY), as curl, urllib3, Go and wrk do:
    without it, the last segment of an upload waits for the server's delayed ACK (up to 40 ms)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.connect()
    assert conn.sock is not None
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def post(port: int, target: Target, conn: http.client.HTTPConnection | None = None) -> int:
    conn = conn or connect(port)
    conn.request("POST", target.path, body=target.body, headers=target.headers)
    reply = conn.getresponse()
    reply.read()
    return reply.status


def start(target: Target) -> tuple[subprocess.Popen[bytes], int, float]:
    """Spawn ``target`` and poll until it answers its request with 200: (process, port, seconds)."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in target.command]
    if target.cgroup is not None:
        command = in_cgroup(target.cgroup, command)
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=target.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.perf_counter() - started < 180:
        if proc.poll() is not None:
            raise RuntimeError(f"{target.name} exited with {proc.returncode}: {' '.join(command)}")
        try:
            if post(port, target) == 200:
                return proc, port, time.perf_counter() - started
        except OSError:
            time.sleep(0.002)
    proc.kill()
    raise TimeoutError(target.name)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(current := todo.pop())
        todo += parents.get(current, [])
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            continue
    return total


def memory_mb(pids: list[int], field: str) -> float:
    """``field`` (``Pss`` or ``Rss``) of ``pids`` added up, in MB."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            total += next(int(line.split()[1]) for line in lines if line.startswith(f"{field}:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def warm(port: int, target: Target, n: int) -> tuple[float, float]:
    conn = connect(port)
    times = []
    for i in range(n + 30):
        started = time.perf_counter()
        assert post(port, target, conn) == 200
        if i >= 30:
            times.append(time.perf_counter() - started)
    conn.close()
    return percentile_ms(times, 0.5), percentile_ms(times, 0.99)


def load(port: int, proc: subprocess.Popen[bytes], target: Target, seconds: int, connections: int) -> dict[str, float]:
    """wrk against ``target``: requests/s, latency, errors, CPU per request, PSS afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(target.body)
        headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in target.headers.items())
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT.format(body=body, headers=headers))
        pids = tree(proc.pid)
        cpu_before = cpu_seconds(pids)
        out = subprocess.run(
            [
                "wrk",
                "-t",
                "2",
                "-c",
                str(connections),
                "-d",
                f"{seconds}s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}{target.path}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        cpu = cpu_seconds(tree(proc.pid)) - cpu_before
    numbers = next(line for line in out.stdout.splitlines() if line.startswith("WRK ")).split()[1:]
    done, micros, broken, bad_status = int(numbers[0]), int(numbers[1]), int(numbers[2]), int(numbers[3])
    return {
        "rps": done / (micros / 1e6),
        "load_p50": float(numbers[6]),
        "load_p99": float(numbers[7]),
        "errors": broken + bad_status,
        "cpu_ms": cpu / max(done, 1) * 1000,
        "pss": memory_mb(tree(proc.pid), "Pss"),
        "rss": memory_mb(tree(proc.pid), "Rss"),
    }


def observability_cost(target: Target, n: int, rounds: int = 5) -> tuple[float, float]:
    """Warm p50 of ``target`` and of the same function without its access log and request
    metrics (bench/unobserved_function.py), both running, their requests interleaved so that
    the machine's noise falls on each alike; medians over ``rounds``."""
    bare = replace(target, command=[*target.command[:3], "bench/unobserved_function.py", *target.command[4:]])
    (with_proc, with_port, _), (bare_proc, bare_port, _) = start(target), start(bare)
    try:
        observed, unobserved = [], []
        for _ in range(rounds):
            conns, times = (connect(with_port), connect(bare_port)), ([], [])
            for i in range(n + 30):
                for which in (i % 2, 1 - i % 2):  # neither always first: the second runs on warmer caches
                    started = time.perf_counter()
                    assert post(0, target, conns[which]) == 200
                    if i >= 30:
                        times[which].append(time.perf_counter() - started)
            observed.append(percentile_ms(times[0], 0.5))
            unobserved.append(percentile_ms(times[1], 0.5))
        return statistics.median(observed), statistics.median(unobserved)
    finally:
        stop(with_proc)
        stop(bare_proc)


# What a predict function imports from other projects, all of it needed by its first request.
STACK_IMPORTS = (
    "functions_framework, flask, redis, numpy, ai_edge_litert.interpreter, PIL.Image, prometheus_client, "
    "gunicorn.workers.gthread, pythonjsonlogger.json"
)


def import_floor() -> float:
    """Seconds for a Python to start, import STACK_IMPORTS (collector off, as shared.server
    starts) and exit: what no cold start of this stack goes below."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import gc; gc.disable(); import {STACK_IMPORTS}"], check=True, cwd=ROOT)
    return time.perf_counter() - started


def floor_ms(bundle: Path, photo: bytes, n: int) -> float:
    """In-process decode + preprocess + one model call for ``photo``: what no server goes below.
    Measured in a child process, so that this one never maps NumPy, Pillow or LiteRT: pages it
    shared with the servers would lower their PSS."""
    with tempfile.NamedTemporaryFile(suffix=".jpg") as file:
        file.write(photo)
        file.flush()
        command = [sys.executable, __file__, "--floor-of", str(bundle), file.name, str(n)]
        return float(subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout)


def measure_floor(bundle: Path, photo: bytes, n: int) -> float:
    """The floor, in this process (``--floor-of``)."""
    from functions.predict.model import load_model  # noqa: PLC0415 (only in the child process)

    decodes, calls = floor_loop(load_model(Settings(model_name=bundle.name, model_dir=bundle)), photo, n)
    return percentile_ms([decode + call for decode, call in zip(decodes, calls, strict=True)], 0.5)


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


def sample_photo() -> bytes:
    """The 640x480 JPEG every server gets (made in a child process, as the floor is)."""
    script = "import sys; from local.helpers import photo_jpeg; sys.stdout.buffer.write(photo_jpeg('shapes'))"
    return subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=ROOT).stdout


def targets(
    model: str, bundle: Path, photo: bytes, env: dict[str, str], bearer: str, args: argparse.Namespace, tmp: Path
) -> list[Target]:
    body, content_type = multipart(photo)
    function = {**env, "MODEL_NAME": model, "MODEL_DIR": str(bundle), "WORKERS": "1"}
    thalamus_headers = {"Content-Type": content_type, "Authorization": f"Bearer {bearer}"}
    path = f"/models/{model}/predict.json"
    server = [sys.executable, "-m", "shared.server"]
    found = [
        Target(
            "thalamus",
            [*server, "functions/predict/main.py", "--host", "127.0.0.1", "--port", "{port}"],
            function,
            path,
            body,
            thalamus_headers,
        ),
    ]
    if not args.no_baseline:
        meta = json.loads((bundle / "model.json").read_text())
        spec = meta["input"]
        keras = tmp / f"{model}.keras"
        if model == "flowers":  # the reference network itself
            import reference_model  # noqa: PLC0415 (bench/ sibling)

            keras = reference_model.keras_model()
        if not keras.exists():  # the bundle's own architecture, untrained (speed does not depend on weights)
            build = f"train.build_model(tf, {spec!r}, {len(meta['labels'])}).save({str(keras)!r})"
            script = f"import tensorflow as tf, train; {build}"
            subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=ROOT)
        size = f"{spec['height']}x{spec['width']}x{spec['channels']}"
        found.append(
            Target(
                "monolith (FastAPI + Keras, TensorFlow)",
                [str(BIN / "uvicorn"), "bench.baseline_app:app", "--port", "{port}", "--log-level", "error"],
                {**env, "BASELINE_MODEL": str(keras), "BASELINE_SIZE": size, "TF_CPP_MIN_LOG_LEVEL": "3"},
                "/predict",
                body,
                {"Content-Type": content_type},
            )
        )
    if not args.no_kserve:
        import kserve_env  # noqa: PLC0415 (bench/ sibling, only when KServe is measured)

        v1 = json.dumps({"instances": [{"b64": base64.b64encode(photo).decode()}]}).encode()
        kserve_env.ensure_kserve_python()  # the first run installs its venv: not while timing
        found.append(
            Target(
                "KServe Python server (LiteRT, V1 JSON, no token)",
                kserve_env.kserve_command(bundle, "{port}"),
                env,
                f"/v1/models/{model}:predict",
                v1,
                {"Content-Type": "application/json"},
            )
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="shapes,arrows,reference")
    parser.add_argument("--runs", type=int, default=5, help="cold starts per server (median)")
    parser.add_argument("--requests", type=int, default=300, help="sequential warm requests")
    parser.add_argument("--seconds", type=int, default=30, help="wrk duration")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--no-baseline", action="store_true", help="skip the FastAPI + Keras monolith")
    parser.add_argument("--no-kserve", action="store_true", help="skip KServe's Python server")
    parser.add_argument(
        "--cpus", type=float, help="run every server under this CPU quota, as a pod's limits.cpu (root)"
    )
    parser.add_argument("--floor-of", nargs=3, metavar=("BUNDLE", "JPEG", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_of:
        bundle, jpeg, n = args.floor_of
        print(measure_floor(Path(bundle), Path(jpeg).read_bytes(), int(n)))
        return
    if not shutil.which("wrk"):
        raise SystemExit("bench_predict.py: wrk is missing (Debian: apt-get install wrk)")
    # As the images do (RUN python -m compileall): with PYTHONDONTWRITEBYTECODE set, a module edited
    # since its .pyc was written would otherwise be compiled again at every cold start.
    for folder in ("shared", "functions", "bench"):
        compileall.compile_dir(ROOT / folder, quiet=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(free_port(), tmp / "redis").start()
        # As the images run: JSON access lines at INFO on stdout (to /dev/null here).
        env = {**os.environ, "REDIS_URL": redis_server.url, "LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}
        auth = AuthStore(Settings(redis_url=redis_server.url))
        pair = auth.create_key()
        bearer = auth.issue_token(pair.public_key, pair.secret_key, "bench").token
        group = cpu_cgroup(f"thalamus-bench-{os.getpid()}", args.cpus) if args.cpus else None
        try:
            for model in args.models.split(","):
                if model == "reference":
                    import reference_model  # noqa: PLC0415 (bench/ sibling, builds on first use)

                    bundle = reference_model.build()
                else:
                    bundle = ROOT / "models" / model
                name = bundle.name
                photo = sample_photo()
                for target in targets(name, bundle, photo, env, bearer, args, tmp):
                    target.cgroup = group
                    row = {"model": model, "server": target.name}
                    colds, imports = [], []
                    for run in range(args.runs):
                        if target.name == "thalamus":
                            imports.append(import_floor())
                        proc, port, seconds = start(target)
                        colds.append(seconds)
                        if run < args.runs - 1:
                            stop(proc)
                    row["cold"] = statistics.median(colds) * 1000
                    if imports:
                        row["import_floor"] = statistics.median(imports) * 1000
                    # Measured again next to each server, while it waits idle: this machine's speed
                    # drifts by tens of percent within minutes.
                    row["floor"] = floor_ms(bundle, photo, args.requests)
                    row["p50"], row["p99"] = warm(port, target, args.requests)
                    row.update(load(port, proc, target, args.seconds, args.connections))
                    stop(proc)
                    if target.name == "thalamus":
                        row["observed"], row["unobserved"] = observability_cost(target, args.requests)
                    rows.append(row)
                    print(
                        json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True
                    )
        finally:
            auth.purge()
            redis_server.stop()
            if group is not None:
                remove_cgroup(group)
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    cores = args.cpus or os.cpu_count() or 1
    machine = f"a quota of {cores:g} CPUs on {os.cpu_count()}" if args.cpus else f"{cores} CPUs"
    print(
        f"\n{args.connections} connections for {args.seconds} s (wrk); warm = {args.requests} sequential "
        f"requests on one connection; cold start = median of {args.runs}; a 640x480 JPEG; {machine}.\n"
    )
    header = (
        "model",
        "server",
        "cold start",
        "warm p50",
        "p50/floor",
        "CPU/req",
        "req/s",
        "of limit",
        "p50 / p99 under load",
        "errors",
        "PSS",
        "RSS",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        limit = cores * 1000 / r["floor"]
        load_cells = (
            [
                f"{r['cpu_ms']:.2f} ms",
                f"{r['rps']:.0f}",
                f"{r['rps'] / limit:.2f}",
                f"{r['load_p50']:.1f} / {r['load_p99']:.1f} ms",
                str(r["errors"]),
                f"{r['pss']:.0f} MB",
                f"{r['rss']:.0f} MB",
            ]
            if "rps" in r
            else ["–"] * 7
        )
        cells = [
            r["model"],
            r["server"],
            f"{r['cold']:.0f} ms",
            f"{r['p50']:.2f} ms",
            f"{r['p50'] / r['floor']:.2f}x",
            *load_cells,
        ]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if "observed" in r:
            print(
                f"{r['model']}: access log + request metrics add {r['observed'] - r['unobserved']:+.3f} ms to the warm "
                f"p50 ({r['unobserved']:.3f} → {r['observed']:.3f} ms, interleaved, median of 5 rounds)"
            )
    for r in rows:
        if "import_floor" in r:
            print(
                f"{r['model']}: cold start {r['cold']:.0f} ms; a Python that only imports the function's "
                f"third-party packages (STACK_IMPORTS) takes {r['import_floor']:.0f} ms"
            )
    print(
        "\nfloors (decode + preprocess + one model call, in-process, measured next to each server): "
        + ", ".join(f"{r['model']} {r['floor']:.2f} ms ({r['server'].split(' (')[0]})" for r in rows)
    )


if __name__ == "__main__":
    main()
