"""04_sft (and 04 -> 05 end to end): response-only loss with a supervised end-of-turn token,
LoRA-only updates, saved adapters that load with plain peft, skip, and resume.

The data is a tiny invented NLI set written straight into a run directory (3 annotators,
4 train / 2 dev / 2 test items); the model is the smoke profile's tiny random Llama.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback

import common
import patches
from conftest import ROOT, load_stage, mark_prepared, write_config

sft = load_stage("04_sft")
capo = load_stage("05_capo")
pytestmark = pytest.mark.usefixtures("one_thread")

# A short instruction keeps the prompts (and the tiny model's work) small.
NLI = {**common.BUILTIN_TASKS["varierr"], "instruction": "Label the pair."}
ANNOTATORS = ["A0", "A1", "A2"]
# (premise, hypothesis, {annotator: (label, explanation)}): invented sentences
ITEMS = {
    "train": [
        ("A cat sleeps on the warm mat.", "An animal is resting.",
         {"A0": ("entailment", "A sleeping cat is an animal at rest."), "A1": ("entailment", "Cats are animals."),
          "A2": ("entailment", "Sleeping means resting.")}),
        ("The shop closed at noon.", "The shop was open all day.",
         {"A0": ("contradiction", "Closing at noon rules out all day."),
          "A1": ("contradiction", "Noon is not the whole day."), "A2": ("neutral", "Maybe it reopened.")}),
        ("Tom bought three apples.", "Tom likes fruit.",
         {"A0": ("neutral", "Buying is not liking."), "A1": ("neutral", "He may buy them for others."),
          "A2": ("entailment", "People buy what they like.")}),
        ("Rain fell over the town.", "The streets got wet.",
         {"A0": ("entailment", "Rain makes streets wet."), "A1": ("neutral", "Maybe the streets were covered."),
          "A2": ("entailment", "Falling rain wets the ground.")}),
    ],
    "dev": [
        ("A child reads a book.", "Someone is reading.",
         {"A0": ("entailment", "A child is someone."), "A1": ("entailment", "Reading is reading."),
          "A2": ("entailment", "The child reads.")}),
        ("The train left late.", "The train was on time.",
         {"A0": ("contradiction", "Late is not on time."), "A1": ("contradiction", "It was delayed."),
          "A2": ("neutral", "Late leaving can still arrive on time.")}),
    ],
    "test": [
        ("Birds sing at dawn.", "Birds make sounds in the morning.",
         {"A0": ("entailment", "Dawn is morning."), "A1": ("entailment", "Singing is a sound."),
          "A2": ("neutral", "Not every bird sings.")}),
        ("The lamp is off.", "The room is dark.",
         {"A0": ("neutral", "Daylight may light the room."), "A1": ("neutral", "Other lamps may be on."),
          "A2": ("entailment", "No light means dark.")}),
    ],
}

TRAINED = ["A0", "A2"]  # the end-to-end run trains a subset (A1 is only a source of rejected responses)
FIXTURE_CONFIG = dict(
    datasets=["toy"],
    sft__epochs=2, sft__global_batch_size=2, sft__per_device_batch_size=2, sft__logging_steps=1,
    capo__epochs=1, capo__global_batch_size=2, capo__per_device_batch_size=2, capo__logging_steps=1,
    capo__eval_every_steps=2, capo__select_min_dev_items=1, capo__select_group_size=2, capo__select_groups=10,
    generation__max_new_tokens=6, generation__batch_size=4,
)


def write_fixture(tmp_path, **changes):
    """A run directory with the toy dataset as 01 would write it; returns the config path."""
    config_path = write_config(tmp_path, **{**FIXTURE_CONFIG, **changes})
    cfg = common.load_config(config_path)
    out = common.data_dir(cfg, "toy")
    for split, items in ITEMS.items():
        records = []
        for index, (text_a, text_b, answers) in enumerate(items):
            for annotator, (label, explanation) in answers.items():
                records.append({"dataset": "toy", "item_id": f"{split}{index}", "split": split,
                                "annotator": annotator, "text_a": text_a, "text_b": text_b, "label": label,
                                "explanation": explanation, "valid": True})
        common.write_jsonl(out / f"{split}.jsonl", records)
    common.write_json(out / "stats.json", {"dataset": "toy", "task": NLI, "annotators": ANNOTATORS})
    mark_prepared(cfg, "toy")
    return config_path


def make_trainer(cfg, tmp_path, annotator="A0", **changes):
    model, tokenizer = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
    rows = sft.sft_examples(common.load_split(cfg, "toy", "train"), NLI, annotator)
    trainer = sft.SFTTrainer(model=model, args=sft.sft_config(cfg, tmp_path / "work", has_dev=False, **changes),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=sft.lora_config(cfg["sft"]))
    return trainer, tokenizer, rows


def test_response_and_end_of_turn_are_supervised_prompt_is_not(tmp_path):
    cfg = common.load_config(write_fixture(tmp_path))
    trainer, tokenizer, rows = make_trainer(cfg, tmp_path)
    for i, row in enumerate(rows[:2]):
        labels = trainer.data_collator([trainer.train_dataset[i]])["labels"][0]
        supervised = labels[labels != -100].tolist()
        assert len(supervised) > 0
        assert tokenizer.eos_token_id in supervised  # <|im_end|>: the model learns to stop
        text = tokenizer.decode(supervised)
        assert text.startswith(row["completion"][0]["content"]) and "<|im_end|>" in text
        assert "annotator A0" not in text  # no prompt token is supervised
    # The prompt alone renders as a prefix of prompt + response (generation sees the trained context).
    prompt_text = common.render_prompt(tokenizer, rows[0]["prompt"])
    full_text = tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"], tokenize=False,
                                              **common.CHAT_TEMPLATE_KWARGS)
    assert full_text.startswith(prompt_text) and len(full_text) > len(prompt_text)
    assert sft.check_supervision(trainer, tokenizer, rows[0]).startswith("Label: ")


def test_a_pad_token_equal_to_eos_is_caught(tmp_path):
    cfg = common.load_config(write_fixture(tmp_path))
    trainer, tokenizer, rows = make_trainer(cfg, tmp_path)
    eos = tokenizer.eos_token_id
    trainer.data_collator.pad_token_id = eos
    example = dict(trainer.train_dataset[0])
    example["labels"] = [(-100 if t == eos else t) for t in example["labels"]]  # what pad == EOS does
    trainer.train_dataset = Dataset.from_list([example])
    with pytest.raises(RuntimeError, match="not supervised"):
        sft.check_supervision(trainer, tokenizer, rows[0])


def test_padding_free_batches_give_the_same_loss_as_padded_ones(tmp_path):
    """The kit's speed-up must not change what is learned: same examples, same loss."""
    cfg = common.load_config(write_fixture(tmp_path))
    losses = {}
    for padding_free in (True, False):
        trainer, _, _ = make_trainer(cfg, tmp_path, padding_free=padding_free,
                                     max_length=None if padding_free else 512)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        assert batch["input_ids"].shape[0] == (1 if padding_free else 3)
        trainer.model.eval()
        with torch.no_grad():
            losses[padding_free] = trainer.model(**batch).loss
    assert torch.allclose(losses[True], losses[False], atol=1e-5)


