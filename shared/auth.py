"""API keys and bearer tokens, stored in Redis under ``settings.prefix``.

Layout (``P`` is the prefix; everything Thalamus writes is under it, so purge finds it all):

- ``P key:<pk>``: hash ``secret`` (scrypt hash with salt and parameters), during a rotation's
  grace ``old_secret`` and ``old_until``, ``scopes`` (JSON list of model names, empty for all),
  ``label``, ``created``, ``expires`` (epoch seconds, empty for never), ``rate``
  (``limit/window seconds``, empty for unlimited);
- ``P token:<sha256 of token>``: hash ``pk``, expiring with the token (Redis's own, millisecond
  expiry is the token's life). A token holds no rights of its own: every request reads its key's
  scopes, expiry and rate in the same script;
- ``P key-tokens:<pk>``: sorted set of that key's token hashes scored by expiry (revocation);
- ``P rate:<pk>``: requests in the key's current rate window, expiring with the window;
- ``P fail:addr:<address>``, ``P fail:key:<pk>``, ``P fail:key-addr:<pk>:<address>``: failed
  token requests (brute-force limits);
- ``P usage:<pk>:<YYYY-MM-DD>``: hash ``r:<model>``, ``e:<model>``, ``t:<model>`` (requests,
  errors, last use), kept :data:`~shared.usage.USAGE_DAYS` days; ``P last-used``: hash pk → last
  use (both written by :mod:`shared.usage`);
- ``P audit``: stream of key events (action, public_key, user, host, detail), capped;
- ``P purged``: when the last purge ended (its counts may still arrive: they are dropped).

Issuing, authenticating, rotating, editing and revoking are Lua scripts, so a token can never
carry more rights than its key has at the moment it is used.
"""

from __future__ import annotations

import base64
import functools
import getpass
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any, cast

from shared import metrics, store
from shared.config import Rate, Settings
from shared.errors import BadRequest, Forbidden, InvalidCredentials, TooManyRequests, Unauthorized, UnknownKey
from shared.tokencache import PROPAGATION_SECONDS, TokenCache
from shared.usage import USAGE_DAYS, UsageRecorder

log = logging.getLogger("thalamus")

# fullmatch only: "$" would also match before a trailing newline.
PUBLIC_KEY_RE = re.compile(r"pk_[A-Za-z0-9_-]{43}")
SECRET_KEY_RE = re.compile(r"sk_[A-Za-z0-9_-]{43}")
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")
MODEL_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

# scrypt cost: N=2^14, r=8, p=1 uses 16 MiB and about 40-50 ms on one core here (see README).
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 1 << 14, 8, 1, 32
AUDIT_MAX_ENTRIES = 10_000  # the audit stream is trimmed to about this many events

# Appends an audit event (the stream entry's ID is its time) unless no user is given.
AUDIT_LUA = f"""
local function audit(stream, user, host, action, pk, detail, call)
  if user == '' then return end
  (call or redis.call)('XADD', stream, 'MAXLEN', '~', {AUDIT_MAX_ENTRIES}, '*', 'action', action,
                       'public_key', pk, 'user', user, 'host', host, 'detail', detail)
end
local function note_expiry(key, stream, host, pk, expires)
  -- Noted once, if Redis takes writes: a full Redis (maxmemory) or a read-only one (a replica,
  -- as in a failover) refuses them, and the expired key's token still gets its 401, not a 503.
  if redis.call('HEXISTS', key, 'expiry_noted') == 0 and redis.pcall('HSETNX', key, 'expiry_noted', '1') == 1 then
    audit(stream, '-', host, 'expired', pk, 'expiry reached at ' .. expires, redis.pcall)
  end
end
"""

