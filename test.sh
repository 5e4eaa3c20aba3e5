#!/usr/bin/env bash
# Runs the whole Thalamus test suite on a fresh machine: installs what the tests need
# (.venv with requirements-dev.txt, Debian's chromium for the /docs browser test and jpegtran for
# arithmetic-coded JPEGs, podman for the container tests), runs ruff, ruff format --check and mypy,
# then pytest with coverage.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
stamp=.venv/.requirements-dev.sha
want=$(cat requirements*.txt functions/*/requirements.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

# The project itself, editable (pip install -e .), so shared/, local/ and functions/ import from
# anywhere; -P asks the installed packages only, not this folder.
if ! .venv/bin/python -P -c "import local" 2>/dev/null; then
  .venv/bin/pip install -q -e .
fi

# System packages some tests need (root on Debian; elsewhere those tests skip with a reason).
if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  # chromium for the /docs browser test, jpegtran to make arithmetic-coded JPEGs
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  command -v jpegtran >/dev/null || missing+=(libjpeg-turbo-progs)
  if ((${#missing[@]})); then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The machine's podman setup sits beside the repository, or beside the one this is a clone of.
  origin=$(git config --get remote.origin.url 2>/dev/null || true)
  for setup in ../shared/tools/container-setup "${origin:-/nonexistent}/../shared/tools/container-setup"; do
    if [[ -f $setup ]]; then
      podman image exists docker.io/library/python:3.11-slim 2>/dev/null || bash "$setup"
      break
    fi
  done
fi

# The habits ARCHITECTURE.md asks for: lint, formatting and types fail the run like a test.
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
.venv/bin/mypy --no-error-summary

# Coverage includes the functions run as real processes (tool.coverage in pyproject.toml).
exec .venv/bin/python -m pytest --cov=shared --cov=functions --cov=local --cov-report=term "$@"
