"""API keys and bearer tokens, stored in Redis under ``settings.prefix``.

Layout (``P`` is the prefix):

- ``P key:<public_key>``: hash ``secret`` (scrypt hash with salt and parameters), ``scopes``
  (JSON list of model names, empty for all models), ``label``, ``created``;
- ``P token:<sha256 of token>``: hash ``pk``, ``scopes``, ``exp``, expiring with the token;
- ``P key-tokens:<public_key>``: sorted set of that key's token hashes scored by expiry, so
  revoking a key finds every live token;
- ``P fail:key:<public_key>``, ``P fail:addr:<address>``: failed-attempt counters.

Issuing and revoking run as Lua scripts, so a token can never outlive a concurrent revocation.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import cast

import redis
import scrypt

from shared import store
from shared.config import Settings
from shared.errors import BadRequest, Forbidden, InvalidCredentials, TooManyRequests, Unauthorized, UnknownKey

PUBLIC_KEY_RE = re.compile(r"^pk_[A-Za-z0-9_-]{43}$")
SECRET_KEY_RE = re.compile(r"^sk_[A-Za-z0-9_-]{43}$")
TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
MODEL_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

# scrypt cost: N=2^14, r=8, p=1 uses 16 MiB and about 40-50 ms on one core here (see README).
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 1 << 14, 8, 1, 32

_ISSUE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local scopes = redis.call('HGET', KEYS[1], 'scopes')
redis.call('HSET', KEYS[2], 'pk', ARGV[1], 'scopes', scopes, 'exp', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[5])
if redis.call('TTL', KEYS[3]) < tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[3], ARGV[2]) end
return scopes
"""

