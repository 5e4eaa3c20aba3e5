"""The shared auth library against a real Redis."""

import logging
import subprocess
import sys
import threading
import time
from dataclasses import astuple

import pytest
import redis
import scrypt

from local import ROOT
from shared import credentials, usage
from shared.admin import KeyAdmin
from shared.auth import AuthStore
from shared.auth_scripts import AUDIT_MAX_ENTRIES
from shared.config import Rate
from shared.credentials import Keypair, hash_secret, matching_hash, token_digest
from shared.errors import (
    BadRequest,
    Forbidden,
    InvalidCredentials,
    ThalamusError,
    TooManyRequests,
    Unauthorized,
    UnknownKey,
)
from shared.keyrecords import Actor, parse_scopes
from tests.conftest import subprocess_env

WRONG_SK = "sk_" + "x" * 43


@pytest.fixture
def admin(settings):
    store = KeyAdmin(settings, actor=Actor("tester", "box"))
    yield store
    store.purge()


@pytest.fixture
def scrypt_runs(monkeypatch):
    """How many scrypt hashes the library computes (a spy on the real function)."""
    runs = []
    real = scrypt.hash

    def counting(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scrypt, "hash", counting)
    return runs


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
    assert matching_hash("sk_same", [one]) == one and matching_hash("sk_same", [two]) == two
    assert matching_hash("sk_other", [one]) is None
    assert matching_hash("sk_same", ["garbage", two]) == two  # what is not a hash matches nothing


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
    assert auth.verify_token(issued.token, "shapes").public_key == pair.public_key
    with pytest.raises(Forbidden):
        auth.verify_token(issued.token, "other")


def test_wrong_unknown_revoked_and_expired_keys_fail_alike(auth, keypair):
    other = auth.create_key()
    auth.revoke_key(other.public_key)
    expired = auth.create_key(expires=int(time.time()) - 1)
    attempts = [
        (keypair.public_key, WRONG_SK),
        ("pk_" + "y" * 43, keypair.secret_key),
        (other.public_key, other.secret_key),
        (expired.public_key, expired.secret_key),
    ]
    messages = set()
    for pk, sk in attempts:
        with pytest.raises(InvalidCredentials) as err:
            auth.issue_token(pk, sk, "a")
        messages.add(err.value.message)
    assert len(messages) == 1


@pytest.mark.parametrize(
    "public_key, secret_key",
    [("pk_short", "sk_short"), ("pk_" + "a" * 43 + "\n", WRONG_SK), ("pk_" + "a" * 43, WRONG_SK + "\n")],
)
def test_malformed_keys_are_bad_requests_without_scrypt(auth, scrypt_runs, public_key, secret_key):
    with pytest.raises(BadRequest):
        auth.issue_token(public_key, secret_key, "a")
    assert scrypt_runs == []


def test_unknown_key_costs_the_same_scrypt_run_as_a_wrong_secret(auth, keypair, scrypt_runs):
    credentials.dummy_hash()  # made once per process, on first use
    scrypt_runs.clear()
    for pk in (keypair.public_key, "pk_" + "u" * 43):
        with pytest.raises(InvalidCredentials):
            auth.issue_token(pk, WRONG_SK, "a")
    assert len(scrypt_runs) == 2


def test_revoke_kills_every_live_token(auth, keypair):
    tokens = [auth.issue_token(keypair.public_key, keypair.secret_key, "a").token for _ in range(3)]
    assert auth.revoke_key(keypair.public_key) == 3
    for token in tokens:
        with pytest.raises(Unauthorized):
            auth.verify_token(token)
    with pytest.raises(UnknownKey):
        auth.revoke_key(keypair.public_key)


