"""06_eval.py: metric functions on hand-made cases, the human-validation form and its scoring, and an
end-to-end run on a tiny invented run directory (every table, every column).

The fixture datasets are called varierr and par so the report's paper sections are
exercised, but every sentence in them is invented here; no raw data is read.
"""
from __future__ import annotations

import csv
import json
import random
import re
import shutil

import numpy as np
import pytest

import common
import eval_report
from conftest import ROOT, load_stage, mark_predictions, mark_prepared, write_config

ev6 = load_stage("06_eval")

NLI_TASK = dict(common.BUILTIN_TASKS["varierr"])
PAR_TASK = dict(common.BUILTIN_TASKS["par"])
NOUNS = ["cat", "river", "teacher", "bicycle", "garden", "violin", "market", "doctor", "lantern", "ship",
         "forest", "kettle", "painter", "bridge", "tower", "camera", "farmer", "harbor", "engine", "library",
         "mountain", "pilot", "museum", "orchard", "village", "window", "baker", "island", "station", "clock",
         "meadow", "castle"]
ADJECTIVES = ["quiet", "broken", "busy", "green", "old", "bright", "empty", "famous", "small", "cold"]


def feature_histograms(rows: list[dict], edges: dict) -> dict[str, np.ndarray]:
    """Feature KL's histograms by their definition (06 itself bins each row once, ev6.feature_bins, so
    that a bootstrap resample's histogram is a weighted bincount)."""
    histograms = {}
    for name in ev6.FEATURES:
        if name == "label":
            index = {category: i for i, category in enumerate(edges["label"])}
            histograms[name] = np.zeros(len(index))
            for row in rows:
                histograms[name][index[ev6.UNPARSED if row["label"] is None else row["label"]]] += 1
        else:
            values = [ev6.style_features(r["explanation"], r["text_a"], r["text_b"])[name] for r in rows]
            histograms[name] = np.bincount(np.digitize(np.asarray(values, dtype=float), edges[name]),
                                           minlength=len(edges[name]) + 1).astype(float)
    return histograms


def feature_kl(rows: list[dict], human_hist: dict, edges: dict, smoothing: float) -> dict[str, float]:
    """Feature KL of one row set against the human histograms, by its definition."""
    return {name: float(ev6.kl_divergence(human_hist[name], model, smoothing))
            for name, model in feature_histograms(rows, edges).items()}


def planted_explanation(annotator_index: int, noun: str, adj: str, rng: random.Random) -> str:
    """Each annotator has a planted habit: a style word and a shape of sentence."""
    filler = rng.choice(["today", "here", "again", "now"])
    return [f"Clearly the {noun} is {adj} {filler}, so it certainly follows.",
            f"Perhaps the {noun} might be {adj}; it may or may not hold {filler}.",
            f"Nothing says the {noun} was not {adj}, no evidence {filler} either.",
            f"{noun} {adj} {filler} match"][annotator_index]


def write_fixture_dataset(run_dir, name: str, task: dict, n_train: int = 24, n_test: int = 8, seed: int = 0):
    """train/dev/test.jsonl + stats.json for 4 annotators with planted styles."""
    rng = random.Random(seed)
    annotators = ["A0", "A1", "A2", "A3"] if name == "varierr" else ["Ann1", "Ann2", "Ann3", "Ann4"]
    splits = {"train": n_train, "dev": 2, "test": n_test}
    item_no = 0
    records_by_split = {}
    for split, n_items in splits.items():
        records = []
        for _ in range(n_items):
            noun, adj = NOUNS[item_no % len(NOUNS)], ADJECTIVES[item_no % len(ADJECTIVES)]
            item_id = f"{name[:1]}{item_no:03d}"
            item_no += 1
            text_a = f"The {noun} near the road was {adj} all week."
            text_b = f"A {noun} was {rng.choice(ADJECTIVES)}."
            for index, annotator in enumerate(annotators):
                if task["label_type"] == "categorical":
                    labels = [rng.choice(task["labels"])]
                    if annotator == "A1" and item_no % 3 == 0:  # a second label, as in VariErr
                        labels.append(next(lb for lb in task["labels"] if lb != labels[0]))
                else:
                    labels = [rng.randint(-5, 5)]
                for label in labels:
                    records.append({"dataset": name, "item_id": item_id, "split": split, "annotator": annotator,
                                    "text_a": text_a, "text_b": text_b, "label": label,
                                    "explanation": planted_explanation(index, noun, adj, rng), "valid": True})
        records_by_split[split] = records
        common.write_jsonl(run_dir / "data" / name / f"{split}.jsonl", records)
    common.write_json(run_dir / "data" / name / "stats.json", {"dataset": name, "task": task, "annotators": annotators})
    return records_by_split


def prediction(record: dict, method: str, output: str, parse: bool = True) -> dict:
    task = NLI_TASK if record["dataset"] == "varierr" else PAR_TASK
    label, explanation, ok = common.parse_response(output, task) if parse else (None, None, False)
    return {"dataset": record["dataset"], "item_id": record["item_id"], "annotator": record["annotator"],
            "method": method, "model": "tiny", "seed": 42, "output": output, "label": label,
            "explanation": explanation, "parse_ok": ok}


