"""05_capo.py: cross-annotator preference optimisation (CAPO): DPO from each SFT adapter.

    python 05_capo.py --config configs/cpu.yaml --dataset varierr --annotators A0
    python 05_capo.py --config configs/cpu.yaml --capo.pair_policy all    # ablation, method capo_all
    accelerate launch --num_processes 2 05_capo.py --config configs/paper.yaml   # adapters shared out

Pairs per train item and target: chosen = the target's response, rejected = another annotator's
with the same label (paraphrase: a score within capo.score_delta). DPO starts from the target's SFT
adapter, trl's frozen copy of it is the reference; dev selection keeps the step whose generations
a classifier of the annotators attributes most confidently to the target. `shared` in `adapters`:
capo_shared continues sft_shared. Writes pairs/, adapters/ and test predictions; current adapters
are kept. Our choices: docs/CHOICES.md, "CAPO".
"""
from __future__ import annotations

import itertools
import random
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

from datasets import Dataset
from peft import PeftModel
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

import common
import patches
from common import InputError

POLICIES = ("same_label", "all")
METHOD_OF_POLICY = {"same_label": "capo", "all": "capo_all"}
# What a CAPO adapter is made from, besides its pairs, its SFT adapter and 01's files: DPO, the
# selection classifier (02's settings) and decoding for selection; `models[]`: its base model.
CONFIG_SECTIONS = ("seed", "torch_threads", "data", "capo", "hlv", "embedder", "generation", "models[]")


# ---- Pairs ----
def same_label(a, b, task: dict, score_delta: float) -> bool:
    if task["label_type"] == "numeric":
        return abs(float(a) - float(b)) <= score_delta
    return a == b


def build_pairs(records: list[dict], task: dict, target: str, policy: str, score_delta: float,
                rejected_valid_only: bool = True, split: str = "train", counts: Counter | None = None) -> list[dict]:
    """CAPO pairs for `target` from the `split` records only, by item. Identical texts (whitespace
    and case aside) are skipped; with `rejected_valid_only` a response peers judged invalid is
    never rejected (our choice)."""
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
                chosen_text = common.format_response(chosen["label"], chosen["explanation"])
                rejected_text = common.format_response(other["label"], other["explanation"])
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
    """`pairs`, or `cap` of them spread over their items, in their original order: the items in a
    seeded order and, within each, its pairs; one pair per item in turn (every item's first pair,
    then every item's second, ...) until `cap`."""
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
    turns = itertools.zip_longest(*(by_item[item] for item in items))
    round_robin = [index for turn in turns for index in turn if index is not None]
    return [pairs[i] for i in sorted(round_robin[:int(cap)])]


def write_pairs(cfg: dict, dataset: str, task: dict, splits: dict, model_tag: str, policy: str,
                write: bool = True) -> dict:
    """Every annotator's train pairs under `policy` (capo.max_pairs: a seeded sample) as JSONL, and
    pairs_stats.json with the counts under both policies (unless not `write`); {annotator: pairs}."""
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
        for annotator, pairs in all_pairs.items():
            common.write_jsonl(pairs_dir / f"{annotator}.jsonl", pairs)
        common.write_json(out_dir / "pairs_stats.json", stats)
        common.save_resolved_config(cfg, out_dir, stage="05_capo")
    return all_pairs


def budgets(cfg: dict, train_records: list[dict], annotator: str | list[str], n_pairs: int, sft_adapter=None) -> dict:
    """{"capo": ..., "sft": ...}: common.training_budget of CAPO on the `n_pairs` pairs used, and
    SFT's budget as 04 logged it in the SFT adapter's train_log.json; without that log, from the
    config: min(sft.max_train_examples, the annotator's train examples), summed over annotators."""
    log_path = Path(sft_adapter) / "train_log.json" if sft_adapter else None
    sft = common.read_json(log_path).get("budget") if log_path and log_path.is_file() else None
    if not sft:
        cap = cfg["sft"]["max_train_examples"]
        targets = [annotator] if isinstance(annotator, str) else annotator
        examples = [sum(1 for record in train_records if record["annotator"] == target) for target in targets]
        sft = common.training_budget(sum(min(int(cap), n) if cap else n for n in examples), cfg["sft"])
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
                     f"pairs x {capo_b['epochs']:g} epoch(s) / global batch {capo_b['global_batch_size']}; "
                     f"SFT {sft_text}, from {sft_b['examples']} examples x {sft_b['epochs']:g} epoch(s) / global "
                     f"batch {sft_b['global_batch_size']}): CAPO vs SFT compares unequal training; see "
                     "capo.max_pairs, capo.epochs, capo.global_batch_size")
    return lines


