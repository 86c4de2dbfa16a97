"""Shared adapters (`adapters: [shared]`): sft_shared and capo_shared, one adapter per dataset and
model trained on every annotator's records, the target named in each prompt.

The data is test_sft's invented NLI set (3 annotators); the model is the smoke profile's tiny Llama.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import common
from conftest import load_stage
from test_sft import ANNOTATORS, write_fixture

sft = load_stage("04_sft")
capo = load_stage("05_capo")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    config_path = write_fixture(tmp_path_factory.mktemp("shared"), adapters=["shared"])
    argv = ["--config", str(config_path), "--dataset", "toy"]
    return common.load_config(config_path), sft.main(argv), capo.main(argv)


def test_one_shared_adapter_learns_every_annotator_and_predicts_for_each(shared_run):
    cfg, sft_done, capo_done = shared_run
    assert [row["method"] for row in sft_done] == ["sft_shared"] and [row["method"] for row in capo_done] == [
        "capo_shared"]
    for method in ("sft", "capo"):  # no per-annotator adapter was asked for
        assert not common.adapter_dir(cfg, "toy", "tiny", method, None).exists()
    for method in ("sft_shared", "capo_shared"):
        adapter = common.adapter_dir(cfg, "toy", "tiny", method, None)
        assert (adapter / "adapter_model.safetensors").is_file() and common.stale_reason(adapter, cfg) is None
        log = json.loads((adapter / "train_log.json").read_text())
        assert log["annotator"] is None and log["annotators"] == ANNOTATORS
        assert "each annotator named in its prompt" in (adapter / "README.md").read_text()
        for annotator in ANNOTATORS:
            predictions = common.read_jsonl(common.predictions_path(cfg, "toy", "tiny", method, annotator),
                                            required=common.PREDICTION_FIELDS)
            assert {p["annotator"] for p in predictions} == {annotator} and {p["method"] for p in predictions} == {
                method}
    sft_log, capo_log = (json.loads((common.adapter_dir(cfg, "toy", "tiny", m, None) / "train_log.json").read_text())
                         for m in ("sft_shared", "capo_shared"))
    # every annotator's train records (4 items x 3 annotators), and every annotator's pairs
    assert sft_log["train_examples"] == 12 and sft_log["budget"]["steps"] == sft_log["steps"]
    pairs = sum(len(common.read_jsonl(common.pairs_dir(cfg, "toy", "tiny") / f"{a}.jsonl")) for a in ANNOTATORS)
    assert capo_log["train_pairs"] == pairs and capo_log["budget"]["sft"]["steps"] == sft_log["steps"]
    selection = json.loads((common.adapter_dir(cfg, "toy", "tiny", "capo_shared", None) / "selection.json").read_text())
    assert selection["measure"] == "group_target_confidence" and set(selection["dev_items"]) == set(ANNOTATORS)


def test_the_shared_adapter_trains_lora_weights_only_and_capo_moves_them(shared_run):
    cfg, _, _ = shared_run
    sft_weights, capo_weights = (load_file(common.adapter_dir(cfg, "toy", "tiny", m, None) / "adapter_model.safetensors")
                                 for m in ("sft_shared", "capo_shared"))
    assert sft_weights.keys() == capo_weights.keys() and all("lora_" in key for key in sft_weights)
    assert any(torch.count_nonzero(w) for k, w in sft_weights.items() if "lora_B" in k)  # B starts at 0: SFT moved it
    assert any(not torch.equal(sft_weights[k], capo_weights[k]) for k in sft_weights)  # CAPO moved on from SFT


def test_training_rows_name_each_rows_annotator_and_budgets_add_up(tmp_path):
    cfg = common.load_config(write_fixture(tmp_path, adapters=["per_annotator", "shared"], sft__max_train_examples=3))
    data = {"task": common.load_task(cfg, "toy"), "splits": common.load_splits(cfg, "toy")}
    units = common.adapter_units(cfg, "toy", data, "sft", None)
    assert [(u["method"], u["name"]) for u in units] == [("sft", "A0"), ("sft", "A1"), ("sft", "A2"), ("sft_shared", None)]
    assert [u["method"] for u in common.adapter_units(cfg, "toy", data, "sft", "A1")] == ["sft"]  # a subset: no shared
    _, tokenizer = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
    shared_rows, _, counts = sft.training_rows(cfg, units[-1], tokenizer)
    per_annotator = [sft.training_rows(cfg, unit, tokenizer)[0] for unit in units[:-1]]
    assert shared_rows == [row for rows in per_annotator for row in rows]  # the same samples, the same prompts
    assert counts["per_target"] == [3, 3, 3]
    for unit, rows in zip(units, per_annotator):
        assert all(row["prompt"][0]["content"].startswith(f"You are annotator {unit['name']}.") for row in rows)
    line = sft.sft_budget_lines(cfg, units[-1], 9, counts["per_target"])[0]
    # the same 9 examples x 2 epochs; the per-annotator adapters' last batches are partial: 3 x ceil(3 / 2) x 2
    assert line.startswith("SFT budget: 10 steps x 2 examples per step (9 examples x 2 epoch(s)")
    assert line.endswith("the per-annotator adapters together: 12 steps of up to 2")
