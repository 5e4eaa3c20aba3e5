"""Concurrent rotate/edit/revoke (the real CLI) against threads issuing and using tokens: no
token ever has more rights than its key has now."""

import itertools
import json
import threading
import time

import pytest

from shared.errors import Forbidden, InvalidCredentials, TooManyRequests, Unauthorized
from tests.conftest import subprocess_env
from tests.test_keys import keys

ADDRESSES = itertools.count(1)


def hammer(auth, public_key, secret_key, stop, tokens):
    """Issue tokens with one secret until ``stop`` is set; collect those issued."""
    # Each thread its own address: the failures after a rotation must not lock out the next phase.
    address = f"2001:db8::{next(ADDRESSES):x}"
    while not stop.is_set():
        try:
            tokens.append(auth.issue_token(public_key, secret_key, address).token)
        except (InvalidCredentials, TooManyRequests):
            time.sleep(0.01)


def hammering(auth, public_key, secret_key, tokens, threads=3):
    """Start issuing; the returned function stops it."""
    stop = threading.Event()
    workers = [
        threading.Thread(target=hammer, args=(auth, public_key, secret_key, stop, tokens)) for _ in range(threads)
    ]
    for worker in workers:
        worker.start()

    def finish():
        stop.set()
        for worker in workers:
            worker.join()

    return finish


def rights(auth, token, model):
    try:
        auth.verify_token(token, model)
    except Unauthorized:
        return "none"
    except Forbidden:
        return "other models"
    return "this model"


@pytest.mark.parametrize("round_", range(2))
def test_concurrent_admin_changes_never_leave_a_token_too_many_rights(auth, env, tmp_path, round_):
    run = lambda *args: keys(*args, env=subprocess_env(**env))  # noqa: E731
    assert run("-g", str(tmp_path / "k.json"), "--models", "arrows,shapes").returncode == 0
    pair = json.loads((tmp_path / "k.json").read_text())
    pk, old_secret = pair["public_key"], pair["secret_key"]

    tokens = []
    finish = hammering(auth, pk, old_secret, tokens)
    time.sleep(0.3)
    assert run("--edit", pk, "--models", "arrows").returncode == 0
    time.sleep(0.3)
    # The scope is gone for every token, issued before, during or after the edit.
    assert {rights(auth, token, "shapes") for token in list(tokens)} == {"other models"}
    assert run("--rotate", pk, "-o", str(tmp_path / "new.json"), "--revoke-tokens").returncode == 0
    time.sleep(0.3)
    finish()
    # Every token issued with the old secret is dead, however its issuance overlapped the rotation.
    assert tokens and {rights(auth, token, "arrows") for token in tokens} == {"none"}

    new_secret = json.loads((tmp_path / "new.json").read_text())["secret_key"]
    tokens = []
    finish = hammering(auth, pk, new_secret, tokens)
    time.sleep(0.3)
    assert run("-r", pk).returncode == 0
    finish()
    assert tokens and {rights(auth, token, "arrows") for token in tokens} == {"none"}
    assert auth.list_keys() == []
