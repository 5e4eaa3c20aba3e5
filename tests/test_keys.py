"""keys.py, run as admins run it: a subprocess, every flag and exit path."""

import contextlib
import importlib.util
import json
import os
import pty
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from local import ROOT, redis_server
from local.helpers import free_port
from shared.admin import KeyAdmin
from shared.credentials import Keypair
from tests.conftest import subprocess_env


def keys(*args, env=None, python=sys.executable, cwd=ROOT, script=ROOT / "keys.py"):
    return subprocess.run(
        [python, str(script), *args], capture_output=True, text=True, env=env or subprocess_env(), cwd=cwd, timeout=60
    )


@pytest.fixture
def run(env):
    def run(*args):
        return keys(*args, env=run.env)

    run.env = subprocess_env(**env)
    return run


def test_generate_writes_private_file_and_prints_only_public_key(run, tmp_path, auth):
    path = tmp_path / "client.json"
    result = run("-g", str(path), "--label", "ci")
    assert result.returncode == 0, result.stderr
    pair = json.loads(path.read_text())
    assert result.stdout.strip() == pair["public_key"]
    assert pair["secret_key"] not in result.stdout + result.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.issue_token(pair["public_key"], pair["secret_key"], "t").token


def test_generate_with_models_scopes_the_key(run, tmp_path, auth):
    path = tmp_path / "k.json"
    assert run("-g", str(path), "--models", "shapes,arrows").returncode == 0
    pair = json.loads(path.read_text())
    issued = auth.issue_token(pair["public_key"], pair["secret_key"], "t")
    assert issued.session.scopes == ["arrows", "shapes"]


@pytest.mark.parametrize("name", ["", "folder/", "."])
def test_generate_needs_a_file_name(run, tmp_path, name):
    (tmp_path / "folder").mkdir()
    result = keys("-g", name, env=run.env, cwd=tmp_path)
    assert result.returncode == 1 and "names no file" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"] and not any((tmp_path / "folder").iterdir())


def test_labels_cannot_forge_rows_of_the_list(run, tmp_path, auth):
    forged = "evil\npk_" + "F" * 43 + "  root  *  unlimited"
    result = run("-g", str(tmp_path / "k.json"), "--label", forged)
    assert result.returncode == 1 and "printable" in result.stderr and not (tmp_path / "k.json").exists()
    auth.create_key(label=forged)  # another client may store one all the same: -l shows it escaped
    rows = run("-l").stdout.splitlines()
    assert len(rows) == 2 and "evil\\npk_" in rows[1]


@pytest.mark.parametrize("models", ["", " ", ","])
def test_an_empty_model_list_is_refused_not_read_as_every_model(run, tmp_path, auth, models):
    pair = auth.create_key(["arrows"])
    result = run("--edit", pair.public_key, "--models", models)
    assert result.returncode == 1 and "no model named" in result.stderr
    assert auth.list_keys()[0].scopes == ["arrows"]
    assert run("-g", str(tmp_path / "k.json"), "--models", models).returncode == 1
    assert not (tmp_path / "k.json").exists()