def test_a_key_has_at_most_max_tokens_per_key_live(settings):
    """Past MAX_TOKENS_PER_KEY live tokens a new one ends the key's oldest: one key holder cannot
    fill Redis with tokens, nor make its revocation a script that stalls Redis for seconds."""
    store = KeyAdmin(settings.replace(max_tokens_per_key=3))
    pair = store.create_key()
    tokens = [store.issue_token(pair.public_key, pair.secret_key, "a").token for _ in range(5)]
    for token in tokens[:2]:
        with pytest.raises(Unauthorized):
            store.verify_token(token)
    assert [store.verify_token(token).public_key for token in tokens[2:]] == [pair.public_key] * 3
    assert store.redis.zcard(settings.prefix + "key-tokens:" + pair.public_key) == 3
    assert store.redis.exists(*(settings.prefix + "token:" + token_digest(t) for t in tokens)) == 3
    assert store.revoke_key(pair.public_key) == 3
    # The oldest go first, by issue, also when the key's expiry cuts the new tokens' life short.
    pair = store.create_key()
    old = [store.issue_token(pair.public_key, pair.secret_key, "a").token for _ in range(3)]
    store.edit_key(pair.public_key, expires=int(time.time()) + 1800)
    new = [store.issue_token(pair.public_key, pair.secret_key, "a").token for _ in range(2)]
    assert [token in (old[2], *new) for token in (*old, *new)] == [False, False, True, True, True]
    for token in (*old[:2],):
        with pytest.raises(Unauthorized):
            store.verify_token(token)
    assert all(store.verify_token(token) for token in (old[2], *new))


def test_expired_token_is_refused(settings):
    short = AuthStore(settings.replace(token_ttl=1))
    pair = short.create_key()
    token = short.issue_token(pair.public_key, pair.secret_key, "a").token
    assert short.verify_token(token).expires_in <= 1
    time.sleep(2.1)
    with pytest.raises(Unauthorized):
        short.verify_token(token)
    short.purge()


def test_a_token_lives_its_whole_ttl(settings):
    # Not a second less: clients refresh by expires_in, and a token that dies early is a 401
    # they did not plan for (whole-second clocks used to cut up to a second off).
    short = AuthStore(settings.replace(token_ttl=2))
    pair = short.create_key()
    issued = short.issue_token(pair.public_key, pair.secret_key, "a")
    time.sleep(1.6)  # into its last 0.4 s (a slow machine's margin)
    assert short.verify_token(issued.token).expires_in == 0
    short.purge()


def test_a_token_never_outlives_its_key(admin):
    pair = admin.create_key(expires=int(time.time()) + 2)
    issued = admin.issue_token(pair.public_key, pair.secret_key, "a")
    assert 1 <= issued.ttl <= 2
    assert admin.verify_token(issued.token).expires_in <= 2
    time.sleep(2.2)
    with pytest.raises(Unauthorized):
        admin.verify_token(issued.token)
    with pytest.raises(InvalidCredentials):
        admin.issue_token(pair.public_key, pair.secret_key, "a")
    # A key whose expiry is moved earlier cuts its live tokens short on their next request.
    longer = admin.create_key()
    token = admin.issue_token(longer.public_key, longer.secret_key, "a").token
    admin.edit_key(longer.public_key, expires=int(time.time()) + 3)
    assert admin.verify_token(token).expires_in <= 3
    expired_events = [e for e in admin.audit_log() if e.action == "expired"]
    assert [e.public_key for e in expired_events] == [pair.public_key]  # noted once


def test_rotation_replaces_the_secret_and_keeps_the_rest(admin):
    pair = admin.create_key(["shapes"], "team", rate=Rate(5, 60))
    live = admin.issue_token(pair.public_key, pair.secret_key, "a").token
    new, killed, until = admin.rotate_key(pair.public_key)
    assert new.public_key == pair.public_key and new.secret_key != pair.secret_key and killed == 0 and until is None
    with pytest.raises(InvalidCredentials):
        admin.issue_token(pair.public_key, pair.secret_key, "a")
    issued = admin.issue_token(pair.public_key, new.secret_key, "b")
    assert issued.session.scopes == ["shapes"]
    assert admin.verify_token(live).public_key == pair.public_key  # live tokens keep working
    [info] = admin.list_keys()
    assert (info.label, info.scopes, info.rate) == ("team", ["shapes"], Rate(5, 60))

    newer, killed, _ = admin.rotate_key(pair.public_key, revoke_tokens=True)
    assert killed == 2
    with pytest.raises(Unauthorized):
        admin.verify_token(live)


