"""The images, built and run as Knative runs them (read-only root, tmpfs /tmp, no capabilities,
no privilege escalation, non-root): podman here (docker elsewhere)."""

import subprocess
import threading
import time
import uuid

import pytest
import requests

from local import ROOT, helpers
from local.helpers import demo_image, encode, free_port
from tests.test_layout import shared_closure

pytestmark = pytest.mark.slow
TOOL = helpers.container_engine()
if TOOL is None:
    pytest.skip(
        "no podman/docker able to build FROM python:3.11-slim here "
        "(on these machines run ../shared/tools/container-setup, as ./test.sh does)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def images():
    tags = {name: helpers.image_tag(name) for name in helpers.IMAGES}
    for name, tag in tags.items():
        helpers.build_image(TOOL, name, tag)
    return tags


@pytest.mark.parametrize("name, function", [("token", "token"), ("shapes", "predict")])
def test_an_image_holds_its_function_and_the_shared_modules_it_imports_only(images, name, function):
    listing = subprocess.run(
        [TOOL, "run", "--rm", "--entrypoint", "find", images[name], "/app", "-name", "*.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    inside = {path.removeprefix("/app/") for path in listing}
    own = {f"functions/{function}/{path.name}" for path in (ROOT / "functions" / function).glob("*.py")}
    assert inside == {"functions/__init__.py", *own, *shared_closure(function)}
    assert not [path for path in inside if path.startswith("local/")]


# In the image: the optimisation level, a module's docstring, and every .py on sys.path whose
# bytecode for that level is missing or checked against the source's time (a builder that resets
# file times would then have each such module compiled again at every start).
UNCOMPILED = """
import importlib.util, os, sys
import shared.http
print(sys.flags.optimize, shared.http.__doc__)
found, uncompiled = 0, []
for top in filter(os.path.isdir, sys.path):
    for folder, _, names in os.walk(top):
        for source in (os.path.join(folder, name) for name in names if name.endswith(".py")):
            found += 1
            try:
                with open(importlib.util.cache_from_source(source), "rb") as pyc:
                    flags = int.from_bytes(pyc.read(8)[4:], "little")
            except OSError:
                flags = None
            if flags != 1:  # PEP 552: 1 = hash-based, not checked against the source
                uncompiled.append(source)
print(found, uncompiled[:10])
"""


@pytest.mark.parametrize("name", ["token", "shapes"])
def test_an_image_runs_without_docstrings_and_compiles_nothing_at_start(images, name):
    # PYTHONOPTIMIZE=2: docstrings and asserts out of the bytecode (3-4 MB less resident per
    # replica), and every module on sys.path compiled for it when the image was built.
    done = subprocess.run(
        [TOOL, "run", "--rm", "--read-only", "--entrypoint", "python", images[name], "-c", UNCOMPILED],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    level, compiled = done.stdout.splitlines()[-2:]
    assert level == "2 None"  # the optimisation level, and shared.http's docstring left out
    found, uncompiled = compiled.split(" ", 1)
    assert int(found) > 1000 and uncompiled == "[]"  # the standard library, the packages, the app


@pytest.mark.parametrize("cgroupns", ["private", "host"])
def test_a_container_reads_its_cpu_quota_and_memory_limit_with_or_without_a_cgroup_namespace(images, cgroupns):
    # Without a cgroup namespace (Docker and containerd on cgroup v1 nodes), /proc/self/cgroup
    # names the group's host path, which is not under the container's mount: the limits were
    # read as none, so a 1-CPU pod made an interpreter per node CPU and decoded on a default budget.
    done = subprocess.run(
        [TOOL, "run", "--rm", "--read-only", "--cpus", "1", "--memory", "300m", f"--cgroupns={cgroupns}",
         "--entrypoint", "python", images["shapes"], "-c",
         "from shared import cgroup; print(cgroup.cpu_quota(), cgroup.usable_cpus(), cgroup.memory_limit())"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1.0", "1", str(300 << 20)]


@pytest.fixture
def stack(images, redis_url, env):
    started = []

    def start(name, service):
        port = free_port()
        container = helpers.run_container(
            TOOL, images[name], port, {"REDIS_URL": redis_url, "THALAMUS_PREFIX": env["THALAMUS_PREFIX"]}, service
        )
        started.append(container)
        base = f"http://127.0.0.1:{port}"
        helpers.wait_container_ready(base + "/readyz", container, TOOL)
        return container, base

    yield start
    for container in started:
        helpers.remove_container(TOOL, container)


def test_token_and_prediction_through_containers(stack, auth):
    token_container, token_base = stack("token", "thalamus-token")
    predict_container, predict_base = stack("shapes", "thalamus-shapes")
    pair = auth.create_key(["shapes"])
    token = requests.post(
        f"{token_base}/token.json", timeout=10, json={"public_key": pair.public_key, "secret_key": pair.secret_key}
    ).json()["token"]
    headers = {"Authorization": f"Bearer {token}"}
    for i, label in enumerate(["circle", "square", "triangle"]):
        reply = requests.post(
            f"{predict_base}/models/shapes/predict.json",
            headers=headers,
            timeout=30,
            files={"file": ("x.jpg", encode(demo_image("shapes", label, 300 + i), "JPEG"))},
        )
        assert reply.status_code == 200 and reply.json()["prediction"] == label
    # A lossless WebP too large to bound in the server is decoded by a child Python (the image's
    # own, read-only, non-root): the same answer; a file of too many Huffman groups, a 400.
    for name, data, status in (
        ("c.webp", encode(demo_image("shapes", "circle", 310).resize((640, 480)), "WEBP", lossless=True), 200),
        ("groups.webp", helpers.webp_huffman_groups(), 400),
    ):
        reply = requests.post(f"{predict_base}/models/shapes/predict.json", headers=headers, timeout=30,
                              files={"file": (name, data)})  # fmt: skip
        assert reply.status_code == status, reply.text
        assert status == 400 or reply.json()["prediction"] == "circle"
    for container in (token_container, predict_container):
        uid = subprocess.run([TOOL, "exec", container, "id", "-u"], capture_output=True, text=True).stdout
        assert uid.strip() not in ("", "0")
        tf = subprocess.run([TOOL, "exec", container, "python", "-c", "import tensorflow"], capture_output=True)
        assert tf.returncode != 0  # the predict image has no TensorFlow at all
        # Run as knative/ runs them: only /tmp is writable, and nothing tried to write elsewhere.
        for path, writable in (("/tmp/probe", True), ("/app/probe", False), ("/run/probe", False)):
            touched = subprocess.run([TOOL, "exec", container, "touch", path], capture_output=True)
            assert (touched.returncode == 0) == writable, path
        logs = subprocess.run([TOOL, "logs", container], capture_output=True, text=True)
        assert "Read-only file system" not in logs.stdout + logs.stderr


def test_sigterm_finishes_the_in_flight_request_then_exits(stack, auth):
    container, base = stack("shapes", "thalamus-shapes-term")
    pair = auth.create_key()
    token = auth.issue_token(pair.public_key, pair.secret_key, "t").token
    image = encode(demo_image("shapes", "square", 77))
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    sent_half = threading.Event()

    def slow_body():
        yield body[: len(body) // 2]
        sent_half.set()
        time.sleep(2)  # SIGTERM arrives while this request is in flight
        yield body[len(body) // 2 :]

    result = {}

    def call():
        result["reply"] = requests.post(
            f"{base}/models/shapes/predict.json",
            data=slow_body(),
            timeout=30,
            headers={"Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={boundary}"},
        )

    caller = threading.Thread(target=call)
    caller.start()
    assert sent_half.wait(10)
    time.sleep(0.3)
    signalled = time.monotonic()
    subprocess.run([TOOL, "kill", "--signal", "TERM", container], check=True, capture_output=True)
    caller.join(30)
    assert result["reply"].status_code == 200 and result["reply"].json()["prediction"] == "square"
    subprocess.run([TOOL, "wait", container], capture_output=True, timeout=30)
    assert time.monotonic() - signalled < 10


def test_a_rebuild_leaves_no_image_behind(images, tmp_path):
    """Each test run builds the images again under the same tags: what a tag named before goes
    (left untagged, one per run would fill the disk)."""
    tag = f"localhost/thalamus-token:test-rebuild-{uuid.uuid4().hex[:8]}"
    (tmp_path / "Dockerfile").write_text(f"FROM {images['token']}\nLABEL replaced=yes\n")
    subprocess.run([TOOL, "build", "-q", "-t", tag, str(tmp_path)], check=True, capture_output=True)
    old = helpers.image_id(TOOL, tag)
    try:
        helpers.build_image(TOOL, "token", tag)  # the same as images["token"], from the build cache
        assert helpers.image_id(TOOL, tag) == helpers.image_id(TOOL, images["token"])
        assert old is not None and helpers.image_id(TOOL, old) is None
    finally:
        subprocess.run([TOOL, "rmi", tag], capture_output=True)  # the tag only: the image has another
