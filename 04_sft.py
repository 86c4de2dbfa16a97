"""04_sft.py: supervised LoRA adapters (trl SFTTrainer), one per annotator and one shared by all.

    python 04_sft.py --config configs/cpu.yaml --dataset varierr --annotators A0
    python 04_sft.py --config configs/cpu.yaml --resume             # continue an interrupted run
    accelerate launch --num_processes 2 04_sft.py --config configs/paper.yaml   # adapters shared out

Per annotator (method sft) an adapter learns that annotator's train responses to the Base prompt;
with `shared` in `adapters` one adapter (sft_shared) learns every annotator's. The loss covers the
response and its end-of-turn token only. Writes adapters/ and each target's test predictions;
current adapters are kept, --force redoes them. Our choices: docs/CHOICES.md, "SFT".
"""
from __future__ import annotations

import time

from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

import common
import patches
from common import InputError

# What an SFT adapter is made from, besides 01's files; `models[]` is its base model's entry.
CONFIG_SECTIONS = ("seed", "torch_threads", "data", "sft", "models[]")


def sft_examples(records: list[dict], task: dict, annotator: str) -> list[dict]:
    """trl prompt/completion rows for `annotator`'s records, in file order."""
    return [{"prompt": common.build_messages(task, annotator, r["text_a"], r["text_b"]),
             "completion": [{"role": "assistant", "content": common.format_response(r["label"], r["explanation"])}],
             "chat_template_kwargs": dict(common.CHAT_TEMPLATE_KWARGS)}
            for r in records if r["annotator"] == annotator]


def lora_config(section: dict) -> LoraConfig:
    return LoraConfig(r=int(section["lora_r"]), lora_alpha=int(section["lora_alpha"]),
                      lora_dropout=float(section["lora_dropout"]), target_modules=section["target_modules"],
                      bias="none", task_type="CAUSAL_LM")


def sft_config(cfg: dict, output_dir, has_dev: bool, **changes) -> SFTConfig:
    """trl's SFTConfig from the `sft:` section (changes: benchmark variants), `sft.trainer` on top."""
    section = cfg["sft"]
    settings = dict(
        common.trainer_args(cfg, "sft"),
        output_dir=str(output_dir),
        # Padding-free: a batch is its examples back to back in one row, attention kept within each
        # example, so no compute goes to padding; trl then leaves lengths to us (within_max_length).
        padding_free=bool(section["padding_free"]),
        max_length=None if section["padding_free"] else int(section["max_length"]),
        completion_only_loss=True,
        eval_strategy="epoch" if has_dev else "no",
        save_strategy="epoch",  # what --resume continues from
    )
    settings.update(changes)
    return common.trainer_config(SFTConfig, cfg, "sft", settings)


