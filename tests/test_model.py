"""The loaded model (functions/predict/model.py): what keeps a replica's memory bounded whatever
it is sent. One interpreter per CPU the process may use, never one per thread or per request;
the flatbuffer not kept resident once XNNPACK has packed its weights."""

from __future__ import annotations

import gc
import hashlib
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from ai_edge_litert.interpreter import Interpreter
from prometheus_client.parser import text_string_to_metric_families

from functions.predict import model as model_module
from functions.predict.model import GROW_WHEN_BUSY, Model, load_model
from functions.predict.service import create_service
from local import ROOT
from local.helpers import cpu_cgroup, demo_image, encode, free_port, function_command, remove_cgroup, wait_http
from shared import cgroup
from tests.conftest import function_client, subprocess_env

SHAPES = ROOT / "models" / "shapes"


def live_interpreters() -> int:
    gc.collect()
    return sum(isinstance(thing, Interpreter) for thing in gc.get_objects())


def test_requests_that_wait_on_decoding_share_one_interpreter(settings, bearer):
    """24 image requests at once, 8 more than twice a server's threads: the model is not what
    they wait for (decoding and Python are), so no second copy of the weights is made."""
    before = live_interpreters()
    model = Model(SHAPES)
    assert (model.interpreters, model.max_interpreters) == (1, cgroup.usable_cpus())
    assert live_interpreters() - before == 1
    client = function_client(create_service(settings.replace(model_name="shapes", model_dir=SHAPES), model))
    labels = ["circle", "square", "triangle"] * 8
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        data = {"file": (io.BytesIO(encode(demo_image("shapes", labels[i], 300 + i))), f"{i}.png")}
        reply = client.post("/models/shapes/predict.json", data=data, headers=bearer)
        answers[i] = reply.get_json()["prediction"] if reply.status_code == 200 else str(reply.status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(labels))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [answers[i] for i in range(len(labels))] == labels
    assert model.interpreters == 1 and live_interpreters() - before == 1
    assert model.made == 1  # none made for a request and dropped after it either


def test_an_interpreter_given_back_goes_to_a_waiting_thread_at_once(monkeypatch):
    """A thread that gives the interpreter back while another waits for it lets the waiter start
    before going on with its own Python (its answer's JSON, access line, send): the interpreter
    does not sit idle meanwhile. With no one waiting, nothing is handed over, and after many
    threads at once no waiter is left counted (which would slow every later request)."""
    model = Model(SHAPES, interpreters=1)

    def first_after_the_handover() -> str:
        holding, order = threading.Event(), []

        def waiter() -> None:
            holding.wait()
            with model.borrowed():
                order.append("waiter")

        thread = threading.Thread(target=waiter)
        thread.start()
        with model.borrowed():
            holding.set()
            deadline = time.monotonic() + 5
            while not model.waiting and time.monotonic() < deadline:
                time.sleep(0.001)
        order.append("giver")  # the giver's next line of Python
        thread.join(5)
        return order[0]

    firsts = [first_after_the_handover() for _ in range(40)]
    # Without the hand-over the giver went first 200 times in 200; with it the waiter, 88-100 %
    # of the time even beside four CPU hogs.
    assert firsts.count("waiter") >= 20, firsts
    with saturating(model, callers=8):
        time.sleep(1)
    assert model.waiting == 0
    monkeypatch.setattr(model_module, "HANDOFF_SECONDS", 1.0)  # a hand-over would take seconds here
    started = time.monotonic()
    for _ in range(3):  # one thread, no one waiting: no hand-over
        with model.borrowed():
            pass
    assert time.monotonic() - started < 1.0


@contextmanager
def saturating(model: Model, callers: int, burners: int = 0) -> Iterator[None]:
    """Meanwhile ``callers`` threads do nothing but call the model (16 images a call: the model
    is the work) and ``burners`` threads keep CPUs busy hashing (which, like decoding, holds no
    GIL)."""
    batch = np.zeros((16, 64, 64, 3), np.float32)
    stop = threading.Event()

    def call() -> None:
        while not stop.is_set():
            assert model.predict(batch).shape == (16, 3)

    def burn() -> None:
        data = os.urandom(1 << 20)
        while not stop.is_set():
            hashlib.sha256(data).digest()

    threads = [threading.Thread(target=call) for _ in range(callers)]
    threads += [threading.Thread(target=burn) for _ in range(burners)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_a_saturated_model_gets_an_interpreter_per_cpu_and_no_more(monkeypatch):
    """Threads that do nothing but call the model keep its interpreter busy: the pool grows, one
    at a time, to the usable CPUs and stops there."""
    # Whatever else this machine runs meanwhile: the CPU-free condition is the next test's.
    monkeypatch.setattr(model_module, "GROW_WHEN_CPU_FREE", float("-inf"))
    model = Model(SHAPES)
    if model.max_interpreters < 2:
        pytest.skip("one usable CPU: the pool never grows")
    before = live_interpreters() - 1
    with saturating(model, callers=model.max_interpreters + 2):
        deadline = time.monotonic() + 20
        while model.interpreters < model.max_interpreters and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.5)  # saturated still: no interpreter beyond the CPUs
    assert model.interpreters == model.made == model.max_interpreters
    assert live_interpreters() - before == model.max_interpreters


