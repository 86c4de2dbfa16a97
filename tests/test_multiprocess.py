"""04_sft and 05_capo with --data-parallel on two processes (accelerate's torchrun launcher,
gloo on CPU): the processes train one adapter together (DDP), as on several GPUs.

    .venv/bin/python -m pytest -q tests/test_multiprocess.py

The data is test_sft's invented toy set; one annotator, one example per process in a batch, so
each rank trains on its own share. (The default, adapters shared out with each process
training its own, is tests/test_processes.py's.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import common
from conftest import ROOT
from test_sft import write_fixture

ANNOTATOR = "A0"


def launch(stage: str, config_path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "--num_cpu_threads_per_process", "1", f"{stage}.py", "--config", str(config_path), "--dataset", "toy",
               "--annotators", ANNOTATOR, "--data-parallel", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_04_and_05_data_parallel_on_two_processes_write_one_set_of_outputs_from_rank_0(tmp_path):
    # One pair per process and step; few dev items, so 05 selects by the dev DPO loss, which
    # runs trl's evaluate (and its reference precompute of the dev pairs) on both ranks.
    config_path = write_fixture(tmp_path, sft__per_device_batch_size=1, sft__global_batch_size=2,
                                sft__epochs=1, sft__lora_dropout=0.0, capo__per_device_batch_size=1,
                                capo__global_batch_size=2, capo__select_min_dev_items=100,
                                capo__eval_every_steps=2, generation__max_new_tokens=4)
    cfg = common.load_config(config_path)
    tag = cfg["models"][0]["tag"]
    for stage, method in (("04_sft", "sft"), ("05_capo", "capo")):
        done = launch(stage, config_path)
        assert done.returncode == 0, f"{stage} failed on two processes:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        # Only rank 0 writes and reports: one summary line, one adapter, one predictions file.
        summary = [line for line in done.stdout.splitlines() if line.startswith(f"[{method}] toy/{tag}/{ANNOTATOR}:")]
        assert len(summary) == 1, done.stdout[-3000:]
        adapter = common.adapter_dir(cfg, "toy", tag, method, ANNOTATOR)
        assert common.stale_reason(adapter, cfg) is None  # finished, with its manifest
        log = json.loads((adapter / "train_log.json").read_text())
        assert log["world_size"] == 2 and log["steps"] > 0
        preds = common.read_jsonl(common.predictions_path(cfg, "toy", tag, method, ANNOTATOR),
                                  required=common.PREDICTION_FIELDS)
        assert sorted(p["item_id"] for p in preds) == ["test0", "test1"]  # once each, not once per rank
        assert not common.training_work_dir(cfg, "toy", tag, method, ANNOTATOR).exists()

    capo_log = json.loads((common.adapter_dir(cfg, "toy", tag, "capo", ANNOTATOR) / "train_log.json").read_text())
    assert capo_log["train_pairs"] == 5 and capo_log["dev_pairs"] == 3  # 5 pairs: uneven over 2 ranks
    # The reference log-probs came back to the right pairs: before the first update the policy
    # equals the reference (no dropout), so the rewards are zero, on the dev pairs (step 0's
    # evaluation) and on the first train batch; a shuffled or missing reference gives non-zero.
    dev_start = next(row for row in capo_log["log_history"] if "eval_rewards/chosen" in row)
    train_start = next(row for row in capo_log["log_history"] if "rewards/chosen" in row)
    assert dev_start["step"] == 0 and train_start["step"] == 1
    for row, prefix in ((dev_start, "eval_"), (train_start, "")):
        assert abs(row[f"{prefix}rewards/chosen"]) < 1e-4 and abs(row[f"{prefix}rewards/rejected"]) < 1e-4
        assert row[f"{prefix}logps/chosen"] < -1.0  # the zero is a difference, not two empty sums
    selection = json.loads((common.adapter_dir(cfg, "toy", tag, "capo", ANNOTATOR) / "selection.json").read_text())
    assert selection["measure"] == "dev_dpo_loss"
    assert all(row["score"] is not None for row in selection["history"])
