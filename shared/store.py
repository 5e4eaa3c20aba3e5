"""The Redis connection every function and the CLI share, and what a Redis outage looks like.

Timeouts are short and retries few on purpose: when Redis is down a request must fail with
503 within about a second, and the pool reconnects by itself once Redis is back. A Redis that
hangs (accepts, then says nothing) costs one request that wait, not every request: see
:class:`Breaker`.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.retry import Retry

from shared import metrics
from shared.config import Settings
from shared.errors import OutcomeUnknown, ServiceUnavailable

log = logging.getLogger("thalamus")

# What redis-py raises when the server is unreachable, slow, or restarting.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
# Error replies that are about Redis's state, not the command: it did nothing and may do it soon.
# OOM: maxmemory with noeviction, writes refused (never a silently evicted key or token); READONLY:
# a replica, as the old primary is during a failover; MASTERDOWN: a replica that lost its primary;
# BUSY: another client's script runs too long; MISCONF: snapshots failing, writes refused;
# NOREPLICAS, TRYAGAIN, CLUSTERDOWN: replication or a cluster not ready; NOPERM: an ACL that does
# not allow this (an operator's setting). Inside a Lua script they arrive as script errors that
# carry the code; redis-py strips the code of those it has a class for.
_REFUSALS = re.compile(r"(?:^|-|: )(OOM|READONLY|MASTERDOWN|BUSY|MISCONF|NOREPLICAS|TRYAGAIN|CLUSTERDOWN|NOPERM)\b")
# Redis 6 says an ACL refusal inside a script without its code.
_ACL_IN_SCRIPT = re.compile(r"can't run this command or subcommand|can't access at least one of the keys")
_REFUSAL_CLASSES = {
    redis.exceptions.OutOfMemoryError: "OOM",
    redis.exceptions.ReadOnlyError: "READONLY",
    redis.exceptions.MasterDownError: "MASTERDOWN",
    redis.exceptions.TryAgainError: "TRYAGAIN",
    redis.exceptions.ClusterDownError: "CLUSTERDOWN",
    redis.exceptions.NoPermissionError: "NOPERM",
}


class SetupRefused(redis.ConnectionError):
    """Redis answered a new connection's setup (HELLO, AUTH, SELECT) with an error: REDIS_URL
    asks for something this server refuses. No command was sent; every one fails alike until
    the setting or the server changes, so it is an outage (503), not a bug (500)."""


class NotRedis(redis.ConnectionError):
    """What answered is not Redis (another service on REDIS_URL's port, a proxy's garbage): its
    reply could not be parsed, the connection is dropped, and every command fails alike, so it
    is an outage (503), not a bug (500)."""


# redis-py's parser on bytes that are not RESP: its own error, or Python's from int() (ValueError,
# UnicodeDecodeError among them), a short array (IndexError) or a map keyed by a list (TypeError).
UNPARSABLE = (redis.InvalidResponse, ValueError, IndexError, TypeError)
# Redis (or what stands there) answered, so the network is fine: the credentials, the db, or the
# server are not, and a second try gets the same answer.
REFUSED = (SetupRefused, redis.AuthenticationError, NotRedis)


# Per thread: how many commands went out and got no answer (they may have run all the same):
# one more during a call means its outcome is unknown (OutcomeUnknown, and no retry: _RetryUnsent).
_unanswered = threading.local()


def _unanswered_count() -> int:
    return int(getattr(_unanswered, "count", 0))


class _Timed:
    """Mixed into a redis-py connection class: each round trip (a command, a script, or a whole
    pipeline: from sending to the first reply) is observed in ``thalamus_redis_command_duration_seconds``."""

    _sent_at: float | None = None
    _connecting = False

    def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        self._connecting = True  # the handshake's commands (HELLO, CLIENT SETINFO) change nothing
        try:
            super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:  # SELECT of a database past its count, say
            raise SetupRefused(str(exc)) from None
        except redis.RedisError:
            raise
        except Exception as exc:  # redis-py's handshake on a reply of the wrong shape (+OK to HELLO)
            raise self._not_redis(exc) from None  # redis-py drops the connection only for its own errors
        finally:
            self._connecting = False

    def _not_redis(self, exc: Exception) -> NotRedis:
        """``exc``, raised on a reply that is not Redis's, as NotRedis; the connection is dropped,
        as what follows on it cannot be read either."""
        log.debug("unreadable Redis reply", exc_info=exc)
        self.disconnect()  # type: ignore[attr-defined]
        return NotRedis(f"answered something that is not Redis ({type(exc).__name__})")

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self._sent_at = time.perf_counter()
        super().send_packed_command(command, check_health)  # type: ignore[misc]

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.BusyLoadingError:
            raise  # an answer ("-LOADING"): nothing was done
        except (redis.ConnectionError, redis.TimeoutError):
            if not self._connecting:
                _unanswered.count = _unanswered_count() + 1  # sent, and no answer
            raise
        except UNPARSABLE as exc:
            if not self._connecting:  # past a good handshake: a real Redis may have run the command
                _unanswered.count = _unanswered_count() + 1
            # redis-py drops it too, except for callers that ask it not to (disconnect_on_error=False).
            raise self._not_redis(exc) from None
        finally:
            if self._sent_at is not None:
                metrics.REDIS_SECONDS.observe(time.perf_counter() - self._sent_at)
                self._sent_at = None


_TimedConnection = type("TimedConnection", (_Timed, redis.Connection), {})
_TIMED = {
    "rediss": type("TimedSSLConnection", (_Timed, redis.SSLConnection), {}),
    "unix": type("TimedUnixConnection", (_Timed, redis.UnixDomainSocketConnection), {}),
}


class _RetryUnsent(Retry):
    """One retry, on a fresh connection, of a command that never went out (the connection
    refused or reset while it was made or sent; a pooled connection that Redis closed is
    replaced by the pool before it is used). Never of one that went out and got no answer,
    reset or timeout alike: Redis may have run it, and a second run of a write would apply it
    twice (a red team's proxy that reset connections after Redis had answered made keys.py
    rotate twice, losing the grace it printed, and counted usage twice)."""

    def __init__(self) -> None:
        super().__init__(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))

    def call_with_retry(
        self,
        do: Callable[[], R],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> R:
        before = _unanswered_count()

        def unsent(error: Exception) -> bool:
            if isinstance(error, REFUSED):
                return False  # Redis answered: a second try gets the same answer (and one more ACL log entry)
            return _unanswered_count() == before and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, unsent, with_failure_count)


def connect(settings: Settings) -> redis.Redis:
    """A client for ``settings.redis_url`` (``redis://``, ``rediss://`` or ``unix://``, passwords
    included), timing every round trip. No connection is made until the first command."""
    scheme = urlsplit(settings.redis_url).scheme
    return redis.Redis.from_url(
        settings.redis_url,
        connection_class=_TIMED.get(scheme, _TimedConnection),
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        retry=_RetryUnsent(),
        # No health_check_interval: its PING before a command doubles the wait on a hung server,
        # and the retry above already replaces a dead pooled connection.
        decode_responses=True,
        # What each connection tells Redis it is (CLIENT SETINFO), given once: left to itself,
        # redis-py looks its own version up in the installed packages' metadata for every new
        # connection (2.5 ms for the first, 0.6 ms each after, on a cold start and pool growth).
        driver_info=DriverInfo(lib_version=redis.__version__),
    )


P = ParamSpec("P")
R = TypeVar("R")


class Breaker:
    """After a Redis timeout, requests fail at once (503) for ``cooldown`` seconds; then one
    request at a time tries Redis again (the others still fail at once) until one gets through.

    Without it every thread of a function waits out the timeout on a hung Redis, requests queue
    behind them for many times that, and so does ``/healthz``: Kubernetes would restart pods
    that are fine. A refused connection fails fast by itself and does not open the breaker.
    """

    def __init__(self, cooldown: float = 1.0) -> None:
        self.cooldown = cooldown
        self._open_until: float | None = None  # None: closed
        # Reentrant: a guarded method that calls another is one probe, not a probe refused by itself.
        self._probe = threading.RLock()

    def call(self, attempt: Callable[[], R]) -> R:
        """``attempt()``; while the breaker is open, refused at once instead."""
        open_until = self._open_until  # read once: another thread's probe may close it meanwhile
        if open_until is None:
            return self._observe(attempt)
        if time.monotonic() < open_until or not self._probe.acquire(blocking=False):
            raise FastFail()
        try:
            return self._observe(attempt)
        finally:
            self._probe.release()

    def _observe(self, attempt: Callable[[], R]) -> R:
        try:
            result = attempt()
        except redis.TimeoutError:
            self._open_until = time.monotonic() + self.cooldown
            raise
        except REDIS_DOWN:
            raise  # refused or loading: still down, and failing fast by itself
        except Exception:
            self._open_until = None  # Redis answered; the error is about the request
            raise
        self._open_until = None
        return result


class FastFail(Exception):
    """Refused by an open :class:`Breaker` without trying Redis."""


@functools.cache  # one per Redis server: a hung server is hung for everyone here
def breaker(url: str) -> Breaker:
    """The process's :class:`Breaker` for the Redis at ``url``."""
    return Breaker()


