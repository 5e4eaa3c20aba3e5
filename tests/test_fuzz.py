"""A fuzz run: schemathesis, with all its checks, against each function's OpenAPI document over
real HTTP (``python -m shared.server``, real Redis), with a valid bearer token and without one.

Every answer must be one the document lists for the operation, with its body schema, its
content type and its required headers; schema-valid requests accepted, schema-violating ones
refused; 405 with an exact ``Allow``; no 5xx; and no traceback in the servers' logs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

SEED = 20261127
MIN_CASES = 1000  # per function and run, as schemathesis counts generated test cases
# The operations that take image files (multipart `file`, V1 {"b64": ...} examples, V2 BYTES) or
# numeric tensors. OpenAPI cannot say "bytes that decode as a JPEG, PNG, WebP, GIF or BMP" or
# "as many values as the shape says": schemathesis's schema-valid random bytes and tensors are
# refused with 400 naming the problem, which is the right answer, so positive_data_acceptance
# takes 400 there (its other statuses: a missing token, a key without the model, its rate used
# up, Redis down or the decode budget busy). Every other check stays as strict as it comes.
CONFIG = """
[[operations]]
include-path-regex = '(/predict\\.json|:predict|/infer)$'
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "429", "503"]
"""
# (function, its environment, -n with a token, -n without): most cases come from the operations
# with parameters or bodies; without a token, schemathesis also varies the Authorization header.
FUNCTIONS = {
    # A higher brute-force limit (default 10) lets a hundred well-formed keypairs reach the scrypt
    # check (401) before the 429s; each costs 50 ms of scrypt.
    "token": ({"AUTH_MAX_FAILURES": "100"}, 1000, 260),
    "predict": ({"MODEL_NAME": "shapes"}, 25, 22),
}


def schemathesis(base: str, examples: int, folder: Path, headers: list[str]) -> tuple[dict[str, Any], float]:
    """Run schemathesis against ``base``'s document in ``folder`` (nothing lands in the repository);
    its JSON report and the seconds it took."""
    report = folder / "report.json"
    command = [
        sys.executable, "-m", "schemathesis.cli",
        "--config-file", str(folder / "schemathesis.toml"),
        "run", f"{base}/openapi.json",
        "--checks", "all",
        "-n", str(examples),
        "--seed", str(SEED),
        "--generation-database", "none",
        "--report", "json", "--report-json-path", str(report),
        "--no-color",
        *headers,
    ]  # fmt: skip
    started = time.monotonic()
    run = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    return json.loads(report.read_text()), seconds


@pytest.mark.slow
@pytest.mark.parametrize("function", FUNCTIONS)
def test_fuzz_finds_nothing(function, serve_function, function_logs, bearer, tmp_path):
    extra, with_token, without_token = FUNCTIONS[function]
    base = serve_function(function, **extra)
    runs = (("with a token", with_token, ["-H", f"Authorization: {bearer['Authorization']}"]),
            ("without", without_token, []))  # fmt: skip
    for what, examples, headers in runs:
        folder = tmp_path / what.replace(" ", "-")
        folder.mkdir()
        (folder / "schemathesis.toml").write_text(CONFIG if function == "predict" else "")
        report, seconds = schemathesis(base, examples, folder, headers)
        cases = report["test_cases"]
        print(f"{function} {what}: {cases['generated']} cases in {seconds:.1f} s")
        assert report["exit_code"] == 0 and report["complete"]
        assert report["operations"]["tested"] == report["operations"]["total"]
        assert cases["with_failures"] == 0 and cases["errored"] == 0, report["failures"] or report["errors"]
        assert cases["generated"] >= MIN_CASES
    log = function_logs[base].read_text()
    assert f"{function} serving on" in log  # the log is this server's
    assert "Traceback" not in log, log[-5000:]
