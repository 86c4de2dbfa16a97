"""06_eval.py: every metric with its 95% interval, the LLM judge, the claims check and the report.

    python 06_eval.py --config configs/cpu.yaml --dataset all            # varierr + par
    python 06_eval.py --config configs/cpu.yaml --score-ratings runs/cpu/human_eval/ratings-*.json
    accelerate launch 06_eval.py --config configs/paper.yaml             # the judge shared out over processes

Scores predictions/<dataset>/<model>/<method>/ (03-05, any other method folder; a missing method is a row that
says why) against data/ (01) into metrics.json (docs/DESIGN.md), tables/, figures, the human-validation form
and report.md (laid out by eval_report.py); with data.split lewidi also the shared task's view and submission
files. --score-ratings scores the form's exports. Every definition the paper does not give is in OUR DEFINITIONS.
"""
from __future__ import annotations

import itertools
import random
import re
import time
import warnings
import zlib
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

import common
import endpoint_judge
import engine
import eval_report
import patches
from common import InputError, input_error
from eval_report import HUMAN, primary_group_size, requested_group_sizes

PROMPTING_METHODS = ("base", "icl", "vp", "vp_icl")
TRAINED_METHODS = ("sft", "capo")
STAGE_OF_METHOD = {**{m: "03_prompt_baselines" for m in PROMPTING_METHODS},
                   **{m + kind: f"0{4 + i}_{m}" for i, m in enumerate(TRAINED_METHODS) for kind in ("", "_shared")},
                   "capo_all": "05_capo"}


# ==== OUR DEFINITIONS ===================================================================================
# The paper's formulas, word lists, bins, judge prompt and human protocol are not public: every
# reconstruction is in this block (the human-validation protocol in HUMAN VALIDATION below), to be
# swapped when the paper's code appears; docs/CHOICES.md lists each one.

# -- The metric registry, from which the tables, figures, results rows, claims and report are made.
#    kind: item (a mean over test rows), similarity (of the best match with the target's references),
#    distribution (feature KL), group (one value per requested m), judge, info. human_row: the human
#    reference row has it. decision "main": a task's decision metric in the claims. claim: an imitation
#    claim is checked on it. chance: figures draw 1/annotators. interval_may_miss: the value need not
#    lie in its interval (feature KL: a resample repeats items, which biases its KL upwards).
class Metric(NamedTuple):
    name: str
    label: str
    higher_is_better: bool | None
    kind: str = "item"
    tasks: tuple[str, ...] = ("categorical", "numeric")
    human_row: bool = False
    decision: str = ""
    claim: bool = False
    table: bool = True
    figure: bool = True
    chance: bool = False
    interval_may_miss: bool = False


METRICS = (
    Metric("coverage", "coverage", True, figure=False),
    Metric("parse_rate", "parse rate", True),
    Metric("label_acc", "label acc", True, tasks=("categorical",), decision="main"),
    Metric("mae", "MAE", False, tasks=("numeric",), decision="main"),
    Metric("sign_acc", "sign acc", True, tasks=("numeric",), decision="yes"),
    Metric("rouge_l", "ROUGE-L", True, kind="similarity"),
    Metric("bertscore_f1", "BERTScore F1", True, kind="similarity"),
    Metric("emb_cos", "emb cos", True, kind="similarity"),
    Metric("feature_kl", "feature KL (lower better)", False, kind="distribution", claim=True, interval_may_miss=True),
    Metric("group_clf_conf", "group clf conf", True, kind="group", human_row=True, claim=True, chance=True),
    Metric("group_m", "group m", None, kind="info", human_row=True, figure=False),
    Metric("norm_imitation", "norm. imitation", True, kind="group", human_row=True, claim=True),
    Metric("group_accuracy", "group accuracy", True, kind="group", human_row=True, table=False, figure=False),
    Metric("human_group_clf_conf", "human group clf conf", True, kind="group", human_row=True, table=False,
           figure=False),
    Metric("judge_attribution", "judge attribution", True, kind="judge", human_row=True, claim=True, chance=True),
)
METRIC = {metric.name: metric for metric in METRICS}
SIMILARITY_METRICS = tuple(m.name for m in METRICS if m.kind == "similarity")
GROUP_METRICS = tuple(m.name for m in METRICS if m.kind == "group")
ROW_KINDS = ("item", "similarity", "distribution")  # scored from a method's rows, per target


def task_metrics(task: dict, kinds: tuple[str, ...] = (*ROW_KINDS, "group", "info", "judge")) -> list[Metric]:
    """The registry's metrics that apply to `task`, of the given kinds, in registry order."""
    return [m for m in METRICS if task["label_type"] in m.tasks and m.kind in kinds]


# -- Unparsed outputs are never dropped: a wrong label (accuracy, sign), the worst possible error (MAE),
#    an "unparsed" label category (feature KL); their raw text is scored as the explanation.
UNPARSED = "unparsed"


def explanation_text(prediction: dict) -> str:
    """The explanation every text metric reads: the parsed one, else the raw output."""
    if prediction.get("parse_ok") and prediction.get("explanation"):
        return common.normalize_text(prediction["explanation"])
    return common.normalize_text(prediction.get("output") or "")


def decision_outcome(label, target_labels: list, task: dict) -> dict:
    """Categorical: right if in the target's label set; numeric: the error against its (mean) score, and the sign."""
    if task["label_type"] == "categorical":
        return {"correct": label is not None and label in target_labels}
    low, high = task["score_range"]
    target = float(np.mean(target_labels))
    if label is None:
        return {"abs_error": max(target - low, high - target), "sign_correct": False}
    return {"abs_error": abs(label - target), "sign_correct": bool(np.sign(label) == np.sign(target))}


# -- Explanation-style features (the paper names length, modality/hedging, lexical diversity and reuse;
#    word lists and tokenisation are ours), binned at quantiles of the human TRAIN explanations.
#    Feature KL: KL(human || model) in nats per feature, averaged over the features.
HEDGE_WORDS = frozenset("may might can could would possibly perhaps maybe likely unlikely probably "
                        "seem seems seemed appear appears suggest suggests".split())
NEGATION_WORDS = frozenset("not no never none nothing neither nor cannot without nobody".split())
WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
STYLE_FEATURES = ("length_words", "hedge_rate", "type_token_ratio", "input_overlap", "negation_rate")
FEATURES = STYLE_FEATURES + ("label",)


def style_features(explanation: str, text_a: str, text_b: str) -> dict[str, float]:
    """Length in words; hedge/modal, negation and input-reuse rates per word; type-token ratio."""
    tokens = WORD_RE.findall(explanation.lower())
    n = len(tokens)
    if n == 0:
        return dict.fromkeys(STYLE_FEATURES, 0.0)
    input_vocab = set(WORD_RE.findall(text_a.lower())) | set(WORD_RE.findall(text_b.lower()))
    return {"length_words": float(n),
            "hedge_rate": sum(t in HEDGE_WORDS for t in tokens) / n,
            "type_token_ratio": len(set(tokens)) / n,
            "input_overlap": sum(t in input_vocab for t in tokens) / n,
            "negation_rate": sum(t in NEGATION_WORDS or t.endswith("n't") for t in tokens) / n}


def style_values(rows: list[dict]) -> dict[str, list[float]]:
    """{feature: its value for each row} of rows (or records) with explanation, text_a and text_b."""
    values = defaultdict(list)
    for row in rows:
        for name, value in style_features(row["explanation"], row["text_a"], row["text_b"]).items():
            values[name].append(value)
    return values


def feature_bin_edges(train_values: dict[str, list[float]], n_bins: int) -> dict[str, np.ndarray]:
    """Interior bin edges at quantiles of the human train explanations; the outer bins are open."""
    quantiles = np.linspace(0, 1, n_bins + 1)[1:-1]
    return {name: np.unique(np.quantile(np.asarray(values, dtype=float), quantiles))
            for name, values in train_values.items()}


def label_categories(task: dict) -> list:
    if task["label_type"] == "categorical":
        return list(task["labels"]) + [UNPARSED]
    low, high = task["score_range"]
    return list(range(low, high + 1)) + [UNPARSED]


def kl_divergence(human_counts: np.ndarray, model_counts: np.ndarray, smoothing: float):
    """KL(human || model) over the last axis, `smoothing` added to both distributions before renormalising."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p = human_counts / human_counts.sum(axis=-1, keepdims=True) + smoothing
        q = model_counts / model_counts.sum(axis=-1, keepdims=True) + smoothing
        p, q = p / p.sum(axis=-1, keepdims=True), q / q.sum(axis=-1, keepdims=True)
        return np.sum(p * np.log(p / q), axis=-1)


# -- Group classifier confidence: 02's annotator classifier trained on the human TRAIN responses in
#    eval.classifier_representation (E3); outputs and human test responses have the mean of the HUMAN
#    test responses to their item subtracted. Groups of m outputs of one target are averaged and
#    classified; the metric is the mean probability of the target, at every m of eval.group_sizes
#    (`<metric>_m<m>`; the plain names: the largest). Each m is capped at floor(eval.group_size_max_share
#    x n), n = min(the target's outputs, its human test responses): a group is a real subsample, never the
#    whole set (which saturates at 0 or 1). Normalised imitation (our ImiScore): that confidence over the
#    same for the target's held-out human test explanations at the same m, not clipped.
def check_eval_config(cfg: dict) -> None:
    """eval.group_sizes, eval.group_size_max_share and eval.judge hold values that can work."""
    ev, where = cfg["eval"], cfg.get("config_path", "config")
    sizes, judge = ev["group_sizes"], ev["judge"]
    if not isinstance(sizes, list) or not sizes or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
                                                           for m in sizes):
        raise input_error(where, "must be a non-empty list of positive integers", field="eval.group_sizes")
    share = ev["group_size_max_share"]
    if not 0 < float(share) <= 1:
        raise input_error(where, f"must be in (0, 1], got {share}", field="eval.group_size_max_share")
    if judge["backend"] not in ("local", "openai", "none"):
        raise input_error(where, f"{judge['backend']!r} is not one of local, openai, none", field="eval.judge.backend")
    if judge["backend"] == "local" and judge["model"] not in [None, *(m["tag"] for m in common.model_configs(cfg))]:
        raise input_error(where, f"{judge['model']!r} is not a model tag of this config", field="eval.judge.model")
    for key in ("base_url", "model") if judge["backend"] == "openai" else ():
        if not judge[key]:
            raise input_error(where, "needed by backend openai", field=f"eval.judge.{key}")


def capped_group_size(requested: int, n_outputs: int, n_human: int, share: float) -> tuple[int | None, str | None]:
    """(m used, None) or (None, why not)."""
    if n_outputs == 0:
        return None, "no outputs"
    if n_human == 0:
        return None, "no human test responses"
    n = min(n_outputs, n_human)
    cap = int(np.floor(share * n + 1e-9))
    if cap < 1:
        return None, (f"too few responses for a group that is a real subsample: m={requested} capped at "
                      f"floor({share:g} x n={n}) = {cap} "
                      f"(n = min(outputs {n_outputs}, human test responses {n_human}))")
    return min(int(requested), cap), None


def normalised_imitation(model_confidence: float | None, human_confidence: float | None) -> float | None:
    if model_confidence is None or not human_confidence:
        return None
    return model_confidence / human_confidence


# -- LLM-as-judge attribution: the judge sees k TRAIN responses of every annotator (label and explanation,
#    no item text), then one response with its item, and names the annotator: a forced choice, the reply
#    constrained to one of the IDs (engine.ReplyConstraint) and chosen greedily. The calibration row:
#    the targets' own responses.
JUDGE_MAX_ANNOTATORS = 16  # the prompt shows every annotator's examples; with more, the judge is reported missing


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
    return {a.lower(): a for a in annotators}[match.group(1).lower()] if match else None


# -- Uncertainty: a percentile bootstrap over test items, stratified by target, seeded per (dataset, target)
#    so that every method is scored on the same resamples (paired). Group metrics keep the classifier and
#    redraw their groups in each resample; feature KL rebuilds both histograms in each resample.
CI_LEVEL = 0.95
CI_MIN_DEFINED = 0.9  # an interval needs the metric defined on >= 90% of the resamples

# -- Claims: paired differences a - b with their interval. Superiority holds when the interval excludes 0
#    in the claimed direction, is contradicted when it excludes 0 the other way. Non-inferiority ("CAPO
#    keeps SFT's decision quality") allows a margin of this share of the metric's range.
KEPT_FRACTION_OF_RANGE = 0.02
# A group-metric claim is not resolved when both methods' per-target confidences all lie within this of
# 0 or 1: saturated, it counts annotators (the smaller m of tables/group_sizes still grade).
SATURATION_TOLERANCE = 0.01
# ==== END OF OUR DEFINITIONS ============================================================================


def stable_seed(base: int, *parts) -> int:
    """A seed per purpose, independent of Python's hash randomisation."""
    return (int(base) + zlib.crc32("/".join(map(str, parts)).encode())) % (2 ** 32)


