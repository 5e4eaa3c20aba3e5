"""The shared auth library against a real Redis."""

import time

import pytest

from shared.auth import AuthStore, check_secret, hash_secret, parse_scopes, token_digest
from shared.errors import BadRequest, InvalidCredentials, TooManyRequests, Unauthorized, UnknownKey


def test_keypair_format_and_secret_stored_only_hashed(auth, raw_redis, env):
    pair = auth.create_key(["shapes"], "ci")
    assert pair.public_key.startswith("pk_") and len(pair.public_key) == 46
    assert pair.secret_key.startswith("sk_") and len(pair.secret_key) == 46
    record = raw_redis.hgetall(env["THALAMUS_PREFIX"] + "key:" + pair.public_key)
    assert pair.secret_key not in str(record)
    assert record["secret"].startswith("scrypt$16384$8$1$")
    assert "secret_key" not in repr(pair)


def test_scrypt_hash_is_salted_and_checks():
    one, two = hash_secret("sk_same"), hash_secret("sk_same")
    assert one != two
    assert check_secret("sk_same", one) and check_secret("sk_same", two)
    assert not check_secret("sk_other", one)
    assert not check_secret("sk_same", "garbage")


def test_token_stored_as_sha256_only(auth, keypair, raw_redis, env):
    issued = auth.issue_token(keypair.public_key, keypair.secret_key, "1.2.3.4")
    names = list(raw_redis.scan_iter(env["THALAMUS_PREFIX"] + "*"))
    assert any(name.endswith(token_digest(issued.token)) for name in names)
    for name in names:
        assert issued.token not in name
        value = raw_redis.hgetall(name) if raw_redis.type(name) == "hash" else {}
        assert issued.token not in str(value)
    ttl = raw_redis.ttl(env["THALAMUS_PREFIX"] + "token:" + token_digest(issued.token))
    assert 3590 < ttl <= 3600


def test_verify_returns_key_and_scopes(auth):
    pair = auth.create_key(["arrows", "shapes"])
    issued = auth.issue_token(pair.public_key, pair.secret_key, "a")
    session = auth.verify_token(issued.token)
    assert session.public_key == pair.public_key
    assert session.scopes == ["arrows", "shapes"]
    assert session.allows("shapes") and not session.allows("other")


def test_wrong_unknown_and_revoked_keys_fail_alike(auth, keypair):
    other = auth.create_key()
    auth.revoke_key(other.public_key)
    attempts = [
        (keypair.public_key, "sk_" + "x" * 43),
        ("pk_" + "y" * 43, keypair.secret_key),
        (other.public_key, other.secret_key),
    ]
    messages = set()
    for pk, sk in attempts:
        with pytest.raises(InvalidCredentials) as err:
            auth.issue_token(pk, sk, "a")
        messages.add(err.value.message)
    assert len(messages) == 1


def test_malformed_keys_are_bad_requests(auth):
    with pytest.raises(BadRequest):
        auth.issue_token("pk_short", "sk_short", "a")


def test_revoke_kills_every_live_token(auth, keypair):
    tokens = [auth.issue_token(keypair.public_key, keypair.secret_key, "a").token for _ in range(3)]
    assert auth.revoke_key(keypair.public_key) == 3
    for token in tokens:
        with pytest.raises(Unauthorized):
            auth.verify_token(token)
    with pytest.raises(UnknownKey):
        auth.revoke_key(keypair.public_key)


def test_expired_token_is_refused(settings):
    short = AuthStore(settings.replace(token_ttl=1))
    pair = short.create_key()
    token = short.issue_token(pair.public_key, pair.secret_key, "a").token
    assert short.verify_token(token).expires_in <= 1
    time.sleep(2.1)
    with pytest.raises(Unauthorized):
        short.verify_token(token)
    short.purge()


def test_purge_removes_only_the_prefix(auth, keypair, raw_redis, env):
    raw_redis.set("foreign:key", "keep me")
    raw_redis.set(env["THALAMUS_PREFIX"].rstrip(":") + "x", "near miss, keep me")
    auth.issue_token(keypair.public_key, keypair.secret_key, "a")
    try:
        assert auth.purge() >= 3
        assert list(raw_redis.scan_iter(env["THALAMUS_PREFIX"] + "*")) == []
        assert raw_redis.get("foreign:key") == "keep me"
        assert raw_redis.get(env["THALAMUS_PREFIX"].rstrip(":") + "x") == "near miss, keep me"
    finally:
        raw_redis.delete("foreign:key", env["THALAMUS_PREFIX"].rstrip(":") + "x")


def test_prefix_with_glob_characters_purges_only_itself(settings, raw_redis):
    globby = AuthStore(settings.replace(prefix="glob[*]:"))
    globby.create_key()
    raw_redis.set("globa:x", "keep")
    try:
        assert globby.purge() == 1
        assert raw_redis.get("globa:x") == "keep"
    finally:
        raw_redis.delete("globa:x")


def test_list_keys_never_shows_secrets(auth):
    pair = auth.create_key(["shapes"], "team a")
    auth.issue_token(pair.public_key, pair.secret_key, "a")
    [info] = auth.list_keys()
    assert (info.public_key, info.label, info.scopes, info.live_tokens) == (pair.public_key, "team a", ["shapes"], 1)


def test_failures_are_rate_limited_per_key(auth, keypair):
    for _ in range(10):
        with pytest.raises(InvalidCredentials):
            auth.issue_token(keypair.public_key, "sk_" + "x" * 43, f"addr-{_}")
    with pytest.raises(TooManyRequests) as err:
        auth.issue_token(keypair.public_key, keypair.secret_key, "fresh-addr")
    assert 1 <= int(err.value.headers["Retry-After"]) <= 60


def test_parse_scopes():
    assert parse_scopes(None) is None and parse_scopes("") is None
    assert parse_scopes("shapes, arrows,shapes") == ["arrows", "shapes"]
    with pytest.raises(BadRequest):
        parse_scopes("Bad Name")
