"""06_eval.py: every metric, every table, the figures and report.md.

    python 06_eval.py --config configs/cpu.yaml --dataset all            # varierr + par
    python 06_eval.py --config configs/smoke.yaml --eval.judge false --eval.bertscore false
    python 06_eval.py --config configs/cpu.yaml --score-sheet runs/cpu/human_eval/sheet.csv
    accelerate launch 06_eval.py --config configs/paper.yaml             # same; one process is enough

Reads runs/<profile>/data/<dataset>/ (01), hlv/<dataset>/ (02, shown in the report) and
predictions/<dataset>/<model>/<method>/<annotator>.jsonl: 03 (base, icl, vp, vp_icl), 04 (sft),
05 (capo); any other method folder found there is evaluated as well. A method without
predictions becomes a row that says it is missing; it never stops the stage.
With data.max_eval_items (the cpu profile's budget) the human test references are the same
seeded sample of test items that 03-05 generated on (common.load_eval_split).

Writes runs/<profile>/:
  metrics.json                       DESIGN.md shape: dataset -> model -> method -> metrics, with
                                     "per_annotator" and, for every null, "reasons"[metric]
  tables/table4_main.{md,csv}        main results (decision, reference similarity, imitation, judge)
  tables/table6_feature_kl.{md,csv}  feature KL by feature
  tables/judge_attribution.{md,csv}  LLM-as-judge attribution
  tables/judge_verdicts.jsonl        every judge reply and the verdict read from it
  tables/per_annotator.{md,csv}      every metric per target annotator
  tables/fig_<metric>.png            one bar chart per metric
  tables/config.resolved.yaml
  human_eval/sheet.csv, sheet.html   blinded human-validation sheet (never overwritten once rated)
  human_eval/key.csv                 blinded id -> model, method (keep it away from the raters)
  report.md                          HLV results from 02, every table, the paper's numbers beside
                                     ours, the claims check, the resolved config and versions

Scoring a filled sheet: `--score-sheet FILE` (key: FILE's folder/key.csv, or --sheet-key)
writes scores.json/.md beside it: per-method means and agreement between raters.

Metrics are computed per target annotator and averaged over annotators (macro). Every
definition the paper does not give is in the block "OUR DEFINITIONS" below.
"""
from __future__ import annotations

import csv
import html
import random
import re
import time
import zlib
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

import common  # noqa: E402
from common import InputError, input_error  # noqa: E402

PROMPTING_METHODS = ("base", "icl", "vp", "vp_icl")
TRAINED_METHODS = ("sft", "capo")
STAGE_OF_METHOD = {**{m: "03_prompt_baselines" for m in PROMPTING_METHODS}, "sft": "04_sft", "capo": "05_capo"}
HUMAN = "human"  # reference row: the target's own held-out test explanations, scored the same way


# ============================================================================
# OUR DEFINITIONS. The paper's formulas, word lists, bins, judge prompt and human
# protocol are not public (PAPER_NOTES 6 and 9). Every reconstruction lives in this
# block so it can be swapped when the paper's code appears; the README lists each
# one as "our definition".
# ============================================================================

# -- Unparsed outputs are never dropped. Their label counts as wrong (accuracy, sign),
#    as the worst possible error for the target (MAE) and as its own "unparsed" category
#    (label-distribution KL); their explanation is the raw output, whitespace-normalised,
#    for every explanation metric.
UNPARSED = "unparsed"


def explanation_text(prediction: dict) -> str:
    """The explanation every text metric reads: the parsed one, else the raw output."""
    if prediction.get("parse_ok") and prediction.get("explanation"):
        return common.normalize_text(prediction["explanation"])
    return common.normalize_text(prediction.get("output") or "")


def decision_outcome(label, target_labels: list, task: dict) -> dict:
    """Categorical: correct if the label is in the target's label set for the item.
    Numeric: absolute error against the target's (mean) score, sign agreement ({<0, 0, >0})."""
    if task["label_type"] == "categorical":
        return {"correct": label is not None and label in target_labels}
    low, high = task["score_range"]
    target = float(np.mean(target_labels))
    if label is None:
        return {"abs_error": max(target - low, high - target), "sign_correct": False}
    return {"abs_error": abs(label - target), "sign_correct": bool(np.sign(label) == np.sign(target))}


# -- Explanation-style features (the paper names length, modality/hedging, lexical
#    diversity, lexical reuse). Word lists and tokenisation are ours.
HEDGE_WORDS = frozenset("may might can could would possibly perhaps maybe likely unlikely probably "
                        "seem seems seemed appear appears suggest suggests".split())
NEGATION_WORDS = frozenset("not no never none nothing neither nor cannot without nobody".split())
WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
STYLE_FEATURES = ("length_words", "hedge_rate", "type_token_ratio", "input_overlap", "negation_rate")
FEATURES = STYLE_FEATURES + ("label",)


def words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def style_features(explanation: str, text_a: str, text_b: str) -> dict[str, float]:
    """Length in words; hedge/modal, negation and input-reuse rates per word; type-token ratio."""
    tokens = words(explanation)
    n = len(tokens)
    if n == 0:
        return {"length_words": 0.0, "hedge_rate": 0.0, "type_token_ratio": 0.0,
                "input_overlap": 0.0, "negation_rate": 0.0}
    input_vocab = set(words(text_a)) | set(words(text_b))
    return {"length_words": float(n),
            "hedge_rate": sum(t in HEDGE_WORDS for t in tokens) / n,
            "type_token_ratio": len(set(tokens)) / n,
            "input_overlap": sum(t in input_vocab for t in tokens) / n,
            "negation_rate": sum(t in NEGATION_WORDS or t.endswith("n't") for t in tokens) / n}


def feature_bin_edges(train_values: dict[str, list[float]], n_bins: int) -> dict[str, np.ndarray]:
    """Interior bin edges at quantiles of the pooled human TRAIN explanations (fixed before
    any test output is seen); the outer bins are open, so values outside train's range land."""
    quantiles = np.linspace(0, 1, n_bins + 1)[1:-1]
    return {name: np.unique(np.quantile(np.asarray(values, dtype=float), quantiles))
            for name, values in train_values.items()}


def label_categories(task: dict) -> list:
    if task["label_type"] == "categorical":
        return list(task["labels"]) + [UNPARSED]
    low, high = task["score_range"]
    return list(range(low, high + 1)) + [UNPARSED]


def feature_histogram(values: list, edges_or_categories, categorical: bool) -> np.ndarray:
    if categorical:
        index = {category: i for i, category in enumerate(edges_or_categories)}
        counts = np.zeros(len(edges_or_categories))
        for value in values:
            counts[index[UNPARSED if value is None else value]] += 1
        return counts
    edges = edges_or_categories
    return np.bincount(np.digitize(np.asarray(values, dtype=float), edges), minlength=len(edges) + 1).astype(float)


def kl_divergence(human_counts: np.ndarray, model_counts: np.ndarray, smoothing: float) -> float:
    """KL(human || model) in nats; `smoothing` is added to both probability vectors, which are
    then renormalised (so an empty model bin costs a finite amount)."""
    p = human_counts / human_counts.sum() + smoothing
    q = model_counts / model_counts.sum() + smoothing
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


# -- Group classifier confidence: the annotator classifier of 02 (common.fit_annotator_
#    classifier) trained on the human TRAIN responses in representation eval.classifier_
#    representation (E3: explanation embedding minus its item's mean). Model outputs and the
#    human test responses are placed in that space by subtracting the mean of the HUMAN test
#    responses to the same item (common.representation_vectors). Bootstrapped groups of m
#    outputs of one target are averaged and classified; the metric is the mean probability
#    of the target. m = eval.group_size, capped by the outputs that exist; the human
#    reference uses the same m as the model outputs it normalises.
def normalised_imitation(model_confidence: float | None, human_confidence: float | None) -> float | None:
    """Our ImiScore: the model's group confidence for the target divided by the same confidence
    for the target's held-out human test explanations (1.0 = as recognisable as the human).
    Not clipped: a model can be more recognisable than the human it imitates (> 1)."""
    if model_confidence is None or not human_confidence:
        return None
    return model_confidence / human_confidence


