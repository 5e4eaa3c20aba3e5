"""The token function through functions-framework's test client, one test per status."""

import base64
import contextlib
import dataclasses
import gzip
import json
import subprocess
import sys
import threading
import time

import pytest
import redis

from functions.token.service import create_service
from local import ROOT
from local.helpers import free_port
from shared.auth import AuthStore
from shared.config import Rate, Settings
from tests.conftest import function_client, subprocess_env

WRONG_SK = "sk_" + "x" * 43
SOME_PK = "pk_" + "a" * 43
FORM = "application/x-www-form-urlencoded"
GRANT = {"grant_type": "client_credentials"}


def post_json(client, body, **kw):
    return client.post("/token.json", json=body, **kw)


def test_json_keypair_gets_token_and_session(token_client, keypair):
    reply = post_json(token_client, {"public_key": keypair.public_key, "secret_key": keypair.secret_key})
    assert reply.status_code == 200
    body = reply.get_json()
    assert body["ttl"] == 3600 and len(body["token"]) == 43
    assert reply.headers["Cache-Control"] == "no-store"
    session = token_client.get("/session.json", headers={"Authorization": f"Bearer {body['token']}"})
    assert session.status_code == 200
    assert session.get_json()["public_key"] == keypair.public_key
    assert session.get_json()["scopes"] is None
    assert 3590 <= session.get_json()["expires_in"] <= 3600


def test_oauth2_client_credentials_in_form(token_client, keypair):
    reply = token_client.post(
        "/token.json",
        data={"grant_type": "client_credentials", "client_id": keypair.public_key, "client_secret": keypair.secret_key},
    )
    assert reply.status_code == 200
    body = reply.get_json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert (
        token_client.get("/session.json", headers={"Authorization": f"Bearer {body['access_token']}"}).status_code
        == 200
    )


def grant(client, pair, **extra):
    """An OAuth2 client-credentials request for ``pair``, credentials in the form."""
    data = {"grant_type": "client_credentials", "client_id": pair.public_key, "client_secret": pair.secret_key}
    return client.post("/token.json", data={**data, **extra})


def test_oauth2_answer_names_the_scope_granted(token_client, auth, keypair):
    """RFC 6749 5.1: the answer names the scope granted when the key is limited or a scope was
    asked for: the models asked for, else the key's ("*": every model)."""
    scoped = auth.create_key(["shapes", "arrows"])
    assert set(grant(token_client, scoped).get_json()["scope"].split(" ")) == {"arrows", "shapes"}
    assert grant(token_client, scoped, scope="shapes").get_json()["scope"] == "shapes"
    assert grant(token_client, scoped, scope="shapes arrows").get_json()["scope"] == "arrows shapes"
    assert grant(token_client, keypair, scope="shapes").get_json()["scope"] == "shapes"
    assert grant(token_client, keypair, scope="*").get_json()["scope"] == "*"
    assert grant(token_client, scoped, scope="*").get_json()["scope"] == "*"  # as asked: the key's own
    assert "scope" not in grant(token_client, keypair).get_json()  # every model, nothing asked: nothing to say
    for empty in ("", " "):  # an empty scope is none: the key's models, not "*"
        assert set(grant(token_client, scoped, scope=empty).get_json()["scope"].split(" ")) == {"arrows", "shapes"}
        assert "scope" not in grant(token_client, keypair, scope=empty).get_json()


def keypair_body(pair, **extra):
    return {"public_key": pair.public_key, "secret_key": pair.secret_key, **extra}


def test_a_token_asked_for_fewer_models_may_call_only_those(token_client, shapes_client, keypair):
    """Least privilege: a token asked for with some models (OAuth2 scope, or JSON scopes) may
    call those and no other, its session says so, and the 403 says why, in RFC 6750's words."""
    narrow = grant(token_client, keypair, scope="arrows").get_json()["access_token"]
    keyed = post_json(token_client, keypair_body(keypair, scopes=["arrows"])).get_json()
    wide = grant(token_client, keypair).get_json()["access_token"]
    assert keyed["scopes"] == ["arrows"]
    for token, allowed in ((narrow, False), (keyed["token"], False), (wide, True)):
        bearer = {"Authorization": f"Bearer {token}"}
        for _ in range(3):  # a cache keeps a token at its first or second good check: the third is from it
            reply = shapes_client.get("/models/shapes.json", headers=bearer)
            assert reply.status_code == (200 if allowed else 403)
            assert token_client.get("/session.json", headers=bearer).get_json()["scopes"] == (
                None if allowed else ["arrows"]
            )
        if not allowed:
            assert reply.get_json()["error"] == "this token may not call model shapes"
            assert reply.headers["WWW-Authenticate"] == 'Bearer realm="thalamus", error="insufficient_scope"'


