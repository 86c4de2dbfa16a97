"""01_prepare.py: raw annotations -> normalised, item-split JSONL.

    python 01_prepare.py --config configs/cpu.yaml --dataset all          # varierr + par
    python 01_prepare.py --config configs/cpu.yaml --dataset varierr --raw-dir /path/to/raw
    python 01_prepare.py --config configs/cpu.yaml --custom my.csv --name mine --label-type categorical

Raw files are looked up in --raw-dir, else $CAPO_RAW_DIR, else data/raw/ (and one folder
below it). A missing built-in file is downloaded from its public source; offline, the stage
stops with one line saying what is missing and where to put it.

Writes runs/<profile>/data/<dataset>/{train,dev,test}.jsonl (one record per item, annotator,
label and explanation; docs/DESIGN.md, annotation record), stats.json (counts, dropped records and
why, the task description later stages read) and config.resolved.yaml.

Our choices where the paper is silent (docs/CHOICES.md, Data): items are re-split 300/100/100
with the kit's seed over all 500 items of each dataset (not the shared task's split);
VariErr `idk` marks yield no record; `valid` is a strict majority of the *other*
annotators' makes_sense judgments (ties are invalid, no peer judgment gives null);
paraphrase has no validity judgments (valid: null). Every explanation is stripped and its
whitespace collapsed, because raw whitespace habits identify annotators.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import common
from common import InputError, input_error, normalize_text

RAW_SOURCES = {
    "varierr.json": "https://raw.githubusercontent.com/mainlp/VariErr-NLI/main/varierr.json",
    **{f"Paraphrase_{split}.json": ("https://raw.githubusercontent.com/Le-Wi-Di/le-wi-di.github.io/"
                                    f"main/LeWiDi_3-2025/Paraphrase/Paraphrase_{split}.json")
       for split in ("train", "dev", "test")},
}
SPLITS = ("train", "dev", "test")


class Collector:
    """Records plus what was dropped and why. Without --skip-invalid, bad input stops the stage."""

    def __init__(self, skip_invalid: bool):
        self.skip_invalid = skip_invalid
        self.records: list[dict] = []
        self.items: dict[str, tuple[str, str]] = {}  # item_id -> (text_a, text_b)
        self.dropped: Counter = Counter()

    def bad(self, error: InputError, reason: str) -> None:
        if not self.skip_invalid:
            raise error
        self.dropped[reason] += 1

    def add(self, record: dict) -> None:
        self.records.append(record)


# ----------------------------------------------------------------------------
# Raw files
# ----------------------------------------------------------------------------
def resolve_raw_dir(cli_value: str | None, cfg: dict) -> Path:
    return Path(cli_value or cfg["data"].get("raw_dir") or os.environ.get("CAPO_RAW_DIR") or "data/raw")


def find_raw_file(raw_dir: Path, name: str) -> Path:
    """raw_dir/name or raw_dir/*/name; else download it into raw_dir; offline, stop clearly."""
    candidates = [raw_dir / name, *sorted(raw_dir.glob(f"*/{name}"))] if raw_dir.exists() else []
    for path in candidates:
        if path.is_file():
            return path
    url = RAW_SOURCES[name]
    target = raw_dir / name
    print(f"[prepare] {name} not in {raw_dir}; downloading {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            payload = response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise InputError(f"raw file {name} is missing from {raw_dir} and could not be downloaded "
                         f"({reason}). Get it from {url} and put it in {raw_dir}/ "
                         "(or pass --raw-dir / set CAPO_RAW_DIR).") from None
    with common.atomic_path(target) as tmp:
        tmp.write_bytes(payload)
    return target


def line_of(text: str, needle: str) -> int | None:
    """1-based line of the first occurrence of needle (to point at an item in a JSON file)."""
    pos = text.find(needle)
    return None if pos < 0 else text.count("\n", 0, pos) + 1


def load_json_file(path: Path):
    text = path.read_text(encoding="utf-8")
    try:
        return text, json.loads(text)
    except json.JSONDecodeError as err:
        raise input_error(path, f"malformed JSON ({err.msg})", line=err.lineno) from None