def test_a_redis_that_falls_silent_mid_command_keeps_the_new_keys_file(own_redis, settings, tmp_path):
    """Redis took the command, fell silent past the client's timeout, then ran it: the key is in
    force, so the file that holds its secret stays and keys.py says so (it used to delete the
    file, leaving a key in force whose secret nobody had)."""
    spec = importlib.util.spec_from_file_location("keys_cli", ROOT / "keys.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    admin = KeyAdmin(settings.replace(redis_url=own_redis.url))
    admin.list_keys()  # connected, handshake done: the next command goes straight out
    pair, path = Keypair.new(), tmp_path / "k.json"
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    resume = threading.Timer(2 * settings.redis_timeout, os.kill, (own_redis.proc.pid, signal.SIGCONT))
    resume.start()
    try:
        with pytest.raises(SystemExit, match="stopped answering.*kept") as failed:
            cli.write_keypair(str(path), pair, lambda: admin.create_key(pair=pair))
    finally:
        resume.join()
    assert str(path) in str(failed.value)
    assert json.loads(path.read_text())["secret_key"] == pair.secret_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    time.sleep(1.1)  # the client's breaker, open after the timeout, lets it try Redis again
    assert [key.public_key for key in admin.list_keys()] == [pair.public_key]  # Redis ran it as it woke
    assert admin.issue_token(pair.public_key, pair.secret_key, "t").token  # in force: the file was needed


def test_a_redis_that_never_took_the_command_leaves_no_file(own_redis, env, tmp_path):
    own = subprocess_env(**{**env, "REDIS_URL": own_redis.url})
    os.kill(own_redis.proc.pid, signal.SIGSTOP)  # the connection's handshake gets no answer
    try:
        result = keys("-g", str(tmp_path / "k.json"), env=own)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    assert result.returncode == 1 and "unreachable" in result.stderr and not (tmp_path / "k.json").exists()


def test_generate_refuses_to_overwrite(run, tmp_path):
    path = tmp_path / "k.json"
    path.write_text("precious")
    result = run("-g", str(path))
    assert result.returncode != 0
    assert "exists" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert path.read_text() == "precious"


def test_generate_bad_models_leaves_no_file(run, tmp_path, auth):
    path = tmp_path / "k.json"
    result = run("-g", str(path), "--models", "Not Valid")
    assert result.returncode != 0 and "invalid model name" in result.stderr
    assert not path.exists() and auth.list_keys() == []


def test_list_shows_keys_without_secrets(run, tmp_path):
    path = tmp_path / "k.json"
    run("-g", str(path), "--label", "team-a", "--models", "shapes", "--rate", "600/min", "--expires", "90d")
    pair = json.loads(path.read_text())
    result = run("-l")
    assert result.returncode == 0
    header, row = result.stdout.splitlines()
    assert header.split() == ["PUBLIC", "KEY", "LABEL", "MODELS", "RATE", "EXPIRES", "TOKENS", "LAST", "USED"]
    assert pair["public_key"] in row and "team-a" in row and "shapes" in row and "600/min" in row
    assert "(in 90d)" in row and row.endswith("never")
    assert pair["secret_key"] not in result.stdout and "scrypt" not in result.stdout


def test_a_reader_that_leaves_early_is_no_error(env, tmp_path):
    # keys.py --audit | head: the pipe closes under keys.py; no traceback, no "Exception ignored".
    for n in range(3):
        keys("-g", str(tmp_path / f"k{n}.json"), env=subprocess_env(**env))
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "keys.py"), "--audit"],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(**env),
        timeout=60,
    )
    os.close(write)
    assert proc.returncode == 1 and proc.stderr == ""


def test_list_without_keys_says_so(run):
    result = run("-l")
    assert result.returncode == 0 and result.stdout.startswith("no keys under THALAMUS_PREFIX")
    assert json.loads(run("-l", "--json").stdout) == []


def test_list_json(run, tmp_path, auth):
    run("-g", str(tmp_path / "k.json"), "--models", "shapes", "--expires", "2099-01-31")
    pair = json.loads((tmp_path / "k.json").read_text())
    auth.issue_token(pair["public_key"], pair["secret_key"], "t")
    [key] = json.loads(run("-l", "--json").stdout)
    assert key["public_key"] == pair["public_key"] and key["models"] == ["shapes"] and key["live_tokens"] == 1
    assert key["expires"] == "2099-01-31T00:00:00Z" and key["expired"] is False
    assert key["rate"] is None and key["last_used"] is None and key["created"].endswith("Z")


def test_revoke_then_revoke_again(run, keypair, auth):
    auth.issue_token(keypair.public_key, keypair.secret_key, "t")
    result = run("-r", keypair.public_key)
    assert result.returncode == 0 and "1 live token" in result.stdout
    again = run("-r", keypair.public_key)
    assert again.returncode != 0 and "no such key" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_purge_keeps_foreign_data(run, keypair, raw_redis):
    raw_redis.set("someone-else:data", "1")
    try:
        result = run("-p", "--yes")
        assert result.returncode == 0 and "purged" in result.stdout
        assert run("-l").stdout.startswith("no keys")
        assert raw_redis.get("someone-else:data") == "1"
    finally:
        raw_redis.delete("someone-else:data")


def test_purge_needs_yes_when_stdin_is_not_a_terminal(run, keypair, auth):
    result = run("-p")
    assert result.returncode == 1 and "--yes" in result.stderr and len(result.stderr.splitlines()) == 1
    assert len(auth.list_keys()) == 1


