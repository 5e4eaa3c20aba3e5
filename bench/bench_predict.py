"""Figures of one predict function (one replica), next to the monolith it replaces and KServe.

    .venv/bin/python bench/bench_predict.py [--models shapes,arrows,reference] [--seconds 30]
                                            [--runs 5] [--requests 300] [--no-baseline] [--no-kserve]
                                            [--no-image] [--cpus N] [--photo drawing|detailed]

For each model (``reference`` is a network the size of the original Thalamus classifier:
180x180x3, three conv blocks, dense 128, 5 classes, imported with ``train.py --import``), with a
640x480 JPEG: by default a drawing of the shapes model's (8.5 KB: flat colours compress well),
with ``--photo detailed`` one with a photo's fine detail (blurred noise, 101 KB, the size of a
camera photo at 640x480: what the upload's parsing and the decode cost grows with):

- floor: in-process decode + preprocess + one model call (what no server can go below), measured
  again next to each server, as the machine's speed drifts;
- cold start: spawn of the server to the first authenticated 200, median of --runs; for
  Thalamus also the import floor: a Python that only imports the function's third-party
  packages (functions-framework, Flask, redis-py, NumPy, LiteRT, Pillow, prometheus-client,
  gunicorn, python-json-logger: STACK_IMPORTS) and exits, started as the server starts (the
  collector off, no OpenBLAS threads, redis-py's asyncio client deferred), runs alternated with
  them (bench/replica.py);
- warm p50/p99 on one keep-alive connection (a lean client: body encoded once), and the same
  function without its access log and request metrics (``bench/unobserved_function.py``);
- under load, ``wrk`` with 8 connections for --seconds: requests/s, p50/p99, errors, the
  servers' CPU per request, and afterwards their PSS and RSS (all of a server's processes: with
  one process, RSS is everything it holds; PSS splits the pages it shares, its libraries' code
  mostly, with other processes on the machine); throughput is also shown against the machine's
  compute limit (cores x 1000 / floor ms; with --cpus N, every server runs in a cgroup with a
  quota of N CPUs, as a pod's ``limits.cpu`` sets, and the limit is N x 1000 / floor ms);
- all of it again for Thalamus as it ships, "thalamus in its image": the predict image (built
  from this checkout; podman or docker, ``--no-image`` skips it) with the model's bundle at
  /app/model, run as a pod runs it (the restricted profile's settings, ``--cpus`` for a quota),
  on the image's own Python and packages (python:3.11-slim's Python: a release build, not
  necessarily the one a venv here was made from); cold starts, import floor and floor measured
  inside the container (the container runtime's own start left out: ``bench_containers.py``
  measures it);
- the same for the monolith (FastAPI + Keras ``model.predict``, TensorFlow: bench/baseline_app.py)
  and for KServe's Python server running the same ``.tflite`` on LiteRT (bench/kserve_app.py,
  V1 JSON with a base64 image, no token).

Installs nothing into the project venv: on the ``.venv`` ``./test.sh`` makes (it holds the
project itself), ``pip install -r requirements-bench.txt`` once (FastAPI for the monolith), ``wrk``
from Debian; KServe gets its own venv on first use (bench/kserve_env.py).
"""

from __future__ import annotations

import argparse
import base64
import compileall
import http.client
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import bench_token
import replica

from local import ROOT, helpers
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
    image: Image | None = None  # runs in a container of this image, named after its port (container_name)


def multipart(photo: bytes) -> tuple[bytes, str]:
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    return head + photo + b"\r\n--b--\r\n", "multipart/form-data; boundary=b"


def post(port: int, target: Target, conn: http.client.HTTPConnection | None = None) -> int:
    return replica.post(port, target.path, target.body, target.headers, conn)


def command_of(target: Target, port: int) -> list[str]:
    """``target``'s command for ``port``, inside its cgroup if it has one."""
    command = [part.replace("{port}", str(port)) for part in target.command]
    return command if target.cgroup is None else in_cgroup(target.cgroup, command)


def start(target: Target, cwd: Path = ROOT) -> tuple[subprocess.Popen[bytes], int]:
    """Spawn ``target`` in ``cwd`` and wait until it answers its request with 200: (process, port)."""
    port = free_port()
    proc, _ = replica.spawn_until_ok(
        command_of(target, port), port, target.path, target.body, target.headers, env=target.env, cwd=cwd
    )
    return proc, port


def stop(target: Target, proc: subprocess.Popen[bytes], port: int) -> None:
    """Stop ``target``'s server; an image Target's container too, should it outlive its
    ``run`` (a killed client does not pass SIGKILL on, and PID 1 of a container has no parent
    to watch)."""
    replica.stop(proc)
    if target.image is not None:
        subprocess.run([target.image.engine, "rm", "-f", container_name(port)], capture_output=True, timeout=60)


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