def main_decision_metric(task: dict) -> tuple[str, bool, float]:
    """(metric, higher is better, range of the metric): the registry's main decision metric."""
    metric = next(m for m in task_metrics(task, ("item",)) if m.decision == "main")
    span = 1.0 if task["label_type"] == "categorical" else float(task["score_range"][1] - task["score_range"][0])
    return metric.name, metric.higher_is_better, span


# ---- Data: human splits and predictions -------------------------------------------------------------
def load_dataset(cfg: dict, dataset: str) -> dict:
    task = common.load_task(cfg, dataset)
    train, test = common.load_split(cfg, dataset, "train"), common.load_eval_split(cfg, dataset, "test")
    for record in test + train:
        record["label"] = common.normalize_label(record["label"], task)
    references, items = defaultdict(list), {}
    for record in test:
        references[(record["item_id"], record["annotator"])].append(record)
        items.setdefault(record["item_id"], record)
    annotators = common.dataset_annotators(cfg, dataset)
    # The bootstrap's units: each target's test items (those with a human reference), sorted.
    target_items = {a: sorted({item for item, ann in references if ann == a}) for a in annotators}
    return {"name": dataset, "task": task, "annotators": annotators, "train": train, "test": test,
            "everyone": common.all_annotators(cfg, dataset),  # the judge's and the raters' candidates
            "references": dict(references), "items": items, "target_items": target_items}


def expected_methods(cfg: dict) -> list[str]:
    """The prompting methods, then SFT and CAPO per annotator and shared, as `adapters` asks."""
    return [*cfg["baselines"]["methods"], *(m for kind, suffix in (("per_annotator", ""), ("shared", "_shared"))
                                            if kind in cfg["adapters"] for m in (f"sft{suffix}", f"capo{suffix}"))]


def load_predictions(cfg: dict, ds: dict, model_tag: str, method: str) -> tuple[dict, dict]:
    """({annotator: [prediction]}, {annotator: why missing}); stale predictions are refused."""
    found, missing = {}, {}
    folder = common.method_dir(cfg, ds["name"], model_tag, method)
    for annotator in ds["annotators"]:
        path = common.predictions_path(cfg, ds["name"], model_tag, method, annotator)
        if not path.exists():
            where = folder.relative_to(common.run_dir(cfg))
            stage = STAGE_OF_METHOD.get(method, "the stage that writes it")
            missing[annotator] = (f"{path.name} missing in {where}/" if folder.is_dir()
                                  else f"no predictions ({where}/ does not exist; run {stage})")
            continue
        common.require_current(path, cfg, redo_command(cfg, ds["name"], method, annotator))
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


def redo_command(cfg: dict, dataset: str, method: str, annotator: str) -> str:
    """The command that remakes one predictions file."""
    stage = STAGE_OF_METHOD.get(method)
    if stage is None:
        return f"the stage that wrote predictions/{dataset}/.../{method}/"
    per_annotator = stage != "03_prompt_baselines" and not method.endswith("_shared")
    args = ["--dataset", dataset, *(["--annotators", annotator] if per_annotator else []),
            *(["--capo.pair_policy", "all"] if method == "capo_all" else [])]
    return common.stage_command(cfg, f"{stage}.py", *args)


def output_rows(ds: dict, prediction_sets: list[dict]) -> tuple[list[dict], dict]:
    """(a scored row per prediction with a human reference, per annotator the count of those without one)."""
    rows, unmatched = [], defaultdict(int)
    for annotator, preds in ((a, p) for predictions in prediction_sets for a, p in predictions.items()):
        for prediction in preds:
            references = ds["references"].get((prediction["item_id"], annotator))
            if not references:
                unmatched[annotator] += 1
                continue
            item = ds["items"][prediction["item_id"]]
            rows.append({"annotator": annotator, "item_id": prediction["item_id"], "label": prediction["label"],
                         "parse_ok": bool(prediction["parse_ok"]), "explanation": explanation_text(prediction),
                         "references": [r["explanation"] for r in references],
                         "target_labels": [r["label"] for r in references],
                         "text_a": item["text_a"], "text_b": item["text_b"]})
    return rows, dict(unmatched)


def load_method_predictions(cfg: dict, ds: dict) -> dict:
    """{(model, method): (first seed's predictions, missing, rows, unmatched, (rows, unmatched) per seed)}."""
    seeds, loaded = common.training_seeds(cfg), {}
    for tag in (model_cfg["tag"] for model_cfg in common.model_configs(cfg)):
        methods = expected_methods(cfg)
        for seed in seeds:
            folder = common.method_dir(common.with_seed(cfg, seed), ds["name"], tag, "x").parent
            if folder.is_dir():
                methods += sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in methods)
        for method in methods:
            per_seed = [load_predictions(common.with_seed(cfg, seed), ds, tag, method) for seed in seeds]
            missing = {}
            for seed, (_, seed_missing) in zip(seeds, per_seed):
                for annotator, why in seed_missing.items():
                    missing.setdefault(annotator, why + (f" (seed {seed})" if len(seeds) > 1 else ""))
            seed_sets = [{a: p for a, p in predictions.items() if a not in missing} for predictions, _ in per_seed]
            seed_rows = [output_rows(ds, [predictions]) for predictions in seed_sets]
            unmatched = {a: sum(u.get(a, 0) for _, u in seed_rows) for a in ds["annotators"]}
            loaded[(tag, method)] = (seed_sets[0], missing, [row for rows, _ in seed_rows for row in rows],
                                     {a: n for a, n in unmatched.items() if n}, seed_rows)
    return loaded


# ---- Reference similarity: the max over the target's references ---------------------------------------
def rouge_l(outputs: list[str], references: list[list[str]]) -> list[float]:
    """ROUGE-L F1 (rouge-score, Porter stemming); an empty output scores 0."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score_multi(refs, out)["rougeL"].fmeasure if out.strip() else 0.0
            for out, refs in zip(outputs, references)]


def bertscore_f1(outputs: list[str], references: list[list[str]], ev: dict) -> tuple[list[float] | None, str | None]:
    """BERTScore F1 (no idf, no rescaling), an empty output 0; (None, reason) if it cannot run."""
    if not ev["bertscore"]:
        return None, "disabled (eval.bertscore: false)"
    # Each distinct (output, references) pair is scored once: methods often repeat outputs.
    pairs = list(dict.fromkeys((out, tuple(refs)) for out, refs in zip(outputs, references) if out.strip()))
    if not pairs:
        return [0.0] * len(outputs), None
    spec = ev["bertscore_model"]
    try:
        import bert_score
        model = str(common.package_dir(spec.split(":", 1)[1]) / "model") if spec.startswith("package:") else spec
        with patches.bert_score_in_input_order():
            _, _, f1 = bert_score.score([out for out, _ in pairs], [list(refs) for _, refs in pairs],
                                        model_type=model, num_layers=ev["bertscore_num_layers"],
                                        batch_size=64, device=common.default_device(), verbose=False)
    except Exception as err:  # a missing model or an offline hub must not stop the report
        return None, f"bert-score could not run with {spec}: {type(err).__name__}: {err}"
    score_of = dict(zip(pairs, f1.tolist()))
    return [float(score_of[(out, tuple(refs))]) if out.strip() else 0.0
            for out, refs in zip(outputs, references)], None


def embedding_cosine(cfg: dict, outputs: list[str], references: list[list[str]], cache_dir: Path) -> list[float]:
    """Cosine of the output's and each reference's sentence embedding (max); an empty output scores 0."""
    unique = list(dict.fromkeys([t for t in outputs if t.strip()] + [t for refs in references for t in refs]))
    if not unique:
        return [0.0] * len(outputs)
    vectors = common.embed_texts(cfg, unique, cache_dir)
    index = {text: i for i, text in enumerate(unique)}
    return [float(max(vectors[index[out]] @ vectors[index[ref]] for ref in refs)) if out.strip() else 0.0
            for out, refs in zip(outputs, references)]


def score_rows(cfg: dict, rows: list[dict], cache_dir: Path) -> str | None:
    """Adds the similarity metrics to every row; returns why BERTScore is missing, if it is."""
    outputs, references = [row["explanation"] for row in rows], [row["references"] for row in rows]
    rouge = rouge_l(outputs, references)
    bert, bert_reason = bertscore_f1(outputs, references, cfg["eval"])
    cosine = embedding_cosine(cfg, outputs, references, cache_dir)
    for row, values in zip(rows, zip(rouge, bert or [None] * len(rows), cosine)):
        row.update(zip(SIMILARITY_METRICS, values))
    return bert_reason


# ---- The bootstrap: shared resamples, statistics on per-row score arrays ---------------------------
def resample_plan(cfg: dict, ds: dict) -> dict[str, dict]:
    """{annotator: {"slots": (B, n) item positions drawn, "weights": (B, n) how often each item was drawn}}."""
    n_resamples, plan = int(cfg["eval"]["bootstrap_resamples"]), {}
    for annotator, items in ds["target_items"].items():
        n = len(items)
        rng = np.random.default_rng(stable_seed(cfg["seed"], "bootstrap", ds["name"], annotator))
        slots = rng.integers(0, max(n, 1), size=(n_resamples, n))
        flat = (np.arange(n_resamples)[:, None] * n + slots).ravel()
        weights = np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n).astype(float)
        plan[annotator] = {"slots": slots, "weights": weights}
    return plan


def interval(draws: np.ndarray | None) -> list[float] | None:
    """The percentile interval of bootstrap draws; None if undefined on over 1 - CI_MIN_DEFINED of them."""
    if draws is None or len(draws) == 0:
        return None
    finite = draws[np.isfinite(draws)]
    if len(finite) < CI_MIN_DEFINED * len(draws):
        return None
    tail = 100 * (1 - CI_LEVEL) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def weighted_sums(item: np.ndarray, values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum of per-row `values`, number of rows) when item i's rows count weights[..., i] times."""
    n = weights.shape[-1]
    sums, counts = np.bincount(item, weights=values, minlength=n), np.bincount(item, minlength=n).astype(float)
    return weights @ sums, weights @ counts


