"""05_capo.py: cross-annotator preference optimisation (CAPO) from each annotator's SFT adapter.

    python 05_capo.py --config configs/cpu.yaml --dataset varierr --annotators A0
    python 05_capo.py --config configs/smoke.yaml --dataset all
    python 05_capo.py --config configs/cpu.yaml --dataset varierr --resume        # continue a killed run
    python 05_capo.py --config configs/cpu.yaml --pair-policy all      # ablation, saved as method capo_all
    accelerate launch --num_processes 2 05_capo.py --config configs/paper.yaml     # adapters shared out over 2 processes
    accelerate launch --num_processes 4 05_capo.py --config configs/paper.yaml --dataset varierr --annotators A0 --data-parallel

Reads 01's data and 04's adapters. Writes, under runs/<profile>/:
  pairs/<dataset>/<model>/<annotator>.jsonl    the training pairs ({"item_id", "prompt", "chosen",
                                                "rejected", "rejected_annotator"}, trl's conversational form)
  pairs/<dataset>/<model>/pairs_stats.json     pair counts per annotator under both policies
  adapters/<dataset>/<model>/capo/<annotator>/ PEFT adapter, selection.json (every dev evaluation and
                                                the chosen step), train_log.json, config.resolved.yaml
  predictions/<dataset>/<model>/capo/<annotator>.jsonl   greedy generations on the test items
  work/capo/<dataset>/<model>/<annotator>/     checkpoints and the best adapter so far (removed when done)
Skip (--force), resume (--resume), subsets (--annotators) and processes (--data-parallel) work as in 04_sft.py.

Pairs (the paper's rule; docs/CHOICES.md). For every TRAIN item and target annotator: chosen = the target's
response (each of them, if the target gave two labels); rejected = another annotator's
response to the same item with the same label (NLI) or a score within capo.score_delta
(paraphrase), so the contrast is the explanation, not the decision. Pairs whose two
responses are the same text (whitespace and case aside) are skipped. capo.pair_policy: all
(or --pair-policy all) also admits other labels, as an ablation: its pairs go to
pairs/<dataset>/<model>/all/, its adapters and predictions to method `capo_all`. Our choice: with
capo.rejected_valid_only, a response that peers judged invalid (VariErr valid: false) is
never a rejected one; unjudged responses (valid: null, all of paraphrase) count as valid.
With capo.max_pairs (the cpu profile's budget) an annotator trains on a seeded sample of
that many pairs, spread over the train items (sample_pairs_across_items): the items in a seeded
order, one pair per item in turn (every item's first pair, then every item's second, ...) until
max_pairs, the pair taken within an item seeded too; the same seed gives the same sample. The
JSONL holds the pairs used, pairs_stats.json both counts.

Budget. Per annotator 05 prints "CAPO budget: N steps x P pairs per step (SFT: M steps x E
examples per step)": CAPO's from the pairs used, capo.epochs and capo.global_batch_size; SFT's
from the sft section (min(sft.max_train_examples, the annotator's train examples) x sft.epochs /
sft.global_batch_size), both as the trainer counts steps (common.training_budget). When CAPO
gets fewer steps or fewer pairs per step than SFT had examples, a warning line names both
budgets (not an error: "CAPO vs SFT" then compares unequal training, which may be intended).

Training. The policy is the SFT adapter loaded as a trainable PeftModel; no peft_config and
no ref_model go to trl's DPOTrainer, which then adds a frozen copy of the adapter named "ref"
on the same base model and uses it as the reference (the base model is held once). The
reference log-probabilities are computed once before training (capo.precompute_ref_log_probs).
Loss: DPO (sigmoid) with capo.beta.

Checkpoint selection (aggregation-aware, on dev). Every capo.eval_every_steps steps and at
the end, the current adapter generates on the target's dev items; dev-time checkpoint selection
keeps a sample, stated: with capo.select_max_dev_items, a seeded sample of at most that many of
the target's dev items (seeded by data.split_seed and the dataset, independent of
data.max_eval_items, which only decides what 03-06 predict and score; null: every dev item).
The sample and its size go to selection.json. The outputs are embedded as in 02
(capo.select_representation, E3 by default: explanation embedding minus the mean of the human
responses to the same item) and an annotator classifier trained on the human train responses
scores groups of capo.select_group_size outputs; the measure is the mean probability of the
target. The best step is kept. When the target has fewer than capo.select_min_dev_items dev
items in the sample (or the classifier cannot be trained), the measure is the DPO loss on dev
pairs of the sampled items instead; without dev pairs the last step is kept. The SFT adapter
(step 0) is scored too, for reference, but is not a candidate. Our choices: an unparsable
output stands in with its raw text (so breaking the format is not rewarded); hyperparameters
are the kit's (the paper's are unknown; docs/CHOICES.md). The cpu profile selects every 8 of
its 24 steps (steps 0, 8, 16, 24) on 40 dev items.
"""
from __future__ import annotations

