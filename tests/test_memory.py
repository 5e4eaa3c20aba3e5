"""Memory and CPU bounded by design: the worst images the predict function accepts, in every
format and mode, THREADS requests at once, against a real server running in a memory cgroup
with its Knative Service's limit, as a container would. It is never OOM-killed, its memory stays
under the limit, and returns near its resting size afterwards."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from local import ROOT
from local.helpers import demo_image, encode, free_port, function_command, remove_cgroup, wait_http, worst_case_images
from shared import imaging, jsonbody
from tests.conftest import subprocess_env
from tests.test_images import FLOOD_BYTES, flood_words, long_png, metadata_floods

pytestmark = pytest.mark.slow
THREADS = 4


def manifest_memory_limit() -> int:
    """The predict Service's memory limit in bytes, from knative/functions/model-template.yaml."""
    text = (ROOT / "knative/functions/model-template.yaml").read_text()
    value = re.search(r"limits:\s*\n(?:\s+\w+: .*\n)*?\s+memory: (\d+)Mi", text)
    assert value, "no memory limit in the model template"
    return int(value.group(1)) << 20


@pytest.fixture(scope="module")
def worst_images() -> dict[str, bytes]:
    return worst_case_images()


class MemoryCgroup:
    """A cgroup (v1 or v2 memory controller) with a memory limit, for the server under test."""

    def __init__(self, limit: int) -> None:
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "memory" in v2.read_text().split():
            self.path, self.v2 = Path(f"/sys/fs/cgroup/thalamus-test-{os.getpid()}"), True
        else:
            self.path, self.v2 = Path(f"/sys/fs/cgroup/memory/thalamus-test-{os.getpid()}"), False
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit))
        except OSError as exc:
            pytest.skip(f"cannot create a memory cgroup here ({exc}); run as root on Linux")

    def anonymous(self) -> int:
        """Bytes of process memory in the cgroup now (anonymous pages: page cache is reclaimable)."""
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        return int(stat["anon"] if self.v2 else stat["rss"])

    def oom_kills(self) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        return int(dict(line.split() for line in (self.path / name).read_text().splitlines()).get("oom_kill", 0))

    def remove(self) -> None:
        remove_cgroup(self.path)


@pytest.fixture
def predict_server(env, auth):
    cgroup = MemoryCgroup(manifest_memory_limit())
    port = free_port()
    command = function_command("predict", port, cgroup.path)
    settings = {"MODEL_NAME": "shapes", "THREADS": str(THREADS), "WORKERS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=subprocess_env(**env, **settings))  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/healthz", proc)
    pair = auth.create_key()
    headers = {"Authorization": "Bearer " + auth.issue_token(pair.public_key, pair.secret_key, "t").token}
    yield base, cgroup, headers
    proc.terminate()
    _, stderr = proc.communicate(timeout=20)
    cgroup.remove()
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")


def post(base: str, headers: dict[str, str], files: list[tuple[str, bytes]]) -> requests.Response:
    parts = [("file", (name, io.BytesIO(data))) for name, data in files]
    return requests.post(f"{base}/models/shapes/predict.json", headers=headers, files=parts, timeout=120)


@contextlib.contextmanager
def peak_memory(cgroup: Any) -> Iterator[list[int]]:
    """The cgroup's anonymous memory, sampled every 10 ms while the block runs."""
    peak, sampling = [cgroup.anonymous()], threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak.append(cgroup.anonymous())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        sampling.set()
        sampler.join()


def test_worst_images_stay_under_the_memory_limit_and_memory_comes_back(predict_server, worst_images):
    base, cgroup, headers = predict_server
    circle = encode(demo_image("shapes", "circle", 1))
    with ThreadPoolExecutor(THREADS) as pool:  # warm: every thread's first request
        assert {r.status_code for r in pool.map(lambda _: post(base, headers, [("c.png", circle)]), range(8))} == {200}
    time.sleep(1)
    resting = cgroup.anonymous()

    names = list(worst_images)
    alone = [[(name, worst_images[name])] for name in names]
    pairs = [[(a, worst_images[a]), (b, worst_images[b])] for a, b in zip(names, names[1:], strict=False)]
    requests_ = alone + pairs
    with peak_memory(cgroup) as peak, ThreadPoolExecutor(THREADS) as pool:
        replies = list(pool.map(lambda files: post(base, headers, files), requests_))

    limit = manifest_memory_limit()
    answers = {
        tuple(n for n, _ in files): (r.status_code, r.json()) for files, r in zip(requests_, replies, strict=True)
    }
    assert all(status in (200, 400, 503) for status, _ in answers.values()), answers
    assert answers[("png-rgba",)][0] == 200 and answers[("png-16bit-grey",)][0] == 200  # 40 Mpx decodes
    assert answers[("jpeg-multi-picture",)][0] == 200  # drafted as any JPEG: 1/8 of each side
    assert "MiB to decode" in answers[("webp-rgba",)][1]["error"]  # WebP needs 16 B/px: refused, named
    assert answers[("webp-huffman-groups",)][0] == 400  # its tables fail in a child, not here
    if ("jpeg-cmyk-one-scan",) in answers:  # full-size coefficients: counted, so refused
        assert "MiB to decode" in answers[("jpeg-cmyk-one-scan",)][1]["error"]
    assert cgroup.oom_kills() == 0
    assert max(peak) < limit, f"peak {max(peak) >> 20} MiB over the {limit >> 20} MiB limit"

    time.sleep(2)
    after = cgroup.anonymous()
    # What the decodes took comes back, less what the heap keeps by design (up to 8 MiB free at its
    # top, shared.server's M_TRIM_THRESHOLD) and Python's own free lists: a decode's buffers are
    # tens to hundreds of MiB. (20 % of resting alone failed once in a clean-clone CI run: 47 → 60
    # MiB; alone, it comes back to within 2–4 MiB of 43.)
    allowance = max(resting // 5, 16 << 20)
    assert after <= resting + allowance, f"resting {resting >> 20} MiB before, {after >> 20} MiB after"
    print(f"memory: resting {resting >> 20} MiB, peak {max(peak) >> 20} MiB, after {after >> 20} MiB")
    assert post(base, headers, [("c.png", circle)]).json()["prediction"] == "circle"


def worst_json_documents(limit: int) -> dict[str, tuple[str, bytes]]:
    """V1 and V2 JSON bodies of the shapes that cost most memory for their size, each just
    under the JSON budget of a replica with ``limit``: (path, body) by name."""
    budget = imaging.decode_budget(limit) // 2
    documents = {}
    for item in ("[[1.5]]", "[1.5]", "[[[[[[1]]]]]]"):
        one = jsonbody.json_cost(f"{item},".encode())
        items = ",".join([item] * (budget * 98 // 100 // one))
        v2 = f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1,64,64,3],"data":[{items}]}}]}}'
        documents[f"v2 {item}"] = ("/v2/models/shapes/infer", v2.encode())
        documents[f"v1 {item}"] = ("/v1/models/shapes:predict", f'{{"instances":[{items}]}}'.encode())
    for path, body in documents.values():
        assert budget * 0.9 < jsonbody.json_cost(body) <= budget, (path, jsonbody.json_cost(body), budget)
    return documents


