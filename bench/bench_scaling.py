"""How the pipeline's time grows with the number of training items.

    .venv/bin/python bench/bench_scaling.py                       # smoke profile, varierr, 25/50/100%
    .venv/bin/python bench/bench_scaling.py --items 160 --fractions 0.25,0.5,1
    .venv/bin/python bench/bench_scaling.py --tiny     # 01 and 03 only, 4 and 8 items (tests/test_bench.py)

Runs the smoke-sized pipeline (01_prepare, 03_prompt_baselines, 04_sft, 05_capo, 06_eval; 02
is an analysis of the raw annotations, not part of the modelling pipeline) on one dataset,
once per fraction, in fresh run directories under a temporary folder. Each run keeps the
smoke profile's number of dev and test items fixed and uses that fraction of --items train
items (via data.split_items), so only the training-side work grows: the smoke profile's caps on
SFT examples and CAPO pairs are lifted, and CAPO's dev selection runs at the first and last
step only. A warm-up (01 and 03 at the smallest size) runs first and is not timed. Prints the
wall time per stage and run, then fits log(time) = a + b * log(train items) by least squares,
per stage (for reading) and over the whole pipeline's time; the last line is `exponent=<b>`
(target: at most 1.1, i.e. no worse than linear; fixed costs such as loading models push it
below 1). Needs the raw data (CAPO_RAW_DIR or --raw-dir), as 01_prepare does.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("01_prepare", "03_prompt_baselines", "04_sft", "05_capo", "06_eval")


def run_pipeline(args, run_dir: Path, train_items: int, stages=STAGES) -> dict[str, float]:
    overrides = ["--run_dir", str(run_dir), "--data.max_items", str(train_items + 2 * args.eval_items),
                 "--data.split_items", f"[{train_items}, {args.eval_items}, {args.eval_items}]",
                 "--datasets", f"[{args.dataset}]", "--eval.judge.backend", "none", "--eval.bertscore", "false",
                 "--sft.max_train_examples", "null", "--capo.max_pairs", "null",  # training grows with the items
                 "--capo.eval_every_steps", "1000",  # dev selection at the start and the end only
                 *args.extra_overrides]
    times = {}
    for stage in stages:
        extra = []
        if stage == "01_prepare":
            extra = (["--raw-dir", args.raw_dir] if args.raw_dir else []) + \
                    (["--accept-modified-raw"] if args.accept_modified_raw else [])
        started = time.perf_counter()
        done = subprocess.run([sys.executable, f"{stage}.py", "--config", args.config, "--dataset", args.dataset,
                               *extra, *overrides], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, CAPO_NO_PROGRESS="1", TQDM_DISABLE="1"))
        if done.returncode:
            raise SystemExit(f"{stage} failed ({train_items} train items):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        times[stage] = time.perf_counter() - started
    return times


def fit_exponent(sizes: list[int], seconds: list[float]) -> float:
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--dataset", default="varierr")
    parser.add_argument("--items", type=int, default=64, help="train items at 100%%")
    parser.add_argument("--eval-items", type=int, default=8, help="dev and test items (fixed)")
    parser.add_argument("--fractions", default="0.25,0.5,1")
    parser.add_argument("--raw-dir", default=os.environ.get("CAPO_RAW_DIR"))
    parser.add_argument("--accept-modified-raw", action="store_true",
                        help="raw files other than the public release (the tests' invented ones)")
    parser.add_argument("--tiny", action="store_true",
                        help="01 and 03 only (Base, 2 new tokens), 4 and 8 train items, 2 eval items, no warm-up: "
                             "checks the benchmark runs; every override is still checked against the config")
    args = parser.parse_args(argv)
    args.extra_overrides, stages = [], STAGES
    if args.tiny:
        args.items, args.eval_items, args.fractions = 8, 2, "0.5,1"
        args.extra_overrides = ["--baselines.methods", "[base]", "--generation.max_new_tokens", "2",
                                "--data.min_train_records_per_annotator", "2"]
        stages = STAGES[:2]

    fractions = [float(f) for f in args.fractions.split(",")]
    sizes = [max(4, round(fraction * args.items)) for fraction in fractions]
    runs = []  # per size: {stage: seconds}
    with tempfile.TemporaryDirectory(prefix="capo-scaling-") as tmp:
        # Warm-up, not timed: one-time work (the tokenizer's conversion into .cache/, cold disk
        # caches) would otherwise land on the first size only and flatten the fitted exponent.
        if not args.tiny:
            warmup = run_pipeline(args, Path(tmp) / "warmup", min(sizes), stages=("01_prepare", "03_prompt_baselines"))
            print(f"warm-up (01, 03; not timed): {sum(warmup.values()):.1f}s", flush=True)
        for fraction, train_items in zip(fractions, sizes):
            runs.append(run_pipeline(args, Path(tmp) / f"train{train_items}", train_items, stages))
            per_stage = ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in runs[-1].items())
            print(f"{train_items:4d} train items ({fraction:.0%}): {sum(runs[-1].values()):.1f}s  [{per_stage}]  "
                  f"(load avg {os.getloadavg()[0]:.1f})", flush=True)
    # Per stage, for reading the total: stages whose work does not grow with train items sit near 0.
    print("per-stage exponents: " + ", ".join(f"{stage} {fit_exponent(sizes, [run[stage] for run in runs]):.2f}"
                                               for stage in stages))
    totals = [sum(run.values()) for run in runs]
    print(f"exponent={fit_exponent(sizes, totals):.3f}")


if __name__ == "__main__":
    main()