def weighted_means(item: np.ndarray, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The mean of per-row `values` under item weights: (k,) for (k, n) weights."""
    return ratio(*weighted_sums(item, values, weights))


def weighted_kl(human_bins: tuple, human_item: np.ndarray, model_bins: tuple, model_item: np.ndarray,
                weights: np.ndarray, smoothing: float) -> np.ndarray:
    """KL(human || model) of one feature's histograms, both rebuilt from the resampled items."""
    def histogram(item, bins):
        table = np.zeros((weights.shape[-1], human_bins[1]))
        np.add.at(table, (item, bins), 1.0)
        return weights @ table

    return kl_divergence(histogram(human_item, human_bins[0]), histogram(model_item, model_bins[0]), smoothing)


# ---- Aggregation-aware imitation: feature KL and group classifier confidence ---------------------------
def feature_bins(rows: list[dict], edges: dict) -> dict[str, tuple[np.ndarray, int]]:
    """{feature: (each row's bin, number of bins)}: a resample's histogram is a weighted bincount."""
    values = style_values(rows)
    bins = {name: (np.digitize(np.asarray(values[name], dtype=float), edges[name]).astype(int), len(edges[name]) + 1)
            for name in STYLE_FEATURES}
    index = {category: i for i, category in enumerate(edges["label"])}
    bins["label"] = (np.array([index[UNPARSED if row["label"] is None else row["label"]] for row in rows], dtype=int),
                     len(edges["label"]))
    return bins


def imitation_reference(cfg: dict, ds: dict, cache_dir: Path) -> dict:
    """The annotator classifier trained on human train responses, and the human test space."""
    representation = cfg["eval"]["classifier_representation"]
    train_X, _ = common.representation_vectors(cfg, ds["train"], representation, cache_dir)
    clf = common.fit_annotator_classifier(cfg["hlv"], train_X, [r["annotator"] for r in ds["train"]], int(cfg["seed"]))
    test_X, test_means = common.representation_vectors(cfg, ds["test"], representation, cache_dir)
    human_X = {a: test_X[[i for i, r in enumerate(ds["test"]) if r["annotator"] == a]] for a in ds["annotators"]}
    return {"clf": clf, "means": test_means, "human_X": human_X, "representation": representation, "cache": {}}


def group_metric_names(ev: dict) -> list[str]:
    """The group metrics: the plain names, then `<metric>_m<m>` for every requested m."""
    return [*GROUP_METRICS, *(f"{metric}_m{m}" for m in requested_group_sizes(ev) for metric in GROUP_METRICS)]


def group_entry(cfg: dict, ds: dict, imitation: dict, annotator: str, logits: np.ndarray | None, item: np.ndarray,
                plan: dict, human: dict, salt: tuple) -> tuple[dict, dict]:
    """(one target's group metrics, their (B,) draws): `<metric>_m<m>` per requested m, the plain names
    for the largest, `group_m_used` {m: m used}. Values and draws come from one sampler, common.group_scores,
    on the observed items and on their resamples. `logits` None: the outputs are the target's own human
    test responses (the human reference row)."""
    ev, reference = cfg["eval"], human["targets"][annotator]
    classes = [str(c) for c in imitation["clf"].classes_]
    own = logits is None
    if own:
        logits, item = reference["logits"], reference["item"]
    slots = plan[annotator]["slots"]
    observed = np.arange(slots.shape[1])[None, :]  # every item once: the observed data
    capped = {requested: capped_group_size(requested, len(item), len(reference["item"]),
                                           float(ev["group_size_max_share"])) if annotator in classes else
              (None, f"{annotator} has no train responses, so the classifier has no such class")
              for requested in requested_group_sizes(ev)}
    sizes = sorted({m for m, _ in capped.values() if m is not None})
    column = classes.index(annotator) if sizes else None

    def human_side(resamples: np.ndarray, groups: int, seed: int, tag: str) -> dict:
        """The target's human test responses, scored once per m for every method (cached)."""
        cache = imitation["cache"]
        todo = [m for m in sizes if (tag, annotator, m) not in cache]
        if todo:
            cache.update({(tag, annotator, m): value for m, value in common.group_scores(
                reference["logits"], reference["item"], resamples, column, todo, groups, seed).items()})
        return {m: cache[(tag, annotator, m)] for m in sizes}

    n_groups, n_draws = int(ev["bootstrap_groups"]), int(ev["bootstrap_group_draws"])
    point_seed = stable_seed(cfg["seed"], "group", ds["name"], annotator)
    model_point = model_draws = human_point = human_draws = {}
    if sizes:
        human_point = human_side(observed, n_groups, point_seed, "point")
        human_draws = human_side(slots, n_draws, stable_seed(cfg["seed"], "group-bootstrap-human", ds["name"],
                                                             annotator), "bootstrap")
        model_point = human_point if own else common.group_scores(logits, item, observed, column, sizes, n_groups,
                                                                  point_seed)
        model_draws = human_draws if own else common.group_scores(
            logits, item, slots, column, sizes, n_draws,
            stable_seed(cfg["seed"], "group-bootstrap", ds["name"], annotator, *salt))
    entry, draws, reasons, used = {}, {}, {}, {}
    for requested, (m, why) in capped.items():
        used[str(requested)] = m
        values = dict.fromkeys(GROUP_METRICS, (None, None))
        if m is not None:
            conf, human_conf = float(model_point[m]["conf"][0]), float(human_point[m]["conf"][0])
            values = {"group_clf_conf": (conf, model_draws[m]["conf"]),
                      "group_accuracy": (float(model_point[m]["accuracy"][0]), model_draws[m]["accuracy"]),
                      "human_group_clf_conf": (human_conf, human_draws[m]["conf"]),
                      "norm_imitation": (normalised_imitation(conf, human_conf),
                                         ratio(model_draws[m]["conf"], human_draws[m]["conf"]))}
        for metric, (value, resamples) in values.items():
            entry[f"{metric}_m{requested}"] = value
            if m is None:
                reasons[f"{metric}_m{requested}"] = why
            else:
                draws[f"{metric}_m{requested}"] = resamples
        if requested == primary_group_size(ev):
            entry["group_m"] = m or 0
            for metric in GROUP_METRICS:
                entry[metric] = entry[f"{metric}_m{requested}"]
                for found in (reasons, draws):
                    if f"{metric}_m{requested}" in found:
                        found[metric] = found[f"{metric}_m{requested}"]
    return {**entry, "group_m_used": used, "reasons": reasons}, draws


# ---- One dataset: every method's metrics per target, their macro averages -------------------------------
REFERENCE_ROW_NA = "n/a: reference row (the target's own test explanations); only imitation and the judge apply"


def score_arrays(rows: list[dict], items: list[str], task: dict, edges: dict) -> dict:
    """Per-row scores of one target's rows as numpy arrays, with each row's item position."""
    position = {item: i for i, item in enumerate(items)}
    outcomes = [decision_outcome(r["label"], r["target_labels"], task) for r in rows]
    values = {"parse_rate": [r["parse_ok"] for r in rows]}
    if task["label_type"] == "categorical":
        values["label_acc"] = [o["correct"] for o in outcomes]
    else:
        values.update(mae=[o["abs_error"] for o in outcomes], sign_acc=[o["sign_correct"] for o in outcomes])
    for metric in SIMILARITY_METRICS:
        if rows and all(r.get(metric) is not None for r in rows):
            values[metric] = [r[metric] for r in rows]
    return {"item": np.array([position[r["item_id"]] for r in rows], dtype=int), "bins": feature_bins(rows, edges),
            "values": {k: np.asarray(v, dtype=float) for k, v in values.items()}}


def target_entry(cfg: dict, ds: dict, annotator: str, rows: list[dict] | None, plan: dict, human: dict,
                 imitation: dict | None, imitation_reason: str | None, X, unmatched: int) -> tuple[dict, dict]:
    """(one method's metrics for one target, their (B,) draws); `rows` None: the human reference row."""
    ev, reference = cfg["eval"], human["targets"][annotator]
    if rows is None:
        arrays, draws = reference, {}
        entry = {"status": "ok", "n": int(len(reference["item"])), "reasons": {}}
        for metric in task_metrics(ds["task"], ROW_KINDS):
            entry[metric.name], entry["reasons"][metric.name] = None, REFERENCE_ROW_NA
        entry["feature_kl_by_feature"] = dict.fromkeys(FEATURES)
    else:
        items, weights = ds["target_items"][annotator], plan[annotator]["weights"]
        ones, arrays = np.ones(len(items)), score_arrays(rows, items, ds["task"], human["edges"])
        entry = {"status": "ok", "n": len(rows), "unmatched_predictions": unmatched, "reasons": {}}
        has_rows = (np.bincount(arrays["item"], minlength=len(items)) > 0).astype(float)
        entry["coverage"] = float(has_rows.mean()) if items else None
        draws = {"coverage": ratio(weights @ has_rows, weights.sum(axis=1))}
        for metric, values in arrays["values"].items():
            entry[metric] = float(weighted_means(arrays["item"], values, ones))
            draws[metric] = weighted_means(arrays["item"], values, weights)
        for metric in SIMILARITY_METRICS:
            if metric not in entry:
                entry[metric], entry["reasons"][metric] = None, human["reasons"].get(metric, "not computed")
        if len(reference["item"]):  # against the target's human test explanations, both rebuilt per resample
            kl = {name: [weighted_kl(reference["bins"][name], reference["item"], arrays["bins"][name], arrays["item"],
                                     w, float(ev["kl_smoothing"])) for w in (ones, weights)] for name in FEATURES}
            entry["feature_kl_by_feature"] = {name: float(value) for name, (value, _) in kl.items()}
            entry["feature_kl"] = float(np.mean(list(entry["feature_kl_by_feature"].values())))
            draws["feature_kl_by_feature"] = {name: resamples for name, (_, resamples) in kl.items()}
            draws["feature_kl"] = np.mean(list(draws["feature_kl_by_feature"].values()), axis=0)
        else:
            entry["feature_kl"], entry["reasons"]["feature_kl"] = None, "no human test explanations for this annotator"
    if imitation is None:
        names = group_metric_names(ev)
        group, group_draws = {**dict.fromkeys(names), "reasons": dict.fromkeys(names, imitation_reason)}, {}
    else:
        group, group_draws = group_entry(cfg, ds, imitation, annotator,
                                         None if rows is None else common.row_logits(imitation["clf"], X),
                                         arrays["item"], plan, human, () if rows is None else (len(rows),))
    entry["reasons"].update(group.pop("reasons"))
    entry.update(group)
    return entry, {**draws, **group_draws}


def attach_intervals(entry: dict, draws: dict) -> None:
    """`<metric>_ci` beside every metric that has draws (None where the metric is None)."""
    for metric, values in draws.items():
        if metric == "feature_kl_by_feature":
            entry[f"{metric}_ci"] = {name: interval(v) if entry.get(metric, {}).get(name) is not None else None
                                     for name, v in values.items()}
        elif entry.get(metric) is not None:
            entry[f"{metric}_ci"] = interval(values)


def macro(per_target: dict, draws: dict, metric: str, feature: str | None = None):
    """(the mean of `metric` (or one `feature` of it) over the targets that have it, the mean of their draws)."""
    def get(entry: dict):
        return entry.get(metric) if feature is None else (entry.get(metric) or {}).get(feature)

    targets = [a for a, e in per_target.items() if get(e) is not None]
    if not targets:
        return None, None
    values = [get(per_target[a]) for a in targets]
    resamples = [r for r in (get(draws.get(a, {})) for a in targets) if r is not None]
    if len(resamples) != len(values):
        return float(np.mean(values)), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan column: undefined on that resample
        return float(np.mean(values)), np.nanmean(np.vstack(resamples), axis=0)


def method_row(ds: dict, per_target: dict, target_draws: dict, metrics: list[str],
               unmatched: dict) -> tuple[dict, dict]:
    """The macro row of one method from its per-target entries: (row, {metric: (B,) draws})."""
    ok = {a: e for a, e in per_target.items() if e.get("status") == "ok"}
    result = {"status": "ok" if len(ok) == len(ds["annotators"]) else ("partial" if ok else "missing"),
              "annotators_evaluated": list(ok), "n": sum(e["n"] for e in ok.values()), "reasons": {},
              "per_annotator": per_target}
    if not ok:
        return {**result, "reason": "; ".join(sorted({e.get("reason", "missing") for e in per_target.values()}))}, {}
    draws = {}
    for metric in metrics:
        result[metric], draws[metric] = macro(ok, target_draws, metric)
        if result[metric] is None:
            why = sorted({e["reasons"].get(metric, "") for e in ok.values()} - {""})
            result["reasons"][metric] = "; ".join(why) or "not computed"
    result["group_m"] = min((e["group_m"] for e in ok.values() if e.get("group_m")), default=None)
    if result["group_m"] is None:
        result["reasons"]["group_m"] = result["reasons"].get("group_clf_conf", "not computed")
    used = [e["group_m_used"] for e in ok.values() if e.get("group_m_used")]
    if used:  # per requested m, the m used: [smallest, largest] over the targets (None where none has one)
        spans = {m: [u[m] for u in used if u.get(m)] for m in dict.fromkeys(m for u in used for m in u)}
        result["group_m_used"] = {m: [min(s), max(s)] if s else None for m, s in spans.items()}
    by_feature = {name: macro(ok, target_draws, "feature_kl_by_feature", name) for name in FEATURES}
    result["feature_kl_by_feature"] = {name: value for name, (value, _) in by_feature.items()}
    draws["feature_kl_by_feature"] = {name: resamples for name, (_, resamples) in by_feature.items()}
    attach_intervals(result, draws)
    notes = ["averaged over " + ", ".join(ok) + " only"] if result["status"] == "partial" else []
    if sum(unmatched.values()):
        notes.append(f"{sum(unmatched.values())} predictions for cells without a human test response not scored")
    if notes:
        result["note"] = "; ".join(notes)
    return result, draws


def method_result(cfg: dict, ds: dict, rows: list[dict] | None, plan: dict, human: dict, imitation: dict | None,
                  imitation_reason: str | None, missing: dict, unmatched: dict, cache_dir: Path) -> tuple[dict, dict]:
    """(one method's row: its metrics per target and their macro averages, {"macro": their (B,) draws})."""
    X_all = None
    if imitation is not None and rows:
        records = [{"item_id": r["item_id"], "label": r["label"] if r["label"] is not None else UNPARSED,
                    "explanation": r["explanation"]} for r in rows]
        X_all, _ = common.representation_vectors(cfg, records, imitation["representation"], cache_dir,
                                                 means=imitation["means"])
    per_target, target_draws = {}, {}
    for annotator in ds["annotators"]:
        index = [i for i, row in enumerate(rows or []) if row["annotator"] == annotator]
        if rows is None and not len(human["targets"][annotator]["item"]):
            per_target[annotator] = {"status": "missing", "reason": "no human test explanations"}
        elif annotator in missing:
            per_target[annotator] = {"status": "missing", "reason": missing[annotator]}
        elif rows is not None and not index:
            per_target[annotator] = {"status": "missing", "n": 0, "reasons": {},
                                     "reason": "no predictions for this annotator's test items"}
        else:
            entry, draws = target_entry(cfg, ds, annotator, None if rows is None else [rows[i] for i in index], plan,
                                        human, imitation, imitation_reason, None if X_all is None else X_all[index],
                                        unmatched.get(annotator, 0))
            attach_intervals(entry, draws)
            per_target[annotator], target_draws[annotator] = entry, draws
    row_metrics = [m.name for m in task_metrics(ds["task"], ROW_KINDS)]
    result, draws = method_row(ds, per_target, target_draws, row_metrics + group_metric_names(cfg["eval"]), unmatched)
    if rows is None:
        result["reasons"].update(dict.fromkeys(row_metrics, REFERENCE_ROW_NA))
        result["feature_kl_by_feature"] = dict.fromkeys(FEATURES)
        result.pop("feature_kl_by_feature_ci", None)
    return result, {"macro": draws}


def evaluate_dataset(cfg: dict, ds: dict, loaded: dict) -> tuple[dict, dict, dict]:
    """({model: {method: metrics}}, {model: {method: draws}}, the resample plan) of one dataset, judge aside."""
    ev, cache_dir = cfg["eval"], common.eval_cache_dir(cfg, ds["name"])
    edges = feature_bin_edges(style_values(ds["train"]), int(ev["feature_bins"]))
    edges["label"] = label_categories(ds["task"])
    try:
        imitation, imitation_reason = imitation_reference(cfg, ds, cache_dir), None
    except ValueError as err:  # e.g. fewer than two annotators in the train split
        imitation, imitation_reason = None, f"the annotator classifier could not be trained: {err}"
    all_rows = [row for _, _, rows, _, _ in loaded.values() for row in rows]
    started = time.time()
    bert_reason = score_rows(cfg, all_rows, cache_dir) if all_rows else None
    print(f"[eval] {ds['name']}: reference similarity for {len(all_rows)} outputs in {time.time() - started:.0f}s",
          flush=True)
    started, plan = time.time(), resample_plan(cfg, ds)
    human = {"edges": edges, "targets": {}, "reasons": {"bertscore_f1": bert_reason} if bert_reason else {}}
    for annotator in ds["annotators"]:  # each target's human test responses, shared by every method
        mine = [dict(r, parse_ok=True, target_labels=[r["label"]]) for r in ds["test"] if r["annotator"] == annotator]
        human["targets"][annotator] = score_arrays(mine, ds["target_items"][annotator], ds["task"], edges)
        if imitation is not None and mine:  # the rows in the order of imitation["human_X"]
            human["targets"][annotator]["logits"] = common.row_logits(imitation["clf"], imitation["human_X"][annotator])

    def score(rows, missing, unmatched):
        return method_result(cfg, ds, rows, plan, human, imitation, imitation_reason, missing, unmatched, cache_dir)

    results, draws, seeds = {}, {}, common.training_seeds(cfg)
    for (model_tag, method), (_, missing, rows, unmatched, seed_rows) in loaded.items():
        result, method_draws = score(rows, missing, unmatched)
        if len(seeds) > 1 and result["status"] != "missing":
            add_seed_spread(result, [score(rows_of_seed, missing, u)[0] for rows_of_seed, u in seed_rows], seeds)
        results.setdefault(model_tag, {})[method] = result
        draws.setdefault(model_tag, {})[method] = method_draws
        norm_imitation = eval_report.fmt_ci(result.get("norm_imitation"), result.get("norm_imitation_ci"))
        detail = (f"n={result['n']}, norm_imitation {norm_imitation}" if result["status"] != "missing"
                  else result.get("reason"))
        print(f"[eval] {ds['name']} {model_tag} {method}: {result['status']} ({detail})", flush=True)
    reference, reference_draws = score(None, {}, {})
    for model_tag in results:
        results[model_tag][HUMAN], draws[model_tag][HUMAN] = reference, reference_draws
    print(f"[eval] {ds['name']}: metrics and {int(ev['bootstrap_resamples'])} bootstrap resamples in "
          f"{time.time() - started:.1f}s", flush=True)
    return results, draws, plan


def add_seed_spread(result: dict, seed_results: list[dict], seeds: list[int]) -> None:
    """Beside each pooled metric `m`: the seeds' own values `m_by_seed` and their `m_sd` (ddof 1)."""
    result["seeds"] = list(seeds)
    for metric, value in list(result.items()):
        if metric.endswith(("_ci", "_sd")) or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values = [r.get(metric) for r in seed_results]
        if metric != "n" and not any(v is None for v in values):
            result[f"{metric}_sd"] = float(np.std(values, ddof=1))
            result[f"{metric}_by_seed"] = {str(seed): v for seed, v in zip(seeds, values)}


# ---- The judge at work: its sampled cells, its run over the processes, its verdicts on every row --------
def sample_keys(ds: dict, n: int, seed: int) -> list[tuple[str, str]]:
    """n (item, annotator) test cells, balanced over annotators (round robin), seeded."""
    rng = random.Random(seed)
    per_annotator = {a: list(ds["target_items"][a]) for a in ds["annotators"]}
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
    by_annotator = {a: [r for r in ds["train"] if r["annotator"] == a] for a in ds["everyone"]}
    return {a: rng.sample(records, min(k, len(records))) for a, records in by_annotator.items()}


def response_text(prediction: dict) -> str:
    if prediction.get("parse_ok") and prediction.get("label") is not None:
        return common.format_response(prediction["label"], explanation_text(prediction))
    return explanation_text(prediction)


def cell_sources(ds: dict, predictions: dict, item_id: str, target: str) -> dict:
    """{(model, method): the response to one test cell or None}, the target's own human response first."""
    human = ds["references"][(item_id, target)][0]
    sources = {(None, HUMAN): {"parse_ok": True, "label": human["label"], "explanation": human["explanation"]}}
    for key, by_target in predictions.items():
        sources[key] = next((p for p in by_target.get(target, []) if p["item_id"] == item_id), None)
    return sources


def example_cells(cfg: dict, ds: dict, predictions: dict) -> list[dict]:
    """The report's examples: eval.example_items seeded test items (the same in every run with the
    seed) and, for up to four of the targets who answered each, their own response and what every
    method wrote for them (first training seed). Never on the blinded form."""
    rng = random.Random(stable_seed(cfg["seed"], "examples", ds["name"]))
    items = sorted({item for item, annotator in ds["references"] if annotator in ds["annotators"]})
    examples = []
    for item_id in sorted(rng.sample(items, min(int(cfg["eval"]["example_items"]), len(items)))):
        targets = [a for a in ds["annotators"] if (item_id, a) in ds["references"]]
        targets = sorted(rng.sample(targets, min(4, len(targets))), key=targets.index)
        examples.append({"dataset": ds["name"], "item_id": item_id, "text_a": ds["items"][item_id]["text_a"],
                         "text_b": ds["items"][item_id]["text_b"], "task": ds["task"], "targets": [
                             {"target": target, "responses": [
                                 (model_tag, method, None if p is None else p["label"] if p.get("parse_ok") else None,
                                  None if p is None else explanation_text(p), bool(p and p.get("parse_ok")))
                                 for (model_tag, method), p in cell_sources(ds, predictions, item_id, target).items()]}
                             for target in targets]})
    return examples


def judge_jobs(cfg: dict, ds: dict, predictions: dict) -> list[dict]:
    """One judge prompt per sampled test cell and method (the same cells for every method)."""
    ev = cfg["eval"]
    if len(ds["everyone"]) > JUDGE_MAX_ANNOTATORS:
        return []
    keys = sample_keys(ds, int(ev["judge_items"]), stable_seed(cfg["seed"], "judge", ds["name"]))
    examples = train_examples(ds, int(ev["judge_examples_per_annotator"]),
                              stable_seed(cfg["seed"], "judge-ex", ds["name"]))
    jobs = []
    for item_id, annotator in keys:
        item = ds["items"][item_id]
        for (model_tag, method), prediction in cell_sources(ds, predictions, item_id, annotator).items():
            jobs.append({"dataset": ds["name"], "model": model_tag, "method": method, "annotator": annotator,
                         "item_id": item_id})
            if prediction is not None:
                jobs[-1]["messages"] = judge_messages(ds["task"], ds["everyone"], examples, item["text_a"],
                                                      item["text_b"], response_text(prediction))
    return jobs


def judge_decoding(cfg: dict, tokenizer, annotators: list[str]) -> tuple[engine.ReplyConstraint, dict]:
    """The forced choice: replies constrained to one annotator ID then the end of the turn, greedy."""
    choices = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in annotators]
    gen_cfg = dict(cfg["generation"], max_new_tokens=max(map(len, choices)), do_sample=False)
    return engine.ReplyConstraint(tokenizer, choices), gen_cfg


