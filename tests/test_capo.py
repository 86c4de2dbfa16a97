"""05_capo: pair policy, CAPO starts from the SFT adapter, trl's reference is the SFT adapter.

Pairs are checked on invented records (no files). The training checks use the smoke
profile's tiny model and an SFT adapter with random non-zero LoRA weights, so the SFT
adapter and the bare base model give clearly different log-probabilities.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import common
from conftest import load_stage, write_config
from test_sft import NLI, write_fixture

capo = load_stage("05_capo")
pytestmark = pytest.mark.usefixtures("one_thread")


PAR = {"label_type": "numeric", "score_range": [-5, 5], "text_a_name": "Question 1",
       "text_b_name": "Question 2", "instruction": "Rate the paraphrase."}


def rec(item, annotator, label, explanation, split="train", valid=True):
    return {"dataset": "toy", "item_id": item, "split": split, "annotator": annotator, "text_a": f"A {item}",
            "text_b": f"B {item}", "label": label, "explanation": explanation, "valid": valid}


def test_default_policy_pairs_only_same_label_train_responses_of_other_annotators():
    records = [
        rec("i1", "A0", "entailment", "It follows."),
        rec("i1", "A1", "entailment", "The premise says so."),
        rec("i1", "A2", "neutral", "Could be either way."),
        rec("i1", "A3", "entailment", "it   follows."),              # same text as A0's: skipped
        rec("i2", "A0", "contradiction", "Opposite claims."),
        rec("i2", "A1", "contradiction", "They clash.", valid=False),  # peers judged it invalid
        rec("i2", "A0", "neutral", "Or unrelated."),                  # A0's second label on i2
        rec("i2", "A2", "neutral", "No link."),
        rec("d1", "A0", "entailment", "Dev item.", split="dev"),
        rec("d1", "A1", "entailment", "Dev other.", split="dev"),
        rec("t1", "A0", "entailment", "Test item.", split="test"),
        rec("t1", "A1", "entailment", "Test other.", split="test"),
    ]
    counts = Counter()
    pairs = capo.build_pairs(records, NLI, "A0", "same_label", 1, counts=counts)
    got = {(p["item_id"], p["rejected_annotator"], p["chosen"][0]["content"], p["rejected"][0]["content"])
           for p in pairs}
    assert got == {
        ("i1", "A1", "Label: entailment\nExplanation: It follows.",
         "Label: entailment\nExplanation: The premise says so."),
        ("i2", "A2", "Label: neutral\nExplanation: Or unrelated.", "Label: neutral\nExplanation: No link."),
    }
    assert counts["skipped_identical"] == 1
    assert counts["skipped_invalid_rejected"] == 2  # once per chosen response of A0 on i2
    for pair in pairs:  # trl's conversational preference form, with the target's Base prompt
        assert pair["prompt"][0]["role"] == "system" and "annotator A0" in pair["prompt"][0]["content"]
        assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
        assert pair["chosen"] != pair["rejected"]
    # never a dev or test item, whatever the policy
    for policy in ("same_label", "all"):
        assert {p["item_id"] for p in capo.build_pairs(records, NLI, "A0", policy, 1)} <= {"i1", "i2"}
    # the ablation admits other labels; invalid rejected responses can be let in on request
    all_pairs = capo.build_pairs(records, NLI, "A0", "all", 1, rejected_valid_only=False)
    assert ("i1", "A2") in {(p["item_id"], p["rejected_annotator"]) for p in all_pairs}
    assert ("i2", "A1") in {(p["item_id"], p["rejected_annotator"]) for p in all_pairs}
    # dev pairs (only for the dev-loss fallback) come from dev items only
    assert {p["item_id"] for p in capo.build_pairs(records, NLI, "A0", "same_label", 1, split="dev")} == {"d1"}


def test_numeric_labels_pair_within_score_delta():
    records = [rec("q", "Ann1", 3, "Same question."), rec("q", "Ann2", 4, "Nearly the same."),
               rec("q", "Ann3", 1, "Different detail."), rec("q", "Ann4", 2, "Close enough.")]
    pairs = capo.build_pairs(records, PAR, "Ann1", "same_label", 1)
    assert {p["rejected_annotator"] for p in pairs} == {"Ann2", "Ann4"}
    assert {p["rejected_annotator"] for p in capo.build_pairs(records, PAR, "Ann1", "same_label", 0)} == set()
    assert {p["rejected_annotator"] for p in capo.build_pairs(records, PAR, "Ann1", "all", 0)} == {
        "Ann2", "Ann3", "Ann4"}


def test_selection_falls_back_to_dev_loss_when_dev_is_small(tmp_path):
    cfg = common.load_config(write_config(tmp_path, capo__select_min_dev_items=3))
    splits = {"train": [rec("i1", "A0", "entailment", "x"), rec("i1", "A1", "entailment", "y")],
              "dev": [rec("d1", "A0", "entailment", "x", split="dev"), rec("d1", "A1", "entailment", "z", "dev")]}
    plan, why = capo.selection_plan(cfg, splits, "A0", dev_pairs=[{"item_id": "d1"}])
    assert plan == "dev_dpo_loss" and "1 dev items" in why
    assert capo.selection_plan(cfg, splits, "A0", dev_pairs=[])[0] is None
    splits["dev"] += [rec(f"d{i}", "A0", "neutral", "w", split="dev") for i in range(2, 4)]
    assert capo.selection_plan(cfg, splits, "A0", dev_pairs=[])[0] == "group_target_confidence"


def completion_logps(model, batch) -> torch.Tensor:
    """Sum of log-probs of the completion tokens of a collated DPO batch, computed independently of trl."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["input_ids"][:, 1:]
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(dim=1)


