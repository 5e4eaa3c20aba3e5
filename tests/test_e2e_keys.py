"""A key's life over real HTTP: keys.py changes a key while real function processes serve it."""

import json
import subprocess
import time

import pytest
import requests

from local.helpers import free_port, function_command, wait_http
from tests.conftest import subprocess_env
from tests.test_keys import keys


@pytest.fixture
def run(env):
    return lambda *args: keys(*args, env=subprocess_env(**env))


@pytest.fixture
def generate(run, tmp_path):
    def make(*options, name="k.json"):
        result = run("-g", str(tmp_path / name), *options)
        assert result.returncode == 0, result.stderr
        return json.loads((tmp_path / name).read_text())

    return make


def get_token(base, pair):
    return requests.post(f"{base}/token.json", json=pair, timeout=10)


def bearer(base, pair):
    reply = get_token(base, pair)
    assert reply.status_code == 200, reply.text
    return {"Authorization": f"Bearer {reply.json()['token']}"}


def test_an_expired_key_gets_no_token(serve_function, generate):
    base = serve_function("token")
    pair = generate("--expires", "2s")
    reply = get_token(base, pair)
    assert reply.status_code == 200 and reply.json()["ttl"] <= 2
    time.sleep(2.2)
    expired = get_token(base, pair)
    wrong = get_token(base, {**pair, "secret_key": "sk_" + "w" * 43})
    assert expired.status_code == wrong.status_code == 401 and expired.json() == wrong.json()
    old_token = {"Authorization": f"Bearer {reply.json()['token']}"}
    session = requests.get(f"{base}/session.json", headers=old_token, timeout=10)
    assert session.status_code == 401


def test_rotation_over_http(serve_function, generate, run, tmp_path):
    base = serve_function("token")
    pair = generate()
    assert run("--rotate", pair["public_key"], "-o", str(tmp_path / "r1.json"), "--grace", "3s").returncode == 0
    first = json.loads((tmp_path / "r1.json").read_text())
    assert get_token(base, pair).status_code == 200  # during the grace period
    assert get_token(base, first).status_code == 200
    time.sleep(3.2)
    assert get_token(base, pair).status_code == 401
    assert run("--rotate", pair["public_key"], "-o", str(tmp_path / "r2.json")).returncode == 0
    assert get_token(base, first).status_code == 401
    assert get_token(base, json.loads((tmp_path / "r2.json").read_text())).status_code == 200


def test_a_lowered_scope_bites_the_next_request(serve_function, generate, run):
    token_base = serve_function("token")
    shapes = serve_function("predict", MODEL_NAME="shapes")
    pair = generate("--models", "arrows,shapes")
    headers = bearer(token_base, pair)
    assert requests.get(f"{shapes}/models/shapes.json", headers=headers, timeout=10).status_code == 200
    assert run("--edit", pair["public_key"], "--models", "arrows").returncode == 0
    refused = requests.get(f"{shapes}/models/shapes.json", headers=headers, timeout=10)
    assert refused.status_code == 403 and "may not call" in refused.json()["error"]


@pytest.fixture
def predict_pair(env):
    """Two predict processes for the same model sharing the test's Redis; stoppable mid-test."""
    procs = []
    for _ in range(2):
        port = free_port()
        proc = subprocess.Popen(
            function_command("predict", port),
            env=subprocess_env(**env, MODEL_NAME="shapes"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append((proc, f"http://127.0.0.1:{port}"))
    for proc, base in procs:
        wait_http(base + "/healthz", proc)
    yield procs
    for proc, _ in procs:
        proc.terminate()
        proc.wait(10)


def test_rate_limit_holds_across_replicas_and_usage_counts_every_request(serve_function, generate, run, predict_pair):
    pair = generate("--rate", "5/min", "--label", "metered")
    headers = bearer(serve_function("token"), pair)
    replies = [
        requests.get(f"{predict_pair[i % 2][1]}/models/shapes.json", headers=headers, timeout=10) for i in range(7)
    ]
    assert [r.status_code for r in replies] == [200] * 5 + [429] * 2
    assert [r.headers["RateLimit-Remaining"] for r in replies] == ["4", "3", "2", "1", "0", "0", "0"]
    assert {r.headers["RateLimit-Limit"] for r in replies} == {"5"}
    resets = [int(r.headers["RateLimit-Reset"]) for r in replies]
    assert all(1 <= reset <= 60 for reset in resets) and resets == sorted(resets, reverse=True)
    assert replies[-1].headers["Retry-After"] == replies[-1].headers["RateLimit-Reset"]
    assert "rate limit" in replies[-1].json()["error"]

    # Usage: the counts reach Redis within about a second...
    def usage():
        return [
            (r["model"], r["requests"], r["errors"], r["label"])
            for r in json.loads(run("--usage", pair["public_key"], "--json").stdout)
        ]

    deadline = time.monotonic() + 10
    while usage() != [("shapes", 7, 2, "metered")] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert usage() == [("shapes", 7, 2, "metered")]
    assert "ago)" in run("-l").stdout.splitlines()[1]  # last use
    # ...and what is still pending when a process stops is written as it exits.
    requests.get(f"{predict_pair[1][1]}/models/shapes.json", headers=headers, timeout=10)
    for proc, _ in predict_pair:
        proc.terminate()
        proc.wait(10)
    assert usage() == [("shapes", 8, 3, "metered")]
