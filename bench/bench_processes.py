"""One process with all the cores against N processes with cores/N threads each, side by side:
03, 04 and 05 of a profile launched the way run_all.sh launches them (common.accelerate_launch).

    .venv/bin/python bench/bench_processes.py --raw-dir DIR                          # cpu profile, varierr, A0-A1
    .venv/bin/python bench/bench_processes.py --raw-dir DIR --annotators A0,A1,A2,A3 --repeats 2
    .venv/bin/python bench/bench_processes.py --raw-dir DIR --stages 04_sft,05_capo --data-parallel  # + DDP
    .venv/bin/python bench/bench_processes.py --tiny --raw-dir DIR                   # smoke profile: checks the bench

Each variant gets its own run directory with the same 01/02 outputs (made once) and runs 03, 04
and 05 with --force on the chosen annotators (03: every method; 04/05: their adapters and test
predictions), so every variant does the same work; run_all.sh's split gives each process whole
units (a predictions file, an adapter). With --data-parallel a third variant trains each adapter
on all N processes together (04/05 --data-parallel, DDP) instead. The variants alternate stage
by stage (1, N, N-ddp, 1, ...) so that a machine that slows down during the run slows them all.
`--max-eval-items` caps the test items (and so 03's and 04/05's test generation) to keep the
bench short; the training budgets are the profile's. Reports wall seconds per stage and
variant, the ratios, and whether each variant's predictions files are the one-process bytes.
Writes <run-dir>/bench_processes.json.
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


def data_parallel_arguments(config: str, processes: int) -> list[str]:
    """04/05 --data-parallel, with a per-device batch that keeps each section's global batch over
    N processes (per device x accumulation x N = global_batch_size) where the profile's does not."""
    cfg, extra = common.load_config(config), ["--data-parallel"]
    for section in ("sft", "capo"):
        per_device, total = int(cfg[section]["per_device_batch_size"]), int(cfg[section]["global_batch_size"])
        if total % (per_device * processes):
            extra += [f"--{section}.per_device_batch_size", str(max(1, total // processes))]
    return extra


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
    parser.add_argument("--data-parallel", action="store_true",
                        help="a third variant: N processes training each adapter together (04/05 --data-parallel)")
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
    # variant name -> (processes, its run directory, extra arguments for 04/05)
    variants = {"1": (1, args.run_dir / "one", []),
                str(args.processes): (args.processes, args.run_dir / f"n{args.processes}", [])}
    if args.data_parallel:
        variants[f"{args.processes}-ddp"] = (args.processes, args.run_dir / f"n{args.processes}-ddp",
                                             data_parallel_arguments(config, args.processes))
    seconds: dict[str, dict[str, list[float]]] = {stage: {name: [] for name in variants} for stage in stages}
    for repeat in range(args.repeats):
        for _, folder, _ in variants.values():
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(base, folder, symlinks=True)
        for stage in stages:
            # 03 has no --annotators: it asks every annotator's test items (the same in every variant)
            annotators = [] if stage.startswith("03") else ["--annotators", args.annotators]
            for name, (processes, folder, extra) in variants.items():
                overrides = [*common_overrides, "--run_dir", str(folder), "--force", *annotators,
                             *(extra if not stage.startswith("03") else [])]
                took = run_stage(stage, processes, args.cores, config, overrides,
                                 args.run_dir / f"{stage}.{name}.r{repeat}.log")
                seconds[stage][name].append(round(took, 1))
                print(f"{stage}, variant {name}: {processes} process(es) x {max(1, args.cores // processes)} "
                      f"thread(s): {took:.1f}s", flush=True)
    one = variants["1"][1]
    identical = {name: all((one / path.relative_to(folder)).read_bytes() == path.read_bytes()
                           for path in sorted((folder / "predictions").glob("**/*.jsonl")))
                 for name, (_, folder, _) in variants.items() if name != "1"}
    result = {"config": config, "dataset": args.dataset, "annotators": args.annotators, "cores": args.cores,
              "processes": args.processes, "max_eval_items": args.max_eval_items, "seconds": seconds,
              "ratio_one_over_variant": {stage: {name: round(min(v["1"]) / min(v[name]), 3) for name in v if name != "1"}
                                         for stage, v in seconds.items()},
              "predictions_identical_to_one_process": identical, "git_sha": common.git_sha(),
              "load_avg": os.getloadavg()[0]}
    common.write_json(args.run_dir / "bench_processes.json", result)
    print(json.dumps(result["ratio_one_over_variant"]), "predictions identical to one process:",
          json.dumps(identical))
    return result


if __name__ == "__main__":
    common.run_stage(main)
