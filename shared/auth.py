"""API keys and bearer tokens, stored in Redis under ``settings.prefix``.

Layout (``P`` is the prefix; everything Thalamus writes is under it, so purge finds it all):

- ``P key:<pk>``: hash ``secret`` (scrypt hash with salt and parameters), during a rotation's
  grace ``old_secret`` and ``old_until``, ``scopes`` (JSON list of model names, empty for all),
  ``label``, ``created``, ``expires`` (epoch seconds, empty for never), ``rate``
  (``limit/window seconds``, empty for unlimited);
- ``P token:<sha256 of token>``: hash ``pk`` and, for a token asked for with fewer models than
  its key may call, ``scopes`` (JSON list), expiring with the token (Redis's own, millisecond
  expiry is the token's life). A token holds no rights of its own: every request reads its key's
  scopes, expiry and rate in the same script (and narrows the scopes to the token's);
- ``P key-tokens:<pk>``: sorted set of that key's token hashes scored by expiry (revocation);
- ``P rate:<pk>``: requests in the key's current rate window, expiring with the window;
- ``P fail:addr:<address>``, ``P fail:key:<pk>``, ``P fail:key-addr:<pk>:<address>``: failed
  token requests (brute-force limits);
- ``P usage:<pk>:<YYYY-MM-DD>``: hash ``r:<model>``, ``e:<model>``, ``t:<model>`` (requests,
  errors, last use), kept :data:`~shared.usage.USAGE_DAYS` days; ``P last-used``: hash pk → last
  use; ``P usage-sent:<process>``: the last usage batch a process added (all written by
  :mod:`shared.usage`);
- ``P audit``: stream of key events (action, public_key, user, host, detail), capped;
- ``P purged``: when the last purge ended (its counts may still arrive: they are dropped).

Issuing, authenticating, rotating, editing and revoking are Lua scripts
(:mod:`shared.auth_scripts`, :mod:`shared.admin`), so a token can never carry more rights than its
key has at the moment it is used.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import socket
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from shared import auth_scripts, metrics, store
from shared.auth_scripts import AUDIT_MAX_ENTRIES
from shared.config import Rate, Settings
from shared.credentials import (
    PUBLIC_KEY_RE,
    SECRET_KEY_RE,
    TOKEN_RE,
    Keypair,
    dummy_hash,
    hash_secret,
    matching_hash,
    token_digest,
)
from shared.errors import (
    BadRequest,
    InsufficientScope,
    InvalidCredentials,
    InvalidScope,
    TooManyRequests,
    Unauthorized,
    UnknownKey,
    clipped,
)
from shared.keyrecords import (
    MODEL_NAME_RULE,
    Actor,
    KeyInfo,
    describe_key,
    is_model_name,
    parse_rate_field,
    parse_scopes_field,
    rate_field,
    scopes_field,
)
from shared.tokencache import PROPAGATION_SECONDS, TokenCache
from shared.usage import USAGE_DAYS, UsageRecorder

log = logging.getLogger("thalamus")
MAX_TOKEN_SCOPES = 64  # models a token may be asked for (a token record stays under ~3 KB)


@dataclass(frozen=True)
class Session:
    """What a valid bearer token stands for."""

    public_key: str
    scopes: list[str] | None
    expires_in: int
    # Headers every answer to this session carries (the key's RateLimit-* fields when it has a rate).
    headers: dict[str, str] = field(default_factory=dict)

    def allows(self, model: str) -> bool:
        """True when this session's token may call ``model``."""
        return self.scopes is None or model in self.scopes


