"""Decoding an image in a process of its own, whose memory and CPU the kernel bounds: for images
whose decoder's needs cannot be known from their header.

A lossless WebP (a VP8L image, or a lossy one with lossless alpha) may declare up to 65,536 groups
of Huffman codes, and libwebp builds every group's tables (about 11 KiB each, measured) before it
decodes a pixel: a 295 KB file took 371 MiB. How many groups a file has lies behind its
transforms' own entropy-coded images, which only a decoder can read. So a lossless WebP that may
hold more groups than :data:`IN_PROCESS_TABLE_BYTES` allows is decoded by a child Python, with
``RLIMIT_AS`` (what it may map beyond what it holds once started) and ``RLIMIT_CPU`` set: a file
whose tables exceed that fails there, as a 400, while the function serves on. The child reads a
JSON header line then the file on stdin, and writes the reduced image's pixels on stdout.

It is started with ``subprocess`` (``vfork`` + ``exec``: safe from a threaded server, and no
at-fork handler of the server runs) and imports Pillow and :mod:`shared.bands` only, not NumPy:
about 0.05 s of CPU, which only such files pay. Its exit status says what happened: 0 the pixels,
:data:`FAILED` a decode that failed (a corrupt file, or one past its limits: a 400), anything else
(it could not set its limits, or start) the server's fault, logged (a 503).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

from PIL import Image

from shared.errors import BadRequest, ServiceUnavailable

log = logging.getLogger("thalamus")

TABLE_BYTES_PER_GROUP = 20 << 10  # the largest group (an 11-bit colour cache); 11 KiB measured without
CHILD_TABLE_BYTES = 64 << 20  # what the child may map for tables: ~3,000 groups (libwebp writes at most ~2,600)
CHILD_BASE_BYTES = 32 << 20  # the child's own Python and Pillow (measured 16 MiB before decoding)
# Bytes of Huffman tables a lossless WebP may need at worst and still be decoded in the server's
# process, charged to its decode budget: no more than a child would be charged (about 4,900
# groups: an image of up to ~280 x 280 pixels, or a file of up to ~12 KB, whatever its size).
IN_PROCESS_TABLE_BYTES = CHILD_TABLE_BYTES + CHILD_BASE_BYTES
CHILD_START_SECONDS = 0.1  # CPU of starting it (measured 0.04-0.06 s)
NS_PER_GROUP = 15_000.0  # building one group's tables
FAILED = 2  # the child's exit status for a decode that failed
WALL_SECONDS = 10  # past its CPU limit, the time a child may take before it is killed
_ROOT = str(Path(__file__).resolve().parent.parent)


def groups_bound(width: int, height: int, nbytes: int) -> int:
    """The most Huffman groups a lossless WebP of ``width`` x ``height`` in ``nbytes`` can make
    libwebp build: at most 65,536, one per block of 4 x 4 pixels (its finest grid), and each takes
    at least 20 bits of the file (five one-symbol codes of 4 bits)."""
    return min(65_536, math.ceil(width / 4) * math.ceil(height / 4), nbytes * 8 // 20)


def decode(
    data: bytes, size: tuple[int, int], mode: str, method: Image.Transpose | None, max_bytes: int, cpu_seconds: float
) -> Any:
    """``data`` (a WebP) decoded in a child process, turned upright by ``method`` and reduced as
    :func:`shared.bands.reduced` does: uint8 pixels of shape (height, width, channels). The child
    may map ``max_bytes`` beyond its start and take ``cpu_seconds`` of CPU (whole seconds, at
    least one); past either, or on a corrupt file, BadRequest; when it cannot run or finish for
    the server's reasons (killed, starved, broken), ServiceUnavailable, logged."""
    import subprocess  # noqa: PLC0415 (loaded by the server already: asyncio imports it)

    import numpy as np  # noqa: PLC0415 (the server's; this module is also the child's, which has none)

    limit = max(1, math.ceil(cpu_seconds))  # RLIMIT_CPU counts whole seconds
    header = {"size": size, "mode": mode, "orientation": method, "max_bytes": max_bytes, "cpu_seconds": limit}
    # The server's Python and modules (-P and PYTHONPATH, not the working directory, the project's
    # first), and none of its settings: REDIS_URL may hold a password, which the child has no use for.
    env = {name: value for name, value in os.environ.items() if name.startswith("PYTHON") or name == "PATH"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (_ROOT, os.environ.get("PYTHONPATH"))))
    command = [sys.executable, "-P", "-m", "shared.isolated"]
    try:
        done = subprocess.run(
            command, input=json.dumps(header).encode() + b"\n" + data, capture_output=True, env=env,
            timeout=limit + WALL_SECONDS,
        )  # fmt: skip
    except subprocess.TimeoutExpired:  # far past its CPU limit: starved (the server is overloaded) or stuck
        log.warning("image decoder still running after %.0f s; killed", limit + WALL_SECONDS)
        raise ServiceUnavailable("cannot decode this image now; retry shortly") from None
    except OSError as exc:  # no process or descriptor to spare: the request may succeed later
        log.warning("cannot start an image decoder: %s", exc)
        raise ServiceUnavailable("cannot start an image decoder now; retry shortly") from None
    width, height = size
    channels = 1 if mode == "L" else 3
    if done.returncode in (FAILED, -signal.SIGXCPU):  # the decode failed, or hit its own limits
        raise BadRequest(
            f"image data is truncated or corrupt, or needs more than {max_bytes >> 20} MiB or "
            f"{limit} s of CPU to decode"
        )
    if done.returncode != 0 or len(done.stdout) != width * height * channels:  # killed (OOM), or broken
        log.error(
            "image decoder failed (exit status %s): %s", done.returncode, done.stderr.decode(errors="replace")[-2000:]
        )
        raise ServiceUnavailable("cannot decode this image now; retry shortly")
    return np.frombuffer(done.stdout, np.uint8).reshape(height, width, channels)


def _mapped_bytes() -> int:
    """This process's virtual size now (what RLIMIT_AS counts)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def main() -> None:
    """The child: limits first (exit 1 if they cannot be set), then the decode (exit FAILED if it
    fails, nothing written)."""
    import resource  # noqa: PLC0415 (the child's imports, not the server's)

    from PIL import WebPImagePlugin  # noqa: F401, PLC0415 (or Image.open imports every plugin: 30 ms)

    from shared import bands  # noqa: PLC0415

    header = json.loads(sys.stdin.buffer.readline())
    data = sys.stdin.buffer.read()
    limit = _mapped_bytes() + int(header["max_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cpu = int(header["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit ends it
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # and dumps no core
    method = None if header["orientation"] is None else Image.Transpose(header["orientation"])
    try:
        with Image.open(io.BytesIO(data), formats=("WEBP",)) as image:
            small = bands.reduced(image, tuple(header["size"]), header["mode"], method)
    except Exception:  # libwebp's failed allocation (or a MemoryError) is a failed decode, as corruption is
        sys.exit(FAILED)
    sys.stdout.buffer.write(small.tobytes())


if __name__ == "__main__":
    main()
