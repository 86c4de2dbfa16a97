"""Every benchmark in bench/ runs in its --tiny mode (smoke model, a few prompts or steps), as
a subprocess, so a renamed function breaks a test here, not a benchmark found broken later.

The fixture is a small raw VariErr-format file of invented sentences, prepared by 01_prepare.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, write_config

BENCH_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                 CAPO_NO_PROGRESS="1", TQDM_DISABLE="1")


def raw_item(i: int) -> dict:
    """One VariErr-format item: annotators 0..3, each with a label, a reason and peer judgments."""
    def entry(annotator, reason):
        return {"annotator": annotator, "reason": reason, "self_corrected": False, "label_correction": False,
                "judgments": [{"annotator": p, "makes_sense": p != (annotator + 1) % 4} for p in range(4)]}
    labels = {"entailment": [], "neutral": [], "contradiction": []}
    for annotator in range(4):
        label = list(labels)[(i + annotator % 2) % 3]  # annotators 0 and 2 agree, 1 and 3 agree
        labels[label].append(entry(annotator, f"Annotator {annotator} reads item {i} as {label}."))
    return {"id": f"{i:04d}b", "context": f"The ferry number {i} left the harbour at noon.",
            "statement": f"Boat {i} departed at midday.", "idk": [], **labels}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A smoke config whose run dir holds 01_prepare's output for 16 invented items."""
    tmp = tmp_path_factory.mktemp("bench")
    raw = tmp / "raw"
    raw.mkdir()
    (raw / "varierr.json").write_text("\n".join(json.dumps(raw_item(i)) for i in range(16)) + "\n")
    config = write_config(tmp, datasets=["varierr"], data__split_items=[8, 4, 4], data__max_items=None,
                          data__min_train_records_per_annotator=3)
    run([ROOT / "01_prepare.py", "--config", config, "--raw-dir", raw, "--accept-modified-raw"])  # invented, not the release
    return config, raw


def run(argv, timeout=300) -> str:
    done = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=BENCH_ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def last_value(stdout: str, key: str) -> float:
    lines = [line for line in stdout.splitlines() if line.startswith(key)]
    assert lines, f"no '{key}' line in:\n{stdout[-2000:]}"
    return float(lines[-1].split()[-1].split("=")[-1])


def test_bench_generation_tiny(prepared):
    config, _ = prepared
    out = run([ROOT / "bench" / "bench_generation.py", "--tiny", "--config", config, "--methods", "base,icl,judge"])
    assert "identical outputs (paths meant to match the kit): all" in out, out
    assert "\njudge: 4 prompts" in out, out  # 06's judge prompts, its forced choice
    assert last_value(out, "ratio=kit/single") > 0
    assert last_value(out, "time_ratio=kit_free/kit") > 0
    assert last_value(out, "single_tokens_per_s=") > 0


def test_bench_training_tiny(prepared):
    config, _ = prepared
    out = run([ROOT / "bench" / "bench_training.py", "--tiny", "--config", config,
               "--variants", "kit,default,kit-fullhead", "--parts", "throughput,memory,capo"])
    assert "capo/sft" in out, out
    assert "kit-fullhead median" in out, out
    assert last_value(out, "time_ratio=capo kit-fullhead/kit") > 0
    assert last_value(out, "ratio=") > 0


def test_bench_scaling_tiny(prepared):
    _, raw = prepared
    out = run([ROOT / "bench" / "bench_scaling.py", "--tiny", "--raw-dir", raw, "--accept-modified-raw"], timeout=600)
    assert "per-stage exponents" in out, out
    last_value(out, "exponent=")  # a number (the fit over two tiny sizes says nothing about scaling)
