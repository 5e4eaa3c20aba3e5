"""shared/store.py: the Redis client's outage handling (the end-to-end cases, a Redis stopped
or hung under a function, are in test_token.py and test_predict.py)."""

import threading

import pytest
import redis

from shared import store


def test_the_redis_breaker_under_racing_threads_and_nested_calls():
    """shared.store.Breaker (a hung Redis costs one wait): a probe that calls another guarded
    method is one probe, and threads racing a probe that closes it never see anything but an
    answer, a timeout or a fast refusal."""
    breaker = store.Breaker(cooldown=0)

    def hang() -> None:
        raise redis.TimeoutError()

    with pytest.raises(redis.TimeoutError):
        breaker.call(hang)
    assert breaker.call(lambda: breaker.call(lambda: 7)) == 7  # nested inside the probe: let through
    unexpected = []

    def hammer(n: int) -> None:
        for i in range(3000):
            try:
                breaker.call(hang if (i + n) % 3 == 0 else lambda: 1)
            except (redis.TimeoutError, store.FastFail):
                pass
            except Exception as exc:  # noqa: BLE001 (what the test looks for)
                unexpected.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert unexpected == []


def test_new_connections_name_the_client_without_reading_package_metadata(settings, monkeypatch):
    """Every connection tells Redis which client it is (CLIENT SETINFO). Left to itself, redis-py
    looks its version up in the installed packages' metadata for each new connection (2.5 ms
    for the first, on every cold start); shared.store.connect gives it once."""
    looked_up: list[str] = []
    monkeypatch.setattr(redis.utils.metadata, "version", lambda name: looked_up.append(name) or "0")
    client = store.connect(settings)
    assert client.ping()
    connection = client.connection_pool.make_connection()  # as the pool grows, or a tracking one
    connection.connect()
    connection.disconnect()
    assert looked_up == []
    assert connection.driver_info.lib_version == redis.__version__
