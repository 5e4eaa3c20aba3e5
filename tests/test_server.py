"""The launcher (shared/server.py): one process per function unless WORKERS asks for more, that
stops with whatever started it."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from local import ROOT
from local.helpers import demo_image, encode, free_port, function_command, wait_http
from shared import cgroup
from tests.conftest import subprocess_env
from tests.test_model import scrape, server_pid


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_one_process_serves_by_default(serve_function, bearer):
    base = serve_function("predict", MODEL_NAME="shapes")
    pid = server_pid(int(base.rsplit(":", 1)[1]))
    assert requests.get(f"{base}/models/shapes.json", headers=bearer, timeout=10).status_code == 200
    assert children(pid) == []  # no gunicorn master holding a second copy of what it loaded
    assert scrape(base, "thalamus_worker_processes") == 1
    assert scrape(base, "thalamus_process_starts_total") == 1


def test_workers_2_runs_a_master_and_two_forked_workers(serve_function, bearer):
    base = serve_function("predict", MODEL_NAME="shapes", WORKERS="2")
    pid = server_pid(int(base.rsplit(":", 1)[1]))
    deadline = time.monotonic() + 10
    while len(children(pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(children(pid)) == 2
    for _ in range(6):
        assert requests.get(f"{base}/models/shapes.json", headers=bearer, timeout=10).status_code == 200
    assert scrape(base, "thalamus_worker_processes") == 2
    assert scrape(base, "thalamus_model_interpreters") == 2  # one each, not the master's


def test_a_function_serves_with_docstrings_and_asserts_left_out(serve_function, bearer):
    """As the images run it (PYTHONOPTIMIZE=2, python -OO): nothing on its way reads a docstring
    or needs an assert, from the command line to a prediction and the API's pages."""
    base = serve_function("predict", MODEL_NAME="shapes", PYTHONOPTIMIZE="2")
    for label in ("circle", "triangle"):
        image = encode(demo_image("shapes", label, 7), "JPEG")
        reply = requests.post(f"{base}/models/shapes/predict.json", headers=bearer, timeout=30,
                              files={"file": ("x.jpg", image)})  # fmt: skip
        assert reply.status_code == 200 and reply.json()["prediction"] == label
    assert requests.get(f"{base}/openapi.json", timeout=10).json()["info"]["title"]
    assert requests.get(f"{base}/docs/", timeout=10).status_code == 200
    assert scrape(base, "thalamus_process_starts_total") == 1


