"""Fixtures: a real redis-server, per-test isolation, a client per function built from explicit
Settings, the functions over real HTTP, and the whole stack as ./start.sh runs it."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import functions_framework
import pytest
import redis
from flask.testing import FlaskClient

from functions.predict.model import Model, load_model
from functions.predict.service import create_service as create_predict_service
from functions.token.service import create_service as create_token_service
from local import ROOT
from local.helpers import DEMO_MODELS, RedisServer, free_port, free_port_range, function_command, wait_http
from shared.auth import AuthStore
from shared.config import Settings
from shared.credentials import Keypair
from shared.http import Service

# -- Redis and settings ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL when set, else a throw-away redis-server on a free port."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone (for stopping it mid-test)."""
    server = RedisServer(free_port(), tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Settings of this test: the test Redis and a prefix no other test uses."""
    return Settings(redis_url=redis_url, redis_url_is_default=False, prefix=f"test-{uuid.uuid4().hex[:12]}:")


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    """The same settings as environment variables, for processes the test starts."""
    return {"REDIS_URL": settings.redis_url, "THALAMUS_PREFIX": settings.prefix}


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``."""
    return {**os.environ, **extra}


@pytest.fixture
def auth(settings: Settings) -> Iterator[AuthStore]:
    """The auth store of this test's prefix; purged afterwards."""
    store = AuthStore(settings)
    yield store
    store.purge()


@pytest.fixture
def raw_redis(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture
def keypair(auth: AuthStore) -> Keypair:
    return auth.create_key()


@pytest.fixture
def bearer(auth: AuthStore) -> dict[str, str]:
    """Authorization headers for a fresh key allowed every model."""
    pair = auth.create_key()
    token = auth.issue_token(pair.public_key, pair.secret_key, "test").token
    return {"Authorization": f"Bearer {token}"}


# -- functions through functions-framework's test client ---------------------------------------

_LOADING: list[Service] = []


def function_client(service: Service) -> FlaskClient:
    """A test client of functions-framework's own app (``create_app``) serving ``service``.

    ``create_app`` loads a source file, not an object: the service is handed to
    ``tests/function_source.py`` through :func:`service_being_loaded` while it loads.
    """
    _LOADING.append(service)
    try:
        source = Path(__file__).with_name("function_source.py")
        app = functions_framework.create_app(target="handle", source=str(source))
    finally:
        _LOADING.pop()
    return app.test_client()


def service_being_loaded() -> Service:
    """The service :func:`function_client` is wrapping right now."""
    return _LOADING[-1]


@functools.cache
def demo_model(name: str, models_dir: Path = ROOT / "models") -> Model:
    """A bundle loaded once for the whole run, as a predict function loads it once per process."""
    return load_model(Settings(model_name=name, model_dir=models_dir / name))


def predict_client(settings: Settings, model: str, models_dir: Path = ROOT / "models", **changes: object):
    """A test client of the predict function serving ``model``, with ``changes`` to ``settings``."""
    settings = settings.replace(model_name=model, model_dir=models_dir / model, **changes)
    return function_client(create_predict_service(settings, demo_model(model, models_dir)))


@pytest.fixture
def token_client(settings: Settings) -> FlaskClient:
    return function_client(create_token_service(settings))


@pytest.fixture
def shapes_client(settings: Settings) -> FlaskClient:
    return predict_client(settings, "shapes")


# -- functions over real HTTP, and their logs: every line a server writes in the run is kept, --
# -- and checked for secrets at the end ----------------------------------------------------------

SECRET_SHAPES = {
    "a secret key": re.compile(r"sk_[A-Za-z0-9_-]{43}"),
    "a bearer token": re.compile(r"(?<![A-Za-z0-9_-])(?<!pk_)[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"),
    "a token's SHA-256": re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])"),
}


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the servers the tests start write their output. When the run ends, no line of it
    may hold anything shaped like a secret key, a bearer token or a token's hash."""
    folder = tmp_path_factory.mktemp("server-logs")
    yield folder
    leaks = [
        f"{path.name}: {what}: {line.strip()[:200]}"
        for path in sorted(folder.iterdir())
        for line in path.read_text(errors="replace").splitlines()
        for what, shape in SECRET_SHAPES.items()
        if shape.search(line)
    ]
    assert leaks == [], "secrets in server logs:\n" + "\n".join(leaks)


@pytest.fixture
def function_logs() -> dict[str, Path]:
    """The log (stdout and stderr) of each function ``serve_function`` started, by base URL."""
    return {}


@pytest.fixture
def serve_function(env: dict[str, str], log_dir: Path, function_logs: dict[str, Path]) -> Iterator[Callable[..., str]]:
    """Start a function as the images do (``python -m shared.server``); returns its base URL.
    Its output goes to a file in ``log_dir`` (see ``function_logs``), checked for secrets at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, **extra: str) -> str:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        function_logs[base] = log_dir / f"{name}-{port}.log"
        with function_logs[base].open("wb") as log:
            proc = subprocess.Popen(
                function_command(name, port),
                env=subprocess_env(**{**env, **extra}),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        wait_http(base + "/healthz", proc)
        return base

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


# -- the whole stack, as ./start.sh runs it ----------------------------------------------------

STACK_FILES = (
    "start.sh",
    "keys.py",
    "pyproject.toml",
    "demo_data.py",
    "shared",
    "local",
    "functions",
    "models",
    "requirements.txt",
)


def copy_project(target: Path) -> Path:
    """The files start.sh needs, in ``target``, sharing this checkout's .venv."""
    target.mkdir(parents=True)
    for name in STACK_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", ".*"))
        else:
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(ROOT / ".venv")
    return target


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
    proc: subprocess.Popen[str]
    gateway: str
    env: dict[str, str]
    output: list[str]

    def keys(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.folder / "keys.py"), *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.folder,
            timeout=60,
        )


def start_stack(folder: Path, port: int, env: dict[str, str], wait: bool = True) -> RunningStack:
    proc = subprocess.Popen(
        [str(folder / "start.sh"), "--port", str(port)],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    up = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
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
    if stack.proc.poll() is None:
        stack.proc.send_signal(signal.SIGTERM)
        stack.proc.wait(30)


@pytest.fixture(scope="session")
def running_stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str, log_dir: Path) -> Iterator[RunningStack]:
    """./start.sh in a temporary copy of the project, on free ports, against the test Redis."""
    folder = copy_project(tmp_path_factory.mktemp("stack") / "thalamus")
    env = subprocess_env(REDIS_URL=redis_url, THALAMUS_PREFIX=f"test-{uuid.uuid4().hex[:12]}:")
    stack = start_stack(folder, free_port_range(2 + len(DEMO_MODELS)), env)
    yield stack
    stop_stack(stack)
    (log_dir / "start.sh.log").write_text("".join(stack.output))


@contextlib.contextmanager
def fake_redis(answer: Callable[[bytes], bytes]) -> Iterator[str]:
    """A server on a free port that answers every read on a connection with ``answer(data)``."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                while data := conn.recv(65536):
                    conn.sendall(answer(data))

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        listener.close()


class RedisProxy:
    """A TCP proxy to the Redis on ``port``, at ``url``: each connection is relayed by
    ``relay(client, upstream)`` on a thread of its own (a network that misbehaves one way)."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.port = port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.port))
            except OSError:  # Redis already stopped: the test is over
                client.close()
                continue
            threading.Thread(target=self.relay, args=(client, upstream), daemon=True).start()

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()