def test_the_busy_share_the_pool_grows_on_leaves_out_the_hand_over(monkeypatch):
    """The share of time the model is busy, which decides whether the pool grows, is the time an
    interpreter was lent, not the hand-over after it (the giver letting go of the GIL): counted
    in, any two threads taking turns would look like a saturated model and cost a second copy of
    the weights. A hand-over made long here (20 ms) shows it plainly."""
    monkeypatch.setattr(model_module, "GROW_WHEN_BUSY", float("inf"))  # measure, never grow
    monkeypatch.setattr(model_module, "HANDOFF_SECONDS", 0.02)
    model = Model(SHAPES)
    if model.max_interpreters < 2:
        pytest.skip("one usable CPU: the pool is never measured")
    batch = np.zeros((1, 64, 64, 3), np.float32)
    stop, lent, tally = threading.Event(), [0.0], threading.Lock()

    def take_turns() -> None:
        while not stop.is_set():
            with model.borrowed() as interpreter:
                started = time.monotonic()
                interpreter.set_tensor(model._input_index, batch)
                interpreter.invoke()
                used = time.monotonic() - started
            with tally:
                lent[0] += used

    threads = [threading.Thread(target=take_turns) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        window, shares, began = model._window_start, [], time.monotonic()
        while len(shares) < 2:  # a first window closes; the real share is measured over the next
            time.sleep(0.01)
            if model._window_start != window:
                window = model._window_start
                shares.append(model._utilization)
                if len(shares) == 1:
                    lent[0], began = 0.0, time.monotonic()
        real = lent[0] / (time.monotonic() - began)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert shares[-1] <= real + 0.1, (shares, real)


def test_a_saturated_model_gets_no_second_interpreter_when_the_cpus_are_busy():
    """The model is busy all the time, but so are the CPUs (threads hashing, which hold no GIL,
    as decoding does): a second interpreter would have no core to run on, only its weights to
    hold, so none is made."""
    model = Model(SHAPES)
    if model.max_interpreters < 2:
        pytest.skip("one usable CPU: the pool never grows")
    busiest, deadline = 0.0, time.monotonic() + 4
    with saturating(model, callers=3, burners=cgroup.usable_cpus()):
        while time.monotonic() < deadline:
            time.sleep(0.1)
            busiest = max(busiest, model._utilization)
    assert model.interpreters == 1
    assert busiest >= GROW_WHEN_BUSY  # and yet the model was the bottleneck all along


def test_interpreters_follow_the_cpu_affinity():
    script = (
        "import os, sys\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from pathlib import Path\n"
        "from functions.predict.model import Model\n"
        "print(Model(Path(sys.argv[1])).max_interpreters)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(SHAPES)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


class CpuCgroup:
    """A cgroup with a CPU quota of one CPU (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``)."""

    def __init__(self) -> None:
        try:
            self.path = cpu_cgroup(f"thalamus-cpu-test-{os.getpid()}", 1)
        except OSError as exc:
            pytest.skip(f"cannot create a CPU cgroup here ({exc}); run as root on Linux")

    def remove(self) -> None:
        remove_cgroup(self.path)


def scrape(base: str, name: str) -> float:
    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_a_cpu_quota_bounds_the_interpreters_of_a_server(env):
    """A pod with ``limits.cpu: 1`` on a 2-core node: one interpreter, not one per core."""
    group = CpuCgroup()
    port = free_port()
    command = function_command("predict", port, group.path)
    proc = subprocess.Popen(command, env=subprocess_env(**env, MODEL_NAME="shapes", LOG_FORMAT="json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", proc)
        assert scrape(base, "thalamus_model_interpreters") == 1
    finally:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=20)
        group.remove()
    assert b"Traceback" not in stderr
    loaded = next(line for line in stdout.decode().splitlines() if '"model_loaded"' in line)
    assert "up to 1 while the model is what requests wait for" in loaded


def resident_kb(pid: int, path: Path) -> int:
    """Resident kB of ``pid``'s mappings of the file at ``path``."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def server_pid(port: int) -> int:
    wanted = f"--port\0{port}\0"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if "shared.server" in (cmdline := (entry / "cmdline").read_text()) and wanted in cmdline:
                    return int(entry.name)
            except OSError:
                continue
    raise LookupError(port)


@pytest.mark.parametrize("model", ["shapes", "arrows"])
def test_the_model_file_is_not_kept_in_memory_while_serving(model, serve_function, bearer):
    base = serve_function("predict", MODEL_NAME=model)
    pid = server_pid(int(base.rsplit(":", 1)[1]))
    label = requests.get(f"{base}/models/{model}.json", headers=bearer, timeout=10).json()["labels"][0]
    for i in range(20):
        files = {"file": (f"{i}.png", encode(demo_image(model, label, 500 + i)))}
        reply = requests.post(f"{base}/models/{model}/predict.json", files=files, headers=bearer, timeout=30)
        assert reply.status_code == 200
    bundle_file = (ROOT / "models" / model / "model.tflite").resolve()
    # XNNPACK reads the weights once, to pack them; what an operator still reads (a few small
    # tensors, and the kernel's read-around of 64 kB at each) comes back, the weights do not.
    assert resident_kb(pid, bundle_file) * 1024 < os.path.getsize(bundle_file) / 3


def test_model_interpreters_chooses_fewer_never_more_than_the_cpus(settings):
    """MODEL_INTERPRETERS trades throughput for memory (each interpreter packs its own weights);
    asking for more than the usable CPUs gets one per CPU."""
    before = live_interpreters()
    one = load_model(settings.replace(model_name="shapes", model_dir=SHAPES, model_interpreters=1))
    assert one.max_interpreters == 1 and live_interpreters() - before == 1
    many = load_model(settings.replace(model_name="shapes", model_dir=SHAPES, model_interpreters=64))
    assert many.max_interpreters == cgroup.usable_cpus()