def write_fixture_predictions(run_dir, name: str, test: list[dict]):
    """sft: the target's own test response (perfect imitation); base: every target answers in
    the first annotator's words with one fixed label, and every fourth output is unparseable."""
    firsts = {}
    for record in test:
        firsts.setdefault((record["item_id"], record["annotator"]), record)
    first_annotator = sorted({r["annotator"] for r in test})[0]
    by_annotator = {}
    for (item_id, annotator), record in firsts.items():
        by_annotator.setdefault(annotator, []).append(record)
    for annotator, records in by_annotator.items():
        sft = [prediction(r, "sft", common.format_response(r["label"], r["explanation"])) for r in records]
        base = []
        for i, r in enumerate(records):
            voice = firsts[(r["item_id"], first_annotator)]
            fixed = "neutral" if name == "varierr" else 0
            text = common.format_response(fixed, voice["explanation"]) if i % 4 else "I am not sure about this one"
            base.append(prediction(r, "base", text))
        common.write_jsonl(run_dir / "predictions" / name / "tiny" / "sft" / f"{annotator}.jsonl", sft)
        common.write_jsonl(run_dir / "predictions" / name / "tiny" / "base" / f"{annotator}.jsonl", base)


def make_fixture_run(tmp_path, **changes):
    """A config and run dir with both fixture datasets and sft/base predictions (capo etc. missing)."""
    config = write_config(tmp_path, "smoke", eval__judge_items=6, eval__human_sheet_items=4,
                          eval__bootstrap_groups=20, **changes)
    run_dir = tmp_path / "run"
    for name, task in (("varierr", NLI_TASK), ("par", PAR_TASK)):
        splits = write_fixture_dataset(run_dir, name, task)
        write_fixture_predictions(run_dir, name, splits["test"])
        mark_prepared(config, name)
    mark_predictions(config)
    return config, run_dir


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """The fixture run after one 06 run without the judge and BERTScore (shared by two tests)."""
    config, run_dir = make_fixture_run(tmp_path_factory.mktemp("eval"), eval__judge__backend="none", eval__bertscore=False)
    ev6.main(["--config", str(config)])
    return config, run_dir


# ----------------------------------------------------------------------------
# Metric functions with known answers
# ----------------------------------------------------------------------------
def test_rouge_l_identical_is_one_and_max_over_references():
    scores = ev6.rouge_l(["the cat sat on the mat", "the cat sat", ""],
                         [["the cat sat on the mat"], ["a dog barked", "the cat sat"], ["anything"]])
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(1.0)  # the best reference counts
    assert scores[2] == 0.0
    assert 0 < ev6.rouge_l(["the cat sat down"], [["the dog sat up"]])[0] < 1


def test_kl_is_zero_for_identical_and_known_for_a_hand_case():
    counts = np.array([3.0, 1.0, 0.0])
    assert ev6.kl_divergence(counts, counts, 1e-6) == pytest.approx(0.0, abs=1e-12)
    p, q = np.array([1.0, 1.0]), np.array([9.0, 1.0])  # 0.5/0.5 against 0.9/0.1
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert ev6.kl_divergence(p, q, 0.0) == pytest.approx(expected)
    assert ev6.kl_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 1e-6) > 5  # disjoint: large, finite


def test_feature_kl_identical_texts_zero_and_different_style_positive():
    rows = [{"explanation": f"the {n} might not be {a} here", "text_a": f"A {n} is {a}.", "text_b": "Something.",
             "label": "neutral"} for n, a in zip(NOUNS[:12], ADJECTIVES * 2)]
    train = {name: [] for name in ev6.STYLE_FEATURES}
    for row in rows:
        for name, value in ev6.style_features(row["explanation"], row["text_a"], row["text_b"]).items():
            train[name].append(value)
    edges = ev6.feature_bin_edges(train, 10)
    edges["label"] = ev6.label_categories(NLI_TASK)
    human = feature_histograms(rows, edges)
    same = feature_kl(rows, human, edges, 1e-6)
    assert set(same) == set(ev6.FEATURES)
    assert all(value == pytest.approx(0.0, abs=1e-12) for value in same.values())
    terse = [dict(row, explanation="yes", label=None) for row in rows]  # short, no hedges, unparsed labels
    different = feature_kl(terse, human, edges, 1e-6)
    assert different["length_words"] > 1 and different["hedge_rate"] > 1 and different["label"] > 1


def test_style_features_hand_case():
    features = ev6.style_features("It might not rain, it can't rain", "It will rain.", "Rain is wet.")
    # words: it might not rain it can't rain -> 7 words, 5 types; hedges: might; negations: not, can't
    assert features == pytest.approx({"length_words": 7.0, "hedge_rate": 1 / 7, "type_token_ratio": 5 / 7,
                                      "input_overlap": 4 / 7, "negation_rate": 2 / 7})


def test_decision_outcome_counts_unparsed_as_wrong():
    assert ev6.decision_outcome("neutral", ["entailment", "neutral"], NLI_TASK) == {"correct": True}
    assert ev6.decision_outcome(None, ["neutral"], NLI_TASK) == {"correct": False}
    assert ev6.decision_outcome(3, [1], PAR_TASK) == {"abs_error": 2, "sign_correct": True}
    assert ev6.decision_outcome(None, [2], PAR_TASK) == {"abs_error": 7, "sign_correct": False}  # worst case: -5
    assert ev6.decision_outcome(0, [-1], PAR_TASK)["sign_correct"] is False


def test_parse_verdict_and_normalised_imitation():
    annotators = ["Ann1", "Ann2", "Ann10"]
    assert ev6.parse_verdict("I think ann2 wrote it", annotators) == "Ann2"
    assert ev6.parse_verdict("Ann10.", annotators) == "Ann10"
    assert ev6.parse_verdict("Annotator number two", annotators) is None
    assert ev6.normalised_imitation(0.45, 0.9) == pytest.approx(0.5)
    assert ev6.normalised_imitation(None, 0.9) is None


