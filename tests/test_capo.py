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


# ---------------------------------------------------------------------------- the budgeted pair sample
N_ITEMS = 30


def many_items(task: str) -> list[dict]:
    """N_ITEMS train items, each with several same-label pairs for A0 and responses the policy must
    keep out: another label (or a score 3 away), a peer-judged invalid response, identical text."""
    records = []
    for i in range(N_ITEMS):
        item = f"i{i:02d}"
        if task == "nli":
            records += [rec(item, "A0", "entailment", f"Target reason {i}."),
                        *(rec(item, f"A{k}", "entailment", f"Other reason {i}/{k}.") for k in (1, 2, 3)),
                        rec(item, "A4", "neutral", f"Another label {i}."),
                        rec(item, "A5", "entailment", f"Judged invalid {i}.", valid=False),
                        rec(item, "A6", "entailment", f"target reason {i}.")]  # identical to A0's
            if i % 3 == 0:  # A0's second label on some items: more chosen responses there
                records.append(rec(item, "A0", "neutral", f"Or neutral {i}."))
        else:
            records += [rec(item, "A0", 2, f"Target reason {i}."),
                        *(rec(item, f"A{k}", 2 + (k % 2), f"Other reason {i}/{k}.") for k in (1, 2, 3)),
                        rec(item, "A4", -1, f"Far score {i}."),
                        rec(item, "A5", 1, f"Judged invalid {i}.", valid=False)]
    return records