def within_max_length(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Rows whose prompt + response fit in max_length tokens, and how many did not. Dropped, not
    truncated: a cut response would teach the model to stop mid-sentence, or never."""
    kept = [row for row in rows
            if len(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                                 return_dict=False, **common.CHAT_TEMPLATE_KWARGS))
            <= max_length]
    return kept, len(rows) - len(kept)


def check_supervision(trainer, tokenizer, example: dict) -> str:
    """Stop before training unless the response and its end-of-turn token are what is supervised,
    and the prompt renders the same alone as before a response (else training and generation
    would see different prompts, or the model would never learn to stop)."""
    prompt_text = common.render_prompt(tokenizer, example["prompt"])
    full_text = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False,
                                              **common.CHAT_TEMPLATE_KWARGS)
    if not full_text.startswith(prompt_text):
        raise InputError("the chat template renders the prompt differently alone than before a response; "
                         "training and generation would see different prompts")
    batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = batch["labels"][0]
    supervised = labels[labels != -100].tolist()
    if not supervised:
        raise RuntimeError("no supervised token in a collated training example (completion mask is empty)")
    if tokenizer.eos_token_id not in supervised:
        raise RuntimeError(f"the end-of-turn token {tokenizer.eos_token!r} is not supervised; "
                           "the model would never learn to stop")
    return tokenizer.decode(supervised)


def training_rows(cfg: dict, unit: dict, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """(train rows, dev rows, counts) of a unit's targets: each target's rows within sft.max_length,
    its train rows a seeded sample of sft.max_train_examples and its dev rows of sft.max_dev_examples
    (the dev loss is logged, not used for selection); a shared adapter gets every target's."""
    section, dataset, max_length = cfg["sft"], unit["dataset"], int(cfg["sft"]["max_length"])
    train_rows, dev_rows = [], []
    counts = {"available": 0, "too_long": 0, "dev_too_long": 0, "per_target": []}
    for target in unit["targets"]:
        train, too_long = within_max_length(sft_examples(unit["splits"]["train"], unit["task"], target), tokenizer,
                                            max_length)
        dev, dev_too_long = within_max_length(sft_examples(unit["splits"]["dev"], unit["task"], target), tokenizer,
                                              max_length)
        counts["available"] += len(train)
        counts["too_long"] += too_long
        counts["dev_too_long"] += dev_too_long
        sample = common.seeded_sample(train, section["max_train_examples"], f"{cfg['seed']}/{dataset}/{target}")
        counts["per_target"].append(len(sample))
        train_rows += sample
        dev_rows += common.seeded_sample(dev, section["max_dev_examples"],
                                         f"{cfg['data']['split_seed']}/{dataset}/{target}/dev")
    return train_rows, dev_rows, counts


def adapter_recipe(cfg: dict, unit: dict) -> dict:
    """What an SFT adapter depends on: 01's files and the config (a shared one: its targets too)."""
    return common.adapter_recipe(cfg, "04_sft", unit, common.data_files(cfg, unit["dataset"]), CONFIG_SECTIONS)


def sft_budget_lines(cfg: dict, unit: dict, examples: int, per_target: list[int]) -> list[str]:
    """The budget line; a shared adapter's beside the per-annotator adapters' together."""
    budget = common.training_budget(examples, cfg["sft"])
    line = (f"SFT budget: {budget['steps']} steps x {budget['per_step']} examples per step ({examples} examples x "
            f"{budget['epochs']:g} epoch(s) / global batch {budget['global_batch_size']})")
    if unit["name"] is None:
        together = sum(common.training_budget(n, cfg["sft"])["steps"] for n in per_target)
        line += f"; the per-annotator adapters together: {together} steps of up to {budget['global_batch_size']}"
    return [line]


def train_adapter(cfg: dict, args, unit: dict, adapter, made_from: dict) -> None:
    label = common.unit_label(unit)
    common.set_seed(int(cfg["seed"]))  # before the model and the LoRA initialisation
    model, tokenizer = common.load_model_and_tokenizer(unit["model"])
    train_rows, dev_rows, counts = training_rows(cfg, unit, tokenizer)
    if counts["too_long"] or counts["dev_too_long"]:
        print(f"[{label}] left out {counts['too_long']} train / {counts['dev_too_long']} dev examples longer than "
              f"sft.max_length {cfg['sft']['max_length']} tokens", flush=True)
    if not train_rows:
        raise InputError(f"{common.data_dir(cfg, unit['dataset']) / 'train.jsonl'}: {', '.join(unit['targets'])} "
                         f"has no train records (of at most {cfg['sft']['max_length']} tokens)")
    work_dir = common.training_work_dir(cfg, unit["dataset"], unit["model"]["tag"], unit["method"], unit["name"])
    resume_from = common.checkpoint_to_resume(work_dir, args.resume, label, made_from)

    patches.lm_head_on_labelled_positions_only()
    patches.fingerprint_tokenizer_without_copies(tokenizer)
    trainer = SFTTrainer(model=model, args=sft_config(cfg, work_dir, has_dev=bool(dev_rows)),
                         train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(dev_rows) if dev_rows else None,
                         processing_class=tokenizer, peft_config=lora_config(cfg["sft"]))
    supervised = check_supervision(trainer, tokenizer, train_rows[0])
    for line in sft_budget_lines(cfg, unit, len(train_rows), counts["per_target"]):
        print(f"[{label}] {line}", flush=True)
    print(f"[{label}] {len(train_rows)} train (of {counts['available']}) / {len(dev_rows)} dev examples; global batch "
          f"{cfg['sft']['global_batch_size']} = {trainer.args.per_device_train_batch_size} x "
          f"{trainer.args.gradient_accumulation_steps} accumulation x {common.world_size()} process(es); "
          f"supervised text of example 0: {supervised!r}", flush=True)

    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    dev_losses = [{"epoch": row["epoch"], "step": row["step"], "dev_loss": row["eval_loss"]}
                  for row in trainer.state.log_history if "eval_loss" in row]

    def write(folder):
        trainer.model.save_pretrained(folder)
        common.write_json(folder / "train_log.json", {
            "dataset": unit["dataset"], "model": unit["model"]["tag"], "annotator": unit["name"],
            "annotators": unit["targets"], "method": unit["method"], "train_examples": len(train_rows),
            "train_examples_available": counts["available"],
            "budget": common.training_budget(len(train_rows), cfg["sft"]), "dev_examples": len(dev_rows),
            "left_out_too_long": {"train": counts["too_long"], "dev": counts["dev_too_long"]},
            "world_size": common.world_size(), "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
            "train_loss": result.training_loss, "steps": trainer.state.global_step, "dev_loss_per_epoch": dev_losses,
            "resumed_from": resume_from, "seconds": round(time.time() - started, 1), "supervised_example": supervised,
            "log_history": trainer.state.log_history})

    if trainer.accelerator.is_main_process:
        for row in dev_losses:
            print(f"[{label}] epoch {row['epoch']:.0f}: dev loss {row['dev_loss']:.4f}", flush=True)
    common.save_adapter(cfg, unit, adapter, made_from, work_dir, write)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.training_stage_parser(__doc__)
    args, cfg = common.parse_stage_args(parser, argv)
    common.require_models(cfg)  # a missing hub model stops here, in one line

    units = []
    for dataset in common.selected_datasets(cfg, args.dataset):
        common.require_data(cfg, dataset)
        data = {"task": common.load_task(cfg, dataset), "splits": common.load_splits(cfg, dataset)}
        units += common.adapter_units(cfg, dataset, data, "sft", args.annotators)
    return common.train_adapters(cfg, args, "04_sft", units, lambda unit: adapter_recipe(cfg, unit),
                                 lambda unit, adapter, made_from: train_adapter(cfg, args, unit, adapter, made_from))


if __name__ == "__main__":
    common.run_stage(main)
