"""./start.sh end to end: the whole stack from a copy of the project, over real HTTP."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests

from local import redis_server
from local.helpers import DEMO_MODELS, RedisServer, demo_image, encode, first_label, free_port_range
from tests.conftest import copy_project, processes_under, start_stack, stop_stack, subprocess_env
from tests.test_hostile import read_answer, request

pytestmark = pytest.mark.slow


@pytest.fixture
def stack_env(env):
    return subprocess_env(**env)


def test_keys_token_predict_docs_then_sigterm_leaves_nothing(tmp_path, stack_env):
    folder = copy_project(tmp_path / "thalamus")
    port = free_port_range(2 + len(DEMO_MODELS))
    # A setting left in the shell, wide (and with a typo): not read, and the functions still
    # trust the gateway alone.
    stack = start_stack(folder, port, {**stack_env, "TRUSTED_PROXIES": "10.0.0.0/8,127.0.0.0/8,localhost"})
    try:
        table = "".join(stack.output)
        assert "TRUSTED_PROXIES is not used here" in table
        for name in ("gateway", "token", *(f"predict-{m}" for m in DEMO_MODELS)):
            assert name in table
        assert f"http://localhost:{port}" in table and "./keys.py -g" in table

        # The keys.py line it prints works as printed, in a shell without this stack's REDIS_URL
        # and THALAMUS_PREFIX (it names them: they are not the defaults here).
        line = next(text.strip() for text in table.splitlines() if "./keys.py -g" in text)
        shell = {name: value for name, value in stack_env.items() if name not in ("REDIS_URL", "THALAMUS_PREFIX")}
        generated = subprocess.run(
            ["bash", "-c", line], cwd=folder, env=shell, capture_output=True, text=True, timeout=60
        )
        assert generated.returncode == 0, (line, generated.stderr)
        pair = json.loads((folder / "client.json").read_text())
        reply = requests.post(f"http://localhost:{port}/token.json", json=pair, timeout=10)
        assert reply.status_code == 200
        headers = {"Authorization": f"Bearer {reply.json()['token']}"}
        for model in DEMO_MODELS:
            label = json.loads((folder / "models" / model / "model.json").read_text())["labels"][0]
            answer = requests.post(
                f"{stack.gateway}/models/{model}/predict.json",
                headers=headers,
                timeout=30,
                files={"file": ("x.png", encode(demo_image(model, label, 5)))},
            )
            assert answer.status_code == 200 and answer.json()["prediction"] == label
            assert (
                requests.get(f"{stack.gateway}/models/{model}.json", headers=headers, timeout=10).json()["name"]
                == model
            )
        missing = requests.get(f"{stack.gateway}/models/nope.json", headers=headers, timeout=10)
        assert missing.status_code == 404 and "nope" in missing.json()["error"]
        assert requests.get(f"{stack.gateway}/session.json", headers=headers, timeout=10).status_code == 200
        docs = requests.get(f"{stack.gateway}/docs", timeout=10)
        assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
        assert requests.get(f"{stack.gateway}/docs/", timeout=10).text == docs.text
        for name in ("token", *DEMO_MODELS):
            spec = requests.get(f"{stack.gateway}/openapi/{name}.json", timeout=10)
            assert spec.status_code == 200 and spec.json()["openapi"].startswith("3.")
        assert requests.get(f"{stack.gateway}/readyz", timeout=10).status_code == 200

        # Through the gateway the per-address limit still holds (the functions read the address
        # the gateway forwards), even for a client that claims a new address every time, and so
        # does calling the token function directly: ten failures under ten unknown keys, half of
        # them past the gateway, then even a good key waits.
        for i in range(10):
            wrong = {**pair, "public_key": "pk_" + str(i) * 43}
            forged = {"X-Forwarded-For": f"203.0.113.{i}", "Forwarded": f"for=198.51.100.{i}"}
            url = f"http://127.0.0.1:{port + 1}" if i % 2 else stack.gateway
            reply = requests.post(f"{url}/token.json", json=wrong, headers=forged, timeout=10)
            assert reply.status_code == 401
        limited = requests.post(f"{stack.gateway}/token.json", json=pair, timeout=10)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0

        again = start_stack(folder, port + 10, stack_env, wait=False)
        assert again.proc.wait(60) != 0
        assert "already up" in "".join(again.output)
    finally:
        stop_stack(stack)
    assert stack.proc.returncode == 0
    time.sleep(0.5)
    assert processes_under(folder) == []


def test_port_in_use_is_named_and_nothing_is_left(tmp_path, stack_env):
    folder = copy_project(tmp_path / "thalamus")
    port = free_port_range(2 + len(DEMO_MODELS))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port + 1))
        busy.listen()
        stack = start_stack(folder, port, stack_env, wait=False)
        assert stack.proc.wait(60) == 1
    text = "".join(stack.output)
    assert f"port {port + 1}" in text and "in use" in text
    assert processes_under(folder) == []


@pytest.mark.parametrize("variable, value, words", [("PORT", "abc", "PORT must be an integer"),
                                                    ("PORT", "70000", "PORT must be a TCP port"),
                                                    ("REDIS_URL", "bogus://x", "not a usable Redis URL")])  # fmt: skip
def test_a_bad_setting_is_one_line_even_for_help(variable, value, words):
    """$PORT is the gateway's port, read and checked as every other setting is."""
    env = {**subprocess_env(), variable: value}
    for args in ([], ["--port", "0"]):
        result = subprocess.run([sys.executable, "-m", "local.stack", *args], env=env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 1 and result.stderr.strip() == result.stderr.strip().splitlines()[0]
        assert words in result.stderr and "Traceback" not in result.stderr
    for port in ("65534", "-3"):  # the functions take the ports after the gateway's
        result = subprocess.run([sys.executable, "-m", "local.stack", "--port", port], env=subprocess_env(),
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 1 and "TCP ports run from 1 to 65535" in result.stderr, result.stderr
    helped = subprocess.run([sys.executable, "-m", "local.stack", "--help"], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert helped.returncode == 0 and "--port" in helped.stdout


def test_a_dying_function_is_reported(tmp_path, stack_env):
    folder = copy_project(tmp_path / "thalamus")
    port = free_port_range(2 + len(DEMO_MODELS))
    stack = start_stack(folder, port, stack_env)
    try:
        first_model = [
            p
            for p in processes_under(folder)
            if f"--port {port + 2} " in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")
        ]
        os.kill(min(first_model), signal.SIGKILL)  # the function's process
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "exited" not in "".join(stack.output):
            time.sleep(0.1)
        report = [line for line in stack.output if "exited with code" in line]
        assert report and report[0].startswith(f"start.sh: predict-{sorted(DEMO_MODELS)[0]} ")
        assert stack.proc.poll() is None  # the rest keeps running
        assert requests.get(f"{stack.gateway}/healthz", timeout=5).status_code == 200
        # The gateway finds nothing answering on its port.
        deadline = time.monotonic() + 10
        while (
            dead := requests.get(f"{stack.gateway}/models/{sorted(DEMO_MODELS)[0]}.json", timeout=10)
        ).status_code != 502 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dead.status_code == 502 and "not answering" in dead.json()["error"]
        assert requests.get(f"{stack.gateway}/readyz", timeout=10).status_code == 503
    finally:
        stop_stack(stack)
    time.sleep(0.5)
    assert processes_under(folder) == []


def local_redis_free() -> bool:
    return redis_server.probe("127.0.0.1", 6379) == "none"


@pytest.mark.parametrize("own_redis", [False, True], ids=["given-redis", "own-redis"])
def test_sigkill_leaves_nothing_behind(tmp_path, stack_env, own_redis):
    """kill -9 of start.sh: every child (functions, gateway, and the Redis it started) follows."""
    if own_redis and not local_redis_free():
        pytest.skip("127.0.0.1:6379 is in use; start.sh would not start its own Redis")
    folder = copy_project(tmp_path / "thalamus")
    env = {k: v for k, v in stack_env.items() if k != "REDIS_URL"} if own_redis else stack_env
    stack = start_stack(folder, free_port_range(2 + len(DEMO_MODELS)), env)
    try:
        assert ("started local Redis" in "".join(stack.output)) == own_redis
        assert len(processes_under(folder)) >= 3 + own_redis
        stack.proc.kill()
        stack.proc.wait(10)
        deadline = time.monotonic() + 10
        while processes_under(folder) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_under(folder) == []
        if own_redis:
            assert local_redis_free()
    finally:
        for pid in processes_under(folder):  # only if the test failed: never leave them running
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_requests_in_flight_when_stopped_finish_before_its_redis_stops(tmp_path, stack_env):
    """SIGTERM (as Ctrl-C) while requests are arriving, at the gateway and at the functions: the
    gateway finishes what it holds before the functions stop, the functions finish theirs and write
    the usage counts they hold before start.sh stops the Redis it started: tokens are still issued
    and predictions answered and counted."""
    if not local_redis_free():
        pytest.skip("127.0.0.1:6379 is in use; start.sh would not start its own Redis")
    folder = copy_project(tmp_path / "thalamus")
    env = {k: v for k, v in stack_env.items() if k != "REDIS_URL"}
    stack = start_stack(folder, free_port_range(2 + len(DEMO_MODELS)), env)
    try:
        with contextlib.ExitStack() as closing:
            assert stack.keys("-g", "client.json").returncode == 0
            pair = json.loads((folder / "client.json").read_text())
            token = requests.post(f"{stack.gateway}/token.json", json=pair, timeout=10).json()["token"]
            table = "".join(stack.output)
            model = DEMO_MODELS[0]
            image = encode(demo_image(model, first_label(model), 1))
            head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
            issue = ("/token.json", ["Content-Type: application/json"], json.dumps(pair).encode())
            predict = (
                f"/models/{model}/predict.json",
                ["Content-Type: multipart/form-data; boundary=b", f"Authorization: Bearer {token}"],
                head + image + b"\r\n--b--\r\n",
            )
            uploads = [("gateway", *issue), ("gateway", *predict), ("token", *issue), (f"predict-{model}", *predict)]
            arriving = []
            for name, path, headers, body in uploads:  # all but the last bytes of each body
                port = int(re.search(rf"{name} +http://localhost:(\d+)", table).group(1))
                sock = closing.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
                sock.sendall(request("POST", path, *headers, f"Content-Length: {len(body)}", body=body[:-10]))
                arriving.append((sock, body[-10:]))
            time.sleep(0.5)  # the gateway and the functions have the requests
            stack.proc.send_signal(signal.SIGTERM)
            answers = []
            for i, (sock, rest) in enumerate(arriving):
                # A second for the gateway's two (a Redis told to stop at the same time is gone by
                # then), and the same again after them for the functions' own (the gateway has
                # stopped by then, and the functions are told to stop next).
                if i in (0, 2):
                    time.sleep(1)
                sock.sendall(rest)
                answers.append(read_answer(closing.enter_context(sock.makefile("rb")), "POST"))
        assert [status for status, _, _ in answers] == [200] * 4, answers
        assert all(json.loads(answers[i][2])["token"] for i in (0, 2))
        assert all(json.loads(answers[i][2])["prediction"] == first_label(model) for i in (1, 3))
        assert stack.proc.wait(30) == 0 and local_redis_free() and processes_under(folder) == []
        usage = stack.keys("--usage", pair["public_key"], "--json")  # restarts the local Redis from its data
        assert usage.returncode == 0, usage.stderr
        assert [(row["model"], row["requests"]) for row in json.loads(usage.stdout)] == [(model, 2)]
    finally:
        stop_stack(stack)
        subprocess.run([sys.executable, "-m", "local.redis_server", "stop"], cwd=folder, env=env, timeout=30)
        for pid in processes_under(folder):  # only if the test failed: never leave them running
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_redis_server_stop_stops_only_the_local_redis(tmp_path, stack_env):
    """keys.py leaves its Redis running; `python -m local.redis_server stop` stops it, data kept."""
    if not local_redis_free():
        pytest.skip("127.0.0.1:6379 is in use; the local Redis cannot be started here")
    folder = copy_project(tmp_path / "thalamus")
    env = {k: v for k, v in stack_env.items() if k != "REDIS_URL"}

    def stop():
        return subprocess.run(
            [sys.executable, "-m", "local.redis_server", "stop"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    stranger = None
    try:
        generated = subprocess.run(
            [str(folder / "keys.py"), "-g", "k.json"], cwd=folder, env=env, capture_output=True, text=True, timeout=60
        )
        assert generated.returncode == 0 and "started the local Redis" in generated.stderr
        assert processes_under(folder)  # keys.py has exited; its Redis runs on
        stopped = stop()
        assert stopped.returncode == 0 and "stopped the local Redis" in stopped.stdout, stopped.stderr
        assert local_redis_free() and processes_under(folder) == []
        listed = subprocess.run(  # restarts it from the kept data
            [str(folder / "keys.py"), "-l"], cwd=folder, env=env, capture_output=True, text=True, timeout=60
        )
        assert generated.stdout.strip() in listed.stdout
        assert stop().returncode == 0
        again = stop()
        assert again.returncode == 0 and "no Redis is running" in again.stdout

        stranger = RedisServer(6379, tmp_path / "other").start()  # someone else's Redis
        refused = stop()
        assert refused.returncode == 1 and "not the one this project started" in refused.stderr
        assert not local_redis_free()
    finally:
        if stranger:
            stranger.stop()
        with contextlib.suppress(redis.ConnectionError):
            if processes_under(folder):
                redis.Redis(port=6379).shutdown(nosave=True)
