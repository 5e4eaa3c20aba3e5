#!/usr/bin/env bash
# Runs Thalamus locally: creates .venv with the serving requirements when missing, then hands
# over to the stack supervisor (local/stack.py), which ensures Redis and starts the functions.
set -euo pipefail
cd "$(dirname "$0")"

if [[ ! -x .venv/bin/python ]]; then
  echo "start.sh: creating .venv (first run)" >&2
  python3 -m venv .venv
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt functions/*/requirements.txt | sha256sum | cut -d" " -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  echo "start.sh: installing requirements.txt into .venv" >&2
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -r requirements.txt
  echo "$want" > "$stamp"
fi
# The project itself, editable (pip install -e .), so shared/, local/ and functions/ import from
# anywhere; -P asks the installed packages only, not this folder.
if ! .venv/bin/python -P -c "import local" 2>/dev/null; then
  .venv/bin/pip install -q -e .
fi
exec .venv/bin/python -m local.stack "$@"
