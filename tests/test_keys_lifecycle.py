"""keys.py for a key's whole life: expiry, edit, rotation, rates, usage and audit, as a subprocess
against a real Redis; bad input changes nothing."""

import json
import os
import pwd
import socket
import stat
import time

import pytest

from shared.config import Rate
from shared.errors import Forbidden, InvalidCredentials, Unauthorized
from tests.conftest import subprocess_env
from tests.test_keys import keys


@pytest.fixture
def run(env):
    return lambda *args, **extra: keys(*args, env=subprocess_env(**env, **extra))


@pytest.fixture
def generate(run, tmp_path):
    """``generate(*options, **environment)`` → the new keypair (as a dict)."""

    def make(*options, **env):
        path = tmp_path / f"k{len(list(tmp_path.glob('k*.json')))}.json"
        result = run("-g", str(path), *options, **env)
        assert result.returncode == 0, result.stderr
        return json.loads(path.read_text())

    return make


def test_expires_caps_the_token_and_the_key_then_stops_working(generate, auth, run):
    pair = generate("--expires", "3s")
    issued = auth.issue_token(pair["public_key"], pair["secret_key"], "t")
    assert 1 <= issued.ttl <= 3
    time.sleep(3.2)
    with pytest.raises(InvalidCredentials):
        auth.issue_token(pair["public_key"], pair["secret_key"], "t")
    listed = run("-l").stdout
    assert "EXPIRED" in listed and "ago" in listed
    # Its token still sits in Redis until its TTL, but is refused: not listed as live.
    assert [key["live_tokens"] for key in json.loads(run("-l", "--json").stdout)] == [0]
    events = json.loads(run("--audit", "--json").stdout)
    assert [e["action"] for e in events] == ["create", "expired"]
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(auth.list_keys()[0].expires))
    assert events[1]["detail"] == f"expiry reached at {expires}"


@pytest.mark.parametrize("when", ["2099-12-31", "2099-12-31T12:30", "2099-12-31T12:30:00+02:00"])
def test_expires_takes_iso_dates(generate, auth, when):
    pair = generate("--expires", when)
    [info] = auth.list_keys()
    assert time.strftime("%Y-%m-%d", time.gmtime(info.expires)) == "2099-12-31"
    assert auth.issue_token(pair["public_key"], pair["secret_key"], "t").ttl == 3600


def test_rate_and_default_rate(generate, auth):
    given = generate("--rate", "600/min")
    default = generate(DEFAULT_KEY_RATE="5/s")
    unlimited = generate("--rate", "none", DEFAULT_KEY_RATE="5/s")
    rates = {info.public_key: info.rate for info in auth.list_keys()}
    assert rates == {
        given["public_key"]: Rate(600, 60),
        default["public_key"]: Rate(5, 1),
        unlimited["public_key"]: None,
    }


def test_edit_changes_what_is_given_and_live_tokens_follow(generate, auth, run):
    pair = generate("--models", "arrows,shapes", "--label", "a")
    token = auth.issue_token(pair["public_key"], pair["secret_key"], "t").token
    result = run("--edit", pair["public_key"], "--models", "arrows", "--rate", "2/min", "--expires", "30d")
    assert result.returncode == 0 and "models=arrows" in result.stdout and "rate=2/min" in result.stdout
    with pytest.raises(Forbidden):
        auth.verify_token(token, "shapes")
    assert auth.verify_token(token, "arrows").headers["RateLimit-Limit"] == "2"
    [info] = auth.list_keys()
    assert (info.label, info.scopes, info.rate) == ("a", ["arrows"], Rate(2, 60))
    assert 29.9 * 86400 < info.expires - time.time() <= 30 * 86400
    assert run("--edit", pair["public_key"], "--label", "b", "--models", "*", "--expires", "never").returncode == 0
    [info] = auth.list_keys()
    assert (info.label, info.scopes, info.expires) == ("b", None, None)


def test_rotate_writes_a_new_secret_for_the_same_key(generate, auth, run, tmp_path):
    pair = generate("--models", "shapes", "--rate", "9/min")
    live = auth.issue_token(pair["public_key"], pair["secret_key"], "t").token
    out = tmp_path / "rotated.json"
    result = run("--rotate", pair["public_key"], "-o", str(out))
    assert result.returncode == 0 and "stopped working" in result.stdout
    new = json.loads(out.read_text())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert new["public_key"] == pair["public_key"] and new["secret_key"] not in result.stdout + result.stderr
    with pytest.raises(InvalidCredentials):
        auth.issue_token(pair["public_key"], pair["secret_key"], "t")
    assert auth.issue_token(new["public_key"], new["secret_key"], "t").session.scopes == ["shapes"]
    assert auth.verify_token(live).public_key == pair["public_key"]

    again = tmp_path / "again.json"
    result = run("--rotate", pair["public_key"], "-o", str(again), "--grace", "1h", "--revoke-tokens")
    assert result.returncode == 0 and "works until" in result.stdout and "2 live token(s)" in result.stdout
    with pytest.raises(Unauthorized):
        auth.verify_token(live)
    assert auth.issue_token(pair["public_key"], new["secret_key"], "t")  # during the grace period
    assert auth.issue_token(pair["public_key"], json.loads(again.read_text())["secret_key"], "t")


