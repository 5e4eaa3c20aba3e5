"""The admin and client flow over real HTTP: keys.py + a functions-framework process."""

import json

import requests

from tests.conftest import subprocess_env
from tests.test_keys import keys


def test_keys_token_session_revoke_purge(env, serve_function, tmp_path, raw_redis):
    run = lambda *args: keys(*args, env=subprocess_env(**env))  # noqa: E731
    base = serve_function("token")
    key_file = tmp_path / "client.json"
    assert run("-g", str(key_file)).returncode == 0
    pair = json.loads(key_file.read_text())

    reply = requests.post(f"{base}/token.json", json=pair, timeout=10)
    assert reply.status_code == 200
    token = reply.json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    session = requests.get(f"{base}/session.json", headers=auth, timeout=10)
    assert session.status_code == 200 and session.json()["public_key"] == pair["public_key"]

    assert run("-r", pair["public_key"]).returncode == 0
    after = requests.get(f"{base}/session.json", headers=auth, timeout=10)
    assert after.status_code == 401 and after.json()["error"]

    raw_redis.set("foreign:e2e", "stays")
    try:
        run("-g", str(tmp_path / "second.json"))
        assert run("-p").returncode == 0
        assert raw_redis.get("foreign:e2e") == "stays"
        assert list(raw_redis.scan_iter(env["THALAMUS_PREFIX"] + "*")) == []
    finally:
        raw_redis.delete("foreign:e2e")


def test_oversized_upload_is_refused_without_reading_it(serve_function):
    base = serve_function("token", MAX_UPLOAD_BYTES="1000")

    def endless():
        yield b"{"
        for _ in range(100_000):  # 6.5 GB if the server read it all
            yield b" " * 65536

    reply = requests.post(
        f"{base}/token.json", data=endless(), timeout=20, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 413 and "too large" in reply.json()["error"], reply.text