def planted_vectors(n_items: int, directions: dict, rng, strength: float = 0.5):
    """Item content (shared by all annotators of an item) + an annotator direction + noise."""
    annotators, dim = list(directions), len(next(iter(directions.values())))
    X, ids, who = [], [], []
    for item in range(n_items):
        content = rng.normal(size=dim) * 3
        for a in annotators:
            X.append(content + strength * directions[a] + rng.normal(size=dim))
            ids.append(f"i{item}")
            who.append(a)
    return np.array(X), ids, who


@pytest.mark.parametrize("shuffled", [False, True])
def test_group_confidence_planted_above_chance_shuffled_near_chance(shuffled):
    annotators = ["A0", "A1", "A2", "A3"]
    rng = np.random.default_rng(0)
    directions = {a: rng.normal(size=16) for a in annotators}
    train_X, train_ids, train_y = planted_vectors(60, directions, rng)
    test_X, test_ids, test_y = planted_vectors(30, directions, rng)
    if shuffled:  # break the link between a text and its author: nothing left to learn
        train_y = list(rng.permutation(train_y))
    train_X = common.remove_item_content(train_X, train_ids, common.item_means(train_X, train_ids))
    means = common.item_means(test_X, test_ids)
    test_X = common.remove_item_content(test_X, test_ids, means)
    clf = common.fit_annotator_classifier({"classifier": "logistic_regression", "C": 1.0, "standardize": True},
                                          train_X, train_y, 0)
    confidences = [common.group_target_confidence(clf, test_X[[y == a for y in test_y]], a, 10, 100, 1)["mean_prob"]
                   for a in annotators]
    mean_conf = float(np.mean(confidences))
    if shuffled:
        assert abs(mean_conf - 0.25) < 0.1
    else:
        assert mean_conf > 0.6


# ----------------------------------------------------------------------------
# Group metrics at several group sizes: the cap, and small m grading where the whole set saturates
# ----------------------------------------------------------------------------
class ScoresAreTheVectors:
    """A linear annotator classifier whose class scores are the vectors themselves (4 classes)."""
    classes_ = np.array(["A0", "A1", "A2", "A3"])

    def decision_function(self, X):
        return np.asarray(X, dtype=float)

    def predict_proba(self, X):
        scores = self.decision_function(X)
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        return scores / scores.sum(axis=1, keepdims=True)


def group_sizes_entry(X, human_X, share=0.5, sizes=(1, 5, 10, 50)):
    """06's group metrics of outputs X for target A0 against human responses human_X (one row per item)."""
    cfg = {"seed": 3, "eval": {"group_sizes": list(sizes), "group_size_max_share": share, "bootstrap_groups": 200,
                               "bootstrap_group_draws": 30}}
    clf = ScoresAreTheVectors()
    imitation = {"clf": clf, "human_X": {"A0": human_X}, "cache": {}}
    n_items = max(len(X), len(human_X))
    slots = np.random.default_rng(0).integers(0, n_items, size=(200, n_items))
    human = {"targets": {"A0": {"logits": common.row_logits(clf, human_X), "item": np.arange(len(human_X))}}}
    entry, draws = ev6.group_entry(cfg, {"name": "x"}, imitation, "A0", common.row_logits(clf, X), np.arange(len(X)),
                                   {"A0": {"slots": slots}}, human, (len(X),))
    ev6.attach_intervals(entry, draws)
    return entry


def target_rows(n: int) -> np.ndarray:
    """Outputs the classifier gives to the target half the time: alternately clearly A0 and A1."""
    return np.array([[8.0, 0, 0, 0] if i % 2 == 0 else [0, 2.0, 0, 0] for i in range(n)])


def test_outputs_equal_to_the_human_responses_imitate_them_exactly():
    """Model and human sides go through the same sampler with the same seed: identical rows give
    identical group confidences, so normalised imitation is exactly 1 at every m."""
    entry = group_sizes_entry(target_rows(40), target_rows(40))
    assert all(entry[f"norm_imitation_m{m}"] == 1.0 for m in (1, 5, 10, 50))
    assert entry["group_clf_conf"] == entry["human_group_clf_conf"]


@pytest.mark.parametrize("n, used_for_50", [(40, 20), (200, 50), (100, 50), (99, 49)])
def test_group_size_is_capped_at_half_the_outputs_and_the_m_used_is_recorded(n, used_for_50):
    entry = group_sizes_entry(target_rows(n), target_rows(n))
    assert entry["group_m_used"] == {"1": 1, "5": 5, "10": 10, "50": used_for_50}
    assert entry["group_m"] == used_for_50  # the primary m (the largest requested) is m = 50, capped
    for metric in ("group_clf_conf", "group_accuracy", "norm_imitation", "human_group_clf_conf"):
        assert entry[metric] == entry[f"{metric}_m50"] and entry[f"{metric}_ci"] == entry[f"{metric}_m50_ci"]
    # n = min(outputs, human test responses): fewer human responses cap it too
    assert group_sizes_entry(target_rows(n), target_rows(30))["group_m_used"]["50"] == 15


def test_sizes_that_cap_to_the_same_m_share_the_value_and_too_few_outputs_are_missing_with_a_reason():
    entry = group_sizes_entry(target_rows(16), target_rows(16))  # cap floor(0.5 x 16) = 8
    assert entry["group_m_used"] == {"1": 1, "5": 5, "10": 8, "50": 8}
    assert entry["group_clf_conf_m10"] == entry["group_clf_conf_m50"]
    assert entry["norm_imitation_m10_ci"] == entry["norm_imitation_m50_ci"]
    single = group_sizes_entry(target_rows(1), target_rows(16))  # floor(0.5 x 1) = 0: no real subsample
    assert single["group_m_used"] == {"1": None, "5": None, "10": None, "50": None} and single["group_m"] == 0
    assert single["group_clf_conf_m1"] is None and single["norm_imitation"] is None
    assert "floor(0.5 x n=1) = 0" in single["reasons"]["group_clf_conf_m1"]
    assert "floor(0.5 x n=1) = 0" in single["reasons"]["norm_imitation"]