def run_judge(cfg: dict, jobs: list[dict], annotators: dict[str, list[str]]) -> tuple[str | None, dict]:
    """Adds "verdict" and "reply" to every job with messages; returns (why it could not run, the judge)."""
    judge = cfg["eval"]["judge"]
    if judge["backend"] == "none":
        return "disabled (eval.judge.backend: none)", {"backend": "none", "label": "none"}
    todo = [job for job in jobs if "messages" in job]
    if judge["backend"] == "openai":
        return None, endpoint_judge.run(cfg, todo, annotators, parse_verdict) if common.is_main_process() else {}
    judge_cfg = next(m for m in common.model_configs(cfg) if judge["model"] is None or m["tag"] == judge["model"])
    identity = {"backend": "local", "model": judge_cfg["tag"], "route": "constrained decoding",
                "label": f"{judge_cfg['tag']} (local)"}
    if not todo:
        return None, identity
    try:
        model, tokenizer = common.load_model_and_tokenizer(judge_cfg)
    except Exception as err:  # weights not available offline: report, do not crash
        return f"judge model '{judge_cfg['tag']}' could not be loaded: {type(err).__name__}: {err}", identity
    # Chunks of one generation batch per call (their prompts share the instructions and examples,
    # prefilled once), shared out over the processes: a chunk is the same call whichever process
    # runs it, so the verdicts do not depend on the number of processes.
    size, by_dataset, replies, started = int(cfg["generation"]["batch_size"]), {}, [], time.time()
    for job in todo:
        by_dataset.setdefault(job["dataset"], []).append(job)
    chunks = [(dataset, start) for dataset, mine in by_dataset.items() for start in range(0, len(mine), size)]
    for dataset, start in common.this_process_share(chunks):
        constraint, gen_cfg = judge_decoding(cfg, tokenizer, annotators[dataset])
        batch = by_dataset[dataset][start:start + size]
        replies += common.generate_texts(model, tokenizer, [job["messages"] for job in batch], gen_cfg,
                                         desc=f"judge {dataset}", constraint=constraint)
    print(f"[eval] judge ({judge_cfg['tag']}): {len(replies)} verdicts in {time.time() - started:.0f}s"
          f"{common.process_label()}", flush=True)
    ordered = [job for mine in by_dataset.values() for job in mine]  # the chunks' order
    for job, reply in zip(ordered, common.gather_to_all(replies), strict=True):
        job.update(reply=reply, verdict=parse_verdict(reply, annotators[job["dataset"]]))
    return None, identity


