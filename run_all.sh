#!/usr/bin/env bash
# Regenerates every table of the CAPO reproduction, stage by stage.
#
#   bash run_all.sh                      # profile cpu without a GPU, paper with one
#   bash run_all.sh --profile smoke      # quick end-to-end check (tiny model, subset)
#   bash run_all.sh --profile paper      # the paper's setting (Qwen3-4B, Llama-3.2-3B; GPUs)
#   bash run_all.sh --dataset varierr    # one dataset, or the name of one you prepared with
#                                        #   01_prepare.py --custom FILE --name NAME (01 re-reads FILE)
#   bash run_all.sh --raw-dir data/raw   # where 01 finds the raw files (sets CAPO_RAW_DIR)
#   bash run_all.sh --force              # redo every stage's work, even what is finished
#   bash run_all.sh --dry-run            # each stage says what is current and what it would redo, and why
#                                        #   (one process each, no logs); nothing is done
#   bash run_all.sh --seeds 42,43,44     # 03-05 once per training seed (same split), 06 pools them
#   bash run_all.sh --split lewidi       # the LeWiDi-2025 train/dev/test files as published, in
#                                        #   <run_dir>/lewidi/; 06 adds the official metrics and submission files
#   bash run_all.sh --profile paper --download-models   # fetch the profile's hub models, then run offline
#   bash run_all.sh --processes 4        # processes per stage (default: one per GPU; without GPUs 2)
#   bash run_all.sh --accelerate-config nodes.yaml   # several nodes: accelerate's config file (run on every node)
#
# Every stage starts with `accelerate launch`: 01 and 02 as one process, 03-06 as --processes N
# (on GPUs one per GPU, NCCL; on CPUs gloo, the cores split between them). 03 shares its
# predictions files out, 04/05 their adapters (each process trains its own), 06 its judge;
# the outputs are the same bytes as with one process. docs/DESIGN.md, "Processes".
#
# Extra arguments after `--` go to every stage as config overrides (e.g. -- --eval.judge.backend none
# --run_dir runs/try1); a --raw-dir there is taken as run_all.sh's own. Stops at the first
# failing stage and names it. Every stage runs, and each one skips the work whose outputs are
# finished and current (their manifests record the inputs, config values and code they were
# made from), so a changed config, a re-split, new code or a deleted output redoes exactly
# what depends on it. Each stage's output also goes to <run_dir>/logs/<stage>.log, and its
# wall time and peak memory to <run_dir>/stage_times.tsv.
set -euo pipefail
cd "$(dirname "$0")"

profile=""
dataset="all"
force=0
dry_run=0
raw_dir=""
download_models=0
processes=""
accelerate_config=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="$2"; shift 2 ;;
    --dataset) dataset="$2"; shift 2 ;;
    --force) force=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --raw-dir) raw_dir="$2"; shift 2 ;;
    --download-models) download_models=1; shift ;;
    --processes) processes="$2"; shift 2 ;;
    --accelerate-config) accelerate_config="$2"; shift 2 ;;
    --seeds) extra+=(--seeds "[$2]"); shift 2 ;;
    --split) extra+=(--data.split "$2"); shift 2 ;;
    --) shift
        # --raw-dir is 01's flag; the other stages would reject it, so take it out here.
        while [ $# -gt 0 ]; do
          case "$1" in
            --raw-dir) raw_dir="$2"; shift 2 ;;
            --raw-dir=*) raw_dir="${1#--raw-dir=}"; shift ;;
            *) extra+=("$1"); shift ;;
          esac
        done ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$profile" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then profile=paper; else profile=cpu; fi
fi
config="configs/$profile.yaml"
[ -f "$config" ] || { echo "run_all.sh: no profile '$profile' ($config missing)" >&2; exit 2; }
[ -z "$processes" ] || [[ "$processes" =~ ^[1-9][0-9]*$ ]] \
  || { echo "run_all.sh: --processes needs a whole number >= 1 (got '$processes')" >&2; exit 2; }
[ -z "$accelerate_config" ] || [ -f "$accelerate_config" ] \
  || { echo "run_all.sh: --accelerate-config $accelerate_config: no such file" >&2; exit 2; }