def test_capo_starts_from_the_sft_adapter_and_its_reference_is_the_sft_adapter(tmp_path):
    config_path = write_fixture(tmp_path, capo__per_device_batch_size=2, capo__global_batch_size=2,
                                capo__learning_rate=0.05, capo__warmup_ratio=0.0)
    cfg = common.load_config(config_path)
    model_cfg = cfg["models"][0]
    # An SFT adapter that clearly differs from the base model: random (not zero) LoRA B weights.
    common.set_seed(1)
    base, _ = common.load_model_and_tokenizer(model_cfg, device="cpu")
    sft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
    sft_path = common.adapter_dir(cfg, "toy", model_cfg["tag"], "sft", "A0")
    sft_model.save_pretrained(sft_path)
    sft_model.eval()
    sft_weights = load_file(sft_path / "adapter_model.safetensors")

    splits = {s: common.load_split(cfg, "toy", s) for s in ("train", "dev", "test")}
    pairs = capo.build_pairs(splits["train"], NLI, "A0", "same_label", 1)
    assert pairs
    trainer, tokenizer = capo.build_trainer(cfg, model_cfg, sft_path, pairs, [], tmp_path / "work",
                                            max_steps=2, save_strategy="no")
    model = trainer.model

    def adapter_state(name):
        return {k.replace(f".{name}.", "."): v.detach().clone() for k, v in model.named_parameters()
                if f"lora_A.{name}." in k or f"lora_B.{name}." in k}

    policy, reference = adapter_state("default"), adapter_state("ref")
    assert set(policy) == set(reference) == set(sft_weights)  # names as in the PEFT file
    assert all(torch.equal(policy[k], v) and torch.equal(reference[k], v) for k, v in sft_weights.items())
    assert [n for n, p in model.named_parameters() if p.requires_grad and ".ref." in n] == []

    # trl's precomputed reference log-probs are the SFT adapter's, not the bare base model's.
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    ref = torch.cat([torch.tensor([r["ref_chosen_logps"] for r in rows]),
                     torch.tensor([r["ref_rejected_logps"] for r in rows])])
    with sft_model.disable_adapter():
        base_logps = completion_logps(sft_model, batch)
    sft_logps = completion_logps(sft_model, batch)
    assert torch.allclose(ref, sft_logps, atol=1e-3)
    assert (ref - base_logps).abs().min() > 1e-2

    # Training moves the policy adapter only; the reference copy and the base weights stay put.
    base_before = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" not in k}
    trainer.train()
    after_policy, after_ref = adapter_state("default"), adapter_state("ref")
    assert any(not torch.equal(policy[k], after_policy[k]) for k in policy)
    assert all(torch.equal(reference[k], after_ref[k]) for k in reference)
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in base_before.items())
