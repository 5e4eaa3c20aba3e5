"""What per-key rate limits and usage counting add to an authenticated request, over real HTTP.

    .venv/bin/python bench/bench_auth.py [--requests 1000] [--rounds 3]

Starts a throw-away redis-server and a predict function for ``shapes`` (gunicorn, as the images
run it) that skips usage counting for one key (``bench/uncounted_function.py``). Then it times
sequential keep-alive requests with three keys, interleaved so that the machine's noise falls on
each alike: uncounted and unlimited (the baseline), counted and unlimited, counted with a rate
(high enough never to answer 429). Two requests: a warm prediction of a
640x480 JPEG (POST predict.json) and the lightest authenticated request (GET /models/shapes.json).
It prints the p50 of each, what usage and rates add to the baseline's p50 (median over rounds),
the Redis commands per request (Redis's own statistics) and the in-process cost of counting.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from local import ROOT
from local.helpers import RedisServer, free_port, percentile_ms, photo_jpeg, wait_http
from shared.auth import AuthStore, Session
from shared.config import Rate, Settings
from shared.credentials import token_digest

CONFIGS = ("baseline: no usage, no rate", "usage, unlimited key", "usage + rate")
ROUND_TRIPS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load")


def multipart(photo: bytes) -> tuple[bytes, str]:
    """A multipart body with ``photo`` in field ``file``, encoded once for every request."""
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="p.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    return head + photo + b"\r\n--b--\r\n", "multipart/form-data; boundary=b"


def serve(source: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """``source`` (a function's main.py) served as the images serve it, on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "shared.server", source, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc, port


def timed(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None, headers: dict) -> float:
    started = time.perf_counter()
    conn.request(method, path, body=body, headers=headers)
    reply = conn.getresponse()
    reply.read()
    elapsed = time.perf_counter() - started
    assert reply.status == 200, reply.status
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1000, help="per configuration and request kind, per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    body, content_type = multipart(photo_jpeg("shapes"))
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(free_port(), Path(tmp)).start()
        env = {**os.environ, "REDIS_URL": server.url, "MODEL_NAME": "shapes"}
        auth = AuthStore(Settings(redis_url=server.url))
        tokens, keys = [], []
        for rate in (None, None, Rate(999_999_999, 1)):
            pair = auth.create_key(rate=rate)
            keys.append(pair.public_key)
            tokens.append(auth.issue_token(pair.public_key, pair.secret_key, "bench").token)
        baseline_key = keys[0]
        procs = []
        try:
            proc, port = serve(
                "bench/uncounted_function.py", {**env, "BENCH_FUNCTION": "predict", "BENCH_UNCOUNTED": baseline_key}
            )
            procs = [proc]
            conns = [http.client.HTTPConnection("127.0.0.1", port) for _ in CONFIGS]
            kinds = {
                "POST predict.json (640x480 JPEG)": ("POST", "/models/shapes/predict.json", body, content_type),
                "GET /models/shapes.json": ("GET", "/models/shapes.json", None, None),
            }
            p50s: dict[str, list[list[float]]] = {kind: [[] for _ in CONFIGS] for kind in kinds}
            calls = []
            client = redis.Redis.from_url(server.url)
            for _ in range(args.rounds):
                for kind, (method, path, payload, ctype) in kinds.items():
                    times: list[list[float]] = [[] for _ in CONFIGS]
                    client.config_resetstat()
                    for i in range(args.requests + 50):
                        for n in (i % 3, (i + 1) % 3, (i + 2) % 3):  # no configuration always goes first
                            conn = conns[n]
                            headers = {"Authorization": f"Bearer {tokens[n]}"}
                            if ctype:
                                headers["Content-Type"] = ctype
                            elapsed = timed(conn, method, path, payload, headers)
                            if i >= 50:  # warm-up
                                times[n].append(elapsed)
                    time.sleep(1.2)  # let the usage flusher run once more
                    # Commands a script runs count too: round trips are the calls made from outside.
                    stats = client.info("commandstats")
                    calls.append(sum(v["calls"] for k, v in stats.items() if k in ROUND_TRIPS))
                    for n in range(len(CONFIGS)):
                        p50s[kind][n].append(percentile_ms(times[n], 0.5))
            # The auth round trip alone, in this process: an unlimited key's script, a rated one's, and
            # the plain HGETALL of the token record that verification was before keys were read live.
            record = auth.settings.prefix + "token:" + token_digest(tokens[1])
            steps = (
                lambda: auth.verify_token(tokens[1], "shapes"),
                lambda: auth.verify_token(tokens[2], "shapes"),
                lambda: auth.redis.hgetall(record),
            )
            verify: list[list[float]] = [[], [], []]
            for i in range(4000):
                for n in (i % 3, (i + 1) % 3, (i + 2) % 3):
                    started = time.perf_counter()
                    steps[n]()
                    verify[n].append(time.perf_counter() - started)
            session = Session("pk_" + "b" * 43, None, 3600)
            started, count = time.perf_counter(), 100_000
            for _ in range(count):
                auth.record_request(session, "shapes", 200)
            record_us = (time.perf_counter() - started) / count * 1e6
            auth.usage.flush()
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
            server.stop()

    print(f"\n{args.requests} sequential keep-alive requests per configuration, interleaved, {args.rounds} round(s)")
    for kind, per_config in p50s.items():
        print(f"\n{kind}")
        base = statistics.median(per_config[0])
        for name, values in zip(CONFIGS, per_config, strict=True):
            median = statistics.median(values)
            added = "" if name == CONFIGS[0] else f"   added {median - base:+.3f} ms"
            rounds = ", ".join(f"{v:.3f}" for v in values)
            print(f"  {name:<30} p50 {median:6.3f} ms  (rounds: {rounds}){added}")
    total = args.requests + 50
    print(
        f"\nRedis round trips per request, all three configurations together: "
        f"{statistics.median(calls) / (3 * total):.3f} (the rated key's script each; the unlimited keys' "
        "tokens are in the function's token cache; usage flushes once a second)"
    )
    unlimited, rated, hgetall = (percentile_ms(v, 0.5) * 1000 for v in verify)
    print(
        f"auth round trip in-process, p50: script with an unlimited key {unlimited:.0f} µs, with a rate "
        f"{rated:.0f} µs; a bare HGETALL of the token record {hgetall:.0f} µs"
    )
    print(f"AuthStore.record_request in-process: {record_us:.2f} µs per call")


if __name__ == "__main__":
    main()
