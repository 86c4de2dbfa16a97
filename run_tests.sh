#!/usr/bin/env bash
# Sets up the pinned environment (once) and runs the test suite, offline, on CPU.
#   bash run_tests.sh            # all tests
#   bash run_tests.sh -k prepare # pytest arguments pass through
#   CAPO_TEST_WORKERS=0 bash run_tests.sh   # one process (default: 2 workers, a test file each at a time)
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# -rs: say why a test was skipped; --dist loadfile: a file's module fixtures are built once
exec .venv/bin/python -m pytest -q -rs -n "${CAPO_TEST_WORKERS:-2}" --dist loadfile tests "$@"
