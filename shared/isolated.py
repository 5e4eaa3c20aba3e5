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
at-fork handler of the server runs) and costs a Python start, about a fifth of a second here,
which only such files pay.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from shared.errors import BadRequest, ServiceUnavailable

# Bytes of Huffman tables a lossless WebP may need and still be decoded in the server's process
# (charged to its decode budget): about 800 groups, an image of up to ~110 x 110 pixels.
IN_PROCESS_TABLE_BYTES = 16 << 20
TABLE_BYTES_PER_GROUP = 20 << 10  # the largest group (an 11-bit colour cache); 11 KiB measured without
CHILD_TABLE_BYTES = 64 << 20  # what the child may map for tables: ~3,000 groups (libwebp writes at most ~2,600)
CHILD_BASE_BYTES = 48 << 20  # the child's own Python, NumPy and Pillow (measured ~40 MiB resident)
CHILD_START_SECONDS = 0.3  # CPU of starting it (measured 0.15-0.25 s)
NS_PER_GROUP = 15_000.0  # building one group's tables
_ROOT = str(Path(__file__).resolve().parent.parent)


def groups_bound(width: int, height: int, nbytes: int) -> int:
    """The most Huffman groups a lossless WebP of ``width`` x ``height`` in ``nbytes`` can make
    libwebp build: at most 65,536, one per block of 4 x 4 pixels (its finest grid), and each takes
    at least 20 bits of the file (five one-symbol codes of 4 bits)."""
    return min(65_536, math.ceil(width / 4) * math.ceil(height / 4), nbytes * 8 // 20)


def decode(data: bytes, size: tuple[int, int], mode: str, max_bytes: int, cpu_seconds: float) -> np.ndarray:
    """``data`` (a WebP) decoded in a child process and reduced as :func:`shared.imaging.decoded`
    does: uint8 pixels of shape (height, width, channels). The child may map ``max_bytes`` beyond
    its start and take ``cpu_seconds`` of CPU; past either, or on a corrupt file, BadRequest."""
    header = json.dumps({"size": size, "mode": mode, "max_bytes": max_bytes, "cpu_seconds": cpu_seconds})
    # Its own Python, the server's modules: -P and PYTHONPATH, not the working directory.
    env = {**os.environ, "PYTHONPATH": _ROOT, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-P", "-m", "shared.isolated"]
    try:
        done = subprocess.run(
            command, input=header.encode() + b"\n" + data, capture_output=True, env=env, timeout=2 * cpu_seconds + 5
        )
    except subprocess.TimeoutExpired:
        raise BadRequest(f"image too costly to decode (over {cpu_seconds:.0f} s); send a plain image") from None
    except OSError:  # no process or descriptor to spare: the request may succeed later
        raise ServiceUnavailable("cannot start an image decoder now; retry shortly") from None
    width, height = size
    channels = 1 if mode == "L" else 3
    if done.returncode != 0 or len(done.stdout) != width * height * channels:
        raise BadRequest(
            f"image data is truncated or corrupt, or needs more than {max_bytes >> 20} MiB or "
            f"{cpu_seconds:.0f} s of CPU to decode"
        )
    return np.frombuffer(done.stdout, np.uint8).reshape(height, width, channels)


def _mapped_bytes() -> int:
    """This process's virtual size now (what RLIMIT_AS counts)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


def main() -> None:
    """The child: limits first, then the decode; exit 2 (and nothing written) when it fails."""
    from shared import imaging  # noqa: PLC0415 (the child's import, not the server's)

    header = json.loads(sys.stdin.buffer.readline())
    data = sys.stdin.buffer.read()
    limit = _mapped_bytes() + int(header["max_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cpu = math.ceil(float(header["cpu_seconds"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit ends it
    try:
        with Image.open(io.BytesIO(data), formats=("WEBP",)) as image:
            pixels = imaging.decoded(image, tuple(header["size"]), header["mode"])
    except (Exception, MemoryError):  # libwebp's failed allocation is a failed decode, as corruption is
        sys.exit(2)
    sys.stdout.buffer.write(pixels.tobytes())


if __name__ == "__main__":
    main()
