"""Container figures: image size of each image, and cold start of each container from
``podman run`` to the first authenticated 200.

    .venv/bin/python bench/bench_containers.py [--runs 3] [--no-build]

Builds the token image and the shapes predict image (as tests/test_containers.py does), starts a
throw-away redis-server, and runs each container with the env Knative gives it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from local import helpers
from local.helpers import RedisServer, demo_image, encode, free_port
from shared.auth import AuthStore
from shared.config import Settings


def first_200(tool: str, tag: str, env: dict, service: str, request) -> float:
    port = free_port()
    started = time.perf_counter()
    container = helpers.run_container(tool, tag, port, env, service)
    try:
        while time.perf_counter() - started < 120:
            try:
                if request(f"http://127.0.0.1:{port}").status_code == 200:
                    return time.perf_counter() - started
            except requests.ConnectionError:
                time.sleep(0.01)
        raise TimeoutError(tag)
    finally:
        helpers.remove_container(tool, container)


def runtime_only(tool: str, tag: str) -> float:
    """Seconds for ``tool run --rm IMAGE true``: what the container runtime alone costs."""
    started = time.perf_counter()
    subprocess.run(
        [tool, "run", "--rm", "--network", "host", "--entrypoint", "true", tag], check=True, capture_output=True
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    tool = helpers.container_engine()
    if tool is None:
        raise SystemExit("no podman/docker here (run ../shared/tools/container-setup first)")
    tags = {name: helpers.image_tag(name) for name in helpers.IMAGES}
    if not args.no_build:
        for name, tag in tags.items():
            helpers.build_image(tool, name, tag)
    with tempfile.TemporaryDirectory() as tmp:
        redis_port = free_port()
        server = RedisServer(redis_port, Path(tmp)).start()
        env = {"REDIS_URL": server.url}
        auth = AuthStore(Settings(redis_url=server.url))
        pair = auth.create_key()
        token = auth.issue_token(pair.public_key, pair.secret_key, "bench").token
        photo = encode(demo_image("shapes", "circle", 1), "JPEG")
        requests_by_image = {
            "token": lambda base: requests.post(
                f"{base}/token.json", timeout=10, json={"public_key": pair.public_key, "secret_key": pair.secret_key}
            ),
            "shapes": lambda base: requests.post(
                f"{base}/models/shapes/predict.json",
                timeout=10,
                headers={"Authorization": f"Bearer {token}"},
                files={"file": ("p.jpg", photo)},
            ),
        }
        try:
            print(
                f"{'image':<32} {'size':>8} {'podman run → first authenticated 200':>38} {'podman run IMAGE true':>22}"
            )
            for name, tag in tags.items():
                size = subprocess.run(
                    [tool, "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True, check=True
                ).stdout.strip()
                colds = [
                    first_200(tool, tag, env, f"thalamus-{name}", requests_by_image[name]) for _ in range(args.runs)
                ]
                bare = [runtime_only(tool, tag) for _ in range(args.runs)]
                print(
                    f"{tag:<32} {int(size) / 1e6:6.0f}MB {statistics.median(colds) * 1000:>35.0f} ms "
                    f"{statistics.median(bare) * 1000:>19.0f} ms"
                )
            print(
                f"(medians of {args.runs} runs; the last column is the container runtime's own cost "
                "of creating and starting a container of that image, with no Python at all)"
            )
        finally:
            auth.purge()
            server.stop()


if __name__ == "__main__":
    main()