def test_small_m_grades_where_the_whole_output_set_saturates():
    X = target_rows(40)
    whole = group_sizes_entry(X, X, share=1.0, sizes=(1, 40))  # share 1: m = 40 is every output
    assert whole["group_m_used"] == {"1": 1, "40": 40}
    # every group of 40 is the whole set: classified as the target every time (0 or 1 per target)
    assert whole["group_accuracy_m40"] == 1.0 and whole["group_clf_conf_m40"] > 0.9
    # single outputs: the target half the time, a value strictly inside (0, 1), with an interval
    assert 0.3 < whole["group_accuracy_m1"] < 0.7 and 0.4 < whole["group_clf_conf_m1"] < 0.7
    low, high = whole["group_clf_conf_m1_ci"]
    assert 0 < low <= whole["group_clf_conf_m1"] <= high < 1
    # the default cap: m = 50 becomes 20, real subsamples of the 40 outputs
    capped = group_sizes_entry(X, X)
    assert capped["group_m_used"]["50"] == 20 and capped["group_clf_conf_m1"] < capped["group_clf_conf_m10"]


def test_bad_group_sizes_stop_with_one_message(tmp_path):
    with pytest.raises(common.InputError, match="eval.group_sizes"):
        ev6.main(["--config", str(write_config(tmp_path, "smoke", eval__group_sizes=[0, 5]))])
    with pytest.raises(common.InputError, match="eval.group_size_max_share"):
        ev6.main(["--config", str(write_config(tmp_path, "smoke", eval__group_size_max_share=1.5))])


# ----------------------------------------------------------------------------
# End to end on the fixture run dir; the human-validation sheet round trip
# ----------------------------------------------------------------------------
def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_results_rows_are_the_long_form_of_every_number(evaluated_run):
    """tables/results.csv and metrics.json's rows: one row per number, keyed uniquely, equal to the
    nested view, a reason wherever the value is missing, only registry metrics."""
    config, run_dir = evaluated_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["format_version"] == ev6.METRICS_FORMAT_VERSION
    rows = metrics["rows"]
    header, csv_rows = read_csv(run_dir / "tables" / "results.csv")
    assert header == list(ev6.RESULT_COLUMNS) and len(csv_rows) == len(rows)
    keys = [tuple(row[c] for c in ("dataset", "model", "method", "target", "metric", "m", "feature", "seed"))
            for row in rows]
    assert len(set(keys)) == len(keys)
    assert {row["metric"] for row in rows} <= set(ev6.METRIC)
    assert all((row["value"] is None) == (row["reason"] is not None) for row in rows)
    nested = metrics["results"]
    row_of = {key: row for key, row in zip(keys, rows)}
    sft = row_of[("varierr", "tiny", "sft", "macro", "label_acc", None, None, None)]
    assert sft["value"] == nested["varierr"]["tiny"]["sft"]["label_acc"]
    assert [sft["ci_low"], sft["ci_high"]] == nested["varierr"]["tiny"]["sft"]["label_acc_ci"]
    primary = max(ev6.requested_group_sizes(common.load_config(config)["eval"]))
    first = next(iter(nested["par"]["tiny"]["base"]["per_annotator"]))
    base = row_of[("par", "tiny", "base", first, "norm_imitation", primary, None, None)]
    assert base["value"] == nested["par"]["tiny"]["base"]["per_annotator"][first]["norm_imitation"]
    kl = row_of[("varierr", "tiny", "base", "macro", "feature_kl", None, "length_words", None)]
    assert kl["value"] == nested["varierr"]["tiny"]["base"]["feature_kl_by_feature"]["length_words"]
    # a metric that does not apply to the task has no row; a missing method has rows saying why
    assert not any(row["dataset"] == "par" and row["metric"] == "label_acc" for row in rows)
    capo = [row for row in rows if row["dataset"] == "varierr" and row["method"] == "capo"]
    assert capo and all(row["value"] is None and "05_capo" in row["reason"] for row in capo)


def test_every_value_lies_inside_its_interval_unless_the_registry_says_it_may_not(evaluated_run):
    """A value and its interval come from one computation (the statistic on the observed items,
    and on resamples of them): the value lies inside, except where the registry flags a biased
    statistic (feature KL), whose table notes say so."""
    config, run_dir = evaluated_run
    rows = json.loads((run_dir / "metrics.json").read_text())["rows"]
    checked = [row for row in rows if row["ci_low"] is not None and not ev6.METRIC[row["metric"]].interval_may_miss]
    assert {row["metric"] for row in checked} >= {"label_acc", "mae", "rouge_l", "group_clf_conf", "norm_imitation"}
    outside = [row for row in checked if not row["ci_low"] - 1e-12 <= row["value"] <= row["ci_high"] + 1e-12]
    assert not outside, outside[:3]
    flagged = [m.label for m in ev6.METRICS if m.interval_may_miss]
    notes = (run_dir / "tables" / "table4_main.md").read_text()
    assert flagged and all("feature KL" in label for label in flagged) and "interval can sit above the value" in notes