# -- LLM-as-judge attribution: the judge sees k TRAIN responses (label and explanation, no
#    item text, to keep prompts short) of every annotator, then one response with its item,
#    and names the annotator. Greedy decoding; the verdict is the first annotator ID in the
#    reply; a reply without one is "unparseable" and counts as wrong. Chance = 1/annotators.
def judge_messages(task: dict, annotators: list[str], examples: dict[str, list[dict]],
                   text_a: str, text_b: str, response: str) -> list[dict]:
    ids = ", ".join(annotators)
    lines = [f"{len(annotators)} annotators ({ids}) labelled sentence pairs and explained their "
             "labels, each in a personal style. Here are examples from each annotator."]
    for annotator in annotators:
        lines.append(f"\nAnnotator {annotator}:")
        lines += [f"- Label: {r['label']} | Explanation: {r['explanation']}" for r in examples[annotator]]
    lines.append("\nYou will see one more response. Say which annotator wrote it. "
                 "Answer with the annotator ID only.")
    user = (f"{common.item_text(task, text_a, text_b)}\nResponse:\n{response}\n\n"
            f"Which annotator wrote this response? Answer with one of: {ids}.")
    return [{"role": "system", "content": "\n".join(lines)}, {"role": "user", "content": user}]


def parse_verdict(reply: str, annotators: list[str]) -> str | None:
    """The first annotator ID named in the judge's reply (whole word, any case), else None."""
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(re.escape(a) for a in
                         sorted(annotators, key=len, reverse=True)) + r")(?![A-Za-z0-9])", re.IGNORECASE)
    match = pattern.search(reply or "")
    if not match:
        return None
    return {a.lower(): a for a in annotators}[match.group(1).lower()]


# -- Human validation: 1-5 ratings of coherence, grounding (in the item) and style fidelity
#    (to the target's examples) by eval.human_sheet_raters raters; agreement = exact and
#    within-1 agreement and quadratic-weighted Cohen's kappa, per pair of raters.
RATING_DIMENSIONS = ("coherence", "grounding", "style")
RATING_SCALE = (1, 5)

# -- Claims check: "accuracy kept" allows a drop of 2% of the metric's range (accuracy 0.02,
#    paraphrase MAE 0.2 points); the paper calls .638 -> .627 (Qwen, NLI) "maintained".
KEPT_FRACTION_OF_RANGE = 0.02
# ============================================================================
# END OF OUR DEFINITIONS
# ============================================================================

# The paper's numbers, as summarised second-hand (PAPER_NOTES section 10; VariErr NLI).
# Shown beside ours in the report, always labelled as the paper's.
PAPER_TABLE4 = [
    # model, method, label acc, feature KL, group clf conf, norm. imitation
    ("Qwen3-4B", "base", 0.472, None, None, None),
    ("Qwen3-4B", "sft", 0.638, 0.084, 0.845, 0.859),
    ("Qwen3-4B", "capo", 0.627, 0.081, 0.867, 0.888),
    ("Llama-3.2-3B", "base", 0.315, None, None, None),
    ("Llama-3.2-3B", "sft", 0.512, 0.113, 0.909, 0.946),
    ("Llama-3.2-3B", "capo", 0.512, 0.121, 0.924, 0.964),
]
PAPER_JUDGE = {"dataset": "varierr", "method": "capo", "accuracy": 0.328, "chance": 0.25}


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------
def stable_seed(base: int, *parts) -> int:
    """A seed per purpose, independent of Python's hash randomisation."""
    return (int(base) + zlib.crc32("/".join(map(str, parts)).encode())) % (2 ** 32)


def mean_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def decision_metrics(task: dict) -> list[str]:
    return ["label_acc"] if task["label_type"] == "categorical" else ["mae", "sign_acc"]


def main_decision_metric(task: dict) -> tuple[str, bool, float]:
    """(metric, higher is better, range of the metric)."""
    if task["label_type"] == "categorical":
        return "label_acc", True, 1.0
    low, high = task["score_range"]
    return "mae", False, float(high - low)


# ----------------------------------------------------------------------------
# Data: human splits and predictions
# ----------------------------------------------------------------------------
def load_dataset(cfg: dict, dataset: str) -> dict:
    task = common.load_task(cfg, dataset)
    train = common.load_split(cfg, dataset, "train")
    test = common.load_eval_split(cfg, dataset, "test")
    references: dict[tuple[str, str], list[dict]] = defaultdict(list)
    items: dict[str, dict] = {}
    for record in test:
        record["label"] = common.normalize_label(record["label"], task)
        references[(record["item_id"], record["annotator"])].append(record)
        items.setdefault(record["item_id"], record)
    for record in train:
        record["label"] = common.normalize_label(record["label"], task)
    return {"name": dataset, "task": task, "annotators": common.dataset_annotators(cfg, dataset),
            "train": train, "test": test, "references": dict(references), "items": items}


def expected_methods(cfg: dict) -> list[str]:
    return list(cfg.get("baselines", {}).get("methods", PROMPTING_METHODS)) + list(TRAINED_METHODS)


def discover_methods(cfg: dict, dataset: str, model_tag: str) -> list[str]:
    """The expected methods in order, then any other method folder found (ablations)."""
    methods = expected_methods(cfg)
    folder = common.run_dir(cfg) / "predictions" / dataset / model_tag
    if folder.is_dir():
        methods += sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in methods)
    return methods


def load_predictions(cfg: dict, ds: dict, model_tag: str, method: str) -> tuple[dict, dict]:
    """({annotator: [prediction]}, {annotator: why missing}). Labels are re-normalised."""
    found, missing = {}, {}
    folder = common.predictions_path(cfg, ds["name"], model_tag, method, "x").parent
    stage = STAGE_OF_METHOD.get(method, "the stage that writes it")
    for annotator in ds["annotators"]:
        path = common.predictions_path(cfg, ds["name"], model_tag, method, annotator)
        if not path.exists():
            where = folder.relative_to(common.run_dir(cfg))
            missing[annotator] = (f"no predictions ({where}/ does not exist; run {stage})" if not folder.is_dir()
                                  else f"{path.name} missing in {where}/")
            continue
        predictions = common.read_jsonl(path, required=("item_id", "annotator", "output", "label", "parse_ok"))
        for lineno, prediction in enumerate(predictions, 1):
            if prediction["annotator"] != annotator:
                raise input_error(path, f"annotator '{prediction['annotator']}' in the file of {annotator}",
                                  line=lineno, field="annotator")
            label = common.normalize_label(prediction["label"], ds["task"]) if prediction["parse_ok"] else None
            if prediction["parse_ok"] and label is None:
                raise input_error(path, f"parse_ok is true but label {prediction['label']!r} is not a label "
                                  "of the task", line=lineno, field="label")
            prediction["label"] = label
        found[annotator] = predictions
    return found, missing


def output_rows(ds: dict, predictions: dict) -> tuple[list[dict], dict]:
    """One scored row per prediction that has a human reference (the target's test responses
    to that item); counts of predictions without one per annotator."""
    rows, unmatched = [], defaultdict(int)
    for annotator, preds in predictions.items():
        for prediction in preds:
            references = ds["references"].get((prediction["item_id"], annotator))
            if not references:
                unmatched[annotator] += 1
                continue
            item = ds["items"][prediction["item_id"]]
            rows.append({"annotator": annotator, "item_id": prediction["item_id"],
                         "label": prediction["label"], "parse_ok": bool(prediction["parse_ok"]),
                         "explanation": explanation_text(prediction), "raw_output": prediction["output"],
                         "references": [r["explanation"] for r in references],
                         "target_labels": [r["label"] for r in references],
                         "text_a": item["text_a"], "text_b": item["text_b"]})
    return rows, dict(unmatched)


def human_rows(ds: dict) -> list[dict]:
    """The target's own test responses as rows (the human reference)."""
    return [{"annotator": r["annotator"], "item_id": r["item_id"], "label": r["label"], "parse_ok": True,
             "explanation": r["explanation"], "raw_output": r["explanation"], "references": [r["explanation"]],
             "target_labels": [r["label"]], "text_a": r["text_a"], "text_b": r["text_b"]} for r in ds["test"]]


