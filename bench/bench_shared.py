"""Shared adapters against per-annotator ones, side by side: training time, disk and peak memory.

    .venv/bin/python bench/bench_shared.py --annotators 20        # 20 of a 200-annotator crowd
    .venv/bin/python bench/bench_shared.py --annotators 200 --kinds shared
    .venv/bin/python bench/bench_shared.py --tiny                 # seconds: checks the bench

The data is tests/test_crowd.py's invented crowd (200 annotators, each with a verbal habit of
their own), prepared once by 01 (smoke profile: the tiny model, one process). Each kind then runs
04 and 05 with --force on the first N annotators as targets (`targets`) in a run directory
of its own copied from the prepared one: `adapters: [per_annotator]` trains 2N adapters (SFT and
CAPO per target), `adapters: [shared]` trains two, on the same examples and pairs (the shared
budget is the per-annotator adapters' together). Reported per kind: wall seconds of 04 and 05
(training and the targets' test predictions), the adapters' bytes on disk, the peak memory of the
stage's processes. Kinds alternate stage by stage. Writes <run-dir>/bench_shared.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchkit import ROOT  # noqa: E402  (first: the kit on the path, offline settings)

sys.path.insert(0, str(ROOT / "tests"))
from test_crowd import ANNOTATORS, write_crowd  # noqa: E402

BUDGET = ["--data.min_train_records_per_annotator", "3", "--sft.max_train_examples", "2", "--capo.max_pairs", "2",
          "--capo.eval_every_steps", "1000", "--capo.select_min_dev_items", "1", "--eval.bertscore", "false"]


def stage(name: str, run: Path, kind: str, targets: list[str], log: Path) -> dict:
    """One stage launched as run_all.sh launches it (one process): its seconds and the peak memory
    of its processes (common.launch_stage's row of stage_times.tsv)."""
    times = run / "stage_times.tsv"
    command = [sys.executable, "-c", "import sys, common; sys.exit(common.launch_stage(sys.argv[1:]))", str(times), name,
               "crowd", "--num_machines", "1", "--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend",
               "no", f"{name}.py", "--config", "configs/smoke.yaml", "--dataset", "crowd", "--force", "--run_dir",
               str(run), *BUDGET, "--adapters", f"[{kind}]", "--targets", f"[{', '.join(targets)}]"]
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{name} ({kind}) failed; see {log}")
    _, _, _, seconds, peak_mb = times.read_text().splitlines()[-1].split("\t")
    return {"seconds": int(seconds), "peak_mb": int(peak_mb)}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotators", type=int, default=20, help="targets: the crowd's first N annotators")
    parser.add_argument("--kinds", default="per_annotator,shared")
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_shared"))
    parser.add_argument("--tiny", action="store_true", help="4 targets, to check the bench")
    args = parser.parse_args(argv)
    n = 4 if args.tiny else args.annotators
    kinds, targets, root = args.kinds.split(","), ANNOTATORS[:n], Path(args.run_dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    write_crowd(root / "crowd.jsonl")
    prepared = root / "prepared"
    subprocess.run([sys.executable, "01_prepare.py", "--config", "configs/smoke.yaml", "--custom", str(root / "crowd.jsonl"),
                    "--name", "crowd", "--label-type", "categorical", "--run_dir", str(prepared), *BUDGET[:2]],
                   cwd=ROOT, check=True, capture_output=True)
    results = {kind: {} for kind in kinds}
    for kind in kinds:
        shutil.copytree(prepared, root / kind)
    for name in ("04_sft", "05_capo"):  # kinds alternate stage by stage
        for kind in kinds:
            results[kind][name] = stage(name, root / kind, kind, targets, root / f"{kind}.{name}.log")
            print(f"{kind:14s} {name}: {results[kind][name]}", flush=True)
    for kind in kinds:
        adapters = root / kind / "adapters"
        results[kind]["adapters"] = sum(1 for p in adapters.rglob("adapter_config.json"))
        results[kind]["adapter_bytes"] = folder_bytes(adapters)
        results[kind]["seconds"] = round(sum(results[kind][s]["seconds"] for s in ("04_sft", "05_capo")), 1)
        print(f"{kind:14s} {results[kind]['adapters']} adapters, {results[kind]['adapter_bytes'] / 2**20:.1f} MB on disk, "
              f"04 + 05 {results[kind]['seconds']} s", flush=True)
    if len(kinds) == 2:
        a, b = (results[k] for k in kinds)
        print(f"time_ratio={kinds[0]}/{kinds[1]} {a['seconds'] / b['seconds']:.2f} "
              f"disk_ratio={a['adapter_bytes'] / b['adapter_bytes']:.1f}", flush=True)
    (root / "bench_shared.json").write_text(json.dumps({"targets": n, "results": results}, indent=2))


if __name__ == "__main__":
    main()
