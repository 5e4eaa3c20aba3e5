"""Prometheus metrics of a function, served at ``GET /metrics``.

With several gunicorn workers (WORKERS > 1) each worker counts on its own, so the server
(:mod:`shared.server`) points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before anything
imports prometheus_client, whatever ``WORKERS`` is: every worker then writes its samples there
and ``/metrics``, whichever worker answers it, adds them up. Without it (the tests' in-process
clients) the default registry is used.
Buckets run from half a millisecond (a warm token check) to ten seconds (a cold 32-image batch).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry

# The server's own process: shared.server loads the function, and so this module, before gunicorn
# forks any worker (WORKERS > 1), which inherit the value.
SERVER_PID = os.getpid()
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("thalamus_requests", "HTTP requests answered", ["function", "route", "method", "status"])
REQUEST_SECONDS = Histogram(
    "thalamus_request_duration_seconds",
    "Time from a request's arrival in the application to its last byte out",
    ["function", "route", "method", "status"],
    buckets=LATENCY,
)
INFERENCE_SECONDS = Histogram(
    "thalamus_inference_duration_seconds", "One model call (a whole batch)", ["model"], buckets=LATENCY
)
BATCH_SIZE = Histogram(
    "thalamus_inference_batch_size", "Inputs per model call", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64)
)
DECODE_SECONDS = Histogram(
    "thalamus_image_decode_duration_seconds", "Decoding and preprocessing one image", ["model"], buckets=LATENCY
)
TOKENS = Counter("thalamus_tokens", "Token requests by outcome", ["outcome"])  # issued, invalid, limited, bad_request
TOKEN_CACHE = Counter(
    "thalamus_token_cache_lookups", "Bearer checks answered from the process's token cache (hit) or not", ["result"]
)
AUTH_FAILURES = Counter("thalamus_auth_failures", "Refused bearer tokens by reason", ["reason"])
REDIS_SECONDS = Histogram(
    "thalamus_redis_command_duration_seconds", "One Redis round trip (a command, script or pipeline)", buckets=LATENCY
)
REDIS_ERRORS = Counter("thalamus_redis_errors", "Auth-store operations that found Redis unreachable", ["operation"])
MODEL_INFO = Gauge(
    "thalamus_model_info", "The model this function serves", ["model", "version"], multiprocess_mode="max"
)
MODEL_INTERPRETERS = Gauge("thalamus_model_interpreters", "LiteRT interpreters this process holds (up to one per CPU)",
                           ["model"], multiprocess_mode="livesum")  # fmt: skip
MODEL_LOAD_SECONDS = Gauge("thalamus_model_load_seconds", "Time to load the model at start", ["model"],
                           multiprocess_mode="max")  # fmt: skip
CONNECTIONS = Gauge("thalamus_connections_open", "Client connections held open, kept-alive idle ones included "
                    "(sampled 4 times a second)", ["function"], multiprocess_mode="livesum")  # fmt: skip
STARTS = Counter("thalamus_process_starts", "Worker processes started (a scale-from-zero start is one)", ["function"])


class ProcessTree(Collector):
    """Memory, CPU and file descriptors of the server's process and its forked workers, added
    up (prometheus_client's process collector sees one process; with WORKERS > 1 a function is
    several). ``root`` is the server's own process (shared.server), which workers inherit."""

    def __init__(self, root: int) -> None:
        self.root = root

    def collect(self) -> Iterator[Metric]:
        workers = [pid for pid in _pids() if _parent(pid) == self.root]
        pids = [self.root, *workers]
        rss = cpu = fds = 0.0
        page, ticks = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
                cpu += (int(fields[11]) + int(fields[12])) / ticks
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, IndexError, ValueError):
                continue  # a worker that just exited
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory of the server's processes", rss)
        yield GaugeMetricFamily("process_cpu_seconds_total", "CPU seconds of the server's processes", cpu)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors of the server's processes", fds)
        # One process serving on its own (WORKERS=1) is one worker.
        yield GaugeMetricFamily("thalamus_worker_processes", "Processes serving requests", len(workers) or 1)


def _pids() -> Iterator[int]:
    return (int(name) for name in os.listdir("/proc") if name.isdigit())


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def exposition() -> bytes:
    """Every metric in Prometheus text format, added up across this function's workers."""
    from prometheus_client import multiprocess  # imported by the first scrape, not at start
    from prometheus_client.exposition import generate_latest

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(ProcessTree(SERVER_PID))
    return generate_latest(registry)