# ----------------------------------------------------------------------------
# Readers: one per source format, each filling a Collector
# ----------------------------------------------------------------------------
def read_varierr(path: Path, out: Collector) -> None:
    """VariErr JSONL: one item a line, label lists of {annotator, reason, judgments}."""
    for lineno, item in common.iter_jsonl(path):
        for field in ("id", "context", "statement", *common.NLI_LABELS):
            if field not in item:
                raise input_error(path, "missing field", line=lineno, field=field)
        item_id = str(item["id"])
        out.dropped["idk mark (no label)"] += len(item.get("idk") or [])
        out.items[item_id] = (normalize_text(item["context"]), normalize_text(item["statement"]))
        for label in common.NLI_LABELS:
            for entry in item[label]:
                read_varierr_entry(path, lineno, item_id, label, entry, out)


def read_varierr_entry(path, lineno, item_id, label, entry, out: Collector) -> None:
    where = dict(line=lineno, item=item_id)
    for field in ("annotator", "reason"):
        if field not in entry:
            return out.bad(input_error(path, "missing field", field=f"{label}[].{field}", **where),
                           f"missing field {field}")
    annotator = entry["annotator"]
    if isinstance(annotator, bool) or not isinstance(annotator, int) or annotator < 0:
        return out.bad(input_error(path, f"annotator must be a non-negative integer, got {annotator!r}",
                                   field=f"{label}[].annotator", **where), "bad annotator")
    explanation = normalize_text(entry["reason"] or "")
    if not explanation:
        return out.bad(input_error(path, "empty explanation", field=f"{label}[].reason", **where),
                       "empty explanation")
    peers = [j.get("makes_sense") for j in entry.get("judgments") or []
             if j.get("annotator") != annotator and j.get("makes_sense") is not None]
    valid = None if not peers else sum(bool(p) for p in peers) * 2 > len(peers)
    text_a, text_b = out.items[item_id]
    out.add({"item_id": item_id, "annotator": f"A{annotator}", "text_a": text_a, "text_b": text_b,
             "label": label, "explanation": explanation, "valid": valid})


def read_paraphrase(paths: list[Path], out: Collector) -> None:
    """LeWiDi-2025 Par: {id: {text: {Question1, Question2}, annotators, annotations, other_info}}."""
    task = common.BUILTIN_TASKS["par"]
    for path in paths:
        text, data = load_json_file(path)
        if not isinstance(data, dict):
            raise input_error(path, "expected a JSON object keyed by item id")
        for item_id, item in data.items():
            where = dict(line=line_of(text, f'"{item_id}"'), item=item_id)
            if item_id in out.items:
                raise input_error(path, "item id appears twice (across the paraphrase files)", **where)
            try:
                questions = item["text"]
                text_a, text_b = questions["Question1"], questions["Question2"]
                annotators = [a.strip() for a in item["annotators"].split(",") if a.strip()]
                scores = item["annotations"]
                explanations = item["other_info"]["explanations"]
            except (KeyError, TypeError, AttributeError) as err:
                raise input_error(path, "missing field", field=str(err).strip("'\""), **where) from None
            if len(explanations) != len(annotators):
                raise input_error(path, f"{len(explanations)} explanations for {len(annotators)} annotators",
                                  field="other_info.explanations", **where)
            out.items[item_id] = (normalize_text(text_a), normalize_text(text_b))
            # The i-th explanation belongs to the i-th listed annotator.
            for annotator, raw_explanation in zip(annotators, explanations):
                if annotator not in scores:
                    out.bad(input_error(path, "no score for listed annotator",
                                        field=f"annotations.{annotator}", **where), "missing score")
                    continue
                score = common.normalize_label(scores[annotator], task)
                if score is None:
                    out.bad(input_error(path, f"score {scores[annotator]!r} is not an integer in -5..5",
                                        field=f"annotations.{annotator}", **where), "score out of range")
                    continue
                explanation = normalize_text(raw_explanation or "")
                if not explanation:
                    out.bad(input_error(path, f"empty explanation for {annotator}",
                                        field="other_info.explanations", **where), "empty explanation")
                    continue
                out.add({"item_id": item_id, "annotator": annotator, "text_a": out.items[item_id][0],
                         "text_b": out.items[item_id][1], "label": score, "explanation": explanation,
                         "valid": None})


CUSTOM_COLUMNS = ("item_id", "text_a", "text_b", "annotator", "label", "explanation")