import gc
import random
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

import common
import patches
from common import InputError

POLICIES = ("same_label", "all")
METHOD_OF_POLICY = {"same_label": "capo", "all": "capo_all"}


# ----------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------
def same_label(a, b, task: dict, score_delta: float) -> bool:
    if task["label_type"] == "numeric":
        return abs(float(a) - float(b)) <= score_delta
    return a == b


def response_text(record: dict) -> str:
    return common.format_response(record["label"], record["explanation"])


def build_pairs(records: list[dict], task: dict, target: str, policy: str, score_delta: float,
                rejected_valid_only: bool = True, split: str = "train", counts: Counter | None = None) -> list[dict]:
    """CAPO pairs for `target` from the `split` records only (other splits are ignored), by item."""
    if policy not in POLICIES:
        raise InputError(f"capo.pair_policy: unknown policy '{policy}' ({' or '.join(POLICIES)})")
    counts = Counter() if counts is None else counts
    by_item: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        if record["split"] == split:
            by_item[record["item_id"]].append(record)
    pairs = []
    for item_id in sorted(by_item):
        responses = by_item[item_id]
        for chosen in (r for r in responses if r["annotator"] == target):
            for other in responses:
                if other["annotator"] == target:
                    continue
                if rejected_valid_only and other.get("valid") is False:
                    counts["skipped_invalid_rejected"] += 1
                    continue
                if policy == "same_label" and not same_label(chosen["label"], other["label"], task, score_delta):
                    counts["skipped_other_label"] += 1
                    continue
                chosen_text, rejected_text = response_text(chosen), response_text(other)
                if common.normalize_text(chosen_text).casefold() == common.normalize_text(rejected_text).casefold():
                    counts["skipped_identical"] += 1
                    continue
                pairs.append({"item_id": item_id,
                              "prompt": common.build_messages(task, target, chosen["text_a"], chosen["text_b"]),
                              "chosen": [{"role": "assistant", "content": chosen_text}],
                              "rejected": [{"role": "assistant", "content": rejected_text}],
                              "rejected_annotator": other["annotator"]})
    counts["pairs"] += len(pairs)
    counts["items"] += len({pair["item_id"] for pair in pairs})
    return pairs


def sample_pairs_across_items(pairs: list[dict], cap: int | None, seed_key: str) -> list[dict]:
    """`pairs`, or `cap` of them spread over their items, in their original order.

    random.Random(seed_key) orders the items and, within each item, its pairs; the draw then takes
    one pair per item in turn (each item's first pair in item order, then each item's second, ...)
    until `cap`. So cap <= number of items gives `cap` distinct items, and no item gets a second
    pair before every item has one.
    """
    if not cap or len(pairs) <= int(cap):
        return pairs
    rng = random.Random(seed_key)
    by_item: dict[str, list[int]] = defaultdict(list)
    for index, pair in enumerate(pairs):
        by_item[pair["item_id"]].append(index)
    items = sorted(by_item)
    rng.shuffle(items)
    for item in items:
        rng.shuffle(by_item[item])
    keep: list[int] = []
    for turn in range(max(len(indices) for indices in by_item.values())):
        for item in items:
            if turn < len(by_item[item]):
                keep.append(by_item[item][turn])
                if len(keep) == int(cap):
                    return [pairs[i] for i in sorted(keep)]
    return [pairs[i] for i in sorted(keep)]


