"""The inference protocols' cost next to the multipart route, on this machine.

    .venv/bin/python bench/bench_protocols.py [--model shapes] [--requests 500] [--images 32]

- latency: p50/p99 of sequential warm requests on one keep-alive connection (a lean client,
  bodies encoded once), the kinds interleaved so that drift hits them alike: multipart with one
  image at the model's input size, V2 binary with that image's FP32 tensor (the figure the issue
  bounds: at most 0.5 ms over multipart), V2 binary BYTES with the same image file, V2 JSON with
  the FP32 tensor, V1 with the image as b64;
- memory: the gunicorn worker's peak RSS (VmHWM) in a fresh server after one request of
  ``--images`` 640x480 JPEGs, as 32 multipart files and as one V2 JSON request (base64 BYTES).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from functions.predict import pipeline
from functions.predict.model import load_model
from local import ROOT
from local.helpers import (
    RedisServer,
    demo_image,
    encode,
    first_label,
    free_port,
    function_command,
    percentile_ms,
    wait_http,
)
from shared import imaging
from shared.auth import AuthStore
from shared.config import Settings

Request = tuple[str, bytes, dict[str, str]]  # path, body, headers


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "thalamusbench"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.jpg"\r\n\r\n'.encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def v2_binary(header: dict, payload: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + payload, {"Inference-Header-Content-Length": str(len(head))}


def requests_for(model: str, image: bytes, tensor) -> dict[str, Request]:
    """The same image (or its tensor) as each protocol sends it."""
    body, content_type = multipart([image])
    shape = list(tensor.shape)
    binary_out = [{"name": "output_0", "parameters": {"binary_data": True}}]

    def v2_input(datatype: str, shape: list[int], size: int) -> dict:
        spec = {"name": "keras_tensor", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}
        return {"inputs": [spec], "outputs": binary_out}

    fp32, fp32_headers = v2_binary(v2_input("FP32", shape, tensor.nbytes), tensor.astype("<f4").tobytes())
    packed = len(image).to_bytes(4, "little") + image
    images, image_headers = v2_binary(v2_input("BYTES", [1], len(packed)), packed)
    as_json = json.dumps(
        {"inputs": [{"name": "keras_tensor", "datatype": "FP32", "shape": shape, "data": tensor.ravel().tolist()}]}
    ).encode()
    v1 = json.dumps({"instances": [{"b64": base64.b64encode(image).decode()}]}).encode()
    return {
        "multipart, one image": (f"/models/{model}/predict.json", body, {"Content-Type": content_type}),
        "V2 binary, FP32 tensor": (f"/v2/models/{model}/infer", fp32, fp32_headers),
        "V2 binary, BYTES image": (f"/v2/models/{model}/infer", images, image_headers),
        "V2 JSON, FP32 tensor": (f"/v2/models/{model}/infer", as_json, {}),
        "V1 JSON, b64 image": (f"/v1/models/{model}:predict", v1, {}),
    }


def start(model: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        function_command("predict", port), env={**env, "MODEL_NAME": model}, stdout=subprocess.DEVNULL
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc, port


def send(conn: http.client.HTTPConnection, request: Request, auth: dict[str, str]) -> float:
    path, body, headers = request
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers={**auth, **headers})
    reply = conn.getresponse()
    data = reply.read()
    elapsed = time.perf_counter() - started
    if reply.status != 200:
        raise RuntimeError(f"{path}: {reply.status} {data[:200]!r}")
    return elapsed


def worker_peak_mb(server: subprocess.Popen[bytes]) -> float:
    """Peak resident memory (VmHWM) of the process that serves: the server itself (one worker
    serves without a gunicorn master), else its one worker, in MB."""
    (worker,) = psutil.Process(server.pid).children(recursive=True) or [server]
    status = Path(f"/proc/{worker.pid}/status").read_text()
    kilobytes = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kilobytes / 1024


def latency(model: str, env: dict[str, str], auth: dict[str, str], n: int) -> dict[str, list[float]]:
    bundle = load_model(Settings(model_name=model))
    image = encode(demo_image(model, first_label(model), 4242))  # at the model's input size: decode is cheap
    tensor = pipeline.decode(bundle, [pipeline.Upload(image)], imaging.Limits(40_000_000))
    kinds = requests_for(model, image, tensor)
    server, port = start(model, env)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for i in range(50 + n):
            for kind, request in kinds.items():
                elapsed = send(conn, request, auth)
                if i >= 50:
                    times[kind].append(elapsed)
        conn.close()
    finally:
        server.terminate()
        server.wait()
    return times


def memory(model: str, env: dict[str, str], auth: dict[str, str], count: int) -> dict[str, tuple[float, float, int]]:
    labels = json.loads((ROOT / "models" / model / "model.json").read_text())["labels"]
    photos = [
        encode(demo_image(model, labels[i % len(labels)], 500 + i).resize((640, 480)), "JPEG", quality=90)
        for i in range(count)
    ]

    def as_multipart(files: list[bytes]) -> Request:
        body, content_type = multipart(files)
        return f"/models/{model}/predict.json", body, {"Content-Type": content_type}

    def as_v2_json(files: list[bytes]) -> Request:
        data = [base64.b64encode(f).decode() for f in files]
        inputs = [{"name": "keras_tensor", "datatype": "BYTES", "shape": [len(files)], "data": data}]
        return f"/v2/models/{model}/infer", json.dumps({"inputs": inputs}).encode(), {}

    results = {}
    for kind, make in (("multipart", as_multipart), ("V2 JSON", as_v2_json)):
        server, port = start(model, env)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            send(conn, make(photos[:1]), auth)  # warm: imports, interpreter, first allocations
            before = worker_peak_mb(server)
            request = make(photos)
            send(conn, request, auth)
            results[kind] = (before, worker_peak_mb(server), len(request[1]))
            conn.close()
        finally:
            server.terminate()
            server.wait()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--images", type=int, default=pipeline.MAX_FILES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(free_port(), Path(tmp) / "redis").start()
        env = {**os.environ, "REDIS_URL": redis.url}
        store = AuthStore(Settings(redis_url=redis.url))
        pair = store.create_key()
        auth = {"Authorization": f"Bearer {store.issue_token(pair.public_key, pair.secret_key, 'b').token}"}
        try:
            times = latency(args.model, env, auth, args.requests)
            peaks = memory(args.model, env, auth, args.images)
        finally:
            store.purge()
            redis.stop()
    base = percentile_ms(times["multipart, one image"], 0.5)
    print(f"\n{args.model}: {args.requests} sequential warm requests per kind, interleaved, one keep-alive connection")
    print(f"{'request':<26} {'p50':>8} {'p99':>8} {'p50 - multipart':>16}")
    for kind, samples in times.items():
        p50 = percentile_ms(samples, 0.5)
        print(f"{kind:<26} {p50:6.2f}ms {percentile_ms(samples, 0.99):6.2f}ms {p50 - base:+14.2f}ms")
    print(f"\nworker peak RSS (VmHWM), {args.images} 640x480 JPEGs in one request, fresh server each")
    print(f"{'request':<12} {'body':>9} {'before':>9} {'after':>9} {'growth':>8}")
    for kind, (before, after, size) in peaks.items():
        print(f"{kind:<12} {size / 2**20:7.2f}MB {before:7.1f}MB {after:7.1f}MB {after - before:+6.1f}MB")
    print(f"\non {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
