"""Usage counting: answered requests per key, model and UTC day, counted in the process and
added to Redis in the background (``P usage:<pk>:<YYYY-MM-DD>`` and ``P last-used``, see
:mod:`shared.auth` for the layout).

A request costs no Redis round trip for it, and a Redis outage costs it nothing: counts wait,
bounded, for the next flush, and the last flush runs at exit. A flush whose answer never came
(Redis stalled past the client's timeout, a connection reset) may have been done all the same:
it is sent again as it was, numbered, and Redis adds each number of a process's once.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
import weakref

import redis

log = logging.getLogger("thalamus")
Batch = list[tuple[tuple[str, str, str], list[int]]]  # ((public key, day, model), [requests, errors, last])

USAGE_DAYS = 90  # usage counters are kept this many days
USAGE_FLUSH_SECONDS = 1.0  # how often a process adds its usage counts to Redis
OUTAGE_LOG_SECONDS = 60.0  # while Redis is unreachable, the flusher says so once a minute

# KEYS: last-used hash, purge time, the sending process's last batch. ARGV: prefix, ttl, batch
# number, then (pk, day, model, requests, errors, last) groups. A batch numbered no higher than
# the process's last is one already added, sent again: nothing is done. Counts last used by the
# end of the last purge, of a key that does not exist, are dropped: they belong to a purged key
# (a key made since then keeps its counts).
FLUSH_LUA = """
if tonumber(ARGV[3]) <= tonumber(redis.call('GET', KEYS[3]) or '0') then return 0 end
-- Kept an hour after the process's last flush: a batch is sent again within seconds of its
-- first try (each flush, while Redis answers), and a process that is gone sends nothing.
redis.call('SET', KEYS[3], ARGV[3], 'EX', 3600)
local purged = tonumber(redis.call('GET', KEYS[2]) or '0')
-- A last use is never later than Redis's clock, which the purge's time is read from: a function
-- whose host clock is fast would otherwise show uses "in 25s" and bring a purged key back.
local now = tonumber(redis.call('TIME')[1])
for i = 4, #ARGV, 6 do
  local name = ARGV[1] .. 'usage:' .. ARGV[i] .. ':' .. ARGV[i + 1]
  local model, last = ARGV[i + 2], math.min(tonumber(ARGV[i + 5]), now)
  local exists = redis.call('EXISTS', ARGV[1] .. 'key:' .. ARGV[i]) == 1
  if last > purged or exists then
    redis.call('HINCRBY', name, 'r:' .. model, ARGV[i + 3])
    redis.call('HINCRBY', name, 'e:' .. model, ARGV[i + 4])
    if tonumber(redis.call('HGET', name, 't:' .. model) or '0') < last then
      redis.call('HSET', name, 't:' .. model, last)
    end
    redis.call('EXPIRE', name, ARGV[2])
  end
  -- A key's last use, for keys.py -l, only while the key exists: counts of a revoked key that
  -- come after its revocation (taken before it, flushed within a second) would put back an
  -- entry the revocation removed, and nothing removes it again (the hash has no TTL).
  if exists and tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') < last then
    redis.call('HSET', KEYS[1], ARGV[i], last)
  end
