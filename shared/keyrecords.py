"""A key's record as Redis stores it (its scopes and rate fields), as keys.py shows it, and who
changes it (the audit stream's actor)."""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import time
from dataclasses import dataclass

from shared.config import Rate
from shared.errors import BadRequest

# A model's name is a URL path segment, a key's scope and, on a cluster, part of its Knative
# Service's name (thalamus-NAME, whose revisions add -00001, within Kubernetes' 63 characters):
# a DNS label of at most 42 characters. "token" is the token function's.
MODEL_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?")
MODEL_NAME_RULE = "lowercase letters, digits and -, at most 42, no - at either end, not 'token'"


def is_model_name(name: str) -> bool:
    """True when ``name`` may name a model (see :data:`MODEL_NAME_RE`)."""
    return name != "token" and MODEL_NAME_RE.fullmatch(name) is not None


def parse_scopes(text: str | None) -> list[str] | None:
    """``"a,b"`` → ``["a", "b"]``; None or ``*`` → None (all models). Bad names, or none (an
    empty list must not widen a key to every model) → BadRequest."""
    if text is None or text.strip() == "*":
        return None
    names = sorted({name.strip() for name in text.split(",") if name.strip()})
    if not names:
        raise BadRequest(f"no model named in {text!r}; give model names, or '*' for every model")
    bad = [name for name in names if not is_model_name(name)]
    if bad:
        raise BadRequest(f"invalid model name(s): {', '.join(bad)} ({MODEL_NAME_RULE})")
    return names


def scopes_field(scopes: list[str] | None) -> str:
    """How a key record stores ``scopes``: a JSON list of model names, empty for all models."""
    return json.dumps(scopes) if scopes else ""


def parse_scopes_field(text: str | None) -> list[str] | None:
    """The inverse of :func:`scopes_field`."""
    return json.loads(text) if text else None


def narrowed(key_scopes: list[str] | None, token_scopes: list[str] | None) -> list[str] | None:
    """The models a token may call: its key's (None: every model), narrowed to those the token
    was issued for, when it was issued for some (as the auth script narrows them)."""
    if token_scopes is None or key_scopes is None:
        return key_scopes if token_scopes is None else token_scopes
    return [name for name in token_scopes if name in key_scopes]


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
        """This process's OS user (its user id's name, not $LOGNAME or $USER, which anyone may
        set) and host."""
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:  # no passwd entry for this uid (containers)
            user = f"uid {os.getuid()}"
        return cls(user, socket.gethostname())


@dataclass(frozen=True)
class KeyInfo:
    """A key as ``keys.py -l`` shows it (never its secret), with its live tokens and last use."""

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


def utc(epoch: float | None) -> str:
    """``epoch`` as an ISO 8601 UTC time, ``never`` for None."""
    return "never" if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def describe_key(scopes: list[str] | None, label: str, expires: int | None, rate: Rate | None) -> str:
    """A key's settings in one line, for the audit stream (never its secret)."""
    models = ",".join(scopes) if scopes else "*"
    return f"models={models} label={label!r} expires={utc(expires)} rate={rate or 'unlimited'}"