# ----------------------------------------------------------------------------
# Reference similarity: ROUGE-L, BERTScore, embedding cosine (max over the target's references)
# ----------------------------------------------------------------------------
def rouge_l(outputs: list[str], references: list[list[str]]) -> list[float]:
    """ROUGE-L F1 (rouge-score, Porter stemming), max over references; empty output -> 0."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score_multi(refs, out)["rougeL"].fmeasure if out.strip() else 0.0
            for out, refs in zip(outputs, references)]


def bertscore_model_path(spec: str) -> str:
    """`package:<module>` is a sentence-transformers folder shipped in a pip package."""
    if spec.startswith("package:"):
        return str(common.package_dir(spec.split(":", 1)[1]) / "model")
    return spec


def bertscore_f1(outputs: list[str], references: list[list[str]], ev: dict) -> tuple[list[float] | None, str | None]:
    """BERTScore F1 (bert-score, no idf, no baseline rescaling), max over references.
    An empty output scores 0 (bert-score cannot encode it). (None, reason) if it cannot run."""
    if not ev.get("bertscore", True):
        return None, "disabled (eval.bertscore: false)"
    # Each distinct (output, references) pair is scored once: methods often repeat outputs.
    pairs = list(dict.fromkeys((out, tuple(refs)) for out, refs in zip(outputs, references) if out.strip()))
    if not pairs:
        return [0.0] * len(outputs), None
    try:
        import bert_score
        model = bertscore_model_path(ev["bertscore_model"])
        _, _, f1 = bert_score.score([out for out, _ in pairs], [list(refs) for _, refs in pairs],
                                    model_type=model, num_layers=ev.get("bertscore_num_layers"),
                                    batch_size=64, device=common.default_device(), verbose=False)
    except Exception as err:  # a missing model or an offline hub must not stop the report
        return None, f"bert-score could not run with {ev['bertscore_model']}: {type(err).__name__}: {err}"
    score_of = dict(zip(pairs, f1.tolist()))
    return [float(score_of[(out, tuple(refs))]) if out.strip() else 0.0
            for out, refs in zip(outputs, references)], None


def embedding_cosine(cfg: dict, outputs: list[str], references: list[list[str]], cache_dir: Path) -> list[float]:
    """Cosine between the output's and each reference's sentence embedding (max); empty -> 0."""
    unique = list(dict.fromkeys([t for t in outputs if t.strip()] + [t for refs in references for t in refs]))
    if not unique:
        return [0.0] * len(outputs)
    vectors = common.embed_texts(cfg, unique, cache_dir)
    index = {text: i for i, text in enumerate(unique)}
    scores = []
    for out, refs in zip(outputs, references):
        if not out.strip():
            scores.append(0.0)
            continue
        scores.append(float(max(vectors[index[out]] @ vectors[index[ref]] for ref in refs)))
    return scores


# ----------------------------------------------------------------------------
# Aggregation-aware imitation: feature KL and group classifier confidence
# ----------------------------------------------------------------------------
def feature_reference(ds: dict, ev: dict) -> dict:
    """Fixed bins from the human train explanations, and the human test histograms per target."""
    train_values = defaultdict(list)
    for record in ds["train"]:
        for name, value in style_features(record["explanation"], record["text_a"], record["text_b"]).items():
            train_values[name].append(value)
    edges = feature_bin_edges(train_values, int(ev["feature_bins"]))
    edges["label"] = label_categories(ds["task"])
    human = {}
    for annotator in ds["annotators"]:
        rows = [row for row in human_rows(ds) if row["annotator"] == annotator]
        if rows:
            human[annotator] = feature_histograms(rows, edges)
    return {"edges": edges, "human": human}


def feature_histograms(rows: list[dict], edges: dict) -> dict[str, np.ndarray]:
    values = defaultdict(list)
    for row in rows:
        for name, value in style_features(row["explanation"], row["text_a"], row["text_b"]).items():
            values[name].append(value)
        values["label"].append(row["label"])
    return {name: feature_histogram(values[name], edges[name], categorical=(name == "label")) for name in FEATURES}


def feature_kl(rows: list[dict], human_hist: dict, edges: dict, smoothing: float) -> dict[str, float]:
    model_hist = feature_histograms(rows, edges)
    return {name: kl_divergence(human_hist[name], model_hist[name], smoothing) for name in FEATURES}


def imitation_reference(cfg: dict, ds: dict, ev: dict, cache_dir: Path) -> dict:
    """The annotator classifier trained on human train responses, and the human test space."""
    representation = ev["classifier_representation"]
    train_X, _ = common.representation_vectors(cfg, ds["train"], representation, cache_dir)
    clf = common.fit_annotator_classifier(cfg["hlv"], train_X, [r["annotator"] for r in ds["train"]],
                                          int(cfg["seed"]))
    test_X, test_means = common.representation_vectors(cfg, ds["test"], representation, cache_dir)
    human_X = {a: test_X[[i for i, r in enumerate(ds["test"]) if r["annotator"] == a]] for a in ds["annotators"]}
    return {"clf": clf, "means": test_means, "human_X": human_X, "representation": representation,
            "cache": {}}


def group_confidence(cfg: dict, ev: dict, reference: dict, annotator: str, X) -> dict:
    """Group confidence of the outputs X of one target, and of the target's human test
    responses at the same m (cached), and their ratio."""
    classes = [str(c) for c in reference["clf"].classes_]
    if annotator not in classes:
        return {"conf": None, "human_conf": None, "m": 0,
                "reason": f"{annotator} has no train responses, so the classifier has no such class"}
    human_X = reference["human_X"][annotator]
    m = min(int(ev["group_size"]), len(X), len(human_X))
    if m == 0:
        why = "no outputs" if len(X) == 0 else "no human test responses"
        return {"conf": None, "human_conf": None, "m": 0, "reason": why}
    seed = stable_seed(cfg["seed"], "group", annotator)
    n_groups = int(ev["bootstrap_groups"])
    model = common.group_target_confidence(reference["clf"], X, annotator, m, n_groups, seed)
    key = (annotator, m)
    if key not in reference["cache"]:
        reference["cache"][key] = common.group_target_confidence(reference["clf"], human_X, annotator, m,
                                                                 n_groups, seed)
    human = reference["cache"][key]
    return {"conf": model["mean_prob"], "human_conf": human["mean_prob"], "m": m,
            "group_accuracy": model["accuracy"], "norm": normalised_imitation(model["mean_prob"], human["mean_prob"])}


# ----------------------------------------------------------------------------
# One dataset: score every method's rows, then aggregate per annotator and overall
# ----------------------------------------------------------------------------
def score_rows(cfg: dict, ev: dict, rows: list[dict], cache_dir: Path) -> str | None:
    """Adds rouge_l, bertscore_f1 and emb_cos to every row (one pass over all methods, so
    each scorer is loaded once). Returns why BERTScore is missing, if it is."""
    outputs = [row["explanation"] for row in rows]
    references = [row["references"] for row in rows]
    for row, value in zip(rows, rouge_l(outputs, references)):
        row["rouge_l"] = value
    bert, bert_reason = bertscore_f1(outputs, references, ev)
    for i, row in enumerate(rows):
        row["bertscore_f1"] = bert[i] if bert is not None else None
    for row, value in zip(rows, embedding_cosine(cfg, outputs, references, cache_dir)):
        row["emb_cos"] = value
    return bert_reason


def aggregate(cfg: dict, ds: dict, rows: list[dict], features: dict, imitation: dict | None,
              imitation_reason: str | None, bert_reason: str | None, missing: dict, unmatched: dict,
              cache_dir: Path, is_human: bool = False) -> dict:
    """Metrics per target annotator and their macro average (the method's row)."""
    ev = cfg["eval"]
    task = ds["task"]
    decision = decision_metrics(task)
    X_all = None
    if imitation is not None and rows:
        records = [{"item_id": r["item_id"], "label": r["label"] if r["label"] is not None else UNPARSED,
                    "explanation": r["explanation"]} for r in rows]
        X_all, _ = common.representation_vectors(cfg, records, imitation["representation"], cache_dir,
                                                 means=imitation["means"])
    per_annotator = {}
    for annotator in ds["annotators"]:
        if annotator in missing:
            per_annotator[annotator] = {"status": "missing", "reason": missing[annotator]}
            continue
        index = [i for i, row in enumerate(rows) if row["annotator"] == annotator]
        mine = [rows[i] for i in index]
        target_items = {item for item, a in ds["references"] if a == annotator}
        entry = {"status": "ok", "n": len(mine),
                 "coverage": len({r["item_id"] for r in mine}) / len(target_items) if target_items else None,
                 "unmatched_predictions": unmatched.get(annotator, 0), "reasons": {}}
        if not mine:
            entry["status"] = "missing"
            entry["reason"] = "no predictions for this annotator's test items"
            per_annotator[annotator] = entry
            continue
        outcomes = [decision_outcome(r["label"], r["target_labels"], task) for r in mine]
        entry["parse_rate"] = float(np.mean([r["parse_ok"] for r in mine]))
        if "label_acc" in decision:
            entry["label_acc"] = float(np.mean([o["correct"] for o in outcomes]))
        else:
            entry["mae"] = float(np.mean([o["abs_error"] for o in outcomes]))
            entry["sign_acc"] = float(np.mean([o["sign_correct"] for o in outcomes]))
        for metric in ("rouge_l", "bertscore_f1", "emb_cos"):
            entry[metric] = None if is_human else mean_or_none(r[metric] for r in mine)
        if bert_reason:
            entry["reasons"]["bertscore_f1"] = bert_reason
        if annotator in features["human"]:
            by_feature = feature_kl(mine, features["human"][annotator], features["edges"], float(ev["kl_smoothing"]))
            entry["feature_kl_by_feature"] = by_feature
            entry["feature_kl"] = float(np.mean(list(by_feature.values())))
        else:
            entry["feature_kl"] = None
            entry["reasons"]["feature_kl"] = "no human test explanations for this annotator"
        if imitation is None:
            for metric in ("group_clf_conf", "norm_imitation"):
                entry[metric] = None
                entry["reasons"][metric] = imitation_reason
        else:
            conf = group_confidence(cfg, ev, imitation, annotator, X_all[index])
            entry.update(group_clf_conf=conf["conf"], group_m=conf["m"], human_group_clf_conf=conf["human_conf"],
                         norm_imitation=conf.get("norm"), group_accuracy=conf.get("group_accuracy"))
            if conf["conf"] is None:
                entry["reasons"]["group_clf_conf"] = entry["reasons"]["norm_imitation"] = conf["reason"]
        per_annotator[annotator] = entry

    ok = [e for e in per_annotator.values() if e.get("status") == "ok"]
    result = {"status": "ok" if len(ok) == len(ds["annotators"]) else ("partial" if ok else "missing"),
              "annotators_evaluated": [a for a, e in per_annotator.items() if e.get("status") == "ok"],
              "n": sum(e["n"] for e in ok), "reasons": {}, "per_annotator": per_annotator}
    if not ok:
        reasons = sorted({e.get("reason", "missing") for e in per_annotator.values()})
        result["reason"] = "; ".join(reasons)
        return result
    metrics = ["coverage", "parse_rate", *decision, "rouge_l", "bertscore_f1", "emb_cos", "feature_kl",
               "group_clf_conf", "norm_imitation", "human_group_clf_conf"]
    for metric in metrics:
        result[metric] = mean_or_none(e.get(metric) for e in ok)
        if result[metric] is None:
            why = sorted({e["reasons"].get(metric, "") for e in ok} - {""})
            result["reasons"][metric] = "; ".join(why) if why else "not computed"
    result["group_m"] = min((e["group_m"] for e in ok if e.get("group_m")), default=None)
    if result["group_m"] is None:
        result["reasons"]["group_m"] = result["reasons"].get("group_clf_conf", "not computed")
    result["feature_kl_by_feature"] = {
        name: mean_or_none(e.get("feature_kl_by_feature", {}).get(name) for e in ok) for name in FEATURES}
    if is_human:
        # The reference row: only the imitation metrics (and the judge) say anything about it.
        for entry in [result, *ok]:
            for metric in ("coverage", "parse_rate", *decision, "rouge_l", "bertscore_f1", "emb_cos", "feature_kl"):
                entry[metric] = None
                entry.setdefault("reasons", {})[metric] = ("n/a: reference row (the target's own test "
                                                           "explanations); only imitation and the judge apply")
            entry["feature_kl_by_feature"] = {name: None for name in FEATURES}
    notes = []
    if result["status"] == "partial":
        notes.append("averaged over " + ", ".join(result["annotators_evaluated"]) + " only")
    if sum(unmatched.values()):
        notes.append(f"{sum(unmatched.values())} predictions for cells without a human test response not scored")
    if notes:
        result["note"] = "; ".join(notes)
    return result


def evaluate_dataset(cfg: dict, ds: dict) -> tuple[dict, dict]:
    """({model: {method: metrics}}, judge inputs) for one dataset, without the judge."""
    ev = cfg["eval"]
    cache_dir = common.run_dir(cfg) / "eval_cache" / ds["name"]
    features = feature_reference(ds, ev)
    try:
        imitation, imitation_reason = imitation_reference(cfg, ds, ev, cache_dir), None
    except ValueError as err:  # e.g. fewer than two annotators in the train split
        imitation, imitation_reason = None, f"the annotator classifier could not be trained: {err}"

    loaded = {}
    all_rows = []
    for model_cfg in common.model_configs(cfg):
        for method in discover_methods(cfg, ds["name"], model_cfg["tag"]):
            predictions, missing = load_predictions(cfg, ds, model_cfg["tag"], method)
            rows, unmatched = output_rows(ds, predictions)
            loaded[(model_cfg["tag"], method)] = (predictions, missing, rows, unmatched)
            all_rows += rows
    started = time.time()
    bert_reason = score_rows(cfg, ev, all_rows, cache_dir) if all_rows else None
    print(f"[eval] {ds['name']}: reference similarity for {len(all_rows)} outputs in {time.time() - started:.0f}s",
          flush=True)

    results: dict[str, dict] = {}
    for (model_tag, method), (predictions, missing, rows, unmatched) in loaded.items():
        results.setdefault(model_tag, {})[method] = aggregate(cfg, ds, rows, features, imitation, imitation_reason,
                                                              bert_reason, missing, unmatched, cache_dir)
        result = results[model_tag][method]
        detail = (f"n={result['n']}, norm_imitation {fmt(result.get('norm_imitation'))}"
                  if result["status"] != "missing" else result.get("reason"))
        print(f"[eval] {ds['name']} {model_tag} {method}: {result['status']} ({detail})", flush=True)
    human = aggregate(cfg, ds, human_rows(ds), features, imitation, imitation_reason, None, {}, {}, cache_dir,
                      is_human=True)
    for model_tag in results:
        results[model_tag][HUMAN] = human
    return results, {key: value[0] for key, value in loaded.items()}


# ----------------------------------------------------------------------------
# LLM-as-judge attribution
# ----------------------------------------------------------------------------
def sample_keys(ds: dict, n: int, seed: int) -> list[tuple[str, str]]:
    """n (item, annotator) test cells, balanced over annotators (round robin), seeded."""
    rng = random.Random(seed)
    per_annotator = {a: sorted({item for item, ann in ds["references"] if ann == a}) for a in ds["annotators"]}
    for items in per_annotator.values():
        rng.shuffle(items)
    keys = []
    while len(keys) < n and any(per_annotator.values()):
        for annotator in ds["annotators"]:
            if per_annotator[annotator] and len(keys) < n:
                keys.append((per_annotator[annotator].pop(), annotator))
    return keys


def train_examples(ds: dict, k: int, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    examples = {}
    for annotator in ds["annotators"]:
        records = [r for r in ds["train"] if r["annotator"] == annotator]
        examples[annotator] = rng.sample(records, min(k, len(records)))
    return examples


def response_text(prediction: dict, task: dict) -> str:
    if prediction.get("parse_ok") and prediction.get("label") is not None:
        return common.format_response(prediction["label"], explanation_text(prediction))
    return explanation_text(prediction)


def judge_jobs(cfg: dict, ds: dict, predictions: dict) -> list[dict]:
    """One judge prompt per sampled test cell and method (the same cells for every method)."""
    ev = cfg["eval"]
    keys = sample_keys(ds, int(ev["judge_items"]), stable_seed(cfg["seed"], "judge", ds["name"]))
    examples = train_examples(ds, int(ev["judge_examples_per_annotator"]),
                              stable_seed(cfg["seed"], "judge-ex", ds["name"]))
    sources = {(model_tag, method): by_annotator for (model_tag, method), by_annotator in predictions.items()}
    jobs = []
    for item_id, annotator in keys:
        item = ds["items"][item_id]
        human = ds["references"][(item_id, annotator)][0]
        candidates = {(None, HUMAN): {"parse_ok": True, "label": human["label"], "explanation": human["explanation"]}}
        for (model_tag, method), by_annotator in sources.items():
            match = next((p for p in by_annotator.get(annotator, []) if p["item_id"] == item_id), None)
            candidates[(model_tag, method)] = match
        for (model_tag, method), prediction in candidates.items():
            job = {"dataset": ds["name"], "model": model_tag, "method": method, "annotator": annotator,
                   "item_id": item_id}
            if prediction is not None:
                job["messages"] = judge_messages(ds["task"], ds["annotators"], examples, item["text_a"],
                                                 item["text_b"], response_text(prediction, ds["task"]))
            jobs.append(job)
    return jobs


def run_judge(cfg: dict, jobs: list[dict], annotators: dict[str, list[str]]) -> str | None:
    """Adds "verdict" (and "reply") to every job with messages. Returns why it could not run."""
    ev = cfg["eval"]
    if not ev.get("judge", True):
        return "disabled (eval.judge: false)"
    todo = [job for job in jobs if "messages" in job]
    if not todo:
        return None
    judge_cfg = common.model_configs(cfg)[0]
    try:
        model, tokenizer = common.load_model_and_tokenizer(judge_cfg)
    except Exception as err:  # weights not available offline: report, do not crash
        return f"judge model '{judge_cfg['tag']}' could not be loaded: {type(err).__name__}: {err}"
    gen_cfg = dict(cfg["generation"], max_new_tokens=int(ev["judge_max_new_tokens"]), do_sample=False)
    for dataset in dict.fromkeys(job["dataset"] for job in todo):
        # One call per dataset: its prompts share the instructions and examples, which
        # generate_texts then prefills once.
        batch = [job for job in todo if job["dataset"] == dataset]
        started = time.time()
        replies = common.generate_texts(model, tokenizer, [job["messages"] for job in batch], gen_cfg,
                                        desc=f"judge {dataset}")
        print(f"[eval] judge ({judge_cfg['tag']}) {dataset}: {len(batch)} verdicts in {time.time() - started:.0f}s",
              flush=True)
        for job, reply in zip(batch, replies):
            job["reply"] = reply
            job["verdict"] = parse_verdict(reply, annotators[dataset])
    return None


def judge_summary(jobs: list[dict], annotators: list[str], judge_reason: str | None, judge_tag: str) -> dict:
    """accuracy over judged outputs (unparseable verdicts count as wrong), per annotator too."""
    chance = 1.0 / len(annotators)
    if judge_reason:
        return {"accuracy": None, "reason": judge_reason, "chance": chance}
    judged = [job for job in jobs if "messages" in job]
    if not judged:
        return {"accuracy": None, "reason": "no outputs for the sampled test cells", "chance": chance,
                "n": 0, "no_output": len(jobs)}
    correct = [job["verdict"] == job["annotator"] for job in judged]
    per_annotator = {}
    for annotator in annotators:
        mine = [job["verdict"] == job["annotator"] for job in judged if job["annotator"] == annotator]
        per_annotator[annotator] = float(np.mean(mine)) if mine else None
    return {"accuracy": float(np.mean(correct)), "n": len(judged), "correct": int(sum(correct)),
            "unparseable": sum(job["verdict"] is None for job in judged), "no_output": len(jobs) - len(judged),
            "chance": chance, "judge_model": judge_tag, "per_annotator": per_annotator}


def attach_judge(results: dict, ds: dict, jobs: list[dict], judge_reason: str | None, cfg: dict) -> None:
    judge_tag = common.model_configs(cfg)[0]["tag"]
    human_jobs = [job for job in jobs if job["method"] == HUMAN]
    human = judge_summary(human_jobs, ds["annotators"], judge_reason, judge_tag)
    for model_tag, methods in results.items():
        for method, result in methods.items():
            if method == HUMAN:
                summary = human
            else:
                mine = [j for j in jobs if j["model"] == model_tag and j["method"] == method]
                summary = judge_summary(mine, ds["annotators"], judge_reason, judge_tag)
            if result["status"] == "missing":
                summary = {"accuracy": None, "reason": result.get("reason", "missing"), "chance": summary["chance"]}
            result["judge"] = summary
            result["judge_attribution"] = summary["accuracy"]
            if summary["accuracy"] is None:
                result.setdefault("reasons", {})["judge_attribution"] = summary["reason"]
            for annotator, entry in result.get("per_annotator", {}).items():
                if entry.get("status") == "ok":
                    value = summary.get("per_annotator", {}).get(annotator)
                    entry["judge_attribution"] = value
                    if value is None:
                        entry["reasons"]["judge_attribution"] = (summary.get("reason")
                                                                 or "no sampled cell of this annotator")


# ----------------------------------------------------------------------------
# Tables: markdown + CSV; every cell is a value or says why not
# ----------------------------------------------------------------------------
TABLE4_METRICS = [("coverage", "coverage"), ("parse_rate", "parse rate"), ("label_acc", "label acc"),
                  ("mae", "MAE"), ("sign_acc", "sign acc"), ("rouge_l", "ROUGE-L"),
                  ("bertscore_f1", "BERTScore F1"), ("emb_cos", "emb cos"), ("feature_kl", "feature KL (lower better)"),
                  ("group_clf_conf", "group clf conf"), ("group_m", "group m"),
                  ("norm_imitation", "norm. imitation"), ("judge_attribution", "judge attribution")]
PER_ANNOTATOR_METRICS = [("n", "n")] + TABLE4_METRICS


def cell(result: dict, metric: str, task: dict) -> str:
    if result.get("status") == "missing":
        return f"missing: {result.get('reason', 'no predictions')}"
    if metric in ("label_acc",) and task["label_type"] != "categorical":
        return "n/a: label accuracy is for categorical tasks (numeric: MAE, sign acc)"
    if metric in ("mae", "sign_acc") and task["label_type"] == "categorical":
        return "n/a: MAE and sign accuracy are for numeric tasks (categorical: label acc)"
    value = result.get(metric)
    if value is None:
        reason = result.get("reasons", {}).get(metric, "not computed")
        return reason if reason.startswith("n/a: ") else f"missing: {reason}"
    return fmt(value)


def write_table(path_stem: Path, header: list[str], rows: list[list[str]], title: str, notes: list[str]) -> None:
    """CSV with every cell in full; markdown with "missing: why" / "n/a: why" cells shortened to
    "missing [k]" / "n/a [k]" and each distinct reason listed once under the table."""
    footnotes: dict[str, int] = {}

    def md_cell(text: str) -> str:
        text = str(text)
        for prefix in ("missing: ", "n/a: "):
            if text.startswith(prefix):
                number = footnotes.setdefault(text[len(prefix):], len(footnotes) + 1)
                text = f"{prefix[:-2]} [{number}]"
        return text.replace("|", "\\|").replace("\n", " ")

    body = ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *body, ""]
    lines += [f"- {note}" for note in notes]
    lines += [f"- [{number}] {reason}" for reason, number in footnotes.items()]
    common.atomic_write_text(path_stem.with_suffix(".md"), "\n".join(lines) + "\n")
    with common.atomic_path(path_stem.with_suffix(".csv")) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)