def test_a_server_stops_when_whatever_started_it_dies(env, tmp_path):
    """kill -9 of the parent (start.sh's stack, a shell): the function notices within seconds and
    exits instead of serving on as an orphan, and says why (it stopped without a word)."""
    port = free_port()
    command = " ".join(function_command("token", port))
    log = tmp_path / "token.log"
    with log.open("wb") as out:
        parent = subprocess.Popen(["sh", "-c", f"{command} & wait"], env=subprocess_env(**env),
                                  stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/healthz", parent)
    pid = server_pid(port)
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the function kept running after its parent died")
    said = [json.loads(line)["message"] for line in log.read_text().splitlines()]
    orphaned = next(i for i, message in enumerate(said) if f"(pid {parent.pid}) has exited" in message)
    assert said[orphaned + 1].startswith("stopping: new connections refused"), said  # then drained as for SIGTERM


def test_a_killed_servers_metrics_folder_is_removed_by_the_next(env, tmp_path):
    """A server killed outright (kill -9, the OOM killer) cannot remove its metrics folder; the next
    server started on the machine does, and leaves a live server's alone."""

    def start() -> tuple[subprocess.Popen[bytes], Path]:
        port = free_port()
        proc = subprocess.Popen(function_command("token", port), env=subprocess_env(**env, TMPDIR=str(tmp_path)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        (folder,) = tmp_path.glob(f"thalamus-metrics-{proc.pid}-*")
        return proc, folder

    killed, killed_folder = start()
    live, live_folder = start()
    killed.kill()
    killed.wait(10)
    assert killed_folder.is_dir()
    # A pod's /tmp outlives its container's restarts, and the server is process 1 each time: a
    # folder named after a process that lives (here this one) may still be an orphan.
    reused = tmp_path / f"thalamus-metrics-{os.getpid()}-earlier"
    reused.mkdir()
    (reused / "server.lock").touch()
    # Folders from before the lock: told apart by their process id, as they were then.
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its process id is free
    legacy_dead = tmp_path / f"thalamus-metrics-{finished.pid}-legacy"
    legacy_live = tmp_path / f"thalamus-metrics-{os.getpid()}-legacy"
    legacy_dead.mkdir()
    legacy_live.mkdir()
    third, third_folder = start()
    try:
        assert not killed_folder.exists() and not reused.exists() and not legacy_dead.exists()
        assert live_folder.is_dir() and third_folder.is_dir() and legacy_live.is_dir()
        legacy_live.rmdir()
    finally:
        for proc in (live, third):
            proc.terminate()
            proc.wait(10)
    assert list(tmp_path.glob("thalamus-metrics-*")) == []  # and each stopped server removed its own


def test_warm_predictions_reuse_their_memory(serve_function, bearer):
    """A warm prediction's image and tensors come from heap the process already has: glibc must
    not hand those pages back after each request and fault them in again (it did, ~250 page
    faults a request, when pinning the mmap threshold had left its trim threshold at 128 KiB)."""
    from local.helpers import demo_image, encode, first_label

    base = serve_function("predict", MODEL_NAME="shapes")
    pid = server_pid(int(base.rsplit(":", 1)[1]))
    photo = encode(demo_image("shapes", first_label("shapes"), 7).resize((800, 600)), "PNG")  # decoded at full size
    files = {"file": ("p.png", photo, "image/png")}
    session = requests.Session()

    def faults() -> int:
        return sum(
            int((task / "stat").read_text().rsplit(")", 1)[1].split()[7])
            for task in Path(f"/proc/{pid}/task").iterdir()
        )

    for _ in range(30):
        assert session.post(f"{base}/models/shapes/predict.json", files=files, headers=bearer, timeout=10).ok
    before = faults()
    for _ in range(100):
        assert session.post(f"{base}/models/shapes/predict.json", files=files, headers=bearer, timeout=10).ok
    assert (faults() - before) / 100 < 10


def test_threads_are_one_per_usable_cpu_and_at_least_two():
    """THREADS unset: a thread per CPU the process may use (more would queue for the GIL), but
    two on one CPU, so that one can read or send while the other computes; THREADS wins."""
    script = (
        "import os, sys\n"
        "from shared.config import Settings\n"
        "from shared.server import serving_threads\n"
        "print(serving_threads(Settings()), end=' ')\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "print(serving_threads(Settings()), serving_threads(Settings.from_env({'THREADS': '3'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == [str(max(2, cgroup.usable_cpus())), "2", "3"]


@contextlib.contextmanager
def token_server(env: dict[str, str], **popen: Any) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The token function served on a free port as the images run it (``popen``: output, limits),
    ready; stopped afterwards if it still runs."""
    port = free_port()
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    proc = subprocess.Popen(function_command("token", port), env=subprocess_env(**env), **popen)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_running_out_of_file_descriptors_pauses_accepting_instead_of_dying(env, tmp_path):
    """More connections than the process may open files (a hard limit of 64 here; at the usual
    1,024 gunicorn's own cap comes first): accept() fails with EMFILE, which killed the worker,
    and with WORKERS=1 the whole server. It now waits for connections to close, and serves on."""
    log = tmp_path / "token.log"

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    with (
        log.open("wb") as out,
        token_server(env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=few_files) as (
            proc,
            port,
        ),
    ):
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(80)]
        time.sleep(1.5)  # the server accepts what it can, fails on the rest
        assert proc.poll() is None, log.read_text()
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError("no answer after the connections closed: " + log.read_text()[-2000:])
        assert proc.poll() is None
        assert log.read_text().count("cannot accept connections (Too many open files)") == 1
        assert "Traceback" not in log.read_text()


def test_a_server_may_open_as_many_files_as_its_hard_limit_allows(env):
    """gunicorn keeps up to 1,000 connections a worker: a soft limit of 1,024 files, where many
    systems start a process, would run out first. The server raises it to the hard limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with token_server(env, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))) as (proc, _):
        limits = Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
        soft = next(line for line in limits if line.startswith("Max open files")).split()[3]
        assert int(soft) == (65536 if hard == resource.RLIM_INFINITY else min(hard, 65536))


def test_a_stopping_server_refuses_new_connections_and_finishes_what_it_holds(env, tmp_path):
    """SIGTERM: requests in flight are answered, and a new connection is refused at once (it used
    to be accepted into the backlog and left unanswered until the process exited); the log says
    when the drain starts and what it holds, not only that the server stopped."""
    log = tmp_path / "token.log"
    with log.open("wb") as out, token_server(env, stdout=out, stderr=subprocess.STDOUT) as (proc, port):
        body = json.dumps({"public_key": "pk_" + "a" * 43, "secret_key": "sk_" + "a" * 43}).encode()
        in_flight = socket.create_connection(("127.0.0.1", port), timeout=10)
        in_flight.sendall(b"POST /token.json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])  # fmt: skip
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(ConnectionRefusedError):  # not accepted, and then never answered
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert proc.poll() is None  # still draining
        in_flight.sendall(body[10:])
        assert in_flight.recv(100).startswith(b"HTTP/1.1 401")  # answered: that keypair does not exist
        assert proc.wait(15) == 0
    said = [json.loads(line)["message"] for line in log.read_text().splitlines()]
    drain = next(i for i, message in enumerate(said) if message.startswith("stopping: "))
    assert (
        "open connections: 1," in said[drain] and said[drain + 1].startswith("401 POST") and said[-1] == "token stopped"
    )


def test_a_port_in_use_is_one_line_and_leaves_nothing_behind(env, tmp_path):
    """gunicorn would retry for 5 s, log ten lines after a start line saying it serves, then exit;
    and its metrics folder stayed behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(function_command("token", port), env=subprocess_env(**env, TMPDIR=str(tmp_path)),
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"token: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert "serving" not in done.stdout
    assert list(tmp_path.glob("*thalamus-metrics-*")) == []


def test_a_server_runs_no_code_its_requests_do_not_need(serve_function, bearer, function_logs):
    """A cold start pays for nothing no request uses: redis-py's asyncio client (which ``import
    redis`` runs) stays unrun through a first prediction, and NumPy's OpenBLAS starts no threads
    (one for every CPU of the node but one, spinning at every start, on the pod's CPU quota),
    unless OPENBLAS_NUM_THREADS asks for them."""
    base = serve_function("predict", MODEL_NAME="shapes", PYTHONPROFILEIMPORTTIME="1")
    image = encode(demo_image("shapes", "circle", 7), "JPEG")
    reply = requests.post(f"{base}/models/shapes/predict.json", headers=bearer, timeout=30,
                          files={"file": ("x.jpg", image)})  # fmt: skip
    assert reply.status_code == 200
    log = function_logs[base].read_text()
    imported = {line.rsplit("|", 1)[1].strip() for line in log.splitlines() if line.startswith("import time:")}
    assert {"redis", "redis.client", "redis.asyncio", "numpy"} <= imported  # the profile sees the imports
    unrun = {"redis.asyncio.client", "redis.asyncio.connection", "redis.asyncio.cluster"}
    assert imported & unrun == set()

    def threads(base: str) -> int:
        return len(list(Path(f"/proc/{server_pid(int(base.rsplit(':', 1)[1]))}/task").iterdir()))

    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("OpenBLAS starts no thread of its own on one CPU")
    quiet, asked = (
        serve_function("predict", MODEL_NAME="shapes"),
        serve_function("predict", MODEL_NAME="shapes", OPENBLAS_NUM_THREADS="2"),
    )
    assert threads(asked) - threads(quiet) == 1  # both answered one probe; the second has OpenBLAS's
