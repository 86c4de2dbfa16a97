"""A crowd: 200 annotators, each with a verbal habit of their own, through README's own-data
commands on the smoke profile with the shared adapters only (one sft_shared and one capo_shared
adapter for everyone). Slow (about ten minutes on 2 cores): runs with CAPO_SLOW_TESTS=1.

    CAPO_SLOW_TESTS=1 bash run_tests.sh tests/test_crowd.py
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(os.environ.get("CAPO_SLOW_TESTS") != "1", reason="slow: set CAPO_SLOW_TESTS=1")
ANNOTATORS = [f"c{k:03d}" for k in range(200)]
OPENERS = ["Plainly", "Honestly", "Well", "Clearly", "In short", "To me", "Surely", "Frankly", "Simply", "Basically"]
CLOSERS = ["as stated", "no doubt", "I think", "by the text", "it seems", "for sure", "on balance", "as written",
           "at a glance", "in my view", "so to speak", "all told", "more or less", "if anything", "without a doubt",
           "by and large", "as I read it", "in effect", "at heart", "to be fair"]
FACTS = [f"the {thing} is {state}" for thing in ("cup", "door", "road", "lamp", "river", "train", "park", "room")
         for state in ("open", "wet", "quiet", "full", "cold", "late", "new", "dark")][:60]


def write_crowd(path) -> None:
    """60 invented items, each answered by 60 of the 200 annotators (each annotator 18 items); an
    annotator's explanations share their opener and closer, and their labels lean their own way."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, fact in enumerate(FACTS):
            for j in range(60):
                k = (i * 7 + j) % 200  # a block of 60 annotators per item, each annotator on 18 items
                label = "yes" if (i + k) % 5 else "no"
                fh.write(json.dumps({"item_id": f"q{i:02d}", "text_a": f"Is it true that {fact}?",
                                     "text_b": f"Does it hold that {fact}?", "annotator": ANNOTATORS[k],
                                     "label": label, "explanation": f"{OPENERS[k % 10]}, {fact}, "
                                                                    f"{CLOSERS[k // 10]}."}) + "\n")


def test_two_hundred_annotators_run_end_to_end_with_one_shared_adapter(tmp_path):
    crowd, run = tmp_path / "crowd.jsonl", tmp_path / "run"
    write_crowd(crowd)
    data = ["--data.min_train_records_per_annotator", "3"]  # a seeded 60/20/20 item split: some have 4
    prepared = subprocess.run([sys.executable, "01_prepare.py", "--config", "configs/smoke.yaml", "--custom", str(crowd),
                               "--name", "crowd", "--label-type", "categorical", "--run_dir", str(run), *data],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    budget = ["--run_dir", str(run), *data, "--adapters", "[shared]", "--baselines.methods", "[base]",
              "--sft.max_train_examples", "2", "--capo.max_pairs", "2", "--capo.eval_every_steps", "1000",
              "--capo.select_min_dev_items", "1",
              "--eval.bertscore", "false", "--hlv.bootstrap_groups", "20", "--hlv.folds", "2",
              "--hlv.control_permutations", "1"]
    done = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--dataset", "crowd", "--", *budget],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "CAPO_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    adapters = run / "adapters" / "crowd" / "tiny"
    assert sorted(p.name for p in adapters.iterdir() if p.is_dir()) == ["capo_shared", "sft_shared"]  # 2, not 400
    for method in ("base", "sft_shared", "capo_shared"):
        assert len(list((run / "predictions" / "crowd" / "tiny" / method).glob("*.jsonl"))) == 200
    metrics = json.loads((run / "metrics.json").read_text())
    results = metrics["results"]["crowd"]["tiny"]
    for method in ("sft_shared", "capo_shared"):
        assert results[method]["status"] == "ok" and results[method]["group_clf_conf"] is not None
        assert "200 annotators" in results[method]["judge"]["reason"]  # reported missing, with why
    report = (run / "report.md").read_text()
    assert "min / median / max over annotators" in report and "| c199 |" not in report  # summarised
    assert len(report.splitlines()) < 800
    with open(run / "tables" / "per_annotator.csv", newline="") as fh:
        assert len({row["annotator"] for row in csv.DictReader(fh)}) == 200  # every annotator in the CSV
    times = [line.split("\t") for line in (run / "stage_times.tsv").read_text().splitlines()]
    print("stage seconds and peak MB:", [(row[1], row[3], row[4]) for row in times])
