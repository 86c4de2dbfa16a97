#!/usr/bin/env bash
# Regenerates every table of the CAPO reproduction, stage by stage.
#
#   bash run_all.sh                      # profile cpu without a GPU, paper with one
#   bash run_all.sh --profile smoke      # quick end-to-end check (tiny model, subset)
#   bash run_all.sh --profile paper      # the paper's setting (Qwen3-4B, Llama-3.2-3B; GPUs)
#   bash run_all.sh --dataset varierr    # one dataset (or a --custom name prepared by 01)
#
# Extra arguments after `--` go to every stage (e.g. -- --raw-dir ../shared/data).
# Stops at the first failing stage and names it.
set -euo pipefail
cd "$(dirname "$0")"

profile=""
dataset="all"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --dataset) dataset="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$profile" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then profile=paper; else profile=cpu; fi
fi
config="configs/$profile.yaml"
[ -f "$config" ] || { echo "run_all.sh: no profile '$profile' ($config missing)" >&2; exit 2; }

bash setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
PY=".venv/bin/python"

start_all=$(date +%s)
for stage in 01_prepare 02_analyze_hlv 03_prompt_baselines 04_sft 05_capo 06_eval; do
  [ -f "$stage.py" ] || continue
  echo "== $stage ($profile, $dataset)"
  t0=$(date +%s)
  if ! "$PY" "$stage.py" --config "$config" --dataset "$dataset" "${extra[@]}"; then
    echo "run_all.sh: stage $stage failed (profile $profile); later stages were not run" >&2
    exit 1
  fi
  echo "== $stage done in $(( $(date +%s) - t0 ))s"
done
echo "run_all.sh: profile $profile finished in $(( $(date +%s) - start_all ))s; outputs in runs/$profile/"
[ -f "runs/$profile/report.md" ] && echo "report: runs/$profile/report.md"
exit 0