def test_worst_json_documents_stay_under_the_memory_limit(predict_server, worst_images):
    """JSON documents each as large as one may be, THREADS at once, with the worst images beside
    them: they wait for each other (or get a 503), never for the OOM killer."""
    base, cgroup, headers = predict_server
    limit = manifest_memory_limit()
    documents = list(worst_json_documents(limit).items()) * 2
    images = [(name, data) for name, data in worst_images.items() if name in ("png-rgba", "png-16bit-grey")]

    def send(job: tuple[str, Any]) -> tuple[str, int]:
        name, what = job
        if isinstance(what, bytes):
            return name, post(base, headers, [(name, what)]).status_code
        path, body = what
        reply = requests.post(base + path, headers=headers, data=body, timeout=120)
        return name, reply.status_code

    jobs: list[tuple[str, Any]] = [*documents, *images]
    with peak_memory(cgroup) as peak, ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(send, jobs))
    assert cgroup.oom_kills() == 0
    assert max(peak) < limit, f"peak {max(peak) >> 20} MiB over the {limit >> 20} MiB limit"
    # Each document parses, and is then refused for its shape (1.5 million values for 12,288
    # inputs), or waits too long for the budget: 503.
    assert all(status in (400, 503) for name, status in answers if name.startswith("v")), answers
    assert sum(status == 400 for _, status in answers) >= 2, answers
    print(f"JSON and images: peak {max(peak) >> 20} MiB of {limit >> 20} MiB, answers {answers}")


def test_cpu_per_request_is_bounded(predict_server, worst_images):
    base, _, headers = predict_server
    started = time.monotonic()
    reply = post(base, headers, [(f"{i}.png", worst_images["png-16bit-grey"]) for i in range(32)])
    assert reply.status_code == 400 and "s of CPU" in reply.json()["error"]
    assert time.monotonic() - started < 5  # refused from the headers, not after decoding 32 images


def test_metadata_floods_and_long_sides_are_refused_in_little_memory(predict_server):
    # 10 MB of metadata in blocks of a few bytes (Pillow made an object of each: up to 460 MB and
    # 9 s of CPU for one image, two at once ~900 MB) and 40 Mpx images of one row or one column
    # (430 and 314 MiB): refused from their structure and header, THREADS at once, in little memory.
    base, cgroup, headers = predict_server
    floods = metadata_floods(FLOOD_BYTES)
    files = {**floods, "png-1x39M": long_png(1, 39_000_000), "png-39Mx1": long_png(39_000_000, 1)}
    post(base, headers, [("c.png", encode(demo_image("shapes", "circle", 1)))])
    resting = cgroup.anonymous()
    started = time.monotonic()
    with peak_memory(cgroup) as peak, ThreadPoolExecutor(THREADS) as pool:
        answers = pool.map(lambda name: post(base, headers, [(name, files[name])]), files)
        replies = dict(zip(files, answers, strict=True))
    elapsed = time.monotonic() - started
    for name, reply in replies.items():
        words = flood_words(name) if name in floods else "limit 65535 on a side"
        assert reply.status_code == 400 and words in reply.json()["error"], (name, reply.json())
    grown = (max(peak) - resting) >> 20
    print(f"memory: resting {resting >> 20} MiB, peak +{grown} MiB, {elapsed:.1f} s for {len(files)} images")
    assert cgroup.oom_kills() == 0
    # The 10 MB bodies being read, each held a few times over, not their metadata (before: 900 MiB).
    assert grown < 160 and max(peak) < manifest_memory_limit(), f"peak {grown} MiB over the resting size"
    assert elapsed < 10