_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local hashes = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, h in ipairs(hashes) do redis.call('DEL', ARGV[1] .. h) end
redis.call('DEL', KEYS[1], KEYS[2])
return #hashes
"""


def hash_secret(secret: str) -> str:
    """Salted scrypt hash of ``secret``, encoded with its parameters: ``scrypt$N$r$p$salt$hash``."""
    salt = secrets.token_bytes(16)
    digest = scrypt.hash(secret.encode(), salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def check_secret(secret: str, encoded: str) -> bool:
    """True when ``secret`` matches ``encoded`` (from :func:`hash_secret`); constant-time compare."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        expected = base64.urlsafe_b64decode(digest)
        actual = scrypt.hash(secret.encode(), base64.urlsafe_b64decode(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, scrypt.error):
        return False
    return scheme == "scrypt" and hmac.compare_digest(actual, expected)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the public key is unknown, so that answer takes as long as a wrong
    secret. Made on first use: computing it at import would add a scrypt run to every cold start."""
    return hash_secret(secrets.token_urlsafe(32))


def token_digest(token: str) -> str:
    """SHA-256 hex of a bearer token: the only form in which tokens are stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(text: str | None) -> list[str] | None:
    """``"a,b"`` → ``["a", "b"]``; empty or None → None (all models). Bad names → BadRequest."""
    if not text:
        return None
    names = sorted({name.strip() for name in text.split(",") if name.strip()})
    bad = [name for name in names if not MODEL_NAME_RE.match(name)]
    if bad:
        raise BadRequest(f"invalid model name(s): {', '.join(bad)} (use lowercase letters, digits, -)")
    return names or None


@dataclass(frozen=True)
class Keypair:
    public_key: str
    secret_key: str = field(repr=False)


@dataclass(frozen=True)
class KeyInfo:
    public_key: str
    label: str
    scopes: list[str] | None
    created: int
    live_tokens: int


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
    """Keys, tokens and failure counters in one Redis, under one prefix.

    Every method that talks to Redis raises ServiceUnavailable when Redis is unreachable.
    """

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = client or store.connect(settings)
        self._issue = self.redis.register_script(_ISSUE)
        self._revoke = self.redis.register_script(_REVOKE)

    def _k(self, *parts: str) -> str:
        return self.settings.prefix + ":".join(parts)

    # -- keys ------------------------------------------------------------------------------

    @store.unavailable_when_down
    def create_key(self, scopes: list[str] | None = None, label: str = "") -> Keypair:
        """Create and store a new keypair; the secret is returned once and stored only hashed."""
        pair = Keypair("pk_" + secrets.token_urlsafe(32), "sk_" + secrets.token_urlsafe(32))
        self.redis.hset(
            self._k("key", pair.public_key),
            mapping={
                "secret": hash_secret(pair.secret_key),
                "scopes": json.dumps(scopes) if scopes else "",
                "label": label,
                "created": int(time.time()),
            },
        )
        return pair

    @store.unavailable_when_down
    def revoke_key(self, public_key: str) -> int:
        """Delete the key and every live token issued for it; return how many tokens died.

        Raises UnknownKey when there is no such key.
        """
        killed = self._revoke(
            keys=[self._k("key", public_key), self._k("key-tokens", public_key)],
            args=[self._k("token", "")],
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
            pipe.hmget(name, "label", "scopes", "created")
            pipe.zcount(self._k("key-tokens", name.rsplit(":", 1)[1]), now, "+inf")
        replies = pipe.execute()
        keys = []
        for name, (label, scopes, created), live in zip(names, replies[::2], replies[1::2], strict=False):
            keys.append(
                KeyInfo(
                    name.rsplit(":", 1)[1],
                    label or "",
                    json.loads(scopes) if scopes else None,
                    int(created or 0),
                    int(live),
                )
            )
        return sorted(keys, key=lambda k: (k.created, k.public_key))

    @store.unavailable_when_down
    def purge(self) -> int:
        """Delete every key, token and counter under the prefix, and nothing else."""
        deleted = 0
        batch: list[str] = []
        for name in self.redis.scan_iter(match=self._glob("*"), count=1000):
            batch.append(name)
            if len(batch) >= 500:
                deleted += self.redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += self.redis.unlink(*batch)
        return deleted

    def _glob(self, pattern: str) -> str:
        # The prefix is literal text; escape glob metacharacters so SCAN matches only it.
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.settings.prefix) + pattern

    # -- tokens ----------------------------------------------------------------------------

    @store.unavailable_when_down
    def issue_token(self, public_key: str, secret_key: str, client_addr: str) -> IssuedToken:
        """Exchange a keypair for a bearer token.

        Wrong, unknown and revoked keys raise the same InvalidCredentials after the same scrypt
        work. Too many failures for this key or this client address raise TooManyRequests.
        """
        if not PUBLIC_KEY_RE.match(public_key) or not SECRET_KEY_RE.match(secret_key):
            raise BadRequest("public_key must be pk_ + 43 characters, secret_key sk_ + 43 characters")
        counters = [self._k("fail", "key", public_key), self._k("fail", "addr", client_addr)]
        self._refuse_when_limited(counters)
        stored = cast("str | None", self.redis.hget(self._k("key", public_key), "secret"))
        if not check_secret(secret_key, stored or _dummy_hash()) or stored is None:
            self._record_failure(counters)
            raise InvalidCredentials()
        token = secrets.token_urlsafe(32)
        now = int(time.time())
        ttl = self.settings.token_ttl
        scopes = self._issue(
            keys=[self._k("key", public_key), self._k("token", token_digest(token)), self._k("key-tokens", public_key)],
            args=[public_key, ttl, now + ttl, now, token_digest(token)],
        )
        if scopes is None:  # revoked between the secret check and now
            raise InvalidCredentials()
        return IssuedToken(token, ttl, Session(public_key, json.loads(scopes) if scopes else None, ttl))

    def authenticate(self, authorization: str | None, model: str | None = None) -> Session:
        """The session of an ``Authorization: Bearer <token>`` header value, allowed to call
        ``model`` when one is named: Unauthorized (missing, malformed, unknown or expired token)
        or Forbidden (the key's scopes exclude ``model``) otherwise."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token; send Authorization: Bearer <token>")
        session = self.verify_token(token.strip())
        if model is not None and not session.allows(model):
            raise Forbidden(f"this key may not call model {model}")
        return session

    @store.unavailable_when_down
    def verify_token(self, token: str) -> Session:
        """The session a bearer token stands for, in one Redis round trip; else Unauthorized."""
        if not TOKEN_RE.match(token):
            raise Unauthorized()
        record = cast("dict[str, str]", self.redis.hgetall(self._k("token", token_digest(token))))
        expires_in = int(record.get("exp", 0)) - int(time.time())
        if not record or expires_in <= 0:
            raise Unauthorized()
        scopes = record.get("scopes")
        return Session(record["pk"], json.loads(scopes) if scopes else None, expires_in)

    # -- brute-force limits ----------------------------------------------------------------

    def _refuse_when_limited(self, counters: list[str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.mget(counters)
        for name in counters:
            pipe.ttl(name)
        counts, *ttls = pipe.execute()
        waits = [
            ttl
            for count, ttl in zip(counts, ttls, strict=False)
            if count is not None and int(count) >= self.settings.auth_max_failures
        ]
        if waits:
            raise TooManyRequests(max(1, max(waits)))

    def _record_failure(self, counters: list[str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for name in counters:
            # A fixed window that starts with the first failure (SET NX keeps its expiry).
            pipe.set(name, 0, ex=self.settings.auth_failure_window, nx=True)
            pipe.incr(name)
        pipe.execute()

    def record_request(self, session: Session, model: str | None, status: int) -> None:
        """Note one answered authenticated request (for per-key usage); never raises."""