def write_pairs(cfg: dict, dataset: str, task: dict, splits: dict, model_tag: str, policy: str,
                write: bool = True) -> dict:
    """Every annotator's train pairs (JSONL) and pairs_stats.json (unless not `write`); returns
    {annotator: pairs}."""
    section = cfg["capo"]
    out_dir, pairs_dir = common.pairs_dir(cfg, dataset, model_tag), common.pairs_dir(cfg, dataset, model_tag, policy)
    stats = {"dataset": dataset, "model": model_tag, "policy": policy, "score_delta": section["score_delta"],
             "rejected_valid_only": section["rejected_valid_only"], "per_annotator": {}}
    all_pairs = {}
    for annotator in common.dataset_annotators(cfg, dataset):
        row = {}
        for name in POLICIES:
            counts = Counter()
            pairs = build_pairs(splits["train"], task, annotator, name, section["score_delta"],
                                section["rejected_valid_only"], counts=counts)
            dev_pairs = build_pairs(splits["dev"], task, annotator, name, section["score_delta"],
                                    section["rejected_valid_only"], split="dev")
            row[name] = {**dict(counts), "dev_pairs": len(dev_pairs),
                         "by_rejected_annotator": dict(Counter(p["rejected_annotator"] for p in pairs))}
            if name == policy:
                all_pairs[annotator] = sample_pairs_across_items(pairs, section["max_pairs"],
                                                                 f"{cfg['seed']}/{dataset}/{annotator}/{policy}")
                row[name]["pairs_used"] = len(all_pairs[annotator])
                row[name]["items_used"] = len({p["item_id"] for p in all_pairs[annotator]})
        stats["per_annotator"][annotator] = row
        if write and common.is_main_process():
            common.write_jsonl(pairs_dir / f"{annotator}.jsonl", all_pairs[annotator])
    if write and common.is_main_process():
        common.write_json(out_dir / "pairs_stats.json", stats)
        common.save_resolved_config(cfg, out_dir, stage="05_capo")
    return all_pairs


def budgets(cfg: dict, train_records: list[dict], annotator: str, n_pairs: int, sft_adapter=None) -> dict:
    """{"capo": ..., "sft": ...}: common.training_budget of CAPO on the `n_pairs` pairs used, and
    SFT's budget as 04 logged it in the SFT adapter's train_log.json (what it trained on, after
    leaving out examples longer than sft.max_length); without that log, from the config:
    min(sft.max_train_examples, the annotator's train examples)."""
    log_path = Path(sft_adapter) / "train_log.json" if sft_adapter else None
    logged = common.read_json(log_path).get("budget") if log_path and log_path.is_file() else None
    if logged:
        sft = logged
    else:
        available = sum(1 for record in train_records if record["annotator"] == annotator)
        cap = cfg["sft"]["max_train_examples"]
        sft = common.training_budget(min(int(cap), available) if cap else available, cfg["sft"])
    return {"capo": common.training_budget(n_pairs, cfg["capo"]), "sft": sft}


def budget_lines(budget: dict) -> list[str]:
    """The budget line, and a warning line when CAPO gets fewer steps or fewer pairs per step than SFT."""
    capo_b, sft_b = budget["capo"], budget["sft"]
    capo_text = f"{capo_b['steps']} steps x {capo_b['per_step']} pairs per step"
    sft_text = f"{sft_b['steps']} steps x {sft_b['per_step']} examples per step"
    lines = [f"CAPO budget: {capo_text} (SFT: {sft_text})"]
    short = [what for what, fewer in (("fewer optimizer steps", capo_b["steps"] < sft_b["steps"]),
                                      ("fewer pairs per step", capo_b["per_step"] < sft_b["per_step"])) if fewer]
    if short:
        lines.append(f"warning: CAPO gets {' and '.join(short)} than SFT (CAPO {capo_text}, from {capo_b['examples']} "
                     f"pairs x {capo_b['epochs']:g} epoch(s) / global batch {capo_b['global_batch_size']}; SFT {sft_text}, "
                     f"from {sft_b['examples']} examples x {sft_b['epochs']:g} epoch(s) / global batch "
                     f"{sft_b['global_batch_size']}): CAPO vs SFT compares unequal training; see capo.max_pairs, "
                     f"capo.epochs, capo.global_batch_size")
    return lines