def judge_summary(jobs: list[dict], annotators: list[str], judge_reason: str | None, judge: dict,
                  candidates: int | None = None) -> dict:
    """Accuracy over the judged outputs, per target annotator too, and chance: naming the most frequent
    target (without verdicts: one of the `candidates` annotators)."""
    chance = 1.0 / (candidates or len(annotators))
    if judge_reason:
        return {"accuracy": None, "reason": judge_reason, "chance": chance}
    judged = [job for job in jobs if "messages" in job]
    if not judged:
        return {"accuracy": None, "reason": "no outputs for the sampled test cells", "chance": chance,
                "n": 0, "no_output": len(jobs)}
    correct = [job["verdict"] == job["annotator"] for job in judged]
    per_annotator = {a: [job["verdict"] == a for job in judged if job["annotator"] == a] for a in annotators}
    return {"accuracy": float(np.mean(correct)), "n": len(judged), "correct": int(sum(correct)),
            "unparseable": sum(job["verdict"] is None for job in judged), "no_output": len(jobs) - len(judged),
            "chance": max(len(mine) for mine in per_annotator.values()) / len(judged),
            "judge_model": judge.get("label"), "judge_route": judge.get("route"),
            "per_annotator": {a: float(np.mean(mine)) if mine else None for a, mine in per_annotator.items()}}


def attach_judge(results: dict, draws: dict, ds: dict, jobs: list[dict], judge_reason: str | None, judge: dict,
                 plan: dict) -> None:
    """The judge's summary, judge_attribution and its interval on every row and target; its draws."""

    def summarise(jobs: list[dict]) -> tuple[dict, np.ndarray | None]:
        summary = judge_summary(jobs, ds["annotators"], judge_reason, judge, len(ds["everyone"]))
        if summary["accuracy"] is None:
            return summary, None
        numerator, denominator, per_annotator = 0.0, 0.0, {}
        for annotator in ds["annotators"]:
            mine = [job for job in jobs if "messages" in job and job["annotator"] == annotator]
            if mine:
                position = {item: i for i, item in enumerate(ds["target_items"][annotator])}
                sums, counts = weighted_sums(np.array([position[job["item_id"]] for job in mine], dtype=int),
                                             np.array([job["verdict"] == annotator for job in mine], dtype=float),
                                             plan[annotator]["weights"])
                per_annotator[annotator] = ratio(sums, counts)
                numerator, denominator = numerator + sums, denominator + counts
        overall = ratio(np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float))
        summary["accuracy_ci"] = interval(overall)
        summary["per_annotator_ci"] = {a: interval(per_annotator.get(a)) for a in ds["annotators"]}
        return summary, overall

    human = summarise([job for job in jobs if job["method"] == HUMAN])
    for model_tag, methods in results.items():
        for method, result in methods.items():
            summary, overall = (human if method == HUMAN else summarise(
                [j for j in jobs if j["model"] == model_tag and j["method"] == method]))
            if result["status"] == "missing":
                summary, overall = {"accuracy": None, "reason": result.get("reason", "missing"),
                                    "chance": summary["chance"]}, None
            result.update(judge=summary, judge_attribution=summary["accuracy"],
                          judge_attribution_ci=summary.get("accuracy_ci"))
            draws[model_tag][method]["macro"]["judge_attribution"] = overall
            if summary["accuracy"] is None:
                result.setdefault("reasons", {})["judge_attribution"] = summary["reason"]
            for annotator, entry in result.get("per_annotator", {}).items():
                if entry.get("status") == "ok":
                    entry["judge_attribution"] = summary.get("per_annotator", {}).get(annotator)
                    entry["judge_attribution_ci"] = summary.get("per_annotator_ci", {}).get(annotator)
                    if entry["judge_attribution"] is None:
                        entry["reasons"]["judge_attribution"] = (summary.get("reason")
                                                                 or "no sampled cell of this annotator")


def judge_calibration(results: dict) -> dict:
    """The judge on the human references against chance: informative only when its interval lies above."""
    reference = next((methods[HUMAN] for methods in results.values() if HUMAN in methods), None)
    judge = (reference or {}).get("judge", {})
    calibration = {"accuracy": judge.get("accuracy"), "ci": judge.get("accuracy_ci"), "chance": judge.get("chance"),
                   "n": judge.get("n"), "informative": False}
    if judge.get("accuracy") is None:
        return {**calibration, "reason": judge.get("reason", "no verdicts on the human references")}
    if judge.get("accuracy_ci") is None:
        return {**calibration, "reason": "no interval (too few judged cells)"}
    if judge["accuracy_ci"][0] > judge["chance"]:
        return {**calibration, "informative": True}
    return {**calibration, "reason": "the judge's accuracy on the human references is not above chance"}


# ---- The claims check: each claim's paired difference and verdict, the report's note on its rules -----
def verdict(ci: list[float] | None, higher_is_better: bool, margin: float = 0.0) -> str:
    """holds / contradicted / not resolved for a - b with interval `ci`; margin > 0: non-inferiority of a."""
    if ci is None:
        return "not resolved"
    low, high = ci
    if higher_is_better:
        return "holds" if low > -margin else ("contradicted" if high < -margin else "not resolved")
    return "holds" if high < margin else ("contradicted" if low > margin else "not resolved")


def compare(results: dict, draws: dict, dataset: str, model_tag: str, claim: str, metric: str, a: str, b: str,
            higher_is_better: bool, margin: float = 0.0) -> dict:
    """One row of metrics.json's `claims`: a - b on `metric`, its paired interval and verdict."""
    row = {"dataset": dataset, "model": model_tag, "claim": claim, "metric": metric, "a": a, "b": b,
           "higher_is_better": higher_is_better, "margin": margin, "difference": None, "ci": None}
    values = {m: (results.get(m) or {}).get(metric) for m in (a, b)}
    absent = [m for m in (a, b) if values[m] is None or (results.get(m) or {}).get("status") == "missing"]
    if absent:
        return {**row, "verdict": "not resolved", "reason": "no value for " + ", ".join(absent)}
    row["difference"] = values[a] - values[b]
    a_draws, b_draws = (draws.get(m, {}).get("macro", {}).get(metric) for m in (a, b))
    if a_draws is None or b_draws is None:
        return {**row, "verdict": "not resolved", "reason": "no bootstrap interval"}
    row["ci"] = interval(a_draws - b_draws)
    row["verdict"] = verdict(row["ci"], higher_is_better, margin)
    if row["ci"] is None:
        row["reason"] = "the difference is undefined on too many resamples"
    return row


def saturated(result: dict | None) -> bool:
    """Every evaluated target's group classifier confidence within SATURATION_TOLERANCE of 0 or 1."""
    values = [row.get("group_clf_conf") for row in ((result or {}).get("per_annotator") or {}).values()
              if row.get("status", "ok") == "ok"]
    values = [v for v in values if v is not None]
    return bool(values) and all(min(v, 1 - v) < SATURATION_TOLERANCE for v in values)


def best_prompting(results: dict, metric: str, higher_is_better: bool) -> str:
    """The prompting method with the best point estimate on `metric`."""
    scored = [(results[m][metric], m) for m in PROMPTING_METHODS
              if m in results and results[m].get("status") != "missing" and results[m].get(metric) is not None]
    return (max if higher_is_better else min)(scored)[1] if scored else "best prompting (none)"


def claims_check(results: dict, draws: dict, datasets: dict, calibration: dict) -> list[dict]:
    """The paper's claims per dataset and model, as paired comparisons (OUR DEFINITIONS, Claims)."""
    claims = []
    for dataset, models in results.items():
        task = datasets[dataset]["task"]
        decision, higher, span = main_decision_metric(task)
        margin = KEPT_FRACTION_OF_RANGE * span
        judge = calibration.get(dataset, {})
        imitation = [(m.name, m.higher_is_better) for m in task_metrics(task) if m.claim]
        for model_tag, methods in models.items():
            def claim(text, metric, a, b, higher_is_better, margin=0.0):
                return compare(methods, draws[dataset][model_tag], dataset, model_tag, text, metric, a, b,
                               higher_is_better, margin)

            rows = [claim(f"CAPO better than SFT on {metric}", metric, "capo", "sft", better)
                    for metric, better in imitation]
            rows += [claim(f"SFT better than the best prompting method on {metric}", metric, "sft",
                           best_prompting(methods, metric, better), better)
                     for metric, better in (*imitation, (decision, higher))]
            rows.append(claim(f"CAPO keeps SFT's {decision} (non-inferiority, margin {margin:g})", decision, "capo",
                              "sft", higher, margin))
            rows += [claim(f"per-annotator {m.upper()} better than shared {m.upper()} on {metric}", metric, m,
                           f"{m}_shared", better) for m in TRAINED_METHODS if {m, f"{m}_shared"} <= set(methods)
                     for metric, better in (*imitation, (decision, higher))]
            for row in rows:
                if "reason" in row:
                    continue
                if METRIC[row["metric"]].kind == "group" and all(saturated(methods.get(row[m])) for m in "ab"):
                    row.update(verdict="not resolved", reason=f"saturated: every target's group classifier confidence "
                               f"of {row['a']} and {row['b']} is within {SATURATION_TOLERANCE:g} of 0 or 1 at the "
                               "primary m; see the smaller m in tables/group_sizes")
                if row["metric"] == "judge_attribution" and not judge.get("informative", False):
                    row.update(verdict="not resolved",
                               reason="judge uninformative on this profile: " + judge.get("reason", "not calibrated"))
            claims += rows
    return claims


WIDE_INTERVALS_BELOW = 30  # test items per target: with fewer, the report says the intervals are wide


def claim_rules_note(datasets: dict) -> str:
    """The report's text for the rules defined here: saturation, the non-inferiority margins, and a
    warning where few test items per target make the intervals wide."""
    margins = []
    for name, ds in datasets.items():
        decision, _, span = main_decision_metric(ds["task"])
        margins.append(f"{name} {decision} {KEPT_FRACTION_OF_RANGE * span:g}")
    fewest = min((len(items) for ds in datasets.values() for items in ds["target_items"].values()), default=0)
    wide = (f" **Few test items**: as few as {fewest} per target annotator, so the intervals are wide; a `not "
            "resolved` here is no evidence either way." if fewest < WIDE_INTERVALS_BELOW else "")
    return (f"A group-metric claim between two methods whose per-target group classifier confidences all lie "
            f"within {SATURATION_TOLERANCE:g} of 0 or 1 is `not resolved` (saturated: it counts annotators, it "
            f"does not grade). Non-inferiority margin (our choice: {KEPT_FRACTION_OF_RANGE:.0%} of the metric's range; "
            f"{', '.join(margins)}): `holds` when the interval stays on the good side of the margin, "
            "`contradicted` when it lies wholly beyond it." + wide)