@dataclass(frozen=True)
class IssuedToken:
    """A bearer token just made (the only time it exists in the clear), its life, its session."""

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
        cache_on_repeat: bool = False,
    ) -> None:
        """``token_cache``: answer bearer checks from a :class:`~shared.tokencache.TokenCache`
        that Redis keeps current, when ``TOKEN_CACHE`` allows; ``cache_on_repeat``: keep only
        tokens checked twice within a minute (the token function's callers often check once)."""
        self.settings = settings
        self.redis = store.connect(settings)
        self.actor = actor
        self.token_cache = (
            TokenCache(self.redis, settings.prefix, fill_on_repeat=cache_on_repeat)
            if token_cache and settings.token_cache
            else None
        )
        self._host = socket.gethostname()
        self._issue = self.redis.register_script(auth_scripts.ISSUE)
        self._authenticate = self.redis.register_script(auth_scripts.AUTHENTICATE)
        self._revoke = self.redis.register_script(auth_scripts.REVOKE)
        self._record_failure = self.redis.register_script(auth_scripts.RECORD_FAILURE)
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
        self.pushed_out()
        return int(killed)

    def pushed_out(self) -> None:
        """Return once Redis has sent the functions' token caches (shared/tokencache.py) what the
        change just made invalidates. Redis answers a command and pushes the invalidations it
        causes in the same turn of its loop, and may write the answer first (a waking caller can
        then check a token before the push is written); it reads a command sent after that answer
        only in a later turn, so one more round trip ends after the pushes have been written (all
        but a backlog larger than a socket's buffers, which Redis writes 64 KB a turn). On one
        host a function's next check then sees the change at once; across a network the push can
        still be on its way (keys.py waits PROPAGATION_SECONDS for that)."""
        try:
            self.redis.ping()
        except redis.RedisError:  # the change is made: wait out what the caches promise without it
            time.sleep(PROPAGATION_SECONDS)

    @store.unavailable_when_down
    def redis_time(self) -> float:
        """Redis's clock, epoch seconds: the one a key's expiry, a rotation's grace and the live
        tokens are judged by (see the scripts), whatever this host's says."""
        seconds, micros = self.redis.time()
        return float(seconds + micros / 1e6)

    @store.unavailable_when_down
    def list_keys(self) -> list[KeyInfo]:
        """Every key under the prefix, oldest first (never secrets)."""
        names = sorted(self.redis.scan_iter(match=self._glob("key:*"), count=500))
        pipe = self.redis.pipeline(transaction=False)
        now = self.redis_time()
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
        # Said first, and the audit stream deleted last: a purge cut short leaves its trace.
        started = self.redis.pipeline(transaction=False)
        self._audit(started, "purge-started", "-", "deleting every key, token and record")
        started.execute()
        deleted, audit = 0, self._k("audit")
        batch: list[str] = []
        for name in self.redis.scan_iter(match=self._glob("*"), count=1000):
            if name == audit:
                continue
            batch.append(name)
            if len(batch) >= 500:
                deleted += self.redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += self.redis.unlink(*batch)
        pipe = self.redis.pipeline(transaction=False)
        pipe.unlink(audit)
        # Functions hold up to a flush interval of counts (an outage's worth while Redis is down),
        # and a token they know works until the push reaches them: those counts, flushed later,
        # must not bring the purged keys back (the flush drops counts last used by this time).
        until = math.ceil(self.redis_time() + PROPAGATION_SECONDS)  # Redis's clock, as the flush's
        pipe.set(self._k("purged"), until, ex=(USAGE_DAYS + 1) * 86400)
        self._audit(pipe, "purge", "-", f"{deleted} Redis key(s) deleted")
        pipe.execute()
        return deleted

    # -- tokens ----------------------------------------------------------------------------

    @store.unavailable_when_down
    def issue_token(
        self,
        public_key: str,
        secret_key: str,
        client_addr: str,
        scopes: list[str] | None = None,
        deployed: Collection[str] | None = None,
    ) -> IssuedToken:
        """Exchange a keypair for a bearer token, living at most until the key expires.

        ``scopes``: the models the token may call, when fewer than its key (None: the key's own);
        naming one the key may not call, or one not among ``deployed`` (the catalog's models,
        when known), raises InvalidScope. The token may then call those that its key still
        may, whatever the key's later edits.

        Wrong, unknown, revoked and expired keys raise the same InvalidCredentials after the same
        scrypt work. A client address that failed too often, or that failed on a key under
        attack, gets TooManyRequests (see :meth:`_limit_and_read`).
        """
        if not PUBLIC_KEY_RE.fullmatch(public_key) or not SECRET_KEY_RE.fullmatch(secret_key):
            raise BadRequest("public_key must be pk_ + 43 characters, secret_key sk_ + 43 characters")
        asked = None if scopes is None else sorted(set(scopes))
        if asked is not None and (not asked or not all(map(is_model_name, asked))):
            raise InvalidScope(f"scopes must be model names ({MODEL_NAME_RULE}), or none for the key's own")
        if asked is not None and len(asked) > MAX_TOKEN_SCOPES:
            # Each check of the token walks them in Redis: 4,000 made every check 60 times dearer.
            raise InvalidScope(f"a token may be asked for at most {MAX_TOKEN_SCOPES} models, or for the key's own")
        counters = [
            self._k("fail", "addr", client_addr),
            self._k("fail", "key", public_key),
            self._k("fail", "key-addr", public_key, client_addr),
        ]
        secret, old_secret, old_until, now = self._limit_and_read(counters, public_key)
        candidates = [secret or dummy_hash()]
        if secret and old_secret and int(old_until or 0) > now:  # a rotation's grace, by Redis's clock
            candidates.append(old_secret)  # shares the salt: no second scrypt run
        matched = matching_hash(secret_key, candidates)
        if matched is None or secret is None:
            self._record_failure(keys=counters, args=[self.settings.auth_failure_window])
            raise InvalidCredentials()
        if asked is not None and deployed is not None and (unknown := [m for m in asked if m not in deployed]):
            # RFC 6749 5.2: an unknown scope is invalid_scope; told, as below, once the secret was right.
            raise InvalidScope(f"no such model deployed: {clipped(', '.join(unknown), 200)}")
        token = secrets.token_urlsafe(32)
        reply = self._issue(
            keys=[
                self._k("key", public_key),
                self._k("token", token_digest(token)),
                self._k("key-tokens", public_key),
                self._k("audit"),
            ],
            args=[
                public_key,
                matched,
                self.settings.token_ttl,
                token_digest(token),
                self._host,
                self.settings.max_tokens_per_key,
                self._k("token", ""),
                scopes_field(asked),
            ],
        )
        if reply[0] == -2:  # the secret was right: the caller may learn what its key allows
            allowed = parse_scopes_field(reply[1]) or []
            beyond = sorted(set(asked or ()) - set(allowed))
            raise InvalidScope(
                f"this key may not call model(s) {', '.join(beyond)}; ask for some of {', '.join(allowed)}, "
                "or for no scope"
            )
        if reply[0] != 1:  # revoked, rotated or expired: the same answer as a wrong secret
            raise InvalidCredentials()
        ttl, granted = int(reply[1]), reply[2]
        return IssuedToken(token, ttl, Session(public_key, parse_scopes_field(granted), ttl))

    def authenticate(self, authorization: str | None, model: str | None = None, count_rate: bool = True) -> Session:
        """The session of an ``Authorization: Bearer <token>`` header value, allowed to call
        ``model`` when one is named: Unauthorized (missing, malformed, unknown or expired token,
        revoked or expired key), InsufficientScope (the token's scopes exclude ``model``) or
        TooManyRequests (the key's rate is used up) otherwise. One Redis round trip, or none
        for a token in the token cache. ``count_rate=False`` checks a request's token again
        without counting the key's rate a second time (a slow upload, once its body is in)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            metrics.AUTH_FAILURES.labels("missing").inc()
            raise Unauthorized("missing bearer token; send Authorization: Bearer <token>", token_sent=False)
        return self.verify_token(token.strip(), model, count_rate)

    @store.unavailable_when_down
    def verify_token(self, token: str, model: str | None = None, count_rate: bool = True) -> Session:
        """The session a bearer token stands for (see :meth:`authenticate`)."""
        if not TOKEN_RE.fullmatch(token):
            metrics.AUTH_FAILURES.labels("invalid").inc()
            raise Unauthorized()
        digest = token_digest(token)
        if self.token_cache is not None and (cached := self.token_cache.lookup(digest, model)) is not None:
            left = cached.dies_at - time.monotonic()
            if cached.key_expires is not None:  # whole seconds, as the script counts them
                left = min(left, cached.key_expires - int(self.token_cache.now()))
            return Session(cached.public_key, cached.scopes, int(left))
        reply = self._authenticate(
            keys=[self._k("token", digest), self._k("audit")],
            args=[self.settings.prefix, model or "", self._host, "1" if count_rate else "0"],
        )
        if reply[0] == 0:  # unknown or expired token, revoked or expired key
            metrics.AUTH_FAILURES.labels("invalid").inc()
            raise Unauthorized()
        public_key, scopes = reply[1], parse_scopes_field(reply[2])
        if reply[0] == 1:
            metrics.AUTH_FAILURES.labels("forbidden").inc()
            self.usage.add(public_key, model, error=True)  # a key probing models it may not call shows
            forbidden = InsufficientScope(model or "")
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

    def _limit_and_read(self, counters: list[str], public_key: str) -> tuple[str | None, str | None, str | None, int]:
        """Refuse a client that is limited, else the key's secret, its old secret and the end of
        that one's grace, and Redis's time (whole seconds: the clock the grace runs on, which the
        issue script checks again); one round trip.

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
        pipe.time()
        counts, *ttls, stored, (now, _) = pipe.execute()
        addr, key, key_addr = (int(count or 0) for count in counts)
        limit = self.settings.auth_max_failures
        if addr >= limit:
            raise TooManyRequests(max(1, ttls[0]))
        if key >= limit and key_addr >= 1:
            raise TooManyRequests(max(1, min(ttls[1], ttls[2])))
        secret, old_secret, old_until = cast("list[str | None]", stored)
        return secret, old_secret, old_until, int(now)
