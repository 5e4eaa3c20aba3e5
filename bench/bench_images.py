"""What decoding the worst image of each format and mode costs, one fresh process each.

    .venv/bin/python bench/bench_images.py

For each image of ``local.helpers.worst_case_images()`` (40 Mpx, flat colours, a few KB on the
wire), in a new process: the peak memory growth (VmHWM after minus VmRSS before) and the CPU
time of ``shared.imaging.model_input`` for the shapes model's 64x64 RGB input, with the default
budget (160 MiB, as in a container of 384 MiB), and the same for the naive way (Pillow's
``Image.open().convert("RGB").resize()``, what a server without bounds does).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from local.helpers import worst_case_images

PROBE = """
import json, resource, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from shared import imaging

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
data = Path(sys.argv[1]).read_bytes()
spec = {"height": 64, "width": 64, "channels": 3}
before, cpu = rss("VmRSS:"), time.process_time()
try:
    if sys.argv[2] == "bounded":
        imaging.model_input(data, imaging.Limits(40_000_000, imaging.DecodeBudget(160 << 20)), spec, {})
    else:
        Image.MAX_IMAGE_PIXELS = None
        import io
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
        np.asarray(image, dtype=np.float32)
    outcome = "decoded"
except Exception as exc:
    outcome = f"refused: {getattr(exc, 'message', exc)}"
print(json.dumps({"peak": rss("VmHWM:") - before, "cpu": time.process_time() - cpu, "outcome": outcome}))
"""


def measure(path: Path, way: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), way], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    print(
        f"{'image (40 Mpx)':<26} {'size':>8} {'naive peak':>11} {'CPU':>6}   {'bounded peak':>12} {'CPU':>6}  outcome"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in worst_case_images().items():
            path = Path(tmp) / name
            path.write_bytes(data)
            naive, bounded = measure(path, "naive"), measure(path, "bounded")
            print(
                f"{name:<26} {len(data) / 1024:6.0f}KB {int(naive['peak']) / 2**20:8.0f}MiB {float(naive['cpu']):5.2f}s"
                f"   {int(bounded['peak']) / 2**20:9.0f}MiB {float(bounded['cpu']):5.2f}s  {bounded['outcome']}"
            )


if __name__ == "__main__":
    main()