def test_usage_and_last_use(generate, auth, run):
    pair = generate("--label", "team")
    session = auth.issue_token(pair["public_key"], pair["secret_key"], "t").session
    for status in (200, 200, 404):
        auth.record_request(session, "shapes", status)
    auth.usage.flush()
    table = run("--usage").stdout.splitlines()
    assert table[0].split() == ["PUBLIC", "KEY", "LABEL", "MODEL", "REQUESTS", "ERRORS", "LAST", "USED"]
    assert table[1].split()[:5] == [pair["public_key"], "team", "shapes", "3", "1"]
    [row] = json.loads(run("--usage", pair["public_key"], "--days", "1", "--json").stdout)
    assert (row["model"], row["requests"], row["errors"]) == ("shapes", 3, 1)
    assert "ago" in run("-l").stdout.splitlines()[1].split("  ")[-1]
    for days in ("0", "91", "800000"):  # usage is kept 90 days; a huge count was a traceback
        refused = run("--usage", "--days", days)
        assert refused.returncode == 1 and "from 1 to 90" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads(run("--usage", "--days", "90", "--json").stdout)[0]["requests"] == 3


def test_audit_names_the_user_and_host(generate, run, tmp_path):
    pair = generate()
    run("--edit", pair["public_key"], "--label", "x")
    run("--rotate", pair["public_key"], "-o", str(tmp_path / "r.json"))
    run("-r", pair["public_key"])
    run("-p", "--yes", LOGNAME="ceo", USER="ceo")  # the user id's name is recorded, not these
    events = json.loads(run("--audit", "--json").stdout)
    assert [e["action"] for e in events] == ["purge"]  # the purge removed the earlier events
    user = pwd.getpwuid(os.getuid()).pw_name
    assert events[0]["user"] == user != "ceo" and events[0]["host"] == socket.gethostname()
    pair = generate()
    table = run("--audit", "--since", "1h").stdout
    assert "create" in table and pair["public_key"] in table and f"{user}@" in table
    assert pair["secret_key"] not in table
    assert run("--audit", "--since", "1s").returncode == 0
    ages = run("--audit", "--since", "99999999d")  # further back than 1970: every event, no traceback
    assert ages.returncode == 0 and pair["public_key"] in ages.stdout, ages.stderr


def test_models_warns_about_names_without_a_bundle(run, tmp_path):
    result = run("-g", str(tmp_path / "k.json"), "--models", "shapes,elsewhere")
    assert result.returncode == 0
    assert "warning" in result.stderr and "elsewhere" in result.stderr and "shapes" not in result.stderr


@pytest.mark.parametrize(
    "options, words",
    [
        (["--expires", "90x"], "duration"),
        (["--expires", "0d"], "more than zero"),
        (["--expires=-3d"], "more than zero"),
        (["--expires", "2001-01-01"], "in the past"),
        (["--expires", "31/12/2099"], "ISO date"),
        (["--rate", "600/fortnight"], "600/min"),
        (["--rate", "0/s"], "at least 1"),
        (["--models", "Not Valid"], "invalid model name"),
    ],
)
def test_bad_key_settings_change_nothing(run, generate, auth, tmp_path, options, words):
    pair = generate()
    before = (auth.list_keys(), run("--audit", "--json").stdout)
    for args in (["-g", str(tmp_path / "new.json"), *options], ["--edit", pair["public_key"], *options]):
        result = run(*args)
        assert result.returncode == 1 and words in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new.json").exists()
    assert (auth.list_keys(), run("--audit", "--json").stdout) == before


def test_unknown_revoked_or_expired_keys_are_one_line_errors(run, generate, tmp_path, auth):
    ghost = "pk_" + "g" * 43
    revoked = generate()
    run("-r", revoked["public_key"])
    expired = generate("--expires", "1s")
    time.sleep(1.1)
    cases = [
        (["--edit", ghost, "--label", "x"], "no such key"),
        (["--rotate", ghost, "-o", str(tmp_path / "r.json")], "no such key"),
        (["--rotate", revoked["public_key"], "-o", str(tmp_path / "r.json")], "no such key"),
        (["--rotate", expired["public_key"], "-o", str(tmp_path / "r.json")], "expired"),
        (["--rotate", expired["public_key"], "-o", str(tmp_path / "r.json"), "--grace", "0h"], "more than zero"),
        (["--usage", ghost], "no such key"),
        (["-r", "pk_short"], "not a public key"),
        (["--edit", ghost + "\n", "--label", "x"], "not a public key"),
        (["--audit", "--since", "soon"], "duration"),
    ]
    for args, words in cases:
        result = run(*args)
        assert result.returncode == 1 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.json").exists()
    assert [info.public_key for info in auth.list_keys()] == [expired["public_key"]]
    secret = revoked["secret_key"]  # pasted where a public key goes: not repeated on the terminal
    for args in (["-r", secret], ["--usage", secret], ["--edit", json.dumps(revoked), "--label", "x"]):
        result = run(*args)
        assert result.returncode == 1 and "not a public key" in result.stderr and secret not in result.stderr
    assert "that is a secret key" in run("-r", secret).stderr
