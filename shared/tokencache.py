"""Bearer checks without a Redis round trip: this process's copy of the tokens and keys it has
seen, which Redis itself keeps true (RESP3 client-side caching: ``CLIENT TRACKING``).

Every entry is read on one connection of its own that has tracking on, so Redis remembers
which keys this process holds and, the moment a script or command changes or deletes one
(a revocation, a key edited, a rotation, a token or key expiring, ``FLUSHALL``), pushes an
invalidation on that connection. Redis writes it before it answers the next command of anyone,
so it is on this process's socket before ``keys.py -r`` has printed its answer. Before using
an entry, a check reads whatever has arrived (a poll, no round trip), and:

- a connection that breaks, closes or reconnects drops every entry (its invalidations may be lost);
- a connection silent for :data:`CHECK_SECONDS` is asked a ``PING`` first: its answer comes after
  every invalidation Redis sent before it, and no answer drops every entry. An entry is so
  never used more than about a second after this process lost sight of Redis;
- only the common answer is given from here: a live token of a key that exists, has not expired,
  has no rate (a rate's counter lives in Redis) and may call the model. Anything else (unknown
  token, expired key, another model, a rate) takes the one-round-trip script, as without a cache.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from shared import metrics

log = logging.getLogger("thalamus.auth")

CHECK_SECONDS = 1.0  # an idle tracking connection is PINGed before an entry is trusted again
MAX_TOKENS = 10_000  # entries held; beyond, all are dropped and refilled as tokens come back
LOCK_WAIT_SECONDS = 0.05  # a thread that cannot check the cache this fast takes the script


@dataclass(frozen=True)
class Entry:
    """What a cached token stands for: its key, when it dies (monotonic clock), the key's scopes
    (None: every model) and the key's expiry (epoch seconds, None: never)."""

    public_key: str
    dies_at: float
    scopes: list[str] | None
    key_expires: int | None


class TokenCache:
    """Cached bearer tokens of one Redis and prefix (see the module's doc)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._setup()

    def _setup(self) -> None:
        self._pid = os.getpid()  # a forked worker starts with no connection and no entries
        self._lock = threading.Lock()
        self._connection: Any = None
        self._tokens: dict[str, tuple[str, float]] = {}  # token digest → (public key, dies at)
        self._keys: dict[str, tuple[list[str] | None, int | None]] = {}  # public key → (scopes, expires)
        self._heard = 0.0  # when the tracking connection last answered (monotonic)
        self._resp2 = False  # REDIS_URL asks for RESP2: no pushes, so nothing is ever cached

    def lookup(self, digest: str, model: str | None) -> Entry | None:
        """The entry for the token with ``digest`` when it can answer a request for ``model``
        on its own (see the module's doc), else None. Never raises, never waits on Redis
        longer than one PING."""
        if self._pid != os.getpid():
            self._setup()
        entry = None
        if self._lock.acquire(timeout=LOCK_WAIT_SECONDS):
            try:
                token = self._tokens.get(digest) if self._current() else None
                key = self._keys.get(token[0]) if token else None
            finally:
                self._lock.release()
            if token is not None and key is not None and token[1] > time.monotonic():
                scopes, expires = key
                expired = expires is not None and expires <= time.time()
                if not expired and (not model or scopes is None or model in scopes):
                    entry = Entry(token[0], token[1], scopes, expires)
        metrics.TOKEN_CACHE.labels("hit" if entry else "miss").inc()
        return entry

    def fill(self, digest: str, public_key: str) -> None:
        """Read the token with ``digest`` and its key on the tracking connection and keep them,
        after the script has accepted the token. Never raises: a failure only drops the cache."""
        if self._pid != os.getpid():
            self._setup()
        if self._resp2:
            return
        token_name, key_name = f"{self._prefix}token:{digest}", f"{self._prefix}key:{public_key}"
        with self._lock:
            try:
                connection = self._connect()
                sent = time.monotonic()
                commands = [("HGET", token_name, "pk"), ("PTTL", token_name), ("HMGET", key_name, "created", "scopes",
                            "expires", "rate")]  # fmt: skip
                connection.send_packed_command(connection.pack_commands(commands))
                owner, pttl, (created, scopes, expires, rate) = (connection.read_response() for _ in commands)
                self._heard = time.monotonic()
            except (redis.RedisError, OSError, ValueError):
                self._drop()
                return
            if owner != public_key or pttl <= 0 or not created or rate:
                return  # gone meanwhile, or a rate: the script answers those
            if len(self._tokens) >= MAX_TOKENS:
                self._tokens.clear()
                self._keys.clear()
            self._tokens[digest] = (public_key, sent + pttl / 1000)
            self._keys[public_key] = (json.loads(scopes) if scopes else None, int(expires) if expires else None)

    def _connect(self) -> Any:
        if self._connection is None or self._connection._sock is None:
            self._drop()
            connection: Any = self._client.connection_pool.make_connection()
            if str(connection.protocol) != "3":  # pushes need RESP3 (REDIS_URL ?protocol=2 opts out)
                self._resp2 = True
                raise redis.ConnectionError("RESP2: no client-side caching")
            connection.connect()
            connection._parser.set_invalidation_push_handler(self._invalidate)
            connection.send_command("CLIENT", "TRACKING", "ON")
            if str(connection.read_response()).upper() != "OK":
                raise redis.ConnectionError("CLIENT TRACKING refused")
            self._connection = connection
        return self._connection

    def _current(self) -> bool:
        """Apply what Redis has pushed; False (and nothing cached) when the connection is not
        known to be alive and tracking."""
        connection = self._connection
        if connection is None:
            return False
        try:
            if connection._sock is None:
                raise redis.ConnectionError("tracking connection closed")
            while connection.can_read(timeout=0):
                connection.read_response(push_request=True)
                self._heard = time.monotonic()
            if time.monotonic() - self._heard > CHECK_SECONDS:
                connection.send_command("PING")
                if connection.read_response() != "PONG":  # pushes ahead of it are applied meanwhile
                    raise redis.ConnectionError("unexpected answer to PING")
                self._heard = time.monotonic()
        except (redis.RedisError, OSError, ValueError):
            self._drop()
            return False
        return True

    def _invalidate(self, message: list[Any]) -> None:
        names = message[1] if len(message) > 1 else None
        if names is None:  # FLUSHDB / FLUSHALL
            self._tokens.clear()
            self._keys.clear()
            return
        for name in names:
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name.startswith(f"{self._prefix}token:"):
                self._tokens.pop(name[len(self._prefix) + 6 :], None)
            elif name.startswith(f"{self._prefix}key:"):
                self._keys.pop(name[len(self._prefix) + 4 :], None)

    def _drop(self) -> None:
        """Forget every entry and the connection: what it would have told us is lost."""
        self._tokens.clear()
        self._keys.clear()
        if self._connection is not None:
            self._connection.disconnect()
            self._connection = None
