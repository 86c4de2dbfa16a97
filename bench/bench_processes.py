"""One process with all the cores against N processes with cores/N threads each, side by side:
03, 04 and 05 of a profile launched the way run_all.sh launches them (common.accelerate_launch).

    .venv/bin/python bench/bench_processes.py --raw-dir DIR                          # cpu profile, varierr, A0-A1
    .venv/bin/python bench/bench_processes.py --raw-dir DIR --annotators A0,A1,A2,A3 --repeats 2
    .venv/bin/python bench/bench_processes.py --raw-dir DIR --stages 04_sft,05_capo
    .venv/bin/python bench/bench_processes.py --tiny --raw-dir DIR                   # smoke profile: checks the bench

Each variant gets its own run directory with the same 01/02 outputs (made once) and runs 03, 04
and 05 with --force on the chosen annotators (03: every method; 04/05: their adapters and test
predictions), so both variants do the same work; run_all.sh's split gives each process whole
units (a predictions file, an adapter). The variants alternate stage by stage (1, N, 1, N, ...)
so that a machine that slows down during the run slows both. `--max-eval-items` caps the test
items (and so 03's and 04/05's test generation) to keep the bench short; the training budgets are
the profile's. Reports wall seconds per stage and variant, the ratio, and whether the
predictions files of the two variants are the same bytes. Writes <run-dir>/bench_processes.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchkit import ROOT  # noqa: E402  (first: the kit on the path, offline settings)

import common  # noqa: E402

STAGES = ("03_prompt_baselines", "04_sft", "05_capo")


def launch_args(processes: int, cores: int) -> list[str]:
    """run_all.sh's `accelerate launch` arguments on a machine without GPUs."""
    args = ["--num_machines", "1", "--num_processes", str(processes), "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_cpu_threads_per_process", str(max(1, cores // processes))]
    return args + (["--multi_gpu", "--main_process_port", "0"] if processes > 1 else [])


def run_stage(stage: str, processes: int, cores: int, config: str, overrides: list[str], log: Path) -> float:
    command = [sys.executable, "-c", "import sys, common; sys.exit(common.accelerate_launch(sys.argv[1:]))",
               *launch_args(processes, cores), f"{stage}.py", "--config", config, *overrides]
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{stage} with {processes} process(es) failed; see {log}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--tiny", action="store_true", help="configs/smoke.yaml: checks the bench, figures mean nothing")
    parser.add_argument("--dataset", default="varierr")
    parser.add_argument("--annotators", default="A0,A1")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--max-eval-items", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--stages", default=",".join(STAGES), help="a comma-separated subset of " + ", ".join(STAGES))
    parser.add_argument("--raw-dir", default=os.environ.get("CAPO_RAW_DIR"))
    parser.add_argument("--run-dir", default="/tmp/capo-bench-processes", type=Path)
    args = parser.parse_args(argv)
    config = "configs/smoke.yaml" if args.tiny else args.config
    stages = [stage for stage in STAGES if stage in args.stages.split(",")]

    args.run_dir.mkdir(parents=True, exist_ok=True)
    base = args.run_dir / "prepared"
    common_overrides = ["--dataset", args.dataset, "--data.max_eval_items", str(args.max_eval_items)]
    if not (base / "hlv" / args.dataset / "summary.json").exists():  # 01 and 02 once, copied to each variant
        for stage, extra in (("01_prepare", ["--raw-dir", str(args.raw_dir)] if args.raw_dir else []),
                             ("02_analyze_hlv", [])):
            run_stage(stage, 1, args.cores, config, [*common_overrides, "--run_dir", str(base), *extra],
                      args.run_dir / f"{stage}.log")
    variants = {1: args.run_dir / "one", args.processes: args.run_dir / f"n{args.processes}"}
    seconds: dict[str, dict[str, list[float]]] = {stage: {str(p): [] for p in variants} for stage in stages}
    for repeat in range(args.repeats):
        for folder in variants.values():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(base, folder, symlinks=True)
        for stage in stages:
            # 03 has no --annotators: it asks every annotator's test items (the same in both variants)
            annotators = [] if stage.startswith("03") else ["--annotators", args.annotators]
            for processes, folder in variants.items():
                overrides = [*common_overrides, "--run_dir", str(folder), "--force", *annotators]
                took = run_stage(stage, processes, args.cores, config, overrides,
                                 args.run_dir / f"{stage}.p{processes}.r{repeat}.log")
                seconds[stage][str(processes)].append(round(took, 1))
                print(f"{stage} with {processes} process(es) x {max(1, args.cores // processes)} thread(s): "
                      f"{took:.1f}s", flush=True)
    same = all((variants[1] / path.relative_to(variants[args.processes])).read_bytes() == path.read_bytes()
               for path in sorted((variants[args.processes] / "predictions").glob("**/*.jsonl")))
    result = {"config": config, "dataset": args.dataset, "annotators": args.annotators, "cores": args.cores,
              "processes": args.processes, "max_eval_items": args.max_eval_items, "seconds": seconds,
              "ratio_one_over_n": {stage: round(min(v["1"]) / min(v[str(args.processes)]), 3)
                                   for stage, v in seconds.items()},
              "predictions_identical": same, "git_sha": common.git_sha(), "load_avg": os.getloadavg()[0]}
    common.write_json(args.run_dir / "bench_processes.json", result)
    print(json.dumps(result["ratio_one_over_n"]), f"predictions_identical={same}")
    return result


if __name__ == "__main__":
    common.run_stage(main)
