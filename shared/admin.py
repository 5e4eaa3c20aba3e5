"""What only ``keys.py`` does to keys: edit, rotate, and read usage and the audit stream.

Functions never import this module (their images do not hold it); the request path lives in
:mod:`shared.auth`, whose Redis layout this module shares.
"""

from __future__ import annotations

import datetime
import re
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from shared import store
from shared.auth import AuthStore
from shared.auth_scripts import AUDIT_LUA
from shared.config import Rate, unit_seconds, units_error
from shared.credentials import Keypair, hash_secret, salt_of
from shared.errors import BadRequest, UnknownKey
from shared.keyrecords import KeyInfo, rate_field, scopes_field, utc

EXPIRY_DETAIL = re.compile(r"expiry reached at (\d+)")  # auth_scripts.AUDIT_LUA's note, epoch seconds


class Unchanged:
    """The value of an :meth:`KeyAdmin.edit_key` argument that is not being changed."""


UNCHANGED = Unchanged()

# KEYS: key, rate counter, audit. ARGV: user, host, detail, rate changed, expiry changed, then
# field/value pairs. → 0 for no such key, 1 done
_EDIT = (
    AUDIT_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[4] == '1' then redis.call('DEL', KEYS[2]) end
if ARGV[5] == '1' then redis.call('HDEL', KEYS[1], 'expiry_noted') end
audit(KEYS[3], ARGV[1], ARGV[2], 'edit', string.match(KEYS[1], 'key:(.*)$'), ARGV[3])
return 1
"""
)

# KEYS: key, key-tokens, audit. ARGV: new hash, grace seconds ('' = none), revoke tokens ('1'),
# token prefix, user, host, detail, the secret's hash as read before (the new one shares its
# salt). → {tokens killed, end of the grace or 0} | {-1} no such key | {-2} expired | {-3} the
# secret changed meanwhile (another rotation: the grace would go to a secret that was never handed
# out, and the original's be lost) | {-4, its end} a grace asked for while an earlier rotation's
# runs (it would end that one: two operators rotating a minute apart cut the clients still on the
# first secret off). The grace runs on Redis's clock, which the issue script reads.
_ROTATE = (
    AUDIT_LUA
    + """
local k = redis.call('HMGET', KEYS[1], 'secret', 'expires', 'old_until')
if not k[1] then return {-1} end
if k[1] ~= ARGV[8] then return {-3} end
local now = tonumber(redis.call('TIME')[1])
if k[2] and k[2] ~= '' and tonumber(k[2]) <= now then return {-2} end
if ARGV[2] ~= '' and tonumber(k[3] or '0') > now then return {-4, tonumber(k[3])} end
local old_until = 0
if ARGV[2] ~= '' then
  old_until = now + tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'old_secret', k[1], 'old_until', old_until)
else
  redis.call('HDEL', KEYS[1], 'old_secret', 'old_until')
end
redis.call('HSET', KEYS[1], 'secret', ARGV[1])
local killed = 0
if ARGV[3] == '1' then
  local hashes = redis.call('ZRANGE', KEYS[2], 0, -1)
  for _, h in ipairs(hashes) do redis.call('DEL', ARGV[4] .. h) end
  redis.call('DEL', KEYS[2])
  killed = #hashes
end
audit(KEYS[3], ARGV[5], ARGV[6], 'rotate', string.match(KEYS[1], 'key:(.*)$'), ARGV[7])
return {killed, old_until}
"""
)

# KEYS: key, audit. ARGV: host, pk. Notes "expiry reached" once for an expired key.
_NOTE_EXPIRY = (
    AUDIT_LUA
    + """
local expires = redis.call('HGET', KEYS[1], 'expires')
if expires and expires ~= '' and tonumber(expires) <= tonumber(redis.call('TIME')[1]) then
  note_expiry(KEYS[1], KEYS[2], ARGV[1], ARGV[2], expires)
