"""A model bundle (``model.tflite`` + ``model.json``) served with the LiteRT interpreter.

LiteRT interpreters are not thread-safe, so each request borrows one from a pool: gunicorn's
threads never share an interpreter, and the pool grows (up to the usable CPUs) only while the
model is what requests wait for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from shared import cgroup, jsonbody, libc, logs, metrics
from shared.config import Settings
from shared.errors import StartupError

log = logging.getLogger("thalamus.model")

REQUIRED = ("name", "version", "labels", "input", "preprocessing")
# Another interpreter is made when a request finds every one busy, they were busy this share of
# the last second (the model, not decoding or Python, is what requests wait for), and at least
# this much of a CPU was left free meanwhile: the process's CPU capacity less the CPU time it used
# and the time its threads waited for a CPU (the machine's other work shows there). One more then
# has a core to run on. Otherwise it would only add its copy of the weights: on 2 CPUs under 8
# connections the reference network's interpreter is ~80-90 % busy while the process uses ~1.65
# CPUs and waits ~0.15, and two interpreters served no more than one (266 against 273 req/s),
# with 22 MB more.
GROW_WHEN_BUSY = 0.9
GROW_WHEN_CPU_FREE = 0.5
BUSY_WINDOW_SECONDS = 1.0
# A thread that gives an interpreter back while another thread waits for one sleeps this long,
# which lets go of the GIL: the waiter takes it and starts its model call now, instead of when
# the giver next blocks, after its answer's JSON, access line and metrics (0.3-0.5 ms in which
# the interpreter sat idle). The giver goes on once it gets the GIL back. Not counted as the
# model's busy time (which decides whether the pool grows). The reference network under 8
# connections on 2 CPUs: x1.00-1.10 req/s in four sets of 10 paired rounds (README, Figures),
# a few percent at most; CPU per request unchanged, and nothing when no one waits.
HANDOFF_SECONDS = 0.00002
MADV_DONTNEED = 4  # <sys/mman.h> on Linux


class BundleError(StartupError):
    """The bundle is missing or broken; the message says what is wrong."""


def load_model(settings: Settings) -> Model:
    """The bundle a predict function serves (``MODEL_NAME`` in ``MODEL_DIR``), loaded once.

    Raises StartupError with a one-line reason: no MODEL_NAME, a missing or broken bundle, or
    a bundle that holds another model.
    """
    if not settings.model_name:
        raise StartupError("MODEL_NAME is required (the model this function serves)")
    started = time.perf_counter()
    try:
        model = Model(settings.bundle_dir, settings.model_interpreters, settings.workers)
    except BundleError as exc:
        raise BundleError(f"cannot load model {settings.model_name!r}: {exc}") from None
    if model.name != settings.model_name:
        raise BundleError(f"{settings.bundle_dir} holds model {model.name!r}, not {settings.model_name!r}")
    seconds = time.perf_counter() - started
    version = str(model.meta["version"])
    metrics.MODEL_INFO.labels(model.name, version).set(1)
    metrics.MODEL_LOAD_SECONDS.labels(model.name).set(seconds)
    interpreters = metrics.MODEL_INTERPRETERS.labels(model.name)
    interpreters.set(model.interpreters)
    if settings.workers > 1:
        # gunicorn's master loaded the model and its forked workers serve with the pool each
        # inherits; prometheus-client starts a forked process's gauges at 0. So each worker
        # reports its pool, and the master, which never serves, none.
        os.register_at_fork(
            after_in_child=lambda: interpreters.set(model.interpreters), after_in_parent=lambda: interpreters.set(0)
        )
    message = (f"loaded model {model.name} {version} in {seconds * 1000:.1f} ms: {model.interpreters} interpreter, "
               f"up to {model.max_interpreters} while the model is what requests wait for")  # fmt: skip
    logs.event(log, message, event="model_loaded", model=model.name, version=version, load_ms=round(seconds * 1000, 2),
               interpreters=model.interpreters)  # fmt: skip
    return model


def read_metadata(bundle: Path) -> dict[str, Any]:
    """``model.json`` of ``bundle``, checked for the fields serving relies on."""
    path = bundle / "model.json"
    meta = jsonbody.read_file(path, BundleError)
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}")
    spec = meta["input"]
    if not all(isinstance(spec.get(k), int) and spec[k] > 0 for k in ("height", "width", "channels")):
        raise BundleError(f"{path}: input needs positive integer height, width, channels")
    if spec["channels"] not in (1, 3):
        raise BundleError(f"{path}: input channels must be 1 or 3")
    if not meta["labels"] or not all(isinstance(label, str) for label in meta["labels"]):
        raise BundleError(f"{path}: labels must be a non-empty list of strings")
    return meta


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null meanwhile: LiteRT's C++ logger prints "INFO: Created
    TensorFlow Lite XNNPACK delegate for CPU." there for every interpreter, and has no switch."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def release_mapped_pages(path: Path) -> None:
    """Let go of this process's resident pages of the file at ``path`` (``madvise(MADV_DONTNEED)``
    on each of its mappings). The interpreters map the flatbuffer, but once XNNPACK has packed
    the weights into its own buffers they never read it again: without this, a copy of the whole
    file (16 MB for a 4-million-weight dense layer) would stay resident for nothing. A page an
    operator does read later is simply read back from the page cache."""
    if libc.madvise is None:
        return
    target = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == target:
                start, end = (int(address, 16) for address in fields[0].split("-"))
                libc.madvise(start, end - start, MADV_DONTNEED)


class Model:
    """One loaded bundle: metadata plus a pool of LiteRT interpreters.

    LiteRT interpreters are not thread-safe, and each holds its own copy of the packed weights
    and its own activation arena, so the pool holds at most as many as the CPUs the process may
    use, its share of them when WORKERS > 1 (more would only wait for a core, and cost memory):
    a request thread borrows one for its model call, waiting for it with nothing else held (its
    images are decoded by then). The first is made at start; the others when a request finds
    every one busy while they have been busy :data:`GROW_WHEN_BUSY` of the last second (the
    model is the bottleneck) and :data:`GROW_WHEN_CPU_FREE` of a CPU was left free (one more
    has a core to run on), so a replica whose requests mostly wait on other things, or whose
    CPUs are already busy, holds one (and starts sooner). They live in the process that serves
    (shared.server runs one); each runs one image at a time, so its arena never grows past one
    input.
    """

    def __init__(self, bundle: Path, interpreters: int | None = None, workers: int = 1) -> None:
        """``interpreters``: how many to hold at most (MODEL_INTERPRETERS), never more than one
        per usable CPU; None: one per usable CPU. ``workers``: processes sharing those CPUs
        (WORKERS), each holding its share."""
        self.meta = read_metadata(bundle)
        self.name: str = self.meta["name"]
        self.labels: list[str] = self.meta["labels"]
        self._path = bundle / "model.tflite"
        if not self._path.is_file():
            raise BundleError(f"{self._path} not found")
        cpus = max(1, cgroup.usable_cpus() // workers)
        self.max_interpreters = min(interpreters or cpus, cpus)
        self._capacity = cgroup.cpu_capacity() / workers  # CPU seconds per second
        self._pool: queue.SimpleQueue[Interpreter] = queue.SimpleQueue()
        self._growing = threading.Lock()
        self._tally = threading.Lock()  # model-call seconds in the current window, and waiting
        self.waiting = 0  # threads waiting for an interpreter
        self.made = 0  # interpreters ever made: as many as the pool holds, never one per request
        self._busy, self._window_start, self._utilization = 0.0, time.monotonic(), 0.0
        self._window_cpu, self._cpu_free = self._cpu_spent(), 0.0
        with _native_stderr_silenced():
            first = self._new_interpreter()  # fails here if the bundle is broken
        self._check_shapes(first)
        self._pool.put(first)
        self.interpreters = 1
        release_mapped_pages(self._path)

    def _new_interpreter(self) -> Interpreter:
        self.made += 1  # at start, or growing under self._growing: one thread at a time
        try:
            # model_path: LiteRT maps the file, so the flatbuffer is shared page cache, not a copy.
            interpreter = Interpreter(model_path=str(self._path), num_threads=1)
            interpreter.allocate_tensors()
            inp = interpreter.get_input_details()[0]
            if inp["shape"][0] != 1:  # one image per call
                interpreter.resize_tensor_input(inp["index"], [1, *inp["shape"][1:]])
                interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"{self._path} is not a usable TFLite model ({exc})") from None
        return interpreter

    def _check_shapes(self, interpreter: Interpreter) -> None:
        spec = self.meta["input"]
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
        want = [spec["height"], spec["width"], spec["channels"]]
        if list(inp["shape"][1:]) != want:
            raise BundleError(f"model input {list(inp['shape'])} does not match model.json {want}")
        if out["shape"][-1] != len(self.labels):
            raise BundleError(f"model has {out['shape'][-1]} outputs but {len(self.labels)} labels")
        # The names the inference protocols show (TF Serving and Triton would show the same for
        # the SavedModel): the signature's aliases, and the graph's tensor names.
        signatures = interpreter.get_signature_list()
        signature: dict[str, list[str]] = signatures.get("serving_default") or next(iter(signatures.values()), {})
        self.input_name: str = (signature.get("inputs") or ["input"])[0]
        self.output_name: str = (signature.get("outputs") or ["output"])[0]
        self.input_tensor: str = inp["name"]
        self.output_tensor: str = out["name"]
        self._input_index, self._output_index = inp["index"], out["index"]
        self._input_dtype = inp["dtype"]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, one row per input (batch of shape (n, h, w, c), float32)."""
        with self.borrowed() as interpreter:
            rows = []
            for row in batch.astype(self._input_dtype, copy=False):
                interpreter.set_tensor(self._input_index, row[None])
                interpreter.invoke()
                rows.append(interpreter.get_tensor(self._output_index)[0].copy())
            return np.stack(rows)

    @contextmanager
    def borrowed(self) -> Iterator[Interpreter]:
        """An interpreter of the pool for this thread alone meanwhile: a free one, else a new one
        when the pool is below ``max_interpreters`` and saturated, else the first to come back.
        Given back while another thread waits, it is handed over to that thread (HANDOFF_SECONDS)."""
        try:
            interpreter = self._pool.get_nowait()
        except queue.Empty:
            with self._tally:
                self.waiting += 1
            try:
                interpreter = self._wait_or_grow()
            finally:
                with self._tally:
                    self.waiting -= 1
        started = time.monotonic()
        try:
            yield interpreter
        finally:
            ended = time.monotonic()  # before the hand-over: the sleep is not the model's time
            self._pool.put(interpreter)
            if self.waiting:  # hand it over now (see HANDOFF_SECONDS)
                time.sleep(HANDOFF_SECONDS)
            if self.interpreters < self.max_interpreters:  # only a pool that may grow needs the tally
                self._count_busy(started, ended)

    def _wait_or_grow(self) -> Interpreter:
        while (interpreter := self._grow()) is None:
            try:  # a long wait is itself news: look again whether the model is the bottleneck
                return self._pool.get(timeout=BUSY_WINDOW_SECONDS)
            except queue.Empty:
                continue
        return interpreter

    def _count_busy(self, started: float, ended: float) -> None:
        with self._tally:
            now = time.monotonic()
            self._busy += ended - started
            if (elapsed := now - self._window_start) >= BUSY_WINDOW_SECONDS:
                cpu = self._cpu_spent()
                self._utilization = self._busy / (elapsed * self.interpreters)
                self._cpu_free = self._capacity - (cpu - self._window_cpu) / elapsed
                self._busy, self._window_start, self._window_cpu = 0.0, now, cpu

    @staticmethod
    def _cpu_spent() -> float:
        """CPU seconds every thread of the process used, plus those they waited for a CPU."""
        return time.process_time() + cgroup.runqueue_wait()

    def _saturated(self) -> bool:
        """Every interpreter was busy GROW_WHEN_BUSY of the last window while GROW_WHEN_CPU_FREE
        of a CPU was left free, and that is recent."""
        with self._tally:
            recent = time.monotonic() - self._window_start < 2 * BUSY_WINDOW_SECONDS
            return recent and self._utilization >= GROW_WHEN_BUSY and self._cpu_free >= GROW_WHEN_CPU_FREE

    def _grow(self) -> Interpreter | None:
        if self.interpreters >= self.max_interpreters or not self._saturated():
            return None
        if not self._growing.acquire(blocking=False):
            return None  # one at a time: a thread that finds another growing the pool waits for one
        try:
            if self.interpreters >= self.max_interpreters:
                return None
            with _native_stderr_silenced():
                interpreter = self._new_interpreter()
            release_mapped_pages(self._path)  # XNNPACK has packed its weights: the file again goes
            with self._tally:
                self.interpreters += 1
                self._busy, self._window_start, self._utilization = 0.0, time.monotonic(), 0.0
                self._window_cpu = self._cpu_spent()
        except BundleError:
            log.exception("model %s: cannot add an interpreter; keeping %d", self.name, self.interpreters)
            self.max_interpreters = self.interpreters  # once is enough: no retry every second
            return None
        finally:
            self._growing.release()
        metrics.MODEL_INTERPRETERS.labels(self.name).set(self.interpreters)
        return interpreter