def test_end_to_end_every_table_every_column(evaluated_run):
    config, run_dir = evaluated_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    nli, par = metrics["results"]["varierr"]["tiny"], metrics["results"]["par"]["tiny"]
    # perfect imitation (sft copies the human test responses)
    assert nli["sft"]["label_acc"] == 1.0 and nli["sft"]["parse_rate"] == 1.0
    assert nli["sft"]["rouge_l"] == pytest.approx(1.0) and nli["sft"]["emb_cos"] == pytest.approx(1.0, abs=1e-5)
    assert nli["sft"]["norm_imitation"] == pytest.approx(1.0, abs=0.05)  # A1's second labels: other rows
    assert par["sft"]["norm_imitation"] == pytest.approx(1.0)
    assert par["sft"]["mae"] == 0.0 and par["sft"]["sign_acc"] == 1.0
    # with a second label only on some items the A1 duplicates differ from the first response: KL > 0 is fine
    # there, but for par (one response per cell) KL is exactly 0
    assert par["sft"]["feature_kl"] == pytest.approx(0.0, abs=1e-9)
    # base speaks in one annotator's voice and leaves some outputs unparsed
    assert nli["base"]["parse_rate"] == pytest.approx(0.75, abs=0.1)
    assert nli["base"]["label_acc"] < 1 and nli["base"]["feature_kl"] > par["sft"]["feature_kl"]
    assert nli["base"]["norm_imitation"] < nli["sft"]["norm_imitation"] - 0.2
    # missing methods are rows that say so, with every metric null plus a reason
    assert nli["capo"]["status"] == "missing" and "05_capo" in nli["capo"]["reason"]
    assert nli["human"]["group_clf_conf"] > 0.25 and nli["human"]["norm_imitation"] == 1.0
    for metric in ("label_acc", "rouge_l", "feature_kl", "group_clf_conf", "norm_imitation", "judge_attribution",
                   "bertscore_f1", "emb_cos", "parse_rate", "per_annotator"):
        assert metric in nli["sft"]
    assert nli["sft"]["bertscore_f1"] is None and "disabled" in nli["sft"]["reasons"]["bertscore_f1"]
    assert set(nli["sft"]["per_annotator"]) == {"A0", "A1", "A2", "A3"}

    tables = run_dir / "tables"
    expected_columns = {
        "table4_main": ["dataset", "model", "method", "status"] + [m.label for m in ev6.METRICS if m.table]
                       + ["notes"],
        "table6_feature_kl": ["dataset", "model", "method", "status", *ev6.FEATURES, "mean"],
        "judge_attribution": ["dataset", "model", "method", "judged outputs", "correct", "accuracy", "chance",
                              "unparseable verdicts", "cells without output", "judge model", "calibration"],
        "per_annotator": ["dataset", "model", "method", "annotator", "status", "n"]
                         + [m.label for m in ev6.METRICS if m.table],
    }
    for stem, columns in expected_columns.items():
        header, rows = read_csv(tables / f"{stem}.csv")
        assert header == columns
        assert rows and all(len(row) == len(columns) for row in rows)
        for row in rows:  # every cell filled or says why not ("notes" may be empty)
            assert all(value.strip() for column, value in zip(columns, row) if column != "notes"), row
        assert (tables / f"{stem}.md").read_text().count("\n|") >= len(rows) + 1
    header, rows = read_csv(tables / "table4_main.csv")
    capo = next(row for row in rows if row[0] == "varierr" and row[2] == "capo")
    assert all(value.startswith("missing") for value in capo[4:-1])
    par_sft = next(row for row in rows if row[0] == "par" and row[2] == "sft")
    assert par_sft[header.index("label acc")].startswith("n/a: ")
    assert int(par_sft[header.index("group m")]) == par["sft"]["group_m"]
    assert "missing [" in (tables / "table4_main.md").read_text()  # markdown: reasons as footnotes
    assert {row[2] for row in rows if row[0] == "varierr"} >= {"base", "icl", "vp", "vp_icl", "sft", "capo"}
    assert list((tables).glob("fig_*.png")) and (tables / "config.resolved.yaml").exists()

    report = (run_dir / "report.md").read_text()
    for heading in ("At a glance", "Table 4", "Table 6", "LLM-as-judge", "Per-annotator", "Resolved config"):
        assert heading in report
    assert eval_report.fmt(eval_report.PAPER_TABLE4[1][2]) in report and "paper" in report.lower()

    # group metrics at every m of eval.group_sizes; the plain names are m = 50, capped at floor(0.5 x 8) = 4
    sizes = common.load_config(config)["eval"]["group_sizes"]
    assert sizes == [1, 5, 10, 50]
    base = nli["base"]
    assert base["group_m"] == 4 and base["group_m_used"] == {"1": [1, 1], "5": [4, 4], "10": [4, 4], "50": [4, 4]}
    assert base["per_annotator"]["A0"]["group_m_used"] == {"1": 1, "5": 4, "10": 4, "50": 4}
    assert base["group_clf_conf"] == base["group_clf_conf_m50"] and base["norm_imitation_ci"] == base["norm_imitation_m50_ci"]
    assert all(claim["metric"] in ("group_clf_conf", "norm_imitation", "feature_kl", "judge_attribution", "label_acc", "mae")
               for claim in metrics["claims"])  # claims stay on the primary m
    header, rows = read_csv(tables / "group_sizes.csv")
    assert header == (["dataset", "model", "method", "status"]
                      + [f"{label} m={m}" for m in sizes for label in ("group clf conf", "norm. imitation")] + ["m used"])
    base_row = next(row for row in rows if row[0] == "varierr" and row[2] == "base")
    assert base_row[header.index("m used")] == "1, 5->4, 10->4, 50->4"
    assert re.fullmatch(r"0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]", base_row[header.index("group clf conf m=1")])
    assert all(value.strip() for row in rows for value in row)
    assert "#### Group classifier confidence and normalised imitation by group size m" in report
    assert "floor(0.5 x n)" in report and "saturates" in report
    assert "no value for capo" in report  # CAPO is missing, so its claims cannot be resolved
    assert (run_dir / "human_eval" / "form.html").exists() and (run_dir / "human_eval" / "key.csv").exists()


