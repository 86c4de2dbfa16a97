"""06_eval.py's intervals and claims: coverage on synthetic draws, the verdict rules, the
judge calibration gate, and an A/A run end to end (the same predictions under two names).

Synthetic data only; the end-to-end case reuses test_eval's invented fixture run.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import common
from conftest import load_stage, mark_predictions
from test_eval import NLI_TASK, PAR_TASK, feature_histograms, make_fixture_run

ev6 = load_stage("06_eval")


def synthetic_dataset(n_items: dict[str, int]) -> dict:
    """The fields resample_plan reads: a name and each target's test items."""
    return {"name": "synthetic", "target_items": {a: [f"{a}-{i}" for i in range(n)] for a, n in n_items.items()}}


def macro_interval(plan: dict, values: dict[str, np.ndarray]) -> list[float]:
    """The macro-average interval of per-item values, one row per item, as 06 computes it."""
    per_target = {a: {"m": float(v.mean())} for a, v in values.items()}
    draws = {a: {"m": ev6.weighted_means(np.arange(len(v)), v, plan[a]["weights"])} for a, v in values.items()}
    _, macro_draws = ev6.macro(per_target, draws, "m")
    return ev6.interval(macro_draws)


def test_interval_covers_the_true_mean_about_95_percent():
    """Over repeated synthetic test sets the 95% interval contains the true macro mean ~95% of the time."""
    rng = np.random.default_rng(0)
    means = {"A": 0.2, "B": 0.5, "C": 0.8}
    true_macro = float(np.mean(list(means.values())))
    cfg = {"seed": 0, "eval": {"bootstrap_resamples": 400}}
    reps, covered = 300, 0
    for rep in range(reps):
        cfg["seed"] = rep  # fresh resamples for every synthetic test set
        plan = ev6.resample_plan(cfg, synthetic_dataset({a: 40 for a in means}))
        values = {a: rng.normal(mu, 1.0, size=40) for a, mu in means.items()}
        low, high = macro_interval(plan, values)
        covered += low <= true_macro <= high
    assert 0.90 <= covered / reps <= 0.985, covered / reps


def test_resamples_are_shared_by_methods_and_seeded():
    cfg = {"seed": 3, "eval": {"bootstrap_resamples": 50}}
    ds = synthetic_dataset({"A": 10, "B": 7})
    first, second = ev6.resample_plan(cfg, ds), ev6.resample_plan(cfg, ds)
    for annotator in ("A", "B"):
        assert np.array_equal(first[annotator]["slots"], second[annotator]["slots"])
        assert first[annotator]["weights"].shape == (50, len(ds["target_items"][annotator]))
        assert (first[annotator]["weights"].sum(axis=1) == len(ds["target_items"][annotator])).all()


def test_weighted_kl_with_unit_weights_is_the_plain_kl():
    human_item, model_item = np.array([0, 0, 1, 2]), np.array([0, 1, 2])
    human_bins, model_bins = (np.array([0, 1, 1, 2]), 3), (np.array([2, 2, 0]), 3)
    unit = ev6.weighted_kl(human_bins, human_item, model_bins, model_item, np.ones(3), 1e-6)
    plain = ev6.kl_divergence(np.bincount(human_bins[0], minlength=3).astype(float),
                              np.bincount(model_bins[0], minlength=3).astype(float), 1e-6)
    assert unit == pytest.approx(plain)
    # feature_bins (the bootstrap's per-row bins) rebuild feature_histograms (the definition)
    rows = [{"explanation": text, "text_a": "The cat sat.", "text_b": "A cat.", "label": label}
            for text, label in (("the cat might sit", "neutral"), ("no", None), ("it can't be a dog at all", "entailment"),
                                ("cat cat cat", "contradiction"))]
    train = {name: [] for name in ev6.STYLE_FEATURES}
    for row in rows + [dict(rows[0], explanation="a longer sentence about nothing much here")]:
        for name, value in ev6.style_features(row["explanation"], row["text_a"], row["text_b"]).items():
            train[name].append(value)
    edges = ev6.feature_bin_edges(train, 3)
    edges["label"] = ev6.label_categories(NLI_TASK)
    histograms = feature_histograms(rows, edges)
    for name, (bins, n_bins) in ev6.feature_bins(rows, edges).items():
        assert np.bincount(bins, minlength=n_bins) == pytest.approx(histograms[name])


