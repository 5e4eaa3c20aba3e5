"""Prediction figures for each demo model, on this machine, next to the monolith baseline.

    .venv/bin/python bench/bench_predict.py [--runs 5] [--requests 200] [--no-baseline]

For each model in models/ (default: the demo models):
- cold start: spawn of the production command (functions-framework, gunicorn) to the first
  authenticated 200 on predict, median of --runs runs;
- warm latency p50/p99 over real HTTP for a 640x480 JPEG, sequential requests on one keep-alive
  connection from a lean client (http.client, body encoded once);
- the floor: in-process decode + preprocess + model call for the same image, and the ratio;
- memory of the serving processes after warm-up (gunicorn master + worker): RSS and PSS;
- the same for the baseline (bench/baseline_app.py: FastAPI + Keras model.predict, TensorFlow),
  built with the same network architecture (weights are not trained: speed and memory do not
  depend on their values).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

from functions.predict import pipeline
from functions.predict.model import load_model
from local import ROOT
from local.helpers import RedisServer, free_port, function_command, percentile_ms, photo_jpeg
from shared import imaging
from shared.auth import AuthStore
from shared.config import Settings

BIN = Path(sys.executable).parent


def encode_multipart(photo: bytes) -> tuple[bytes, str]:
    boundary = "thalamusbench"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="photo.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def memory_mb(pid: int) -> tuple[float, float]:
    """RSS and PSS of ``pid`` and its children, in MB. RSS counts pages a forked worker shares
    with its gunicorn master twice; PSS splits them, so it sums to what the processes really use."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    infos = [p.memory_full_info() for p in procs]
    return sum(i.rss for i in infos) / 2**20, sum(i.pss for i in infos) / 2**20


def spawn_until_200(
    args: list[str], env: dict, url: str, files: dict, headers: dict, timeout: float = 120
) -> tuple[subprocess.Popen, float]:
    http = requests.Session()
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.perf_counter() - started < timeout:
        try:
            if http.post(url, files=files, headers=headers, timeout=30).status_code == 200:
                return proc, time.perf_counter() - started
        except requests.ConnectionError:
            time.sleep(0.005)
    proc.kill()
    raise TimeoutError(f"{args[0]} never answered 200 at {url}")


def measure(args: list[str], env: dict, url: str, photo: bytes, headers: dict, runs: int, requests_n: int) -> dict:
    files = {"file": ("photo.jpg", photo, "image/jpeg")}
    colds = []
    for run in range(runs):
        proc, cold = spawn_until_200(args, env, url, files, headers)
        colds.append(cold)
        if run < runs - 1:
            proc.terminate()
            proc.wait()
    try:
        # Warm requests go through a lean client (one keep-alive connection, body encoded once),
        # as a load generator would send them: the figure is the server's, not the client library's.
        body, content_type = encode_multipart(photo)
        parsed = urlsplit(url)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port)
        send_headers = {**headers, "Content-Type": content_type}
        warm = []
        for i in range(20 + requests_n):
            t = time.perf_counter()
            conn.request("POST", parsed.path, body=body, headers=send_headers)
            reply = conn.getresponse()
            reply.read()
            assert reply.status == 200
            if i >= 20:
                warm.append(time.perf_counter() - t)
        conn.close()
        rss, pss = memory_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait()
    return {
        "cold": statistics.median(colds) * 1000,
        "p50": percentile_ms(warm, 0.5),
        "p99": percentile_ms(warm, 0.99),
        "rss": rss,
        "pss": pss,
    }


def floor_ms(model: str, photo: bytes, n: int) -> float:
    """In-process decode + preprocess + one model call: what no server can go below."""
    bundle = load_model(Settings(model_name=model))
    upload = [pipeline.Upload(photo)]
    times = []
    for _ in range(n + 20):
        t = time.perf_counter()
        pipeline.infer(bundle, pipeline.decode(bundle, upload, imaging.Limits(40_000_000)))
        times.append(time.perf_counter() - t)
    return percentile_ms(times[20:], 0.5)


def baseline_model(model: str, tmp: Path) -> tuple[Path, str]:
    meta = json.loads((ROOT / "models" / model / "model.json").read_text())
    spec = meta["input"]
    path = tmp / f"{model}.keras"
    script = (
        f"import tensorflow as tf, train; train.build_model(tf, {spec!r}, {len(meta['labels'])}).save({str(path)!r})"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, cwd=ROOT)
    return path, f"{spec['height']}x{spec['width']}x{spec['channels']}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--models", default="shapes,arrows")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = RedisServer(free_port(), tmp / "redis").start()
        env = {**os.environ, "REDIS_URL": server.url, "WORKERS": "1", "THREADS": "4", "TF_CPP_MIN_LOG_LEVEL": "3"}
        auth = AuthStore(Settings(redis_url=server.url))
        pair = auth.create_key()
        headers = {"Authorization": f"Bearer {auth.issue_token(pair.public_key, pair.secret_key, 'b').token}"}
        try:
            for model in args.models.split(","):
                photo = photo_jpeg(model)
                port = free_port()
                thalamus = measure(
                    function_command("predict", port),
                    {**env, "MODEL_NAME": model},
                    f"http://127.0.0.1:{port}/models/{model}/predict.json",
                    photo,
                    headers,
                    args.runs,
                    args.requests,
                )
                thalamus["floor"] = floor_ms(model, photo, args.requests)
                rows.append((model, "thalamus (functions-framework + LiteRT)", thalamus))
                if not args.no_baseline:
                    path, size = baseline_model(model, tmp)
                    port = free_port()
                    baseline = measure(
                        [str(BIN / "uvicorn"), "bench.baseline_app:app", "--port", str(port), "--log-level", "error"],
                        {**env, "BASELINE_MODEL": str(path), "BASELINE_SIZE": size},
                        f"http://127.0.0.1:{port}/predict",
                        photo,
                        {},
                        max(1, args.runs // 2),
                        args.requests,
                    )
                    rows.append((model, "baseline (FastAPI + Keras, TensorFlow)", baseline))
        finally:
            auth.purge()
            server.stop()
    print(
        f"\n{'model':<8} {'server':<40} {'cold start':>10} {'warm p50':>9} {'warm p99':>9} "
        f"{'floor':>7} {'p50/floor':>9} {'RSS':>8} {'PSS':>8}"
    )
    for model, name, r in rows:
        floor = f"{r['floor']:6.2f}" if "floor" in r else "     -"
        ratio = f"{r['p50'] / r['floor']:8.2f}x" if "floor" in r else "        -"
        print(
            f"{model:<8} {name:<40} {r['cold']:8.0f}ms {r['p50']:7.2f}ms {r['p99']:7.2f}ms "
            f"{floor}ms {ratio} {r['rss']:6.0f}MB {r['pss']:6.0f}MB"
        )
    print(
        f"\n{args.requests} sequential warm requests of a 640x480 JPEG, cold start median of {args.runs} "
        f"runs (baseline: {max(1, args.runs // 2)}), on {os.cpu_count()} CPUs."
    )


if __name__ == "__main__":
    main()
