"""The predict functions' token cache (shared/tokencache.py): a known token costs no Redis round
trip, and whatever changes its key or token reaches every function before its next request."""

import hashlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
import redis

from functions.token.service import create_service as create_token_service
from shared import tokencache
from shared.admin import KeyAdmin
from shared.auth import AuthStore
from shared.auth_scripts import AUTHENTICATE
from shared.errors import Unauthorized
from shared.tokencache import CHECK_SECONDS
from tests.conftest import RedisProxy, function_client, predict_client, subprocess_env
from tests.test_keys import keys

CHECK_SCRIPT = hashlib.sha1(AUTHENTICATE.encode(), usedforsecurity=False).hexdigest()


@contextmanager
def bearer_checks(url, command="EVALSHA " + CHECK_SCRIPT):
    """Counts the bearer-check scripts (or the commands starting with ``command``) Redis runs
    from here on, read from its MONITOR stream: the usage flush, also a script, runs once a
    second in the background and is not one."""
    client = redis.Redis.from_url(url, socket_timeout=10)  # a frozen Redis fails the test, never hangs it
    checks, command_start = 0, command
    with client, client.monitor() as monitor:

        def count():
            nonlocal checks
            sentinel = "ECHO " + uuid.uuid4().hex  # every command before it has been read
            client.echo(sentinel[5:])
            while (command := monitor.next_command())["command"] != sentinel:
                checks += command["client_type"] != "lua" and command["command"].startswith(command_start)
            return checks

        yield count


def metadata(client, bearer, model="shapes"):
    """An authenticated request that reads no body: the bearer check is what it costs."""
    return client.get(f"/models/{model}.json", headers=bearer)


@pytest.fixture
def own(own_redis, settings):
    """Settings on a Redis of this test alone (its command counts are this test's)."""
    return settings.replace(redis_url=own_redis.url)


def bearer_of(auth, pair):
    return {"Authorization": "Bearer " + auth.issue_token(pair.public_key, pair.secret_key, "t").token}


def test_a_known_token_costs_no_redis_round_trip(own, monkeypatch):
    monkeypatch.setattr(tokencache, "CHECK_SECONDS", 30.0)  # no PING (a slow PONG drops the cache)
    auth = AuthStore(own)
    bearer = bearer_of(auth, auth.create_key())
    client = predict_client(own, "shapes")
    assert metadata(client, bearer).status_code == 200  # checked by the script, then cached
    with bearer_checks(own.redis_url) as checks:
        for _ in range(20):
            assert metadata(client, bearer).status_code == 200
        assert checks() == 0
    assert 'thalamus_token_cache_lookups_total{result="hit"}' in client.get("/metrics").get_data(as_text=True)
    # Off (TOKEN_CACHE=0), or on a RESP2 connection (no pushes): every check is a round trip.
    for uncached in (
        predict_client(own, "shapes", token_cache=False),
        predict_client(own, "shapes", redis_url=own.redis_url + "?protocol=2"),
    ):
        with bearer_checks(own.redis_url) as checks:
            for _ in range(5):
                assert metadata(uncached, bearer).status_code == 200
            assert checks() == 5


def test_the_token_function_answers_a_known_token_without_a_round_trip_too(own, monkeypatch):
    monkeypatch.setattr(tokencache, "CHECK_SECONDS", 30.0)  # no PING (a slow PONG drops the cache)
    auth = AuthStore(own)
    pair = auth.create_key()
    bearer = bearer_of(auth, pair)
    client = function_client(create_token_service(own))
    # A token checked once costs the script alone: keeping it would cost a read of its own.
    with bearer_checks(own.redis_url, "HGET") as reads:
        assert client.get("/session.json", headers=bearer).status_code == 200
        assert reads() == 0
    assert client.get("/session.json", headers=bearer).status_code == 200  # checked again: now kept
    with bearer_checks(own.redis_url) as checks:
        for _ in range(10):
            assert client.get("/session.json", headers=bearer).get_json()["public_key"] == pair.public_key
            assert client.get("/models.json", headers=bearer).status_code == 200
        assert checks() == 0
    auth.revoke_key(pair.public_key)
    assert client.get("/session.json", headers=bearer).status_code == 401


