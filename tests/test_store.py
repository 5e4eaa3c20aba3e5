"""shared/store.py: the Redis client's outage handling (the end-to-end cases, a Redis stopped
or hung under a function, are in test_token.py and test_predict.py)."""

import contextlib
import socket
import struct
import threading

import pytest
import redis
import requests

from shared import store
from shared.auth import AuthStore
from shared.errors import OutcomeUnknown, ServiceUnavailable
from tests.conftest import RedisProxy, fake_redis, subprocess_env
from tests.test_keys import keys


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


class ReplyDropper(RedisProxy):
    """A TCP proxy in front of Redis that, once, passes on a command holding ``trigger`` and then
    resets the client's connection instead of passing back Redis's answer: the command ran, and
    the client cannot know it did (a network reset, a proxy restarting)."""

    def __init__(self, port: int, trigger: bytes) -> None:
        self.trigger, self.fired = trigger, False
        super().__init__(port)

    def relay(self, client: socket.socket, upstream: socket.socket) -> None:
        armed = threading.Event()

        def upward() -> None:
            with contextlib.suppress(OSError):
                while data := client.recv(65536):
                    if self.trigger in data and not self.fired:
                        armed.set()
                    upstream.sendall(data)

        threading.Thread(target=upward, daemon=True).start()
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if armed.is_set() and not self.fired:
                    self.fired = True
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                    client.shutdown(socket.SHUT_RDWR)  # wakes the upward thread's recv
                    break
                client.sendall(data)
        client.close()
        upstream.close()


def test_a_command_whose_answer_was_lost_is_not_sent_again(settings):
    """A command that went out and got no answer (the connection reset after Redis ran it) is
    not sent again, which would apply a write twice: the caller sees the error (keys.py: "may
    still be done"). A pooled connection Redis closed is replaced before it is used."""
    direct = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    proxy = ReplyDropper(direct.connection_pool.connection_kwargs["port"], b"INCR")
    client = store.connect(settings.replace(redis_url=proxy.url))
    counter = settings.prefix + "counter"
    with pytest.raises(redis.ConnectionError):
        client.incr(counter)
    assert proxy.fired and direct.get(counter) == "1"  # it ran, once
    assert client.incr(counter) == 2  # the next command goes out on a fresh connection
    for info in direct.client_list():
        if info["cmd"] == "incr":
            direct.client_kill_filter(_id=info["id"])  # Redis closes the client's pooled connection
    assert client.incr(counter) == 3 and direct.get(counter) == "3"


@pytest.mark.parametrize(
    ("path", "setup", "named"),
    [
        ("/99999", None, "DB index is out of range"),  # past the server's `databases`
        ("/0", "hunter2", "authenticated"),  # Redis asks a password the URL has not
        ("/0?password=wrong-one", "hunter2", "invalid username-password pair"),
    ],
)
def test_a_connection_setup_redis_refuses_is_a_503_that_names_it(own_redis, serve_function, path, setup, named):
    """Redis answers the connection's setup (SELECT, AUTH) with an error: every request would fail
    alike until an operator fixes the setting. A 503 whose log line says so, and keys.py's one
    line; never a 500 with a traceback, or "unreachable" for a server that answered."""
    if setup:
        redis.Redis.from_url(own_redis.url).config_set("requirepass", setup)
    url = own_redis.url.rsplit("/", 1)[0] + path
    base = serve_function("token", REDIS_URL=url, LOG_FORMAT="json")
    reply = requests.post(f"{base}/token.json", json={"public_key": "pk_" + "a" * 43, "secret_key": "sk_" + "a" * 43},
                          timeout=10)  # fmt: skip
    assert reply.status_code == 503 and reply.json() == {"error": "Redis cannot serve this now; retry shortly"}
    assert reply.headers["Retry-After"]
    result = keys("-l", env=subprocess_env(REDIS_URL=url))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert named in result.stderr and "refused the connection" in result.stderr and "Traceback" not in result.stderr
    if setup:
        assert setup not in result.stderr and "wrong-one" not in result.stderr
        redis.Redis.from_url(own_redis.url, password=setup).config_set("requirepass", "")