# ---- Checkpoint selection on dev ----
class AttributionMeasure:
    """How confidently a classifier of human annotators attributes the adapter's dev generations to
    their targets (our choice of aggregation-aware selection): per target, groups of
    capo.select_group_size outputs, the mean probability of the target; then the mean over targets."""

    name = "group_target_confidence"
    greater_is_better = True

    def __init__(self, cfg: dict, dataset: str, task: dict, train: list[dict], dev_of: dict[str, list[dict]],
                 tokenizer):
        self.cfg, self.task, self.tokenizer = cfg, task, tokenizer
        self.representation = cfg["capo"]["select_representation"]
        cache_dir = common.embedding_cache_dir(cfg, dataset)  # 02's embedding cache (keyed by texts)
        X_train, _ = common.representation_vectors(cfg, train, self.representation, cache_dir)
        self.classifier = common.fit_annotator_classifier(cfg["hlv"], X_train, [r["annotator"] for r in train],
                                                          cfg["seed"])
        # Per target: its selection dev records, item content removed with the human dev responses' mean.
        self.targets = {}
        for target, dev in dev_of.items():
            _, means = common.representation_vectors(cfg, dev, self.representation, cache_dir)
            self.targets[target] = (common.annotator_requests(dev, task, target), means)

    def __call__(self, model, trainer=None) -> dict:
        section, scores = self.cfg["capo"], []
        requests = [request for requests, _ in self.targets.values() for request in requests]  # one call for all
        generated = common.generate_predictions(model, self.tokenizer, requests, self.task, self.cfg["generation"],
                                                method="capo", model_tag="", seed=self.cfg["seed"],
                                                desc="dev selection")
        for target, (_, means) in self.targets.items():
            predictions = [p for p in generated if p["annotator"] == target]
            stand_ins = [{"item_id": p["item_id"], "label": p["label"],  # unparsed: the raw text stands in
                          "explanation": p["explanation"] if p["parse_ok"] else p["output"]} for p in predictions]
            X, _ = common.representation_vectors(self.cfg, stand_ins, self.representation, means=means)
            result = common.group_target_confidence(self.classifier, X, target, section["select_group_size"],
                                                    section["select_groups"], self.cfg["seed"])
            scores.append((result, common.parse_rate(predictions)))
        return {"score": mean_or_none([r["mean_prob"] for r, _ in scores]),
                "group_accuracy": mean_or_none([r["accuracy"] for r, _ in scores]),
                "group_size": min(r["group_size"] for r, _ in scores),
                "dev_parse_rate": mean_or_none([p for _, p in scores])}


def mean_or_none(values: list) -> float | None:
    return None if not values or None in values else sum(values) / len(values)


class DevLossMeasure:
    """Fallback: DPO loss on dev pairs (lower is better)."""

    name = "dev_dpo_loss"
    greater_is_better = False

    def __call__(self, model, trainer=None) -> dict:
        metrics = trainer.evaluate()
        return {"score": metrics["eval_loss"], "dev_reward_accuracy": metrics.get("eval_rewards/accuracies")}


def selection_dev_records(cfg: dict, dataset: str, dev_records: list[dict], annotator: str) -> tuple[list[dict], int]:
    """(the dev records selection uses for `annotator`, how many dev items it has): a seeded sample
    of at most capo.select_max_dev_items of its dev items (seeded by data.split_seed and the dataset
    only), with every annotator's records on them (their mean takes item content out)."""
    items = sorted({record["item_id"] for record in dev_records if record["annotator"] == annotator})
    keep = set(common.seeded_sample(items, cfg["capo"]["select_max_dev_items"],
                                    f"{cfg['data']['split_seed']}/{dataset}/dev/capo_selection"))
    return [record for record in dev_records if record["item_id"] in keep], len(items)


