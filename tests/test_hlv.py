"""02_analyze_hlv and the annotator classifier in common.py, on synthetic fixtures.

Most tests pass vectors straight to the pure functions (no embedder); one end-to-end test
runs main() on a tiny invented run dir with the real (offline) sentence embedder.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import common
from conftest import load_stage, mark_prepared, write_config

hlv = load_stage("02_analyze_hlv")

HLV_CFG = {"classifier": "logistic_regression", "C": 1.0, "standardize": True, "folds": 4,
           "group_sizes": [1, 5, 20], "bootstrap_groups": 50, "control_permutations": 3}
ANNOTATORS = ["A0", "A1", "A2", "A3"]


def synthetic_responses(n_items: int, style_strength: float, seed: int = 0, dim: int = 12):
    """Every annotator answers every item: item content (strong) + annotator style + noise."""
    rng = np.random.default_rng(seed)
    content = rng.normal(0, 2.0, (n_items, dim))
    style = rng.normal(0, 1.0, (len(ANNOTATORS), dim)) * style_strength
    vectors, labels, items = [], [], []
    for i in range(n_items):
        for a, annotator in enumerate(ANNOTATORS):
            vectors.append(content[i] + style[a] + rng.normal(0, 1.0, dim))
            labels.append(annotator)
            items.append(f"item{i}")
    return np.array(vectors), labels, items


def residual(vectors, items):
    return common.remove_item_content(vectors, items, common.item_means(vectors, items))


def accuracies(result):
    return {m: row["accuracy"] for m, row in result.items()}


# ---- identification -------------------------------------------------------------
def test_planted_style_rises_with_group_size_to_near_perfect():
    X, labels, items = synthetic_responses(160, style_strength=0.35)
    folds = hlv.item_grouped_folds(items, HLV_CFG["folds"], seed=1)
    acc = accuracies(hlv.identification_accuracy(residual(X, items), labels, items, ANNOTATORS, folds, HLV_CFG, 1))
    assert 0.3 < acc[1] < 0.8, acc          # weak for one response
    assert acc[1] < acc[5] < acc[20], acc   # aggregation helps
    assert acc[20] >= 0.95, acc


def test_content_removal_helps_when_content_dominates():
    X, labels, items = synthetic_responses(160, style_strength=0.35)
    folds = hlv.item_grouped_folds(items, HLV_CFG["folds"], seed=1)
    raw = accuracies(hlv.identification_accuracy(X, labels, items, ANNOTATORS, folds, HLV_CFG, 1))
    removed = accuracies(hlv.identification_accuracy(residual(X, items), labels, items, ANNOTATORS, folds, HLV_CFG, 1))
    assert removed[1] > raw[1] + 0.05, (raw, removed)


def test_no_signal_stays_near_chance():
    X, labels, items = synthetic_responses(200, style_strength=0.0, seed=3)
    folds = hlv.item_grouped_folds(items, HLV_CFG["folds"], seed=3)
    cfg = dict(HLV_CFG, group_sizes=[1, 5])
    acc = accuracies(hlv.identification_accuracy(residual(X, items), labels, items, ANNOTATORS, folds, cfg, 3))
    for m, value in acc.items():
        assert abs(value - 0.25) < 0.08, (m, acc)


def test_control_falls_to_chance_where_the_signal_is_strong():
    X, labels, items = synthetic_responses(160, style_strength=0.35)
    X = residual(X, items)
    folds = hlv.item_grouped_folds(items, HLV_CFG["folds"], seed=1)
    real = accuracies(hlv.identification_accuracy(X, labels, items, ANNOTATORS, folds, HLV_CFG, 1))
    control = hlv.control_accuracy(X, labels, items, ANNOTATORS, folds, HLV_CFG, 1)
    assert real[20] >= 0.95
    for m, row in control.items():
        assert abs(row["accuracy"] - 0.25) < 0.1, (m, row)
        assert len(row["per_permutation"]) == HLV_CFG["control_permutations"]


def test_permutation_stays_within_items():
    labels = ["A0", "A1", "A2", "A0", "A1"]
    items = ["x", "x", "x", "y", "y"]
    permuted = hlv.permute_within_items(labels, items, [0, 1])
    assert sorted(permuted[:3]) == ["A0", "A1", "A2"] and sorted(permuted[3:]) == ["A0", "A1"]
    assert hlv.permute_within_items(labels, items, [0, 1]) == permuted   # seeded


def test_grouped_split_never_shares_an_item():
    rng = np.random.default_rng(0)
    items = [f"i{k}" for k in rng.integers(0, 37, size=300)]   # uneven responses per item
    folds = hlv.item_grouped_folds(items, 5, seed=7)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(len(items)))   # each row tested exactly once
    for train, test in folds:
        assert not {items[r] for r in train} & {items[r] for r in test}
    assert [t.tolist() for _, t in folds] == [t.tolist() for _, t in hlv.item_grouped_folds(items, 5, seed=7)]


def test_groups_use_distinct_items_every_row_and_cap_m():
    """common.group_scores, the one sampler of 02, 05 and 06 (class scores as logits, two classes)."""
    observed = np.array([[0, 1, 2]])
    # item 0 answered twice, both rows strongly class 1; items 1 and 2 class 0. A group of all three
    # items holds ONE of item 0's rows, so its mean is class 0; rows drawn without regard to items
    # would sometimes take both of item 0's rows and land on class 1.
    logits = np.array([[0.0, 100.0], [0.0, 100.0], [100.0, 0.0], [100.0, 0.0]])
    item = np.array([0, 0, 1, 2])
    assert common.group_scores(logits, item, observed, 1, [3], 500, 0)[3]["accuracy"][0] == 0.0
    # both rows of a twice-answered item get used: one says class 0, the other class 1
    both = common.group_scores(np.array([[10.0, 0.0], [0.0, 10.0]]), np.array([0, 0]), np.array([[0]]), 0, [1], 2000, 0)
    assert 0.4 < both[1]["accuracy"][0] < 0.6
    # m is capped at the resample's items that have rows (item 3 has none); no rows at all: nan
    capped = common.group_scores(logits, item, np.array([[0, 1, 2, 3], [3, 3, 3, 3]]), 0, [3, 10], 50, 1)
    assert capped[10]["conf"][0] == capped[3]["conf"][0] and np.isnan(capped[10]["conf"][1])
    # the groups of one m do not depend on which other m are asked for
    alone = common.group_scores(logits, item, observed, 0, [1], 50, 2)[1]["conf"]
    assert np.array_equal(alone, common.group_scores(logits, item, observed, 0, [1, 2, 3], 50, 2)[1]["conf"])


# ---- common.py API used by 05 and 06 ------------------------------------------------
def test_representation_texts():
    records = [{"label": "neutral", "explanation": "Not said."}, {"label": -3, "explanation": "Different."}]
    assert common.representation_texts(records, "E1") == ["Not said.", "Different."]
    assert common.representation_texts(records, "E2") == ["label: neutral. explanation: Not said.",
                                                          "label: -3. explanation: Different."]
    assert common.representation_texts(records, "E4") == common.representation_texts(records, "E2")
    with pytest.raises(common.InputError):
        common.representation_texts(records, "E9")


def test_remove_item_content_with_human_means():
    human = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    means = common.item_means(human, ["x", "x", "y"])
    np.testing.assert_allclose(means["x"], [2.0, 1.0])
    outputs = np.array([[2.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(common.remove_item_content(outputs, ["x", "y"], means), [[0.0, 1.0], [-5.0, -5.0]])
    with pytest.raises(common.InputError, match="zzz"):
        common.remove_item_content(outputs, ["x", "zzz"], means)


def test_group_target_confidence_finds_the_planted_annotator():
    X, labels, items = synthetic_responses(120, style_strength=0.35, seed=5)
    X = residual(X, items)
    clf = common.fit_annotator_classifier(HLV_CFG, X, labels, seed=0)
    assert list(clf.classes_) == ANNOTATORS
    rows = [i for i, label in enumerate(labels) if label == "A2"]     # one response per item
    big = common.group_target_confidence(clf, X[rows], "A2", 50, 100, seed=0)
    small = common.group_target_confidence(clf, X[rows], "A2", 1, 100, seed=0)
    assert big["group_size"] == 50 and big["n_groups"] == 100
    assert big["accuracy"] >= 0.95 and big["mean_prob"] > small["mean_prob"]
    other = common.group_target_confidence(clf, X[rows], "A0", 50, 100, seed=0)
    assert other["mean_prob"] < 0.2
    capped = common.group_target_confidence(clf, X[rows][:7], "A2", 50, 10, seed=0)
    assert capped["group_size"] == 7
    assert common.group_target_confidence(clf, X[rows], "A2", 5, 30, seed=4) == \
        common.group_target_confidence(clf, X[rows], "A2", 5, 30, seed=4)
    with pytest.raises(common.InputError):
        common.group_target_confidence(clf, X[rows], "nobody", 5, 10, seed=0)


# ---- agreement ------------------------------------------------------------------
def record(item, annotator, label):
    return {"item_id": item, "annotator": annotator, "label": label, "explanation": "x"}


def test_nli_kappa_matches_hand_computed_case():
    a = ["entailment", "entailment", "neutral", "contradiction", "contradiction", "neutral"]
    b = ["entailment", "neutral", "neutral", "contradiction", "entailment", "neutral"]
    records = [record(f"i{k}", "A", la) for k, la in enumerate(a)] + [record(f"i{k}", "B", lb) for k, lb in enumerate(b)]
    records += [record("i9", "A", "neutral"), record("i9", "A", "entailment"), record("i9", "B", "neutral"),  # A gave two labels
                record("i10", "A", "neutral")]                                                              # B did not annotate
    task = {"label_type": "categorical", "labels": ["entailment", "neutral", "contradiction"]}
    kappa = hlv.pairwise_kappa(records, ["A", "B"], task, "sign3")
    # p_o = 4/6; p_e = (2*2 + 2*3 + 2*1) / 36 = 1/3; kappa = (2/3 - 1/3) / (2/3) = 0.5
    assert kappa["pairs"]["A|B"] == pytest.approx(0.5)
    assert kappa["n_items"]["A|B"] == 6
    assert kappa["min"] == kappa["max"] == pytest.approx(0.5)


def test_paraphrase_kappa_sign_binning_and_quadratic():
    a, b = [-2, 0, 3, 4], [-1, 0, 2, -3]
    records = [record(f"i{k}", "A", s) for k, s in enumerate(a)] + [record(f"i{k}", "B", s) for k, s in enumerate(b)]
    task = {"label_type": "numeric", "score_range": [-5, 5]}
    kappa = hlv.pairwise_kappa(records, ["A", "B"], task, "sign3")
    # signs A (-1,0,1,1), B (-1,0,1,-1): p_o = 3/4, p_e = (1*2 + 1*1 + 2*1) / 16 = 5/16 -> 7/11
    assert kappa["pairs"]["A|B"] == pytest.approx(7 / 11)
    # quadratic weights w = (i-j)^2 / 10^2: observed 1+0+1+49 = 51 -> 0.51/4; expected from the marginals
    diffs = np.subtract.outer(np.array(a), np.array(b)) ** 2 / 100.0
    expected = 1 - (np.sum([(x - y) ** 2 / 100.0 for x, y in zip(a, b)]) / 4) / diffs.mean()
    assert kappa["quadratic"]["pairs"]["A|B"] == pytest.approx(expected)
    assert "3-way sign" in kappa["binning"]


def test_undefined_kappa_is_missing_with_a_reason():
    records = [record("i1", "A", "neutral"), record("i1", "B", "neutral"),
               record("i2", "A", "neutral"), record("i2", "B", "neutral"), record("i3", "C", "neutral")]
    task = {"label_type": "categorical", "labels": ["entailment", "neutral", "contradiction"]}
    kappa = hlv.pairwise_kappa(records, ["A", "B", "C"], task, "sign3")
    assert kappa["pairs"] == {"A|B": None, "A|C": None, "B|C": None}
    assert set(kappa["missing"]) == {"A|B", "A|C", "B|C"} and kappa["min"] is None


# ---- end to end ------------------------------------------------------------------
STYLE = {"R1": "Clearly, {}.", "R2": "I guess maybe {}, not sure honestly.", "R3": "{}"}
FACTS = ["the cat sleeps on the mat", "a man is cooking pasta", "two kids play football", "the train is late",
         "she paints a red door", "the market opens at nine", "rain fell all night", "he fixed the old bike",
         "the museum is closed today", "birds sing in the garden", "the soup is too salty", "they moved to Lisbon"]


def write_tiny_run(cfg_path):
    """24 invented items, 3 annotators with planted style phrases, split 16/4/4."""
    cfg = common.load_config(cfg_path)
    data = common.data_dir(cfg, "tiny")
    labels = ["entailment", "neutral", "contradiction"]
    splits = {"train": [], "dev": [], "test": []}
    for i in range(24):
        split = "train" if i < 16 else ("dev" if i < 20 else "test")
        fact = FACTS[i % len(FACTS)] + ("" if i < 12 else " again")
        for a, annotator in enumerate(STYLE):
            splits[split].append({"dataset": "tiny", "item_id": f"t{i}", "split": split, "annotator": annotator,
                                  "text_a": fact, "text_b": f"claim {i}", "label": labels[(i + a * (i % 2)) % 3],
                                  "explanation": STYLE[annotator].format(fact), "valid": True})
    for split, rows in splits.items():
        common.write_jsonl(data / f"{split}.jsonl", rows)
    task = {"label_type": "categorical", "labels": labels, "text_a_name": "A", "text_b_name": "B",
            "instruction": "Decide."}
    common.write_json(data / "stats.json", {"dataset": "tiny", "task": task, "annotators": list(STYLE)})
    mark_prepared(cfg, "tiny")
    return cfg


def test_main_end_to_end_on_a_tiny_custom_dataset(tmp_path):
    cfg_path = write_config(tmp_path, "smoke", datasets=["tiny"], hlv__folds=3, hlv__group_sizes=[1, 4],
                            hlv__bootstrap_groups=20, hlv__control_permutations=2)
    cfg = write_tiny_run(cfg_path)
    hlv.main(["--config", str(cfg_path), "--dataset", "tiny"])
    out = common.run_dir(cfg) / "hlv" / "tiny"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("dataset", "annotators", "chance", "kappa", "identification", "representations", "embedder",
                "classifier", "control"):
        assert key in summary
    assert summary["annotators"] == ["R1", "R2", "R3"] and summary["chance"] == pytest.approx(1 / 3, abs=1e-4)
    assert set(summary["kappa"]["pairs"]) == {"R1|R2", "R1|R3", "R2|R3"}
    assert set(summary["identification"]) == {"E1", "E2", "E3", "E4"}
    assert set(summary["identification"]["E3"]) == {"1", "4"}
    assert set(summary["control"]["identification"]["E3"]) == {"1", "4"}
    assert summary["identification"]["E3"]["4"] > 0.9     # planted style phrases are easy to spot
    for name in ("agreement.png", "identification.png", "agreement.md", "identification.md", "config.resolved.yaml"):
        assert (out / name).stat().st_size > 0
    assert "the paper's" in (out / "identification.md").read_text()
    assert yaml.safe_load((out / "config.resolved.yaml").read_text())["stage"] == "02_analyze_hlv"
    hlv.main(["--config", str(cfg_path), "--dataset", "tiny"])   # same seed, same numbers (cached embeddings)
    again = json.loads((out / "summary.json").read_text())
    assert again["identification"] == summary["identification"] and again["control"] == summary["control"]


def test_bad_group_sizes_stop_with_one_message(tmp_path):
    cfg_path = write_config(tmp_path, "smoke", hlv__group_sizes=[0, 5])
    with pytest.raises(common.InputError, match="hlv.group_sizes"):
        hlv.main(["--config", str(cfg_path), "--dataset", "varierr"])
