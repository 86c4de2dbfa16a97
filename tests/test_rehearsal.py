"""The rehearsal preset (configs/rehearsal.yaml) as README runs it, reduced for CI to one dataset,
two training seeds and two target annotators (both models, per-annotator and shared adapters):
`bash run_all.sh --profile rehearsal` on two CPU processes, with both paper stand-ins (the paper's
tags, architectures, tokenizers and chat templates), from a Hugging Face cache that holds only
what README's fetch command leaves (two tokenizer files per model), offline. Everything else is
the paper profile's: free replies, thinking off, ICL, VP, SFT, CAPO with its dev selection, the
judge, the report.

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

from conftest import ROOT, TOKENIZERS, hf_download_tokenizers

RAW = Path(os.environ.get("CAPO_RAW_DIR", "/nonexistent"))
pytestmark = pytest.mark.skipif(not (RAW / "varierr").exists() and not (RAW / "varierr.json").exists()
                                or not (TOKENIZERS / "qwen3").is_dir() or not (TOKENIZERS / "llama3").is_dir(),
                                reason="needs CAPO_RAW_DIR (the raw files) and CAPO_TOKENIZERS (qwen3/, llama3/)")
MODELS = {"qwen3-4b", "llama3.2-3b"}  # the paper profile's tags
CI_REDUCTION = ["--dataset", "varierr", "--seeds", "42,43"]
TARGETS = ["A0", "A1"]  # every annotator's responses still make the pairs and train the classifier


def test_rehearsal_runs_the_paper_profile_with_both_stand_ins_on_two_cpu_processes(tmp_path):
    hf_download_tokenizers(tmp_path / "hub")
    run = tmp_path / "rehearsal"
    env = {**os.environ, "CAPO_NO_PROGRESS": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "run_all.sh", "--profile", "rehearsal", *CI_REDUCTION, "--raw-dir", str(RAW),
                           "--", "--run_dir", str(run), "--targets", f"[{', '.join(TARGETS)}]"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "(process 1 of 2)" in done.stdout and "Traceback" not in done.stdout + done.stderr

    metrics = json.loads((run / "metrics.json").read_text())
    rows = metrics["results"]["varierr"]
    assert set(rows) == MODELS
    for model, methods in rows.items():
        assert {"base", "icl", "vp", "vp_icl", "sft", "capo", "sft_shared", "capo_shared", "human"} <= set(methods)
        for method in ("base", "icl", "vp", "vp_icl", "sft", "capo", "sft_shared", "capo_shared"):
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
        for seed in (42, 43):  # CAPO selected a checkpoint on dev for every adapter of both models
            adapters = run / "seeds" / str(seed) / "adapters" / "varierr" / model
            selections = [*adapters.glob("capo/*/selection.json"), *adapters.glob("capo_shared/selection.json")]
            assert len(selections) == len(TARGETS) + 1 and all(json.loads(s.read_text())["history"] for s in selections)
    calibration = metrics["judge_calibration"]["varierr"]
    assert calibration["n"] and calibration["accuracy"] is not None  # the judge (the first model) ran

    report = (run / "report.md").read_text()
    assert "parse rate" in report.lower() and "calibration" in report.lower()
    resolved = yaml.safe_load((run / "tables" / "config.resolved.yaml").read_text())
    assert resolved["config"]["config_chain"] == ["configs/paper.yaml", "configs/rehearsal.yaml"]
    assert resolved["config"]["generation"]["constrain_response"] is False  # free replies, as the paper
    assert resolved["config"]["seeds"] == [42, 43] and resolved["config"]["baselines"]["icl_k"] == 50
    assert resolved["chat_template_kwargs"]["enable_thinking"] is False
