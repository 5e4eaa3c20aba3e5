"""KServe's Python model server for bench/bench_predict.py: its venv, and the command that serves
a bundle with it (bench/kserve_app.py).

    from bench.kserve_env import kserve_command
    args = kserve_command(bundle_dir, port)   # makes bench/.venv-kserve on first use (~1 min)
    proc = subprocess.Popen(args, ...)        # then POST /v1/models/<name>:predict on port

kserve cannot join .venv (its pins clash with requirements-bench.txt's, see
requirements-kserve.txt), so it gets a venv of its own, git-ignored, made from
requirements-kserve.txt on first use and brought up to date when that file changes.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

from local import ROOT
from local.helpers import free_port

VENV = ROOT / "bench" / ".venv-kserve"
REQUIREMENTS = ROOT / "requirements-kserve.txt"
APP = ROOT / "bench" / "kserve_app.py"
SHARED_PINS = ("ai-edge-litert", "pillow", "numpy")  # must be the predict function's


def _pins(path: Path) -> dict[str, str]:
    found = (re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line) for line in path.read_text().splitlines())
    return {m[1].lower(): m[2] for m in found if m}


def ensure_kserve_python() -> Path:
    """The Python of bench/.venv-kserve, with requirements-kserve.txt installed: made on first
    use, updated when the file changed since. RuntimeError when its LiteRT, Pillow or NumPy pin
    is not the predict function's (the comparison would not be of the same work)."""
    ours, predict = _pins(REQUIREMENTS), _pins(ROOT / "functions" / "predict" / "requirements.txt")
    differ = [f"{n} {ours.get(n)} vs {predict.get(n)}" for n in SHARED_PINS if ours.get(n) != predict.get(n)]
    if differ:
        raise RuntimeError(f"{REQUIREMENTS.name} and functions/predict/requirements.txt differ: {', '.join(differ)}")
    python = VENV / "bin" / "python"
    stamp = VENV / ".requirements.sha256"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    print(f"bench: installing {REQUIREMENTS.name} into {VENV.relative_to(ROOT)} (once, ~1 min)", file=sys.stderr)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    # pip's output only when it fails: a successful install prints a warning or two per package.
    pip = [str(python), "-m", "pip", "install", "-r", str(REQUIREMENTS)]
    done = subprocess.run(pip, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(pip[1:])} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    stamp.write_text(digest)
    return python


def kserve_command(bundle_dir: Path, port: int, grpc_port: int | None = None) -> list[str]:
    """The command that serves the bundle in ``bundle_dir`` with KServe's model server on
    ``port`` (HTTP), its gRPC server (on by default in KServe) on ``grpc_port`` or a free port.
    Makes the venv first if needed (see :func:`ensure_kserve_python`)."""
    return [
        str(ensure_kserve_python()),
        str(APP),
        "--model_dir",
        str(bundle_dir),
        "--http_port",
        str(port),
        "--grpc_port",
        str(grpc_port or free_port()),
    ]