@pytest.mark.parametrize(
    ("change", "shapes_status", "arrows_status"),
    [
        (["-r"], 401, 401),
        (["--edit", "{pk}", "--models", "arrows"], 403, 200),
        (["--edit", "{pk}", "--expires", "1s"], 401, 401),  # checked once that second is over
        (["--rotate", "{pk}", "-o", "{tmp}/new.json", "--revoke-tokens"], 401, 401),
    ],
    ids=["revoke", "scopes", "expiry", "rotate"],
)
def test_a_key_change_reaches_cached_tokens_before_the_next_request(
    auth, settings, env, tmp_path, change, shapes_status, arrows_status
):
    pair = auth.create_key(["shapes", "arrows"])
    bearer = bearer_of(auth, pair)
    functions = {"shapes": predict_client(settings, "shapes"), "arrows": predict_client(settings, "arrows")}
    for model, client in functions.items():
        for _ in range(3):  # the second and third are answered from the cache
            assert metadata(client, bearer, model).status_code == 200
    args = [arg.format(pk=pair.public_key, tmp=tmp_path) for arg in change]
    if args == ["-r"]:
        args.append(pair.public_key)
    done = keys(*args, env=subprocess_env(**env))
    assert done.returncode == 0, done.stderr
    if "--expires" in args:
        time.sleep(1.1)
    assert metadata(functions["shapes"], bearer, "shapes").status_code == shapes_status
    assert metadata(functions["arrows"], bearer, "arrows").status_code == arrows_status


def test_a_revocation_reaches_the_cache_before_the_next_check_without_any_wait(auth, settings):
    """keys.py waits 1.25 s before it reports a change in force, for pushes a real network delays;
    on loopback none is needed: Redis sends the invalidation as it runs the revocation, and the
    cache reads what was pushed before every lookup (not only at its once-a-second PING, which
    let a revoked token through for up to a second)."""
    client = predict_client(settings, "shapes")
    for _ in range(10):
        pair = auth.create_key()
        bearer = bearer_of(auth, pair)
        for _ in range(3):  # the second and third are answered from the cache
            assert metadata(client, bearer).status_code == 200
        auth.revoke_key(pair.public_key)
        assert metadata(client, bearer).status_code == 401


def test_a_change_reaches_the_cache_even_when_redis_is_preempted_between_its_writes(own, own_redis):
    """Redis writes a command's answer and the invalidations it pushes in the same turn of its
    loop, the answer possibly first: the caller, woken by it on Redis's CPU, could then check a
    token before the push was written (with both on one CPU, about once in a hundred changes).
    A change returns only once its pushes are out."""
    admin = KeyAdmin(own)
    pair = admin.create_key()
    bearer = bearer_of(admin, pair)
    client = predict_client(own, "shapes")
    saved = os.sched_getaffinity(0)
    for pid in (own_redis.proc.pid, 0):
        os.sched_setaffinity(pid, {min(saved)})
    try:
        for _ in range(300):
            for _ in range(2):  # checked by the script or the cache, then from the cache
                assert metadata(client, bearer).status_code == 200
            admin.edit_key(pair.public_key, scopes=["arrows"])
            assert metadata(client, bearer).status_code == 403
            admin.edit_key(pair.public_key, scopes=None)
    finally:
        os.sched_setaffinity(0, saved)


