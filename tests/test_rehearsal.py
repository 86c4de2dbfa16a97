"""The rehearsal (README, "Before your first GPU run"), reduced for CI: `run_all.sh --profile paper`
on two CPU processes with README's overrides (a seeded subset, toy training and bootstrap
budgets), the Qwen3 stand-in around the real tokenizer (configs/rehearsal_models.yaml, the
tokenizer taken from CAPO_TOKENIZERS), VariErr only and two training seeds instead of three;
the rest is the paper profile's: free replies, thinking off, ICL, VP, SFT, CAPO with its dev
selection, the judge, the report.

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


def readme_rehearsal_arguments() -> list[str]:
    """The config overrides of README's rehearsal command (the line marked `# rehearsal`), without
    its run_dir and models (the test sets its own): what CI runs is the documented command."""
    import shlex
    [line] = [line for line in (ROOT / "README.md").read_text().splitlines()
              if line.startswith("bash run_all.sh --profile paper") and line.rstrip().endswith("# rehearsal")]
    words = shlex.split(line, comments=True)
    overrides = words[words.index("--") + 1:]
    for flag in ("--run_dir", "--models"):
        at = overrides.index(flag)
        del overrides[at:at + 2]
    return overrides


# CI's reduced form of the README's command: one dataset, two seeds, the Qwen3 stand-in only (the
# judge's model; the Llama-3 template's training, stopping and dates are tests/test_templates.py's);
# every stage, process split, budget and other code path is the rehearsal's.
CI_REDUCTION = ["--dataset", "varierr", "--seeds", "42,43"]


def test_rehearsal_runs_the_paper_profile_on_two_cpu_processes(tmp_path):
    run = tmp_path / "rehearsal"
    done = subprocess.run(
        ["bash", "run_all.sh", "--profile", "paper", "--processes", "2", *CI_REDUCTION,
         "--raw-dir", str(RAW), "--", "--run_dir", str(run), *readme_rehearsal_arguments(),
         "--models", rehearsal_models(["qwen3-4b"])],
        cwd=ROOT, capture_output=True, text=True, timeout=1500, env={**os.environ, "CAPO_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "(process 1 of 2)" in done.stdout

    metrics = json.loads((run / "metrics.json").read_text())
    rows = metrics["results"]["varierr"]
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