@pytest.mark.parametrize("task", ["nli", "par"])
def test_max_pairs_spreads_the_sample_over_the_train_items(task):
    spec = NLI if task == "nli" else PAR
    records = many_items(task)
    pairs = capo.build_pairs(records, spec, "A0", "same_label", 1)
    assert len(pairs) >= 3 * N_ITEMS and len({p["item_id"] for p in pairs}) == N_ITEMS
    by_text = {(r["item_id"], common.format_response(r["label"], r["explanation"])): r for r in records}

    def check_policy(sample):
        for pair in sample:
            chosen = by_text[(pair["item_id"], pair["chosen"][0]["content"])]
            rejected = by_text[(pair["item_id"], pair["rejected"][0]["content"])]
            assert chosen["annotator"] == "A0" and rejected["annotator"] != "A0"
            assert rejected["valid"] is not False
            assert capo.same_label(chosen["label"], rejected["label"], spec, 1)
            if task == "par":
                assert abs(chosen["label"] - rejected["label"]) <= 1
            else:
                assert chosen["label"] == rejected["label"]
            assert pair["chosen"][0]["content"].casefold() != pair["rejected"][0]["content"].casefold()

    one = capo.sample_pairs_across_items(pairs, N_ITEMS, "42/toy/A0/same_label")
    assert len(one) == N_ITEMS and len({p["item_id"] for p in one}) == N_ITEMS  # one pair from every item
    two = capo.sample_pairs_across_items(pairs, 2 * N_ITEMS, "42/toy/A0/same_label")
    assert len(two) == 2 * N_ITEMS and set(Counter(p["item_id"] for p in two).values()) == {2}
    some = capo.sample_pairs_across_items(pairs, N_ITEMS // 3, "42/toy/A0/same_label")
    assert len(some) == len({p["item_id"] for p in some}) == N_ITEMS // 3  # fewer than the items: distinct items
    more = capo.sample_pairs_across_items(pairs, N_ITEMS + 5, "42/toy/A0/same_label")
    assert sorted(Counter(p["item_id"] for p in more).values()) == [1] * (N_ITEMS - 5) + [2] * 5
    for sample in (one, two, some, more):
        check_policy(sample)
        assert [pairs.index(p) for p in sample] == sorted(pairs.index(p) for p in sample)  # original order
    # deterministic for a seed, another seed another sample (which items, and which pair within an item)
    assert one == capo.sample_pairs_across_items(pairs, N_ITEMS, "42/toy/A0/same_label")
    assert some == capo.sample_pairs_across_items(pairs, N_ITEMS // 3, "42/toy/A0/same_label")
    assert one != capo.sample_pairs_across_items(pairs, N_ITEMS, "7/toy/A0/same_label")
    assert ({p["item_id"] for p in some}
            != {p["item_id"] for p in capo.sample_pairs_across_items(pairs, N_ITEMS // 3, "7/toy/A0/same_label")})
    # no cap, or a cap above what exists: every pair
    assert capo.sample_pairs_across_items(pairs, None, "k") == pairs
    assert capo.sample_pairs_across_items(pairs, len(pairs) + 1, "k") == pairs


def test_max_pairs_takes_an_items_second_pair_only_after_every_item_has_one():
    # item "a" has 5 pairs, "b" 1, "c" 2: a cap of 4 takes one from each and a second from a or c
    pairs = [{"item_id": item, "n": n} for item, count in (("a", 5), ("b", 1), ("c", 2)) for n in range(count)]
    for seed in range(20):
        sample = capo.sample_pairs_across_items(pairs, 4, str(seed))
        counts = Counter(p["item_id"] for p in sample)
        assert len(sample) == 4 and counts["b"] == 1 and sorted(counts.values()) == [1, 1, 2]
        assert sorted(Counter(p["item_id"] for p in capo.sample_pairs_across_items(pairs, 7, str(seed))).values()) \
            == [1, 2, 4]  # a: 4 of 5 after b and c are used up


# ---------------------------------------------------------------------------- budgets
def test_training_budget_counts_steps_as_the_trainer_does():
    def budget(examples, epochs, batch):
        b = common.training_budget(examples, {"epochs": epochs, "global_batch_size": batch, "learning_rate": 1e-4})
        return b["steps"], b["per_step"]
    assert budget(48, 2, 4) == (24, 4)
    assert budget(96, 1, 4) == (24, 4)
    assert budget(32, 1, 8) == (4, 8)
    assert budget(10, 1, 4) == (3, 4)      # a last, smaller step counts as a step
    assert budget(10, 1.5, 4) == (5, 4)    # ceil(1.5 x 3)
    assert budget(3, 2, 4) == (2, 3)       # fewer rows than the batch: each step has them all
    assert budget(0, 2, 4) == (0, 0)


def test_budget_line_and_a_warning_when_capo_gets_less_than_sft():
    cfg = common.load_config(common.KIT_ROOT / "configs" / "cpu.yaml")
    train = [rec(f"i{i}", "A0", "entailment", "x") for i in range(290)]
    budget = capo.budgets(cfg, train, "A0", n_pairs=96)
    assert capo.budget_lines(budget) == [
        "CAPO budget: 24 steps x 4 pairs per step (SFT: 24 steps x 4 examples per step)"]
    # the budget before: 32 pairs at global batch 8 is 4 steps
    old = common.load_config(common.KIT_ROOT / "configs" / "cpu.yaml",
                             ["--capo.max_pairs", "32", "--capo.global_batch_size", "8"])
    lines = capo.budget_lines(capo.budgets(old, train, "A0", n_pairs=32))
    assert lines[0] == "CAPO budget: 4 steps x 8 pairs per step (SFT: 24 steps x 4 examples per step)"
    assert lines[1].startswith("warning: CAPO gets fewer optimizer steps than SFT (CAPO 4 steps x 8 pairs per step")
    assert "SFT 24 steps x 4 examples per step" in lines[1] and "pairs per step than" not in lines[1]
    small = common.load_config(common.KIT_ROOT / "configs" / "cpu.yaml",
                               ["--capo.global_batch_size", "2", "--capo.max_pairs", "48"])
    lines = capo.budget_lines(capo.budgets(small, train, "A0", n_pairs=48))
    assert lines[0] == "CAPO budget: 24 steps x 2 pairs per step (SFT: 24 steps x 4 examples per step)"
    assert lines[1].startswith("warning: CAPO gets fewer pairs per step than SFT")
    # SFT's examples: min(sft.max_train_examples, the annotator's train examples); other annotators' do not count
    few = train[:10] + [rec("i0", "A1", "entailment", "y")] * 50
    assert capo.budgets(cfg, few, "A0", 96)["sft"]["examples"] == 10
    assert capo.budgets(common.load_config(common.KIT_ROOT / "configs" / "cpu.yaml", ["--sft.max_train_examples",
                                                                                      "null"]),
                        train, "A0", 96)["sft"]["steps"] == 146  # ceil(290 / 4) x 2


def test_capo_budget_compares_with_what_sft_logged_it_trained_on(tmp_path):
    """04 leaves out examples longer than sft.max_length; SFT's logged budget, not the config's
    arithmetic, is what CAPO's is compared with."""
    cfg = common.load_config(common.KIT_ROOT / "configs" / "cpu.yaml")
    train = [rec(f"i{i}", "A0", "entailment", "x") for i in range(290)]
    common.write_json(tmp_path / "train_log.json", {"budget": common.training_budget(40, cfg["sft"])})
    budget = capo.budgets(cfg, train, "A0", n_pairs=96, sft_adapter=tmp_path)
    assert budget["sft"]["examples"] == 40 and budget["sft"]["steps"] == 20
    assert capo.budget_lines(budget) == [
        "CAPO budget: 24 steps x 4 pairs per step (SFT: 20 steps x 4 examples per step)"]
    assert capo.budgets(cfg, train, "A0", 96, sft_adapter=tmp_path / "missing")["sft"]["examples"] == 48


def test_the_cpu_profile_gives_capo_at_least_sfts_budget():
    """Whenever an annotator has the capped numbers of examples and pairs (VariErr, paraphrase: ~290
    examples and 327-497 pairs per annotator), CAPO's steps and pairs per step are not below SFT's."""
    cfg = common.load_config(common.KIT_ROOT / "configs" / "cpu.yaml")
    sft_b = common.training_budget(cfg["sft"]["max_train_examples"], cfg["sft"])
    capo_b = common.training_budget(cfg["capo"]["max_pairs"], cfg["capo"])
    assert capo_b["steps"] >= sft_b["steps"] and capo_b["per_step"] >= sft_b["per_step"]
    assert (sft_b["steps"], sft_b["per_step"], capo_b["steps"], capo_b["per_step"]) == (24, 4, 24, 4)
    # dev selection at steps 0, 8, 16, 24 on at most 40 dev items
    assert cfg["capo"]["eval_every_steps"] == 8 and cfg["capo"]["select_max_dev_items"] == 40
    assert common.load_config(common.KIT_ROOT / "configs" / "paper.yaml")["capo"]["select_max_dev_items"] is None


# ---------------------------------------------------------------------------- dev selection sample
def test_selection_keeps_a_seeded_sample_of_the_targets_dev_items_whatever_max_eval_items(tmp_path):
    dev = [rec(f"d{i:02d}", annotator, "entailment", f"{annotator} {i}", split="dev")
           for i in range(50) for annotator in ("A0", "A1") if annotator == "A1" or i % 5]  # A0: 40 of 50 items
    cfg = common.load_config(write_config(tmp_path, capo__select_max_dev_items=10))
    records, available = capo.selection_dev_records(cfg, "toy", dev, "A0")
    items = {r["item_id"] for r in records}
    assert available == 40 and len(items) == 10
    assert all(int(item[1:]) % 5 for item in items)  # the target's own dev items only
    assert {r["annotator"] for r in records} == {"A0", "A1"}  # every annotator's records on them (item means)
    assert len(records) == 20
    # the same for another training seed or another data.max_eval_items; another split seed draws anew
    for changes in ({"seed": 7}, {"data__max_eval_items": 3}, {"data__max_eval_items": None}):
        other = common.load_config(write_config(tmp_path / str(len(changes)) / next(iter(changes)),
                                                capo__select_max_dev_items=10, **changes))
        assert {r["item_id"] for r in capo.selection_dev_records(other, "toy", dev, "A0")[0]} == items
    resplit = common.load_config(write_config(tmp_path / "resplit", capo__select_max_dev_items=10, data__split_seed=7))
    assert {r["item_id"] for r in capo.selection_dev_records(resplit, "toy", dev, "A0")[0]} != items
    # null: every dev item; a cap above the target's items: every one of them
    for cap in (None, 45):
        every = common.load_config(write_config(tmp_path / f"cap{cap}", capo__select_max_dev_items=cap))
        assert len({r["item_id"] for r in capo.selection_dev_records(every, "toy", dev, "A0")[0]}) == 40
    # the plan counts the sampled items: a sample below select_min_dev_items falls back to dev loss
    few = common.load_config(write_config(tmp_path / "few", capo__select_max_dev_items=3, capo__select_min_dev_items=5))
    splits = {"train": [rec("i1", "A0", "entailment", "x"), rec("i1", "A1", "entailment", "y")],
              "dev": capo.selection_dev_records(few, "toy", dev, "A0")[0]}
    assert capo.selection_plan(few, splits, "A0", dev_pairs=[{"item_id": "d01"}])[1].startswith("3 dev items")


def test_selection_falls_back_to_dev_loss_when_dev_is_small(tmp_path):
    cfg = common.load_config(write_config(tmp_path, capo__select_min_dev_items=3))
    splits = {"train": [rec("i1", "A0", "entailment", "x"), rec("i1", "A1", "entailment", "y")],
              "dev": [rec("d1", "A0", "entailment", "x", split="dev"), rec("d1", "A1", "entailment", "z", "dev")]}
    plan, why, scored = capo.selection_plan(cfg, splits, "A0", dev_pairs=[{"item_id": "d1"}])
    assert plan == "dev_dpo_loss" and "1 dev items" in why and scored == []
    assert capo.selection_plan(cfg, splits, "A0", dev_pairs=[])[0] is None
    splits["dev"] += [rec(f"d{i}", "A0", "neutral", "w", split="dev") for i in range(2, 4)]
    assert capo.selection_plan(cfg, splits, "A0", dev_pairs=[])[::2] == ("group_target_confidence", ["A0"])
    # a shared adapter's plan scores only the targets with enough dev items
    plan, why, scored = capo.selection_plan(cfg, splits, ["A0", "A1"], dev_pairs=[])
    assert (plan, scored) == ("group_target_confidence", ["A0"]) and why.endswith("for 1 of 2 targets")


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