def trl_rows(pairs: list[dict]) -> list[dict]:
    return [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
             "chat_template_kwargs": dict(common.CHAT_TEMPLATE_KWARGS)} for p in pairs]


# ----------------------------------------------------------------------------
# Checkpoint selection on dev
# ----------------------------------------------------------------------------
class AttributionMeasure:
    """How confidently a classifier of human annotators attributes dev generations to the target."""

    name = "group_target_confidence"
    greater_is_better = True

    def __init__(self, cfg: dict, dataset: str, task: dict, splits: dict, annotator: str, tokenizer):
        section = cfg["capo"]
        self.cfg, self.task, self.annotator, self.tokenizer = cfg, task, annotator, tokenizer
        self.representation = section["select_representation"]
        cache_dir = common.embedding_cache_dir(cfg, dataset)  # 02's embedding cache (keyed by texts)
        X_train, _ = common.representation_vectors(cfg, splits["train"], self.representation, cache_dir)
        self.classifier = common.fit_annotator_classifier(cfg["hlv"], X_train,
                                                          [r["annotator"] for r in splits["train"]], cfg["seed"])
        # Item content is removed with the mean of the human dev responses to the same item.
        _, self.dev_means = common.representation_vectors(cfg, splits["dev"], self.representation, cache_dir)
        self.requests = common.annotator_requests(splits["dev"], task, annotator)

    def __call__(self, model, trainer=None) -> dict:
        predictions = common.generate_predictions(model, self.tokenizer, self.requests, self.task,
                                                  self.cfg["generation"], method="capo", model_tag="",
                                                  seed=self.cfg["seed"], desc="dev selection")
        stand_ins = [{"item_id": p["item_id"], "label": p["label"],
                      "explanation": p["explanation"] if p["parse_ok"] else p["output"]} for p in predictions]
        X, _ = common.representation_vectors(self.cfg, stand_ins, self.representation, means=self.dev_means)
        section = self.cfg["capo"]
        result = common.group_target_confidence(self.classifier, X, self.annotator, section["select_group_size"],
                                                section["select_groups"], self.cfg["seed"])
        return {"score": result["mean_prob"], "group_accuracy": result["accuracy"],
                "group_size": result["group_size"], "dev_parse_rate": common.parse_rate(predictions)}


class DevLossMeasure:
    """Fallback: DPO loss on dev pairs (lower is better)."""

    name = "dev_dpo_loss"
    greater_is_better = False

    def __call__(self, model, trainer=None) -> dict:
        metrics = trainer.evaluate()
        return {"score": metrics["eval_loss"],
                "dev_reward_accuracy": metrics.get("eval_rewards/accuracies")}


def selection_dev_records(cfg: dict, dataset: str, dev_records: list[dict], annotator: str) -> tuple[list[dict], int]:
    """(the dev records checkpoint selection uses, how many dev items the target has).

    Of the target's dev items, a seeded sample of at most capo.select_max_dev_items (null: all),
    seeded by data.split_seed and the dataset only (the same items for every training seed and
    for every annotator with the same dev items; data.max_eval_items plays no part), with every
    annotator's records on those items (their mean takes the item content out of the embeddings).
    """
    items = sorted({record["item_id"] for record in dev_records if record["annotator"] == annotator})
    keep = set(common.seeded_sample(items, cfg["capo"]["select_max_dev_items"],
                                    f"{cfg['data']['split_seed']}/{dataset}/dev/capo_selection"))
    return [record for record in dev_records if record["item_id"] in keep], len(items)