def selection_plan(cfg: dict, splits: dict, annotator: str | list[str],
                   dev_pairs: list[dict]) -> tuple[str | None, str, list[str]]:
    """(AttributionMeasure.name, DevLossMeasure.name or None; why; the targets the attribution
    scores) for the targets' dev records: the attribution needs two annotators and a target with
    capo.select_min_dev_items dev items (a shared adapter's: the targets that have them)."""
    section = cfg["capo"]
    targets = [annotator] if isinstance(annotator, str) else annotator
    dev_items = {t: len({r["item_id"] for r in splits["dev"] if r["annotator"] == t}) for t in targets}
    enough = [t for t in targets if dev_items[t] >= int(section["select_min_dev_items"])]
    if len({r["annotator"] for r in splits["train"]}) < 2:
        why = "fewer than two annotators to train a classifier on"
    elif not enough:
        why = f"{max(dev_items.values())} dev items (< capo.select_min_dev_items {section['select_min_dev_items']})"
    else:
        share = f" for {len(enough)} of {len(targets)} targets" if len(enough) < len(targets) else ""
        return AttributionMeasure.name, (f"{min(dev_items[t] for t in enough)} dev items (>= "
                                         f"capo.select_min_dev_items {section['select_min_dev_items']}){share}"), enough
    if dev_pairs:
        return DevLossMeasure.name, why + f"; falling back to DPO loss on {len(dev_pairs)} dev pairs", []
    return None, why + "; no dev pairs either: the last step is kept", []


class DevSelection(TrainerCallback):
    """Scores the adapter every `every` steps and at the end; keeps the best one in `best_dir`."""

    def __init__(self, measure, every: int, work_dir, name: str, trainer):
        self.measure, self.every, self.name = measure, max(1, int(every)), name
        self.trainer = trainer  # the dev-loss measure evaluates with it
        self.best_dir, self.log_path = work_dir / "best", work_dir / "selection_progress.json"
        saved = common.read_json(self.log_path) if self.log_path.exists() else {}
        self.history = {int(step): row for step, row in saved.get("history", {}).items()}

    def best(self) -> dict | None:
        candidates = [row for step, row in self.history.items() if step > 0 and row["score"] is not None]
        if not candidates:
            return None
        pick = max if self.measure.greater_is_better else min
        return pick(candidates, key=lambda row: row["score"])

    def evaluate(self, model, step: int, epoch: float | None) -> None:
        row = None
        if isinstance(self.measure, DevLossMeasure) or common.is_main_process():  # evaluate() needs every rank
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
        self.trainer.accelerator.wait_for_everyone()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if 0 not in self.history:
            self.evaluate(model, 0, 0.0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step >= state.max_steps:
            self.evaluate(model, state.global_step, state.epoch)


# ---- Training ----
def dpo_config(cfg: dict, output_dir, **changes) -> DPOConfig:
    """trl's DPOConfig from the `capo:` section (changes: benchmark variants), `capo.trainer` on top."""
    section = cfg["capo"]
    settings = dict(
        common.trainer_args(cfg, "capo"),
        output_dir=str(output_dir),
        max_length=int(section["max_length"]),
        beta=float(section["beta"]),
        loss_type=["sigmoid"],
        precompute_ref_log_probs=bool(section["precompute_ref_log_probs"]),
        eval_strategy="no",  # dev evaluation happens in DevSelection, on the same steps as checkpoints
        save_strategy="steps",
        save_steps=int(section["eval_every_steps"]),  # --resume continues from a selection step
    )
    settings.update(changes)
    return common.trainer_config(DPOConfig, cfg, "capo", settings)


def pairs_dataset(pairs: list[dict], folder, args: DPOConfig) -> Dataset:
    """The pairs as a Dataset saved under `folder` (once, by rank 0) and memory-mapped by every rank:
    trl's precompute_ref_log_probs writes the reference log-probs into the dataset's cache folder
    on rank 0 and every rank opens that file, so it must be a folder all share (an in-memory
    Dataset's is a per-process temp dir; compare trl issue #6291), and --resume finds it again."""
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
             "chat_template_kwargs": dict(common.CHAT_TEMPLATE_KWARGS)} for p in pairs]
    path = Path(folder) / f"pairs-{common.config_hash(rows)}"
    with args.main_process_first(local=False, desc="saving the pairs dataset"):
        if args.process_index == 0 and not (path / "state.json").is_file():
            with common.atomic_dir(path) as tmp:
                Dataset.from_list(rows).save_to_disk(str(tmp))
    return Dataset.load_from_disk(str(path))