# ==== HUMAN VALIDATION (our protocol) ====================================================================
# The blinded form shows the judge's first eval.human_sheet_items test cells with the judge's examples:
# per cell the target's human reference and each method's output. A rater names the author (the judge's
# forced choice), then sees the intended annotator and gives three 1-5 ratings. Attention cells: the
# first eval.human_attention_cells human references shown twice, marked only in the key; passed when both
# copies get the same attribution and ratings within 1.
RATING_QUESTIONS = {
    "coherence": "Coherence: is the explanation sound, and does it support its label?",
    "grounding": "Grounding: does the explanation rest on what the two texts say?",
    "style": "Style: does it read like annotator {target}'s examples (wording, length, what they attend to)?",
}
ATTRIBUTION_QUESTION = "Which annotator wrote this response?"
KEY_COLUMNS = ("cell", "form_version", "dataset", "item_id", "target", "model", "method", "attention_of",
               "judge_verdict")
RATING_VALUES = list(range(eval_report.RATING_SCALE[0], eval_report.RATING_SCALE[1] + 1))


def form_contents(cfg: dict, datasets: dict, predictions: dict, jobs: dict) -> tuple[dict, list[dict]]:
    """(the form's data, its key rows). The data holds nothing that names a method or a model."""
    ev = cfg["eval"]
    salt = stable_seed(cfg["seed"], "form")
    data = {"seed": stable_seed(cfg["seed"], "form-order"), "datasets": {}, "cells": [],
            "attribution": {"name": "attribution", "text": ATTRIBUTION_QUESTION},
            "ratings": [{"name": name, "text": text, "scale": RATING_VALUES}
                        for name, text in RATING_QUESTIONS.items()]}
    key = []
    for name, ds in datasets.items():
        if len(ds["everyone"]) > JUDGE_MAX_ANNOTATORS:  # no rater chooses among a crowd: as for the judge
            print(f"[eval] {name}: not on the human-validation form ({len(ds['everyone'])} annotators, more than "
                  f"JUDGE_MAX_ANNOTATORS {JUDGE_MAX_ANNOTATORS})", flush=True)
            continue
        verdicts = {(job["item_id"], job["annotator"], job["model"], job["method"]): job.get("verdict")
                    for job in jobs.get(name, []) if "messages" in job}
        examples = train_examples(ds, int(ev["judge_examples_per_annotator"]),
                                  stable_seed(cfg["seed"], "judge-ex", name))  # the judge's examples
        data["datasets"][name] = {
            "text_a": ds["task"]["text_a_name"], "text_b": ds["task"]["text_b_name"], "annotators": ds["everyone"],
            "examples": {a: [f"Label: {r['label']} | Explanation: {r['explanation']}" for r in examples[a]]
                         for a in ds["everyone"]}}
        keys = sample_keys(ds, int(ev["human_sheet_items"]), stable_seed(cfg["seed"], "judge", name))
        for position, (item_id, target) in enumerate(keys):
            item = ds["items"][item_id]
            copies = 2 if position < int(ev["human_attention_cells"]) else 1
            sources = {k: p for k, p in cell_sources(ds, predictions[name], item_id, target).items() if p is not None}
            for (model_tag, method), prediction in sources.items():
                first = None
                for copy in range(copies if method == HUMAN else 1):
                    cell = "c" + common.config_hash([salt, name, item_id, target, model_tag, method, copy])[:10]
                    data["cells"].append({"id": cell, "dataset": name, "target": target, "text_a": item["text_a"],
                                          "text_b": item["text_b"], "response": response_text(prediction)})
                    key.append({"cell": cell, "dataset": name, "item_id": item_id, "target": target,
                                "model": model_tag or "", "method": method, "attention_of": first or "",
                                "judge_verdict": verdicts.get((item_id, target, model_tag, method)) or ""})
                    first = first or cell
    data["cells"].sort(key=lambda cell: cell["id"])  # the page's own order says nothing; raters get a shuffle
    return data, key


def read_key(path: Path) -> tuple[str, dict[str, dict]]:
    """(form version, {cell: key row}) from the key.csv written beside the form."""
    import csv
    if not path.exists():
        raise InputError(f"{path}: key file not found (it is written beside form.html; or pass --key)")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in KEY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise input_error(path, "not a key written by 06_eval.py", line=1, field=missing[0])
        rows = {row["cell"]: row for row in reader}
    versions = {row["form_version"] for row in rows.values()}
    if len(versions) != 1:
        raise input_error(path, f"{len(versions)} form versions in one key", field="form_version")
    return versions.pop(), rows


def read_ratings(paths: list[Path], version: str, key: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{rater: {cell: answers}} from the form's exports, every answer checked."""
    import json
    questions = {"attribution", *RATING_QUESTIONS}
    low, high = eval_report.RATING_SCALE
    annotators = defaultdict(set)  # dataset -> its annotators (every target is one)
    for row in key.values():
        annotators[row["dataset"]].add(row["target"])
    raters: dict[str, dict[str, dict]] = {}
    source: dict[str, Path] = {}
    for path in paths:
        try:
            export = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{path}: file not found") from None
        except json.JSONDecodeError as err:
            raise input_error(path, f"not a complete ratings export (truncated?): {err.msg}", line=err.lineno) from None
        if not isinstance(export, dict) or not isinstance(export.get("cells"), list):
            raise input_error(path, "not a ratings export of the human-validation form", field="cells")
        if export.get("form_version") != version:
            raise input_error(path, f"made with form version {export.get('form_version')!r}, but the key is for "
                                    f"version {version!r}: score it with the key written beside that form",
                              field="form_version")
        rater = export.get("rater")
        if not isinstance(rater, str) or not rater:
            raise input_error(path, "no rater ID", field="rater")
        if rater in raters:
            raise input_error(path, f"rater {rater!r} exported twice (also {source[rater]}); keep the later export",
                              field="rater")
        answers = {}
        for index, entry in enumerate(export["cells"]):
            where = f"cells[{index}]"
            cell = entry.get("cell") if isinstance(entry, dict) else None
            if cell not in key:
                raise input_error(path, f"cell {cell!r} is not in the key", field=f"{where}.cell")
            given = entry.get("answers") or {}
            if set(given) != questions:
                raise input_error(path, f"cell {cell}: answers {sorted(given)}, expected {sorted(questions)}",
                                  field=f"{where}.answers")
            if given["attribution"] not in annotators[key[cell]["dataset"]]:
                raise input_error(path, f"cell {cell}: attribution {given['attribution']!r} is not an annotator",
                                  field=f"{where}.answers.attribution")
            for name in RATING_QUESTIONS:
                if not isinstance(given[name], int) or isinstance(given[name], bool) or not low <= given[name] <= high:
                    raise input_error(path, f"cell {cell}: {name} {given[name]!r} is not an integer from {low} to "
                                            f"{high}", field=f"{where}.answers.{name}")
            answers[cell] = given
        raters[rater], source[rater] = answers, Path(path)
    return raters


def bootstrap_mean_interval(values_by_unit: list[list[float]], seed: int,
                            resamples: int) -> tuple[float | None, list | None]:
    """The mean of every value and its 95% interval from resampling the units (cells)."""
    flat = [v for unit in values_by_unit for v in unit]
    if not flat:
        return None, None
    rng = np.random.default_rng(seed)
    sums = np.array([sum(unit) for unit in values_by_unit], dtype=float)
    counts = np.array([len(unit) for unit in values_by_unit], dtype=float)
    picks = rng.integers(0, len(values_by_unit), size=(resamples, len(values_by_unit)))
    draws = sums[picks].sum(axis=1) / np.maximum(counts[picks].sum(axis=1), 1)
    return float(np.mean(flat)), interval(draws) if len(values_by_unit) > 1 else None


def krippendorff_alpha(raters: dict[str, dict[str, dict]], cells: list[str], question: str) -> float | None:
    """Ordinal Krippendorff's alpha over every rater and cell (missing ratings allowed)."""
    import krippendorff
    matrix = np.array([[answers.get(cell, {}).get(question, np.nan) for cell in cells]
                       for answers in raters.values()], dtype=float)
    pairable = (np.sum(~np.isnan(matrix), axis=0) >= 2).sum()
    if len(raters) < 2 or pairable == 0 or len(np.unique(matrix[~np.isnan(matrix)])) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal",
                                    value_domain=RATING_VALUES))


def score_ratings(cfg: dict, paths: list[Path], key_path: Path) -> dict:
    """Per method: ratings and attribution with intervals, the judge's on the same cells, agreement, attention."""
    from sklearn.metrics import cohen_kappa_score
    version, key = read_key(key_path)
    raters = read_ratings(paths, version, key)
    resamples = int(cfg["eval"]["bootstrap_resamples"])
    seed = stable_seed(cfg["seed"], "human-ratings")
    counted = [cell for cell, row in key.items() if not row["attention_of"]]  # copies only check attention
    groups: dict[tuple, list[str]] = defaultdict(list)
    for cell in counted:
        groups[(key[cell]["dataset"], key[cell]["model"], key[cell]["method"])].append(cell)
    methods = []
    for (dataset, model_tag, method), cells in sorted(groups.items()):
        rated = [cell for cell in cells if any(cell in answers for answers in raters.values())]
        entry = {"dataset": dataset, "model": model_tag or None, "method": method, "cells": len(rated)}
        for question in RATING_QUESTIONS:
            entry[question], entry[f"{question}_ci"] = bootstrap_mean_interval(
                [[answers[cell][question] for answers in raters.values() if cell in answers] for cell in rated],
                seed, resamples)
        right = [[float(answers[cell]["attribution"] == key[cell]["target"]) for answers in raters.values()
                  if cell in answers] for cell in rated]
        entry["human_attribution"], entry["human_attribution_ci"] = bootstrap_mean_interval(right, seed, resamples)
        judged = [cell for cell in rated if key[cell]["judge_verdict"]]
        entry["judge_attribution"], entry["judge_attribution_ci"] = bootstrap_mean_interval(
            [[float(key[cell]["judge_verdict"] == key[cell]["target"])] for cell in judged], seed, resamples)
        entry["judge_cells"] = len(judged)
        targets = [key[cell]["target"] for cell in rated]
        entry["chance"] = max(targets.count(t) for t in set(targets)) / len(targets) if targets else None
        methods.append(entry)
    kappas, names = [], sorted(raters)
    for first, second in itertools.combinations(names, 2):
        shared = [cell for cell in counted if cell in raters[first] and cell in raters[second]]
        a = [raters[first][cell]["attribution"] for cell in shared]
        b = [raters[second][cell]["attribution"] for cell in shared]
        kappa = float(cohen_kappa_score(a, b)) if shared and len(set(a) | set(b)) > 1 else None
        kappas.append({"raters": [first, second], "cells": len(shared), "kappa": kappa})
    attention = {}
    for rater, answers in sorted(raters.items()):
        pairs = [(row["attention_of"], cell) for cell, row in key.items()
                 if row["attention_of"] and cell in answers and row["attention_of"] in answers]
        passed = sum(answers[a]["attribution"] == answers[b]["attribution"]
                     and all(abs(answers[a][q] - answers[b][q]) <= 1 for q in RATING_QUESTIONS) for a, b in pairs)
        attention[rater] = {"pairs": len(pairs), "passed": passed}
    scores = {"form_version": version, "raters": names, "files": [str(p) for p in paths], "methods": methods,
              "alpha": {question: krippendorff_alpha(raters, counted, question) for question in RATING_QUESTIONS},
              "attribution_kappa": kappas, "attention": attention}
    common.write_json(key_path.parent / "scores.json", scores)
    markdown = eval_report.ratings_markdown(scores)
    common.atomic_write_text(key_path.parent / "scores.md", markdown)
    print(markdown, flush=True)
    print(f"[eval] wrote {key_path.parent / 'scores.json'} and scores.md", flush=True)
    return scores