def test_a_new_rate_applies_to_cached_tokens_at_once(auth, settings, env):
    pair = auth.create_key()
    bearer = bearer_of(auth, pair)
    client = predict_client(settings, "shapes")
    for _ in range(3):
        assert "RateLimit-Limit" not in metadata(client, bearer).headers
    assert keys("--edit", pair.public_key, "--rate", "2/min", env=subprocess_env(**env)).returncode == 0
    answers = [metadata(client, bearer) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["RateLimit-Limit"] == "2"


def test_a_token_that_expires_stops_working_while_cached(auth, settings):
    pair = auth.create_key()
    client = predict_client(settings, "shapes")
    bearer = bearer_of(AuthStore(settings.replace(token_ttl=2)), pair)
    issued = time.monotonic()  # (dead 2 s from now at the latest)
    for _ in range(3):  # the second and third are answered from the cache
        assert metadata(client, bearer).status_code == 200
    time.sleep(max(0.0, issued + 2.05 - time.monotonic()))
    assert metadata(client, bearer).status_code == 401


def test_revocation_under_concurrent_checks_leaves_no_later_success(auth, settings, env):
    """Threads checking a cached token while keys.py revokes its key: no check that starts after
    keys.py returns succeeds."""
    pair = auth.create_key()
    token = auth.issue_token(pair.public_key, pair.secret_key, "t").token
    function = AuthStore(settings, token_cache=True)
    function.verify_token(token, "shapes")
    outcomes, stop = [], threading.Event()

    def check():
        while not stop.is_set():
            started = time.monotonic()
            try:
                function.verify_token(token, "shapes")
                outcomes.append((started, True))
            except Unauthorized:
                outcomes.append((started, False))

    threads = [threading.Thread(target=check) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert keys("-r", pair.public_key, env=subprocess_env(**env)).returncode == 0
    revoked = time.monotonic()
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    assert any(ok for started, ok in outcomes if started < revoked)  # the cache was answering
    assert not [started for started, ok in outcomes if ok and started > revoked]
    assert any(not ok for _, ok in outcomes)


def test_redis_gone_or_silent_is_not_papered_over_by_the_cache(own, own_redis):
    auth = AuthStore(own)
    bearer = bearer_of(auth, auth.create_key())
    client = predict_client(own, "shapes")
    for _ in range(2):
        assert metadata(client, bearer).status_code == 200
    # Its connection killed (a failover, a proxy restart): the cache starts again, nothing is lost.
    redis.Redis.from_url(own.redis_url).client_kill_filter(_type="normal", skipme=True)
    with bearer_checks(own.redis_url) as checks:
        assert [metadata(client, bearer).status_code for _ in range(4)] == [200] * 4
        assert checks() == 1
    # Frozen: after CHECK_SECONDS a cached token is not trusted until Redis answers again.
    redis.Redis.from_url(own.redis_url).execute_command("CLIENT", "PAUSE", 4000, "ALL")
    time.sleep(CHECK_SECONDS + 0.1)
    assert metadata(client, bearer).status_code == 503
    time.sleep(4.0)
    assert metadata(client, bearer).status_code == 200
    # Stopped: the next request knows.
    own_redis.stop()
    reply = metadata(client, bearer)
    assert reply.status_code == 503 and "Redis unreachable" in json.loads(reply.get_data())["error"]


class SlowLink(RedisProxy):
    """A TCP proxy to the Redis at ``url`` that delivers what the server sends ``delay`` seconds
    late (a slow or lossy network: one TCP retransmission costs 200 ms), in order."""

    def __init__(self, url: str, delay: float) -> None:
        self.delay = delay
        super().__init__(urlsplit(url).port)

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._pump, args=(client, upstream, 0.0), daemon=True).start()
        self._pump(upstream, client, self.delay)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while data := source.recv(65536):
                time.sleep(delay)  # holds what follows too: the stream stays in order
                sink.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()


def test_keys_py_returns_once_a_late_invalidation_is_in_force(auth, settings, env):
    """The invalidation of a revocation reaches a function 300 ms late: keys.py has waited that
    out (tokencache.PROPAGATION_SECONDS) before it says the key is revoked."""
    link = SlowLink(settings.redis_url, 0.3)
    try:
        pair = auth.create_key()
        bearer = bearer_of(auth, pair)
        client = predict_client(settings, "shapes", redis_url=link.url)
        assert [metadata(client, bearer).status_code for _ in range(2)] == [200, 200]  # filled, then cached
        assert keys("-r", pair.public_key, env=subprocess_env(**env)).returncode == 0
        assert metadata(client, bearer).status_code == 401
    finally:
        link.close()


@pytest.mark.parametrize("mishap", ["answers read late", "host clock stepped back"])
def test_a_cached_key_expires_no_later_than_redis_says(auth, settings, monkeypatch, mishap):
    """The script judges a key's expiry by Redis's clock, and so does the cache, never later: not
    when its read was answered 0.4 s late (a slow link, a stalled thread: the middle of that
    round trip put Redis 0.2 s behind), nor when this host's wall clock steps back after it."""
    monkeypatch.setattr(tokencache, "CHECK_SECONDS", 30.0)  # no PING (a slow PONG drops the cache)
    delay = 0.4 if mishap == "answers read late" else 0.0
    link = SlowLink(settings.redis_url, delay)
    try:
        cached = AuthStore(settings.replace(redis_url=link.url), token_cache=True)
        other = auth.create_key()  # both connections made and the script loaded: from here one
        cached.verify_token(auth.issue_token(other.public_key, other.secret_key, "t").token)  # round trip each
        expires = int(auth.redis_time()) + 2
        pair = auth.create_key(expires=expires)
        token = auth.issue_token(pair.public_key, pair.secret_key, "t").token
        time.sleep(max(0.0, expires - 1 - auth.redis_time()))
        assert cached.verify_token(token).public_key == pair.public_key  # the script, then the fill
        if mishap == "host clock stepped back":
            wall = time.time
            monkeypatch.setattr(time, "time", lambda: wall() - 5)
        time.sleep(max(0.0, expires + 0.1 - auth.redis_time()))
        with pytest.raises(Unauthorized):
            cached.verify_token(token)
    finally:
        link.close()


def test_what_tracking_cannot_see_lasts_max_age_seconds(own, monkeypatch):
    """SWAPDB sends no invalidation: an entry is read again after MAX_AGE_SECONDS anyway."""
    monkeypatch.setattr(tokencache, "MAX_AGE_SECONDS", 0.5)
    auth = AuthStore(own)
    bearer = bearer_of(auth, auth.create_key())
    client = predict_client(own, "shapes")
    assert [metadata(client, bearer).status_code for _ in range(2)] == [200, 200]
    redis.Redis.from_url(own.redis_url).swapdb(0, 1)  # db 0, where the key was, is now empty
    time.sleep(0.6)
    assert metadata(client, bearer).status_code == 401


def test_the_cache_connection_takes_no_pool_slot(own):
    """Reconnecting the cache's connection (here: killed five times) never uses up a pool
    limited by REDIS_URL's max_connections."""
    auth = AuthStore(own)
    bearer = bearer_of(auth, auth.create_key())
    client = predict_client(own, "shapes", redis_url=own.redis_url + "?max_connections=3")
    admin = redis.Redis.from_url(own.redis_url)
    for _ in range(5):
        assert metadata(client, bearer).status_code == 200
        admin.client_kill_filter(_type="normal", skipme=True)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(metadata(client, bearer).status_code)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200, 200, 200]


