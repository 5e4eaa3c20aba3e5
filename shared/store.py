"""The Redis connection every function and the CLI share.

Timeouts are short and retries few on purpose: when Redis is down a request must fail with
503 within about two seconds, and the pool reconnects by itself once Redis is back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
    parsed = redis.connection.parse_url(url)
    if not parsed.get("password"):
        return url
    return url.replace(parsed["password"], "***", 1)


@contextmanager
def unavailable_as_503(settings: Settings) -> Iterator[None]:
    """Turn Redis connection failures inside the block into :class:`ServiceUnavailable`."""
    try:
        yield
    except REDIS_DOWN:
        raise ServiceUnavailable(f"Redis unreachable at {describe(settings.redis_url)}") from None
