"""The Redis connection every function and the CLI share, and what a Redis outage looks like.

Timeouts are short and retries few on purpose: when Redis is down a request must fail with
503 within about two seconds, and the pool reconnects by itself once Redis is back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.config import Settings
from shared.errors import ServiceUnavailable

# What redis-py raises when the server is unreachable, slow, or restarting.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def connect(settings: Settings) -> redis.Redis:
    """A client for ``settings.redis_url`` (``redis://`` or ``rediss://``, passwords included).

    No connection is made until the first command.
    """
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        # One retry on a fresh connection covers a pooled socket that died with a Redis restart.
        retry=Retry(NoBackoff(), 1),
        # No health_check_interval: its PING before a command doubles the wait on a hung server,
        # and the retry above already replaces a dead pooled connection.
        decode_responses=True,
    )


def describe(url: str) -> str:
    """``url`` with any password masked, safe to print or log."""
    password = urlsplit(url).password
    if not password:
        return url
    return url.replace(password, "***", 1)


class _UsesRedis(Protocol):
    settings: Settings


S = TypeVar("S", bound=_UsesRedis)
P = ParamSpec("P")
R = TypeVar("R")


def unavailable_when_down(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Decorate a method that talks to Redis: an outage becomes :class:`ServiceUnavailable`
    naming the server (password masked), which every caller answers as 503 or one CLI line."""

    @functools.wraps(method)
    def guarded(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except REDIS_DOWN:
            raise ServiceUnavailable(f"Redis unreachable at {describe(self.settings.redis_url)}") from None
        except redis.ResponseError as exc:
            # maxmemory with noeviction (knative/data/redis.yaml): writes are refused, never a
            # silently evicted key or token; reads still work. Inside a Lua script the refusal
            # arrives as a script error carrying the OOM message.
            if not isinstance(exc, redis.exceptions.OutOfMemoryError) and "OOM command not allowed" not in str(exc):
                raise
            raise ServiceUnavailable(
                f"Redis is full (maxmemory) at {describe(self.settings.redis_url)}", retry_after=30
            ) from None

    return cast(Callable[Concatenate[S, P], R], guarded)