@pytest.mark.parametrize("answer, deleted", [("n\n", False), ("y\n", True)])
def test_purge_asks_on_a_terminal(env, keypair, auth, answer, deleted):
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "keys.py"), "-p"],
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(**env),
        text=True,
    )
    os.close(follower)
    os.write(leader, answer.encode())
    out, _ = proc.communicate(timeout=60)
    os.close(leader)
    assert "Delete every key" in out and env["THALAMUS_PREFIX"] in out
    assert proc.returncode == (0 if deleted else 1)
    assert (auth.list_keys() == []) is deleted


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:{port}/0", "redis://:***@127.0.0.1:{port}/0"),
        ("redis://admin:admin@127.0.0.1:{port}/0", "redis://admin:***@127.0.0.1:{port}/0"),  # as the user's name
        ("redis://:redis@127.0.0.1:{port}/0", "redis://:***@127.0.0.1:{port}/0"),  # as the scheme's name
        ("redis://127.0.0.1:{port}/0?password=hunter2", "redis://127.0.0.1:{port}/0?password=***"),  # redis-py reads it
        ("redis://hunter2@127.0.0.1:{port}/0", "redis://***@127.0.0.1:{port}/0"),  # a user part alone may be one
        ("redis://127.0.0.1:{port}/0?pass%77ord=hunter2", "redis://127.0.0.1:{port}/0?pass%77ord=***"),  # unquoted
        (
            "rediss://:pw@127.0.0.1:{port}/0?ssl_password=hunter2&db=0",  # the TLS key file's
            "rediss://:***@127.0.0.1:{port}/0?ssl_password=***&***",  # what follows may be the password's
        ),
    ],
)
def test_unreachable_redis_names_the_url_without_its_password(url, shown):
    port = free_port()
    result = keys("-l", env=subprocess_env(REDIS_URL=url.format(port=port)))
    assert result.returncode != 0
    assert "unreachable" in result.stderr and shown.format(port=port) in result.stderr
    assert "Connection refused" in result.stderr  # why, in redis-py's words (max clients, a timeout, ...)
    assert len(result.stderr.strip().splitlines()) == 1 and "hunter2" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-g"],
        ["-l", "-p"],
        ["--models", "a", "-l"],
        ["--rotate", "pk_x"],
        ["--edit", "pk_x"],
        ["--grace", "1h", "-l"],
        ["--json", "-r", "pk_x"],
        ["--yes", "-l"],
        ["--days", "3", "-l"],
        ["--days", "30", "-l"],  # the default's value too
        ["--since", "1d", "--usage"],
    ],
)
def test_usage_errors(args):
    result = keys(*args)
    assert result.returncode == 2 and "usage" in result.stderr


def test_help_shows_every_option_with_an_example():
    result = keys("-h")
    assert result.returncode == 0 and "-g FILE" in result.stdout
    options = ["-g", "-l", "--edit", "--rotate", "-r", "--usage", "--audit", "-p", "--models", "--label", "--rate"]
    options += ["--expires", "-o", "--grace", "--revoke-tokens", "--days", "--since", "--json", "--yes"]
    examples = result.stdout.split("examples:")[1]
    for option in options:
        assert option in result.stdout.split("examples:")[0]
        assert f" {option} " in examples or f" {option}\n" in examples, option


def test_runs_with_a_python_that_lacks_the_packages():
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    probe = subprocess.run([base_python, "-c", "import redis, scrypt"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{base_python} has redis and scrypt; nothing to re-exec")
    result = keys("-h", python=str(base_python), env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0 and "-g FILE" in result.stdout


@pytest.fixture
def project_copy(tmp_path):
    """keys.py with the packages it imports in a fresh folder, so .thalamus/ lands there."""
    if redis_server.probe("127.0.0.1", 6379) != "none":
        pytest.skip("127.0.0.1:6379 is in use; the local-Redis start cannot be observed")
    copy = tmp_path / "project"
    copy.mkdir()
    shutil.copy(ROOT / "keys.py", copy)
    for package in ("shared", "local"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def local_env():
    return {k: v for k, v in subprocess_env().items() if k != "REDIS_URL"}


def test_starts_local_redis_and_keys_survive_restart(project_copy):
    try:
        gen = keys("-g", "k.json", env=local_env(), cwd=project_copy, script=project_copy / "keys.py")
        assert gen.returncode == 0, gen.stderr
        assert "started the local Redis" in gen.stderr and gen.stdout.startswith("pk_")
        assert ".venv/bin/python -m local.redis_server stop" in gen.stderr
        assert (project_copy / ".thalamus" / "redis" / "appendonly.aof").exists() or (
            project_copy / ".thalamus" / "redis" / "appendonlydir"
        ).exists()
        redis.Redis(port=6379).shutdown(nosave=True)  # stop everything
        listed = keys("-l", env=local_env(), cwd=project_copy, script=project_copy / "keys.py")
        assert gen.stdout.strip() in listed.stdout
    finally:
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=6379).shutdown(nosave=True)


def test_port_6379_taken_by_something_else(project_copy):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 6379))
    server.listen()

    def answer():
        conn, _ = server.accept()
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        result = keys("-l", env=local_env(), cwd=project_copy, script=project_copy / "keys.py")
    finally:
        server.close()
    assert result.returncode != 0 and "not Redis" in result.stderr