def server_pids(target: Target, proc: subprocess.Popen[bytes], port: int) -> list[int]:
    """The processes of ``target``'s server: ``proc`` and its children, or its container's."""
    if target.image is None:
        return tree(proc.pid)
    inspect = [target.image.engine, "inspect", "--format", "{{.State.Pid}}", container_name(port)]
    return tree(int(subprocess.run(inspect, check=True, capture_output=True, text=True).stdout))


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
    conn = replica.connect(port)
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
        pids = server_pids(target, proc, port)
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
        pids = server_pids(target, proc, port)
        cpu = cpu_seconds(pids) - cpu_before
    numbers = next(line for line in out.stdout.splitlines() if line.startswith("WRK ")).split()[1:]
    done, micros, broken, bad_status = int(numbers[0]), int(numbers[1]), int(numbers[2]), int(numbers[3])
    return {
        "rps": done / (micros / 1e6),
        "load_p50": float(numbers[6]),
        "load_p99": float(numbers[7]),
        "errors": broken + bad_status,
        "cpu_ms": cpu / max(done, 1) * 1000,
        "pss": memory_mb(pids, "Pss"),
        "rss": memory_mb(pids, "Rss"),
    }


def observability_cost(target: Target, n: int, rounds: int = 5) -> tuple[float, float]:
    """Warm p50 of ``target`` and of the same function without its access log and request
    metrics (bench/unobserved_function.py), both running, their requests interleaved so that
    the machine's noise falls on each alike; medians over ``rounds``."""
    bare = replace(target, command=[*target.command[:3], "bench/unobserved_function.py", *target.command[4:]])
    (with_proc, with_port), (bare_proc, bare_port) = start(target), start(bare)
    try:
        observed, unobserved = [], []
        for _ in range(rounds):
            conns, times = (replica.connect(with_port), replica.connect(bare_port)), ([], [])
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
        replica.stop(with_proc)
        replica.stop(bare_proc)


# What a predict function imports from other projects, all of it needed by its first request.
STACK_IMPORTS = (
    "functions_framework, flask, redis, numpy, ai_edge_litert.interpreter, PIL.Image, prometheus_client, "
    "gunicorn.workers.gthread, pythonjsonlogger.json"
)


@dataclass(frozen=True)
class Image:
    """The predict image, built from this checkout, and the engine that runs it."""

    engine: str
    tag: str
    cpus: float | None  # a CPU quota per container (--cpus), as a pod's limits.cpu

    def run(self, bundle: Path, env: dict[str, str], command: list[str], *flags: str) -> list[str]:
        """``command`` inside this image as a pod runs the function: the restricted profile's
        settings, the function's env, ``bundle`` at /app/model, on this machine's network."""
        keys = ("REDIS_URL", "LOG_LEVEL", "LOG_FORMAT", "MODEL_NAME")
        flags += ("--rm", "--network=host", *helpers.restricted_flags(self.engine), f"--volume={bundle}:/app/model:ro")
        flags += tuple(f"--env={key}={env[key]}" for key in keys if key in env)
        flags += (f"--cpus={self.cpus:g}",) if self.cpus else ()
        return [self.engine, "run", *flags, self.tag, *command]

    def output(self, bundle: Path, env: dict[str, str], request: Path, command: list[str]) -> str:
        """What ``command`` prints in this image, with ``request`` and bench/replica.py in /bench."""
        mounts = (
            f"--volume={request}:/bench/request:ro",
            f"--volume={ROOT / 'bench' / 'replica.py'}:/bench/replica.py:ro",
        )
        done = subprocess.run(self.run(bundle, env, command, *mounts), capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} in {self.tag} failed:\n{done.stderr[-3000:]}")
        return done.stdout.splitlines()[-1]


IMAGE_SERVER = ["python", "-m", "shared.server", "/app/functions/predict/main.py", "--host", "127.0.0.1"]


def predict_image(cpus: float | None) -> Image | None:
    """The predict image, built; None without podman or docker that can build it
    (``../shared/tools/container-setup``)."""
    engine = helpers.container_engine()
    if engine is None:
        print("no podman or docker that builds FROM python:3.11-slim: Thalamus in its image skipped", file=sys.stderr)
        return None
    tag = helpers.image_tag("shapes")
    try:
        helpers.build_image(engine, "shapes", tag)
    except RuntimeError as exc:
        print(f"{exc}\nThalamus in its image skipped (--no-image skips it without trying)", file=sys.stderr)
        return None
    return Image(engine, tag, cpus)


def container_name(port: int | str) -> str:
    """The container of an image Target serving on ``port`` ("{port}" in a Target's command)."""
    return f"thalamus-bench-{port}"