def test_a_scope_beyond_the_key_is_refused(token_client, auth):
    """A scoped key cannot ask for a model outside its scopes: RFC 6749's invalid_scope (OAuth2)
    or a 400 naming it (JSON), and no token; malformed scopes are refused alike."""
    scoped = auth.create_key(["shapes"])
    reply = grant(token_client, scoped, scope="shapes arrows")
    assert reply.status_code == 400 and reply.get_json()["error"] == "invalid_scope"
    assert "may not call model(s) arrows; ask for some of shapes" in reply.get_json()["error_description"]
    many = " ".join(f"m{i}" for i in range(65))  # past 64, each check of the token would walk them all
    for scope in ("Bad_Name", "* shapes", "token", "x" * 43, "shapes\tarrows", many):
        bad = grant(token_client, scoped, scope=scope)
        assert bad.status_code == 400 and bad.get_json()["error"] == "invalid_scope", scope
    for scopes in (["arrows"], [], "shapes", [1], ["Shapes"], {"shapes": 1}, many.split()):
        refused = post_json(token_client, keypair_body(scoped, scopes=scopes))
        assert refused.status_code == 400 and set(refused.get_json()) == {"error"}, scopes
    assert "may not call model(s) arrows" in post_json(token_client, keypair_body(scoped, scopes=["arrows"])).text


def test_a_scope_asked_with_a_wrong_secret_is_a_wrong_secret(token_client, auth):
    """What a key may call is told only to a caller that proved it holds the key."""
    scoped = auth.create_key(["shapes"])
    wrong = {**GRANT, "client_id": scoped.public_key, "client_secret": WRONG_SK, "scope": "arrows"}
    reply = token_client.post("/token.json", data=wrong)
    assert reply.status_code == 401 and reply.get_json()["error"] == "invalid_client"


def test_a_bad_token_is_told_invalid_token_and_a_missing_one_is_not(shapes_client):
    """RFC 6750 3.1: error="invalid_token" when a token was sent (OAuth2 clients fetch a new
    one on it); no error code when none was."""
    bad = shapes_client.get("/models/shapes.json", headers={"Authorization": "Bearer " + "x" * 43})
    assert bad.status_code == 401
    assert bad.headers["WWW-Authenticate"] == 'Bearer realm="thalamus", error="invalid_token"'
    missing = shapes_client.get("/models/shapes.json")
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == 'Bearer realm="thalamus"'


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_coded_body_is_415_not_read_as_if_plain(token_client, keypair, encoding):
    body = json.dumps({"public_key": keypair.public_key, "secret_key": keypair.secret_key}).encode()
    sent = gzip.compress(body) if encoding == "gzip" else body  # labelled as coded, whether it is or not
    reply = token_client.post(
        "/token.json", data=sent, content_type="application/json", headers={"Content-Encoding": encoding}
    )
    assert reply.status_code == 415 and "Content-Encoding" in reply.get_json()["error"]


def test_oauth2_client_credentials_with_basic(token_client, keypair):
    basic = base64.b64encode(f"{keypair.public_key}:{keypair.secret_key}".encode()).decode()
    reply = token_client.post(
        "/token.json", data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"}
    )
    assert reply.status_code == 200 and "access_token" in reply.get_json()