def test_a_refused_connection_setup_is_not_tried_again(own_redis, settings):
    """Redis answered (a wrong password): a second try would get the same answer, and add a
    failed AUTH to Redis's ACL log for every request."""
    admin = redis.Redis.from_url(own_redis.url, decode_responses=True)
    admin.config_set("requirepass", "hunter2")
    try:
        admin = redis.Redis.from_url(own_redis.url, password="hunter2", decode_responses=True)
        admin.acl_log_reset()
        wrong = settings.replace(redis_url=own_redis.url + "?password=wrong-one")
        with pytest.raises(ServiceUnavailable, match="Redis cannot serve this now"):
            AuthStore(wrong).list_keys()
        assert sum(entry["count"] for entry in admin.acl_log()) == 1
    finally:
        admin.config_set("requirepass", "")


@pytest.mark.parametrize(
    "reply",
    [
        lambda data: b"HTTP/1.1 400 Bad Request\r\n\r\n",
        lambda data: b":xx\r\n",
        lambda data: b"$3\r\n\xff\xfe\xfd\r\n",
        lambda data: b"*-2x\r\n",
        lambda data: b"%1\r\n*0\r\n:1\r\n",
        lambda data: b"+OK\r\n",
        lambda data: data,
    ],
    ids=["http", "bad-integer", "not-utf-8", "bad-length", "list-keyed-map", "ok-to-all", "echo"],
)
def test_a_server_that_is_not_redis_is_a_503_that_says_so(serve_function, reply):
    """Another service on REDIS_URL's port, or a proxy's garbage: redis-py's parser fails on its
    bytes (its own error, or Python's from int()), or its handshake on a reply of the wrong shape.
    A 503 whose log line says what answered, and keys.py's one line; never a 500 with a traceback."""
    with fake_redis(reply) as url:
        base = serve_function("token", REDIS_URL=url, LOG_FORMAT="json")
        pair = {"public_key": "pk_" + "a" * 43, "secret_key": "sk_" + "a" * 43}
        for _ in range(2):  # the connection is dropped, and the next request gets the same
            answer = requests.post(f"{base}/token.json", json=pair, timeout=10)
            assert answer.status_code == 503 and answer.json() == {
                "error": "Redis cannot serve this now; retry shortly"
            }
            assert answer.headers["Retry-After"]
        predict = serve_function("predict", REDIS_URL=url, MODEL_NAME="shapes")
        bearer = {"Authorization": "Bearer " + "A" * 43}
        answer = requests.get(f"{predict}/models/shapes.json", headers=bearer, timeout=10)
        assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
        result = keys("-l", env=subprocess_env(REDIS_URL=url))
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "not Redis" in result.stderr and "Traceback" not in result.stderr


def test_a_loading_redis_is_a_503_that_did_nothing(settings):
    """-LOADING is Redis's answer while it replays its data: nothing was done, which the detail
    says (keys.py drops its file: no key was made), not "may still be done"."""

    def answer(data: bytes) -> bytes:
        if b"HELLO" in data.upper():
            return b"%1\r\n$5\r\nproto\r\n:3\r\n"
        if b"CLIENT" in data.upper():
            return b"+OK\r\n"
        return b"-LOADING Redis is loading the dataset in memory\r\n"

    with fake_redis(answer) as url, pytest.raises(ServiceUnavailable) as refused:
        AuthStore(settings.replace(redis_url=url)).create_key()
    assert refused.type is ServiceUnavailable  # not OutcomeUnknown
    assert refused.value.message == "Redis is starting; retry shortly"
    assert "loading its data: nothing was done" in refused.value.detail


def test_a_garbled_reply_after_a_good_handshake_may_have_been_done(settings):
    """A proxy that garbles Redis's answer: Redis may have run the command, so keys.py keeps a
    new key's file (OutcomeUnknown), as for an answer that never came."""

    def answer(data: bytes) -> bytes:
        if b"HELLO" in data.upper():
            return b"%1\r\n$5\r\nproto\r\n:3\r\n"
        return b"+OK\r\n" if b"CLIENT" in data.upper() else b":xx\r\n"

    with fake_redis(answer) as url, pytest.raises(OutcomeUnknown) as garbled:
        AuthStore(settings.replace(redis_url=url)).create_key()
    assert "not Redis" in garbled.value.detail and "may still be done" in garbled.value.detail