def ordered_methods(methods: dict) -> list[str]:
    return [m for m in methods if m != HUMAN] + ([HUMAN] if HUMAN in methods else [])


def result_cells(results: dict):
    """(dataset, model tag, method, result) for every table row group, methods in table order."""
    for dataset, models in results.items():
        for model_tag, methods in models.items():
            for method in ordered_methods(methods):
                yield dataset, model_tag, method, methods[method]


def method_label(method: str) -> str:
    return "human (target's test explanations)" if method == HUMAN else method


def table_notes(cfg: dict) -> list[str]:
    ev = cfg["eval"]
    return [
        "Per target annotator, then the mean over annotators. Unparsed outputs count as wrong "
        "(label), as the worst possible error (MAE) and are scored on their raw text (explanations).",
        "ROUGE-L (stemmed), BERTScore F1 "
        f"({ev['bertscore_model']}, layer {ev.get('bertscore_num_layers') or 'default'}) and embedding cosine: "
        "max over the target's reference explanations for the item.",
        f"Feature KL: KL(human || model) over {int(ev['feature_bins'])} fixed train-quantile bins "
        f"(smoothing {ev['kl_smoothing']}), averaged over {len(FEATURES)} features (our definition).",
        f"Group clf conf: probability of the target for averaged groups of m outputs "
        f"({ev['classifier_representation']}, {int(ev['bootstrap_groups'])} bootstrap groups; m = "
        f"eval.group_size {int(ev['group_size'])}, capped by what exists; 'group m' is the smallest m used). "
        "Norm. imitation = that confidence / the same for the target's human test explanations (our definition).",
        "Judge attribution: share of single outputs the judge attributes to the target annotator; "
        "chance = 1/annotators.",
    ]