@pytest.mark.parametrize(
    "kwargs, status, words",
    [
        ({"data": "{nope", "content_type": "application/json"}, 400, "not valid JSON"),
        ({"json": ["a list"]}, 400, "JSON object"),
        ({"json": {"public_key": "pk_x"}}, 400, "secret_key"),
        ({"json": {"public_key": 5, "secret_key": "sk_x"}}, 400, "public_key"),
        ({"json": {"public_key": "pk_short", "secret_key": "sk_short"}}, 400, "43 characters"),
        ({"json": {"public_key": "pk_" + "a" * 43 + "\n", "secret_key": WRONG_SK}}, 400, "43 characters"),
        ({"data": "hello", "content_type": "text/plain"}, 415, "Content-Type"),
        # What fetch() sends with a string body, and a client that names no type at all
        (
            {"data": '{"public_key": "pk_x"}', "content_type": "text/plain;charset=UTF-8"},
            415,
            "the body is JSON but Content-Type says text/plain: send it with Content-Type: application/json",
        ),
        ({"data": '{"public_key": "pk_x"}'}, 415, "the body is JSON but Content-Type is missing"),
        # What `curl -d @client.json` sends: told to set the header, not about grant types.
        (
            {
                "data": '{"public_key": "pk_x", "secret_key": "sk_y"}',
                "content_type": "application/x-www-form-urlencoded",
            },
            415,
            "Content-Type: application/json",
        ),
    ],
)
def test_bad_input_gets_clear_json_error(token_client, kwargs, status, words):
    reply = token_client.post("/token.json", **kwargs)
    assert reply.status_code == status
    assert words in reply.get_json()["error"]


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"data": {"grant_type": "password"}}, 400, "unsupported_grant_type"),
        ({"data": {"client_id": "pk_x", "client_secret": "sk_y"}}, 400, "invalid_request"),
        ({"data": {"grant_type": "client_credentials"}}, 401, "invalid_client"),
        ({"data": {"grant_type": "client_credentials", "client_id": "pk_" + "a" * 43}}, 401, "invalid_client"),
        (
            {"data": {"grant_type": "client_credentials", "client_id": "pk_x", "client_secret": "sk_y"}},
            401,
            "invalid_client",
        ),
        (
            {"headers": {"Authorization": "Basic !!!"}, "data": {"grant_type": "client_credentials"}},
            401,
            "invalid_client",
        ),
        (  # not ASCII: not base64 either
            {"headers": {"Authorization": "Basic \xe9\xe9"}, "data": {"grant_type": "client_credentials"}},
            401,
            "invalid_client",
        ),
        ({"data": {"grant_type": ["client_credentials", "password"]}}, 400, "invalid_request"),
        (
            {
                "headers": basic("pk_" + "a" * 43, WRONG_SK),
                "data": {"grant_type": "client_credentials", "client_secret": "x"},
            },
            400,
            "invalid_request",
        ),
        (
            {"headers": basic("pk_" + "a" * 43, WRONG_SK), "json": {"grant_type": "client_credentials"}},
            400,
            "invalid_request",
        ),
    ],
)
def test_oauth2_errors_follow_rfc_6749(token_client, kwargs, status, code):
    reply = token_client.post("/token.json", **kwargs)
    assert reply.status_code == status
    body = reply.get_json()
    assert body["error"] == code and body["error_description"]
    basic_used = "Authorization" in kwargs.get("headers", {})
    assert (reply.headers.get("WWW-Authenticate") == 'Basic realm="thalamus"') == (status == 401 and basic_used)


def test_oauth2_wrong_secret_is_invalid_client(token_client, keypair):
    in_body = token_client.post(
        "/token.json",
        data={"grant_type": "client_credentials", "client_id": keypair.public_key, "client_secret": WRONG_SK},
    )
    with_basic = token_client.post(
        "/token.json", data={"grant_type": "client_credentials"}, headers=basic(keypair.public_key, WRONG_SK)
    )
    assert in_body.status_code == with_basic.status_code == 401
    assert (
        in_body.get_json()
        == with_basic.get_json()
        == {
            "error": "invalid_client",
            "error_description": "invalid client_id or client_secret",
        }
    )
    assert "WWW-Authenticate" not in in_body.headers
    assert with_basic.headers["WWW-Authenticate"].startswith("Basic")


def test_wrong_unknown_and_revoked_keys_get_identical_401(token_client, auth, keypair):
    revoked = auth.create_key()
    auth.revoke_key(revoked.public_key)
    replies = [
        post_json(token_client, {"public_key": keypair.public_key, "secret_key": WRONG_SK}),
        post_json(token_client, {"public_key": "pk_" + "u" * 43, "secret_key": WRONG_SK}),
        post_json(token_client, {"public_key": revoked.public_key, "secret_key": revoked.secret_key}),
    ]
    assert {r.status_code for r in replies} == {401}
    assert len({r.get_data() for r in replies}) == 1