def request_folder(target: Target, photo: bytes, tmp: Path) -> Path:
    """A folder with ``target``'s request and ``photo``, for bench/replica.py in the image: read by
    its user (uid 10001). The token in it is one of the bench's own throw-away Redis."""
    folder = tmp / "request"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)  # whatever the umask
    files = {"path": target.path.encode(), "headers.json": json.dumps(target.headers).encode(), "body": target.body}
    for name, data in {**files, "photo.jpg": photo}.items():
        (folder / name).write_bytes(data)
        (folder / name).chmod(0o644)
    return folder


def image_cold_starts(target: Target, bundle: Path, request: Path, runs: int) -> dict[str, list[float]]:
    """Cold starts of ``target``'s function inside its image, each after the import floor there."""
    assert target.image is not None
    port = str(free_port())
    command = ["python", "/bench/replica.py", "cold", "--request", "/bench/request", "--runs", str(runs)]
    command += ["--port", port, "--imports", STACK_IMPORTS, "--", *IMAGE_SERVER, "--port", port]
    return json.loads(target.image.output(bundle, target.env, request, command))


def floor_ms(target: Target, bundle: Path, photo: bytes, request: Path, n: int) -> float:
    """In-process decode + preprocess + one model call for ``photo``: what no server goes below.
    Measured in a child process (in ``target``'s image for an image Target), so that this one never
    maps NumPy, Pillow or LiteRT: pages it shared with the servers would lower their PSS."""
    if target.image is not None:
        command = ["python", "/bench/replica.py", "floor", "/app/model", "/bench/request/photo.jpg", str(n)]
        return float(target.image.output(bundle, target.env, request, command))
    command = [sys.executable, str(ROOT / "bench" / "replica.py"), "floor", str(bundle), str(request / "photo.jpg")]
    return float(subprocess.run([*command, str(n)], check=True, capture_output=True, text=True, cwd=ROOT).stdout)


PHOTOS = {
    "drawing": "from local.helpers import photo_jpeg; jpeg = photo_jpeg('shapes')",
    "detailed": (
        "import io, numpy as np; from PIL import Image, ImageFilter; "
        "noise = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8); "
        "out = io.BytesIO(); "
        "Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.2)).save(out, 'JPEG', quality=90); "
        "jpeg = out.getvalue()"
    ),
}


def sample_photo(kind: str = "drawing") -> bytes:
    """The 640x480 JPEG every server gets, one of PHOTOS (made in a child process, as the floor is)."""
    script = f"import sys; {PHOTOS[kind]}; sys.stdout.buffer.write(jpeg)"
    return subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=ROOT).stdout