def write_tables(cfg: dict, results: dict, datasets: dict, tables_dir: Path) -> dict[str, Path]:
    notes = table_notes(cfg)
    paths = {}
    # Table 4
    header = ["dataset", "model", "method", "status"] + [label for _, label in TABLE4_METRICS] + ["notes"]
    rows = []
    for dataset, model_tag, method, result in result_cells(results):
        task = datasets[dataset]["task"]
        rows.append([dataset, model_tag, method_label(method), result["status"]]
                    + [cell(result, metric, task) for metric, _ in TABLE4_METRICS]
                    + [result.get("note", "")])
    write_table(tables_dir / "table4_main", header, rows, "Table 4: main results (this run)", notes)
    paths["table4"] = tables_dir / "table4_main.md"

    # Table 6
    header = ["dataset", "model", "method", "status"] + list(FEATURES) + ["mean"]
    rows = []
    for dataset, model_tag, method, result in result_cells(results):
        if method == HUMAN:
            continue
        if result["status"] == "missing":
            rows.append([dataset, model_tag, method, "missing"]
                        + [f"missing: {result.get('reason')}"] * (len(FEATURES) + 1))
            continue
        by_feature = result.get("feature_kl_by_feature", {})
        rows.append([dataset, model_tag, method, result["status"]]
                    + [fmt(by_feature.get(name)) if by_feature.get(name) is not None
                       else f"missing: {result['reasons'].get('feature_kl', 'not computed')}"
                       for name in FEATURES] + [cell(result, "feature_kl", datasets[dataset]["task"])])
    write_table(tables_dir / "table6_feature_kl", header, rows, "Table 6: feature KL by feature, KL(human || model)",
                [notes[2], "Features: " + ", ".join(FEATURES) + " (label: the label/score distribution, with an "
                 "'unparsed' category)."])
    paths["table6"] = tables_dir / "table6_feature_kl.md"

    # Judge attribution
    header = ["dataset", "model", "method", "judged outputs", "correct", "accuracy", "chance",
              "unparseable verdicts", "cells without output", "judge model"]
    rows = []
    for dataset, model_tag, method, result in result_cells(results):
        judge = result.get("judge", {})
        if judge.get("accuracy") is None:
            why = "missing: " + judge.get("reason", "not computed")
            rows.append([dataset, model_tag, method_label(method), why, why, why, fmt(judge.get("chance")),
                         why, why, why])
            continue
        rows.append([dataset, model_tag, method_label(method), str(judge["n"]), str(judge["correct"]),
                     fmt(judge["accuracy"]), fmt(judge["chance"]), str(judge["unparseable"]),
                     str(judge["no_output"]), judge["judge_model"]])
    write_table(tables_dir / "judge_attribution", header, rows, "LLM-as-judge attribution",
                [f"The same {int(cfg['eval']['judge_items'])} sampled test cells (item, target annotator) for every "
                 f"method; the judge sees {int(cfg['eval']['judge_examples_per_annotator'])} train responses of each "
                 "annotator. Unparseable verdicts count as wrong.",
                 f"Paper (as summarised, PAPER_NOTES 10): CAPO about {PAPER_JUDGE['accuracy']} on VariErr "
                 f"(chance {PAPER_JUDGE['chance']}), above SFT and prompting."])
    paths["judge"] = tables_dir / "judge_attribution.md"

    # Per annotator
    header = ["dataset", "model", "method", "annotator", "status"] + [label for _, label in PER_ANNOTATOR_METRICS]
    rows = []
    for dataset, model_tag, method, result in result_cells(results):
        if result["status"] == "missing":  # one row, not one per annotator
            rows.append([dataset, model_tag, method_label(method), "all", "missing"]
                        + [f"missing: {result.get('reason', 'missing')}"] * len(PER_ANNOTATOR_METRICS))
            continue
        task = datasets[dataset]["task"]
        for annotator in datasets[dataset]["annotators"]:
            entry = result.get("per_annotator", {}).get(annotator)
            if entry is None or entry.get("status") != "ok":
                why = (entry or result).get("reason", "missing")
                rows.append([dataset, model_tag, method_label(method), annotator, "missing"]
                            + [f"missing: {why}"] * len(PER_ANNOTATOR_METRICS))
                continue
            rows.append([dataset, model_tag, method_label(method), annotator, "ok"]
                        + [cell(entry, metric, task) for metric, _ in PER_ANNOTATOR_METRICS])
    write_table(tables_dir / "per_annotator", header, rows, "Per-annotator breakdown", notes)
    paths["per_annotator"] = tables_dir / "per_annotator.md"
    return paths


