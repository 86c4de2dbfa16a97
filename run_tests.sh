#!/usr/bin/env bash
# Sets up the pinned environment (once) and runs the test suite, offline, on CPU.
#   bash run_tests.sh            # all tests
#   bash run_tests.sh -k prepare # pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -rs tests "$@"  # -rs: say why a test was skipped
