"""The README's own-data workflow, end to end: its two commands on the smoke profile with an
invented 3-annotator file, then a rerun after an output was deleted by hand; and the same run
on two processes (`run_all.sh --processes 2`), which must write the same bytes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, portable_path

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


def prepare_and_run(tmp_path, *run_all_args, env=None):
    """01 --custom on the invented file, then run_all.sh on it; returns (run dir, budget, stdout)."""
    mine, run = tmp_path / "mine.jsonl", tmp_path / "run"
    write_mine(mine)
    prepare = subprocess.run([sys.executable, "01_prepare.py", "--config", "configs/smoke.yaml", "--custom", str(mine),
                              "--name", "mine", "--label-type", "categorical", "--run_dir", str(run)],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert prepare.returncode == 0, prepare.stderr
    # Small-test budget on top of the smoke profile (the commands are the README's).
    budget = ["--run_dir", str(run), "--eval.bertscore", "false", "--eval.judge_items", "4",
              "--sft.epochs", "1", "--capo.max_pairs", "4"]
    full = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--dataset", "mine", *run_all_args,
                           "--", *budget], cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    return run, budget, full.stdout


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The one-process run, on a PATH without GNU nproc, time or sha256sum (as on a Mac)."""
    folder = tmp_path_factory.mktemp("one")
    path = portable_path(folder / "bin")
    assert not any(shutil.which(tool, path=path) for tool in ("nproc", "time", "sha256sum"))
    return prepare_and_run(folder, "--processes", "1", env={**os.environ, "PATH": path})


def test_readme_own_data_commands_run_end_to_end(one_process_run):
    run, budget, stdout = one_process_run
    assert "[prepare] mine: " in stdout and "is current" in stdout  # 01 re-read the same file: skipped
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["results"]["mine"]["tiny"]) >= {"base", "icl", "vp", "vp_icl", "sft", "capo"}
    for method in ("sft", "capo", "sft_shared", "capo_shared"):  # the smoke profile trains both kinds
        for annotator in STYLES:
            assert (run / "predictions" / "mine" / "tiny" / method / f"{annotator}.jsonl").is_file()
    assert (run / "report.md").is_file() and (run / "logs" / "06_eval.log").is_file()
    assert "accelerate launch --num_machines 1 --num_processes 1" in stdout  # every stage through accelerate

    # An output deleted by hand is made again; everything else is found current and skipped.
    summary = run / "hlv" / "mine" / "summary.json"
    summary.unlink()
    again = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--dataset", "mine", "--", *budget],
                           cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert summary.is_file() and "[hlv] mine: analysing (not there yet)" in again.stdout
    # no --processes: one per GPU, else 2 CPU processes where there are 2 cores (else 1)
    cores = len(os.sched_getaffinity(0))
    assert f"--num_processes {2 if cores >= 2 else 1}" in again.stdout.split("== 03_prompt_baselines")[1]
    # 3 annotators x (sft, capo), and sft_shared and capo_shared
    assert "training (" not in again.stdout and again.stdout.count("adapter is current") == 8
    plans = re.findall(r"\[03\] (\d+) of (\d+) predictions files to \(re\)do", again.stdout)  # one per process
    assert plans and all(todo == "0" for todo, _ in plans) and sum(int(n) for _, n in plans) == 12


def test_two_processes_write_the_bytes_one_process_writes(one_process_run, tmp_path):
    """03's files, 04/05's adapters (each trained by one process) and predictions, 06's judge
    (chunks shared out) and metrics.json: the same bytes with --processes 2 as with 1."""
    one, _, _ = one_process_run
    two, _, stdout = prepare_and_run(tmp_path, "--processes", "2")
    assert "--multi_gpu --main_process_port 0 --num_cpu_threads_per_process 1" in stdout
    assert "(process 1 of 2)" in stdout  # the second process did work
    compared = 0
    for pattern in ("predictions/**/*.jsonl", "adapters/**/*.safetensors", "pairs/**/*.jsonl", "profiles/**/*.txt",
                    "tables/judge_verdicts.jsonl"):
        files = sorted(p.relative_to(one) for p in one.glob(pattern))
        assert files and files == sorted(p.relative_to(two) for p in two.glob(pattern)), pattern
        for path in files:
            assert (one / path).read_bytes() == (two / path).read_bytes(), path
            compared += 1
    assert compared >= 3 * 6 + 3 * 2  # 18 predictions files, 6 adapters at least
    metrics = [(run / "metrics.json").read_text().replace(str(run), "<run>") for run in (one, two)]
    assert metrics[0] == metrics[1]
