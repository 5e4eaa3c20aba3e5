"""Token issuance and bearer verification figures over real HTTP.

    .venv/bin/python bench/bench_token.py [--requests 200]

Starts a throw-away redis-server and the token function (functions-framework, gunicorn) on free
ports, logging as the images do, creates a key, then prints p50/p99 of POST /token.json (scrypt
included) against one scrypt hash plus one Redis round trip, of GET /session.json (bearer
verification), the Redis round trips that one verification costs (script calls, counted with
Redis's own command statistics), and the function's resident memory. The client is lean (one
keep-alive connection, TCP_NODELAY, bodies encoded once), so the times are the server's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import redis

from local.helpers import RedisServer, free_port, function_command, percentile_ms, wait_http
from shared import config, credentials
from shared.auth import AuthStore


def measure(requests: int) -> dict[str, float]:
    """The token function's figures (milliseconds unless named otherwise): see the module's docstring."""
    redis_port, port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(redis_port, Path(tmp)).start()
        env = {**os.environ, "REDIS_URL": server.url, "AUTH_MAX_FAILURES": "1000000",
               "LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}  # fmt: skip
        proc = subprocess.Popen(function_command("token", port), env=env, stdout=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/healthz", proc)
            settings = config.Settings.from_env(env)
            pair = AuthStore(settings).create_key()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def call(method: str, path: str, body: bytes | None = None, **headers: str) -> bytes:
                conn.request(method, path, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                assert reply.status == 200, data
                return data

            body = json.dumps({"public_key": pair.public_key, "secret_key": pair.secret_key}).encode()
            issue, verify, ping = [], [], []
            for _ in range(requests):
                t = time.perf_counter()
                token = json.loads(call("POST", "/token.json", body, **{"Content-Type": "application/json"}))["token"]
                issue.append(time.perf_counter() - t)
            client = redis.Redis(port=redis_port)
            for _ in range(requests):
                t = time.perf_counter()
                client.ping()
                ping.append(time.perf_counter() - t)
            for _ in range(20):  # warm-up
                call("GET", "/session.json", Authorization=f"Bearer {token}")
            client.config_resetstat()
            for _ in range(requests):
                t = time.perf_counter()
                call("GET", "/session.json", Authorization=f"Bearer {token}")
                verify.append(time.perf_counter() - t)
            # Commands a Lua script runs are counted too; the script calls are what is counted here.
            stats = client.info("commandstats")
            calls = sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
            serving = psutil.Process(proc.pid)
            rss = sum(p.memory_info().rss for p in [serving, *serving.children(recursive=True)]) / 2**20
            t = time.perf_counter()
            for _ in range(50):
                credentials.matching_hash(pair.secret_key, [credentials.hash_secret(pair.secret_key)])
            scrypt_ms = (time.perf_counter() - t) / 100 * 1000
        finally:
            proc.terminate()
            proc.wait()
            server.stop()
    return {
        "scrypt": scrypt_ms,
        "ping_p50": percentile_ms(ping, 0.5),
        "issue_p50": percentile_ms(issue, 0.5),
        "issue_p99": percentile_ms(issue, 0.99),
        "session_p50": percentile_ms(verify, 0.5),
        "session_p99": percentile_ms(verify, 0.99),
        "session_mean": statistics.mean(verify) * 1000,
        "round_trips": calls / len(verify),
        "rss_mb": rss,
        "requests": requests,
    }


def issue_bound(figures: dict[str, float]) -> float:
    """What ``POST /token.json`` is measured against: one scrypt hash plus one Redis round trip, ms."""
    return figures["scrypt"] + figures["ping_p50"]


def report(figures: dict[str, float]) -> None:
    """Print ``figures`` (from :func:`measure`)."""
    print(
        f"scrypt N=2^{credentials.SCRYPT_N.bit_length() - 1} r={credentials.SCRYPT_R} p={credentials.SCRYPT_P}: "
        f"{figures['scrypt']:.1f} ms per hash (one core)"
    )
    bound = issue_bound(figures)
    print(f"one Redis round trip (PING): p50 {figures['ping_p50']:.3f} ms")
    print(
        f"POST /token.json   p50 {figures['issue_p50']:6.1f} ms  p99 {figures['issue_p99']:6.1f} ms  "
        f"(n={figures['requests']:.0f}, sequential, scrypt included): {figures['issue_p50'] / bound:.3f}x "
        f"one scrypt hash + one round trip ({bound:.1f} ms)"
    )
    print(
        f"GET /session.json  p50 {figures['session_p50']:6.2f} ms  p99 {figures['session_p99']:6.2f} ms  "
        f"mean {figures['session_mean']:.2f} ms"
    )
    print(
        f"auth scripts per bearer verification: {figures['round_trips']:.2f} (the same token each time: the "
        "token function keeps it at its second check, one more round trip, and answers it from its cache after)"
    )
    print(f"token function RSS after the run (one process): {figures['rss_mb']:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    report(measure(parser.parse_args().requests))


if __name__ == "__main__":
    main()