def iter_custom_rows(path: Path):
    """(line number, row dict) from a JSONL or CSV file with the custom columns."""
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in CUSTOM_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise input_error(path, "missing column", line=1, field=missing[0])
            for row in reader:
                yield reader.line_num, row
        return
    yield from common.iter_jsonl(path)


def read_custom(path: Path, task: dict, out: Collector) -> None:
    """Your own annotations: columns item_id, text_a, text_b, annotator, label, explanation (+ valid)."""
    if not path.exists():
        raise InputError(f"{path}: custom annotation file not found")
    for lineno, row in iter_custom_rows(path):
        # Label and explanation may be present but empty: those get their own messages below.
        field = next((c for c in CUSTOM_COLUMNS if row.get(c) is None
                      or (c not in ("label", "explanation") and not str(row[c]).strip())), None)
        if field:
            out.bad(input_error(path, "missing field", line=lineno, field=field), f"missing field {field}")
            continue
        item_id, annotator = str(row["item_id"]).strip(), str(row["annotator"]).strip()
        label = common.normalize_label(row["label"], task)
        if label is None:
            out.bad(input_error(path, f"unknown label {row['label']!r} (expected {common.label_space(task)})",
                                line=lineno, field="label"), "unknown label")
            continue
        explanation = normalize_text(str(row["explanation"] or ""))
        if not explanation:
            out.bad(input_error(path, "empty explanation", line=lineno, field="explanation"),
                    "empty explanation")
            continue
        texts = (normalize_text(str(row["text_a"])), normalize_text(str(row["text_b"])))
        if out.items.setdefault(item_id, texts) != texts:
            raise input_error(path, f"item {item_id} has different texts on different lines",
                              line=lineno, field="text_a")
        valid = row.get("valid")
        valid = None if valid in (None, "") else str(valid).strip().lower() in ("1", "true", "yes")
        out.add({"item_id": item_id, "annotator": annotator, "text_a": texts[0], "text_b": texts[1],
                 "label": label, "explanation": explanation, "valid": valid})


def custom_task(path: Path, label_type: str, labels: str | None, score_range: str | None,
                instruction: str | None) -> dict:
    """Task description for a custom set; labels / score range are read from the file if not given."""
    if label_type == "categorical":
        if labels:
            found = [s.strip() for s in labels.split(",") if s.strip()]
        else:
            found = sorted({str(row.get("label", "")).strip().lower() for _, row in iter_custom_rows(path)} - {""})
        task = {"label_type": "categorical", "labels": found}
        default_instruction = (f"Decide which label ({', '.join(found)}) fits the pair of texts, "
                               "and explain why in one or two sentences.")
    else:
        if score_range:
            low, high = (int(v) for v in score_range.split(","))
        else:
            values = []
            for lineno, row in iter_custom_rows(path):
                try:
                    values.append(int(str(row.get("label")).strip()))
                except ValueError:
                    raise input_error(path, f"label {row.get('label')!r} is not an integer",
                                      line=lineno, field="label") from None
            low, high = min(values), max(values)
        task = {"label_type": "numeric", "score_range": [low, high]}
        default_instruction = f"Rate the pair of texts from {low} to {high}, and explain why in one or two sentences."
    task.update(text_a_name="Text A", text_b_name="Text B", instruction=instruction or default_instruction)
    return task


# ----------------------------------------------------------------------------
# Splitting, checks, writing
# ----------------------------------------------------------------------------
def split_items(item_ids: list[str], split_items_cfg: list[int], seed: int,
                max_items: int | None) -> dict[str, list[str]]:
    """Seeded item split; sizes as configured when they add up, else the same fractions."""
    rng = random.Random(seed)
    order = sorted(item_ids)
    rng.shuffle(order)
    if max_items:
        order = order[:max_items]
    total = len(order)
    if sum(split_items_cfg) == total:
        n_train, n_dev = split_items_cfg[0], split_items_cfg[1]
    else:
        fractions = [n / sum(split_items_cfg) for n in split_items_cfg]
        n_train, n_dev = round(total * fractions[0]), round(total * fractions[1])
    return {"train": sorted(order[:n_train]), "dev": sorted(order[n_train:n_train + n_dev]),
            "test": sorted(order[n_train + n_dev:])}