end
"""
)


class Rotated(NamedTuple):
    """What a rotation did: the new keypair, how many live tokens it ended, and when the old
    secret stops working (Redis's clock; None: at once)."""

    pair: Keypair
    killed: int
    old_until: int | None


def parse_duration(text: str) -> int:
    """``"90d"``, ``"1h"``, ``"30m"``, ``"45s"`` (units :data:`~shared.config.TIME_UNITS`, as a
    rate's) → seconds; ValueError unless a positive duration."""
    match = re.fullmatch(r"\s*(-?[0-9]{1,9})\s*([a-z]+)\s*", text, re.IGNORECASE)
    unit = unit_seconds(match[2]) if match else None
    if match is None or unit is None:
        raise units_error("duration", "90d, 12h, 30m or 45s", text, match[2] if match else None)
    seconds = int(match[1]) * unit
    if seconds <= 0:
        raise ValueError(f"duration must be more than zero, got {text!r}")
    return seconds


def parse_expiry(text: str, now: float | None = None) -> int | None:
    """When a key given ``--expires text`` stops working, in epoch seconds; None for ``never``.

    ``text`` is a duration from now (``90d``), an ISO 8601 date (``2027-01-31``: midnight UTC
    starting that day) or date-time (``2027-01-31T12:00``, UTC unless it names its offset).
    ValueError when malformed or not in the future.
    """
    now = time.time() if now is None else now
    if text.strip().lower() in ("never", "none"):
        return None
    if re.fullmatch(r"\s*-?[0-9]+\s*[a-z]*\s*", text, re.IGNORECASE):
        return int(now) + parse_duration(text)
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expiry must be a duration (90d, 12h) or an ISO date (2027-01-31[T12:00]), got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    expires = int(when.timestamp())
    if expires <= now:
        raise ValueError(f"expiry {text!r} is in the past")
    return expires


@dataclass(frozen=True)
class UsageRow:
    """One key's use of one model over the days asked: a row of ``keys.py --usage``."""

    public_key: str
    label: str  # "(revoked)" when the key is gone
    model: str  # "-" for requests that name no model
    requests: int
    errors: int
    last_used: int


@dataclass(frozen=True)
class AuditEvent:
    """One change to a key, as the audit stream holds it: a row of ``keys.py --audit``."""

    time: float  # epoch seconds (the stream entry's ID)
    action: str
    public_key: str
    user: str
    host: str
    detail: str


class KeyAdmin(AuthStore):
    """The key store as an admin sees it: :class:`AuthStore` plus edit, rotate, usage and audit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._edit = self.redis.register_script(_EDIT)
        self._rotate = self.redis.register_script(_ROTATE)
        self._note_expiry = self.redis.register_script(_NOTE_EXPIRY)

    @store.unavailable_when_down
    def edit_key(
        self,
        public_key: str,
        *,
        scopes: list[str] | None | Unchanged = UNCHANGED,
        label: str | Unchanged = UNCHANGED,
        rate: Rate | None | Unchanged = UNCHANGED,
        expires: int | None | Unchanged = UNCHANGED,
    ) -> None:
        """Change what is given (None: all models, unlimited, never expires). Live tokens
        follow on their next request. UnknownKey when there is no such key."""
        fields: dict[str, str] = {}
        shown: list[str] = []
        if not isinstance(scopes, Unchanged):
            fields["scopes"] = scopes_field(scopes)
            shown.append(f"models={','.join(scopes) if scopes else '*'}")
        if not isinstance(label, Unchanged):
            fields["label"] = label
            shown.append(f"label={label!r}")
        if not isinstance(rate, Unchanged):
            fields["rate"] = rate_field(rate)
            shown.append(f"rate={rate or 'unlimited'}")
        if not isinstance(expires, Unchanged):
            fields["expires"] = "" if expires is None else str(int(expires))
            shown.append(f"expires={utc(expires)}")
        if not fields:
            raise BadRequest("nothing to change")
        done = self._edit(
            keys=[self._k("key", public_key), self._k("rate", public_key), self._k("audit")],
            args=[
                *self._actor_args(),
                " ".join(shown),
                "1" if "rate" in fields else "",
                "1" if "expires" in fields else "",
                *[item for pair in fields.items() for item in pair],
            ],
        )
        if not done:
            raise UnknownKey(f"no such key: {public_key}")
        self.pushed_out()

    @store.unavailable_when_down
    def rotate_key(
        self, public_key: str, *, grace: int = 0, revoke_tokens: bool = False, secret: str | None = None
    ) -> Rotated:
        """A new secret for ``public_key`` (scopes, label, expiry and rate kept): the old one
        stops working at once, or after ``grace`` seconds. Live tokens keep working unless
        ``revoke_tokens``. ``secret``: the new secret (keys.py saves it to its file first), else
        a random one. BadRequest, with nothing changed, when the key has expired, its secret
        changed meanwhile (a rotation at the same time), or a ``grace`` is asked for while an
        earlier rotation's grace runs (it would end that one; a rotation without one ends it)."""
        current = self.redis.hget(self._k("key", public_key), "secret")
        if current is None:
            raise UnknownKey(f"no such key: {public_key}")
        secret = secret or Keypair.new(public_key).secret_key
        # With a grace period both secrets are checked: the same salt lets one scrypt run do it.
        new_hash = hash_secret(secret, salt_of(str(current)) if grace else None)
        detail = f"grace={grace}s revoke_tokens={'yes' if revoke_tokens else 'no'}"
        killed, *until = self._rotate(
            keys=[self._k("key", public_key), self._k("key-tokens", public_key), self._k("audit")],
            args=[
                new_hash,
                str(grace) if grace else "",
                "1" if revoke_tokens else "",
                self._k("token", ""),
                *self._actor_args(),
                detail,
                current,
            ],
        )
        if killed == -1:
            raise UnknownKey(f"no such key: {public_key}")
        if killed == -3:
            raise BadRequest(f"{public_key}'s secret changed while it was being rotated (another --rotate?): "
                             "nothing was changed; run it again")  # fmt: skip
        if killed == -2:
            raise BadRequest(f"{public_key} has expired; extend it first with --edit {public_key} --expires 90d")
        if killed == -4:
            raise BadRequest(f"{public_key}'s previous secret still works until {utc(until[0])} (an earlier rotation's "
                             "grace), which a new grace would end: rotate again after then, or now without --grace "
                             "to end it too")  # fmt: skip
        self.pushed_out()
        return Rotated(Keypair(public_key, secret), int(killed), int(until[0]) or None)

    @store.unavailable_when_down
    def key(self, public_key: str) -> KeyInfo:
        """One key's description; UnknownKey when there is none."""
        for info in self.list_keys():
            if info.public_key == public_key:
                return info
        raise UnknownKey(f"no such key: {public_key}")

    @store.unavailable_when_down
    def note_expired(self, keys: list[KeyInfo]) -> None:
        """Record "expiry reached" in the audit stream for expired keys not yet noted."""
        host = self.actor.host if self.actor else ""
        now = self.redis_time()  # the script checks again: Redis's clock decides
        for info in keys:
            if info.expired(now):
                self._note_expiry(
                    keys=[self._k("key", info.public_key), self._k("audit")], args=[host, info.public_key]
                )

    @store.unavailable_when_down
    def usage_report(self, public_key: str | None = None, days: int = 30) -> list[UsageRow]:
        """Requests and errors per key and model over the last ``days`` UTC days (today
        included), with the last use; revoked keys' usage too. UnknownKey for a ``public_key``
        that has neither a key nor usage."""
        today = datetime.datetime.now(datetime.UTC).date()
        wanted = {str(today - datetime.timedelta(days=n)) for n in range(days)}
        if public_key:
            names = [self._k("usage", public_key, day) for day in sorted(wanted)]
        else:
            names = [n for n in self.redis.scan_iter(match=self._glob("usage:*"), count=1000) if n[-10:] in wanted]
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(name)
        totals: dict[tuple[str, str], list[int]] = {}
        for name, fields in zip(names, pipe.execute(), strict=True):
            owner = name[len(self.settings.prefix) + len("usage:") : -11]
            for field_name, value in fields.items():
                kind, _, model = field_name.partition(":")
                entry = totals.setdefault((owner, model), [0, 0, 0])
                slot = {"r": 0, "e": 1, "t": 2}.get(kind)
                if slot == 2:
                    entry[2] = max(entry[2], int(value))
                elif slot is not None:
                    entry[slot] += int(value)
        labels = {info.public_key: info.label for info in self.list_keys()}
        if public_key and public_key not in labels and not totals:
            raise UnknownKey(f"no such key: {public_key}")
        return [
            UsageRow(pk, labels.get(pk, "(revoked)"), model, *counts) for (pk, model), counts in sorted(totals.items())
        ]

    @store.unavailable_when_down
    def audit_log(self, since: float | None = None) -> list[AuditEvent]:
        """The audit stream's events from ``since`` (epoch seconds; None = all), oldest first."""
        start = f"{int(since * 1000)}-0" if since and since > 0 else "-"  # since before 1970: all
        entries = cast("list[tuple[str, dict[str, str]]]", self.redis.xrange(self._k("audit"), min=start))
        return [_event(entry_id, fields) for entry_id, fields in entries]


def _event(entry_id: str, fields: dict[str, str]) -> AuditEvent:
    detail = fields.get("detail", "")
    if expiry := EXPIRY_DETAIL.fullmatch(detail):  # written by a Lua script, which cannot format times
        detail = f"expiry reached at {utc(int(expiry.group(1)))}"
    return AuditEvent(
        int(entry_id.split("-")[0]) / 1000,
        fields.get("action", ""),
        fields.get("public_key", ""),
        fields.get("user", ""),
        fields.get("host", ""),
        detail,
    )