def test_lm_head_on_labelled_positions_only_gives_the_same_log_probs_and_gradients():
    """The CPU speed-up of trl's fused LM head (prompt positions skipped) must not change the loss
    or what is learned; switched off, trl's own behaviour comes back."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head
    cfg = common.load_config(ROOT / "configs" / "smoke.yaml")
    model, _ = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, model.config.vocab_size, (3, 12), generator=generator)
    labels = input_ids.clone()
    labels[:, :8] = -100  # the prompt
    labels[2, -1] = -100  # a padded tail
    before = trl_utils._use_triton  # a stage run earlier in this process may have switched it on
    trl_own = getattr(before, "trl_original", before)
    results = {}
    try:
        for enabled in (False, True):
            assert patches.lm_head_on_labelled_positions_only(enabled) is enabled
            assert trl_utils._use_triton(torch.device("cpu")) is enabled
            assert (trl_utils._use_triton is trl_own) is not enabled  # off: trl's own function back
            model.zero_grad()
            out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
            out.loss.backward()
            results[enabled] = (out.log_probs.detach(), out.entropy.detach(),
                                model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    finally:
        trl_utils._use_triton = before
    for full, compact in zip(results[False], results[True]):
        assert torch.allclose(full, compact, atol=1e-6)
    assert (results[True][0][labels[:, 1:] == -100] == 0).all()
    assert (results[True][0][labels[:, 1:] != -100] < 0).all()


def test_tokenizer_fingerprint_without_python_copies_still_follows_the_tokenizer():
    """trl's map() is named by a hash of its arguments, the tokenizer among them: hashing it
    without the Python copies of the vocabulary must still give the same name for the same
    tokenizer and a new one for a changed vocabulary, and leave the tokenizer whole."""
    from transformers import Qwen2Tokenizer  # a BPE tokenizer that keeps Python copies (_vocab, _merges)

    def bpe(extra: dict | None = None):
        return Qwen2Tokenizer(vocab={"a": 0, "b": 1, "\u0120": 2, "ab": 3, "<|endoftext|>": 4, **(extra or {})},
                              merges=[("a", "b")])

    def mapped_fingerprint(tokenizer) -> str:
        rows = Dataset.from_list([{"text": "ab a"}])
        return rows.map(lambda row, tok: {"n": len(tok(row["text"])["input_ids"])},
                        fn_kwargs={"tok": tokenizer})._fingerprint

    tokenizer = bpe()
    assert set(patches.TOKENIZER_PYTHON_COPIES) <= set(tokenizer.__dict__)
    assert patches.fingerprint_tokenizer_without_copies(tokenizer)
    same = mapped_fingerprint(tokenizer)
    assert set(patches.TOKENIZER_PYTHON_COPIES) <= set(tokenizer.__dict__)  # put back after hashing
    assert tokenizer("ab a")["input_ids"] == [3, 2, 0]
    assert mapped_fingerprint(bpe()) == same
    assert mapped_fingerprint(bpe({"ba": 5})) != same


def test_a_few_steps_change_the_lora_weights_and_leave_the_base_untouched(tmp_path):
    cfg = common.load_config(write_fixture(tmp_path))
    trainer, _, _ = make_trainer(cfg, tmp_path, max_steps=3, learning_rate=0.05, warmup_steps=0,
                                 save_strategy="no")
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    assert any(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)


# ---------------------------------------------------------------------------- end to end
def adapter_files(path):
    return sorted(p.name for p in path.iterdir())


def same_adapter(a, b):
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """04 then 05 on the toy set for annotators A0 and A2: the reference run of the tests below."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    config_path = write_fixture(tmp_path)
    argv = ["--config", str(config_path), "--dataset", "toy", "--annotators", ",".join(TRAINED)]
    sft_done = sft.main(argv)
    capo_done = capo.main(argv)
    return config_path, common.load_config(config_path), sft_done, capo_done