def selection_plan(cfg: dict, splits: dict, annotator: str, dev_pairs: list[dict]) -> tuple[str | None, str]:
    """(AttributionMeasure.name, DevLossMeasure.name or None, why) for this annotator's dev split."""
    section = cfg["capo"]
    dev_items = len({r["item_id"] for r in splits["dev"] if r["annotator"] == annotator})
    train_annotators = {r["annotator"] for r in splits["train"]}
    if dev_items >= int(section["select_min_dev_items"]) and len(train_annotators) >= 2:
        return AttributionMeasure.name, (f"{dev_items} dev items (>= capo.select_min_dev_items "
                                         f"{section['select_min_dev_items']})")
    why = (f"{dev_items} dev items (< capo.select_min_dev_items {section['select_min_dev_items']})"
           if len(train_annotators) >= 2 else "fewer than two annotators to train a classifier on")
    if dev_pairs:
        return DevLossMeasure.name, why + f"; falling back to DPO loss on {len(dev_pairs)} dev pairs"
    return None, why + "; no dev pairs either: the last step is kept"


class DevSelection(TrainerCallback):
    """Scores the adapter every `every` steps and at the end; keeps the best one in `best_dir`."""

    def __init__(self, measure, every: int, work_dir, name: str):
        self.measure, self.every, self.name = measure, max(1, int(every)), name
        self.best_dir, self.log_path = work_dir / "best", work_dir / "selection_progress.json"
        self.trainer = None  # set after the trainer exists (the dev-loss measure evaluates with it)
        saved = common.read_json(self.log_path) if self.log_path.exists() else {}
        self.history = {int(step): row for step, row in saved.get("history", {}).items()}

    def best(self) -> dict | None:
        candidates = [row for step, row in self.history.items() if step > 0 and row["score"] is not None]
        if not candidates:
            return None
        pick = max if self.measure.greater_is_better else min
        return pick(candidates, key=lambda row: row["score"])

    def evaluate(self, model, step: int, epoch: float | None) -> None:
        is_dev_loss = isinstance(self.measure, DevLossMeasure)
        row = None
        if is_dev_loss or common.is_main_process():  # trainer.evaluate needs every rank
            was_training = model.training
            model.eval()
            row = {"step": step, "epoch": epoch, **self.measure(model, self.trainer)}
            model.train(was_training)
        if common.is_main_process():
            previous_best = self.best()
            self.history[step] = row
            improved = step > 0 and row["score"] is not None and self.best() is row
            if improved:
                with common.atomic_dir(self.best_dir) as tmp:
                    model.save_pretrained(tmp, selected_adapters=["default"])
            common.write_json(self.log_path, {"measure": self.measure.name, "history": self.history})
            note = "best so far" if improved else ("SFT start, not a candidate" if step == 0 else
                                                   f"best stays step {previous_best['step'] if previous_best else '-'}")
            print(f"[{self.name}] step {step}: {self.measure.name} = {row['score']} ({note})", flush=True)
        if self.trainer is not None:
            self.trainer.accelerator.wait_for_everyone()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if 0 not in self.history:
            self.evaluate(model, 0, 0.0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every == 0 or step >= state.max_steps:
            self.evaluate(model, step, state.epoch)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------
def dpo_config(cfg: dict, output_dir, **changes) -> DPOConfig:
    section = cfg["capo"]
    every = int(section["eval_every_steps"])
    settings = dict(
        common.trainer_args(cfg, "capo"),
        output_dir=str(output_dir),
        max_length=int(section["max_length"]),
        beta=float(section["beta"]),
        loss_type=["sigmoid"],
        precompute_ref_log_probs=bool(section["precompute_ref_log_probs"]),
        eval_strategy="no",  # dev evaluation happens in DevSelection, on the same steps as checkpoints
        save_strategy="steps",
        save_steps=every,  # a checkpoint on every selection step, so --resume continues from one
    )
    settings.update(changes)
    return common.trainer_config(DPOConfig, cfg, "capo", settings)  # + capo.trainer


def pairs_dataset(pairs: list[dict], folder, args: DPOConfig) -> Dataset:
    """The pairs as a Dataset saved under `folder` (once, by rank 0) and memory-mapped by every rank.

    Why on disk: trl's precompute_ref_log_probs writes the reference log-probs into the
    dataset's cache folder on rank 0 and every rank then opens that file. An in-memory
    Dataset's cache folder is a per-process temp dir, so under torchrun the other ranks find
    nothing (FileNotFoundError, compare trl issue #6291). Saved in the run's work dir the
    folder is shared, and trl's cache file (keyed by the dataset fingerprint and a hash of the
    reference weights) is found again by --resume instead of recomputed.
    """
    rows = trl_rows(pairs)
    path = Path(folder) / f"pairs-{common.config_hash(rows)}"
    with args.main_process_first(local=False, desc="saving the pairs dataset"):
        if args.process_index == 0 and not (path / "state.json").is_file():
            with common.atomic_dir(path) as tmp:
                Dataset.from_list(rows).save_to_disk(str(tmp))
    return Dataset.load_from_disk(str(path))


def build_trainer(cfg: dict, model_cfg: dict, sft_path, train_pairs: list[dict], dev_pairs: list[dict],
                  output_dir, **config_changes):
    """DPOTrainer whose policy is the SFT adapter (trainable) and whose reference is trl's frozen copy."""
    patches.lm_head_on_labelled_positions_only()  # the losses' LM head skips the prompt on CPUs too
    common.set_seed(int(cfg["seed"]))
    base, tokenizer = common.load_model_and_tokenizer(model_cfg)
    patches.fingerprint_tokenizer_without_copies(tokenizer)  # trl's map() pickles it for a fingerprint
    model = PeftModel.from_pretrained(base, str(sft_path), is_trainable=True)
    args = dpo_config(cfg, output_dir, **config_changes)
    datasets_dir = Path(output_dir) / "datasets"
    trainer = DPOTrainer(model=model, args=args,
                         train_dataset=pairs_dataset(train_pairs, datasets_dir, args),
                         eval_dataset=pairs_dataset(dev_pairs, datasets_dir, args) if dev_pairs else None,
                         processing_class=tokenizer)
    if "ref" not in trainer.model.peft_config:
        raise RuntimeError("trl did not create the frozen 'ref' copy of the SFT adapter; the reference would "
                           "be the bare base model")
    return trainer, tokenizer


# The config sections a CAPO adapter is made from, besides its pairs, the SFT adapter it starts
# from and 01's files: DPO, the selection classifier (02's settings) and its dev sample, decoding
# for selection; `models[]` is the entry of its base model. Its test predictions: common's
# ADAPTER_PREDICTION_SECTIONS.
CONFIG_SECTIONS = ("seed", "torch_threads", "data", "capo", "hlv", "embedder", "generation", "models[]")


def adapter_recipe(cfg: dict, dataset: str, model_cfg: dict, sft_path, pairs_path) -> dict:
    """What a CAPO adapter depends on: its pairs, the SFT adapter it starts from, 01's files
    (dev selection) and the config."""
    return common.recipe(cfg, "05_capo", [pairs_path, sft_path, *common.data_files(cfg, dataset)],
                         CONFIG_SECTIONS, model_tag=model_cfg["tag"], bf16_native=common.native_bf16())


def train_adapter(cfg: dict, args, dataset: str, task: dict, splits: dict, model_cfg: dict,
                  annotator: str, pairs: list[dict], sft_path, adapter_path, method: str, made_from: dict) -> None:
    tag, name = model_cfg["tag"], f"{method} {dataset}/{model_cfg['tag']}/{annotator}"
    section = cfg["capo"]
    # Selection works on its own seeded sample of dev items (capo.select_max_dev_items), not on 03-06's.
    dev_records, dev_items_available = selection_dev_records(cfg, dataset, common.load_split(cfg, dataset, "dev"),
                                                             annotator)
    dev_items = sorted({r["item_id"] for r in dev_records if r["annotator"] == annotator})
    splits = {**splits, "dev": dev_records}
    dev_pairs = build_pairs(splits["dev"], task, annotator, section["pair_policy"], section["score_delta"],
                            section["rejected_valid_only"], split="dev")
    work_dir = common.training_work_dir(cfg, dataset, tag, method, annotator)
    resume_from = common.checkpoint_to_resume(work_dir, args.resume, name, made_from)
    work_dir.mkdir(parents=True, exist_ok=True)

    plan, why = selection_plan(cfg, splits, annotator, dev_pairs)
    trainer, tokenizer = build_trainer(cfg, model_cfg, sft_path, pairs,
                                       dev_pairs if plan == DevLossMeasure.name else [], work_dir)
    measure = selection = None
    if plan == AttributionMeasure.name:
        measure = AttributionMeasure(cfg, dataset, task, splits, annotator, tokenizer)
    elif plan == DevLossMeasure.name:
        measure = DevLossMeasure()
    if measure:
        selection = DevSelection(measure, section["eval_every_steps"], work_dir, name)
        selection.trainer = trainer
        trainer.add_callback(selection)
    print(f"[{name}] {len(pairs)} train pairs ({section['pair_policy']}), {len(dev_pairs)} dev pairs; policy = "
          f"SFT adapter {sft_path} (trainable), reference = trl's frozen copy 'ref' of it on the same base model; "
          f"selection: {measure.name if measure else 'none'} ({why}) on {len(dev_items)} of the target's "
          f"{dev_items_available} dev items (capo.select_max_dev_items {section['select_max_dev_items']}), "
          f"every {section['eval_every_steps']} steps", flush=True)

    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    if trainer.accelerator.is_main_process:
        best = selection.best() if selection else None
        choice = {"measure": measure.name if measure else None, "why": why,
                  "dev_items": dev_items, "dev_items_available": dev_items_available,
                  "select_max_dev_items": section["select_max_dev_items"],
                  "greater_is_better": measure.greater_is_better if measure else None,
                  "chosen_step": best["step"] if best else trainer.state.global_step,
                  "chosen": best, "final_step": trainer.state.global_step,
                  "history": [selection.history[s] for s in sorted(selection.history)] if selection else []}
        print(f"[{name}] chosen step {choice['chosen_step']} of {choice['final_step']} "
              f"({choice['measure'] or 'last step'})", flush=True)
        common.forget_output(adapter_path)
        with common.atomic_dir(adapter_path) as tmp:
            if best:
                for path in (work_dir / "best").iterdir():
                    shutil.copy2(path, tmp / path.name)
            else:
                trainer.model.save_pretrained(tmp, selected_adapters=["default"])
            common.write_json(tmp / "selection.json", choice)
            common.write_json(tmp / "train_log.json", {
                "dataset": dataset, "model": tag, "annotator": annotator, "method": method,
                "sft_adapter": str(sft_path), "reference": "frozen copy of the SFT adapter ('ref')",
                "train_pairs": len(pairs), "dev_pairs": len(dev_pairs), "world_size": common.world_size(),
                "budget": budgets(cfg, splits["train"], annotator, len(pairs), sft_path),
                "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
                "train_loss": result.training_loss, "steps": trainer.state.global_step,
                "resumed_from": resume_from, "seconds": round(time.time() - started, 1),
                "log_history": trainer.state.log_history})
            common.save_resolved_config(cfg, tmp, stage="05_capo")
            common.finish_adapter_dir(tmp, cfg, model_cfg)  # hub ID of the base, model card
        common.write_manifest(adapter_path, made_from)
        shutil.rmtree(work_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.training_stage_parser(__doc__)
    parser.add_argument("--pair-policy", choices=POLICIES, default=None,
                        help="same_label (default) or all (ablation); same as --capo.pair_policy")
    args, cfg = common.parse_stage_args(parser, argv)
    common.require_models(cfg)  # a missing hub model stops here, in one line
    if args.pair_policy:
        cfg["capo"]["pair_policy"] = args.pair_policy
    policy = cfg["capo"]["pair_policy"]
    if policy not in POLICIES:
        raise InputError(f"{cfg['config_path']}: capo.pair_policy '{policy}' is not one of {', '.join(POLICIES)}")
    method = METHOD_OF_POLICY[policy]

    # ---- data and pairs (every process builds them; rank 0 writes them), then the adapters to
    # train: (dataset, model, annotator) units
    data, units = {}, []
    for dataset in common.selected_datasets(cfg, args.dataset):
        common.require_data(cfg, dataset)
        task, splits = common.load_task(cfg, dataset), common.load_splits(cfg, dataset)
        data[dataset] = {"task": task, "splits": splits, "pairs": {}}
        for model_cfg in common.model_configs(cfg):
            data[dataset]["pairs"][model_cfg["tag"]] = write_pairs(cfg, dataset, task, splits, model_cfg["tag"], policy,
                                                                   write=not args.dry_run)
            units += [(dataset, model_cfg["tag"], annotator)
                      for annotator in common.select_annotators(cfg, dataset, args.annotators)]
    common.wait_for_everyone()  # the pairs files are on disk before any process hashes them
    models = {model_cfg["tag"]: model_cfg for model_cfg in common.model_configs(cfg)}

    done = []
    for dataset, tag, annotator in common.training_share(units, args.data_parallel):
        task, splits, model_cfg = data[dataset]["task"], data[dataset]["splits"], models[tag]
        name, started = f"{method} {dataset}/{tag}/{annotator}", time.time()
        pairs = data[dataset]["pairs"][tag][annotator]
        adapter_path = common.adapter_dir(cfg, dataset, tag, method, annotator)
        pred_path = common.predictions_path(cfg, dataset, tag, method, annotator)
        status = {"dataset": dataset, "model": tag, "annotator": annotator, "method": method,
                  "pairs": len(pairs), "adapter": str(adapter_path), "path": str(pred_path)}
        if not pairs:
            print(f"[{name}] no training pairs under policy {policy}: CAPO not trained, no predictions "
                  "written", flush=True)
            done.append({**status, "path": None, "parse_rate": None, "seconds": 0.0})
            continue
        # ---- the SFT adapter it starts from must be finished from the same data and config
        sft_path = common.adapter_dir(cfg, dataset, tag, "sft", annotator)
        pairs_path = common.pairs_dir(cfg, dataset, tag, policy) / f"{annotator}.jsonl"
        if args.dry_run:  # (the pairs file as it is now: a dry run writes none)
            sft_stale = common.stale_reason(sft_path, cfg)
            made_from = adapter_recipe(cfg, dataset, model_cfg, sft_path, pairs_path)
            reason = ("--force" if args.force else f"its SFT adapter is not current: {sft_stale}" if sft_stale
                      else common.why_not_current(adapter_path, made_from))
            common.say_adapter_plan(method, adapter_path, reason, pred_path, common.adapter_predictions_recipe(
                cfg, "05_capo", dataset, model_cfg, adapter_path))
            continue
        common.require_current(sft_path, cfg, common.stage_command(
            cfg, "04_sft.py", "--dataset", dataset, "--annotators", annotator))
        with common.training_processes(args.data_parallel):
            if common.is_main_process():
                for line in budget_lines(budgets(cfg, splits["train"], annotator, len(pairs), sft_path)):
                    print(f"[{name}] {line}", flush=True)

            # ---- train, unless the adapter is finished from the same pairs, SFT adapter and config
            made_from = adapter_recipe(cfg, dataset, model_cfg, sft_path, pairs_path)
            reason = "--force" if args.force else common.why_not_current(adapter_path, made_from)
            if reason:
                print(f"[{name}] training ({reason}){common.process_label()}", flush=True)
                train_adapter(cfg, args, dataset, task, splits, model_cfg, annotator, pairs, sft_path,
                              adapter_path, method, made_from)
            else:
                print(f"[{name}] adapter is current (same pairs, SFT adapter and config); not retrained",
                      flush=True)
            if not common.is_main_process():
                continue

            # ---- predict the test items, unless those predictions are current for this adapter
            pred_made_from = common.adapter_predictions_recipe(cfg, "05_capo", dataset, model_cfg, adapter_path)
            if args.force or reason or common.why_not_current(pred_path, pred_made_from):
                status.update(common.predict_with_adapter(cfg, model_cfg, task, adapter_path, splits["test"],
                                                          annotator, method, pred_path, pred_made_from))
            else:
                status["parse_rate"] = common.parse_rate(common.read_jsonl(pred_path))
            done.append({**status, "seconds": round(time.time() - started, 1)})
    done = common.gather_to_all(done)
    if common.is_main_process():
        common.print_training_summary(done)
    return done


if __name__ == "__main__":
    common.run_stage(main)
