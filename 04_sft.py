"""04_sft.py: one LoRA adapter per (dataset, model, annotator), trained with trl's SFTTrainer.

    python 04_sft.py --config configs/cpu.yaml --dataset varierr --annotators A0
    python 04_sft.py --config configs/smoke.yaml --dataset all
    python 04_sft.py --config configs/cpu.yaml --dataset varierr --resume      # continue an interrupted run
    python 04_sft.py --config configs/cpu.yaml --sft.epochs 1 --force          # retrain finished annotators
    accelerate launch --num_processes 2 04_sft.py --config configs/paper.yaml     # adapters shared out over 2 processes
    accelerate launch --num_processes 4 04_sft.py --config configs/paper.yaml --dataset varierr --annotators A0 --data-parallel

Reads runs/<profile>/data/<dataset>/{train,dev,test}.jsonl (01). For every model of the profile
and every annotator (or the --annotators subset) writes:
  adapters/<dataset>/<model>/sft/<annotator>/          PEFT adapter (PeftModel.from_pretrained on the
                                                        base model), train_log.json, config.resolved.yaml
  predictions/<dataset>/<model>/sft/<annotator>.jsonl  greedy generations on the annotator's test items
  work/sft/<dataset>/<model>/<annotator>/              checkpoints while training (removed when done)
A finished annotator (adapter and predictions present) is skipped unless --force; an adapter
without predictions only generates. With `accelerate launch`, each process trains (and predicts
with) its share of the adapters by itself, exactly as one process would (docs/DESIGN.md,
"Processes"); with --data-parallel the processes train each adapter together instead (DDP; the
global batch stays sft.global_batch_size) and only rank 0 writes files.

Training data: one example per train record of the annotator (an annotator who gave two
labels to an item contributes both), in trl's conversational prompt/completion form: the
prompt is common.build_messages (the Base prompt: annotator ID, instructions, item) and the
completion is the response `Label: ...\\nExplanation: ...`. The loss covers the completion
only, end-of-turn token included (checked on a collated batch before training). The dev
records of the annotator give a dev loss after every epoch.

Speed: padding-free batches (sft.padding_free: a batch is its examples back to back in one
row, attention kept within each example; no compute on padding), examples longer than
sft.max_length are left out (not truncated). Hyperparameters from the `sft:` section. Paper profile defaults are the kit's
choices, not the paper's recipe (unknown; docs/CHOICES.md): LoRA r 16, alpha 32, dropout 0.05 on all
linear projections; lr 2e-4, cosine, 3% warm-up; max length 512; bf16 on GPUs. The last
epoch's adapter is kept (our choice; dev loss is logged, not used for selection). CPU: the
cpu profile trains with bf16 autocast (1.4-1.7x the fp32 tokens/s on AVX512-BF16 cores) and without
gradient checkpointing (it recomputes the forward; memory is no issue at 135M); measured in
bench/RESULTS.md "## Training". With sft.max_train_examples (the cpu profile's budget) an
annotator trains on a seeded sample of that many of its examples. Each annotator's budget is
printed ("SFT budget: N steps x E examples per step", common.training_budget) and kept in
train_log.json; 05_capo.py prints CAPO's beside it.
"""
from __future__ import annotations

import gc
import shutil
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

import common
import patches
from common import InputError



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
    """trl's SFTConfig from the profile's `sft:` section (changes: benchmark variants)."""
    section = cfg["sft"]
    settings = dict(
        common.trainer_args(cfg, "sft"),
        output_dir=str(output_dir),
        # Padding-free: a batch is one row of its examples back to back (attention stays within each
        # example), so no compute goes to padding. trl then leaves lengths to us: see within_max_length.
        padding_free=bool(section["padding_free"]),
        max_length=None if section["padding_free"] else int(section["max_length"]),
        completion_only_loss=True,  # loss on the response only (label, explanation, end of turn)
        eval_strategy="epoch" if has_dev else "no",
        save_strategy="epoch",  # one checkpoint per epoch is what --resume continues from
    )
    settings.update(changes)
    return common.trainer_config(SFTConfig, cfg, "sft", settings)  # + sft.trainer