def form_data_and_key(run_dir):
    """(the data embedded in form.html, the key rows) of an evaluated run."""
    page = (run_dir / "human_eval" / "form.html").read_text()
    data = json.loads(re.search(r'<script id="form-data" type="application/json">(.*?)</script>', page, re.S).group(1))
    header, rows = read_csv(run_dir / "human_eval" / "key.csv")
    return page, data, [dict(zip(header, row)) for row in rows]


def test_the_form_is_blinded_and_its_key_says_what_each_cell_is(evaluated_run):
    config, run_dir = evaluated_run
    page, data, key = form_data_and_key(run_dir)
    cfg = common.load_config(config)
    assert {row["cell"] for row in key} == {cell["id"] for cell in data["cells"]}
    assert {row["form_version"] for row in key} == {data["version"]}
    assert {row["method"] for row in key} == {"human", "sft", "base"} and {row["model"] for row in key} == {"", "tiny"}
    # Nothing on the page names a method or a model; the cells carry no source
    for name in ("sft", "capo", "vp_icl", "icl", "tiny", "\"human\"", "\"method\"", "\"model\""):
        assert name not in page, name
    assert all(set(cell) == {"id", "dataset", "target", "text_a", "text_b", "response"} for cell in data["cells"])
    # The judge's first cells, every source once, plus the attention copies of human references
    attention = [row for row in key if row["attention_of"]]
    per_dataset = cfg["eval"]["human_attention_cells"]
    assert len(attention) == 2 * per_dataset
    by_cell = {row["cell"]: row for row in key}
    for row in attention:
        original = by_cell[row["attention_of"]]
        assert original["method"] == row["method"] == "human" and original["item_id"] == row["item_id"]
        assert [c["response"] for c in data["cells"] if c["id"] in (row["cell"], original["cell"])][0] == \
            [c["response"] for c in data["cells"] if c["id"] in (row["cell"], original["cell"])][1]
    for name in ("varierr", "par"):
        ds = ev6.load_dataset(cfg, name)
        judge_keys = ev6.sample_keys(ds, cfg["eval"]["judge_items"], ev6.stable_seed(cfg["seed"], "judge", name))
        form_keys = {(row["item_id"], row["target"]) for row in key if row["dataset"] == name}
        shared = min(cfg["eval"]["judge_items"], cfg["eval"]["human_sheet_items"])
        assert set(judge_keys[:shared]) <= form_keys  # humans and the judge answer the same cells


HAND_KEY = [  # (cell, dataset, item, target, model, method, attention_of, judge_verdict)
    ("c1", "varierr", "i1", "A0", "m", "capo", "", "A0"),
    ("c2", "varierr", "i2", "A1", "m", "capo", "", "A0"),
    ("c3", "varierr", "i1", "A0", "", "human", "", "A0"),
    ("c4", "varierr", "i2", "A1", "", "human", "", ""),
    ("c5", "varierr", "i1", "A0", "", "human", "c3", ""),
]


def write_hand_key(folder, version="v1"):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [dict(zip(("cell", "dataset", "item_id", "target", "model", "method", "attention_of", "judge_verdict"), row),
                 form_version=version) for row in HAND_KEY]
    eval_report.write_csv(folder / "key.csv", list(ev6.KEY_COLUMNS), rows)
    return folder / "key.csv"


def write_export(folder, rater, answers, version="v1"):
    """answers: {cell: (attribution, coherence, grounding, style)}"""
    path = folder / f"ratings-{rater}.json"
    cells = [{"cell": cell, "position": i + 1, "seconds": 3.0,
              "answers": dict(zip(("attribution", "coherence", "grounding", "style"), given))}
             for i, (cell, given) in enumerate(answers.items())]
    path.write_text(json.dumps({"form_version": version, "rater": rater, "order_shown": list(answers), "cells": cells}))
    return path