# ----------------------------------------------------------------------------
# Figures: one bar chart per metric
# ----------------------------------------------------------------------------
FIGURE_METRICS = [m for m, _ in TABLE4_METRICS if m not in ("coverage", "group_m")]


def plot_metric(results: dict, datasets: dict, metric: str, label: str, path: Path) -> bool:
    panels = [d for d in results if metric not in ("label_acc",) or datasets[d]["task"]["label_type"] == "categorical"]
    panels = [d for d in panels if metric not in ("mae", "sign_acc") or datasets[d]["task"]["label_type"] == "numeric"]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], panels):
        models = results[dataset]
        methods = list(dict.fromkeys(m for per in models.values() for m in ordered_methods(per)))
        width = 0.8 / max(1, len(models))
        for j, (model_tag, per) in enumerate(models.items()):
            xs = np.arange(len(methods)) + j * width
            values = [per.get(m, {}).get(metric) for m in methods]
            ax.bar(xs, [v if v is not None else 0 for v in values], width, label=model_tag)
            for x, v in zip(xs, values):
                if v is None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(np.arange(len(methods)) + width * (len(models) - 1) / 2)
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.set_title(f"{dataset}: {label}")
        if metric in ("group_clf_conf", "judge_attribution"):
            chance = 1.0 / len(datasets[dataset]["annotators"])
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------
# Human validation sheet and its scoring
# ----------------------------------------------------------------------------
def rating_columns(n_raters: int) -> list[str]:
    return [f"{dim}_r{k}" for k in range(1, n_raters + 1) for dim in RATING_DIMENSIONS]


