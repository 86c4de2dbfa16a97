"""The LeWiDi-2025 view: 01 --split lewidi on small invented files in the shared task's format,
the official metric functions on hand-computed cases, 06's LeWiDi section and its submission
files on hand-written predictions, and (only when CAPO_RAW_DIR holds the real files) the
most-frequent baseline on the gold Paraphrase test file against the published .362.

    pytest tests/test_lewidi.py
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

import common
import eval_report
from conftest import load_stage, mark_predictions, write_config

prepare = load_stage("01_prepare")
ev6 = load_stage("06_eval")
RAW_DIR = os.environ.get("CAPO_RAW_DIR")


# ----------------------------------------------------------------------------
# Invented files in the LeWiDi-2025 format
# ----------------------------------------------------------------------------
def nli_item(split: str, context: str, statement: str, annotations: dict, explanations: list[str]) -> dict:
    annotators = [a for a, labels in annotations.items() for _ in labels.split(",")]
    return {"annotation task": "natural language inference", "text": {"context": context, "statement": statement},
            "number of annotators": len(annotations), "annotators": ",".join(annotators),
            "number of annotations": len(annotators), "annotations": annotations, "split": split, "lang": "en",
            "other_info": {"explanations": explanations}}


def par_item(split: str, q1: str, q2: str, scores: dict) -> dict:
    return {"annotation task": "paraphrase detection", "text": {"Question1": q1, "Question2": q2},
            "number of annotators": len(scores), "annotators": ",".join(scores), "number of annotations": len(scores),
            "annotations": {a: str(s) for a, s in scores.items()}, "split": split, "lang": "en",
            "other_info": {"explanations": [f"{a} thinks {s} about {q1[:12]}" for a, s in scores.items()]}}


LABELS = ["entailment", "neutral", "contradiction"]


def write_lewidi_files(raw: Path) -> None:
    """VariErrNLI: item "7" is in train and in test with another hypothesis (the published IDs
    name the premise); Ann2 gives test item "7" two labels. Paraphrase: 4 annotators, -5..5."""
    raw.mkdir(parents=True, exist_ok=True)
    sizes = {"train": 6, "dev": 2, "test": 3}
    for split, n in sizes.items():
        nli, par = {}, {}
        for k in range(n):
            item_id = "7" if k == 0 and split in ("train", "test") else f"{split}{k}"
            if split == "test" and k == 0:
                annotations = {"Ann1": "contradiction", "Ann2": "contradiction,neutral", "Ann3": "neutral"}
                explanations = ["one says no", "two says no", "two says maybe", "three says maybe"]
            else:
                annotations = {a: LABELS[(k + i) % 3] for i, a in enumerate(["Ann1", "Ann2", "Ann3"])}
                explanations = [f"{a} on {split} {k}" for a in annotations]
            nli[item_id] = nli_item(split, f"The premise {item_id}.", f"A hypothesis of {split} {k}.",
                                    annotations, explanations)
            scores = {"Ann1": 5, "Ann2": -4, "Ann3": (k % 11) - 5, "Ann4": 5 - k}
            par[f"{split}{k}"] = par_item(split, f"Is {split} {k} good?", f"Is {split} {k} fine?", scores)
        (raw / f"VariErrNLI_{split}.json").write_text(json.dumps(nli, indent=1))
        (raw / f"Paraphrase_{split}.json").write_text(json.dumps(par, indent=1))


@pytest.fixture
def lewidi_run(tmp_path):
    raw = tmp_path / "raw"
    write_lewidi_files(raw)
    config = write_config(tmp_path, "smoke", data__min_train_records_per_annotator=1, data__max_items=None,
                          eval__bootstrap_resamples=200)
    prepare.main(["--config", str(config), "--raw-dir", str(raw), "--split", "lewidi", "--accept-modified-raw"])
    cfg = common.load_config(config, ["--data.split", "lewidi"])
    return config, cfg


# ----------------------------------------------------------------------------
# 01 --split lewidi
# ----------------------------------------------------------------------------
def test_prepare_lewidi_records(lewidi_run):
    config, cfg = lewidi_run
    run = common.run_dir(cfg)
    assert run == Path(common.load_config(config)["run_dir"]) / "lewidi"
    test = common.read_jsonl(run / "data" / "varierr" / "test.jsonl")
    train = common.read_jsonl(run / "data" / "varierr" / "train.jsonl")
    # the repeated published ID becomes two items, one per split, with their own hypotheses
    assert {r["text_b"] for r in train if r["item_id"] == "train-7"} == {"A hypothesis of train 0."}
    assert {r["text_b"] for r in test if r["item_id"] == "test-7"} == {"A hypothesis of test 0."}
    # the multi-label annotator: one record per label, explanations in `annotators` order
    item = [(r["annotator"], r["label"], r["explanation"]) for r in test if r["item_id"] == "test-7"]
    assert item == [("Ann1", "contradiction", "one says no"), ("Ann2", "contradiction", "two says no"),
                    ("Ann2", "neutral", "two says maybe"), ("Ann3", "neutral", "three says maybe")]
    assert all(r["valid"] is None for r in test)
    stats = common.read_json(run / "data" / "varierr" / "stats.json")
    assert stats["split"] == "lewidi" and stats["items"] == {"train": 6, "dev": 2, "test": 3, "total": 11}
    assert stats["lewidi_items"]["test-7"] == {"id": "7", "split": "test", "annotators": ["Ann1", "Ann2", "Ann3"]}
    assert set(stats["sources"]) == {"VariErrNLI_train.json", "VariErrNLI_dev.json", "VariErrNLI_test.json"}
    assert len(stats["modified_raw"]) == 3  # invented files are not the known release
    par = common.read_jsonl(run / "data" / "par" / "test.jsonl")
    assert [r["label"] for r in par if r["item_id"] == "test-test1"] == [5, -4, -4, 4]
    manifest = common.read_json(common.manifest_path(run / "data" / "varierr"))
    assert manifest["made_from"]["config"]["data"]["split"] == "lewidi"
    assert sorted(Path(p).name for p in manifest["made_from"]["inputs"]) == [
        "VariErrNLI_dev.json", "VariErrNLI_test.json", "VariErrNLI_train.json"]


def test_prepare_lewidi_max_items_samples_each_split(tmp_path):
    raw = tmp_path / "raw"
    write_lewidi_files(raw)
    config = write_config(tmp_path, "smoke", data__min_train_records_per_annotator=1, data__max_items=6)
    prepare.main(["--config", str(config), "--raw-dir", str(raw), "--split", "lewidi", "--accept-modified-raw",
                  "--dataset", "par"])
    cfg = common.load_config(config, ["--data.split", "lewidi"])
    stats = common.read_json(common.data_dir(cfg, "par") / "stats.json")
    assert stats["items"] == {"train": 3, "dev": 1, "test": 2, "total": 6}  # 6/11 of 6, 2, 3 items
    test_ids = {r["item_id"] for r in common.load_split(cfg, "par", "test")}
    assert len(test_ids) == 2 and all(i.startswith("test-") for i in test_ids)


def test_prepare_lewidi_bad_input_names_file_line_field(tmp_path):
    raw = tmp_path / "raw"
    write_lewidi_files(raw)
    data = json.loads((raw / "VariErrNLI_dev.json").read_text())
    data["dev1"]["other_info"]["explanations"].pop()
    (raw / "VariErrNLI_dev.json").write_text(json.dumps(data, indent=1))
    config = write_config(tmp_path, "smoke", data__min_train_records_per_annotator=1)
    with pytest.raises(common.InputError, match=r"VariErrNLI_dev\.json.*line \d+.*other_info\.explanations"):
        prepare.main(["--config", str(config), "--raw-dir", str(raw), "--split", "lewidi", "--accept-modified-raw",
                      "--dataset", "varierr"])


def test_unknown_split_stops():
    with pytest.raises(common.InputError, match="data.split"):
        common.run_dir({"run_dir": "x", "data": {"split": "shared"}})


# ----------------------------------------------------------------------------
# The official metrics on hand-computed cases
# ----------------------------------------------------------------------------
def one_hot(index: int, n: int = 11) -> list[float]:
    return [float(i == index) for i in range(n)]


def test_par_soft_wasserstein():
    assert ev6.par_soft_distance(one_hot(0), one_hot(3)) == pytest.approx(3.0)
    half = [0.5, 0, 0.5] + [0.0] * 8
    assert ev6.par_soft_distance(half, one_hot(1)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    for _ in range(5):  # W1 on a line with unit steps = sum of |CDF differences|
        p, q = rng.dirichlet(np.ones(11)), rng.dirichlet(np.ones(11))
        assert ev6.par_soft_distance(p, q) == pytest.approx(np.abs(np.cumsum(p) - np.cumsum(q)).sum())


def test_par_anad():
    # |5-5| + |5-4| + |5-(-5)| + |5-0| = 16 over 4 annotators, / 11
    assert ev6.par_anad([5, 5, 5, 5], [5, 4, -5, 0]) == pytest.approx(16 / 44)
    assert ev6.par_anad([1, 2], [1, 2]) == 0.0


def test_varierr_soft_manhattan():
    predicted = [[1, 0], [0, 1], [1, 0]]
    gold = [[0.5, 0.5], [0.5, 0.5], [1, 0]]
    assert ev6.ven_soft_distance(predicted, gold) == pytest.approx((1 + 1 + 0) / 3)


def test_varierr_perspectivist_error_rate():
    predicted = [[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]  # contradiction, entailment, neutral x 4 annotators
    gold = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]]
    assert ev6.ven_pe_error(predicted, gold) == pytest.approx((1 / 4 + 2 / 4 + 2 / 4) / 3)


def test_rows_from_label_sets():
    nli = common.BUILTIN_TASKS["varierr"]
    sets = [{"contradiction"}, {"contradiction", "neutral"}, {"neutral"}, {"contradiction"}]
    assert ev6.lewidi_pe_row(nli, sets) == [[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]
    assert ev6.lewidi_soft_row(nli, sets) == [[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]]
    par = common.BUILTIN_TASKS["par"]
    soft = ev6.lewidi_soft_row(par, [{5}, {5}, {4}, {-5}])
    assert soft[0] == 0.25 and soft[9] == 0.25 and soft[10] == 0.5 and sum(soft) == 1
    train = [{"annotator": "A", "label": x} for x in (3, 3, 1, 1, 2)] + [{"annotator": "B", "label": 0}]
    assert ev6.most_frequent_labels(train) == {"A": 1, "B": 0}  # tie 1 vs 3: the one that sorts first


# ----------------------------------------------------------------------------
# 06's LeWiDi section on hand-written predictions; the submission files
# ----------------------------------------------------------------------------
def write_predictions(cfg: dict) -> None:
    """sft: every annotator answers its own first test label (Ann3's outputs unparseable on one
    item); base: predictions for Ann1 only (the others missing -> fallback)."""
    for name in ("varierr", "par"):
        task = common.load_task(cfg, name)
        test = common.load_split(cfg, name, "test")
        firsts = {}
        for r in test:
            firsts.setdefault((r["item_id"], r["annotator"]), r)
        by_annotator = {}
        for (item, annotator), r in firsts.items():
            broken = annotator == "Ann3" and item == sorted({i for i, _ in firsts})[0]
            output = "no idea" if broken else common.format_response(r["label"], "because")
            label, explanation, ok = common.parse_response(output, task)
            by_annotator.setdefault(annotator, []).append(
                {"dataset": name, "item_id": item, "annotator": annotator, "method": "sft", "model": "tiny",
                 "seed": 42, "output": output, "label": label, "explanation": explanation, "parse_ok": ok})
        for annotator, rows in by_annotator.items():
            common.write_jsonl(common.predictions_path(cfg, name, "tiny", "sft", annotator), rows)
        common.write_jsonl(common.predictions_path(cfg, name, "tiny", "base", "Ann1"), by_annotator["Ann1"])
    mark_predictions(cfg)


def test_lewidi_view_metrics_table_and_submissions(lewidi_run):
    config, cfg = lewidi_run
    write_predictions(cfg)
    datasets = {name: ev6.load_dataset(cfg, name) for name in ("varierr", "par")}
    predictions = {}
    for name, ds in datasets.items():
        predictions[name] = {}
        for method in ("sft", "base", "capo"):
            found, _ = ev6.load_predictions(cfg, ds, "tiny", method)
            predictions[name][("tiny", method)] = found
    view = ev6.lewidi_view(cfg, datasets, predictions)

    ven = {f"{s['model']}/{s['method']}": s for s in view["varierr"]["systems"]}
    assert ven["tiny/capo"]["status"] == "missing"
    sft = ven["tiny/sft"]
    assert sft["fallback"] == {"cells": 9, "unparsed": 1, "missing": 0}
    assert ven["tiny/base"]["fallback"] == {"cells": 9, "unparsed": 0, "missing": 6}
    assert 0 <= sft["pe"] <= 1 and sft["pe_ci"][0] <= sft["pe"] <= sft["pe_ci"][1]
    # by hand: invented gold of test-7 is Ann1 {c}, Ann2 {c, n}, Ann3 {n}; sft predicts c, c and
    # (Ann3 unparsed on test-7, the first item) Ann3's most frequent train label.
    fallback = view["varierr"]["fallback_labels"]["Ann3"]
    predicted = ev6.lewidi_pe_row(common.BUILTIN_TASKS["varierr"], [{"contradiction"}, {"contradiction"}, {fallback}])
    gold = [[1, 1, 0], [0, 0, 0], [0, 1, 1]]
    per_item = [ev6.ven_pe_error(predicted, gold)]
    assert per_item[0] == pytest.approx(np.mean([np.abs(np.array(p) - g).mean() for p, g in zip(predicted, gold)]))
    par = {f"{s['model']}/{s['method']}": s for s in view["par"]["systems"]}
    assert par["baseline/most_frequent"]["pe"] >= 0 and par["baseline/mean_train_distribution"]["pe"] is None

    # submission files: every test item, published IDs, rows parse back, soft rows sum to 1
    folder = common.lewidi_submission_dir(cfg, "tiny", "sft")
    stats = common.read_json(common.data_dir(cfg, "varierr") / "stats.json")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["Paraphrase_test_pe.tsv", "Paraphrase_test_soft.tsv", "VariErrNLI_test_pe.tsv",
                     "VariErrNLI_test_soft.tsv"]
    ven_soft = [line.split("\t") for line in (folder / "VariErrNLI_test_soft.tsv").read_text().splitlines()]
    assert [i for i, _ in ven_soft] == sorted(v["id"] for v in stats["lewidi_items"].values() if v["split"] == "test")
    for _, row in ven_soft:
        pairs = ast.literal_eval(row)
        assert len(pairs) == 3 and all(sum(pair) == pytest.approx(1, abs=1e-12) for pair in pairs)
    ven_pe = dict(line.split("\t") for line in (folder / "VariErrNLI_test_pe.tsv").read_text().splitlines())
    assert ast.literal_eval(ven_pe["7"]) == [[1, 1, int(fallback == "contradiction")], [0, 0, int(fallback == "entailment")],
                                             [0, 0, int(fallback == "neutral")]]
    for line in (folder / "Paraphrase_test_soft.tsv").read_text().splitlines():
        row = ast.literal_eval(line.split("\t")[1])
        assert len(row) == 11 and sum(row) == pytest.approx(1, abs=1e-12)
    for line in (folder / "Paraphrase_test_pe.tsv").read_text().splitlines():
        row = ast.literal_eval(line.split("\t")[1])
        assert len(row) == 4 and all(isinstance(x, int) and -5 <= x <= 5 for x in row)
    assert (common.lewidi_submission_dir(cfg, "baseline", "organisers") / "Paraphrase_test_soft.tsv").exists()

    # the table: ours with intervals, the published results labelled as such, the caveat
    tables = common.tables_dir(cfg)
    eval_report.write_lewidi_table(cfg, view, tables)
    markdown = (tables / "lewidi.md").read_text()
    assert eval_report.LEWIDI_CAVEAT in markdown
    assert "| par | published | most frequent label baseline | Wasserstein distance | - | ANAD | 0.362 |" in markdown
    assert "tiny/SFT" in markdown or "tiny/sft" in markdown
    assert (tables / "lewidi.csv").read_text().count("published") == len(eval_report.PUBLISHED_LEWIDI)


def test_rounded_distribution_sums_to_one():
    row = ev6.rounded_distribution([1 / 3, 1 / 3, 1 / 3])
    assert sum(row) == 1.0 and all(len(repr(x)) <= 14 for x in row)


# ----------------------------------------------------------------------------
# The real gold files (CAPO_RAW_DIR, as in CI)
# ----------------------------------------------------------------------------
LEWIDI_FILES = [f"{prefix}_{split}.json" for prefix in ("Paraphrase", "VariErrNLI") for split in ("train", "dev", "test")]


def missing_raw(names: list[str]) -> list[str]:
    """The raw files of `names` that CAPO_RAW_DIR does not hold (there, or one folder below)."""
    root = Path(RAW_DIR or "/nonexistent")
    return [name for name in names if not (root / name).is_file() and not list(root.glob(f"*/{name}"))]


@pytest.mark.skipif(bool(missing_raw(LEWIDI_FILES)), reason="needs CAPO_RAW_DIR with the LeWiDi-2025 files; "
                    f"missing: {', '.join(missing_raw(LEWIDI_FILES))}")
def test_most_frequent_baseline_reproduces_published_par_anad(tmp_path):
    config = write_config(tmp_path, "cpu")
    prepare.main(["--config", str(config), "--raw-dir", RAW_DIR, "--split", "lewidi"])
    cfg = common.load_config(config, ["--data.split", "lewidi"])
    view = {}
    for name in ("par", "varierr"):
        ds = ev6.load_dataset(cfg, name)
        # every test item, whatever data.max_eval_items is (the published baseline uses all 50)
        ds["items"] = {r["item_id"]: r for r in common.load_split(cfg, name, "test")}
        view[name] = ev6.lewidi_dataset_view(cfg, ds, {})
        assert view[name]["n_items"] == 50
        # gold soft labels rebuilt from the records equal the published soft_label field
        stats = common.read_json(common.data_dir(cfg, name) / "stats.json")
        published = json.loads(next(Path(RAW_DIR).rglob(f"{ev6.LEWIDI_FILE_PREFIX[name]}_test.json")).read_text())
        sets = ev6.label_sets(common.load_split(cfg, name, "test"))
        task = common.load_task(cfg, name)
        for item, per_annotator in sets.items():
            entry = published[stats["lewidi_items"][item]["id"]]
            row = ev6.lewidi_soft_row(task, [per_annotator[a] for a in stats["lewidi_items"][item]["annotators"]])
            expected = (list(entry["soft_label"].values()) if name == "par" else
                        [[entry["soft_label"][label]["0"], entry["soft_label"][label]["1"]] for label in ev6.LEWIDI_NLI_ORDER])
            assert np.allclose(row, expected, atol=0.005 + 1e-9)  # published to 2 decimals
    baseline = next(s for s in view["par"]["systems"] if s["method"] == "most_frequent")
    assert round(baseline["pe"], 3) == 0.362  # published: .362
    # VariErrNLI: each annotator's most frequent label gives .355; the published .345 is every
    # yes/no variable at its pooled most frequent value ("no").
    by_method = {s["method"]: s for s in view["varierr"]["systems"] if s["model"] == "baseline"}
    assert round(by_method["most_frequent"]["pe"], 3) == 0.355
    assert round(by_method["most_frequent_yes_no"]["pe"], 3) == 0.345  # published: .345
    assert not any(s["method"] == "most_frequent_yes_no" for s in view["par"]["systems"])


def test_most_frequent_yes_no_pools_every_variable():
    assert ev6.most_frequent_yes_no({"i1": {"a": {"neutral"}, "b": {"entailment"}}}) == set()
    everything = set(ev6.LEWIDI_NLI_ORDER)
    assert ev6.most_frequent_yes_no({"i1": {"a": everything, "b": {"neutral", "entailment"}}}) == everything


def test_06_main_writes_lewidi_table_report_and_submissions(lewidi_run):
    """06 end to end on the invented LeWiDi files (no judge, no BERTScore)."""
    config, cfg = lewidi_run
    write_predictions(cfg)
    flags = ["--config", str(config), "--data.split", "lewidi", "--eval.judge.backend", "none", "--eval.bertscore", "false"]
    ev6.main(flags)
    run = common.run_dir(cfg)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["lewidi"]) == {"varierr", "par"}
    report = (run / "report.md").read_text()
    assert "## 8. The LeWiDi-2025 view" in report and eval_report.LEWIDI_CAVEAT in report
    assert "lewidi_submissions/tiny/sft/" in report
    assert (run / "tables" / "lewidi.csv").exists()
    for name in ("Paraphrase_test_soft.tsv", "VariErrNLI_test_pe.tsv"):
        assert (common.lewidi_submission_dir(cfg, "tiny", "sft") / name).exists()


def test_06_paper_split_skips_lewidi_section(tmp_path, capsys):
    cfg = {"data": {"split": "paper"}}
    assert ev6.lewidi_view(cfg, {}, {}) is None
    assert "LeWiDi-2025 view skipped" in capsys.readouterr().out