def within_max_length(rows: list[dict], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Rows whose prompt + response fit in max_length tokens, and how many did not.

    Dropped rather than truncated: a cut response would teach the model to stop mid-sentence
    (or never to stop). Our choice; none of VariErr's or Par's responses is near 512 tokens.
    """
    kept = [row for row in rows
            if len(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                                 return_dict=False, **common.CHAT_TEMPLATE_KWARGS))
            <= max_length]
    return kept, len(rows) - len(kept)


def check_supervision(trainer, tokenizer, example: dict) -> str:
    """Fail before training if the response (with its end-of-turn token) is not what is supervised.

    Two known traps: a pad token equal to EOS masks the EOS label (the model never learns to
    stop), and a chat template that renders the prompt differently on its own than inside
    prompt+completion trains on one context and generates from another.
    """
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


def epoch_dev_losses(log_history: list[dict]) -> list[dict]:
    return [{"epoch": row["epoch"], "step": row["step"], "dev_loss": row["eval_loss"]}
            for row in log_history if "eval_loss" in row]


# The config sections an SFT adapter is made from, besides 01's files (train, and dev for the
# dev loss); `models[]` is the entry of its base model. Its test predictions: common's
# ADAPTER_PREDICTION_SECTIONS.
CONFIG_SECTIONS = ("seed", "torch_threads", "data", "sft", "models[]")


def adapter_recipe(cfg: dict, dataset: str, model_cfg: dict) -> dict:
    """What an SFT adapter depends on: 01's files and the config."""
    return common.recipe(cfg, "04_sft", common.data_files(cfg, dataset), CONFIG_SECTIONS,
                         model_tag=model_cfg["tag"], bf16_native=common.native_bf16())


def train_adapter(cfg: dict, args, dataset: str, task: dict, splits: dict, model_cfg: dict,
                  annotator: str, adapter_path, made_from: dict) -> None:
    tag, name = model_cfg["tag"], f"sft {dataset}/{model_cfg['tag']}/{annotator}"
    common.set_seed(int(cfg["seed"]))  # before the model and the LoRA initialisation
    model, tokenizer = common.load_model_and_tokenizer(model_cfg)
    max_length = int(cfg["sft"]["max_length"])
    train_rows, too_long = within_max_length(sft_examples(splits["train"], task, annotator), tokenizer, max_length)
    dev_rows, dev_too_long = within_max_length(sft_examples(splits["dev"], task, annotator), tokenizer, max_length)
    # The dev loss is logged, not used for selection: a seeded sample keeps its cost down.
    dev_rows = common.seeded_sample(dev_rows, cfg["sft"]["max_dev_examples"],
                                    f"{cfg['data']['split_seed']}/{dataset}/{annotator}/dev")
    available = len(train_rows)
    train_rows = common.seeded_sample(train_rows, cfg["sft"]["max_train_examples"], f"{cfg['seed']}/{dataset}/{annotator}")
    if len(train_rows) < available:
        print(f"[{name}] training on a seeded {len(train_rows)} of {available} train examples "
              f"(sft.max_train_examples)", flush=True)
    if too_long or dev_too_long:
        print(f"[{name}] left out {too_long} train / {dev_too_long} dev examples longer than "
              f"sft.max_length {max_length} tokens", flush=True)
    if not train_rows:
        raise InputError(f"{common.data_dir(cfg, dataset) / 'train.jsonl'}: annotator {annotator} "
                         f"has no train records (of at most {max_length} tokens)")
    work_dir = common.training_work_dir(cfg, dataset, tag, "sft", annotator)
    resume_from = common.checkpoint_to_resume(work_dir, args.resume, name, made_from)

    patches.lm_head_on_labelled_positions_only()  # the loss's LM head skips the prompt on CPUs too
    patches.fingerprint_tokenizer_without_copies(tokenizer)  # trl's map() pickles it for a fingerprint
    trainer = SFTTrainer(model=model, args=sft_config(cfg, work_dir, has_dev=bool(dev_rows)),
                         train_dataset=Dataset.from_list(train_rows),
                         eval_dataset=Dataset.from_list(dev_rows) if dev_rows else None,
                         processing_class=tokenizer, peft_config=lora_config(cfg["sft"]))
    supervised = check_supervision(trainer, tokenizer, train_rows[0])
    budget = common.training_budget(len(train_rows), cfg["sft"])
    print(f"[{name}] SFT budget: {budget['steps']} steps x {budget['per_step']} examples per step "
          f"({len(train_rows)} examples x {budget['epochs']:g} epoch(s) / global batch {budget['global_batch_size']})",
          flush=True)
    print(f"[{name}] {len(train_rows)} train / {len(dev_rows)} dev examples; "
          f"global batch {cfg['sft']['global_batch_size']} = {trainer.args.per_device_train_batch_size} "
          f"x {trainer.args.gradient_accumulation_steps} accumulation x {common.world_size()} process(es); "
          f"supervised text of example 0: {supervised!r}", flush=True)

    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    if trainer.accelerator.is_main_process:
        dev_losses = epoch_dev_losses(trainer.state.log_history)
        for row in dev_losses:
            print(f"[{name}] epoch {row['epoch']:.0f}: dev loss {row['dev_loss']:.4f}", flush=True)
        common.forget_output(adapter_path)
        with common.atomic_dir(adapter_path) as tmp:
            trainer.model.save_pretrained(tmp)
            common.write_json(tmp / "train_log.json", {
                "dataset": dataset, "model": tag, "annotator": annotator, "method": "sft",
                "train_examples": len(train_rows), "train_examples_available": available, "budget": budget,
                "dev_examples": len(dev_rows),
                "left_out_too_long": {"train": too_long, "dev": dev_too_long},
                "world_size": common.world_size(),
                "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
                "train_loss": result.training_loss, "steps": trainer.state.global_step,
                "dev_loss_per_epoch": dev_losses, "resumed_from": resume_from,
                "seconds": round(time.time() - started, 1), "supervised_example": supervised,
                "log_history": trainer.state.log_history})
            common.save_resolved_config(cfg, tmp, stage="04_sft")
            common.finish_adapter_dir(tmp, cfg, model_cfg)  # hub ID of the base, model card
        common.write_manifest(adapter_path, made_from)
        shutil.rmtree(work_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.training_stage_parser(__doc__)
    args, cfg = common.parse_stage_args(parser, argv)
    common.require_models(cfg)  # a missing hub model stops here, in one line

    # ---- data, and the adapters to train: (dataset, model, annotator) units
    data, units = {}, []
    for dataset in common.selected_datasets(cfg, args.dataset):
        common.require_data(cfg, dataset)
        data[dataset] = {"task": common.load_task(cfg, dataset), "splits": common.load_splits(cfg, dataset)}
        units += [(dataset, model_cfg["tag"], annotator) for model_cfg in common.model_configs(cfg)
                  for annotator in common.select_annotators(cfg, dataset, args.annotators)]
    models = {model_cfg["tag"]: model_cfg for model_cfg in common.model_configs(cfg)}

    done = []
    for dataset, tag, annotator in common.training_share(units, args.data_parallel):
        task, splits, model_cfg, started = data[dataset]["task"], data[dataset]["splits"], models[tag], time.time()
        name = f"sft {dataset}/{tag}/{annotator}"
        adapter_path = common.adapter_dir(cfg, dataset, tag, "sft", annotator)
        pred_path = common.predictions_path(cfg, dataset, tag, "sft", annotator)
        if args.dry_run:
            reason = "--force" if args.force else common.why_not_current(adapter_path,
                                                                         adapter_recipe(cfg, dataset, model_cfg))
            common.say_adapter_plan("sft", adapter_path, reason, pred_path, common.adapter_predictions_recipe(
                cfg, "04_sft", dataset, model_cfg, adapter_path))
            continue
        with common.training_processes(args.data_parallel):
            # ---- train, unless the adapter is finished from the same data, config and code
            made_from = adapter_recipe(cfg, dataset, model_cfg)
            reason = "--force" if args.force else common.why_not_current(adapter_path, made_from)
            if reason:
                print(f"[{name}] training ({reason}){common.process_label()}", flush=True)
                train_adapter(cfg, args, dataset, task, splits, model_cfg, annotator, adapter_path, made_from)
            else:
                print(f"[{name}] adapter is current (same data, config and code); not retrained", flush=True)
            if not common.is_main_process():
                continue

            # ---- predict the test items, unless those predictions are current for this adapter
            pred_made_from = common.adapter_predictions_recipe(cfg, "04_sft", dataset, model_cfg, adapter_path)
            status = {"dataset": dataset, "model": tag, "annotator": annotator, "method": "sft",
                      "adapter": str(adapter_path), "path": str(pred_path)}
            if args.force or reason or common.why_not_current(pred_path, pred_made_from):
                status.update(common.predict_with_adapter(cfg, model_cfg, task, adapter_path, splits["test"],
                                                          annotator, "sft", pred_path, pred_made_from))
            else:
                status["parse_rate"] = common.parse_rate(common.read_jsonl(pred_path))
            done.append({**status, "seconds": round(time.time() - started, 1)})
    done = common.gather_to_all(done)
    if common.is_main_process():
        common.print_training_summary(done)
    return done


if __name__ == "__main__":
    common.run_stage(main)