def test_body_over_limit_is_413(token_client):
    reply = token_client.post("/token.json", data=b"{" + b" " * (10 * 1024 * 1024 + 1), content_type="application/json")
    assert reply.status_code == 413
    assert "too large" in reply.get_json()["error"]


def test_wrong_method_is_405_and_unknown_path_404(token_client):
    reply = token_client.get("/token.json")
    assert reply.status_code == 405 and reply.headers["Allow"] == "POST"
    # 405 is cacheable by default (RFC 9110 15.1): the token endpoint's no-store covers it too.
    assert reply.headers["Cache-Control"] == "no-store" and reply.headers["Pragma"] == "no-cache"
    assert token_client.delete("/session.json").status_code == 405
    missing = token_client.get("/nope.json")
    assert missing.status_code == 404 and "error" in missing.get_json()


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer " + "x" * 43, "Basic abc", "Bearer bad token!"])
def test_session_needs_a_valid_bearer(token_client, header):
    headers = {"Authorization": header} if header else {}
    reply = token_client.get("/session.json", headers=headers)
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert "error" in reply.get_json()


def test_revoked_key_token_gets_401(token_client, auth, keypair):
    token = post_json(token_client, {"public_key": keypair.public_key, "secret_key": keypair.secret_key}).get_json()[
        "token"
    ]
    auth.revoke_key(keypair.public_key)
    assert token_client.get("/session.json", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_guessing_at_a_key_does_not_lock_out_its_owner(token_client, keypair):
    body = {"public_key": keypair.public_key, "secret_key": WRONG_SK}
    for i in range(10):
        reply = post_json(token_client, body, environ_base={"REMOTE_ADDR": f"10.0.0.{i}"})
        assert reply.status_code == 401
    # The key is under attack: its guessers wait, even with the right secret...
    reply = post_json(
        token_client, {**body, "secret_key": keypair.secret_key}, environ_base={"REMOTE_ADDR": "10.0.0.3"}
    )
    assert reply.status_code == 429
    assert 1 <= int(reply.headers["Retry-After"]) <= 60
    # ...and its owner, who has not failed, does not.
    owner = post_json(token_client, {**body, "secret_key": keypair.secret_key})
    assert owner.status_code == 200


def test_brute_force_per_address_gets_429(token_client, auth):
    for _ in range(10):
        pk = auth.create_key().public_key
        assert post_json(token_client, {"public_key": pk, "secret_key": WRONG_SK}).status_code == 401
    fresh = auth.create_key()
    reply = post_json(token_client, {"public_key": fresh.public_key, "secret_key": fresh.secret_key})
    assert reply.status_code == 429 and "Retry-After" in reply.headers
    other_addr = post_json(
        token_client,
        {"public_key": fresh.public_key, "secret_key": fresh.secret_key},
        environ_base={"REMOTE_ADDR": "192.0.2.7"},
    )
    assert other_addr.status_code == 200


def test_limits_are_configurable(settings, keypair):
    client = function_client(create_service(settings.replace(auth_max_failures=2)))
    body = {"public_key": keypair.public_key, "secret_key": WRONG_SK}
    assert [post_json(client, body).status_code for _ in range(3)] == [401, 401, 429]


def test_every_answer_of_the_token_endpoint_is_no_store(settings, keypair):
    """RFC 6749 §5.1: no answer of the token endpoint may be cached, refusals included."""
    client = function_client(create_service(settings.replace(auth_max_failures=1)))
    wrong = {"public_key": keypair.public_key, "secret_key": WRONG_SK}
    answers = [post_json(client, {"public_key": 1}), post_json(client, wrong), post_json(client, wrong)]
    answers.append(client.post("/token.json", data=b"x" * 20_000, content_type="application/json"))  # too large
    answers.append(client.post("/token.json", data=b"{}", content_type="text/plain"))
    assert [reply.status_code for reply in answers] == [400, 401, 429, 413, 415]
    for reply in answers:
        assert reply.headers["Cache-Control"] == "no-store" and reply.headers["Pragma"] == "no-cache"


def test_a_failure_counter_always_expires(token_client, settings, raw_redis, keypair):
    """A counter is never left without its window, so no address is locked out for good: one
    that somehow lost its expiry (the two commands that kept it used to race with the window's
    end) gets one with the next failure."""
    counter = f"{settings.prefix}fail:addr:198.51.100.9"
    raw_redis.set(counter, 3)  # no expiry
    body = {"public_key": keypair.public_key, "secret_key": WRONG_SK}
    assert post_json(token_client, body, environ_base={"REMOTE_ADDR": "198.51.100.9"}).status_code == 401
    assert raw_redis.get(counter) == "4"
    assert 0 < raw_redis.ttl(counter) <= settings.auth_failure_window
    fresh = f"{settings.prefix}fail:key-addr:{keypair.public_key}:198.51.100.9"
    assert raw_redis.get(fresh) == "1" and 0 < raw_redis.ttl(fresh) <= settings.auth_failure_window


def test_the_longest_ttl_and_failure_window_the_settings_allow_work(settings, raw_redis, keypair):
    """Each at its configured maximum (ten years): a token is issued and lives that long, a wrong
    secret is a 401 counted for that long. Past it the function refuses to start (test_config)."""
    allowed = Settings.from_env({"TOKEN_TTL": str(3650 * 86400), "AUTH_FAILURE_WINDOW": str(3650 * 86400)})
    longest = dataclasses.replace(
        settings, token_ttl=allowed.token_ttl, auth_failure_window=allowed.auth_failure_window
    )
    client = function_client(create_service(longest))
    issued = post_json(client, {"public_key": keypair.public_key, "secret_key": keypair.secret_key})
    assert issued.status_code == 200 and issued.get_json()["ttl"] == 3650 * 86400
    session = client.get("/session.json", headers={"Authorization": f"Bearer {issued.get_json()['token']}"})
    assert session.status_code == 200 and session.get_json()["expires_in"] > 3649 * 86400
    wrong = {"public_key": keypair.public_key, "secret_key": WRONG_SK}
    assert post_json(client, wrong, environ_base={"REMOTE_ADDR": "198.51.100.10"}).status_code == 401
    assert raw_redis.ttl(f"{settings.prefix}fail:addr:198.51.100.10") > 3649 * 86400


def test_rate_limited_key_gets_ratelimit_headers_then_429(token_client, auth):
    pair = auth.create_key(rate=Rate(2, 60))
    token = auth.issue_token(pair.public_key, pair.secret_key, "t").token
    headers = {"Authorization": f"Bearer {token}"}
    replies = [token_client.get("/session.json", headers=headers) for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert [r.headers["RateLimit-Remaining"] for r in replies] == ["1", "0", "0"]
    assert {r.headers["RateLimit-Limit"] for r in replies} == {"2"}
    assert replies[2].headers["Retry-After"] == replies[2].headers["RateLimit-Reset"]
    assert "rate limit" in replies[2].get_json()["error"]
    unlimited = token_client.get("/session.json", headers={"Authorization": f"Bearer {token_for(auth)}"})
    assert unlimited.status_code == 200 and "RateLimit-Limit" not in unlimited.headers


def token_for(auth):
    pair = auth.create_key()
    return auth.issue_token(pair.public_key, pair.secret_key, "t").token


def test_health_and_readiness(token_client):
    assert token_client.get("/healthz").get_json() == {"status": "ok"}
    assert token_client.get("/readyz").get_json() == {"status": "ready"}


def test_redis_down_gives_503_fast_then_recovers(own_redis, settings):
    settings = settings.replace(redis_url=own_redis.url)
    client = function_client(create_service(settings))
    pair = AuthStore(settings).create_key()
    body = {"public_key": pair.public_key, "secret_key": pair.secret_key}
    assert post_json(client, body).status_code == 200

    own_redis.stop()
    for call in (
        lambda: post_json(client, body),
        lambda: client.get("/session.json", headers={"Authorization": "Bearer " + "t" * 43}),
    ):
        started = time.monotonic()
        reply = call()
        assert reply.status_code == 503, reply.get_data()
        assert "Redis unreachable" in reply.get_json()["error"]
        assert str(own_redis.port) not in reply.get_json()["error"]  # the client learns no internal address
        assert int(reply.headers["Retry-After"]) > 0
        assert time.monotonic() - started < 5  # no hang
    grant = {**GRANT, "client_id": pair.public_key, "client_secret": pair.secret_key}
    oauth = client.post("/token.json", data=grant)  # RFC 6749's shape, with a code OAuth2 clients know
    assert oauth.status_code == 503 and int(oauth.headers["Retry-After"]) > 0
    assert oauth.get_json()["error"] == "temporarily_unavailable"
    assert "Redis unreachable" in oauth.get_json()["error_description"]
    # The process can still serve (it answers the outage itself): the platform keeps it in
    # rotation rather than holding requests for a pod that would become ready.
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200

    own_redis.start()
    # no data survives this throw-away server, so the key is gone: 401, not 503
    assert post_json(client, body).status_code == 401


def test_a_full_redis_gives_503_and_keeps_what_it_has(own_redis, settings):
    """maxmemory + noeviction (the cluster's Redis): writes are refused, existing tokens still work."""
    settings = settings.replace(redis_url=own_redis.url)
    client = function_client(create_service(settings))
    pair = AuthStore(settings).create_key()
    body = {"public_key": pair.public_key, "secret_key": pair.secret_key}
    token = post_json(client, body).get_json()["token"]
    full = redis.Redis.from_url(own_redis.url)
    full.config_set("maxmemory-policy", "noeviction")
    full.config_set("maxmemory", 1)
    refused = post_json(client, body)
    assert refused.status_code == 503 and "Redis is full" in refused.get_json()["error"]
    assert int(refused.headers["Retry-After"]) > 0
    assert client.get("/session.json", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    full.config_set("maxmemory", 0)
    assert post_json(client, body).status_code == 200


def test_a_full_redis_still_says_401_to_an_expired_keys_token(own_redis, settings):
    """Once its expiry is noted, refusing an expired key's token writes nothing: a full Redis
    answers it 401 as before, not "Redis is full" (a capacity problem, retry in 30 s)."""
    settings = settings.replace(redis_url=own_redis.url)
    client = function_client(create_service(settings))
    store = AuthStore(settings)
    pair = store.create_key()
    token = store.issue_token(pair.public_key, pair.secret_key, "t").token
    raw = redis.Redis.from_url(own_redis.url)
    raw.hset(f"{settings.prefix}key:{pair.public_key}", "expires", int(time.time()) - 5)
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/session.json", headers=bearer).status_code == 401  # notes the expiry
    raw.config_set("maxmemory-policy", "noeviction")
    raw.config_set("maxmemory", 1)
    try:
        reply = client.get("/session.json", headers=bearer)
        assert reply.status_code == 401, reply.get_json()
    finally:
        raw.config_set("maxmemory", 0)


@contextlib.contextmanager
def refusing(raw, state):
    """``raw``'s Redis refusing commands for its own state meanwhile: a read-only replica (an old
    primary in a failover: READONLY for writes), a replica that lost its primary and serves
    nothing (MASTERDOWN), or one busy with another client's endless script (BUSY)."""
    if state == "busy":
        raw.config_set("lua-time-limit", 50)  # BUSY for others once a script has run this long (ms)

        def endless():
            with contextlib.suppress(redis.ResponseError):  # "killed by user", below
                raw.eval("while true do end", 0)

        looping = threading.Thread(target=endless)
        looping.start()
        time.sleep(0.3)
    else:
        raw.config_set("replica-serve-stale-data", "yes" if state == "read-only" else "no")
        raw.execute_command("REPLICAOF", "127.0.0.1", free_port())  # a primary that is not there
    try:
        yield
    finally:
        if state == "busy":
            raw.script_kill()  # on another connection of the pool
            looping.join()
        else:
            raw.execute_command("REPLICAOF", "NO", "ONE")


@pytest.mark.parametrize("state", ["read-only", "masterdown", "busy"])
def test_a_redis_that_refuses_for_its_own_state_gives_503_not_500(own_redis, settings, state):
    # A failover's old primary, a replica without its primary, a script that will not end: Redis
    # answers with an error reply, not silence. Each was a 500 with a traceback in the log.
    settings = settings.replace(redis_url=own_redis.url)
    client = function_client(create_service(settings))
    store = AuthStore(settings)
    pair, expired = store.create_key(), store.create_key()
    body = {"public_key": pair.public_key, "secret_key": pair.secret_key}
    token = store.issue_token(expired.public_key, expired.secret_key, "t").token
    raw = redis.Redis.from_url(own_redis.url)
    raw.hset(f"{settings.prefix}key:{expired.public_key}", "expires", int(time.time()) - 5)  # not noted yet
    with refusing(redis.Redis.from_url(own_redis.url), state):
        refused = post_json(client, body)
        assert refused.status_code == 503 and "retry" in refused.get_json()["error"], refused.get_json()
        assert int(refused.headers["Retry-After"]) > 0
        assert str(own_redis.port) not in refused.get_json()["error"]
        session = client.get("/session.json", headers={"Authorization": f"Bearer {token}"})
        # A read-only Redis still answers reads: the expired key's token gets its 401 (noting the
        # expiry is a write it refuses, and waits for the next time).
        assert session.status_code == (401 if state == "read-only" else 503), session.get_json()
        cli = subprocess.run(
            [sys.executable, str(ROOT / "keys.py"), "-r", pair.public_key], capture_output=True, text=True,
            env=subprocess_env(REDIS_URL=own_redis.url, THALAMUS_PREFIX=settings.prefix), timeout=60,
        )  # fmt: skip
        assert cli.returncode != 0 and "Traceback" not in cli.stderr and len(cli.stderr.strip().splitlines()) == 1
    assert post_json(client, body).status_code == 200  # and back once Redis is
    assert client.get("/session.json", headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_an_acl_that_forbids_a_command_of_the_scripts_is_a_503(own_redis, settings):
    # Redis 6 reports an ACL refusal inside a script without its NOPERM code: it was a 500.
    raw = redis.Redis.from_url(own_redis.url)
    raw.execute_command("ACL", "SETUSER", "noincr", "on", ">pw1", "~*", "+@all", "-incr")
    store = AuthStore(settings.replace(redis_url=own_redis.url))
    pair = store.create_key()
    limited = settings.replace(redis_url=own_redis.url.replace("redis://", "redis://noincr:pw1@"))
    client = function_client(create_service(limited))
    refused = post_json(client, {"public_key": pair.public_key, "secret_key": "sk_" + "A" * 43})  # counts a failure
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0, refused.get_json()


def test_a_hung_redis_costs_one_wait_then_fast_answers_until_it_is_back(own_redis):
    settings = Settings(redis_url=own_redis.url, redis_url_is_default=False, prefix="hung:")
    auth = AuthStore(settings)
    pair = auth.create_key()
    bearer = {"Authorization": "Bearer " + auth.issue_token(pair.public_key, pair.secret_key, "t").token}
    # Each check runs the script here: a cached token is answered until the cache's own check of
    # its connection finds Redis silent, within a second (test_tokencache.py).
    client = function_client(create_service(settings, AuthStore(settings, token_cache=False)))
    assert client.get("/session.json", headers=bearer).status_code == 200
    redis.Redis.from_url(own_redis.url).execute_command("CLIENT", "PAUSE", 3000, "ALL")  # hangs, as a frozen server
    started = time.monotonic()
    assert client.get("/session.json", headers=bearer).status_code == 503  # this one waits out the timeout
    waited = time.monotonic() - started
    for _ in range(5):  # the others are told at once, so threads and /healthz do not queue behind them
        started = time.monotonic()
        reply = client.get("/session.json", headers=bearer)
        assert reply.status_code == 503 and reply.headers["Retry-After"]
        assert time.monotonic() - started < waited / 4
    time.sleep(3.2)  # Redis answers again: the next request tries it, and gets through
    assert client.get("/session.json", headers=bearer).status_code == 200


def test_redis_that_never_answers_gives_503_not_a_hang(settings):
    """A Redis that accepts connections and then says nothing (a hung server, a black hole)."""
    import socket
    import threading

    port = free_port()
    silent = socket.socket()
    silent.bind(("127.0.0.1", port))
    silent.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(silent.accept()) for _ in range(8)], daemon=True).start()
    client = function_client(create_service(settings.replace(redis_url=f"redis://127.0.0.1:{port}/0")))
    try:
        for call in (
            lambda: post_json(client, {"public_key": "pk_" + "a" * 43, "secret_key": WRONG_SK}),
            lambda: client.get("/session.json", headers={"Authorization": "Bearer " + "t" * 43}),
        ):
            started = time.monotonic()
            reply = call()
            assert reply.status_code == 503 and reply.headers["Retry-After"]
            # One timeout, never a hang, and never two: a timeout is not retried (Redis may have
            # taken the command, and a hung server would keep the caller waiting twice as long).
            assert time.monotonic() - started < 2 * settings.redis_timeout
    finally:
        silent.close()
