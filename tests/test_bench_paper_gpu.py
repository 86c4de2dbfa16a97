"""bench/bench_paper_gpu.py in its --tiny mode (smoke profile, CPU): the bench runs end to end,
counts the tokens the trainers see, and extrapolates with run_all.sh's split over processes.

    .venv/bin/python -m pytest -q tests/test_bench_paper_gpu.py
"""
from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT
from test_sft import write_fixture

spec = importlib.util.spec_from_file_location("bench_paper_gpu", ROOT / "bench" / "bench_paper_gpu.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_flop_formula_and_split_makespan():
    shape = {"params": 1000, "layers": 2, "attn_width": 8}
    # 3 tokens: 2N each, and attention over 1 + 2 + 3 positions (QK^T and AV, 2 FLOPs per MAC)
    assert bench.sequence_forward_flops(shape, 3) == 2 * 1000 * 3 + 4 * 2 * 8 * 6
    assert bench.forward_flops(shape, [1, 2, 3]) == bench.sequence_forward_flops(shape, 3)
    assert bench.makespan([5, 1, 1, 1], 2) == 6  # jobs 0, 1 on process 0; 2, 3 on process 1
    assert bench.makespan([1, 1, 1, 5, 1], 2) == 6  # 0-2 on process 0 (one more), 3-4 on process 1
    assert bench.makespan([5, 1, 1, 1], 1) == 8 and bench.makespan([], 4) == 0


def test_tiny_mode_runs_every_stage_and_counts_what_the_trainer_counts(tmp_path):
    write_fixture(tmp_path)  # the toy set, as 01 would write it, under tmp_path/run
    result = bench.main(["--tiny", "--run-dir", str(tmp_path / "run"), "--dataset", "toy", "--annotator", "A0",
                         "--gpus", "1,2"])
    assert (tmp_path / "run" / "bench_paper_gpu.json").is_file()
    measured = result["measured"]
    for method in ("base", "icl"):
        row = measured["03_generation"]["methods"][method]
        assert row["requests"] == 2 and row["new_tokens"] > 0 and row["seconds"] > 0 and row["flops"] > 0
    assert measured["03_generation"]["methods"]["icl"]["prompt_tokens"] > \
        measured["03_generation"]["methods"]["base"]["prompt_tokens"]  # demonstrations are in the prompt
    for stage in ("04_sft", "05_capo"):
        row = measured[stage]
        assert row["train_seconds"] > 0 and row["train_tokens"] > 0 and row["tokens_per_s"] > 0
        assert row["mfu"] is None and row["peak_gpu_gib"] is None  # CPU: no peak to compare with
    # 05: trl's own count of the tokens it trained on (logged every step in smoke) is ours
    log = bench.train_log(bench.common.load_config(tmp_path / "run" / "bench_config.yaml"), "toy", "capo", "A0")
    assert max(r["num_tokens"] for r in log["log_history"] if "num_tokens" in r) == measured["05_capo"]["train_tokens"]
    hours = result["extrapolated"]["hours"]
    assert set(hours) == {"1", "2"} and hours["1"]["total"] >= hours["2"]["total"] >= 0
    assert result["extrapolated"]["annotators"] == 3
