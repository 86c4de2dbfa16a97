"""01_prepare.py: raw annotations -> normalised, item-split JSONL.

    python 01_prepare.py --config configs/cpu.yaml --dataset all          # varierr + par
    python 01_prepare.py --config configs/cpu.yaml --dataset varierr --raw-dir /path/to/raw
    python 01_prepare.py --config configs/cpu.yaml --custom my.csv --name mine --label-type categorical
    python 01_prepare.py --config configs/cpu.yaml --split lewidi        # the LeWiDi-2025 split, in runs/cpu/lewidi/

Reads the raw files (downloaded when missing) or your own, checks them (bad input stops with one
line; --skip-invalid drops and counts it), splits the items and writes
runs/<profile>/data/<dataset>/{train,dev,test}.jsonl, stats.json and config.resolved.yaml.
Details: README, "Raw data" and "Your own annotations"; our choices: docs/CHOICES.md, "Data".
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import common
from common import InputError, input_error, normalize_text

SPLITS = ("train", "dev", "test")
LEWIDI_URL = "https://raw.githubusercontent.com/Le-Wi-Di/le-wi-di.github.io/main/LeWiDi_3-2025"
RAW_SOURCES = {"varierr.json": "https://raw.githubusercontent.com/mainlp/VariErr-NLI/main/varierr.json",
               **{f"{prefix}_{split}.json": f"{LEWIDI_URL}/{prefix}/{prefix}_{split}.json"
                  for prefix in ("Paraphrase", "VariErrNLI") for split in SPLITS}}
# The public releases (items per file, sha256 as published); another file stops unless --accept-modified-raw.
KNOWN_RELEASES = {name: {"items": items, "sha256": sha256} for name, items, sha256 in (
    ("varierr.json", 500, "c8f9a634a69d72a6c390047ac242562b80a8caac08db19714db3f98bd40e13ea"),
    ("Paraphrase_train.json", 400, "2ec98bad361732dbb568e4acea339edbbd747299fbd716e99812e4f14042bc53"),
    ("Paraphrase_dev.json", 50, "821f8b142d63c9ccc38cb801fa6ca4cdcfe5049c8bfb151c7d7d3dd025db8e03"),
    ("Paraphrase_test.json", 50, "5c2396b91ae84edcf64b1b529b8ade83b1fa3a78b4b930cbcf613b917875ae1d"),
    ("VariErrNLI_train.json", 388, "466a507dec72eb118d528e52aa5a905cb23a4e5acaf7af02062938ea958d1a0d"),
    ("VariErrNLI_dev.json", 50, "6d1b5ca80ee4eb79c608de828b386f524cacddc608d0396464c71d728b369efd"),
    ("VariErrNLI_test.json", 50, "872fa56f32a999fd46954cae144528ea7445186cf35ca473fabf6d3eeb43340a"),
)}
# data.split lewidi: the shared task's own train/dev/test files (LeWiDi-2025), per dataset.
LEWIDI_FILE_PREFIX = {"varierr": "VariErrNLI", "par": "Paraphrase"}
LEWIDI_TEXT_FIELDS = {"varierr": ("context", "statement"), "par": ("Question1", "Question2")}
# --custom: the columns of your own annotations, and the options a dataset is prepared with.
CUSTOM_COLUMNS = ("item_id", "text_a", "text_b", "annotator", "label", "explanation")
CUSTOM_OPTIONS = ("custom", "label_type", "labels", "score_range", "instruction")


class Collector:
    """Records, item texts and what was dropped and why. Without --skip-invalid, bad input stops the stage."""

    def __init__(self, skip_invalid: bool):
        self.skip_invalid = skip_invalid
        self.records: list[dict] = []
        self.items: dict[str, tuple[str, str]] = {}  # item_id -> (text_a, text_b), normalised
        self.dropped: Counter = Counter()
        self.modified_raw: list[dict] = []  # raw files accepted with --accept-modified-raw
        self.lewidi_items: dict[str, dict] = {}  # item_id -> {"id", "split", "annotators"} as published

    def bad(self, error: InputError, reason: str) -> None:
        if not self.skip_invalid:
            raise error
        self.dropped[reason] += 1

    def drop(self, records: list[dict], reason: str, unwanted) -> list[dict]:
        """`records` without those where unwanted(record), counted under `reason`."""
        kept = [r for r in records if not unwanted(r)]
        self.dropped[reason] += len(records) - len(kept)
        return kept

    def add(self, item_id: str, annotator: str, label, explanation: str, valid: bool | None = None) -> None:
        """One record; its texts are the item's (self.items)."""
        self.records.append({"item_id": item_id, "annotator": annotator, "label": label,
                             "explanation": explanation, "valid": valid})


