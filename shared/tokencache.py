"""Bearer checks without a Redis round trip: this process's copy of the tokens and keys it has
seen, which Redis itself keeps true (RESP3 client-side caching, ``CLIENT TRACKING``).

Every entry is read on one connection of its own that has tracking on, so Redis remembers
which keys this process holds and, as soon as a script or command changes or deletes one (a
revocation, a key edited, a rotation, a token or key expiring, a purge, ``FLUSHALL``), pushes
an invalidation on that connection. Before using an entry, a check reads whatever has arrived
(a poll, no round trip), and:

- a connection that breaks, closes or reconnects drops every entry (its invalidations may be
  lost);
- entries are used only while the last command this process *sent* on the connection (a fill or
  a ``PING``) went out less than :data:`CHECK_SECONDS` ago and has been answered: Redis wrote
  every invalidation of a change made before that command ahead of its answer, so such a change
  has been applied. Past that, a ``PING`` goes out first, and an answer later than
  :data:`PING_TIMEOUT` drops every entry. No entry is so used more than :data:`CHECK_SECONDS`
  after a change, however late its invalidation travels: ``keys.py`` waits
  :data:`PROPAGATION_SECONDS` after a change before it returns;
- an entry is used for :data:`MAX_AGE_SECONDS` at most, then read again: what tracking cannot
  see (``SWAPDB`` sends no invalidation) lasts no longer than that;
- only the common answer is given from here: a live token of a key that exists, has not
  expired, has no rate (a rate's counter lives in Redis) and may call the model. Anything else
  (unknown token, expired key, another model, a rate) takes the one-round-trip script.

Nothing here ever fails a request: any error drops the cache, and the script answers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from shared import metrics
from shared.keyrecords import narrowed, parse_scopes_field

log = logging.getLogger("thalamus.auth")

CHECK_SECONDS = 1.0  # a tracking connection silent this long is PINGed before an entry is used
PING_TIMEOUT = 0.25  # a PING unanswered this long drops the cache (the script then answers)
PROPAGATION_SECONDS = CHECK_SECONDS + PING_TIMEOUT  # after a change, no function still uses the old
MAX_AGE_SECONDS = 30.0  # an entry older than this is read again
MAX_TOKENS = 10_000  # entries held; beyond, all are dropped and refilled as tokens come back
REPEAT_SECONDS = 60.0  # fill_on_repeat: a token is kept when checked again within this long
LOCK_WAIT_SECONDS = 0.05  # a thread that cannot check the cache this fast takes the script
RETRY_SECONDS = 60.0  # after Redis refused CLIENT TRACKING (an ACL, a proxy), try again this late


@dataclass(frozen=True)
class Entry:
    """What a cached token stands for: its key, when it dies (monotonic clock), its scopes (the
    key's, narrowed to the token's own; None: every model) and the key's expiry (epoch seconds,
    None: never)."""

    public_key: str
    dies_at: float
    scopes: list[str] | None
    key_expires: int | None


class TokenCache:
    """Cached bearer tokens of one Redis and prefix (see the module's doc)."""

    def __init__(self, client: redis.Redis, prefix: str, fill_on_repeat: bool = False) -> None:
        """``fill_on_repeat``: keep a token only when it is checked again within REPEAT_SECONDS
        (filling costs a round trip of its own, which a token checked once never pays back)."""
        self._pool = client.connection_pool
        self._prefix = prefix
        self._fill_on_repeat = fill_on_repeat
        self._setup()

    def _setup(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._connection: Any = None
        # token digest → (public key, dies at, read at, the token's own scopes); public key →
        # (scopes, expires)
        self._tokens: dict[str, tuple[str, float, float, list[str] | None]] = {}
        self._keys: dict[str, tuple[list[str] | None, int | None]] = {}
        self._heard = 0.0  # when the last command since answered was sent (monotonic)
        # Redis's clock less this process's monotonic one, as the last fill read it: TIME less the
        # moment the fill was sent, never less than the truth, so an answer read late (a slow
        # link, a stalled thread) makes a key expire early here (the script then answers), never
        # late; and a step of this host's wall clock changes nothing.
        self._offset = 0.0
        self._unavailable_until = 0.0  # RESP2, or CLIENT TRACKING refused: no cache until then
        self._told: set[str] = set()
        self._seen: dict[str, float] = {}  # with fill_on_repeat: token digest → first checked (monotonic)

    def lookup(self, digest: str, model: str | None) -> Entry | None:
        """The entry for the token with ``digest`` when it can answer a request for ``model``
        on its own (see the module's doc), else None. Never raises; waits on Redis at most
        PING_TIMEOUT (a PING once a second, or the rest of a push that has begun to arrive), and
        on another thread's check at most LOCK_WAIT_SECONDS."""
        entry = None
        try:
            self._in_this_process()
            if self._lock.acquire(timeout=LOCK_WAIT_SECONDS):
                try:
                    token = self._tokens.get(digest) if self._current() else None
                    key = self._keys.get(token[0]) if token else None
                finally:
                    self._lock.release()
                now = time.monotonic()
                if token is not None and key is not None and token[1] > now and now - token[2] < MAX_AGE_SECONDS:
                    scopes, expires = narrowed(key[0], token[3]), key[1]
                    expired = expires is not None and expires <= self.now()
                    if not expired and (not model or scopes is None or model in scopes):
                        entry = Entry(token[0], token[1], scopes, expires)
        except Exception:  # a bug here must cost a round trip, not a request
            log.exception("token cache: lookup failed; dropping it")
            self._drop_safely()
            entry = None
        metrics.TOKEN_CACHE.labels("hit" if entry else "miss").inc()
        return entry

    def now(self) -> float:
        """Redis's time (epoch seconds) as the last fill read it, moved on by this process's
        monotonic clock, and never behind Redis's own: the clock the scripts judge a key's expiry
        by."""
        return time.monotonic() + self._offset

    def fill(self, digest: str, public_key: str) -> None:
        """Read the token with ``digest`` and its key on the tracking connection and keep them,
        after the script has accepted the token. Never raises: a failure only drops the cache."""
        try:
            self._in_this_process()
            if time.monotonic() < self._unavailable_until or not self._repeated(digest):
                return
            with self._lock:
                self._fill(digest, public_key)
        except Exception:  # Redis gone meanwhile, or a record the script reads but we cannot
            log.debug("token cache: cannot fill", exc_info=True)
            self._drop_safely()

    def _repeated(self, digest: str) -> bool:
        """Whether to fill now: always, or with fill_on_repeat at a token's second check within
        REPEAT_SECONDS (the first one is noted; racing threads at worst fill once more or less)."""
        if not self._fill_on_repeat:
            return True
        now = time.monotonic()
        first = self._seen.pop(digest, None)
        if first is not None and now - first <= REPEAT_SECONDS:
            return True
        if len(self._seen) >= MAX_TOKENS:
            self._seen.clear()
        self._seen[digest] = now
        return False

    def _in_this_process(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's connection and entries are not ours
            self._setup()

    def _fill(self, digest: str, public_key: str) -> None:
        token_name, key_name = f"{self._prefix}token:{digest}", f"{self._prefix}key:{public_key}"
        connection = self._connect()
        sent = time.monotonic()
        commands = [("HMGET", token_name, "pk", "scopes"), ("PTTL", token_name),
                    ("HMGET", key_name, "created", "scopes", "expires", "rate"), ("TIME",)]  # fmt: skip
        connection.send_packed_command(connection.pack_commands(commands))
        (owner, own_scopes), pttl, (created, scopes, expires, rate), (seconds, micros) = (
            connection.read_response() for _ in commands
        )
        self._heard = sent
        # A key's expiry is judged by Redis's clock, as the script judges it: this host's may be off.
        self._offset = int(seconds) + int(micros) / 1e6 - sent
        if owner != public_key or pttl <= 0 or not created or rate:
            return  # gone meanwhile, or a rate: the script answers those
        key = (parse_scopes_field(scopes), int(float(expires)) if expires else None)
        if len(self._tokens) >= MAX_TOKENS:
            self._tokens.clear()
            self._keys.clear()
        self._tokens[digest] = (public_key, sent + pttl / 1000, sent, parse_scopes_field(own_scopes))
        self._keys[public_key] = key

    def _connect(self) -> Any:
        if self._connection is not None and self._connection._sock is not None:
            return self._connection
        self._drop()
        # Not from the pool: a connection of its own, which never takes one of the pool's slots.
        connection = self._pool.connection_class(**self._pool.connection_kwargs)
        if str(connection.protocol) != "3":  # pushes need RESP3 (REDIS_URL ?protocol=2 opts out)
            self._unavailable("REDIS_URL asks for RESP2, which has no pushes")
            raise redis.ConnectionError("RESP2: no client-side caching")
        try:
            connection.connect()
            connection._parser.set_invalidation_push_handler(self._invalidate)
            connection.send_command("CLIENT", "TRACKING", "ON")
            connection.read_response()
        except BaseException as exc:
            connection.disconnect()
            if isinstance(exc, redis.ResponseError):  # an ACL or a proxy that does not allow tracking
                self._unavailable(f"Redis refused CLIENT TRACKING ({exc})")
            raise
        self._connection = connection
        return connection

    def _unavailable(self, why: str) -> None:
        self._unavailable_until = time.monotonic() + RETRY_SECONDS
        if why not in self._told:  # once per reason and process: RESP2 may be a choice
            self._told.add(why)
            log.warning("token cache off: %s; bearer checks run the auth script (retried every %.0f s)",
                        why, RETRY_SECONDS)  # fmt: skip

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
                connection.read_response(push_request=True, timeout=PING_TIMEOUT)
            if time.monotonic() - self._heard > CHECK_SECONDS:
                sent = time.monotonic()
                connection.send_command("PING")
                if connection.read_response(timeout=PING_TIMEOUT) != "PONG":  # pushes ahead are applied
                    raise redis.ConnectionError("unexpected answer to PING")
                self._heard = sent
        except (redis.RedisError, OSError, ValueError):
            self._drop()
            return False
        return True

    def _invalidate(self, message: list[Any]) -> None:
        try:
            names = message[1] if len(message) > 1 else None
            if names is None:  # FLUSHDB / FLUSHALL
                self._tokens.clear()
                self._keys.clear()
                return
            for raw in names:
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
                if name.startswith(f"{self._prefix}token:"):
                    self._tokens.pop(name[len(self._prefix) + 6 :], None)
                elif name.startswith(f"{self._prefix}key:"):
                    self._keys.pop(name[len(self._prefix) + 4 :], None)
        except Exception:  # redis-py would log and lose it: an invalidation not applied is no cache
            self._tokens.clear()
            self._keys.clear()
            raise

    def _drop(self) -> None:
        """Forget every entry and the connection: what it would have told us is lost."""
        self._tokens.clear()
        self._keys.clear()
        if self._connection is not None:
            self._connection.disconnect()
            self._connection = None

    def _drop_safely(self) -> None:
        if not self._lock.acquire(timeout=LOCK_WAIT_SECONDS):
            self._tokens, self._keys = {}, {}  # the holder's connection is dropped by its own check
            return
        try:
            self._drop()
        except Exception:
            self._tokens, self._keys, self._connection = {}, {}, None
        finally:
            self._lock.release()
