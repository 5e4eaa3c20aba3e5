"""Fixtures: a real redis-server, per-test isolation, a test client per function, real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import functions_framework
import pytest
import redis
import requests

from shared import config, local_redis, store
from shared.auth import AuthStore

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RedisServer:
    """A redis-server process the tests own: they may stop and restart it."""

    port: int
    data_dir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = local_redis.start_server(self.port, self.data_dir, persist=False)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """REDIS_URL when set, else a throw-away redis-server on a free port."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A redis-server for this test alone (for stopping it mid-test)."""
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def env(redis_url, monkeypatch) -> dict[str, str]:
    """Environment of this test: the test Redis and a prefix no other test uses."""
    values = {"REDIS_URL": redis_url, "THALAMUS_PREFIX": f"test-{uuid.uuid4().hex[:12]}:"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def auth(env) -> Iterator[AuthStore]:
    """The auth store of this test's prefix; purged afterwards."""
    settings = config.load()
    store_ = AuthStore(settings, store.connect(settings))
    yield store_
    store_.purge()


@pytest.fixture
def raw_redis(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def function_client(name: str):
    """A test client of ``functions/<name>/main.py`` built by functions-framework."""
    app = functions_framework.create_app(target="handle", source=str(ROOT / "functions" / name / "main.py"))
    return app.test_client()


@pytest.fixture
def token_client(env):
    return function_client("token")


@pytest.fixture
def keypair(auth):
    return auth.create_key()


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ with the project importable, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise TimeoutError(url)


@pytest.fixture
def serve_function(env):
    """Start ``functions-framework`` for a function over real HTTP; returns its base URL."""
    procs: list[subprocess.Popen] = []

    def start(name: str, **extra: str) -> str:
        port = free_port()
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "functions-framework"), "--target", "handle",
             "--source", str(ROOT / "functions" / name / "main.py"), "--port", str(port)],
            env=subprocess_env(**env, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", proc)
        return base

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)