def test_rotation_grace_keeps_the_old_secret_for_a_while_at_one_scrypt_run(admin, scrypt_runs):
    pair = admin.create_key()
    new, _, until = admin.rotate_key(pair.public_key, grace=2)
    assert abs(until - (admin.redis_time() + 2)) <= 1  # on Redis's clock, as the grace is judged
    scrypt_runs.clear()
    assert admin.issue_token(pair.public_key, pair.secret_key, "a").token
    assert admin.issue_token(pair.public_key, new.secret_key, "a").token
    with pytest.raises(InvalidCredentials):
        admin.issue_token(pair.public_key, WRONG_SK, "a")
    assert len(scrypt_runs) == 3  # one each: the old and new hashes share their salt
    time.sleep(2.2)
    with pytest.raises(InvalidCredentials):
        admin.issue_token(pair.public_key, pair.secret_key, "a")
    # Past its grace the old secret is a wrong one, whatever else the request asks: never told
    # apart by a scope refusal that only a right secret gets.
    with pytest.raises(InvalidCredentials):
        admin.issue_token(pair.public_key, pair.secret_key, "a", ["nosuchmodel"], deployed={"shapes"})
    assert admin.issue_token(pair.public_key, new.secret_key, "a").token


@pytest.fixture
def clock_off(monkeypatch):
    """This process's clock moved by ``seconds`` (a replica on a node whose clock is off), the
    Redis server's left alone."""
    real = time.time

    def set_offset(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + seconds)

    return set_offset


def test_expiry_and_grace_go_by_redis_clock_whatever_the_replicas(settings, admin, clock_off):
    """A replica whose clock is 90 s slow, in both its token checks and its token cache, sees a
    key expire and a rotation's grace end when Redis's clock says: not 90 s later."""
    expiring = admin.create_key(expires=admin.redis.time()[0] + 2)
    rotated = admin.create_key()
    admin.rotate_key(rotated.public_key, grace=2)
    clock_off(-90)
    slow = AuthStore(settings, token_cache=True)
    token = slow.issue_token(expiring.public_key, expiring.secret_key, "a").token
    assert slow.verify_token(token).expires_in <= 2
    assert slow.verify_token(token).public_key == expiring.public_key  # from the cache now
    assert slow.issue_token(rotated.public_key, rotated.secret_key, "a").token  # in its grace
    time.sleep(2.2)
    for check in (lambda: slow.verify_token(token), lambda: AuthStore(settings).verify_token(token)):
        with pytest.raises(Unauthorized):
            check()
    for pair in (expiring, rotated):
        with pytest.raises(InvalidCredentials):
            slow.issue_token(pair.public_key, pair.secret_key, "a")


def test_tokens_of_replicas_with_clocks_off_all_die_with_revoke_tokens(settings, admin, clock_off):
    """The key's token index (what --revoke-tokens and the per-key cap read) holds every live
    token, whichever replica's clock, 2 h fast or not, issued it."""
    pair = admin.create_key()
    tokens = [admin.issue_token(pair.public_key, pair.secret_key, "a").token for _ in range(2)]
    clock_off(7200)
    tokens.append(AuthStore(settings).issue_token(pair.public_key, pair.secret_key, "a").token)
    clock_off(0)
    tokens.append(admin.issue_token(pair.public_key, pair.secret_key, "a").token)
    assert [info.live_tokens for info in admin.list_keys()] == [4]
    assert admin.rotate_key(pair.public_key, revoke_tokens=True)[1] == 4
    for token in tokens:
        with pytest.raises(Unauthorized):
            admin.verify_token(token)