# ==== THE LEWIDI-2025 VIEW (data.split: lewidi only) =====================================================
# The shared task's official metrics (lower is better), as in the organisers' notebook
# (LeWiDi_3-2025/Evaluation_LeWiDi_2025_Metrics.ipynb in github.com/Le-Wi-Di/le-wi-di.github.io), per item:
# Par soft, the Wasserstein-1 distance over -5..5; Par pe, ANAD (mean |gold - predicted| / 11). VariErrNLI:
# each label a yes/no variable per annotator; soft, the mean over labels of the Manhattan distance of the
# [no, yes] shares; pe, the mean over labels of the share of wrong decisions. Our rule: each simulated
# annotator's parsed label (soft: their distribution), else its most frequent train label (the organisers'
# baseline), counted; with several training seeds, the first seed's predictions.
LEWIDI_NLI_ORDER = ("contradiction", "entailment", "neutral")  # the published soft_label key order
LEWIDI_PAR_SCALE = 11  # number of points of -5..5, ANAD's denominator
LEWIDI_FILE_PREFIX = {"varierr": "VariErrNLI", "par": "Paraphrase"}
LEWIDI_METRICS = {"par": ("Wasserstein distance", "ANAD"), "varierr": ("Manhattan distance", "error rate")}


def par_soft_distance(predicted: list[float], gold: list[float]) -> float:
    from scipy.stats import wasserstein_distance
    bins = np.arange(len(gold))
    return float(wasserstein_distance(bins, bins, u_weights=predicted, v_weights=gold))


def par_anad(predicted: list[int], gold: list[int], scale: int = LEWIDI_PAR_SCALE) -> float:
    return float(np.mean(np.abs(np.asarray(gold, float) - np.asarray(predicted, float))) / scale)


def ven_soft_distance(predicted: list[list[float]], gold: list[list[float]]) -> float:
    return float(np.mean(np.abs(np.asarray(predicted, float) - np.asarray(gold, float)).sum(axis=1)))


def ven_pe_error(predicted: list[list[int]], gold: list[list[int]]) -> float:
    return float(np.mean(np.abs(np.asarray(predicted, float) - np.asarray(gold, float)).mean(axis=1)))


LEWIDI_SCORES = {"numeric": (par_soft_distance, par_anad), "categorical": (ven_soft_distance, ven_pe_error)}


def lewidi_pe_row(task: dict, labels: list) -> list:
    """One item's perspectivist row from each annotator's label set, in annotator order."""
    if task["label_type"] == "numeric":
        return [int(next(iter(label_set))) for label_set in labels]
    return [[int(label in label_set) for label_set in labels] for label in LEWIDI_NLI_ORDER]


def lewidi_soft_row(task: dict, labels: list) -> list:
    """One item's soft label from the annotators' label sets."""
    n = len(labels)
    if task["label_type"] == "numeric":
        low, high = task["score_range"]
        return [sum(score in label_set for label_set in labels) / n for score in range(low, high + 1)]
    return [[1 - share, share] for share in (sum(label in s for s in labels) / n for label in LEWIDI_NLI_ORDER)]


def most_frequent_labels(train: list[dict]) -> dict:
    """Each annotator's most frequent train label; ties go to the label that sorts first."""
    counts: dict[str, dict] = defaultdict(lambda: defaultdict(int))
    for record in train:
        if record["label"] is not None:
            counts[record["annotator"]][record["label"]] += 1
    return {a: min(c, key=lambda label: (-c[label], str(label))) for a, c in counts.items()}


def label_sets(records: list[dict]) -> dict[str, dict[str, set]]:
    """{item: {annotator: set of labels}} of annotation records."""
    sets: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for record in records:
        sets[record["item_id"]][record["annotator"]].add(record["label"])
    return sets


def most_frequent_yes_no(train_sets: dict[str, dict[str, set]]) -> set:
    """Every label (yes) or none (no): each yes/no variable's most frequent train value, pooled."""
    answers = [labels for per_annotator in train_sets.values() for labels in per_annotator.values()]
    yes = sum(len(labels) for labels in answers)
    return set(LEWIDI_NLI_ORDER) if yes > len(answers) * len(LEWIDI_NLI_ORDER) - yes else set()


def system_labels(predictions: dict, items: dict[str, list[str]], fallback: dict) -> tuple[dict, dict]:
    """({item: {annotator: label}}, counts): the parsed label, else the annotator's fallback (counted)."""
    parsed = {}
    for annotator, preds in predictions.items():
        for prediction in preds:
            parsed.setdefault((prediction["item_id"], annotator), prediction)
    labels, counts = {}, {"cells": 0, "unparsed": 0, "missing": 0}
    for item, annotators in items.items():
        labels[item] = {}
        for annotator in annotators:
            prediction = parsed.get((item, annotator))
            usable = prediction is not None and prediction["parse_ok"] and prediction["label"] is not None
            counts["cells"] += 1
            counts["missing" if prediction is None else "unparsed"] += 0 if usable else 1
            labels[item][annotator] = prediction["label"] if usable else fallback[annotator]
    return labels, counts


def bootstrap_mean(cfg: dict, dataset: str, values: np.ndarray) -> tuple[float | None, list[float] | None]:
    """The mean over items and its interval, every system of a dataset on the same resampled items."""
    if len(values) == 0:
        return None, None
    rng = np.random.default_rng(stable_seed(cfg["seed"], "lewidi-bootstrap", dataset))
    slots = rng.integers(0, len(values), size=(int(cfg["eval"]["bootstrap_resamples"]), len(values)))
    return float(values.mean()), interval(values[slots].mean(axis=1))


def rounded_distribution(values: list[float]) -> list[float]:
    """Rounded to 10 decimals, the rounding drift put on the largest entry, so it sums to 1."""
    out = [round(float(v), 10) for v in values]
    out[int(np.argmax(out))] = round(out[int(np.argmax(out))] + 1 - sum(out), 10)
    return out


def write_submission(cfg: dict, dataset: str, task: dict, stats: dict, model_tag: str, method: str,
                     rows: dict[str, dict]) -> list[str]:
    """The submission files of one system: `id<TAB>python list` per test item, by its published ID."""
    paths = []
    for kind in ("soft", "pe"):
        lines = []
        for item, row in rows.items():
            value = row[kind]
            if kind == "soft":
                value = (rounded_distribution(value) if task["label_type"] == "numeric"
                         else [rounded_distribution(pair) for pair in value])
            lines.append(f"{stats.get('lewidi_items', {}).get(item, {}).get('id', item)}\t{value!r}")
        path = common.lewidi_submission_dir(cfg, model_tag, method) / f"{LEWIDI_FILE_PREFIX[dataset]}_test_{kind}.tsv"
        common.atomic_write_text(path, "\n".join(lines) + "\n")
        paths.append(str(path))
    return paths


def lewidi_dataset_view(cfg: dict, ds: dict, predictions: dict) -> dict:
    """Every system's official metrics on the scored test items, and submission files for all of them."""
    name, task = ds["name"], ds["task"]
    stats = common.read_json(common.data_dir(cfg, name) / "stats.json")
    full_test = common.load_split(cfg, name, "test")
    for record in full_test:
        record["label"] = common.normalize_label(record["label"], task)
    gold_sets = label_sets(full_test)
    published = stats.get("lewidi_items", {})  # 01 keeps each item's annotators in the published order
    annotators_of = {item: [a for a in published[item]["annotators"] if a in present]
                     if published.get(item, {}).get("annotators") else sorted(present)
                     for item, present in sorted(gold_sets.items())}
    scored = [item for item in annotators_of if item in ds["items"]]
    fallback = most_frequent_labels(ds["train"])
    soft_distance, pe_error = LEWIDI_SCORES[task["label_type"]]

    def rows_of(label_set, soft=None) -> dict[str, dict]:
        """{item: its soft and perspectivist rows}, label_set(item, annotator) giving the labels."""
        return {item: {"soft": soft if soft is not None else lewidi_soft_row(task, [label_set(item, a) for a in anns]),
                       "pe": lewidi_pe_row(task, [label_set(item, a) for a in anns])}
                for item, anns in annotators_of.items()}

    gold = rows_of(lambda item, a: gold_sets[item][a])

    def scores(rows: dict[str, dict]) -> dict:
        per_item = np.array([(soft_distance(rows[item]["soft"], gold[item]["soft"]),
                              pe_error(rows[item]["pe"], gold[item]["pe"])) for item in scored]).reshape(-1, 2)
        soft, soft_ci = bootstrap_mean(cfg, name, per_item[:, 0])
        pe, pe_ci = bootstrap_mean(cfg, name, per_item[:, 1])
        return {"soft": soft, "soft_ci": soft_ci, "pe": pe, "pe_ci": pe_ci}

    systems = []
    for (model_tag, method), preds in predictions.items():
        if not preds:
            systems.append({"model": model_tag, "method": method, "status": "missing",
                            "reason": "no predictions for any annotator"})
            continue
        labels, counts = system_labels(preds, annotators_of, fallback)
        rows = rows_of(lambda item, a: {labels[item][a]})
        _, scored_counts = system_labels(preds, {i: annotators_of[i] for i in scored}, fallback)
        systems.append({"model": model_tag, "method": method, "status": "ok", **scores(rows),
                        "fallback": scored_counts, "submission_fallback": counts,
                        "submission": write_submission(cfg, name, task, stats, model_tag, method, rows)})
    # The organisers' baselines, computed from this run's train split.
    train_soft = [lewidi_soft_row(task, list(sets.values())) for sets in label_sets(ds["train"]).values()]
    mean_train = rows_of(lambda item, a: {fallback[a]}, soft=np.mean(np.asarray(train_soft, float), axis=0).tolist())
    systems.append({"model": "baseline", "method": "most_frequent", "status": "ok",
                    **scores(rows_of(lambda item, a: {fallback[a]})),
                    "note": "each annotator's most frequent train label; soft: the distribution of those labels"})
    systems.append({"model": "baseline", "method": "mean_train_distribution", "status": "ok",
                    **scores(mean_train), "pe": None, "pe_ci": None,
                    "note": "soft: the mean train soft label for every item",
                    "submission": write_submission(cfg, name, task, stats, "baseline", "organisers", mean_train)})
    if task["label_type"] == "categorical":
        # The published VariErrNLI baseline sets every yes/no variable to its most frequent train
        # value pooled over labels and annotators, not each annotator's most frequent label.
        value = most_frequent_yes_no(label_sets(ds["train"]))
        systems.append({"model": "baseline", "method": "most_frequent_yes_no", "status": "ok",
                        **scores(rows_of(lambda item, a: value)), "soft": None, "soft_ci": None,
                        "note": f"every yes/no variable at its most frequent train value "
                                f"({'yes' if value else 'no'}), pooled over labels and annotators"})
    soft_name, pe_name = LEWIDI_METRICS[name]
    return {"metrics": {"soft": soft_name, "pe": pe_name}, "n_items": len(scored),
            "n_test_items": len(annotators_of), "fallback_labels": fallback, "systems": systems}


def lewidi_view(cfg: dict, datasets: dict, predictions: dict) -> dict | None:
    """{dataset: view} when data.split is lewidi; None (and one line saying so) otherwise."""
    if cfg["data"]["split"] != "lewidi":
        print("[eval] LeWiDi-2025 view skipped: data.split is not lewidi (run with --data.split lewidi)", flush=True)
        return None
    views = {name: lewidi_dataset_view(cfg, ds, predictions[name])
             for name, ds in datasets.items() if name in LEWIDI_FILE_PREFIX}
    for name, view in views.items():
        print(f"[eval] LeWiDi-2025 {name}: {len(view['systems'])} systems on {view['n_items']} test items; "
              f"submission files under {common.lewidi_submission_dir(cfg, 'x', 'x').parent.parent}", flush=True)
    return views
# ==== END OF THE LEWIDI-2025 VIEW ========================================================================


# ---- The long-format results: one row per number (tables/results.csv, metrics.json "rows") -----
METRICS_FORMAT_VERSION = 2  # 2: {"format_version", "rows", "results", "claims", ...}; 1 had datasets at the top
RESULT_COLUMNS = ("dataset", "model", "method", "target", "metric", "m", "feature", "seed", "value", "ci_low",
                  "ci_high", "sd", "n", "reason")


def metric_variants(metric: Metric, sizes: list[int]) -> list[tuple[str, int | None, str | None]]:
    """(key in a result entry, m, feature) of each number of a metric: a group metric's per requested m,
    feature KL's overall and per feature."""
    if metric.kind == "group":
        return [(f"{metric.name}_m{m}", m, None) for m in sizes]
    if metric.kind == "distribution":
        return [(metric.name, None, None), *((f"{metric.name}_by_feature", None, name) for name in FEATURES)]
    return [(metric.name, None, None)]


