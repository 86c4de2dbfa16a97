"""The rehearsal (README, "Before your first GPU run"), reduced for CI: `run_all.sh --profile paper`
on two CPU processes with the models and the data overridden: the Qwen3 stand-in around the
real tokenizer (configs/rehearsal_models.yaml, the tokenizer taken from CAPO_TOKENIZERS), a
seeded 28-item subset of VariErr, two training seeds instead of three, and CI_BUDGET's smaller
compute settings; the rest is the paper profile's: free replies, thinking off, ICL, VP, SFT,
CAPO with its dev selection, the judge, the report.

    CAPO_RAW_DIR=<raw files> CAPO_TOKENIZERS=<tokenizer folders> .venv/bin/python -m pytest -q tests/test_rehearsal.py

Random weights never write `Label: ...`, so every reply is unparsed: the test checks that such
replies are counted and scored (never dropped), not that anything is learned.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

RAW = Path(os.environ.get("CAPO_RAW_DIR", "/nonexistent"))
TOKENIZERS = Path(os.environ.get("CAPO_TOKENIZERS", "/nonexistent"))
pytestmark = pytest.mark.skipif(not (RAW / "varierr").exists() and not (RAW / "varierr.json").exists()
                                or not (TOKENIZERS / "qwen3").is_dir(),
                                reason="needs CAPO_RAW_DIR (the raw files) and CAPO_TOKENIZERS (qwen3/, llama3/)")
FOLDER_OF = {"qwen3-4b": "qwen3", "llama3.2-3b": "llama3"}


def rehearsal_models(tags=None, **changes) -> str:
    """configs/rehearsal_models.yaml (the `tags` among them, with `changes`) with the tokenizers read
    from the local folders."""
    models = yaml.safe_load((ROOT / "configs" / "rehearsal_models.yaml").read_text())
    models = [{**model, **changes} for model in models if tags is None or model["tag"] in tags]
    for model in models:
        model["tokenizer"] = str(TOKENIZERS / FOLDER_OF[model["architecture"]])
    return yaml.safe_dump(models, default_flow_style=True, width=10_000)


# CI's reduced form: the README's command on one dataset, two seeds, the Qwen3 stand-in only (the
# judge's model; the Llama-3 template's training, stopping and dates are tests/test_templates.py's),
# a smaller subset and smaller compute settings, float32 (bf16 made these tiny stand-ins' training
# 2.3x slower on the 2-core CPU); every stage, process split and other code path is the rehearsal's.
CI_BUDGET = ["--data.max_items", "28", "--data.min_train_records_per_annotator", "10",
             "--sft.epochs", "1", "--capo.epochs", "1", "--sft.bf16", "false", "--capo.bf16", "false",
             "--generation.autocast_bf16", "false", "--generation.max_new_tokens", "16",
             "--hlv.bootstrap_groups", "50", "--hlv.control_permutations", "2", "--eval.bootstrap_resamples", "200",
             "--eval.bootstrap_groups", "50", "--eval.bootstrap_group_draws", "20", "--eval.judge_items", "16"]


def test_rehearsal_runs_the_paper_profile_on_two_cpu_processes(tmp_path):
    run = tmp_path / "rehearsal"
    done = subprocess.run(
        ["bash", "run_all.sh", "--profile", "paper", "--processes", "2", "--dataset", "varierr", "--seeds", "42,43",
         "--raw-dir", str(RAW), "--", "--run_dir", str(run), *CI_BUDGET,
         "--models", rehearsal_models(["qwen3-4b"], dtype="float32")],
        cwd=ROOT, capture_output=True, text=True, timeout=1500, env={**os.environ, "CAPO_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "(process 1 of 2)" in done.stdout

    metrics = json.loads((run / "metrics.json").read_text())
    rows = metrics["varierr"]
    assert set(rows) == {"qwen3-4b"}
    for model, methods in rows.items():
        assert {"base", "icl", "vp", "vp_icl", "sft", "capo", "human"} <= set(methods)
        for method in ("base", "icl", "vp", "vp_icl", "sft", "capo"):
            row = methods[method]
            assert row["seeds"] == [42, 43] and "parse_rate_sd" in row  # two seeds, pooled with their spread
            # Unparsed replies are counted and scored as wrong, not dropped
            predictions = [json.loads(line) for seed in (42, 43) for path in
                           (run / "seeds" / str(seed) / "predictions" / "varierr" / model / method).glob("*.jsonl")
                           for line in path.read_text().splitlines()]
            unparsed = sum(not p["parse_ok"] for p in predictions)
            assert predictions and row["parse_rate"] == pytest.approx(1 - unparsed / len(predictions))
            if unparsed == len(predictions):
                assert row["label_acc"] == 0.0
    calibration = metrics["judge_calibration"]["varierr"]
    assert calibration["n"] and calibration["accuracy"] is not None  # the judge (the first model) ran
    for seed in (42, 43):  # CAPO selected a checkpoint on dev for every adapter
        for selection in (run / "seeds" / str(seed) / "adapters" / "varierr").glob("*/capo/*/selection.json"):
            assert json.loads(selection.read_text())["history"]

    report = (run / "report.md").read_text()
    assert "parse rate" in report.lower() and "calibration" in report.lower()
    resolved = yaml.safe_load((run / "tables" / "config.resolved.yaml").read_text())
    assert resolved["config"]["generation"]["constrain_response"] is False  # free replies, as the paper
    assert resolved["config"]["seeds"] == [42, 43] and resolved["config"]["baselines"]["icl_k"] == 50
    assert resolved["chat_template_kwargs"]["enable_thinking"] is False