def test_04_and_05_run_end_to_end_and_adapters_load_with_plain_peft(pipeline, capsys):
    config_path, cfg, sft_done, capo_done = pipeline
    tag = cfg["models"][0]["tag"]
    assert [s["annotator"] for s in sft_done] == [s["annotator"] for s in capo_done] == TRAINED
    for method in ("sft", "capo"):
        assert not common.adapter_dir(cfg, "toy", tag, method, "A1").exists()
        for annotator in TRAINED:
            path = common.adapter_dir(cfg, "toy", tag, method, annotator)
            assert {"adapter_config.json", "adapter_model.safetensors", "train_log.json",
                    "config.resolved.yaml"} <= set(adapter_files(path))
            base, _ = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
            loaded = PeftModel.from_pretrained(base, str(path))
            assert list(loaded.peft_config) == ["default"]  # trl's "ref" copy is not saved
            preds = common.read_jsonl(common.predictions_path(cfg, "toy", tag, method, annotator),
                                      required=common.PREDICTION_FIELDS)
            assert sorted(p["item_id"] for p in preds) == ["test0", "test1"]
            assert {p["method"] for p in preds} == {method} and {p["annotator"] for p in preds} == {annotator}
        log = json.loads((common.adapter_dir(cfg, "toy", tag, method, "A0") / "train_log.json").read_text())
        assert log["steps"] > 0
    sft_log = json.loads((common.adapter_dir(cfg, "toy", tag, "sft", "A0") / "train_log.json").read_text())
    assert [row["epoch"] for row in sft_log["dev_loss_per_epoch"]] == [1.0, 2.0]
    # the budgets 04 and 05 compute from the config are the steps the trainers took
    for annotator in TRAINED:
        sft_log, capo_log = (json.loads((common.adapter_dir(cfg, "toy", tag, method, annotator) / "train_log.json")
                                        .read_text()) for method in ("sft", "capo"))
        assert sft_log["budget"]["steps"] == sft_log["steps"] == capo_log["budget"]["sft"]["steps"]
        assert capo_log["budget"]["capo"]["steps"] == capo_log["steps"]
        assert capo_log["budget"]["capo"]["examples"] == capo_log["train_pairs"]
    selection = json.loads((common.adapter_dir(cfg, "toy", tag, "capo", "A0") / "selection.json").read_text())
    assert selection["measure"] == "group_target_confidence"
    assert selection["dev_items"] == ["dev0", "dev1"] and selection["dev_items_available"] == 2
    assert selection["history"][0]["step"] == 0 and selection["chosen_step"] >= 1
    pairs_dir = common.run_dir(cfg) / "pairs" / "toy" / tag
    stats = json.loads((pairs_dir / "pairs_stats.json").read_text())
    for annotator in ANNOTATORS:
        pairs = common.read_jsonl(pairs_dir / f"{annotator}.jsonl",
                                  required=("item_id", "prompt", "chosen", "rejected", "rejected_annotator"))
        assert len(pairs) == stats["per_annotator"][annotator]["same_label"]["pairs"] > 0
        assert all(p["item_id"].startswith("train") for p in pairs)
    assert not (common.run_dir(cfg) / "work" / "sft" / "toy" / tag / "A0").exists()  # checkpoints cleaned up

    # A rerun skips finished annotators.
    capsys.readouterr()
    sft.main(["--config", str(config_path), "--dataset", "toy", "--annotators", "A2"])
    capo.main(["--config", str(config_path), "--dataset", "toy", "--annotators", "A2"])
    out = capsys.readouterr().out
    assert out.count("adapter is current") == 2 and "training (" not in out
    # 05 states CAPO's budget beside SFT's, and warns: A2's 3 pairs at global batch 2 are 2 steps, SFT had 4
    a2_sft, a2_capo = (json.loads((common.adapter_dir(cfg, "toy", tag, method, "A2") / "train_log.json").read_text())
                       for method in ("sft", "capo"))
    assert (a2_capo["steps"], a2_sft["steps"]) == (2, 4)
    assert "[capo toy/tiny/A2] CAPO budget: 2 steps x 2 pairs per step (SFT: 4 steps x 2 examples per step)" in out
    assert "[capo toy/tiny/A2] warning: CAPO gets fewer optimizer steps than SFT" in out