def targets(
    model: str,
    bundle: Path,
    photo: bytes,
    env: dict[str, str],
    bearer: str,
    args: argparse.Namespace,
    tmp: Path,
    image: Image | None,
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
    if image is not None:  # as it ships: the image's own Python and packages
        server = image.run(bundle, function, [*IMAGE_SERVER, "--port", "{port}"], f"--name={container_name('{port}')}")
        found.append(Target("thalamus in its image", server, function, path, body, thalamus_headers, image=image))
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
    parser.add_argument("--no-image", action="store_true", help="skip Thalamus inside its image (podman or docker)")
    parser.add_argument(
        "--cpus", type=float, help="run every server under this CPU quota, as a pod's limits.cpu (root)"
    )
    parser.add_argument("--photo", choices=sorted(PHOTOS), default="drawing", help="the JPEG sent (see above)")
    parser.add_argument("--no-token", action="store_true", help="skip the token function's figures (bench_token.py)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("bench_predict.py: wrk is missing (Debian: apt-get install wrk)")
    if not args.no_baseline and importlib.util.find_spec("fastapi") is None:  # now, not after the Thalamus rows
        raise SystemExit(
            "bench_predict.py: the monolith needs FastAPI and uvicorn: .venv/bin/pip install -r requirements-bench.txt "
            "(or pass --no-baseline)"
        )
    # As the images do (RUN python -m compileall): with PYTHONDONTWRITEBYTECODE set, a module edited
    # since its .pyc was written would otherwise be compiled again at every cold start.
    for folder in ("shared", "functions", "bench"):
        compileall.compile_dir(ROOT / folder, quiet=1)
    image = None if args.no_image else predict_image(args.cpus)
    photo = sample_photo(args.photo)
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
                for target in targets(name, bundle, photo, env, bearer, args, tmp, image):
                    target.cgroup = group if target.image is None else None  # a container gets --cpus
                    row = {"model": model, "server": target.name}
                    request = request_folder(target, photo, tmp)
                    thalamus = target.name.startswith("thalamus")
                    if target.image is not None:
                        starts = image_cold_starts(target, bundle, request, args.runs)
                    else:
                        port = free_port()
                        starts = replica.cold_starts(
                            command_of(target, port), port, target.path, target.body, target.headers, args.runs,
                            STACK_IMPORTS if thalamus else None, env=target.env, cwd=ROOT,
                        )  # fmt: skip
                    row["cold"] = statistics.median(starts["cold"]) * 1000
                    if thalamus:
                        row["import_floor"] = statistics.median(starts["imports"]) * 1000
                    proc, port = start(target)
                    try:
                        # Measured again next to each server, while it waits idle: this machine's
                        # speed drifts by tens of percent within minutes.
                        row["floor"] = floor_ms(target, bundle, photo, request, args.requests)
                        row["p50"], row["p99"] = warm(port, target, args.requests)
                        row.update(load(port, proc, target, args.seconds, args.connections))
                    finally:
                        stop(target, proc, port)
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
    token = None if args.no_token else bench_token.measure(args.requests)
    report(rows, args, len(photo))
    if token is not None:
        print("\ntoken function (bench_token.py):")
        bench_token.report(token)
    verdict(rows, token, usable_cores(args))


def usable_cores(args: argparse.Namespace) -> float:
    """The CPUs the servers may use: --cpus, else this process's affinity."""
    return args.cpus or len(os.sched_getaffinity(0))


def verdict(rows: list[dict], token: dict[str, float] | None, cores: float) -> None:
    """Each of issue 13's targets for the reference network (and the token function), met or not."""
    lines = []
    monolith = next((r for r in rows if r["model"] == "reference" and r["server"].startswith("monolith")), None)
    for r in rows:
        if r["model"] != "reference" or not r["server"].startswith("thalamus") or "rps" not in r:
            continue
        share, spread = r["rps"] / (cores * 1000 / r["floor"]), r["load_p99"] / max(r["load_p50"], 1e-9)
        steady = share >= 0.6 and not r["errors"] and spread <= 4
        times = f", {monolith['cold'] / r['cold']:.1f}x the monolith" if monolith else ""
        floor = f"; import floor {r['import_floor']:.0f} ms" if "import_floor" in r else ""
        checks = [
            ("PSS after the load <= 100 MB", f"{r['pss']:.1f} MB", r["pss"] <= 100),
            ("req/s >= 0.6 of the limit, no error, p99 <= 4 x p50",
             f"{share:.2f}, {r['errors']} errors, p99 {spread:.1f} x p50", steady),
            ("warm p50 <= 1.5 x floor", f"{r['p50'] / r['floor']:.2f}x", r["p50"] <= 1.5 * r["floor"]),
            ("CPU per request <= floor + 1.5 ms", f"floor + {r['cpu_ms'] - r['floor']:.2f} ms",
             r["cpu_ms"] <= r["floor"] + 1.5),
            ("cold start <= 0.28 s", f"{r['cold']:.0f} ms{times}{floor}", r["cold"] <= 280),
        ]  # fmt: skip
        lines += [(r["server"], *check) for check in checks]
    if token is not None:
        bound = bench_token.issue_bound(token)
        lines += [
            ("token function", "POST /token.json p50 <= 1.1 x (scrypt + round trip)",
             f"{token['issue_p50'] / bound:.3f}x", token["issue_p50"] <= 1.1 * bound),
            ("token function", "GET /session.json p50 <= 1.2 ms", f"{token['session_p50']:.2f} ms",
             token["session_p50"] <= 1.2),
        ]  # fmt: skip
    if lines:
        print("\nissue 13's targets (reference network):")
        print("| server | target | measured | |\n|---|---|---|---|")
        for server, target, measured, met in lines:
            print(f"| {server} | {target} | {measured} | {'met' if met else 'not met'} |")


def report(rows: list[dict], args: argparse.Namespace, photo_bytes: int) -> None:
    cores = usable_cores(args)
    machine = f"a quota of {cores:g} CPUs on {os.cpu_count()}" if args.cpus else f"{cores:g} CPUs"
    print(
        f"\n{args.connections} connections for {args.seconds} s (wrk); warm = {args.requests} sequential "
        f"requests on one connection; cold start = median of {args.runs}; a 640x480 JPEG "
        f"({args.photo}, {photo_bytes / 1000:.1f} KB); {machine}.\n"
    )
    header = (
        "model",
        "server",
        "cold start",
        "floor",
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
            f"{r['floor']:.2f} ms",
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
                f"{r['model']}, {r['server']}: cold start {r['cold']:.0f} ms; a Python that only imports the "
                f"function's third-party packages (STACK_IMPORTS) there takes {r['import_floor']:.0f} ms"
            )
    print(
        "\nfloors (decode + preprocess + one model call, in-process, measured next to each server): "
        + ", ".join(f"{r['model']} {r['floor']:.2f} ms ({r['server'].split(' (')[0]})" for r in rows)
    )


if __name__ == "__main__":
    main()
