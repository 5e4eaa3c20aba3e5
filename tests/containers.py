"""podman helpers shared by tests/test_containers.py and bench/bench_containers.py."""

from __future__ import annotations

import shutil
import subprocess
import time

import requests

from tests.conftest import ROOT

IMAGES = {"token": ("functions/token/Dockerfile", {}),
          "shapes": ("functions/predict/Dockerfile", {"MODEL": "shapes"})}


def engine() -> str | None:
    """podman (or docker) when it can build FROM python:3.11-slim here, else None."""
    for name in ("podman", "docker"):
        if shutil.which(name):
            probe = subprocess.run([name, "image", "inspect", "python:3.11-slim"], capture_output=True)
            if probe.returncode == 0 or name == "docker":
                return name
    return None


def build(tool: str, name: str, tag: str) -> None:
    dockerfile, args = IMAGES[name]
    command = [tool, "build", "-q", "-f", dockerfile, "-t", tag, "."]
    for key, value in args.items():
        command[2:2] = ["--build-arg", f"{key}={value}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} build {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def run(tool: str, tag: str, port: int, env: dict[str, str], service: str) -> str:
    """Start a container as Knative would (PORT, K_SERVICE, K_REVISION, K_CONFIGURATION)."""
    knative = {"PORT": str(port), "K_SERVICE": service, "K_CONFIGURATION": service,
               "K_REVISION": f"{service}-00001"}
    args = [tool, "run", "-d", "--network", "host"]
    for key, value in {**knative, **env}.items():
        args += ["-e", f"{key}={value}"]
    return subprocess.run([*args, tag], capture_output=True, text=True, check=True).stdout.strip()


def wait_ready(url: str, container: str, tool: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    logs = subprocess.run([tool, "logs", container], capture_output=True, text=True).stderr
    raise TimeoutError(f"{url} not ready; container logs:\n{logs[-2000:]}")


def remove(tool: str, container: str) -> None:
    subprocess.run([tool, "rm", "-f", "-t", "0", container], capture_output=True)