def build_trainer(cfg: dict, model_cfg: dict, sft_path, train_pairs: list[dict], dev_pairs: list[dict],
                  output_dir, **config_changes):
    """DPOTrainer whose policy is the SFT adapter (trainable) and whose reference is trl's frozen copy."""
    patches.lm_head_on_labelled_positions_only()
    common.set_seed(int(cfg["seed"]))
    base, tokenizer = common.load_model_and_tokenizer(model_cfg)
    patches.fingerprint_tokenizer_without_copies(tokenizer)
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


def adapter_recipe(cfg: dict, unit: dict) -> dict:
    """What a CAPO adapter depends on: its pairs, its SFT adapter, 01's files (dev selection), the config."""
    inputs = [*unit["pairs_paths"], unit["upstream"][0], *common.data_files(cfg, unit["dataset"])]
    return common.adapter_recipe(cfg, "05_capo", unit, inputs, CONFIG_SECTIONS)


def train_adapter(cfg: dict, args, unit: dict, adapter, made_from: dict) -> None:
    section, label, sft_path, pairs = cfg["capo"], common.unit_label(unit), unit["upstream"][0], unit["pairs"]
    # Selection works on its own seeded sample of dev items (capo.select_max_dev_items), not on 03-06's.
    dev_all = common.load_split(cfg, unit["dataset"], "dev")
    dev_records = {t: selection_dev_records(cfg, unit["dataset"], dev_all, t) for t in unit["targets"]}
    dev_items = {t: sorted({r["item_id"] for r in records if r["annotator"] == t})
                 for t, (records, _) in dev_records.items()}
    # The plan counts each target's own sampled dev items (a shared adapter's samples overlap).
    splits = {**unit["splits"], "dev": [r for t, (records, _) in dev_records.items() for r in records
                                        if r["annotator"] == t]}
    dev_pairs = [pair for t, (records, _) in dev_records.items() for pair in build_pairs(
        records, unit["task"], t, section["pair_policy"], section["score_delta"], section["rejected_valid_only"],
        split="dev")]
    work_dir = common.training_work_dir(cfg, unit["dataset"], unit["model"]["tag"], unit["method"], unit["name"])
    resume_from = common.checkpoint_to_resume(work_dir, args.resume, label, made_from)
    work_dir.mkdir(parents=True, exist_ok=True)

    plan, why, scored = selection_plan(cfg, splits, unit["targets"], dev_pairs)
    trainer, tokenizer = build_trainer(cfg, unit["model"], sft_path, pairs,
                                       dev_pairs if plan == DevLossMeasure.name else [], work_dir)
    measure = selection = None
    if plan == AttributionMeasure.name:
        measure = AttributionMeasure(cfg, unit["dataset"], unit["task"], unit["splits"]["train"],
                                     {t: dev_records[t][0] for t in scored}, tokenizer)
    elif plan == DevLossMeasure.name:
        measure = DevLossMeasure()
    if measure:
        selection = DevSelection(measure, section["eval_every_steps"], work_dir, label, trainer)
        trainer.add_callback(selection)
    available = sum(n for _, n in dev_records.values())
    print(f"[{label}] {len(pairs)} train pairs ({section['pair_policy']}), {len(dev_pairs)} dev pairs; policy = "
          f"SFT adapter {sft_path} (trainable), reference = trl's frozen copy 'ref' of it on the same base model; "
          f"selection: {measure.name if measure else 'none'} ({why}) on {sum(map(len, dev_items.values()))} of the "
          f"targets' {available} dev items (capo.select_max_dev_items {section['select_max_dev_items']}), "
          f"every {section['eval_every_steps']} steps", flush=True)

    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    best = selection.best() if selection else None
    one = unit["name"] is not None  # a per-annotator adapter keeps its selection.json's one-target form
    choice = {"measure": measure.name if measure else None, "why": why,
              "dev_items": dev_items[unit["name"]] if one else dev_items,
              "dev_items_available": dev_records[unit["name"]][1] if one else available,
              "select_max_dev_items": section["select_max_dev_items"],
              "greater_is_better": measure.greater_is_better if measure else None,
              "chosen_step": best["step"] if best else trainer.state.global_step,
              "chosen": best, "final_step": trainer.state.global_step,
              "history": [selection.history[s] for s in sorted(selection.history)] if selection else []}

    def write(folder):
        if best:
            for path in (work_dir / "best").iterdir():
                shutil.copy2(path, folder / path.name)
        else:
            trainer.model.save_pretrained(folder, selected_adapters=["default"])
        common.write_json(folder / "selection.json", choice)
        common.write_json(folder / "train_log.json", {
            "dataset": unit["dataset"], "model": unit["model"]["tag"], "annotator": unit["name"],
            "annotators": unit["targets"], "method": unit["method"], "sft_adapter": str(sft_path),
            "reference": "frozen copy of the SFT adapter ('ref')", "train_pairs": len(pairs),
            "dev_pairs": len(dev_pairs), "world_size": common.world_size(),
            "budget": budgets(cfg, unit["splits"]["train"], unit["targets"], len(pairs), sft_path),
            "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
            "train_loss": result.training_loss, "steps": trainer.state.global_step, "resumed_from": resume_from,
            "seconds": round(time.time() - started, 1), "log_history": trainer.state.log_history})

    if trainer.accelerator.is_main_process:
        print(f"[{label}] chosen step {choice['chosen_step']} of {choice['final_step']} "
              f"({choice['measure'] or 'last step'})", flush=True)
    common.save_adapter(cfg, unit, adapter, made_from, work_dir, write)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.training_stage_parser(__doc__)
    args, cfg = common.parse_stage_args(parser, argv)
    common.require_models(cfg)  # a missing hub model stops here, in one line
    policy = cfg["capo"]["pair_policy"]
    if policy not in POLICIES:
        raise InputError(f"{cfg['config_path']}: capo.pair_policy '{policy}' is not one of {', '.join(POLICIES)}")

    # ---- data and pairs (every process builds them; rank 0 writes them), then the adapters
    units = []
    for dataset in common.selected_datasets(cfg, args.dataset):
        common.require_data(cfg, dataset)
        data = {"task": common.load_task(cfg, dataset), "splits": common.load_splits(cfg, dataset)}
        pairs = {model_cfg["tag"]: write_pairs(cfg, dataset, data["task"], data["splits"], model_cfg["tag"], policy,
                                               write=not args.dry_run) for model_cfg in common.model_configs(cfg)}
        for unit in common.adapter_units(cfg, dataset, data, METHOD_OF_POLICY[policy], args.annotators):
            tag = unit["model"]["tag"]
            unit["pairs"] = [pair for target in unit["targets"] for pair in pairs[tag][target]]
            unit["pairs_paths"] = [common.pairs_dir(cfg, dataset, tag, policy) / f"{t}.jsonl" for t in unit["targets"]]
            sft_method = "sft_shared" if unit["name"] is None else "sft"
            sft_path = common.adapter_dir(cfg, dataset, tag, sft_method, unit["name"])
            redo = common.stage_command(cfg, "04_sft.py", "--dataset", dataset,
                                        *(["--annotators", unit["name"]] if unit["name"] else []))
            unit.update(upstream=(sft_path, redo), summary={"pairs": len(unit["pairs"])}, announce=budget_lines(
                budgets(cfg, data["splits"]["train"], unit["targets"], len(unit["pairs"]), sft_path)))
            if not unit["pairs"]:
                unit["skip"] = f"no training pairs under policy {policy}: CAPO not trained, no predictions written"
            units.append(unit)
    common.wait_for_everyone()  # the pairs files are on disk before any process hashes them
    return common.train_adapters(cfg, args, "05_capo", units, lambda unit: adapter_recipe(cfg, unit),
                                 lambda unit, adapter, made_from: train_adapter(cfg, args, unit, adapter, made_from))


if __name__ == "__main__":
    common.run_stage(main)
