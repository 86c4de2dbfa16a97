#!/usr/bin/env bash
# Sets up the pinned environment (once) and runs the tests, offline, on CPU.
#   bash run_tests.sh                        # every test
#   bash run_tests.sh tests/test_eval.py     # just that file (any pytest arguments pass through)
#   bash run_tests.sh -k prepare
#   CAPO_TEST_WORKERS=0 bash run_tests.sh    # one process (default: 2 workers, a test file each at a time)
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
where=tests  # unless a test path is given
for arg in "$@"; do case "$arg" in tests|tests/*) where="" ;; esac; done
# -rs: say why a test was skipped; --dist loadfile: a file's module fixtures are built once; -W: peft
# and trl read transformers' deprecated is_gradient_checkpointing (the stages hide it the same way:
# patches.silence_library_warnings)
exec .venv/bin/python -m pytest -q -rs -n "${CAPO_TEST_WORKERS:-2}" --dist loadfile \
  -W "ignore:\`is_gradient_checkpointing\` is deprecated:FutureWarning" $where "$@"