# ---------------------------------------------------------------------------- provenance
def copy_of_pipeline(pipeline, tmp_path):
    """The pipeline's run directory copied elsewhere, with the same data: (config path, cfg)."""
    _, reference_cfg, _, _ = pipeline
    shutil.copytree(common.run_dir(reference_cfg), tmp_path / "run")
    config_path = write_fixture(tmp_path)  # rewrites the same data files into the copy
    return config_path, common.load_config(config_path)


def test_a_moved_run_directory_is_still_current(pipeline, tmp_path, capsys):
    config_path, _ = copy_of_pipeline(pipeline, tmp_path)
    argv = ["--config", str(config_path), "--dataset", "toy", "--annotators", ",".join(TRAINED)]
    capsys.readouterr()
    sft.main(argv)
    capo.main(argv)
    out = capsys.readouterr().out
    assert out.count("adapter is current") == 4 and "training (" not in out


def test_a_resplit_retrains_sft_and_capo_refuses_the_stale_adapter(pipeline, tmp_path, capsys):
    """Stale adapters leaked test items: after 01 re-split, 04 said "adapter exists" and 05/06 used it."""
    config_path, cfg = copy_of_pipeline(pipeline, tmp_path)
    tag = cfg["models"][0]["tag"]
    train_path = common.data_dir(cfg, "toy") / "train.jsonl"
    records = common.read_jsonl(train_path)
    records[0]["explanation"] = "A different split put another response here."
    common.write_jsonl(train_path, records)
    mark_prepared(cfg, "toy")  # as 01 would after a re-split
    argv = ["--config", str(config_path), "--dataset", "toy", "--annotators", "A0"]
    with pytest.raises(common.InputError, match=r"sft/A0: not made from the files and config now present "
                                                r"\(input data/toy/train.jsonl has changed\); redo it with: "
                                                r"python 04_sft.py .*--annotators A0"):
        capo.main(argv)
    capsys.readouterr()
    sft.main(argv)
    assert "training (input data/toy/train.jsonl has changed)" in capsys.readouterr().out
    capo.main(argv)
    out = capsys.readouterr().out
    assert re.search(r"training \(input (adapters/toy/tiny/sft/A0|data/toy/train.jsonl|pairs/toy/tiny/A0.jsonl) "
                     r"has changed\)", out)
    for method in ("sft", "capo"):
        assert common.stale_reason(common.adapter_dir(cfg, "toy", tag, method, "A0"), cfg) is None
        assert common.stale_reason(common.predictions_path(cfg, "toy", tag, method, "A0"), cfg) is None