bash setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
PY=".venv/bin/python"
[ -n "$raw_dir" ] && export CAPO_RAW_DIR="$raw_dir"
# The config with its overrides, checked once before any stage spends time (a typo stops here);
# then its run directory and training seeds (`seeds`, or just `seed`).
read -r run_dir seeds < <("$PY" -c 'import sys, common
def show():
    cfg = common.load_config(sys.argv[1], sys.argv[2:])
    print(common.run_dir(cfg), ",".join(map(str, common.training_seeds(cfg))))
common.run_stage(show)' "$config" "${extra[@]}") || true
[ -n "${run_dir:-}" ] || exit 2
IFS=, read -r -a seed_list <<< "$seeds"
[ "$dry_run" = 1 ] || mkdir -p "$run_dir/logs"

# Models: --download-models fetches the profile's hub models (the run's one online step);
# then every LLM of the profile must be in the local cache before stage 01 spends any time.
if [ "$download_models" = 1 ]; then
  mapfile -t hub_ids < <("$PY" -c 'import sys, common
print(*common.hub_model_ids(common.load_config(sys.argv[1], sys.argv[2:]), with_metrics=True), sep="\n")' \
    "$config" "${extra[@]}")
  for hub_id in "${hub_ids[@]}"; do
    [ -n "$hub_id" ] || continue
    echo "== downloading $hub_id"
    HF_HUB_OFFLINE=0 .venv/bin/hf download "$hub_id" >/dev/null \
      || { echo "run_all.sh: could not download $hub_id (offline? gated: accept its license on the hub, then .venv/bin/hf auth login)" >&2; exit 2; }
  done
fi
"$PY" -c 'import sys, common
common.run_stage(lambda: common.require_models(common.load_config(sys.argv[1], sys.argv[2:])))' \
  "$config" "${extra[@]}" || exit 2

# The launcher: accelerate's. Processes: --processes, else one per GPU, else 2 CPU processes where
# there are 2 cores or more (on 2 cores, 2 x 1 thread beat 1 x 2 threads on 03, 04 and 05:
# bench/RESULTS.md), else 1. With several CPU processes each gets an equal share of the cores as
# its threads. --accelerate-config hands everything to accelerate's config file (several nodes:
# num_machines, machine_rank, main_process_ip/port).
n_gpus=$( { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU' || true)
cores=$(nproc)
if [ -z "$processes" ]; then processes=$(( n_gpus > 0 ? n_gpus : (cores >= 2 ? 2 : 1) )); fi
launcher() {  # launcher <processes>: the `accelerate launch` arguments for a stage of that many processes
  local n=$1
  if [ -n "$accelerate_config" ] && [ "$n" -gt 1 ]; then echo --config_file "$accelerate_config"; return; fi
  local args=(--num_machines 1 --num_processes "$n" --mixed_precision no --dynamo_backend no)
  # torchrun's launcher (named multi_gpu, it starts N processes on CPUs too), on a free port
  [ "$n" -gt 1 ] && args+=(--multi_gpu --main_process_port 0)
  # (no --cpu for one process: it only adds KMP_AFFINITY/KMP_BLOCKTIME pinning, which the kit's
  # CPU figures were not measured with; without a GPU the stages run on the CPU anyway)
  [ "$n_gpus" = 0 ] && args+=(--num_cpu_threads_per_process $(( cores / n > 0 ? cores / n : 1 )))
  echo "${args[@]}"
}

start_all=$(date +%s)
stage_args=()
[ "$force" = 1 ] && stage_args=(--force)
runs=()  # stage:seed, 03-05 once per training seed, the others once
for stage in 01_prepare 02_analyze_hlv 03_prompt_baselines 04_sft 05_capo 06_eval; do
  case "$stage" in
    03_*|04_*|05_*) if [ "${#seed_list[@]}" -gt 1 ]; then
                      for s in "${seed_list[@]}"; do runs+=("$stage:$s"); done
                    else runs+=("$stage:"); fi ;;
    *) runs+=("$stage:") ;;
  esac
done
for stage_run in "${runs[@]}"; do
  stage=${stage_run%%:*} seed=${stage_run#*:}
  seed_args=()
  [ -n "$seed" ] && seed_args=(--seed "$seed")
  if [ "$dry_run" = 1 ]; then
    echo "== $stage ($profile, $dataset${seed:+, seed $seed}; dry run)"
    rc=0
    "$PY" "$stage.py" --config "$config" --dataset "$dataset" --dry-run "${stage_args[@]}" "${extra[@]}" \
      "${seed_args[@]}" || rc=$?
    # exit 2: an input from an earlier stage is not current (the line above names it and how to redo it)
    [ "$rc" = 0 ] || [ "$rc" = 2 ] || exit 1
    continue
  fi
  log="$run_dir/logs/$stage${seed:+.seed$seed}.log"
  case "$stage" in 01_*|02_*) n=1 ;; *) n=$processes ;; esac
  echo "== $stage ($profile, $dataset${seed:+, seed $seed}; $n process(es))"
  t0=$(date +%s)
  read -r -a launch_args <<< "$(launcher "$n")"
  stage_cmd=("${launch_args[@]}" "$stage.py" --config "$config" --dataset "$dataset" "${stage_args[@]}" "${extra[@]}" "${seed_args[@]}")
  echo "   accelerate launch ${stage_cmd[*]}"
  # accelerate's launcher, through common.accelerate_launch: the stage's own exit code, no launcher traceback
  run=("$PY" -c 'import sys, common; sys.exit(common.accelerate_launch(sys.argv[1:]))' "${stage_cmd[@]}")
  timer=()  # peak resident memory of the stage's largest process, where GNU time is installed
  maxrss="$run_dir/logs/.$stage.maxrss_kb"
  [ -x /usr/bin/time ] && timer=(/usr/bin/time -f "%M" -o "$maxrss")
  if ! "${timer[@]}" "${run[@]}" 2>&1 | tee "$log"; then
    echo "run_all.sh: stage $stage${seed:+ (seed $seed)} failed (profile $profile; its output is in $log);" \
         "later stages were not run" >&2
    exit 1
  fi
  seconds=$(( $(date +%s) - t0 ))
  peak_mb=$( [ -f "$maxrss" ] && echo $(( $(tail -n1 "$maxrss") / 1024 )) || echo "n/a")
  rm -f "$maxrss"
  printf '%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$stage${seed:+.seed$seed}" "$dataset" "$seconds" "$peak_mb" \
    >> "$run_dir/stage_times.tsv"
  echo "== $stage done in ${seconds}s (peak RSS ${peak_mb} MB; appended to $run_dir/stage_times.tsv)"
done
[ "$dry_run" = 1 ] && { echo "run_all.sh: dry run of profile $profile; nothing was done"; exit 0; }
echo "run_all.sh: profile $profile finished in $(( $(date +%s) - start_all ))s; outputs in $run_dir/"
[ -f "$run_dir/report.md" ] && echo "report: $run_dir/report.md"
exit 0