def test_redis_refusing_tracking_leaves_the_script_and_no_connections(own):
    """An ACL (or a proxy) that refuses CLIENT TRACKING: every check runs the script, and the
    function does not open a connection per request trying."""
    admin = redis.Redis.from_url(own.redis_url)
    admin.execute_command("ACL", "SETUSER", "fn", "on", ">pw", "~*", "&*", "+@all", "-client")
    auth = AuthStore(own)
    bearer = bearer_of(auth, auth.create_key())
    client = predict_client(own, "shapes", redis_url=own.redis_url.replace("redis://", "redis://fn:pw@"))
    assert metadata(client, bearer).status_code == 200  # (Redis learns the script)
    opened = admin.info("stats")["total_connections_received"]
    with bearer_checks(own.redis_url) as checks:
        assert [metadata(client, bearer).status_code for _ in range(30)] == [200] * 30
        assert checks() == 30
    # The counting's two (MONITOR and its marker), and perhaps the usage flusher's first.
    assert admin.info("stats")["total_connections_received"] - opened <= 3


def test_a_hung_redis_costs_no_extra_wait_for_the_cache(own, own_redis):
    auth = AuthStore(own)
    bearer = bearer_of(auth, auth.create_key())
    client = predict_client(own, "shapes")
    assert [metadata(client, bearer).status_code for _ in range(2)] == [200, 200]
    time.sleep(CHECK_SECONDS + 0.1)  # the next check PINGs first
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert metadata(client, bearer).status_code == 503
        # PING_TIMEOUT, then the script's one timeout (never retried): about a second
        assert time.monotonic() - started < own.redis_timeout + tokencache.PING_TIMEOUT + 0.5
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)


def test_a_key_record_the_cache_cannot_read_is_left_to_the_script(auth, settings, raw_redis):
    pair = auth.create_key()
    raw_redis.hset(settings.prefix + "key:" + pair.public_key, "expires", "4102444800.5")  # Lua reads it, int() not
    bearer = bearer_of(auth, pair)
    client = predict_client(settings, "shapes")
    assert [metadata(client, bearer).status_code for _ in range(3)] == [200] * 3