def test_deleted_predictions_are_regenerated_without_retraining(pipeline, tmp_path, capsys):
    config_path, cfg = copy_of_pipeline(pipeline, tmp_path)
    path = common.predictions_path(cfg, "toy", cfg["models"][0]["tag"], "sft", "A2")
    expected = path.read_text()
    path.unlink()
    capsys.readouterr()
    sft.main(["--config", str(config_path), "--dataset", "toy", "--annotators", "A2"])
    assert "adapter is current" in capsys.readouterr().out
    assert path.read_text() == expected


def test_a_new_training_seed_retrains_on_the_same_split(pipeline, tmp_path, capsys):
    config_path, cfg = copy_of_pipeline(pipeline, tmp_path)
    split_before = common.data_dir(cfg, "toy").joinpath("test.jsonl").read_bytes()
    capsys.readouterr()
    sft.main(["--config", str(config_path), "--dataset", "toy", "--annotators", "A2", "--seed", "7"])
    assert "training (config seed was 42, now 7)" in capsys.readouterr().out
    assert common.data_dir(cfg, "toy").joinpath("test.jsonl").read_bytes() == split_before


def test_resume_never_continues_a_checkpoint_of_another_recipe(tmp_path, capsys):
    work = tmp_path / "work"
    (work / "checkpoint-2").mkdir(parents=True)
    common.write_json(work / "recipe.json", {"config": {"seed": 1}})
    assert common.checkpoint_to_resume(work, True, "x", {"config": {"seed": 2}}) is None
    assert "made from other data, config or code; starting over" in capsys.readouterr().out
    assert not (work / "checkpoint-2").exists() and common.read_json(work / "recipe.json") == {"config": {"seed": 2}}
    (work / "checkpoint-3").mkdir()
    assert common.checkpoint_to_resume(work, True, "x", {"config": {"seed": 2}}).endswith("checkpoint-3")


class Interrupt(Exception):
    pass


class InterruptAfterFirstCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise Interrupt(f"killed after saving step {state.global_step}")