def _refusal(exc: redis.ResponseError) -> str | None:
    """The code of an error reply about Redis's state (see _REFUSALS), None for any other."""
    for kind, code in _REFUSAL_CLASSES.items():
        if isinstance(exc, kind):
            return code
    if found := _REFUSALS.search(str(exc)):
        return found[1]
    return "NOPERM" if _ACL_IN_SCRIPT.search(str(exc)) else None


class _UsesRedis(Protocol):
    settings: Settings


S = TypeVar("S", bound=_UsesRedis)


def unavailable_when_down(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Decorate a method that talks to Redis: an outage becomes :class:`ServiceUnavailable`, which
    every caller answers as 503 or one CLI line; its detail (the access log, keys.py) names the
    server, password masked, and its message (the client's answer) does not."""

    @functools.wraps(method)
    def guarded(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        before = _unanswered_count()
        try:
            return breaker(self.settings.redis_url).call(lambda: method(self, *args, **kwargs))
        except NotRedis as exc:
            metrics.REDIS_ERRORS.labels(method.__name__).inc()
            where, message = self.settings.redis_url_masked, "Redis cannot serve this now; retry shortly"
            if _unanswered_count() != before:  # past a good handshake: a garbled reply, and the command may have run
                detail = f"Redis at {where} {exc}: what it was sent may still be done"
                raise OutcomeUnknown(message, detail=detail) from None
            detail = f"the server at {where} {exc}: is REDIS_URL right?"
            raise ServiceUnavailable(message, detail=detail) from None
        except REFUSED as exc:
            metrics.REDIS_ERRORS.labels(method.__name__).inc()
            raise ServiceUnavailable(
                "Redis cannot serve this now; retry shortly",
                detail=f"Redis at {self.settings.redis_url_masked} refused the connection: {exc}",
            ) from None
        except redis.BusyLoadingError:
            metrics.REDIS_ERRORS.labels(method.__name__).inc()
            raise ServiceUnavailable(
                "Redis is starting; retry shortly",
                detail=f"Redis at {self.settings.redis_url_masked} is loading its data: nothing was done",
            ) from None
        except (*REDIS_DOWN, FastFail) as exc:
            metrics.REDIS_ERRORS.labels(method.__name__).inc()
            where = self.settings.redis_url_masked
            # redis-py's words (refused, a timeout, "max number of clients reached") name no password.
            why = f" ({exc})" if str(exc) and not isinstance(exc, FastFail) else ""
            if _unanswered_count() != before:
                raise OutcomeUnknown(
                    "Redis unreachable; retry shortly",
                    detail=f"Redis at {where} stopped answering: what it was sent may still be done",
                ) from None
            raise ServiceUnavailable(
                "Redis unreachable; retry shortly", detail=f"Redis unreachable at {where}{why}"
            ) from None
        except redis.ResponseError as exc:
            if (refusal := _refusal(exc)) is None:
                raise  # about the command itself: a bug here, not an outage
            metrics.REDIS_ERRORS.labels(method.__name__).inc()
            where = self.settings.redis_url_masked
            if refusal == "OOM":  # maxmemory with noeviction (knative/data/redis.yaml): see _REFUSALS
                raise ServiceUnavailable(
                    "Redis is full; retry later", retry_after=30, detail=f"Redis is full (maxmemory) at {where}"
                ) from None
            raise ServiceUnavailable(
                "Redis cannot serve this now; retry shortly", detail=f"Redis at {where} refused: {refusal} {exc}"
            ) from None

    return cast(Callable[Concatenate[S, P], R], guarded)