end
"""


class UsageRecorder:
    """Counts answered requests per key, model and UTC day in this process; one background
    thread per process adds every recorder's counts to Redis each :data:`USAGE_FLUSH_SECONDS`
    and at exit. Counting costs a request no Redis round trip, and a Redis outage costs it
    nothing at all: counts wait, bounded, for the next flush."""

    MAX_PENDING = 100_000  # distinct (key, day, model) entries kept while Redis is unreachable
    # Entries per script call: 5,000 take Redis about 0.1 s, far inside the client's timeout.
    FLUSH_CHUNK = 5_000

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._redis = client
        self._prefix = prefix
        self._flush_script = client.register_script(FLUSH_LUA)
        self._lock = threading.Lock()
        # One flush at a time, from taking the counts to Redis's answer: the exit flush waits for
        # one in flight on the background thread (which exit would kill, losing its counts).
        self._flushing = threading.Lock()
        self._counts: dict[tuple[str, str, str], list[int]] = {}
        self._pid = 0  # the process these counts belong to (a forked child starts afresh)
        self._sender, self._batch = "", 0  # this process's name in Redis, its last batch number
        self._unsent: list[tuple[int, Batch]] = []  # numbered batches whose answer never came
        self._failing_since: float | None = None  # monotonic; an outage's first failed flush
        self._told_at = 0.0  # when the outage was last logged: a line a minute, not a second

    def add(self, public_key: str, model: str | None, error: bool) -> None:
        """Count one request (an error when ``error``); never raises."""
        try:
            now = time.time()
            entry_key = (public_key, time.strftime("%Y-%m-%d", time.gmtime(now)), model or "-")
            with self._lock:
                if self._pid != os.getpid():
                    self._pid = os.getpid()
                    self._counts, self._unsent = {}, []  # a fork's copy of the parent's are the parent's
                    self._sender, self._batch = uuid.uuid4().hex, 0
                    _flusher.watch(self)
                entry = self._counts.get(entry_key)
                if entry is None:
                    entry = self._counts[entry_key] = [0, 0, 0]
                entry[0] += 1
                entry[1] += error
                entry[2] = int(now)
        except Exception:  # counting must never fail a request
            log.exception("usage: cannot count a request")

    def flush(self, at_exit: bool = False) -> None:
        """Add the pending counts to Redis now; on failure keep them for the next flush, as the
        same numbered batches (at exit there is none: say how many may be lost). A flush another
        thread has under way is waited for: when this returns, no count is in flight."""
        with self._flushing:
            with self._lock:
                pending, self._counts = list(self._counts.items()), {}
                batches, self._unsent = self._unsent, []
                for start in range(0, len(pending), self.FLUSH_CHUNK):
                    self._batch += 1
                    batches.append((self._batch, pending[start : start + self.FLUSH_CHUNK]))
            keys = [self._prefix + "last-used", self._prefix + "purged", f"{self._prefix}usage-sent:{self._sender}"]
            for sent, (number, batch) in enumerate(batches):
                args: list[str | int] = [self._prefix, (USAGE_DAYS + 1) * 86400, number]
                for (public_key, day, model), (requests, errors, last) in batch:
                    args += [public_key, day, model, requests, errors, last]
                try:
                    self._flush_script(keys=keys, args=args)
                except redis.RedisError as exc:
                    if at_exit:
                        lost = _requests(batches[sent:])
                        log.warning(
                            "usage: cannot write counts to Redis (%s) at exit: %d requests not counted",
                            type(exc).__name__,
                            lost,
                        )
                        return
                    now = time.monotonic()
                    if self._failing_since is None:
                        self._failing_since = self._told_at = now
                        log.warning("usage: cannot write counts to Redis (%s); will retry", type(exc).__name__)
                    elif now - self._told_at >= OUTAGE_LOG_SECONDS:
                        self._told_at = now
                        log.warning("usage: still cannot write counts to Redis (%s) after %.0f s; will retry",
                                    type(exc).__name__, now - self._failing_since)  # fmt: skip
                    self._keep(batches[sent:])
                    return
            if self._failing_since is not None and batches:
                log.info("usage: counts written to Redis again")
                self._failing_since = None

    def _keep(self, unsent: list[tuple[int, Batch]]) -> None:
        """Batches for the next flush, first; past MAX_PENDING entries in all, the newest are
        dropped (a long outage), and said so."""
        room, kept = self.MAX_PENDING, list[tuple[int, Batch]]()
        for number, batch in unsent:
            if len(batch) > room:
                dropped = _requests(unsent[len(kept) :])
                log.warning("usage: Redis unreachable for long: %d requests not counted", dropped)
                break
            kept.append((number, batch))
            room -= len(batch)
        with self._lock:
            self._unsent = kept


def _requests(batches: list[tuple[int, Batch]]) -> int:
    return sum(counts[0] for _, batch in batches for _, counts in batch)


class _Flusher:
    """The one thread per process that flushes every recorder in use, and the exit flush."""

    def __init__(self) -> None:
        self._recorders: weakref.WeakSet[UsageRecorder] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = 0

    def watch(self, recorder: UsageRecorder) -> None:
        with self._lock:
            self._recorders.add(recorder)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="thalamus-usage", daemon=True).start()
                atexit.register(self.flush_all, at_exit=True)

    def _run(self) -> None:
        while True:
            time.sleep(USAGE_FLUSH_SECONDS)
            try:
                self.flush_all()
            except Exception:  # whatever it was, the next second's counts still go out
                log.exception("usage: flush failed")

    def flush_all(self, at_exit: bool = False) -> None:
        with self._lock:
            recorders = list(self._recorders)
        for recorder in recorders:
            recorder.flush(at_exit)

    def after_fork(self) -> None:
        # A fork copies locks in whatever state another thread held them: start the child afresh.
        self._lock = threading.Lock()
        for recorder in list(self._recorders):
            recorder._lock, recorder._flushing = threading.Lock(), threading.Lock()
            recorder._counts, recorder._unsent = {}, []  # the parent's, which the parent flushes
            recorder._failing_since, recorder._told_at = None, 0.0  # the child says its own outage


_flusher = _Flusher()
os.register_at_fork(after_in_child=_flusher.after_fork)
