"""The Dockerfiles, read offline: hadolint-clean, slim base, non-root, only each function's deps."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from local import ROOT

DOCKERFILES = [ROOT / "functions/token/Dockerfile", ROOT / "functions/predict/Dockerfile"]


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(path.parent / line[3:].strip())
        elif line:
            names.add(re.split(r"[=<>\[ ]", line)[0].lower())
    return names


def test_hadolint_reports_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_slim_base_non_root_production_command(dockerfile):
    text = dockerfile.read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim\nFROM ${BASE_IMAGE}" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0")
    function = dockerfile.parent.name
    assert f'CMD ["python", "-m", "shared.server", "/app/functions/{function}/main.py"]' in text
    assert "WORKERS=1" in text and "THREADS" not in text  # one thread per CPU the container may use


def test_predict_image_has_no_tensorflow_and_token_image_no_model_runtime():
    predict = requirement_names(ROOT / "functions/predict/requirements.txt")
    token = requirement_names(ROOT / "functions/token/requirements.txt")
    assert "ai-edge-litert" in predict and not any("tensorflow" in name for name in predict)
    assert not {"ai-edge-litert", "numpy", "pillow"} & token


def test_dockerignore_keeps_the_context_small():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("**") + 1 : ignore.index("**") + 4] == ["!shared/", "!functions/", "!models/"]
