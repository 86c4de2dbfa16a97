"""The README's own-data workflow, end to end: its two commands on the smoke profile with an
invented 3-annotator file, then a rerun after an output was deleted by hand."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

STYLES = {"r1": "Plainly, {}.", "r2": "I think {} here.", "r3": "{}, as the texts say."}
FACTS = ["the cup is full", "the door is open", "the dog sleeps", "the road is wet", "the shop is closed",
         "the sky is grey", "the tea is hot", "the bus is late", "the lamp is on", "the cake is sweet",
         "the river is high", "the train is full", "the park is quiet", "the car is new", "the milk is cold",
         "the room is dark", "the bag is heavy", "the field is green", "the book is long", "the song is loud"]


def write_mine(path):
    """20 invented items, 3 annotators, yes/no labels with a per-annotator lean."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, fact in enumerate(FACTS):
            for a, (annotator, style) in enumerate(STYLES.items()):
                label = "yes" if (i + a) % 3 else "no"
                fh.write(json.dumps({"item_id": f"q{i}", "text_a": f"Is it true that {fact}?",
                                     "text_b": f"Does it hold that {fact}?", "annotator": annotator,
                                     "label": label, "explanation": style.format(fact)}) + "\n")


def test_readme_own_data_commands_run_end_to_end(tmp_path):
    mine, run = tmp_path / "mine.jsonl", tmp_path / "run"
    write_mine(mine)
    prepare = subprocess.run([sys.executable, "01_prepare.py", "--config", "configs/smoke.yaml", "--custom", str(mine),
                              "--name", "mine", "--label-type", "categorical", "--run_dir", str(run)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert prepare.returncode == 0, prepare.stderr
    # Small-test budget on top of the smoke profile (the commands are the README's).
    budget = ["--run_dir", str(run), "--eval.bertscore", "false", "--eval.judge_items", "4",
              "--sft.epochs", "1", "--capo.max_pairs", "4"]
    full = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--dataset", "mine", "--", *budget],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert "[prepare] mine: " in full.stdout and "is current" in full.stdout  # 01 re-read the same file: skipped
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["mine"]["tiny"]) >= {"base", "icl", "vp", "vp_icl", "sft", "capo"}
    for method in ("sft", "capo"):
        for annotator in STYLES:
            assert (run / "predictions" / "mine" / "tiny" / method / f"{annotator}.jsonl").is_file()
    assert (run / "report.md").is_file() and (run / "logs" / "06_eval.log").is_file()

    # An output deleted by hand is made again; everything else is found current and skipped.
    summary = run / "hlv" / "mine" / "summary.json"
    summary.unlink()
    again = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--dataset", "mine", "--", *budget],
                           cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert summary.is_file() and "[hlv] mine: analysing (not there yet)" in again.stdout
    assert "training (" not in again.stdout and again.stdout.count("adapter is current") == 6
    assert "0 of 12 predictions files to (re)do" in again.stdout