def test_two_rotations_at_once_never_lose_the_original_secret(admin):
    """Two ``--rotate --grace`` at once: one wins, the other changes nothing and says so; the
    original secret keeps its grace (it lost it when the second moved the first's new secret
    into the grace slot)."""
    pair = admin.create_key()
    start, results = threading.Barrier(2), []

    def rotate() -> None:
        start.wait()
        try:
            results.append(admin.rotate_key(pair.public_key, grace=3600)[0])
        except BadRequest as refused:
            results.append(refused)

    threads = [threading.Thread(target=rotate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    won = [result for result in results if isinstance(result, Keypair)]
    [lost] = [str(result) for result in results if result not in won]
    assert len(won) == 1 and ("changed while it was being rotated" in lost or "still works until" in lost), lost
    for secret in (pair.secret_key, won[0].secret_key):
        assert admin.issue_token(pair.public_key, secret, "a").token


def test_a_rotation_with_grace_never_ends_an_earlier_ones_grace(admin):
    """Two operators rotating a minute apart, both with a grace: the second is refused (it would
    cut off the clients still on the first secret), until it asks for no grace, which ends it."""
    pair = admin.create_key()
    first = admin.rotate_key(pair.public_key, grace=3600).pair
    with pytest.raises(BadRequest, match="previous secret still works until .*without --grace"):
        admin.rotate_key(pair.public_key, grace=60)
    for secret in (pair.secret_key, first.secret_key):
        assert admin.issue_token(pair.public_key, secret, "a").token
    last = admin.rotate_key(pair.public_key).pair
    for secret in (pair.secret_key, first.secret_key):
        with pytest.raises(InvalidCredentials):
            admin.issue_token(pair.public_key, secret, "a")
    assert admin.issue_token(pair.public_key, last.secret_key, "a").token


def test_rotating_or_editing_an_unknown_or_expired_key_changes_nothing(admin):
    ghost = "pk_" + "g" * 43
    with pytest.raises(UnknownKey):
        admin.rotate_key(ghost)
    with pytest.raises(UnknownKey):
        admin.edit_key(ghost, label="x")
    expired = admin.create_key(expires=int(time.time()) - 1)
    with pytest.raises(BadRequest):
        admin.rotate_key(expired.public_key)
    assert [e.action for e in admin.audit_log()] == ["create"]


def test_lowered_scope_bites_live_tokens_at_once(admin):
    pair = admin.create_key(["arrows", "shapes"])
    token = admin.issue_token(pair.public_key, pair.secret_key, "a").token
    assert admin.verify_token(token, "shapes")
    admin.edit_key(pair.public_key, scopes=["arrows"])
    with pytest.raises(Forbidden):
        admin.verify_token(token, "shapes")
    assert admin.verify_token(token).scopes == ["arrows"]
    admin.edit_key(pair.public_key, scopes=None)
    assert admin.verify_token(token, "shapes").scopes is None


def test_a_narrowed_token_follows_its_keys_edits(admin):
    """A token asked for with some models may call those its key still may: a model the key
    loses leaves the token too, and giving the key every model gives the token no more."""
    pair = admin.create_key(["arrows", "shapes", "digits"])
    token = admin.issue_token(pair.public_key, pair.secret_key, "a", ["shapes", "arrows"]).token
    assert admin.verify_token(token).scopes == ["arrows", "shapes"]
    admin.edit_key(pair.public_key, scopes=["arrows", "digits"])
    assert admin.verify_token(token, "arrows").scopes == ["arrows"]
    with pytest.raises(Forbidden):
        admin.verify_token(token, "shapes")
    admin.edit_key(pair.public_key, scopes=["digits"])
    assert admin.verify_token(token).scopes == []  # the key lost them all: the token may call nothing
    with pytest.raises(Forbidden):
        admin.verify_token(token, "digits")
    admin.edit_key(pair.public_key, scopes=None)
    assert admin.verify_token(token).scopes == ["arrows", "shapes"]
    with pytest.raises(Forbidden):
        admin.verify_token(token, "digits")


def test_a_cached_narrowed_token_is_refused_other_models(settings, admin):
    """The token cache narrows a kept token to its own scopes as the script does: kept after a
    check for one model, it still may not call a model its key may but it may not."""
    pair = admin.create_key()
    token = admin.issue_token(pair.public_key, pair.secret_key, "a", ["shapes"]).token
    cached = AuthStore(settings, token_cache=True)
    for _ in range(3):
        assert cached.verify_token(token, "shapes").scopes == ["shapes"]
    assert cached.token_cache is not None and cached.token_cache.lookup(token_digest(token), "shapes")
    with pytest.raises(Forbidden):
        cached.verify_token(token, "arrows")


def test_rate_limit_counts_down_then_429(admin):
    pair = admin.create_key(rate=Rate(3, 60))
    token = admin.issue_token(pair.public_key, pair.secret_key, "a").token
    remaining = []
    for _ in range(3):
        session = admin.verify_token(token)
        assert session.headers["RateLimit-Limit"] == "3"
        assert 1 <= int(session.headers["RateLimit-Reset"]) <= 60
        remaining.append(session.headers["RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]
    with pytest.raises(TooManyRequests) as err:
        admin.verify_token(token)
    headers = err.value.headers
    assert headers["RateLimit-Remaining"] == "0" and headers["RateLimit-Limit"] == "3"
    assert 1 <= int(headers["Retry-After"]) <= 60 and headers["Retry-After"] == headers["RateLimit-Reset"]
    # Raising the rate applies at once, with a fresh window.
    admin.edit_key(pair.public_key, rate=Rate(10, 1))
    assert admin.verify_token(token).headers["RateLimit-Remaining"] == "9"
    admin.edit_key(pair.public_key, rate=None)
    assert admin.verify_token(token).headers == {}


def test_rate_window_ends(admin):
    pair = admin.create_key(rate=Rate(1, 1))
    token = admin.issue_token(pair.public_key, pair.secret_key, "a").token
    admin.verify_token(token)
    with pytest.raises(TooManyRequests):
        admin.verify_token(token)
    time.sleep(1.1)
    assert admin.verify_token(token).headers["RateLimit-Remaining"] == "0"


def test_usage_is_counted_per_key_model_and_day(admin):
    pair = admin.create_key(label="billing")
    session = admin.issue_token(pair.public_key, pair.secret_key, "a").session
    for status in (200, 200, 400, 200):
        admin.record_request(session, "shapes", status)
    admin.record_request(session, None, 200)
    admin.usage.flush()
    rows = {(row.model, row.requests, row.errors) for row in admin.usage_report(pair.public_key)}
    assert rows == {("shapes", 4, 1), ("-", 1, 0)}
    [row] = [row for row in admin.usage_report() if row.model == "shapes"]
    assert row.label == "billing" and time.time() - row.last_used < 5
    assert admin.list_keys()[0].last_used == row.last_used
    admin.revoke_key(pair.public_key)
    assert {row.label for row in admin.usage_report()} == {"(revoked)"}  # history outlives the key
    with pytest.raises(UnknownKey):
        admin.usage_report("pk_" + "n" * 43)


def test_usage_counts_a_key_refused_a_model(admin):
    """A scoped key calling a model it may not call is an error the admin sees in --usage."""
    pair = admin.create_key(["arrows"])
    token = admin.issue_token(pair.public_key, pair.secret_key, "a").token
    for _ in range(2):
        with pytest.raises(Forbidden):
            admin.verify_token(token, "shapes")
    admin.usage.flush()
    assert {(row.model, row.requests, row.errors) for row in admin.usage_report(pair.public_key)} == {("shapes", 2, 2)}


def test_usage_held_at_a_purge_does_not_bring_the_purged_key_back(admin):
    """Functions flush their counts a second later (later still after an outage): counts of a
    purged key that arrive after the purge are dropped, a key made since keeps its own."""
    pair = admin.create_key()
    admin.record_request(admin.issue_token(pair.public_key, pair.secret_key, "a").session, "shapes", 200)
    admin.purge()
    admin.usage.flush()
    assert admin.usage_report() == [] and admin.list_keys() == []
    fresh = admin.create_key()
    admin.record_request(admin.issue_token(fresh.public_key, fresh.secret_key, "a").session, "shapes", 200)
    admin.usage.flush()
    assert [(row.public_key, row.requests) for row in admin.usage_report()] == [(fresh.public_key, 1)]


def test_a_function_with_a_fast_clock_neither_brings_a_purged_key_back_nor_shows_future_uses(
    settings, admin, clock_off
):
    pair = admin.create_key()
    clock_off(30)
    fast = AuthStore(settings)
    fast.record_request(fast.issue_token(pair.public_key, pair.secret_key, "a").session, "shapes", 200)
    clock_off(0)
    admin.purge()
    fast.usage.flush()
    assert admin.usage_report() == []
    kept = admin.create_key()
    clock_off(30)
    fast.record_request(fast.issue_token(kept.public_key, kept.secret_key, "a").session, "shapes", 200)
    fast.usage.flush()
    clock_off(0)
    [row] = admin.usage_report()
    assert row.public_key == kept.public_key and row.last_used <= admin.redis.time()[0]
    assert admin.key(kept.public_key).last_used <= admin.redis.time()[0]


def test_usage_flushed_after_a_revocation_keeps_the_history_and_no_last_use(admin):
    """Counts taken just before a revocation reach Redis up to a second after it: they join the
    revoked key's history, but do not put back its entry in the last-use hash, which the
    revocation removed and nothing would remove again (a soak left one per revoked key in use)."""
    pair = admin.create_key()
    admin.record_request(admin.issue_token(pair.public_key, pair.secret_key, "a").session, "shapes", 200)
    admin.revoke_key(pair.public_key)
    admin.usage.flush()
    assert [(row.public_key, row.label, row.requests) for row in admin.usage_report()] == [
        (pair.public_key, "(revoked)", 1)
    ]
    assert not admin.redis.hexists(admin.settings.prefix + "last-used", pair.public_key)


def test_usage_waits_out_a_redis_outage(own_redis, settings, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="thalamus")
    store = KeyAdmin(settings.replace(redis_url=own_redis.url))
    pair = store.create_key()
    session = store.issue_token(pair.public_key, pair.secret_key, "a").session
    own_redis.stop()
    for _ in range(3):  # a flush a second: the outage is said once (then once a minute), not each time
        store.record_request(session, "shapes", 200)  # never raises
        store.usage.flush()  # fails, keeps the count
    said = [record.getMessage() for record in caplog.records if record.getMessage().startswith("usage:")]
    assert len([line for line in said if "cannot write counts to Redis" in line]) == 1, said
    monkeypatch.setattr(usage, "OUTAGE_LOG_SECONDS", 0.0)  # a minute later: said again, with how long
    store.usage.flush()
    assert "usage: still cannot write counts to Redis (ConnectionError) after" in caplog.text
    own_redis.start()  # empty: the throw-away server keeps no data
    store.usage.flush()
    assert [(r.requests, r.label) for r in store.usage_report(pair.public_key)] == [(3, "(revoked)")]
    assert "usage: counts written to Redis again" in caplog.text


def test_counts_lost_at_exit_are_said_so_not_promised_a_retry(own_redis, settings, caplog):
    store = KeyAdmin(settings.replace(redis_url=own_redis.url))
    session = store.issue_token(*astuple(store.create_key()), "a").session
    own_redis.stop()  # first: the background flush (every second) must find nothing it can write
    for _ in range(3):
        store.record_request(session, "shapes", 200)
    store.usage.flush(at_exit=True)  # what the exit flush does: there is no next flush
    # The background flush may also have tried meanwhile, and said it will retry: it would.
    [line] = [record.getMessage() for record in caplog.records if "at exit" in record.getMessage()]
    assert "at exit: 3 requests not counted" in line and "will retry" not in line


def test_a_usage_flush_never_takes_a_requests_pool_slot(own_redis, settings):
    """REDIS_URL's ?max_connections= sizes the pool for requests: a flush waiting on a slow Redis
    leaves the one pooled connection to the bearer check that needs it."""
    own = settings.replace(redis_url=own_redis.url + "?max_connections=1")
    store = AuthStore(own)
    pair = store.create_key()
    token = store.issue_token(pair.public_key, pair.secret_key, "a").token
    store.usage.add(pair.public_key, "shapes", error=False)
    redis.Redis.from_url(own_redis.url).execute_command("CLIENT", "PAUSE", 400, "ALL")
    flush = threading.Thread(target=store.usage.flush)
    flush.start()
    while store.usage._counts:  # until the flush has taken them, and waits for Redis
        time.sleep(0.005)
    assert store.verify_token(token, "shapes").public_key == pair.public_key  # waits too, no 503
    flush.join()
    assert [row.requests for row in KeyAdmin(own).usage_report(pair.public_key)] == [1]


def test_a_flush_returns_once_a_flush_under_way_is_done(own_redis, settings):
    """The exit flush that finds the background thread's flush waiting on a slow Redis returns
    only once those counts are in (exit would kill that thread, and lose them)."""
    store = KeyAdmin(settings.replace(redis_url=own_redis.url))
    pair = store.create_key()
    store.usage.add(pair.public_key, "shapes", error=False)
    redis.Redis.from_url(own_redis.url).execute_command("CLIENT", "PAUSE", 400, "WRITE")  # reads go on
    under_way = threading.Thread(target=store.usage.flush)
    under_way.start()
    while store.usage._counts:  # until that flush has taken them, and waits for Redis
        time.sleep(0.005)
    store.usage.flush()
    assert [row.requests for row in store.usage_report(pair.public_key)] == [1]
    under_way.join()


def test_the_largest_backlog_is_counted_once(own_redis, settings):
    """MAX_PENDING entries (what a long outage leaves) go in script calls short enough that none
    times out and is sent again by the client's retry, which would count them twice."""
    store = KeyAdmin(settings.replace(redis_url=own_redis.url, redis_timeout=0.5))
    pair = store.create_key()
    for i in range(store.usage.MAX_PENDING):
        store.usage.add(pair.public_key, f"m{i}", error=False)
    store.usage.flush()
    rows = store.usage_report(pair.public_key)
    assert (len(rows), sum(row.requests for row in rows)) == (store.usage.MAX_PENDING,) * 2


def test_a_flush_whose_answer_came_too_late_is_counted_once(own_redis, settings):
    """A usage flush that times out may have been done all the same (Redis paused, then ran it):
    sent again, it is the same numbered batch, which Redis adds once (it was counted twice)."""
    store = KeyAdmin(settings.replace(redis_url=own_redis.url, redis_timeout=0.3))
    pair = store.create_key()
    store.usage.add(pair.public_key, "shapes", error=False)
    store.usage.flush()  # the script is loaded: the stalled call below runs, not a NOSCRIPT
    for _ in range(5):
        store.usage.add(pair.public_key, "shapes", error=False)
    sleeper = threading.Thread(target=redis.Redis.from_url(own_redis.url).execute_command, args=("DEBUG", "SLEEP", 1))
    sleeper.start()  # Redis stalls a second (a fork, an fsync), then runs what it was sent
    time.sleep(0.1)
    store.usage.flush()  # no answer within 0.3 s: kept for the next flush
    sleeper.join()
    store.usage.add(pair.public_key, "shapes", error=False)
    store.usage.flush()
    assert [row.requests for row in store.usage_report(pair.public_key)] == [7]
    (marker,) = store.redis.keys(settings.prefix + "usage-sent:*")
    assert 0 < store.redis.ttl(marker) <= 3600  # one key a process, gone an hour after its last flush


FORKED = """
import os, sys
from shared.admin import KeyAdmin
from shared.config import Settings
store = KeyAdmin(Settings(redis_url=sys.argv[1], redis_url_is_default=False, prefix=sys.argv[2]))
store.usage.add(sys.argv[3], "shapes", error=False)
store.usage.add(sys.argv[3], "shapes", error=False)
child = os.fork()
if child == 0:
    sys.exit(0)  # its exit flush: the parent's two counts are not its own
os.waitpid(child, 0)
"""


def test_a_forked_child_does_not_count_its_parents_requests(settings):
    """gunicorn forks its workers: a child's exit flush sends only what the child counted."""
    store = KeyAdmin(settings)
    pair = store.create_key()
    run = subprocess.run([sys.executable, "-c", FORKED, settings.redis_url, settings.prefix, pair.public_key],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert [row.requests for row in store.usage_report(pair.public_key)] == [2]


def test_audit_records_who_did_what_and_never_a_secret(admin, raw_redis, env):
    pair = admin.create_key(["shapes"], "ci", rate=Rate(5, 60))
    admin.edit_key(pair.public_key, label="prod")
    new, _, _ = admin.rotate_key(pair.public_key, grace=60)
    admin.revoke_key(pair.public_key)
    events = admin.audit_log()
    assert [e.action for e in events] == ["create", "edit", "rotate", "revoke"]
    assert {(e.user, e.host, e.public_key) for e in events} == {("tester", "box", pair.public_key)}
    assert "models=shapes" in events[0].detail and "rate=5/min" in events[0].detail
    stream = str(raw_redis.xrange(env["THALAMUS_PREFIX"] + "audit"))
    for secret in (pair.secret_key, new.secret_key, "scrypt$"):
        assert secret not in stream
    assert admin.audit_log(since=time.time() + 5) == []
    admin.purge()
    assert [e.action for e in admin.audit_log()] == ["purge"]


def test_audit_stream_is_capped(admin, raw_redis, env):
    pipe = raw_redis.pipeline()
    for _ in range(AUDIT_MAX_ENTRIES + 500):
        pipe.xadd(env["THALAMUS_PREFIX"] + "audit", {"action": "filler"})
    pipe.execute()
    admin.create_key()
    assert raw_redis.xlen(env["THALAMUS_PREFIX"] + "audit") < AUDIT_MAX_ENTRIES + 200


def test_purge_removes_only_the_prefix(admin, raw_redis, env):
    raw_redis.set("foreign:key", "keep me")
    raw_redis.set(env["THALAMUS_PREFIX"].rstrip(":") + "x", "near miss, keep me")
    pair = admin.create_key(rate=Rate(5, 60))
    session = admin.verify_token(admin.issue_token(pair.public_key, pair.secret_key, "a").token)
    admin.record_request(session, "shapes", 200)
    admin.usage.flush()
    with pytest.raises(InvalidCredentials):
        admin.issue_token(pair.public_key, WRONG_SK, "a")
    try:
        assert admin.purge() >= 6  # key, token, key-tokens, rate, usage, last-used, failures, audit
        left = sorted(name[len(env["THALAMUS_PREFIX"]) :] for name in raw_redis.scan_iter(env["THALAMUS_PREFIX"] + "*"))
        assert left == ["audit", "purged"]  # the purge's own event, and its time
        assert raw_redis.get("foreign:key") == "keep me"
        assert raw_redis.get(env["THALAMUS_PREFIX"].rstrip(":") + "x") == "near miss, keep me"
    finally:
        raw_redis.delete("foreign:key", env["THALAMUS_PREFIX"].rstrip(":") + "x")


def test_a_purge_cut_short_leaves_its_trace_in_the_audit(settings, raw_redis):
    """The purge says so before it deletes anything, and deletes the audit stream last: one that
    Redis stops answering halfway leaves "purge-started" behind, not keys gone without a trace."""
    from tests.test_store import ReplyDropper

    KeyAdmin(settings).create_key()
    proxy = ReplyDropper(raw_redis.connection_pool.connection_kwargs["port"], b"UNLINK")
    cut = KeyAdmin(settings.replace(redis_url=proxy.url), actor=Actor("tester", "box"))
    with pytest.raises(ThalamusError, match="Redis unreachable"):
        cut.purge()
    assert proxy.fired
    events = KeyAdmin(settings).audit_log()
    assert [(event.action, event.user) for event in events] == [("purge-started", "tester")]


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
    pair = auth.create_key(["shapes"], "team a", expires=2_000_000_000, rate=Rate(600, 60))
    auth.issue_token(pair.public_key, pair.secret_key, "a")
    [info] = auth.list_keys()
    assert (info.public_key, info.label, info.scopes, info.live_tokens) == (pair.public_key, "team a", ["shapes"], 1)
    assert (info.expires, info.rate, info.last_used, info.expired()) == (2_000_000_000, Rate(600, 60), None, False)


def test_an_address_that_fails_too_often_is_refused(auth, keypair):
    for i in range(10):
        with pytest.raises(InvalidCredentials):
            auth.issue_token("pk_" + str(i) * 43, WRONG_SK, "198.51.100.1")
    with pytest.raises(TooManyRequests) as err:
        auth.issue_token(keypair.public_key, keypair.secret_key, "198.51.100.1")
    assert 1 <= int(err.value.headers["Retry-After"]) <= 60
    assert auth.issue_token(keypair.public_key, keypair.secret_key, "198.51.100.2").token


def test_guessing_at_a_key_slows_the_guessers_not_its_owner(auth, keypair):
    attackers = [f"203.0.113.{i}" for i in range(12)]
    for address in attackers[:10]:
        with pytest.raises(InvalidCredentials):
            auth.issue_token(keypair.public_key, WRONG_SK, address)
    # The key is under attack: an address that failed on it waits, a fresh one gets one try...
    with pytest.raises(TooManyRequests):
        auth.issue_token(keypair.public_key, WRONG_SK, attackers[0])
    with pytest.raises(InvalidCredentials):
        auth.issue_token(keypair.public_key, WRONG_SK, attackers[10])
    with pytest.raises(TooManyRequests):
        auth.issue_token(keypair.public_key, keypair.secret_key, attackers[10])
    # ...while the owner, who has not failed, keeps getting tokens.
    for _ in range(3):
        assert auth.issue_token(keypair.public_key, keypair.secret_key, "192.0.2.10").token


def test_parse_scopes():
    assert parse_scopes(None) is None and parse_scopes("*") is None and parse_scopes(" * ") is None
    for empty in ("", " ", " , ,"):  # never "every model" by accident (an empty shell variable)
        with pytest.raises(BadRequest, match="no model named"):
            parse_scopes(empty)
    assert parse_scopes("shapes, arrows,shapes") == ["arrows", "shapes"]
    with pytest.raises(BadRequest):
        parse_scopes("Bad Name")
