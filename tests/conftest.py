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


# -- models and images --------------------------------------------------------------------

DEMO_MODELS = ("shapes", "arrows")


def predict_client(monkeypatch, model: str, models_dir: Path = ROOT / "models", **extra: str):
    """A test client of the predict function serving ``model``."""
    monkeypatch.setenv("MODEL_NAME", model)
    monkeypatch.setenv("MODEL_DIR", str(models_dir / model))
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    return function_client("predict")


@pytest.fixture
def shapes_client(env, monkeypatch):
    return predict_client(monkeypatch, "shapes")


@pytest.fixture
def bearer(auth):
    """Authorization headers for a fresh key allowed every model."""
    pair = auth.create_key()
    token = auth.issue_token(pair.public_key, pair.secret_key, "test").token
    return {"Authorization": f"Bearer {token}"}


def encode(image, fmt: str = "PNG", **save) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def demo_image(model: str, label: str, seed: int = 0):
    """A freshly generated demo image of ``label`` (never seen in training: other seeds)."""
    import random

    import demo_data

    return demo_data.DEMOS[model][1](random.Random(10_000 + seed), label)


# -- the whole stack, as ./start.sh runs it ------------------------------------------------

STACK_FILES = ("start.sh", "keys.py", "shared", "functions", "models", "requirements.txt")


def copy_project(target: Path) -> Path:
    """The files start.sh needs, in ``target``, sharing this checkout's .venv."""
    import shutil

    target.mkdir(parents=True)
    for name in STACK_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        else:
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(ROOT / ".venv")
    return target


def free_port_range(count: int) -> int:
    """A first port such that it and the next ``count - 1`` are free."""
    import random

    for _ in range(200):
        first = random.randint(20000, 45000)
        ports = []
        for port in range(first, first + count):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    break
            ports.append(port)
        if len(ports) == count:
            return first
    raise RuntimeError("no free port range")


def processes_under(folder: Path) -> list[int]:
    """PIDs whose command line or working directory is inside ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if str(folder) in cmdline or cwd.startswith(str(folder)):
            found.append(int(proc.name))
    return found


@dataclass
class RunningStack:
    folder: Path
    proc: subprocess.Popen
    gateway: str
    env: dict[str, str]
    output: list[str]

    def keys(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.folder / "keys.py"), *args], capture_output=True, text=True,
                              env=self.env, cwd=self.folder, timeout=60)


def start_stack(folder: Path, port: int, env: dict[str, str], wait: bool = True) -> RunningStack:
    import threading

    proc = subprocess.Popen([str(folder / "start.sh"), "--port", str(port)], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    up = threading.Event()

    def pump():
        for line in proc.stdout:
            output.append(line)
            if "Ctrl-C stops everything" in line:
                up.set()

    threading.Thread(target=pump, daemon=True).start()
    stack = RunningStack(folder, proc, f"http://127.0.0.1:{port}", env, output)
    if wait:
        deadline = time.monotonic() + 180
        while not up.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("start.sh did not come up:\n" + "".join(output))
    return stack


def stop_stack(stack: RunningStack) -> None:
    import signal

    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGTERM)
        stack.proc.wait(30)


@pytest.fixture(scope="session")
def running_stack(tmp_path_factory, redis_url) -> Iterator[RunningStack]:
    """./start.sh in a temporary copy of the project, on free ports, against the test Redis."""
    folder = copy_project(tmp_path_factory.mktemp("stack") / "thalamus")
    env = subprocess_env(REDIS_URL=redis_url, THALAMUS_PREFIX=f"test-{uuid.uuid4().hex[:12]}:")
    env.pop("PYTHONPATH")
    stack = start_stack(folder, free_port_range(2 + len(DEMO_MODELS)), env)
    yield stack
    stop_stack(stack)