def interrupting(trainer_class):
    class Interrupted(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(InterruptAfterFirstCheckpoint())
    return Interrupted


def test_resume_after_an_interrupted_run_finishes_with_the_same_files(pipeline, tmp_path, monkeypatch, capsys):
    _, reference_cfg, _, _ = pipeline
    config_path = write_fixture(tmp_path)
    cfg = common.load_config(config_path)
    tag = cfg["models"][0]["tag"]
    argv = ["--config", str(config_path), "--dataset", "toy", "--annotators", "A0"]
    for stage, trainer_name, method in ((sft, "SFTTrainer", "sft"), (capo, "DPOTrainer", "capo")):
        with monkeypatch.context() as patch:
            patch.setattr(stage, trainer_name, interrupting(getattr(stage, trainer_name)))
            with pytest.raises(Interrupt):
                stage.main(argv)
        assert not common.adapter_dir(cfg, "toy", tag, method, "A0").exists()
        assert any(common.training_work_dir(cfg, "toy", tag, method, "A0").glob("checkpoint-*"))
        stage.main(argv + ["--resume"])
        assert re.search(r"resuming from .*checkpoint-\d+", capsys.readouterr().out)
        ours, theirs = (common.adapter_dir(c, "toy", tag, method, "A0") for c in (cfg, reference_cfg))
        assert adapter_files(ours) == adapter_files(theirs)
        assert same_adapter(ours, theirs)
        pred_ours, pred_theirs = (common.read_jsonl(common.predictions_path(c, "toy", tag, method, "A0"))
                                  for c in (cfg, reference_cfg))
        assert pred_ours == pred_theirs
    ours = json.loads((common.adapter_dir(cfg, "toy", tag, "capo", "A0") / "selection.json").read_text())
    theirs = json.loads((common.adapter_dir(reference_cfg, "toy", tag, "capo", "A0") / "selection.json").read_text())
    assert ours["chosen_step"] == theirs["chosen_step"]


def test_cpu_budget_caps_train_examples_pairs_and_eval_items(tmp_path):
    """sft.max_train_examples, capo.max_pairs and data.max_eval_items take seeded samples: the
    same test items for every method, the pairs file holds the pairs used, the logs say so."""
    config_path = write_fixture(tmp_path, sft__max_train_examples=2, sft__epochs=1, capo__max_pairs=1,
                                data__max_eval_items=1, capo__select_min_dev_items=99, capo__select_max_dev_items=1)
    cfg = common.load_config(config_path)
    argv = ["--config", str(config_path), "--dataset", "toy", "--annotators", "A0"]
    sft.main(argv)
    capo.main(argv)
    tag = cfg["models"][0]["tag"]
    eval_items = {r["item_id"] for r in common.load_eval_split(cfg, "toy", "test")}
    assert len(eval_items) == 1 and eval_items == {r["item_id"] for r in common.load_eval_split(cfg, "toy", "test")}
    assert len({r["item_id"] for r in common.load_split(cfg, "toy", "test")}) == 2
    for method in ("sft", "capo"):
        preds = common.read_jsonl(common.predictions_path(cfg, "toy", tag, method, "A0"))
        assert {p["item_id"] for p in preds} == eval_items
    log = json.loads((common.adapter_dir(cfg, "toy", tag, "sft", "A0") / "train_log.json").read_text())
    assert (log["train_examples"], log["train_examples_available"]) == (2, 4)  # A0 labelled 4 train items
    pairs_dir = common.run_dir(cfg) / "pairs" / "toy" / tag
    stats = json.loads((pairs_dir / "pairs_stats.json").read_text())["per_annotator"]["A0"]["same_label"]
    assert stats["pairs"] > 1 and stats["pairs_used"] == 1
    assert len(common.read_jsonl(pairs_dir / "A0.jsonl")) == 1
    capo_log = json.loads((common.adapter_dir(cfg, "toy", tag, "capo", "A0") / "train_log.json").read_text())
    assert capo_log["train_pairs"] == 1
    # dev selection keeps its own seeded sample (capo.select_max_dev_items), stated in selection.json
    selection = json.loads((common.adapter_dir(cfg, "toy", tag, "capo", "A0") / "selection.json").read_text())
    assert len(selection["dev_items"]) == 1 and selection["dev_items_available"] == 2
    assert selection["select_max_dev_items"] == 1


def test_seeded_sample_keeps_order_and_is_stable():
    rows = list(range(20))
    sample = common.seeded_sample(rows, 5, "k")
    assert len(sample) == 5 and sample == sorted(sample) and sample == common.seeded_sample(rows, 5, "k")
    assert sample != common.seeded_sample(rows, 5, "other key")
    assert common.seeded_sample(rows, None, "k") == rows and common.seeded_sample(rows, 50, "k") == rows