def enforce_min_records(records: list[dict], splits: dict[str, list[str]], minimum: int,
                        out: Collector, source: str) -> list[dict]:
    """Every annotator needs `minimum` train records to get an adapter; else stop (or drop them)."""
    train_items = set(splits["train"])
    counts = Counter(r["annotator"] for r in records if r["item_id"] in train_items)
    too_few = sorted(a for a in {r["annotator"] for r in records} if counts[a] < minimum)
    for annotator in too_few:
        out.bad(InputError(f"{source}: annotator {annotator} has {counts[annotator]} train records, fewer "
                           f"than data.min_train_records_per_annotator={minimum} (field 'annotator')"),
                f"annotator {annotator} below the minimum of {minimum} train records")
    if too_few and out.skip_invalid:
        dropped = [r for r in records if r["annotator"] in too_few]
        out.dropped[f"records of annotators below the minimum"] += len(dropped)
        records = [r for r in records if r["annotator"] not in too_few]
    return records


def annotator_sort_key(annotator: str):
    """A2 < A10: numbers inside IDs compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", annotator)]


def write_dataset(cfg: dict, name: str, task: dict, out: Collector, sources: dict[str, Path]) -> dict:
    seed = cfg["data"]["split_seed"]  # never the training seed: a new training seed keeps the split
    splits = split_items(list(out.items), cfg["data"]["split_items"], seed, cfg["data"].get("max_items"))
    kept_items = {i for ids in splits.values() for i in ids}
    records = [r for r in out.records if r["item_id"] in kept_items]
    records = enforce_min_records(records, splits, cfg["data"]["min_train_records_per_annotator"], out,
                                  ", ".join(str(p) for p in sources.values()))
    # Exact duplicates (same item, annotator, label, explanation) are one unit.
    unique, seen = [], set()
    for r in records:
        key = (r["item_id"], r["annotator"], json.dumps(r["label"]), r["explanation"])
        if key in seen:
            out.dropped["exact duplicate record"] += 1
            continue
        seen.add(key)
        unique.append(r)
    annotators = sorted({r["annotator"] for r in unique}, key=annotator_sort_key)
    rank = {a: i for i, a in enumerate(annotators)}
    by_split = defaultdict(list)
    split_of = {i: s for s, ids in splits.items() for i in ids}
    for r in unique:
        split = split_of[r["item_id"]]
        by_split[split].append({"dataset": name, "item_id": r["item_id"], "split": split,
                                "annotator": r["annotator"], "text_a": r["text_a"], "text_b": r["text_b"],
                                "label": r["label"], "explanation": r["explanation"], "valid": r["valid"]})
    for rows in by_split.values():
        rows.sort(key=lambda r: (r["item_id"], rank[r["annotator"]]))  # stable: keeps source order within

    stats = {
        "dataset": name,
        "split_seed": seed,
        "task": task,
        "annotators": annotators,
        "items": {s: len(splits[s]) for s in SPLITS} | {"total": len(kept_items)},
        "items_in_source": len(out.items),
        "records": {s: len(by_split[s]) for s in SPLITS} | {"total": len(unique)},
        "per_annotator": {a: {s: sum(r["annotator"] == a for r in by_split[s]) for s in SPLITS}
                          for a in annotators},
        "valid": {json.dumps(v): sum(r["valid"] is v for r in unique) for v in (True, False, None)},
        "dropped": dict(sorted(out.dropped.items())),
        "skip_invalid": out.skip_invalid,
        "sources": {p.name: common.file_sha256(p) for p in sources.values()},
    }
    target = common.data_dir(cfg, name)
    with common.atomic_dir(target) as tmp:
        for split in SPLITS:
            common.write_jsonl(tmp / f"{split}.jsonl", by_split[split])
        common.write_json(tmp / "stats.json", stats)
        common.save_resolved_config(cfg, tmp, stage="01_prepare")
    return stats


# What a prepared dataset depends on besides its source files (and the options of --custom).
DATA_CONFIG_KEYS = ("data.split_items", "data.split_seed", "data.max_items", "data.min_train_records_per_annotator")
CUSTOM_OPTIONS = ("custom", "label_type", "labels", "score_range", "instruction")


def custom_options_of(cfg: dict, name: str) -> dict:
    """The --custom options `name` was prepared with (from its manifest), to re-read the same file."""
    manifest = common.read_json(common.manifest_path(common.data_dir(cfg, name))) \
        if common.manifest_path(common.data_dir(cfg, name)).is_file() else {}
    options = manifest.get("made_from", {}).get("options", {})
    if not options.get("custom"):
        raise InputError(f"unknown dataset '{name}': built-in ones are varierr and par, and no custom dataset of "
                         f"that name was prepared in {common.run_dir(cfg)} (prepare it with --custom FILE --name "
                         f"{name} --label-type categorical|numeric)")
    return options


def main(argv: list[str] | None = None) -> None:
    parser = common.stage_parser(__doc__)
    parser.add_argument("--raw-dir", help="folder with the raw files (default: $CAPO_RAW_DIR or data/raw)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="drop bad records (counted in stats.json) instead of stopping")
    parser.add_argument("--custom", help="your own annotations: a .jsonl or .csv file")
    parser.add_argument("--name", help="dataset name for --custom (letters, digits, - and _)")
    parser.add_argument("--label-type", choices=["categorical", "numeric"], help="for --custom")
    parser.add_argument("--labels", help="for --custom categorical: the allowed labels, comma-separated")
    parser.add_argument("--score-range", help="for --custom numeric: LOW,HIGH (default: from the data)")
    parser.add_argument("--instruction", help="for --custom: the task instruction shown to the model")
    args, cfg = common.parse_stage_args(parser, argv)
    common.set_seed(cfg["seed"])

    # ---- which datasets, from which files: (name, sources, options)
    wanted = []
    if args.custom:
        if not args.name or not re.fullmatch(r"[A-Za-z0-9_-]+", args.name) or args.name in common.BUILTIN_DATASETS:
            raise InputError("--custom needs --name: letters, digits, - and _, not varierr or par")
        if not args.label_type:
            raise InputError("--custom needs --label-type categorical|numeric")
        options = {key: getattr(args, key) for key in CUSTOM_OPTIONS}
        options["custom"] = str(Path(args.custom).resolve())
        wanted.append((args.name, {"custom": Path(options["custom"])}, options))
    else:
        raw_dir = resolve_raw_dir(args.raw_dir, cfg)
        for name in common.selected_datasets(cfg, args.dataset):
            if name == "varierr":
                wanted.append((name, {"varierr": find_raw_file(raw_dir, "varierr.json")}, {}))
            elif name == "par":
                wanted.append((name, {s: find_raw_file(raw_dir, f"Paraphrase_{s}.json") for s in SPLITS}, {}))
            else:  # a custom dataset prepared before: re-read the file it was prepared from
                options = custom_options_of(cfg, name)
                wanted.append((name, {"custom": Path(options["custom"])}, options))

    # ---- each dataset: skip if finished from the same files and config, else read, split, write
    for name, sources, options in wanted:
        for path in sources.values():
            if not path.is_file():
                raise InputError(f"{path}: source file of dataset '{name}' not found")
        made_from = common.recipe(cfg, "01_prepare", sources.values(), DATA_CONFIG_KEYS, dataset=name,
                                  options={**options, "skip_invalid": args.skip_invalid})
        target = common.data_dir(cfg, name)
        reason = "--force" if args.force else common.why_not_current(target, made_from)
        if reason is None:
            print(f"[prepare] {name}: {target} is current (same source files, split and code); skipped")
            continue
        out = Collector(args.skip_invalid)
        if options:
            task = custom_task(sources["custom"], options["label_type"], options["labels"], options["score_range"],
                               options["instruction"])
            read_custom(sources["custom"], task, out)
        elif name == "varierr":
            task = common.BUILTIN_TASKS[name]
            read_varierr(sources["varierr"], out)
        else:
            task = common.BUILTIN_TASKS[name]
            read_paraphrase(list(sources.values()), out)
        common.forget_output(target)
        stats = write_dataset(cfg, name, task, out, sources)
        common.write_manifest(target, made_from)
        print(f"[prepare] {name} ({reason}): items {stats['items']}, records {stats['records']}, "
              f"annotators {stats['annotators']}, dropped {stats['dropped'] or 'none'} -> {target}")


if __name__ == "__main__":
    common.run_stage(main)