# KEYS: key, token, key-tokens, audit. ARGV: pk, the stored hash the secret matched, now,
# token ttl, token digest, host. → {1, ttl, scopes} | {0} gone or secret rotated | {-1} expired
_ISSUE = (
    AUDIT_LUA
    + """
local k = redis.call('HMGET', KEYS[1], 'secret', 'old_secret', 'old_until', 'expires', 'scopes')
local now = tonumber(ARGV[3])
if not k[1] then return {0} end
local old = k[2] and k[2] == ARGV[2] and tonumber(k[3] or '0') > now
if k[1] ~= ARGV[2] and not old then return {0} end
local ttl = tonumber(ARGV[4])
if k[4] and k[4] ~= '' then
  local left = tonumber(k[4]) - now
  if left <= 0 then note_expiry(KEYS[1], KEYS[4], ARGV[6], ARGV[1], k[4]); return {-1} end
  if left < ttl then ttl = left end
end
redis.call('HSET', KEYS[2], 'pk', ARGV[1])
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
-- now is whole seconds, the token's clock starts inside this script: one second to spare.
redis.call('ZADD', KEYS[3], now + ttl + 1, ARGV[5])
if redis.call('TTL', KEYS[3]) < ttl then redis.call('EXPIRE', KEYS[3], ttl) end
return {1, ttl, k[5] or ''}
"""
)

# KEYS: token, audit. ARGV: prefix, now, model ('' = none), host.
# → {0} invalid | {1, pk, scopes} forbidden | {2, pk, scopes, left[, limit, count, pttl]} ok
#   | {3, pk, scopes, left, limit, count, pttl} over the key's rate
_AUTHENTICATE = (
    AUDIT_LUA
    + """
local t = redis.call('HMGET', KEYS[1], 'pk')
if not t[1] then return {0} end
local now = tonumber(ARGV[2])
local key = ARGV[1] .. 'key:' .. t[1]
local k = redis.call('HMGET', key, 'created', 'scopes', 'expires', 'rate')
if not k[1] then return {0} end
local exp = now + math.floor(redis.call('PTTL', KEYS[1]) / 1000)
if k[3] and k[3] ~= '' then
  if tonumber(k[3]) <= now then note_expiry(key, KEYS[2], ARGV[4], t[1], k[3]); return {0} end
  exp = math.min(exp, tonumber(k[3]))
end
local scopes = k[2] or ''
if ARGV[3] ~= '' and scopes ~= '' then
  local allowed = false
  for _, name in ipairs(cjson.decode(scopes)) do
    if name == ARGV[3] then allowed = true end
  end
  if not allowed then return {1, t[1], scopes} end
end
if not k[4] or k[4] == '' then return {2, t[1], scopes, exp - now} end
local limit, window = string.match(k[4], '^(%d+)/(%d+)$')
local counter = ARGV[1] .. 'rate:' .. t[1]
local count = redis.call('INCR', counter)
local pttl = redis.call('PTTL', counter)
if pttl < 0 then
  pttl = tonumber(window) * 1000
  redis.call('PEXPIRE', counter, pttl)
end
local code = 2
if count > tonumber(limit) then code = 3 end
return {code, t[1], scopes, exp - now, tonumber(limit), count, pttl}
"""
)

