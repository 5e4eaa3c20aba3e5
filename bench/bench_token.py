"""Token issuance and bearer verification figures over real HTTP.

    .venv/bin/python bench/bench_token.py [--requests 200]

Starts a throw-away redis-server and the token function (functions-framework, gunicorn) on free
ports, creates a key, then prints p50/p99 of POST /token.json (scrypt included), of
GET /session.json (bearer verification), the scrypt parameters, and the Redis round trips that
one bearer verification costs (script calls, counted with Redis's own command statistics), and the function's
resident memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import redis
import requests

from local.helpers import RedisServer, free_port, function_command, percentile_ms, wait_http
from shared import auth as auth_lib
from shared import config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    redis_port, port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(redis_port, Path(tmp)).start()
        env = {**os.environ, "REDIS_URL": server.url, "AUTH_MAX_FAILURES": "1000000", "WORKERS": "1", "THREADS": "4"}
        proc = subprocess.Popen(function_command("token", port), env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/healthz", proc)
            settings = config.Settings.from_env(env)
            pair = auth_lib.AuthStore(settings).create_key()
            http = requests.Session()
            body = {"public_key": pair.public_key, "secret_key": pair.secret_key}
            issue, verify = [], []
            for _ in range(args.requests):
                t = time.perf_counter()
                token = http.post(base + "/token.json", json=body).json()["token"]
                issue.append(time.perf_counter() - t)
            headers = {"Authorization": f"Bearer {token}"}
            client = redis.Redis(port=redis_port)
            client.config_resetstat()
            for _ in range(args.requests):
                t = time.perf_counter()
                assert http.get(base + "/session.json", headers=headers).status_code == 200
                verify.append(time.perf_counter() - t)
            # Commands a Lua script runs are counted too; round trips are the script calls themselves.
            stats = client.info("commandstats")
            calls = sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
            serving = psutil.Process(proc.pid)
            rss = sum(p.memory_info().rss for p in [serving, *serving.children(recursive=True)]) / 2**20
            t = time.perf_counter()
            for _ in range(50):
                auth_lib.check_secret(pair.secret_key, auth_lib.hash_secret(pair.secret_key))
            scrypt_ms = (time.perf_counter() - t) / 100 * 1000
        finally:
            proc.terminate()
            proc.wait()
            server.stop()
    print(
        f"scrypt N=2^{auth_lib.SCRYPT_N.bit_length() - 1} r={auth_lib.SCRYPT_R} p={auth_lib.SCRYPT_P}: "
        f"{scrypt_ms:.1f} ms per hash (one core)"
    )
    print(
        f"POST /token.json   p50 {percentile_ms(issue, 0.5):6.1f} ms  p99 {percentile_ms(issue, 0.99):6.1f} ms  "
        f"(n={len(issue)}, sequential, scrypt included)"
    )
    print(
        f"GET /session.json  p50 {percentile_ms(verify, 0.5):6.1f} ms  p99 {percentile_ms(verify, 0.99):6.1f} ms  "
        f"mean {statistics.mean(verify) * 1000:.1f} ms"
    )
    print(f"Redis round trips per bearer verification: {calls / len(verify):.2f}")
    print(f"token function RSS after the run (gunicorn master + worker): {rss:.0f} MB")


if __name__ == "__main__":
    main()