def sheet_has_ratings(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if any((value or "").strip() for key, value in row.items()
                   if key and key.split("_r")[0] in RATING_DIMENSIONS):
                return True
    return False


def write_human_sheet(cfg: dict, datasets: dict, predictions: dict, out_dir: Path) -> str:
    """Blinded sheet (CSV + HTML) and key. Returns a one-line status for the report."""
    ev = cfg["eval"]
    sheet_path = out_dir / "sheet.csv"
    if sheet_has_ratings(sheet_path):
        return f"{sheet_path} already holds ratings: left as it is (score it with --score-sheet)"
    n_raters = int(ev["human_sheet_raters"])
    rows, key_rows = [], []
    for name, ds in datasets.items():
        keys = sample_keys(ds, int(ev["human_sheet_items"]), stable_seed(cfg["seed"], "sheet", name))
        examples = train_examples(ds, 3, stable_seed(cfg["seed"], "sheet-ex", name))
        rng = random.Random(stable_seed(cfg["seed"], "sheet-shuffle", name))
        for item_id, annotator in keys:
            item = ds["items"][item_id]
            human = ds["references"][(item_id, annotator)][0]
            human_response = {"parse_ok": True, "label": human["label"], "explanation": human["explanation"]}
            candidates = [(None, HUMAN, human_response)]
            for (model_tag, method), by_annotator in predictions[name].items():
                match = next((p for p in by_annotator.get(annotator, []) if p["item_id"] == item_id), None)
                if match is not None:
                    candidates.append((model_tag, method, match))
            rng.shuffle(candidates)
            style = " | ".join(f"Label: {r['label']}. {r['explanation']}" for r in examples[annotator])
            for model_tag, method, prediction in candidates:
                rows.append({"dataset": name, "item_id": item_id, "target_annotator": annotator,
                             "text_a": item["text_a"], "text_b": item["text_b"], "target_style_examples": style,
                             "response": response_text(prediction, ds["task"]),
                             **{column: "" for column in rating_columns(n_raters)}})
                key_rows.append({"dataset": name, "item_id": item_id, "annotator": annotator,
                                 "model": model_tag or "", "method": method})
    width = max(4, len(str(len(rows))))
    for i, (row, key_row) in enumerate(zip(rows, key_rows), 1):
        row["sheet_id"] = key_row["sheet_id"] = f"S{i:0{width}d}"
    columns = ["sheet_id", "dataset", "item_id", "target_annotator", "text_a", "text_b", "target_style_examples",
               "response"] + rating_columns(n_raters)
    write_csv(sheet_path, columns, rows)
    write_csv(out_dir / "key.csv", ["sheet_id", "dataset", "item_id", "annotator", "model", "method"], key_rows)
    common.atomic_write_text(out_dir / "sheet.html", sheet_html(rows, n_raters))
    cells = {(r["dataset"], r["item_id"], r["target_annotator"]) for r in rows}
    return (f"{len(rows)} blinded responses to {len(cells)} test cells in {sheet_path} "
            f"(+ sheet.html; the key is {out_dir / 'key.csv'})")


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with common.atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def sheet_html(rows: list[dict], n_raters: int) -> str:
    low, high = RATING_SCALE
    parts = ["<!doctype html><meta charset='utf-8'><title>capo-kit human validation</title>",
             "<style>body{font-family:sans-serif;max-width:70em}td,th{border:1px solid #ccc;padding:4px;"
             "vertical-align:top}table{border-collapse:collapse}</style>",
             "<h1>Human validation sheet</h1>",
             f"<p>Rate each response {low}-{high} for <b>coherence</b> (is it a sound explanation?), "
             "<b>grounding</b> (does it rest on the two texts?) and <b>style</b> (does it read like the target "
             "annotator's examples?). Enter ratings in sheet.csv, columns "
             + ", ".join(rating_columns(n_raters)) + ". Responses are shuffled and blinded.</p>",
             "<table><tr><th>id</th><th>item</th><th>target's style examples</th><th>response</th></tr>"]
    for row in rows:
        parts.append(f"<tr><td>{html.escape(row['sheet_id'])}<br>{html.escape(row['target_annotator'])}</td>"
                     f"<td>{html.escape(row['text_a'])}<hr>{html.escape(row['text_b'])}</td>"
                     f"<td>{html.escape(row['target_style_examples'])}</td>"
                     f"<td>{html.escape(row['response']).replace(chr(10), '<br>')}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts) + "\n"


def score_sheet(sheet: Path, key_path: Path) -> dict:
    """Per-method mean ratings and rater agreement for a filled sheet; writes scores.json/.md."""
    from sklearn.metrics import cohen_kappa_score
    if not sheet.exists():
        raise InputError(f"{sheet}: sheet not found")
    if not key_path.exists():
        raise InputError(f"{key_path}: key file not found (pass --sheet-key)")
    with open(key_path, newline="", encoding="utf-8") as fh:
        key = {row["sheet_id"]: row for row in csv.DictReader(fh)}
    low, high = RATING_SCALE
    ratings = defaultdict(lambda: defaultdict(list))  # (dataset, model, method) -> dim -> values
    by_rater = defaultdict(dict)  # (dim, rater) -> sheet_id -> value
    raters = set()
    with open(sheet, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if "sheet_id" not in (reader.fieldnames or []):
            raise input_error(sheet, "no sheet_id column", line=1, field="sheet_id")
        for lineno, row in enumerate(reader, 2):
            sheet_id = row["sheet_id"]
            if sheet_id not in key:
                raise input_error(sheet, f"sheet_id {sheet_id} is not in {key_path}", line=lineno, field="sheet_id")
            entry = key[sheet_id]
            for column, value in row.items():
                match = re.fullmatch(r"(\w+)_r(\d+)", column or "")
                if not match or match.group(1) not in RATING_DIMENSIONS or not (value or "").strip():
                    continue
                try:
                    rating = int(value.strip())
                except ValueError:
                    rating = None
                if rating is None or not low <= rating <= high:
                    raise input_error(sheet, f"rating {value!r} is not an integer from {low} to {high}",
                                      line=lineno, field=column)
                dim, rater = match.group(1), int(match.group(2))
                raters.add(rater)
                ratings[(entry["dataset"], entry["model"], entry["method"])][dim].append(rating)
                by_rater[(dim, rater)][sheet_id] = rating
    methods = {}
    for (dataset, model_tag, method), dims in sorted(ratings.items()):
        methods[f"{dataset}/{model_tag or '-'}/{method}"] = {
            dim: {"mean": float(np.mean(dims[dim])), "n": len(dims[dim])} if dims.get(dim) else
            {"mean": None, "n": 0} for dim in RATING_DIMENSIONS}
    agreement = {}
    for dim in RATING_DIMENSIONS:
        pairs = []
        ordered = sorted(raters)
        for i, r1 in enumerate(ordered):
            for r2 in ordered[i + 1:]:
                both = sorted(set(by_rater[(dim, r1)]) & set(by_rater[(dim, r2)]))
                a = [by_rater[(dim, r1)][s] for s in both]
                b = [by_rater[(dim, r2)][s] for s in both]
                entry = {"raters": [r1, r2], "n": len(both)}
                if both:
                    entry["exact"] = float(np.mean([x == y for x, y in zip(a, b)]))
                    entry["within_1"] = float(np.mean([abs(x - y) <= 1 for x, y in zip(a, b)]))
                    if len(set(a) | set(b)) > 1:
                        entry["kappa_quadratic"] = float(cohen_kappa_score(a, b, weights="quadratic",
                                                                           labels=list(range(low, high + 1))))
                    else:
                        entry["kappa_quadratic"] = None
                        entry["reason"] = "every rating identical: kappa undefined"
                pairs.append(entry)
        agreement[dim] = pairs
    scores = {"sheet": str(sheet), "scale": [low, high], "raters": sorted(raters), "methods": methods,
              "agreement": agreement}
    out_dir = sheet.parent
    common.write_json(out_dir / "scores.json", scores)
    lines = ["## Human validation scores", "", "| dataset/model/method | " + " | ".join(RATING_DIMENSIONS) + " |",
             "|---|" + "---|" * len(RATING_DIMENSIONS)]
    for name, dims in methods.items():
        lines.append(f"| {name} | "
                     + " | ".join(f"{fmt(dims[d]['mean'], 2)} (n={dims[d]['n']})" for d in RATING_DIMENSIONS) + " |")
    lines += ["", "| dimension | raters | n | exact | within 1 | quadratic kappa |", "|---|---|---|---|---|---|"]
    for dim, pairs in agreement.items():
        for entry in pairs:
            kappa = entry.get("kappa_quadratic")
            kappa_text = fmt(kappa) if kappa is not None else entry.get("reason", "no shared ratings")
            lines.append(f"| {dim} | {entry['raters'][0]} vs {entry['raters'][1]} | {entry['n']} | "
                         f"{fmt(entry.get('exact'))} | {fmt(entry.get('within_1'))} | {kappa_text} |")
    if not agreement or not any(agreement.values()):
        lines.append("| - | fewer than two raters | - | - | - | - |")
    common.atomic_write_text(out_dir / "scores.md", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    print(f"[eval] wrote {out_dir / 'scores.json'} and scores.md", flush=True)
    return scores


# ----------------------------------------------------------------------------
# The claims check and report.md
# ----------------------------------------------------------------------------
def claims_check(results: dict, datasets: dict) -> list[list[str]]:
    """[dataset, model, claim, this run's numbers, verdict] for the paper's claims (PAPER_NOTES 7)."""
    rows = []
    for dataset, models in results.items():
        metric, higher, span = main_decision_metric(datasets[dataset]["task"])
        tolerance = KEPT_FRACTION_OF_RANGE * span
        for model_tag, methods in models.items():
            def get(method: str, name: str):
                result = methods.get(method)
                return None if result is None or result["status"] == "missing" else result.get(name)

            def best_prompting(name: str, higher_better: bool) -> tuple:
                scored = [(get(m, name), m) for m in PROMPTING_METHODS if get(m, name) is not None]
                if not scored:
                    return None, "none"
                return (max if higher_better else min)(scored)

            def add(claim: str, values: list[tuple], test) -> None:
                missing = [name for name, value in values if value is None]
                shown = "; ".join(f"{name} {fmt(value)}" for name, value in values)
                verdict = (("not testable: no value for " + ", ".join(missing)) if missing
                           else ("holds" if test(*[value for _, value in values]) else "does not hold"))
                rows.append([dataset, model_tag, claim, shown, verdict])

            best, which = best_prompting(metric, higher)
            add(f"prompting < SFT on the decision ({metric})",
                [("SFT", get("sft", metric)), (f"best prompting ({which})", best)],
                lambda sft, prompt: sft > prompt if higher else sft < prompt)
            best, which = best_prompting("norm_imitation", True)
            add("prompting < SFT on imitation (norm. imitation)",
                [("SFT", get("sft", "norm_imitation")), (f"best prompting ({which})", best)],
                lambda sft, prompt: sft > prompt)
            add("CAPO >= SFT on imitation (norm. imitation)",
                [("CAPO", get("capo", "norm_imitation")), ("SFT", get("sft", "norm_imitation"))],
                lambda capo, sft: capo >= sft)
            add(f"CAPO keeps SFT's decision quality ({metric}, tolerance {fmt(tolerance, 2)})",
                [("CAPO", get("capo", metric)), ("SFT", get("sft", metric))],
                lambda capo, sft: capo >= sft - tolerance if higher else capo <= sft + tolerance)
            best, which = best_prompting("judge_attribution", True)
            add("CAPO > SFT and prompting on judge attribution",
                [("CAPO", get("capo", "judge_attribution")), ("SFT", get("sft", "judge_attribution")),
                 (f"best prompting ({which})", best)],
                lambda capo, sft, prompt: capo > max(sft, prompt))
    return rows


def hlv_section(cfg: dict, datasets: dict, report_dir: Path) -> list[str]:
    lines = ["## 1. Human label variation (02_analyze_hlv)", ""]
    for dataset in datasets:
        folder = common.run_dir(cfg) / "hlv" / dataset
        lines.append(f"### {dataset}")
        if not (folder / "summary.json").exists():
            lines += ["", f"Not available: {folder}/summary.json is missing (run 02_analyze_hlv.py).", ""]
            continue
        for md in sorted(folder.glob("*.md")):
            text = md.read_text(encoding="utf-8").strip()
            lines += ["", re.sub(r"^(#+)", r"###\1", text, flags=re.MULTILINE), ""]
        for png in sorted(folder.glob("*.png")):
            lines += [f"![{dataset} {png.stem}]({png.relative_to(report_dir)})", ""]
    return lines


def paper_table4_markdown() -> list[str]:
    lines = ["**The paper's numbers** (Table 4 as summarised second-hand, PAPER_NOTES section 10; VariErr NLI; "
             "not computed by this kit):", "",
             "| model (paper) | method | label acc | feature KL (lower better) | group clf conf | norm. imitation |",
             "|---|---|---|---|---|---|"]
    for model, method, acc, kl, conf, imi in PAPER_TABLE4:
        lines.append(f"| {model} | {method} | {fmt(acc)} | {fmt(kl) if kl is not None else 'not reported'} | "
                     f"{fmt(conf) if conf is not None else 'not reported'} | "
                     f"{fmt(imi) if imi is not None else 'not reported'} |")
    return lines + [""]


def write_report(cfg: dict, results: dict, datasets: dict, table_paths: dict, figures: list[Path],
                 sheet_status: str, started: float) -> Path:
    run = common.run_dir(cfg)
    path = run / "report.md"

    def include(md_path: Path) -> list[str]:
        text = md_path.read_text(encoding="utf-8").strip()
        return [re.sub(r"^## ", "### ", text, flags=re.MULTILINE), ""]

    lines = [f"# capo-kit report: profile `{cfg['profile']}`", "",
             "A reproduction attempt of CAPO (arXiv 2605.28802). The paper's full text and code were not available: "
             "every metric marked 'our definition' is a reconstruction (see the README and 06_eval.py, block "
             "OUR DEFINITIONS). Numbers labelled 'paper' are the paper's, as summarised second-hand; all others were "
             "computed by this run.", "",
             f"Datasets: {', '.join(datasets)}. Models: {', '.join(m['tag'] for m in common.model_configs(cfg))}. "
             f"Judge: {common.model_configs(cfg)[0]['tag']} (the config's first model).", ""]
    claims = claims_check(results, datasets)
    lines += ["## At a glance: do the paper's claims hold in this run?", "",
              "| dataset | model | claim | this run | verdict |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in claims]
    lines += ["", "Single run, no significance test: small differences (and anything on the smoke profile, whose "
              "model is random) are noise.", ""]
    lines += hlv_section(cfg, datasets, run)
    lines += ["## 2. Main results (Table 4)", ""]
    if "varierr" in results:
        lines += paper_table4_markdown()
    lines += include(table_paths["table4"])
    lines += ["## 3. Feature KL by feature (Table 6)", "", "The paper's Table 6 was not recovered (PAPER_NOTES 7).", ""]
    lines += include(table_paths["table6"])
    lines += ["## 4. LLM-as-judge attribution", "",
              f"**Paper** (as summarised): CAPO about {PAPER_JUDGE['accuracy']} on VariErr, "
              f"chance {PAPER_JUDGE['chance']}.", ""]
    lines += include(table_paths["judge"])
    lines += ["## 5. Per-annotator breakdown", ""]
    lines += include(table_paths["per_annotator"])
    lines += ["## 6. Figures", ""]
    lines += [f"![{p.stem}]({p.relative_to(run)})" for p in figures] + [""]
    lines += ["## 7. Human validation", "", f"Sheet: {sheet_status}.", ""]
    scores = run / "human_eval" / "scores.md"
    if scores.exists():
        lines += include(scores)
    else:
        lines += ["Not rated yet. After rating: `python 06_eval.py --config "
                  f"{cfg.get('config_path', 'configs/<profile>.yaml')} --score-sheet {run / 'human_eval' / 'sheet.csv'}`. "
                  "Paper (as summarised, unverified): 82.8% agreement between two validators; CAPO judged more "
                  "coherent, better grounded and closer to the target's style.", ""]
    lines += ["## 8. Resolved config and package versions", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).strip(), "```", "",
              "| package | version |", "|---|---|"]
    lines += [f"| {name} | {version or 'not installed'} |" for name, version in common.package_versions().items()]
    lines += ["", f"git: {common.git_sha() or 'unknown'}. 06_eval took {time.time() - started:.0f}s.", ""]
    common.atomic_write_text(path, "\n".join(lines))
    return path


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = common.stage_parser(__doc__)
    parser.add_argument("--score-sheet", default=None, help="score a filled human-validation sheet and stop")
    parser.add_argument("--sheet-key", default=None, help="its key file (default: key.csv beside the sheet)")
    args, cfg = common.parse_stage_args(parser, argv)
    if args.score_sheet:
        sheet = Path(args.score_sheet)
        score_sheet(sheet, Path(args.sheet_key) if args.sheet_key else sheet.parent / "key.csv")
        return
    started = time.time()
    common.set_seed(cfg["seed"])
    run = common.run_dir(cfg)
    tables_dir = run / "tables"

    # ---- data
    datasets = {name: load_dataset(cfg, name) for name in common.selected_datasets(cfg, args.dataset)}

    # ---- metrics per dataset, model and method; then the judge over everything at once
    results, predictions, jobs = {}, {}, {}
    for name, ds in datasets.items():
        results[name], predictions[name] = evaluate_dataset(cfg, ds)
        jobs[name] = judge_jobs(cfg, ds, predictions[name])
    judge_reason = run_judge(cfg, [job for dataset_jobs in jobs.values() for job in dataset_jobs],
                             {name: ds["annotators"] for name, ds in datasets.items()})
    for name, ds in datasets.items():
        attach_judge(results[name], ds, jobs[name], judge_reason, cfg)
    common.write_jsonl(tables_dir / "judge_verdicts.jsonl",  # every reply, for auditing the judge
                       ({k: v for k, v in job.items() if k != "messages"} for dataset_jobs in jobs.values()
                        for job in dataset_jobs if "reply" in job))

    # ---- save: metrics.json, tables, figures, human sheet, report
    common.write_json(run / "metrics.json", results)
    table_paths = write_tables(cfg, results, datasets, tables_dir)
    figures = []
    for metric, label in TABLE4_METRICS:
        if metric in FIGURE_METRICS and plot_metric(results, datasets, metric, label, tables_dir / f"fig_{metric}.png"):
            figures.append(tables_dir / f"fig_{metric}.png")
    sheet_status = write_human_sheet(cfg, datasets, predictions, run / "human_eval")
    common.save_resolved_config(cfg, tables_dir, stage="06_eval")
    report = write_report(cfg, results, datasets, table_paths, figures, sheet_status, started)
    print(f"[eval] wrote {run / 'metrics.json'}, {tables_dir}/ and {report} in {time.time() - started:.0f}s",
          flush=True)


if __name__ == "__main__":
    common.run_stage(main)
