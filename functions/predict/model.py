"""A model bundle (``model.tflite`` + ``model.json``) served with the LiteRT interpreter.

LiteRT interpreters are not thread-safe, so each request borrows one from a pool: gunicorn's
threads never share an interpreter, and the pool grows (up to the usable CPUs) only while the
model is what requests wait for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from shared import cgroup, libc, logs, metrics
from shared.config import Settings
from shared.errors import StartupError

log = logging.getLogger("thalamus.model")

REQUIRED = ("name", "version", "labels", "input", "preprocessing")
# Another interpreter is made when a request finds every one busy and they were busy this share
# of the last second: the model, not decoding or Python, is then what requests wait for. Below
# it, one more would only add its copy of the weights (measured on the reference network: one
# interpreter busy ~80 % serves within noise of two, with 22 MB less).
GROW_WHEN_BUSY = 0.9
BUSY_WINDOW_SECONDS = 1.0
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
        model = Model(settings.bundle_dir, settings.model_interpreters, settings.model_max_batch,
                      settings.model_batch_wait_ms / 1000)
    except BundleError as exc:
        raise BundleError(f"cannot load model {settings.model_name!r}: {exc}") from None
    if model.name != settings.model_name:
        raise BundleError(f"{settings.bundle_dir} holds model {model.name!r}, not {settings.model_name!r}")
    seconds = time.perf_counter() - started
    version = str(model.meta["version"])
    metrics.MODEL_INFO.labels(model.name, version).set(1)
    metrics.MODEL_LOAD_SECONDS.labels(model.name).set(seconds)
    metrics.MODEL_INTERPRETERS.labels(model.name).set(model.interpreters)
    message = (f"loaded model {model.name} {version} in {seconds * 1000:.1f} ms: {model.interpreters} interpreter, "
               f"up to {model.max_interpreters} while the model is what requests wait for")  # fmt: skip
    logs.event(log, message, event="model_loaded", model=model.name, version=version, load_ms=round(seconds * 1000, 2),
               interpreters=model.interpreters)  # fmt: skip
    return model


def read_metadata(bundle: Path) -> dict[str, Any]:
    """``model.json`` of ``bundle``, checked for the fields serving relies on."""
    path = bundle / "model.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path} not found") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from None
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


class _Slot:
    """An interpreter of the pool and the batch size its input is set to. Setting another size
    costs about 0.05 ms once the interpreter's arena has held that many rows; growing the arena
    happens once per new largest batch."""

    __slots__ = ("interpreter", "rows")

    def __init__(self, interpreter: Interpreter) -> None:
        self.interpreter, self.rows = interpreter, 1


class _Job:
    """Rows of one request waiting for, or in, a model call; the call fills in the answer."""

    __slots__ = ("rows", "probabilities", "error")

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows
        self.probabilities: np.ndarray | None = None
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.probabilities is not None or self.error is not None


class Model:
    """One loaded bundle: metadata plus a pool of LiteRT interpreters that batches requests.

    LiteRT interpreters are not thread-safe, and each holds its own copy of the packed weights
    and its own activation arena, so the pool holds at most as many as the CPUs the process may
    use (more would only wait for a core, and cost memory). A request queues its rows (its
    images are decoded by then; it holds nothing else) and, when an interpreter is free, the
    thread that takes it runs every queued row it can, up to ``max_batch``, as one model call:
    requests that arrive while the model is busy are answered together, which streams the
    weights through the caches once instead of once per image. A lone request runs at once,
    alone; ``batch_wait`` (seconds, default 0) lets a call wait that long for company.

    The first interpreter is made at start; the others when a request finds every one busy
    while they have been busy :data:`GROW_WHEN_BUSY` of the last second (the model is the
    bottleneck), so a replica whose requests mostly wait on other things holds one (and starts
    sooner). They live in the process that serves (shared.server runs one).
    """

    def __init__(
        self, bundle: Path, interpreters: int | None = None, max_batch: int = 1, batch_wait: float = 0.0
    ) -> None:
        """``interpreters``: how many to hold at most (MODEL_INTERPRETERS), never more than one
        per usable CPU; None: one per usable CPU. ``max_batch``: most rows per model call
        (MODEL_MAX_BATCH; 1 for a model whose batch dimension is fixed). ``batch_wait``: how
        long a call may wait for more rows (MODEL_BATCH_WAIT_MS, in seconds here)."""
        self.meta = read_metadata(bundle)
        self.name: str = self.meta["name"]
        self.labels: list[str] = self.meta["labels"]
        self._path = bundle / "model.tflite"
        if not self._path.is_file():
            raise BundleError(f"{self._path} not found")
        self.max_interpreters = min(interpreters or cgroup.usable_cpus(), cgroup.usable_cpus())
        # One lock for the queue, the free interpreters and the busy tally; waiting threads are
        # woken when a call ends (their rows may be answered, an interpreter is free).
        self._lock = threading.Condition(threading.Lock())
        self._queue: deque[_Job] = deque()
        self._growing = False
        self._busy, self._window_start, self._utilization = 0.0, time.monotonic(), 0.0
        with _native_stderr_silenced():
            first = self._new_interpreter()  # fails here if the bundle is broken
        self._check_shapes(first)
        # Rows of a batch share a call only when the graph takes any batch size (shape
        # signature -1, as Keras exports); a fixed one may hard-code it in a reshape.
        dynamic = first.get_input_details()[0]["shape_signature"][0] == -1
        self.max_batch = max_batch if dynamic else 1
        self.batch_wait = batch_wait
        self._free = [_Slot(first)]
        self.interpreters = 1
        release_mapped_pages(self._path)

    def _new_interpreter(self) -> Interpreter:
        try:
            # model_path: LiteRT maps the file, so the flatbuffer is shared page cache, not a copy.
            interpreter = Interpreter(model_path=str(self._path), num_threads=1)
            interpreter.allocate_tensors()
            inp = interpreter.get_input_details()[0]
            if inp["shape"][0] != 1:  # the arena grows only when a bigger batch comes
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
        self._row_shape = want

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, one row per input (batch of shape (n, h, w, c), float32).

        The rows go in model calls of at most ``max_batch``, possibly together with other
        requests' rows; each row's answer is the one it would get alone."""
        batch = batch.astype(self._input_dtype, copy=False)
        mine = [_Job(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        with self._lock:
            self._queue.extend(mine)
            if self.batch_wait:
                self._lock.notify_all()  # a call waiting for company
            while not all(job.finished for job in mine):
                if self._queue and self._free:
                    self._lead(self._free.pop())
                elif self._queue and self._may_grow():
                    self._grow()
                else:  # a long wait is itself news: look again whether the model is the bottleneck
                    self._lock.wait(BUSY_WINDOW_SECONDS)
        for job in mine:
            if job.error is not None:
                raise RuntimeError(f"model {self.name}: the model call failed ({job.error})")
        return mine[0].probabilities if len(mine) == 1 else np.concatenate([job.probabilities for job in mine])

    def _lead(self, slot: _Slot) -> None:
        """With the lock held: run the queued rows as one call on ``slot``, the lock released
        meanwhile, then give the interpreter back and wake the waiting threads."""
        jobs = self._take_batch()
        started = time.monotonic()
        self._lock.release()
        try:
            self._call(slot, jobs)
        except Exception as exc:  # each request in the call answers for it; none waits forever
            for job in jobs:
                job.error = exc
        finally:
            self._lock.acquire()
            self._free.append(slot)
            if self.interpreters < self.max_interpreters:  # only a pool that may grow needs the tally
                self._count_busy(started)
            self._lock.notify_all()

    def _take_batch(self) -> list[_Job]:
        """With the lock held: queued jobs, oldest first, as many as fit in ``max_batch`` rows,
        after waiting up to ``batch_wait`` for more when the batch is not full."""
        jobs: list[_Job] = []
        rows, deadline = 0, time.monotonic() + self.batch_wait
        while True:
            while self._queue and rows + len(self._queue[0].rows) <= self.max_batch:
                jobs.append(job := self._queue.popleft())
                rows += len(job.rows)
            remaining = deadline - time.monotonic()
            if rows == self.max_batch or self._queue or remaining <= 0:
                return jobs
            self._lock.wait(remaining)

    def _call(self, slot: _Slot, jobs: list[_Job]) -> None:
        rows = jobs[0].rows if len(jobs) == 1 else np.concatenate([job.rows for job in jobs])
        interpreter = slot.interpreter
        if slot.rows != len(rows):
            interpreter.resize_tensor_input(self._input_index, [len(rows), *self._row_shape])
            interpreter.allocate_tensors()
            slot.rows = len(rows)
        metrics.BATCH_SIZE.labels(self.name).observe(len(rows))
        interpreter.set_tensor(self._input_index, rows)
        interpreter.invoke()
        probabilities = interpreter.get_tensor(self._output_index)  # a copy: the next call reuses the tensor
        start = 0
        for job in jobs:
            job.probabilities = probabilities[start : start + len(job.rows)]
            start += len(job.rows)

    def _count_busy(self, started: float) -> None:
        now = time.monotonic()
        self._busy += now - started
        if (elapsed := now - self._window_start) >= BUSY_WINDOW_SECONDS:
            self._utilization = self._busy / (elapsed * self.interpreters)
            self._busy, self._window_start = 0.0, now

    def _may_grow(self) -> bool:
        """With the lock held: below the limit, nobody adding one already, and every interpreter
        was busy GROW_WHEN_BUSY of the last window, which is recent."""
        recent = time.monotonic() - self._window_start < 2 * BUSY_WINDOW_SECONDS
        return (self.interpreters < self.max_interpreters and not self._growing and recent
                and self._utilization >= GROW_WHEN_BUSY)  # fmt: skip

    def _grow(self) -> None:
        """With the lock held: add an interpreter to the free ones (made with the lock released:
        it takes tens of milliseconds). One that cannot be made stops the growing."""
        self._growing = True
        self._lock.release()
        try:
            with _native_stderr_silenced():
                interpreter = self._new_interpreter()
            release_mapped_pages(self._path)  # XNNPACK has packed its weights: the file again goes
        except BundleError:
            log.exception("model %s: cannot add an interpreter; keeping %d", self.name, self.interpreters)
            interpreter = None
        finally:
            self._lock.acquire()
            self._growing = False
        if interpreter is None:
            self.max_interpreters = self.interpreters  # once is enough: no retry every second
            return
        self._free.append(_Slot(interpreter))
        self.interpreters += 1
        self._busy, self._window_start, self._utilization = 0.0, time.monotonic(), 0.0
        metrics.MODEL_INTERPRETERS.labels(self.name).set(self.interpreters)