def result_rows(results: dict, datasets: dict, ev: dict) -> list[dict]:
    """Every reported number as a row of RESULT_COLUMNS (docs/DESIGN.md, metrics.json and tables/results.csv)."""
    rows = []
    for dataset, model_tag, method, result in eval_report.result_cells(results):
        metrics = [m for m in task_metrics(datasets[dataset]["task"]) if m.table or m.kind == "group"]
        for target, entry in [("macro", result), *result.get("per_annotator", {}).items()]:
            if entry.get("status") == "missing":
                entry = {"reason": entry.get("reason")}
            for metric in metrics:
                for key, m, feature in metric_variants(metric, requested_group_sizes(ev)):
                    value, ci = entry.get(key), entry.get(f"{key}_ci")
                    if feature is not None:
                        value, ci = (value or {}).get(feature), (ci or {}).get(feature)
                    n = entry["judge"].get("n") if metric.kind == "judge" and "judge" in entry else entry.get("n")
                    reason = None if value is not None else (
                        entry.get("reasons", {}).get(key.removesuffix("_by_feature")) or entry.get("reason")
                        or "not computed")
                    rows.append({"dataset": dataset, "model": model_tag, "method": method, "target": target,
                                 "metric": metric.name, "m": m, "feature": feature, "seed": None, "value": value,
                                 "ci_low": ci[0] if ci else None, "ci_high": ci[1] if ci else None,
                                 "sd": entry.get(f"{key}_sd"), "n": n, "reason": reason})
                    for seed, seed_value in (entry.get(f"{key}_by_seed") or {}).items():
                        rows.append({**rows[-1], "seed": int(seed), "value": seed_value, "ci_low": None,
                                     "ci_high": None, "sd": None, "reason": None})
    return rows


# ---- Provenance of 06's outputs, the adapters' model cards, what the report shows from other files ---
CONFIG_SECTIONS = ("seed", "torch_threads", "data", "eval", "embedder", "hlv", "generation", "models")


def eval_recipe(cfg: dict, names: list[str]) -> dict:
    """What metrics.json and the report are made from: 01's and 02's files, the predictions, the config."""
    inputs = []
    for name in names:
        inputs += common.data_files(cfg, name)
        summary = common.hlv_dir(cfg, name) / "summary.json"
        inputs += [summary] if summary.exists() else []
        for model_cfg in common.model_configs(cfg):
            for seed in common.training_seeds(cfg):
                folder = common.method_dir(common.with_seed(cfg, seed), name, model_cfg["tag"], "x").parent
                inputs += sorted(folder.glob("*/*.jsonl")) if folder.is_dir() else []
    return common.recipe(cfg, "06_eval", inputs, CONFIG_SECTIONS,
                         code=("eval_report.py", "endpoint_judge.py", "templates/human_form.html"), datasets=names,
                         seeds=common.training_seeds(cfg), methods=expected_methods(cfg),
                         targets={name: common.dataset_annotators(cfg, name) for name in names},
                         bf16_native=common.native_bf16())


def fill_adapter_cards(cfg: dict, results: dict) -> None:
    """Each SFT/CAPO adapter's model card gets its annotator's test metrics (pooled over seeds)."""
    for dataset, models in results.items():
        for model_tag, methods in models.items():
            for method, result in methods.items():
                if STAGE_OF_METHOD.get(method) not in ("04_sft", "05_capo"):
                    continue
                shared = method.endswith("_shared")  # one adapter: the mean over its targets
                entries = {None: result} if shared else result.get("per_annotator", {})
                for annotator, entry in entries.items():
                    for seed in common.training_seeds(cfg):
                        folder = common.adapter_dir(common.with_seed(cfg, seed), dataset, model_tag, method, annotator)
                        if folder.is_dir() and entry.get("status") == "ok":
                            numbers = {k: v for k, v in entry.items()
                                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
                            source = "06_eval.py, this run's test items" + (", mean over annotators" if shared else "")
                            common.update_adapter_card_metrics(folder, numbers, source=source)


def hlv_outputs(cfg: dict, names: list[str]) -> dict[str, dict | None]:
    """{dataset: {"markdown": 02's .md texts, "figures": its .png paths}, or None without 02's summary}."""
    outputs = {}
    for name in names:
        folder = common.hlv_dir(cfg, name)
        outputs[name] = None if not (folder / "summary.json").exists() else {
            "markdown": [md.read_text(encoding="utf-8") for md in sorted(folder.glob("*.md"))],
            "figures": sorted(folder.glob("*.png"))}
    return outputs


def training_curves(cfg: dict, names: list[str]) -> list[tuple[str, dict, str]]:
    """Panels (title, {annotator or "shared": (steps, values)}, y label): 04's and 05's training
    loss, CAPO's dev-selection score."""
    def curves(files, points_of):
        lines = {}
        for path in files:  # adapters/<method>/<annotator>/<file> or adapters/<method>_shared/<file>
            points = points_of(common.read_json(path))
            if points:
                lines["shared" if path.parent.name.endswith("_shared") else path.parent.name] = tuple(zip(*points))
        return lines

    panels = []
    for dataset in names:
        for model_cfg in common.model_configs(cfg):
            tag = model_cfg["tag"]
            adapters = common.adapter_dir(cfg, dataset, tag, "sft", None).parent
            for method in TRAINED_METHODS:
                logs = [*sorted(adapters.glob(f"{method}/*/train_log.json")),
                        *adapters.glob(f"{method}_shared/train_log.json")]
                loss = curves(logs, lambda log: [(row["step"], row["loss"]) for row in log.get("log_history", [])
                                                 if "loss" in row and "step" in row])
                if loss:
                    panels.append((f"{dataset}/{tag}: {method} training loss", loss, "loss"))
            selections = [*sorted(adapters.glob("capo/*/selection.json")), *adapters.glob("capo_shared/selection.json")]
            scores = curves(selections, lambda choice: [(row["step"], row["score"])
                                                        for row in choice.get("history") or []
                                                        if row and row.get("score") is not None])
            if scores:
                measure = next((common.read_json(p).get("measure") for p in selections), None)
                panels.append((f"{dataset}/{tag}: CAPO dev selection", scores, measure or "score"))
    return panels


def rated_form_version(folder: Path) -> str | None:
    """The version of the form in `folder` when raters' exports sit beside it, else None."""
    key = folder / "key.csv"
    if not key.exists() or not list(folder.glob("ratings-*.json")):
        return None
    return read_key(key)[0]


# ---- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = common.stage_parser(__doc__)
    parser.add_argument("--score-ratings", nargs="+", default=None, metavar="FILE",
                        help="score the human-validation form's exports (ratings-<rater>.json) and stop")
    parser.add_argument("--key", default=None, help="the form's key (default: key.csv beside the first export)")
    args, cfg = common.parse_stage_args(parser, argv)
    if args.score_ratings:
        paths = [Path(p) for p in args.score_ratings]
        score_ratings(cfg, paths, Path(args.key) if args.key else paths[0].parent / "key.csv")
        return
    started = time.time()
    check_eval_config(cfg)
    common.set_seed(cfg["seed"])
    tables_dir = common.tables_dir(cfg)

    # ---- done already if metrics.json was made from the same predictions, config and code
    names = common.selected_datasets(cfg, args.dataset)
    for name in names:
        common.require_data(cfg, name)
    made_from = eval_recipe(cfg, names)
    reason = "--force" if args.force else common.why_not_current(common.metrics_path(cfg), made_from)
    if args.dry_run:
        common.say_plan("eval", common.metrics_path(cfg), reason)
        return
    if reason is None:
        print(f"[eval] {common.metrics_path(cfg)} and {common.report_path(cfg)} are current (same predictions, "
              "config and code); skipped", flush=True)
        return
    print(f"[eval] evaluating ({reason}){common.process_label()}", flush=True)
    common.wait_for_everyone()  # every process has read the old manifest before rank 0 removes it
    if common.is_main_process():
        common.forget_output(common.metrics_path(cfg))
    datasets = {name: load_dataset(cfg, name) for name in names}
    loaded = {name: load_method_predictions(cfg, ds) for name, ds in datasets.items()}
    predictions = {name: {key: value[0] for key, value in loaded[name].items()} for name in names}

    # ---- the judge first: the one part shared out over the processes of a launch
    jobs = {name: judge_jobs(cfg, ds, predictions[name]) for name, ds in datasets.items()}
    judge_reason, judge = run_judge(cfg, [job for dataset_jobs in jobs.values() for job in dataset_jobs],
                                    {name: ds["everyone"] for name, ds in datasets.items()})
    if not common.is_main_process():
        return

    # ---- metrics and intervals, the judge's verdicts, claims
    results, draws = {}, {}
    for name, ds in datasets.items():
        results[name], draws[name], plan = evaluate_dataset(cfg, ds, loaded[name])
        crowd = (f"{len(ds['everyone'])} annotators: more than one judge prompt can show (JUDGE_MAX_ANNOTATORS "
                 f"{JUDGE_MAX_ANNOTATORS})" if len(ds["everyone"]) > JUDGE_MAX_ANNOTATORS else None)
        attach_judge(results[name], draws[name], ds, jobs[name], judge_reason or crowd, judge, plan)
    common.write_jsonl(tables_dir / "judge_verdicts.jsonl",  # every reply, for auditing the judge
                       ({k: v for k, v in job.items() if k != "messages"} for dataset_jobs in jobs.values()
                        for job in dataset_jobs if "reply" in job))
    calibration = {name: {**judge_calibration(results[name]), "judge": judge} for name in datasets}
    claims = claims_check(results, draws, datasets, calibration)
    lewidi = lewidi_view(cfg, datasets, predictions)

    # ---- save: metrics.json, then eval_report's tables, figures, human-validation form and report
    rows = result_rows(results, datasets, cfg["eval"])
    common.write_json(common.metrics_path(cfg), {"format_version": METRICS_FORMAT_VERSION, "rows": rows,
                                                 "results": results, "claims": claims,
                                                 "judge_calibration": calibration,
                                                 **({"lewidi": lewidi} if lewidi is not None else {})})
    eval_report.write_csv(tables_dir / "results.csv", list(RESULT_COLUMNS), rows)
    fill_adapter_cards(cfg, results)
    tables = eval_report.write_tables(cfg, results, rows, datasets, METRICS, list(FEATURES), tables_dir)
    if lewidi is not None:
        tables["lewidi"] = eval_report.write_lewidi_table(cfg, lewidi, tables_dir)
    figures, index = [], eval_report.rows_index(rows)
    for metric in (m for m in METRICS if m.figure):
        path = tables_dir / f"fig_{metric.name}.png"
        if eval_report.plot_metric(results, index, datasets, metric,
                                   primary_group_size(cfg["eval"]) if metric.kind == "group" else None, path):
            figures.append(path)
    curves = tables_dir / "fig_training_curves.png"
    curves = curves if eval_report.plot_training_curves(training_curves(cfg, names), curves) else None
    form_data, form_key = form_contents(cfg, datasets, predictions, jobs)
    human_eval = common.human_eval_dir(cfg)
    form_status = eval_report.write_human_form(form_data, form_key, human_eval, rated_form_version(human_eval))
    scores = (human_eval / "scores.md").read_text(encoding="utf-8") if (human_eval / "scores.md").exists() else None
    common.save_resolved_config(cfg, tables_dir, stage="06_eval")
    tables["examples"] = eval_report.write_examples(
        tables_dir, [cell for name, ds in datasets.items() for cell in example_cells(cfg, ds, predictions[name])])
    report = eval_report.write_report(cfg, results, claims, calibration, claim_rules_note(datasets), datasets,
                                      hlv_outputs(cfg, names), tables, figures, curves, form_status, scores,
                                      started, lewidi=lewidi)
    common.write_manifest(common.metrics_path(cfg), made_from, judge=judge)
    print(f"[eval] wrote {common.metrics_path(cfg)}, {tables_dir}/ and {report} in {time.time() - started:.0f}s",
          flush=True)


if __name__ == "__main__":
    common.run_stage(main)