def test_scoring_two_raters_matches_a_hand_computed_case(tmp_path):
    """By hand: capo coherence r1 (1, 1) and r2 (1, 2) -> mean 1.25; human attribution on capo:
    r1 names A0, A1 (both right), r2 A0, A0 (one right) -> 3/4; the judge on capo: c1 right, c2
    wrong -> 1/2. Coherence over the 4 counted cells, r1 (1, 1, 2, 2) and r2 (1, 2, 2, 2): binary
    values, so ordinal alpha = nominal alpha = 1 - (n - 1) * D / (2 n1 n2) with n = 8 pairable
    values (three 1s, five 2s) and D = 2 disagreeing ordered pairs: 1 - 7 * 2 / 30 = 8/15.
    Attribution kappa over the 4 cells: r1 (A0, A1, A0, A1), r2 (A0, A0, A0, A1): p_o = 3/4,
    p_e = 1/2 * 3/4 + 1/2 * 1/4 = 1/2 -> kappa 1/2. Attention: r1's copy c5 agrees with c3
    (passed); r2's copy names another annotator (failed)."""
    key = write_hand_key(tmp_path / "human_eval")
    cfg = common.load_config(ROOT / "configs" / "smoke.yaml")
    r1 = write_export(key.parent, "ana", {"c1": ("A0", 1, 3, 4), "c2": ("A1", 1, 3, 4), "c3": ("A0", 2, 5, 5),
                                          "c4": ("A1", 2, 5, 5), "c5": ("A0", 2, 4, 5)})
    r2 = write_export(key.parent, "ben", {"c1": ("A0", 1, 3, 4), "c2": ("A0", 2, 3, 4), "c3": ("A0", 2, 5, 5),
                                          "c4": ("A1", 2, 5, 5), "c5": ("A1", 1, 5, 5)})
    scores = ev6.score_ratings(cfg, [r1, r2], key)
    capo = next(row for row in scores["methods"] if row["method"] == "capo")
    human = next(row for row in scores["methods"] if row["method"] == "human")
    assert capo["cells"] == 2 and human["cells"] == 2  # the attention copy is not counted
    assert capo["coherence"] == pytest.approx(1.25) and capo["style"] == pytest.approx(4.0)
    assert capo["human_attribution"] == pytest.approx(0.75) and capo["judge_attribution"] == pytest.approx(0.5)
    assert capo["judge_cells"] == 2 and human["judge_cells"] == 1 and capo["chance"] == pytest.approx(0.5)
    assert capo["coherence_ci"][0] <= capo["coherence"] <= capo["coherence_ci"][1]
    assert scores["alpha"]["coherence"] == pytest.approx(8 / 15)
    assert scores["alpha"]["grounding"] == pytest.approx(1.0)
    assert scores["attribution_kappa"] == [{"raters": ["ana", "ben"], "cells": 4, "kappa": pytest.approx(0.5)}]
    assert scores["attention"] == {"ana": {"pairs": 1, "passed": 1}, "ben": {"pairs": 1, "passed": 0}}
    markdown = (key.parent / "scores.md").read_text()
    assert "| varierr | m | capo | 2 |" in markdown and "ana vs ben: 0.500 over 4 cells" in markdown


@pytest.mark.parametrize("spoil, message", [
    (lambda folder: write_export(folder, "ana", {"c1": ("A0", 1, 1, 1)}, version="v0"), r"form_version.*version 'v0'"),
    (lambda folder: write_export(folder, "ana", {"c9": ("A0", 1, 1, 1)}), r"field 'cells\[0\]\.cell'.*c9"),
    (lambda folder: write_export(folder, "ana", {"c1": ("A0", 6, 1, 1)}), r"coherence 6 is not an integer"),
    (lambda folder: write_export(folder, "ana", {"c1": ("A7", 1, 1, 1)}), r"attribution 'A7' is not an annotator"),
    (lambda folder: (folder / "ratings-ana.json").write_text('{"form_version": "v1", "rater": "ana", "cells": [{"ce'),
     r"ratings-ana.json, line 1: not a complete ratings export"),
])
def test_a_bad_export_stops_with_one_line_naming_file_and_field(tmp_path, spoil, message):
    key = write_hand_key(tmp_path / "human_eval")
    cfg = common.load_config(ROOT / "configs" / "smoke.yaml")
    spoil(key.parent)
    with pytest.raises(common.InputError, match=message):
        ev6.score_ratings(cfg, [key.parent / "ratings-ana.json"], key)


def test_a_rater_who_exported_twice_is_refused(tmp_path):
    key = write_hand_key(tmp_path / "human_eval")
    cfg = common.load_config(ROOT / "configs" / "smoke.yaml")
    first = write_export(key.parent, "ana", {"c1": ("A0", 1, 1, 1)})
    second = key.parent / "ratings-ana-again.json"
    second.write_text(first.read_text())
    with pytest.raises(common.InputError, match=r"rater 'ana' exported twice"):
        ev6.score_ratings(cfg, [first, second], key)


def test_a_form_with_exports_beside_it_is_not_replaced(evaluated_run, tmp_path):
    config, run_dir = evaluated_run
    folder = shutil.copytree(run_dir / "human_eval", tmp_path / "human_eval")
    page, data, key = form_data_and_key(tmp_path)
    before = (folder / "form.html").read_text()
    write_export(folder, "ana", {key[0]["cell"]: ("A0", 1, 1, 1)}, version=data["version"])
    changed = {**{k: v for k, v in data.items() if k != "version"}, "seed": data["seed"] + 1}
    assert ev6.rated_form_version(folder) == data["version"]
    status = eval_report.write_human_form(changed, [{k: v for k, v in row.items() if k != "form_version"}
                                                    for row in key], folder, ev6.rated_form_version(folder))
    assert "left as it is" in status and (folder / "form.html").read_text() == before
    (folder / "ratings-ana.json").unlink()  # no exports: a new form replaces it
    assert ev6.rated_form_version(folder) is None
    status = eval_report.write_human_form(changed, [{k: v for k, v in row.items() if k != "form_version"}
                                                    for row in key], folder, ev6.rated_form_version(folder))
    assert "left as it is" not in status and (folder / "form.html").read_text() != before


def test_a_judge_that_always_names_one_annotator_is_at_chance_on_unbalanced_cells():
    """30 cells round robin over 4 annotators (8, 8, 7, 7): a judge that always says A0 is right
    on 8 of 30 (0.267 > 1/4). Its interval is a point (every resample keeps the 8 A0 cells), so
    only a chance of 8/30 keeps it from passing the calibration gate (found in the rehearsal)."""
    annotators = ["A0", "A1", "A2", "A3"]
    jobs = [{"annotator": annotators[i % 4], "messages": [], "verdict": "A0"} for i in range(30)]
    summary = ev6.judge_summary(jobs, annotators, None, {"label": "judge"})
    assert summary["accuracy"] == pytest.approx(8 / 30) == summary["chance"]
    reference = {**summary, "accuracy_ci": [8 / 30, 8 / 30]}
    calibration = ev6.judge_calibration({"judge": {ev6.HUMAN: {"judge": reference}}})
    assert calibration["informative"] is False and "not above chance" in calibration["reason"]
    balanced = ev6.judge_summary(jobs[:28], annotators, None, {"label": "judge"})
    assert balanced["chance"] == 0.25