# KEYS: key, key-tokens, rate counter, audit. ARGV: token prefix, user, host, pk, last-used hash.
# → number of tokens killed, or -1 for no such key
_REVOKE = (
    AUDIT_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local hashes = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, h in ipairs(hashes) do redis.call('DEL', ARGV[1] .. h) end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HDEL', ARGV[5], ARGV[4])
audit(KEYS[4], ARGV[2], ARGV[3], 'revoke', ARGV[4], #hashes .. ' live token(s) invalidated')
return #hashes
"""
)

# KEYS: failure counters. ARGV: window (seconds). One script, so a counter never lives without
# its expiry (a window that starts with the first failure; one that somehow has none gets one).
_RECORD_FAILURE = """
for _, name in ipairs(KEYS) do
  redis.call('INCR', name)
  if redis.call('TTL', name) < 0 then redis.call('EXPIRE', name, ARGV[1]) end
end
"""


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """Salted scrypt hash of ``secret``, encoded with its parameters: ``scrypt$N$r$p$salt$hash``.

    ``salt`` defaults to 16 fresh random bytes.
    """
    import scrypt  # noqa: PLC0415 (as in matching_hash)

    salt = salt or secrets.token_bytes(16)
    digest = scrypt.hash(secret.encode(), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def salt_of(encoded: str) -> bytes | None:
    """The salt inside an encoded hash (None when it is not one of ours)."""
    try:
        return base64.urlsafe_b64decode(encoded.split("$")[4])
    except (IndexError, ValueError):
        return None


def matching_hash(secret: str, hashes: list[str]) -> str | None:
    """The first of ``hashes`` that ``secret`` matches, or None; constant-time compares.

    Hashes that share salt and parameters (a rotation with a grace period keeps the salt) cost
    one scrypt run together, so an old secret during its grace costs no more than the new one.
    """
    # Imported here, not at the top: only token issuance and keys.py hash secrets, so a predict
    # function never loads it (3 MB resident and 4 ms of its cold start).
    import scrypt  # noqa: PLC0415

    digests: dict[tuple[str, ...], bytes] = {}
    found = None
    for encoded in hashes:
        try:
            scheme, n, r, p, salt, digest = encoded.split("$")
            expected = base64.urlsafe_b64decode(digest)
            params = (scheme, n, r, p, salt, str(len(expected)))
            if params not in digests:
                digests[params] = scrypt.hash(
                    secret.encode(), base64.urlsafe_b64decode(salt), int(n), int(r), int(p), len(expected)
                )
        except (ValueError, scrypt.error):
            continue
        if scheme == "scrypt" and hmac.compare_digest(digests[params], expected) and found is None:
            found = encoded
    return found


def check_secret(secret: str, encoded: str) -> bool:
    """True when ``secret`` matches ``encoded`` (from :func:`hash_secret`); constant-time compare."""
    return matching_hash(secret, [encoded]) is not None


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the public key is unknown, so that answer takes as long as a wrong
    secret. Made on first use: computing it at import would add a scrypt run to every cold start."""
    return hash_secret(secrets.token_urlsafe(32))


def token_digest(token: str) -> str:
    """SHA-256 hex of a bearer token: the only form in which tokens are stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(text: str | None) -> list[str] | None:
    """``"a,b"`` → ``["a", "b"]``; None or ``*`` → None (all models). Bad names, or none (an
    empty list must not widen a key to every model) → BadRequest."""
    if text is None or text.strip() == "*":
        return None
    names = sorted({name.strip() for name in text.split(",") if name.strip()})
    if not names:
        raise BadRequest(f"no model named in {text!r}; give model names, or '*' for every model")
    bad = [name for name in names if not MODEL_NAME_RE.fullmatch(name)]
    if bad:
        raise BadRequest(f"invalid model name(s): {', '.join(bad)} (use lowercase letters, digits, -)")
    return names


def scopes_field(scopes: list[str] | None) -> str:
    """How a key record stores ``scopes``: a JSON list of model names, empty for all models."""
    return json.dumps(scopes) if scopes else ""


def parse_scopes_field(text: str | None) -> list[str] | None:
    """The inverse of :func:`scopes_field`."""
    return json.loads(text) if text else None


def rate_field(rate: Rate | None) -> str:
    """How a key record stores ``rate``: ``limit/window`` in seconds, empty for unlimited."""
    return f"{rate.limit}/{rate.window}" if rate else ""


def parse_rate_field(text: str | None) -> Rate | None:
    """The inverse of :func:`rate_field`."""
    if not text:
        return None
    limit, _, window = text.partition("/")
    return Rate(int(limit), int(window))


@dataclass(frozen=True)
class Actor:
    """Who changes keys, as the audit stream records it: the OS user and host running keys.py."""

    user: str
    host: str

    @classmethod
    def here(cls) -> Actor:
        """This process's OS user and host."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry for this uid (containers)
            user = f"uid {os.getuid()}"
        return cls(user, socket.gethostname())


@dataclass(frozen=True)
class Keypair:
    public_key: str
    secret_key: str = field(repr=False)

    @classmethod
    def new(cls, public_key: str | None = None) -> Keypair:
        """A random keypair; a new secret for ``public_key`` when one is given."""
        return cls(public_key or "pk_" + secrets.token_urlsafe(32), "sk_" + secrets.token_urlsafe(32))


@dataclass(frozen=True)
class KeyInfo:
    public_key: str
    label: str
    scopes: list[str] | None
    created: int
    live_tokens: int
    expires: int | None = None
    rate: Rate | None = None
    last_used: int | None = None

    def expired(self, now: float | None = None) -> bool:
        """True when the key's expiry has passed."""
        return self.expires is not None and self.expires <= (time.time() if now is None else now)


@dataclass(frozen=True)
class Session:
    """What a valid bearer token stands for."""

    public_key: str
    scopes: list[str] | None
    expires_in: int
    # Headers every answer to this session carries (the key's RateLimit-* fields when it has a rate).
    headers: dict[str, str] = field(default_factory=dict)

    def allows(self, model: str) -> bool:
        """True when this session's key may call ``model``."""
        return self.scopes is None or model in self.scopes


@dataclass(frozen=True)
class IssuedToken:
    token: str = field(repr=False)
    ttl: int
    session: Session


class AuthStore:
    """Keys, tokens, limits and usage in one Redis, under one prefix.

    Every method that talks to Redis raises ServiceUnavailable when Redis is unreachable, except
    :meth:`record_request`, which never raises. Changes to keys are written to the audit stream
    when an ``actor`` is given (keys.py gives one).
    """

    def __init__(
        self,
        settings: Settings,
        actor: Actor | None = None,
        token_cache: bool = False,
    ) -> None:
        """``token_cache``: answer bearer checks from a :class:`~shared.tokencache.TokenCache`
        that Redis keeps current (the predict functions' hot path) when ``TOKEN_CACHE`` allows."""
        self.settings = settings
        self.redis = store.connect(settings)
        self.actor = actor
        self.token_cache = TokenCache(self.redis, settings.prefix) if token_cache and settings.token_cache else None
        self._host = socket.gethostname()
        self._issue = self.redis.register_script(_ISSUE)
        self._authenticate = self.redis.register_script(_AUTHENTICATE)
        self._revoke = self.redis.register_script(_REVOKE)
        self._record_failure = self.redis.register_script(_RECORD_FAILURE)
        # A client of its own: a flush never takes the pool slot a request is waiting for
        # (REDIS_URL's ?max_connections= caps each pool, and the pool does not wait for a slot).
        self.usage = UsageRecorder(store.connect(settings), settings.prefix)

    def _k(self, *parts: str) -> str:
        return self.settings.prefix + ":".join(parts)

    def _actor_args(self) -> list[str]:
        return [self.actor.user, self.actor.host] if self.actor else ["", ""]

    def _glob(self, pattern: str) -> str:
        # The prefix is literal text; escape glob metacharacters so SCAN matches only it.
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.settings.prefix) + pattern

    # -- keys ------------------------------------------------------------------------------

    @store.unavailable_when_down
    def create_key(
        self,
        scopes: list[str] | None = None,
        label: str = "",
        *,
        expires: int | None = None,
        rate: Rate | None = None,
        pair: Keypair | None = None,
    ) -> Keypair:
        """Create and store a new keypair; the secret is returned once and stored only hashed.

        ``expires``: epoch seconds after which the key stops working; ``rate``: its request rate;
        ``pair``: the keypair to store (keys.py saves it to its file first), else a new one.
        """
        pair = pair or Keypair.new()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self._k("key", pair.public_key),
            mapping={
                "secret": hash_secret(pair.secret_key),
                "scopes": scopes_field(scopes),
                "label": label,
                "created": int(time.time()),
                "expires": "" if expires is None else int(expires),
                "rate": rate_field(rate),
            },
        )
        detail = describe_key(scopes, label, expires, rate)
        self._audit(pipe, "create", pair.public_key, detail)
        pipe.execute()
        return pair

    def _audit(self, pipe: Any, action: str, public_key: str, detail: str) -> None:
        if self.actor is not None:
            pipe.xadd(
                self._k("audit"),
                {
                    "action": action,
                    "public_key": public_key,
                    "user": self.actor.user,
                    "host": self.actor.host,
                    "detail": detail,
                },
                maxlen=AUDIT_MAX_ENTRIES,
                approximate=True,
            )

    @store.unavailable_when_down
    def revoke_key(self, public_key: str) -> int:
        """Delete the key and every live token issued for it; return how many tokens died.

        Raises UnknownKey when there is no such key.
        """
        killed = self._revoke(
            keys=[
                self._k("key", public_key),
                self._k("key-tokens", public_key),
                self._k("rate", public_key),
                self._k("audit"),
            ],
            args=[self._k("token", ""), *self._actor_args(), public_key, self._k("last-used")],
        )
        if killed < 0:
            raise UnknownKey(f"no such key: {public_key}")
        return int(killed)

    @store.unavailable_when_down
    def list_keys(self) -> list[KeyInfo]:
        """Every key under the prefix, oldest first (never secrets)."""
        names = sorted(self.redis.scan_iter(match=self._glob("key:*"), count=500))
        pipe = self.redis.pipeline(transaction=False)
        now = time.time()
        for name in names:
            pipe.hmget(name, "label", "scopes", "created", "expires", "rate")
            pipe.zcount(self._k("key-tokens", name.rsplit(":", 1)[1]), now, "+inf")
        pipe.hgetall(self._k("last-used"))
        *replies, last_used = pipe.execute()
        keys = []
        for name, fields, live in zip(names, replies[::2], replies[1::2], strict=True):
            label, scopes, created, expires, rate = fields
            public_key = name.rsplit(":", 1)[1]
            if expires and int(expires) <= now:
                live = 0  # an expired key's tokens are refused: none of them is live
            used = last_used.get(public_key)
            keys.append(
                KeyInfo(
                    public_key,
                    label or "",
                    parse_scopes_field(scopes),
                    int(created or 0),
                    int(live),
                    int(expires) if expires else None,
                    parse_rate_field(rate),
                    int(used) if used else None,
                )
            )
        return sorted(keys, key=lambda k: (k.created, k.public_key))

    @store.unavailable_when_down
    def purge(self) -> int:
        """Delete every key, token, counter, usage record and audit event under the prefix, and
        nothing else; with an actor, the purge itself then starts a new audit stream. Usage that
        functions still hold for the purged keys is dropped when it arrives (``P purged``)."""
        deleted = 0
        batch: list[str] = []
        for name in self.redis.scan_iter(match=self._glob("*"), count=1000):
            batch.append(name)
            if len(batch) >= 500:
                deleted += self.redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += self.redis.unlink(*batch)
        pipe = self.redis.pipeline(transaction=False)
        # Functions hold up to a flush interval of counts (an outage's worth while Redis is down),
        # and a token they know works until the push reaches them: those counts, flushed later,
        # must not bring the purged keys back (the flush drops counts last used by this time).
        until = math.ceil(time.time() + PROPAGATION_SECONDS)
        pipe.set(self._k("purged"), until, ex=(USAGE_DAYS + 1) * 86400)
        self._audit(pipe, "purge", "-", f"{deleted} Redis key(s) deleted")
        pipe.execute()
        return deleted

    # -- tokens ----------------------------------------------------------------------------

    @store.unavailable_when_down
    def issue_token(self, public_key: str, secret_key: str, client_addr: str) -> IssuedToken:
        """Exchange a keypair for a bearer token, living at most until the key expires.

        Wrong, unknown, revoked and expired keys raise the same InvalidCredentials after the same
        scrypt work. A client address that failed too often, or that failed on a key under
        attack, gets TooManyRequests (see :meth:`_limit_and_read`).
        """
        if not PUBLIC_KEY_RE.fullmatch(public_key) or not SECRET_KEY_RE.fullmatch(secret_key):
            raise BadRequest("public_key must be pk_ + 43 characters, secret_key sk_ + 43 characters")
        counters = [
            self._k("fail", "addr", client_addr),
            self._k("fail", "key", public_key),
            self._k("fail", "key-addr", public_key, client_addr),
        ]
        secret, old_secret, old_until = self._limit_and_read(counters, public_key)
        now = int(time.time())
        candidates = [secret or _dummy_hash()]
        if secret and old_secret and int(old_until or 0) > now:
            candidates.append(old_secret)  # shares the salt: no second scrypt run
        matched = matching_hash(secret_key, candidates)
        if matched is None or secret is None:
            self._record_failure(keys=counters, args=[self.settings.auth_failure_window])
            raise InvalidCredentials()
        token = secrets.token_urlsafe(32)
        reply = self._issue(
            keys=[
                self._k("key", public_key),
                self._k("token", token_digest(token)),
                self._k("key-tokens", public_key),
                self._k("audit"),
            ],
            # The time again: the scrypt run took a while.
            args=[public_key, matched, int(time.time()), self.settings.token_ttl, token_digest(token), self._host],
        )
        if reply[0] != 1:  # revoked, rotated or expired: the same answer as a wrong secret
            raise InvalidCredentials()
        ttl, scopes = int(reply[1]), reply[2]
        return IssuedToken(token, ttl, Session(public_key, parse_scopes_field(scopes), ttl))

    def authenticate(self, authorization: str | None, model: str | None = None) -> Session:
        """The session of an ``Authorization: Bearer <token>`` header value, allowed to call
        ``model`` when one is named: Unauthorized (missing, malformed, unknown or expired token,
        revoked or expired key), Forbidden (the key's scopes exclude ``model``) or
        TooManyRequests (the key's rate is used up) otherwise. One Redis round trip, or none
        for a token in the token cache."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            metrics.AUTH_FAILURES.labels("missing").inc()
            raise Unauthorized("missing bearer token; send Authorization: Bearer <token>")
        return self.verify_token(token.strip(), model)

    @store.unavailable_when_down
    def verify_token(self, token: str, model: str | None = None) -> Session:
        """The session a bearer token stands for (see :meth:`authenticate`)."""
        if not TOKEN_RE.fullmatch(token):
            metrics.AUTH_FAILURES.labels("invalid").inc()
            raise Unauthorized()
        digest = token_digest(token)
        if self.token_cache is not None and (cached := self.token_cache.lookup(digest, model)) is not None:
            left = cached.dies_at - time.monotonic()
            if cached.key_expires is not None:
                left = min(left, cached.key_expires - time.time())
            return Session(cached.public_key, cached.scopes, int(left))
        reply = self._authenticate(
            keys=[self._k("token", digest), self._k("audit")],
            args=[self.settings.prefix, int(time.time()), model or "", self._host],
        )
        if reply[0] == 0:  # unknown or expired token, revoked or expired key
            metrics.AUTH_FAILURES.labels("invalid").inc()
            raise Unauthorized()
        public_key, scopes = reply[1], parse_scopes_field(reply[2])
        if reply[0] == 1:
            metrics.AUTH_FAILURES.labels("forbidden").inc()
            self.usage.add(public_key, model, error=True)  # a key probing models it may not call shows
            forbidden = Forbidden(f"this key may not call model {model}")
            forbidden.public_key = public_key
            raise forbidden
        headers = {}
        if len(reply) > 4:
            limit, count, pttl = int(reply[4]), int(reply[5]), int(reply[6])
            reset = max(1, math.ceil(pttl / 1000))
            headers = {
                "RateLimit-Limit": str(limit),
                "RateLimit-Remaining": str(max(0, limit - count)),
                "RateLimit-Reset": str(reset),
            }
            if reply[0] == 3:
                metrics.AUTH_FAILURES.labels("rate_limited").inc()
                self.usage.add(public_key, model, error=True)
                limited = TooManyRequests(
                    reset, f"this key's rate limit ({limit} requests) is used up; retry in {reset} s", headers
                )
                limited.public_key = public_key
                raise limited
        elif self.token_cache is not None:  # no rate: later checks of this token need no round trip
            self.token_cache.fill(digest, public_key)
        return Session(public_key, scopes, int(reply[3]), headers)

    def record_request(self, session: Session, model: str | None, status: int) -> None:
        """Count one answered authenticated request for the key's usage (in this process; added
        to Redis in the background). Never raises, never waits for Redis."""
        self.usage.add(session.public_key, model, error=status >= 400)

    # -- brute-force limits ----------------------------------------------------------------

    def _limit_and_read(self, counters: list[str], public_key: str) -> list[str | None]:
        """Refuse a client that is limited, else the key's secret, old secret and its deadline;
        one round trip.

        ``counters`` are the failures of this address (any key), of this key (any address) and
        of this key from this address. An address with too many failures is refused. A key with
        too many failures is under attack: addresses that failed on it are refused, which slows
        guessing down to one try per address per window, while its owner, whose address has not
        failed, keeps getting tokens.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget(counters)
        for name in counters:
            pipe.ttl(name)
        pipe.hmget(self._k("key", public_key), "secret", "old_secret", "old_until")
        counts, *ttls, stored = pipe.execute()
        addr, key, key_addr = (int(count or 0) for count in counts)
        limit = self.settings.auth_max_failures
        if addr >= limit:
            raise TooManyRequests(max(1, ttls[0]))
        if key >= limit and key_addr >= 1:
            raise TooManyRequests(max(1, min(ttls[1], ttls[2])))
        return cast("list[str | None]", stored)


def utc(epoch: float | None) -> str:
    """``epoch`` as an ISO 8601 UTC time, ``never`` for None."""
    return "never" if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def describe_key(scopes: list[str] | None, label: str, expires: int | None, rate: Rate | None) -> str:
    """A key's settings in one line, for the audit stream (never its secret)."""
    models = ",".join(scopes) if scopes else "*"
    return f"models={models} label={label!r} expires={utc(expires)} rate={rate or 'unlimited'}"