def test_group_scores_of_averaged_rows_are_averaged_row_scores():
    """row_logits relies on the classifier being affine before its softmax."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 8))
    y = [f"A{i % 3}" for i in range(60)]
    X[np.arange(60) % 3 == 0] += 1.5
    clf = common.fit_annotator_classifier({"classifier": "logistic_regression", "C": 1.0, "standardize": True}, X, y, 0)
    group = X[:10]
    logits = common.row_logits(clf, group).mean(axis=0)
    proba = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert proba == pytest.approx(clf.predict_proba(group.mean(axis=0, keepdims=True))[0], abs=1e-9)
    # every row in every group (m = all rows): each resample's confidence is that of its mean row
    slots = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    draws = common.group_scores(common.row_logits(clf, group), np.arange(10), slots, 0, [10], 5, 0)[10]["conf"]
    assert draws[0] == pytest.approx(proba[0], abs=1e-9)


@pytest.mark.parametrize("ci, higher, margin, expected", [
    ([0.01, 0.2], True, 0.0, "holds"), ([-0.2, -0.01], True, 0.0, "contradicted"),
    ([-0.1, 0.1], True, 0.0, "not resolved"), ([-0.2, -0.01], False, 0.0, "holds"),
    ([-0.015, 0.03], True, 0.02, "holds"), ([-0.05, 0.01], True, 0.02, "not resolved"),
    ([-0.09, -0.03], True, 0.02, "contradicted"), ([-0.1, 0.15], False, 0.2, "holds"),
    ([0.25, 0.4], False, 0.2, "contradicted"), (None, True, 0.0, "not resolved"),
])
def test_verdict_rules(ci, higher, margin, expected):
    assert ev6.verdict(ci, higher, margin) == expected


def planted_results(capo_shift: float, judge_human_ci: list[float]) -> tuple[dict, dict, dict]:
    """results/draws for one dataset and model where CAPO beats SFT by `capo_shift` everywhere."""
    rng = np.random.default_rng(0)
    methods, draws = {}, {}
    for method, shift in (("sft", 0.0), ("capo", capo_shift), ("base", -0.3), ("human", 0.0)):
        methods[method] = {"status": "ok"}
        draws[method] = {"macro": {}}
        for metric in ("group_clf_conf", "norm_imitation", "feature_kl", "judge_attribution", "label_acc"):
            sign = -1 if metric == "feature_kl" else 1
            base = rng.normal(0.5, 0.02, size=500)
            draws[method]["macro"][metric] = base + sign * shift
            methods[method][metric] = 0.5 + sign * shift
    methods["human"]["judge"] = {"accuracy": 0.3, "accuracy_ci": judge_human_ci, "chance": 0.25, "n": 40}
    results = {"varierr": {"tiny": methods}}
    return results, {"varierr": {"tiny": draws}}, {"varierr": {"task": NLI_TASK}}


def test_planted_difference_holds_and_an_uninformative_judge_resolves_nothing():
    results, draws, datasets = planted_results(0.3, judge_human_ci=[0.2, 0.4])  # includes chance 0.25
    calibration = {"varierr": ev6.judge_calibration(results["varierr"])}
    assert calibration["varierr"]["informative"] is False
    claims = {(c["a"], c["metric"]): c for c in ev6.claims_check(results, draws, datasets, calibration)}
    for metric in ("group_clf_conf", "norm_imitation", "feature_kl"):
        assert claims[("capo", metric)]["verdict"] == "holds"
        assert claims[("capo", metric)]["ci"][0] > 0 or metric == "feature_kl"
    assert claims[("capo", "judge_attribution")]["verdict"] == "not resolved"
    assert "uninformative" in claims[("capo", "judge_attribution")]["reason"]
    assert claims[("capo", "label_acc")]["verdict"] == "holds"  # non-inferiority: CAPO is better
    assert claims[("sft", "label_acc")]["b"] == "base" and claims[("sft", "label_acc")]["verdict"] == "holds"
    # the same plan with an informative judge, and CAPO worse than SFT: contradicted
    results, draws, datasets = planted_results(-0.3, judge_human_ci=[0.5, 0.7])
    calibration = {"varierr": ev6.judge_calibration(results["varierr"])}
    claims = {(c["a"], c["metric"]): c for c in ev6.claims_check(results, draws, datasets, calibration)}
    assert calibration["varierr"]["informative"] is True
    assert claims[("capo", "judge_attribution")]["verdict"] == "contradicted"
    assert claims[("capo", "label_acc")]["verdict"] == "contradicted"  # worse by far more than the margin


def test_aa_same_predictions_under_two_names_is_not_resolved(tmp_path):
    """CAPO's predictions are SFT's, copied: every CAPO-vs-SFT interval contains 0."""
    config, run_dir = make_fixture_run(tmp_path, eval__judge__backend="none", eval__bertscore=False)
    for name in ("varierr", "par"):
        shutil.copytree(run_dir / "predictions" / name / "tiny" / "sft", run_dir / "predictions" / name / "tiny" / "capo")
    mark_predictions(config)
    ev6.main(["--config", str(config)])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pairs = [c for c in metrics["claims"] if c["a"] == "capo" and c["b"] == "sft"]
    assert {c["dataset"] for c in pairs} == {"varierr", "par"}
    for claim in pairs:
        if claim["metric"] == "judge_attribution":  # judge off: no value
            assert claim["verdict"] == "not resolved" and "no value" in claim["reason"]
            continue
        assert claim["difference"] == pytest.approx(0.0, abs=1e-12)
        low, high = claim["ci"]
        assert low <= 0 <= high
        # superiority claims are not resolved; non-inferiority of identical predictions holds
        assert claim["verdict"] == ("holds" if "non-inferiority" in claim["claim"] else "not resolved")
    # every metric of the model rows has an interval, and the interval brackets the value
    sft = metrics["results"]["varierr"]["tiny"]["sft"]
    for metric in ("coverage", "parse_rate", "label_acc", "rouge_l", "emb_cos", "feature_kl", "group_clf_conf",
                   "norm_imitation"):
        low, high = sft[f"{metric}_ci"]
        assert low <= high
    assert set(sft["feature_kl_by_feature_ci"]) == set(ev6.FEATURES)
    assert sft["per_annotator"]["A0"]["label_acc_ci"] is not None
    report = (run_dir / "report.md").read_text()
    assert "| varierr | tiny | CAPO better than SFT on norm_imitation | norm_imitation | capo | sft |" in report
    assert "[" in (run_dir / "tables" / "table4_main.csv").read_text()


def test_training_curves_figure_from_logs(tmp_path):
    config, run_dir = make_fixture_run(tmp_path, eval__judge__backend="none", eval__bertscore=False)
    cfg = common.load_config(config)
    for method in ("sft", "capo"):
        folder = run_dir / "adapters" / "varierr" / "tiny" / method / "A0"
        common.write_json(folder / "train_log.json", {"log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
                                                                      {"train_loss": 1.7, "step": 2}]})
    common.write_json(run_dir / "adapters" / "varierr" / "tiny" / "capo" / "A0" / "selection.json",
                      {"measure": "dev_group_confidence", "history": [{"step": 0, "score": 0.3}, {"step": 2, "score": 0.4}]})
    import eval_report
    datasets = {"varierr": {"task": NLI_TASK}, "par": {"task": PAR_TASK}}
    panels = ev6.training_curves(cfg, list(datasets))
    assert [title for title, _, _ in panels] == ["varierr/tiny: sft training loss", "varierr/tiny: capo training loss",
                                                 "varierr/tiny: CAPO dev selection"]
    assert panels[0][1] == {"A0": ((1, 2), (2.0, 1.5))}  # train_loss (the run's mean) is not a step
    assert panels[2][2] == "dev_group_confidence"
    assert eval_report.plot_training_curves(panels, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000
    shutil.rmtree(run_dir / "adapters")
    assert ev6.training_curves(cfg, list(datasets)) == []
    assert not eval_report.plot_training_curves([], tmp_path / "none.png")


def test_pooled_prediction_sets_share_their_items():
    """Two runs (seeds) of one method pool into one row set: an item's rows stay together, so
    the same predictions twice give the same means and the same resampled values."""
    task = NLI_TASK
    reference = {"item_id": "i1", "annotator": "A0", "label": "neutral", "explanation": "maybe so"}
    ds = {"references": {("i1", "A0"): [reference], ("i2", "A0"): [dict(reference, item_id="i2")]},
          "items": {i: {"text_a": "A cat.", "text_b": "A dog."} for i in ("i1", "i2")}}
    run = {"A0": [{"item_id": "i1", "annotator": "A0", "label": "neutral", "explanation": "maybe", "parse_ok": True,
                   "output": "Label: neutral"},
                  {"item_id": "i2", "annotator": "A0", "label": None, "explanation": None, "parse_ok": False,
                   "output": "??"}]}
    single, _ = ev6.output_rows(ds, [run])
    pooled, _ = ev6.output_rows(ds, [run, run])
    assert len(pooled) == 2 * len(single)
    weights = np.array([[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
    one = ev6.score_arrays(single, ["i1", "i2"], task, {"label": ev6.label_categories(task),
                                                        **{f: np.array([0.5]) for f in ev6.STYLE_FEATURES}})
    two = ev6.score_arrays(pooled, ["i1", "i2"], task, {"label": ev6.label_categories(task),
                                                        **{f: np.array([0.5]) for f in ev6.STYLE_FEATURES}})
    for metric in ("parse_rate", "label_acc"):
        assert ev6.weighted_means(two["item"], two["values"][metric], weights) == pytest.approx(
            ev6.weighted_means(one["item"], one["values"][metric], weights))
    assert list(ev6.weighted_means(one["item"], one["values"]["label_acc"], weights)) == [0.5, 1.0, 0.0]


def test_two_seeds_pool_and_report_their_spread(tmp_path):
    """seeds: [1, 2]: 06 reads seeds/<seed>/predictions, reports the value on both seeds' rows
    pooled (for a mean: the mean over seeds) with its interval, m_sd and m_by_seed."""
    config, run_dir = make_fixture_run(tmp_path, eval__judge__backend="none", eval__bertscore=False)
    ev6.main(["--config", str(config)])
    single = json.loads((run_dir / "metrics.json").read_text())["results"]["varierr"]["tiny"]["sft"]
    for seed in (1, 2):
        shutil.copytree(run_dir / "predictions", run_dir / "seeds" / str(seed) / "predictions")
    for path in (run_dir / "seeds" / "2" / "predictions" / "varierr" / "tiny" / "sft").glob("*.jsonl"):
        rows = common.read_jsonl(path)  # seed 2's SFT never parses
        common.write_jsonl(path, [{**r, "parse_ok": False, "label": None, "explanation": None} for r in rows])
    cfg = common.load_config(config, ["--seeds", "[1, 2]"])
    for seed in (1, 2):
        mark_predictions(common.with_seed(cfg, seed))
    ev6.main(["--config", str(config), "--seeds", "[1, 2]"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sft, base = metrics["results"]["varierr"]["tiny"]["sft"], metrics["results"]["varierr"]["tiny"]["base"]
    assert sft["seeds"] == [1, 2]
    assert sft["parse_rate_by_seed"] == {"1": pytest.approx(single["parse_rate"]), "2": 0.0}
    assert sft["parse_rate"] == pytest.approx(single["parse_rate"] / 2)
    assert sft["parse_rate_sd"] == pytest.approx(single["parse_rate"] / np.sqrt(2))
    low, high = sft["parse_rate_ci"]
    assert low <= sft["parse_rate"] <= high  # pooled rows: half of them parse
    # base is the same in both seeds: no spread, and the single-seed value
    assert base["label_acc_sd"] == 0.0
    assert base["label_acc"] == pytest.approx(metrics["results"]["varierr"]["tiny"]["base"]["label_acc_by_seed"]["1"])
    # pooled value and pooled interval are one computation: the value lies inside (feature KL excepted)
    pooled = [row for row in metrics["rows"] if row["seed"] is None and row["ci_low"] is not None
              and not ev6.METRIC[row["metric"]].interval_may_miss]
    assert pooled and all(row["ci_low"] - 1e-12 <= row["value"] <= row["ci_high"] + 1e-12 for row in pooled)
    assert any(row["seed"] == 2 and row["metric"] == "parse_rate" and row["value"] == 0.0 for row in metrics["rows"])


def test_a_group_claim_between_two_saturated_methods_is_not_resolved():
    """Per-target confidences all at 0 or 1 (few outputs, m near n): the difference only counts
    annotators, so the claim is not resolved; one method that grades keeps it resolved."""
    results, draws, datasets = planted_results(0.3, judge_human_ci=[0.5, 0.7])
    calibration = {"varierr": ev6.judge_calibration(results["varierr"])}
    methods = results["varierr"]["tiny"]
    methods["sft"]["per_annotator"] = {t: {"status": "ok", "group_clf_conf": v}
                                       for t, v in zip("ABCD", (1.0, 1.0, 0.0, 0.999))}
    methods["capo"]["per_annotator"] = {t: {"status": "ok", "group_clf_conf": v}
                                        for t, v in zip("ABCD", (1.0, 0.998, 1.0, 1.0))}
    claims = {(c["a"], c["metric"]): c for c in ev6.claims_check(results, draws, datasets, calibration)}
    for metric in ("group_clf_conf", "norm_imitation"):
        assert claims[("capo", metric)]["verdict"] == "not resolved"
        assert claims[("capo", metric)]["reason"].startswith("saturated")
    assert claims[("capo", "feature_kl")]["verdict"] == "holds"  # not a group metric
    methods["capo"]["per_annotator"]["B"]["group_clf_conf"] = 0.9  # grades on one target
    claims = {(c["a"], c["metric"]): c for c in ev6.claims_check(results, draws, datasets, calibration)}
    assert claims[("capo", "group_clf_conf")]["verdict"] == "holds"
