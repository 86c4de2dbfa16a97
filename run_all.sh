#!/usr/bin/env bash
# Regenerates every table of the CAPO reproduction, stage by stage (bash 3.2 or later, Linux or macOS).
#
#   bash run_all.sh                      # cpu profile; paper on a machine with GPUs and the paper's weights
#   bash run_all.sh --profile tour       # a quarter of an hour with a real model (configs/<profile>.yaml)
#   bash run_all.sh --dataset varierr    # one dataset, or a name you prepared with 01_prepare.py --custom
#   bash run_all.sh --raw-dir data/raw   # where 01 finds the raw files (sets CAPO_RAW_DIR)
#   bash run_all.sh --seeds 42,43,44     # 03-05 once per training seed (same split), 06 pools them
#   bash run_all.sh --split lewidi       # the LeWiDi-2025 split as published, in <run_dir>/lewidi/
#   bash run_all.sh --force              # redo every stage's work, even what is current
#   bash run_all.sh --dry-run            # each stage says what is current and what it would redo, and why
#   bash run_all.sh --processes 4        # processes for 03-06 (default: one per GPU; without GPUs 2)
#   bash run_all.sh --accelerate-config nodes.yaml   # several nodes: accelerate's config file
#   bash run_all.sh --profile paper --download-models   # fetch the profile's hub models, then run offline
#
# Anything after `--` goes to every stage as a config override (e.g. -- --eval.judge.backend none).
# Every stage starts with `accelerate launch`; each skips the work whose outputs are current (their
# manifests record what they were made from) and redoes the rest. The run stops at the first failing
# stage and names it; each stage's output is also in <run_dir>/logs/<stage>.log, its time and the
# peak memory of all its processes together in <run_dir>/stage_times.tsv.
set -euo pipefail
cd "$(dirname "$0")"

profile="" dataset="all" force="" dry_run="" raw_dir="" download="" processes="" accelerate_config=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --dataset) dataset="$2"; shift 2 ;;
    --force) force="--force"; shift ;;
    --dry-run) dry_run="--dry-run"; shift ;;
    --raw-dir) raw_dir="$2"; shift 2 ;;
    --download-models) download=1; shift ;;
    --processes) processes="$2"; shift 2 ;;
    --accelerate-config) accelerate_config="$2"; shift 2 ;;
    --seeds) extra+=(--seeds "[$2]"); shift 2 ;;
    --split) extra+=(--data.split "$2"); shift 2 ;;
    --) shift
        while [ $# -gt 0 ]; do  # --raw-dir is 01's flag: the other stages would refuse it
          case "$1" in
            --raw-dir) raw_dir="$2"; shift 2 ;;
            --raw-dir=*) raw_dir="${1#--raw-dir=}"; shift ;;
            *) extra+=("$1"); shift ;;
          esac
        done ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$processes" in ""|[1-9]|[1-9][0-9]|[1-9][0-9][0-9]) ;;
  *) echo "run_all.sh: --processes needs a whole number >= 1 (got '$processes')" >&2; exit 2 ;; esac
[ -z "$accelerate_config" ] || [ -f "$accelerate_config" ] \
  || { echo "run_all.sh: --accelerate-config $accelerate_config: no such file" >&2; exit 2; }

bash setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
[ -z "$raw_dir" ] || export CAPO_RAW_DIR="$raw_dir"
PY=.venv/bin/python
py() { "$PY" -c "import sys, common; sys.exit(common.run_stage(lambda: common.$1(sys.argv[1:])))" "${@:2}"; }

# The plan: the profile, its config checked with the overrides (a typo stops here), its run
# directory and training seeds, the processes of 03-06 and the CPU threads of each; the models
# must be in the local cache before stage 01 spends any time (--download-models fetches them).
plan=$(py run_all_plan "$profile" "$processes" "$download" ${extra[@]+"${extra[@]}"}) || exit 2
read -r profile run_dir seeds processes threads hub_ids <<< "$plan"
config="configs/$profile.yaml"
if [ -n "$download" ]; then  # the run's one online step; every stage runs offline
  for hub_id in $hub_ids; do
    echo "== downloading $hub_id"
    HF_HUB_OFFLINE=0 .venv/bin/hf download "$hub_id" >/dev/null || { echo "run_all.sh: could not download" \
      "$hub_id (offline? gated: accept its license on the hub, then .venv/bin/hf auth login)" >&2; exit 2; }
  done
  py run_all_plan "$profile" "$processes" "" ${extra[@]+"${extra[@]}"} >/dev/null || exit 2
fi
if [ -n "$dry_run" ]; then  # every stage in one process: what is current, what it would redo and why
  py run_all_dry_run "$config" "$dataset" "$seeds" ${force:+"$force"} ${extra[@]+"${extra[@]}"}
  echo "run_all.sh: dry run of profile $profile; nothing was done"
  exit 0
fi
mkdir -p "$run_dir/logs"

launch_args() {  # launch_args <processes>: accelerate's arguments for a stage of that many processes
  if [ -n "$accelerate_config" ] && [ "$1" -gt 1 ]; then echo --config_file "$accelerate_config"; return; fi
  local args="--num_machines 1 --num_processes $1 --mixed_precision no --dynamo_backend no"
  [ "$1" -gt 1 ] && args="$args --multi_gpu --main_process_port 0"  # torchrun's launcher, on CPUs too
  [ "$threads" -gt 0 ] && args="$args --num_cpu_threads_per_process $threads"
  echo "$args"
}

started=$(date +%s)
for stage in 01_prepare 02_analyze_hlv 03_prompt_baselines 04_sft 05_capo 06_eval; do
  stage_seeds=""  # 03-05 run once per training seed when the config lists several
  case "$stage" in 03_*|04_*|05_*) [ "${seeds#*,}" = "$seeds" ] || stage_seeds=${seeds//,/ } ;; esac
  for seed in ${stage_seeds:-""}; do
    label="$stage${seed:+.seed$seed}"
    args=(--config "$config" --dataset "$dataset" ${force:+"$force"} ${extra[@]+"${extra[@]}"} ${seed:+--seed "$seed"})
    case "$stage" in 01_*|02_*) n=1 ;; *) n=$processes ;; esac
    echo "== $label ($profile, $dataset; $n process(es))"
    echo "   accelerate launch $(launch_args "$n") $stage.py ${args[*]}"
    # shellcheck disable=SC2046  # launch_args is a list of words
    if ! py launch_stage "$run_dir/stage_times.tsv" "$label" "$dataset" $(launch_args "$n") "$stage.py" "${args[@]}" \
        2>&1 | tee "$run_dir/logs/$label.log"; then
      echo "run_all.sh: stage $label failed (profile $profile; its output is in $run_dir/logs/$label.log);" \
           "later stages were not run" >&2
      exit 1
    fi
  done
done
echo "run_all.sh: profile $profile finished in $(( $(date +%s) - started ))s; outputs in $run_dir/"
[ ! -f "$run_dir/report.md" ] || echo "report: $run_dir/report.md"