def test_judge_and_bertscore_on_the_tiny_model(tmp_path, tiny_model):
    """The judge (the smoke profile's tiny model) and BERTScore (MiniLM), once."""
    config, run_dir = make_fixture_run(tmp_path, eval__judge__backend="local", eval__bertscore=True)
    ev6.main(["--config", str(config), "--dataset", "varierr"])
    everything = json.loads((run_dir / "metrics.json").read_text())
    metrics = everything["results"]["varierr"]["tiny"]
    calibration = everything["judge_calibration"]["varierr"]  # the judge on the human references, vs chance
    # 6 cells round robin over 4 annotators (2, 2, 1, 1): always naming A0 would get 2 of 6
    assert calibration["chance"] == pytest.approx(2 / 6)
    assert calibration["informative"] == (calibration["ci"][0] > calibration["chance"])
    assert metrics["sft"]["bertscore_f1"] == pytest.approx(1.0, abs=1e-4)
    assert 0 < metrics["base"]["bertscore_f1"] < 1
    for method in ("sft", "base", "human"):
        judge = metrics[method]["judge"]
        assert judge["n"] == 6 and 0 <= judge["accuracy"] <= 1 and judge["chance"] == pytest.approx(2 / 6)
        assert judge["unparseable"] == 0  # a forced choice among the IDs: every output gets a verdict
        low, high = judge["accuracy_ci"]  # bootstrap over the judged cells' items
        assert low <= judge["accuracy"] <= high
    assert metrics["capo"]["judge_attribution"] is None
    header, rows = read_csv(run_dir / "tables" / "judge_attribution.csv")
    sft = next(row for row in rows if row[2] == "sft")
    assert sft[header.index("judged outputs")] == "6" and sft[header.index("judge model")] == "tiny (local)"
    human = next(row for row in rows if row[2].startswith("calibration: human"))
    assert human[header.index("calibration")].startswith(
        "informative" if calibration["informative"] else "UNINFORMATIVE")
    assert {job["reply"] for job in map(json.loads, (run_dir / "tables" / "judge_verdicts.jsonl").open())} <= \
        {"A0", "A1", "A2", "A3"}


# ----------------------------------------------------------------------------
# Provenance: 06 never scores stale predictions, and skips when nothing changed
# ----------------------------------------------------------------------------
def test_06_refuses_stale_predictions_and_skips_when_current(tmp_path, capsys):
    config, run_dir = make_fixture_run(tmp_path, eval__judge__backend="none", eval__bertscore=False)
    ev6.main(["--config", str(config)])
    capsys.readouterr()
    ev6.main(["--config", str(config)])
    assert "are current (same predictions, config and code); skipped" in capsys.readouterr().out
    ev6.main(["--config", str(config), "--eval.bootstrap_resamples", "30"])
    assert "evaluating (config eval.bootstrap_resamples was 100, now 30)" in capsys.readouterr().out
    # Predictions of another training seed (or split, adapter) are refused, naming the command that redoes them.
    with pytest.raises(common.InputError, match=r"base/A0.jsonl: not made from the files and config now present "
                                                r"\(config seed was 42, now 7\); redo it with: python "
                                                r"03_prompt_baselines.py .*--dataset varierr --seed 7"):
        ev6.main(["--config", str(config), "--seed", "7"])
    assert ev6.redo_command(common.load_config(config), "par", "sft", "Ann2").startswith("python 04_sft.py --config ")
    assert ev6.redo_command(common.load_config(config), "par", "sft", "Ann2").endswith("--dataset par --annotators Ann2")


@pytest.mark.parametrize("judge, message", [
    ({"backend": "remote"}, r"field 'eval.judge.backend': 'remote' is not one of local, openai, none"),
    ({"backend": "local", "model": "nobody"}, r"field 'eval.judge.model': 'nobody' is not a model tag"),
    ({"backend": "openai", "model": "m"}, r"field 'eval.judge.base_url': needed by backend openai"),
    ({"backend": "openai", "base_url": "http://127.0.0.1:1/v1"}, r"field 'eval.judge.model': needed by backend openai"),
])
def test_a_judge_setting_that_cannot_work_stops_in_one_line(judge, message):
    cfg = common.load_config(ROOT / "configs" / "smoke.yaml")
    cfg["eval"]["judge"].update(judge)
    with pytest.raises(common.InputError, match=message):
        ev6.check_eval_config(cfg)


def test_the_figures_chance_line_counts_every_annotator_when_only_some_are_targets(tmp_path, monkeypatch):
    """With `targets: [A0, A3]` of four annotators, a classifier over all four gives chance 0.25, not 0.5."""
    import matplotlib.axes
    lines = []
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y=0, **kw: lines.append(y))
    datasets = {"varierr": {"task": {"label_type": "categorical"}, "annotators": ["A0", "A3"],
                            "everyone": ["A0", "A1", "A2", "A3"]}}
    results = {"varierr": {"tiny": {"sft": {"status": "ok"}}}}
    index = {("varierr", "tiny", "sft", "macro", "group_clf_conf", 50, None): {"value": 0.6, "ci_low": 0.5,
                                                                              "ci_high": 0.7}}
    assert eval_report.plot_metric(results, index, datasets, ev6.METRIC["group_clf_conf"], 50, tmp_path / "f.png")
    assert lines == [0.25]