def unsafe_id(path: Path, annotator: str, **where) -> InputError | None:
    """The error for an annotator ID that cannot name a file (later stages' files), else None."""
    if common.SAFE_NAME.fullmatch(annotator):
        return None
    return input_error(path, f"annotator ID {annotator!r} is not path-safe ({common.SAFE_NAME_RULE})", **where)


# ---- Files ----
def find_raw_file(raw_dir: Path, name: str, download: bool = True) -> Path:
    """raw_dir/name or raw_dir/*/name, else downloaded there (without `download`: the path it would have)."""
    for path in [raw_dir / name, *sorted(raw_dir.glob(f"*/{name}"))] if raw_dir.exists() else []:
        if path.is_file():
            return path
    url, target = RAW_SOURCES[name], raw_dir / name
    if not download:
        return target
    print(f"[prepare] {name} not in {raw_dir}; downloading {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as err:
        raise InputError(f"raw file {name} is missing from {raw_dir} and could not be downloaded "
                         f"({getattr(err, 'reason', err)}). Get it from {url} and put it in {raw_dir}/ "
                         "(or pass --raw-dir / set CAPO_RAW_DIR).") from None
    with common.atomic_path(target) as tmp:
        tmp.write_bytes(payload)
    return target


def checked_text(path: Path, encoding: str = "utf-8") -> str:
    """The file's text; a folder, an empty file or bytes that are not UTF-8 stop with one line."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file")
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        raise input_error(path, f"not UTF-8: byte {data[err.start]:#04x} at offset {err.start} cannot be "
                                "decoded (save the file as UTF-8)", line=data.count(b"\n", 0, err.start) + 1) from None
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    return text


def iter_rows(path: Path):
    """(line number, row dict) of a JSONL or CSV file (UTF-8, a CSV may start with a BOM; checked first)."""
    if path.suffix.lower() != ".csv":
        checked_text(path)
        yield from common.iter_jsonl(path)
        return
    checked_text(path, encoding="utf-8-sig")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            missing = [c for c in CUSTOM_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise input_error(path, "missing column", line=1, field=missing[0])
            for row in reader:
                yield reader.line_num, row
        except csv.Error as err:
            raise input_error(path, f"malformed CSV ({err})", line=reader.line_num) from None


def check_release(path: Path, items_found: int, known: dict, accept_modified: bool) -> dict | None:
    """None if path is the known release ({"items", "sha256"}); else stop, or with accept_modified its note."""
    found_sha = common.file_sha256(path)
    if found_sha == known["sha256"] and items_found == known["items"]:
        return None
    if not accept_modified:
        raise InputError(f"{path}: not the known release of {path.name}: expected {known['items']} items "
                         f"(sha256 {known['sha256'][:12]}...), found {items_found} items "
                         f"(sha256 {found_sha[:12]}...); "
                         "pass --accept-modified-raw to use it anyway (recorded in stats.json)")
    print(f"[prepare] warning: {path} is not the known release ({items_found} items, expected "
          f"{known['items']}); used because of --accept-modified-raw", flush=True)
    return {"file": path.name, "expected_items": known["items"], "found_items": items_found,
            "expected_sha256": known["sha256"], "found_sha256": found_sha}


# ---- Readers of the built-in sources: each fills a Collector and returns {file: item count} ----
def read_varierr(name: str, sources: dict[str, Path], out: Collector) -> dict[Path, int]:
    """VariErr JSONL: one item a line, label lists of {annotator, reason, judgments}."""
    path = sources["varierr"]
    for lineno, item in iter_rows(path):
        for field in ("id", "context", "statement", *common.NLI_LABELS):
            if field not in item:
                raise input_error(path, "missing field", line=lineno, field=field)
        item_id = str(item["id"])
        for field in ("context", "statement"):
            if not isinstance(item[field], str):
                raise input_error(path, f"expected a string, got {item[field]!r}", line=lineno, field=field)
        for field in common.NLI_LABELS:
            if not isinstance(item[field], list) or not all(isinstance(e, dict) for e in item[field]):
                raise input_error(path, "expected a list of {annotator, reason, judgments} objects",
                                  line=lineno, field=field)
        if item_id in out.items:
            raise input_error(path, "item id appears twice", line=lineno, item=item_id, field="id")
        out.dropped["idk mark (no label)"] += len(item.get("idk") or [])
        out.items[item_id] = (normalize_text(item["context"]), normalize_text(item["statement"]))
        for label in common.NLI_LABELS:
            for entry in item[label]:
                read_varierr_entry(path, lineno, item_id, label, entry, out)
    return {path: len(out.items)}


def read_varierr_entry(path, lineno, item_id, label, entry, out: Collector) -> None:
    """One annotator's label; `valid` is a strict majority of the other annotators' makes_sense."""
    where = dict(line=lineno, item=item_id)
    for field in ("annotator", "reason"):
        if field not in entry:
            return out.bad(input_error(path, "missing field", field=f"{label}[].{field}", **where),
                           f"missing field {field}")
    annotator = entry["annotator"]
    if isinstance(annotator, bool) or not isinstance(annotator, int) or annotator < 0:
        return out.bad(input_error(path, f"annotator must be a non-negative integer, got {annotator!r}",
                                   field=f"{label}[].annotator", **where), "bad annotator")
    if not isinstance(entry["reason"], (str, type(None))):
        return out.bad(input_error(path, f"explanation must be a string, got {entry['reason']!r}",
                                   field=f"{label}[].reason", **where), "explanation not a string")
    explanation = normalize_text(entry["reason"] or "")
    if not explanation:
        return out.bad(input_error(path, "empty explanation", field=f"{label}[].reason", **where), "empty explanation")
    judgments = entry.get("judgments") or []
    if not isinstance(judgments, list) or not all(isinstance(j, dict) for j in judgments):
        raise input_error(path, "expected a list of {annotator, makes_sense} objects",
                          field=f"{label}[].judgments", **where)
    peers = [j.get("makes_sense") for j in judgments
             if j.get("annotator") != annotator and j.get("makes_sense") is not None]
    valid = None if not peers else sum(bool(p) for p in peers) * 2 > len(peers)
    out.add(item_id, f"A{annotator}", label, explanation, valid)


def keyed_items(path: Path) -> list[tuple[str, Any, dict]]:
    """(item id, item, where: the item's line for error messages) of a JSON object keyed by item id."""
    text = checked_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise input_error(path, f"malformed JSON ({err.msg})", line=err.lineno) from None
    if not isinstance(data, dict):
        raise input_error(path, "expected a JSON object keyed by item id")

    def line_of(item_id: str) -> int | None:
        pos = text.find(f'"{item_id}"')
        return None if pos < 0 else text.count("\n", 0, pos) + 1
    return [(item_id, item, dict(line=line_of(item_id), item=item_id)) for item_id, item in data.items()]


def keyed_item_fields(path: Path, item, where: dict, text_fields: tuple[str, str], listed: str):
    """(texts, annotators, annotations, explanations) of one LeWiDi-format item, checked; the i-th
    explanation belongs to the i-th entry of `annotators`."""
    field_a, field_b = text_fields
    try:
        text_a, text_b = item["text"][field_a], item["text"][field_b]
        annotators = [a.strip() for a in item["annotators"].split(",") if a.strip()]
        annotations, explanations = item["annotations"], item["other_info"]["explanations"]
    except (KeyError, TypeError, AttributeError) as err:
        raise input_error(path, "missing field", field=str(err).strip("'\""), **where) from None
    for field, value, kind in ((f"text.{field_a}", text_a, str), (f"text.{field_b}", text_b, str),
                               ("annotations", annotations, dict), ("other_info.explanations", explanations, list)):
        if not isinstance(value, kind):
            raise input_error(path, f"expected a {kind.__name__}, got {value!r}", field=field, **where)
    if len(explanations) != len(annotators):
        raise input_error(path, f"{len(explanations)} explanations for {len(annotators)} {listed}",
                          field="other_info.explanations", **where)
    return (normalize_text(text_a), normalize_text(text_b)), annotators, annotations, explanations


def add_explained(out: Collector, path: Path, where: dict, item_id: str, annotator: str, label, raw) -> None:
    """A record of the LeWiDi-format files (no peer judgments: valid is null); an empty explanation is bad input."""
    explanation = normalize_text(raw if isinstance(raw, str) else "")
    if not explanation:
        return out.bad(input_error(path, f"empty explanation for {annotator}", field="other_info.explanations",
                                   **where), "empty explanation")
    out.add(item_id, annotator, label, explanation)


def read_paraphrase(name: str, sources: dict[str, Path], out: Collector) -> dict[Path, int]:
    """LeWiDi-2025 Par files for the kit's own split: one score in -5..5 per listed annotator."""
    task = common.BUILTIN_TASKS[name]
    counts = {}
    for path in sources.values():
        items = keyed_items(path)
        counts[path] = len(items)
        for item_id, item, where in items:
            if item_id in out.items:
                raise input_error(path, "item id appears twice (across the paraphrase files)", **where)
            texts, annotators, scores, explanations = keyed_item_fields(
                path, item, where, LEWIDI_TEXT_FIELDS[name], "annotators")
            out.items[item_id] = texts
            for annotator, explanation in zip(annotators, explanations):
                field = f"annotations.{annotator}"
                if error := unsafe_id(path, annotator, field="annotators", **where):
                    out.bad(error, "annotator ID not path-safe")
                elif annotator not in scores:
                    out.bad(input_error(path, "no score for listed annotator", field=field, **where), "missing score")
                elif (score := common.normalize_label(scores[annotator], task)) is None:
                    out.bad(input_error(path, f"score {scores[annotator]!r} is not an integer in -5..5", field=field,
                                        **where), "score out of range")
                else:
                    add_explained(out, path, where, item_id, annotator, score, explanation)
    return counts


def read_lewidi(name: str, sources: dict[str, Path], out: Collector) -> dict[Path, int]:
    """The LeWiDi-2025 files as published, with their split. Items are keyed by split and ID (VariErrNLI's
    IDs name the premise, not the item); an annotator listed k times in `annotators` gives k labels
    ("entailment,neutral"), the k-th entry's explanation going with the k-th label."""
    task = common.BUILTIN_TASKS[name]
    counts = {}
    for split, path in sources.items():
        items = keyed_items(path)
        counts[path] = len(items)
        for source_id, item, where in items:
            item_id = f"{split}-{source_id}"
            texts, annotators, annotations, explanations = keyed_item_fields(
                path, item, where, LEWIDI_TEXT_FIELDS[name], "entries in `annotators`")
            out.items[item_id] = texts
            out.lewidi_items[item_id] = {"id": source_id, "split": split, "annotators": list(annotations)}
            seen: Counter = Counter()  # how many of an annotator's entries were read so far
            for annotator, explanation in zip(annotators, explanations):
                field = f"annotations.{annotator}"
                if error := unsafe_id(path, annotator, field="annotators", **where):
                    raise error
                if annotator not in annotations:
                    raise input_error(path, "no annotation for listed annotator", field=field, **where)
                raw = annotations[annotator]
                labels = raw.split(",") if task["label_type"] == "categorical" and isinstance(raw, str) else [raw]
                if annotators.count(annotator) != len(labels):
                    raise input_error(path, f"{annotator} is listed {annotators.count(annotator)} times in "
                                      f"`annotators` but has {len(labels)} labels", field=field, **where)
                raw_label = labels[seen[annotator]]
                seen[annotator] += 1
                if (label := common.normalize_label(raw_label, task)) is None:
                    out.bad(input_error(path, f"{raw_label!r} is not a label of the task ({common.label_space(task)})",
                                        field=field, **where), "label not of the task")
                else:
                    add_explained(out, path, where, item_id, annotator, label, explanation)
    return counts


# ---- Your own annotations (--custom) ----
def categorical_value(value):
    """A JSON integer label is its string for a categorical task (JSON 0 -> "0", as a CSV gives it)."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def read_custom(path: Path, task: dict, out: Collector) -> None:
    """Your own annotations. Numeric: one score per annotator and item (two different ones are bad
    input, and all of them go); categorical: several labels are kept, as VariErr has them."""
    numeric = task["label_type"] == "numeric"
    first_score: dict[tuple[str, str], tuple[int, int]] = {}  # (item, annotator) -> (line, score)
    conflicting: set[tuple[str, str]] = set()
    n_rows = 0
    for lineno, row in iter_rows(path):
        n_rows += 1
        # Label and explanation may be present but empty: those get their own messages below.
        field = next((c for c in CUSTOM_COLUMNS if row.get(c) is None
                      or (c not in ("label", "explanation") and not str(row[c]).strip())), None)
        if field:
            out.bad(input_error(path, "missing field", line=lineno, field=field), f"missing field {field}")
            continue
        item_id, annotator = str(row["item_id"]).strip(), str(row["annotator"]).strip()
        if error := unsafe_id(path, annotator, line=lineno, field="annotator"):
            out.bad(error, "annotator ID not path-safe")
            continue
        label = common.normalize_label(row["label"] if numeric else categorical_value(row["label"]), task)
        if label is None:
            out.bad(input_error(path, f"unknown label {row['label']!r} (expected {common.label_space(task)})",
                                line=lineno, field="label"), "unknown label")
            continue
        explanation = normalize_text(str(row["explanation"] or ""))
        if not explanation:
            out.bad(input_error(path, "empty explanation", line=lineno, field="explanation"), "empty explanation")
            continue
        texts = (normalize_text(str(row["text_a"])), normalize_text(str(row["text_b"])))
        if out.items.setdefault(item_id, texts) != texts:
            raise input_error(path, f"item {item_id} has different texts on different lines",
                              line=lineno, field="text_a")
        if numeric:
            first_line, first = first_score.setdefault((item_id, annotator), (lineno, label))
            if first != label:
                conflicting.add((item_id, annotator))
                out.bad(input_error(path, f"annotator {annotator} gave this item two different scores: "
                                          f"{first} (line {first_line}) and {label} (line {lineno})",
                                    line=lineno, item=item_id, field="label"),
                        "two different scores from one annotator for one item")
                continue
        valid = row.get("valid")
        valid = None if valid in (None, "") else str(valid).strip().lower() in ("1", "true", "yes")
        out.add(item_id, annotator, label, explanation, valid)
    if not n_rows:
        raise InputError(f"{path}: no annotation rows (only a header?)")
    if conflicting:  # the first score of a conflicting pair is no more trustworthy than the second
        out.records = out.drop(out.records, "two different scores from one annotator for one item",
                               lambda r: (r["item_id"], r["annotator"]) in conflicting)


def custom_task(path: Path, options: dict) -> dict:
    """Task description for a custom set; labels / score range are read from the file if not given."""
    labels, score_range = options["labels"], options["score_range"]
    if options["label_type"] == "categorical":
        if labels:
            found = [s.strip() for s in labels.split(",") if s.strip()]
            distinct = {label.lower() for label in found}
            if len(distinct) < 2 or len(distinct) < len(found):
                raise InputError(f"--labels {labels!r}: give at least two different labels, each once "
                                 "(labels compare case-insensitively)")
        else:
            values = (categorical_value(row.get("label")) for _, row in iter_rows(path))
            found = sorted({v.strip().lower() for v in values if isinstance(v, str) and v.strip()})
            if not found:
                raise InputError(f"{path}: no label found in the 'label' column")
        task = {"label_type": "categorical", "labels": found}
        default_instruction = (f"Decide which label ({', '.join(found)}) fits the pair of texts, "
                               "and explain why in one or two sentences.")
    else:
        if score_range:
            match = re.fullmatch(r"\s*([+-]?\d+)\s*,\s*([+-]?\d+)\s*", score_range)
            if not match:
                raise InputError(f"--score-range {score_range!r}: expected LOW,HIGH (two integers, e.g. -5,5)")
            low, high = int(match[1]), int(match[2])
            if low >= high:
                raise InputError(f"--score-range {score_range!r}: LOW must be below HIGH (e.g. {high},{low})")
        else:
            values = []
            for lineno, row in iter_rows(path):
                try:
                    values.append(int(str(row.get("label")).strip()))
                except ValueError:
                    raise input_error(path, f"label {row.get('label')!r} is not an integer",
                                      line=lineno, field="label") from None
            low, high = min(values), max(values)
        task = {"label_type": "numeric", "score_range": [low, high]}
        default_instruction = f"Rate the pair of texts from {low} to {high}, and explain why in one or two sentences."
    task.update(text_a_name="Text A", text_b_name="Text B", instruction=options["instruction"] or default_instruction)
    return task


def custom_options_of(cfg: dict, name: str) -> dict:
    """The --custom options `name` was prepared with (from its manifest), to re-read the same file."""
    manifest = common.manifest_path(common.data_dir(cfg, name))
    options = (common.read_json(manifest) if manifest.is_file() else {}).get("made_from", {}).get("options", {})
    if not options.get("custom"):
        raise InputError(f"unknown dataset '{name}': built-in ones are varierr and par, and no custom dataset of "
                         f"that name was prepared in {common.run_dir(cfg)} (prepare it with --custom FILE --name "
                         f"{name} --label-type categorical|numeric)")
    return options


def check_custom_args(args, lewidi: bool) -> None:
    """Argument combinations for --custom; a flag that would be silently ignored stops too."""
    if not args.custom:
        for key in ("name", *CUSTOM_OPTIONS[1:]):
            if getattr(args, key) is not None:
                raise InputError(f"--{key.replace('_', '-')} is only used with --custom FILE")
        return
    for wrong, message in (
            (args.accept_modified_raw, "--accept-modified-raw is for the built-in raw files, not --custom"),
            (not args.name, "--custom needs --name NAME (the dataset name later stages use)"),
            (not common.SAFE_NAME.fullmatch(args.name or "") or args.name in common.BUILTIN_DATASETS,
             f"--name {args.name!r} is not allowed: use {common.SAFE_NAME_RULE}; "
             f"not {' or '.join(common.BUILTIN_DATASETS)}"),
            (not args.label_type, "--custom needs --label-type categorical|numeric"),
            (args.labels is not None and args.label_type != "categorical",
             "--labels is for --label-type categorical (numeric: --score-range LOW,HIGH)"),
            (args.score_range is not None and args.label_type != "numeric",
             "--score-range is for --label-type numeric (categorical: --labels a,b,c)"),
            (lewidi, "--custom is not for data.split lewidi (which reads the LeWiDi-2025 files)")):
        if wrong:
            raise InputError(message)


# ---- Splitting, checks, writing ----
def split_items(out: Collector, data_cfg: dict) -> dict[str, list[str]]:
    """Item IDs per split: the source's (lewidi) or re-drawn by data.split_items; data.max_items: a seeded subset."""
    seed, max_items = data_cfg["split_seed"], data_cfg["max_items"]  # never the training seed
    if out.lewidi_items:  # the source's own split
        splits = {s: sorted(i for i, item in out.lewidi_items.items() if item["split"] == s) for s in SPLITS}
        total = len(out.lewidi_items)
        if max_items and max_items < total:  # each split in proportion
            splits = {s: sorted(common.seeded_sample(ids, max(1, round(max_items * len(ids) / total)), f"{seed}/{s}"))
                      for s, ids in splits.items()}
        return splits
    order = sorted(out.items)
    random.Random(seed).shuffle(order)
    if max_items:
        order = order[:max_items]
    sizes, total = data_cfg["split_items"], len(order)
    n_train, n_dev = sizes[:2] if sum(sizes) == total else (round(total * (n / sum(sizes))) for n in sizes[:2])
    return {"train": sorted(order[:n_train]), "dev": sorted(order[n_train:n_train + n_dev]),
            "test": sorted(order[n_train + n_dev:])}


def enforce_min_records(records: list[dict], split_of: dict[str, str], minimum: int, out: Collector,
                        source: str) -> list[dict]:
    """Every annotator needs `minimum` train records to get an adapter; else stop (or drop them)."""
    counts = Counter(r["annotator"] for r in records if split_of[r["item_id"]] == "train")
    too_few = sorted(a for a in {r["annotator"] for r in records} if counts[a] < minimum)
    for annotator in too_few:
        out.bad(InputError(f"{source}: annotator {annotator} has {counts[annotator]} train records, fewer "
                           f"than data.min_train_records_per_annotator={minimum} (field 'annotator')"),
                f"annotator {annotator} below the minimum of {minimum} train records")
    if too_few and out.skip_invalid:
        records = out.drop(records, "records of annotators below the minimum", lambda r: r["annotator"] in too_few)
    return records


def write_dataset(cfg: dict, name: str, task: dict, out: Collector, sources: dict[str, Path]) -> dict:
    """Split the items, check and de-duplicate the records, write the splits and stats.json."""
    splits = split_items(out, cfg["data"])
    split_of = {i: s for s, ids in splits.items() for i in ids}
    records = [r for r in out.records if r["item_id"] in split_of]
    records = enforce_min_records(records, split_of, cfg["data"]["min_train_records_per_annotator"], out,
                                  ", ".join(str(p) for p in sources.values()))
    first_of: dict[tuple, dict] = {}  # exact duplicates (same item, annotator, label, explanation) are one unit
    for r in records:
        first_of.setdefault((r["item_id"], r["annotator"], json.dumps(r["label"]), r["explanation"]), r)
    unique = list(first_of.values())
    if len(unique) < len(records):
        out.dropped["exact duplicate record"] += len(records) - len(unique)
    # A2 < A10: numbers inside IDs compare as numbers.
    annotators = sorted({r["annotator"] for r in unique},
                        key=lambda a: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", a)])
    rank = {a: i for i, a in enumerate(annotators)}
    by_split = {s: [] for s in SPLITS}
    for r in sorted(unique, key=lambda r: (r["item_id"], rank[r["annotator"]])):  # stable: source order within
        split, (text_a, text_b) = split_of[r["item_id"]], out.items[r["item_id"]]
        by_split[split].append({"dataset": name, "item_id": r["item_id"], "split": split,
                                "annotator": r["annotator"], "text_a": text_a, "text_b": text_b,
                                "label": r["label"], "explanation": r["explanation"], "valid": r["valid"]})
    stats = {
        "dataset": name, "split": cfg["data"]["split"], "split_seed": cfg["data"]["split_seed"],
        "task": task, "annotators": annotators,
        "items": {s: len(splits[s]) for s in SPLITS} | {"total": len(split_of)},
        "items_in_source": len(out.items),
        "records": {s: len(by_split[s]) for s in SPLITS} | {"total": len(unique)},
        "per_annotator": {a: {s: sum(r["annotator"] == a for r in by_split[s]) for s in SPLITS}
                          for a in annotators},
        "valid": {json.dumps(v): sum(r["valid"] is v for r in unique) for v in (True, False, None)},
        "dropped": dict(sorted(out.dropped.items())), "skip_invalid": out.skip_invalid,
        "modified_raw": out.modified_raw,  # built-in raw files that are not the known release
        "sources": {p.name: common.file_sha256(p) for p in sources.values()},
    }
    if out.lewidi_items:  # the published ID and annotator order of each item (06's submission files)
        stats["lewidi_items"] = {i: out.lewidi_items[i] for i in sorted(split_of)}
    with common.atomic_dir(common.data_dir(cfg, name)) as tmp:
        for split in SPLITS:
            common.write_jsonl(tmp / f"{split}.jsonl", by_split[split])
        common.write_json(tmp / "stats.json", stats)
        common.save_resolved_config(cfg, tmp, stage="01_prepare")
    return stats


# The config sections a prepared dataset is made from, besides its source files (and the options
# of --custom). Not `seed`: the split is drawn from data.split_seed, so a new training seed never
# re-splits. torch_threads: every stage's parser applies it (01 computes nothing with torch).
CONFIG_SECTIONS = ("data", "torch_threads")


def main(argv: list[str] | None = None) -> None:
    parser = common.stage_parser(__doc__)
    parser.add_argument("--raw-dir", help="folder with the raw files (default: $CAPO_RAW_DIR or data/raw)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="drop bad records (counted in stats.json) instead of stopping")
    parser.add_argument("--accept-modified-raw", action="store_true",
                        help="use built-in raw files that differ from the known public release "
                             "(recorded in stats.json)")
    parser.add_argument("--split", choices=common.DATA_SPLITS,
                        help="paper: re-split the items (data.split_items); lewidi: the LeWiDi-2025 "
                             "train/dev/test files as published (same as --data.split lewidi)")
    parser.add_argument("--custom", help="your own annotations: a .jsonl or .csv file")
    parser.add_argument("--name", help=f"dataset name for --custom ({common.SAFE_NAME_RULE})")
    parser.add_argument("--label-type", choices=["categorical", "numeric"], help="for --custom")
    parser.add_argument("--labels", help="for --custom categorical: the allowed labels, comma-separated")
    parser.add_argument("--score-range", help="for --custom numeric: LOW,HIGH (default: from the data)")
    parser.add_argument("--instruction", help="for --custom: the task instruction shown to the model")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1):  # argparse takes the -5,5 of `--score-range -5,5` for an option
        if argv[i] == "--score-range" and argv[i + 1].startswith("-"):
            argv[i:i + 2] = [f"--score-range={argv[i + 1]}"]
            break
    args, cfg = common.parse_stage_args(parser, argv)
    if not common.is_main_process():  # under `accelerate launch`: one process's work, done by rank 0
        return
    if args.split:
        cfg["data"]["split"] = args.split
    lewidi = cfg["data"]["split"] == "lewidi"
    check_custom_args(args, lewidi)

    # ---- which datasets, from which files: (name, sources, --custom options)
    wanted = []
    if args.custom:
        path = Path(args.custom)
        if next(iter_rows(path), None) is None:  # also a folder, an empty file, not UTF-8: stop here
            raise InputError(f"{path}: no annotation rows (only a header?)")
        options = {key: getattr(args, key) for key in CUSTOM_OPTIONS} | {"custom": str(path.resolve())}
        wanted.append((args.name, {"custom": Path(options["custom"])}, options))
    else:
        raw_dir = Path(args.raw_dir or cfg["data"]["raw_dir"] or os.environ.get("CAPO_RAW_DIR") or "data/raw")
        fetch = not args.dry_run  # a dry run downloads nothing
        if raw_dir.exists() and not raw_dir.is_dir():
            raise InputError(f"{raw_dir}: the raw folder (--raw-dir, data.raw_dir or $CAPO_RAW_DIR) "
                             "is a file, expected a folder")
        for name in common.selected_datasets(cfg, args.dataset):
            if lewidi and name not in LEWIDI_FILE_PREFIX:
                raise InputError(f"data.split lewidi has the datasets {', '.join(LEWIDI_FILE_PREFIX)}, not '{name}'")
            if lewidi or name == "par":  # the paper split's par files are the shared task's Paraphrase files
                wanted.append((name, {s: find_raw_file(raw_dir, f"{LEWIDI_FILE_PREFIX[name]}_{s}.json", fetch)
                                      for s in SPLITS}, {}))
            elif name == "varierr":
                wanted.append((name, {"varierr": find_raw_file(raw_dir, "varierr.json", fetch)}, {}))
            else:  # a custom dataset prepared before: re-read the file it was prepared from
                options = custom_options_of(cfg, name)
                wanted.append((name, {"custom": Path(options["custom"])}, options))

    # ---- each dataset: skip if finished from the same files and config, else read, check, split, write
    for name, sources, options in wanted:
        made_from = common.recipe(cfg, "01_prepare", sources.values(), CONFIG_SECTIONS, dataset=name,
                                  options={**options, "skip_invalid": args.skip_invalid,
                                           "accept_modified_raw": args.accept_modified_raw})
        target = common.data_dir(cfg, name)
        reason = "--force" if args.force else common.why_not_current(target, made_from)
        if args.dry_run:
            common.say_plan("prepare", target, reason)
            continue
        if reason is None:
            print(f"[prepare] {name}: {target} is current (same source files, split and code); skipped")
            continue
        out = Collector(args.skip_invalid)
        if options:
            task = custom_task(sources["custom"], options)
            read_custom(sources["custom"], task, out)
        else:
            task = common.BUILTIN_TASKS[name]
            reader = read_lewidi if lewidi else read_varierr if name == "varierr" else read_paraphrase
            for path, n_items in reader(name, sources, out).items():  # the known public release, or an explicit yes
                note = check_release(path, n_items, KNOWN_RELEASES[path.name], args.accept_modified_raw)
                if note:
                    out.modified_raw.append(note)
        if not out.records:
            raise InputError(f"{', '.join(str(p) for p in sources.values())}: no usable records "
                             f"(dropped: {dict(out.dropped) or 'none'})")
        common.forget_output(target)
        stats = write_dataset(cfg, name, task, out, sources)
        common.write_manifest(target, made_from)
        print(f"[prepare] {name} ({reason}): items {stats['items']}, records {stats['records']}, "
              f"annotators {stats['annotators']}, dropped {stats['dropped'] or 'none'} -> {target}")


if __name__ == "__main__":
    common.run_stage(main)
