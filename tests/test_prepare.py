"""01_prepare: splits, units, normalisation, validity, bad input, custom data, determinism.

Fixtures are small raw files in the two source formats, written here with invented sentences.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

import common
from conftest import ROOT, load_stage, write_config

prepare = load_stage("01_prepare")


# ---------------------------------------------------------------------------- fixtures
def varierr_item(i: int, *, idk=(), extra=None) -> dict:
    """One VariErr-format item: annotators 0..3; annotator 3 gives two labels on even items."""
    def entry(annotator, reason, peers_true):
        judgments = [{"annotator": annotator, "makes_sense": True}]
        judgments += [{"annotator": p, "makes_sense": p in peers_true} for p in range(4) if p != annotator]
        return {"annotator": annotator, "reason": reason, "judgments": judgments,
                "self_corrected": False, "label_correction": False}
    item = {
        "id": f"{i:04d}x", "context": f"The baker  opened shop number {i} at dawn.",
        "statement": f"Shop {i} opened early.", "idk": list(idk),
        "entailment": [entry(0, f"  Dawn is early,   so shop {i} opened early. ", {1, 2, 3}),
                       entry(1, f"Opening at dawn means early for shop {i}.", {0, 2})],
        "neutral": [entry(2, f"We do not know what early means for shop {i}.", {0})],
        "contradiction": [],
    }
    if i % 2 == 0:
        item["neutral"].append(entry(3, f"Maybe shop {i} opens at dawn every day.", {0, 1, 2}))
        item["entailment"].append(entry(3, f"Dawn is early for shop {i}.", set()))
    else:
        item["contradiction"].append(entry(3, f"Dawn is not early for a baker in shop {i}.", {1}))
    item.update(extra or {})
    return item


def write_varierr(raw: Path, n: int = 20, mutate=None) -> Path:
    items = [varierr_item(i, idk=[3] if i == 1 else []) for i in range(n)]
    lines = [json.dumps(it) for it in items]
    if mutate:
        lines = mutate(lines)
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "varierr.json").write_text("\n".join(lines) + "\n")
    return raw / "varierr.json"


def par_item(i: int) -> dict:
    return {
        "text": {"Question1": f"How do I bake bread number {i}?", "Question2": f"What is the recipe for loaf {i}?"},
        "annotators": "Ann1,Ann2,Ann3,Ann4",
        "annotations": {"Ann1": str(i % 11 - 5), "Ann2": "3", "Ann3": "-2", "Ann4": "5"},
        "other_info": {"explanations": [f"both ask about bread {i}", f" same intent {i}",
                                        f"different scope for loaf {i} ", f"same question {i}"]},
    }


def write_par(raw: Path, n: int = 20, mutate=None) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    ids = [str(1000 + i) for i in range(n)]
    chunks = {"train": ids[: n // 2], "dev": ids[n // 2: 3 * n // 4], "test": ids[3 * n // 4:]}
    for split, chunk in chunks.items():
        data = {item_id: par_item(int(item_id) - 1000) for item_id in chunk}
        if mutate:
            mutate(split, data)
        (raw / f"Paraphrase_{split}.json").write_text(json.dumps(data, indent=1))


@pytest.fixture
def raw(tmp_path):
    raw = tmp_path / "raw"
    write_varierr(raw)
    write_par(raw)
    return raw


def run_prepare(tmp_path, raw, *extra, **cfg_changes):
    cfg_changes.setdefault("data__split_items", [12, 4, 4])
    cfg_changes.setdefault("data__max_items", None)
    cfg_changes.setdefault("data__min_train_records_per_annotator", 3)
    config = write_config(tmp_path, **cfg_changes)
    prepare.main(["--config", str(config), "--raw-dir", str(raw), *extra])
    return tmp_path / "run" / "data"


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------- behaviour
def test_splits_are_disjoint_sized_and_complete(tmp_path, raw):
    out = run_prepare(tmp_path, raw)
    for dataset in ("varierr", "par"):
        items = {s: {r["item_id"] for r in read(out / dataset / f"{s}.jsonl")} for s in ("train", "dev", "test")}
        assert [len(items[s]) for s in ("train", "dev", "test")] == [12, 4, 4]
        assert not (items["train"] & items["dev"]) and not (items["train"] & items["test"])
        assert not (items["dev"] & items["test"])
        stats = json.loads((out / dataset / "stats.json").read_text())
        assert stats["items"] == {"train": 12, "dev": 4, "test": 4, "total": 20}
        for split in ("train", "dev", "test"):
            assert all(r["split"] == split for r in read(out / dataset / f"{split}.jsonl"))


def test_varierr_units_validity_and_idk(tmp_path, raw):
    out = run_prepare(tmp_path, raw)
    records = [r for s in ("train", "dev", "test") for r in read(out / "varierr" / f"{s}.jsonl")]
    assert set(records[0]) == set(common.ANNOTATION_FIELDS)
    by_key = {(r["item_id"], r["annotator"], r["label"]): r for r in records}
    # Annotator 3 gave two labels on even items: two records.
    assert ("0000x", "A3", "neutral") in by_key and ("0000x", "A3", "entailment") in by_key
    # Item 1 has an idk mark for annotator 3 but annotator 3 still labelled it: idk adds nothing.
    stats = json.loads((out / "varierr" / "stats.json").read_text())
    assert stats["dropped"]["idk mark (no label)"] == 1
    assert len(records) == 20 * 4 + 10  # 4 per item, plus the 10 even-item second labels
    # Validity = strict majority of the other annotators' makes_sense (self-judgment ignored).
    assert by_key[("0000x", "A0", "entailment")]["valid"] is True    # 3 of 3 peers
    assert by_key[("0000x", "A1", "entailment")]["valid"] is True    # 2 of 3
    assert by_key[("0000x", "A2", "neutral")]["valid"] is False      # 1 of 3
    assert by_key[("0000x", "A3", "entailment")]["valid"] is False   # 0 of 3
    assert {r["annotator"] for r in records} == {"A0", "A1", "A2", "A3"}


def test_explanations_are_whitespace_normalised(tmp_path, raw):
    out = run_prepare(tmp_path, raw)
    for dataset in ("varierr", "par"):
        for split in ("train", "dev", "test"):
            for r in read(out / dataset / f"{split}.jsonl"):
                e = r["explanation"]
                assert e == e.strip() and "  " not in e and "\n" not in e and e
    par = read(out / "par" / "train.jsonl")
    assert any(r["annotator"] == "Ann2" and r["explanation"].startswith("same intent") for r in par)


def test_paraphrase_scores_and_annotator_order(tmp_path, raw):
    out = run_prepare(tmp_path, raw)
    records = [r for s in ("train", "dev", "test") for r in read(out / "par" / f"{s}.jsonl")]
    assert len(records) == 80
    for r in records:
        assert isinstance(r["label"], int) and -5 <= r["label"] <= 5 and r["valid"] is None
        i = int(r["item_id"]) - 1000
        expected = {"Ann1": f"both ask about bread {i}", "Ann3": f"different scope for loaf {i}"}
        if r["annotator"] in expected:
            assert r["explanation"] == expected[r["annotator"]]
        if r["annotator"] == "Ann1":
            assert r["label"] == i % 11 - 5


def test_same_seed_gives_byte_identical_files(tmp_path, raw):
    first = run_prepare(tmp_path / "a", raw)
    second = run_prepare(tmp_path / "b", raw)
    for dataset in ("varierr", "par"):
        for name in ("train.jsonl", "dev.jsonl", "test.jsonl", "stats.json"):
            assert (first / dataset / name).read_bytes() == (second / dataset / name).read_bytes()
    # The training seed never re-splits; the split seed does.
    same_split = run_prepare(tmp_path / "c", raw, "--seed", "7")
    assert (same_split / "varierr" / "test.jsonl").read_bytes() == (first / "varierr" / "test.jsonl").read_bytes()
    other = run_prepare(tmp_path / "d", raw, "--data.split_seed", "7")
    assert (other / "varierr" / "test.jsonl").read_bytes() != (first / "varierr" / "test.jsonl").read_bytes()


def test_resolved_config_is_saved_with_versions(tmp_path, raw):
    out = run_prepare(tmp_path, raw)
    import yaml
    saved = yaml.safe_load((out / "varierr" / "config.resolved.yaml").read_text())
    assert saved["stage"] == "01_prepare" and saved["config"]["seed"] == 42
    assert saved["environment"]["packages"]["torch"].startswith("2.13")


def test_max_items_takes_a_seeded_subset(tmp_path, raw):
    out = run_prepare(tmp_path, raw, data__max_items=10, data__split_items=[300, 100, 100])
    stats = json.loads((out / "varierr" / "stats.json").read_text())
    assert stats["items"] == {"train": 6, "dev": 2, "test": 2, "total": 10}


# ---------------------------------------------------------------------------- bad input
def bad_input_message(tmp_path, raw, *extra, **cfg):
    with pytest.raises(common.InputError) as err:
        run_prepare(tmp_path, raw, *extra, **cfg)
    return str(err.value)


def test_malformed_json_names_file_and_line(tmp_path):
    raw = tmp_path / "raw"
    write_varierr(raw, mutate=lambda lines: lines[:2] + ['{"id": "broken", '] + lines[2:])
    msg = bad_input_message(tmp_path, raw, "--dataset", "varierr")
    assert "varierr.json" in msg and "line 3" in msg and "malformed JSON" in msg


def test_missing_field_names_line_and_field(tmp_path):
    raw = tmp_path / "raw"
    def drop_statement(lines):
        item = json.loads(lines[4]); del item["statement"]; lines[4] = json.dumps(item); return lines
    write_varierr(raw, mutate=drop_statement)
    msg = bad_input_message(tmp_path, raw, "--dataset", "varierr")
    assert "line 5" in msg and "'statement'" in msg


def test_empty_explanation_stops_or_is_skipped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    def blank(lines):
        item = json.loads(lines[0]); item["neutral"][0]["reason"] = "   "; lines[0] = json.dumps(item); return lines
    write_varierr(raw, mutate=blank)
    msg = bad_input_message(tmp_path, raw, "--dataset", "varierr")
    assert "empty explanation" in msg and "item 0000x" in msg and "neutral[].reason" in msg
    out = run_prepare(tmp_path / "skip", raw, "--dataset", "varierr", "--skip-invalid")
    stats = json.loads((out / "varierr" / "stats.json").read_text())
    assert stats["dropped"]["empty explanation"] == 1 and stats["records"]["total"] == 89


def test_score_out_of_range(tmp_path):
    raw = tmp_path / "raw"
    write_par(raw, mutate=lambda split, data: split == "dev" and data[next(iter(data))]["annotations"].update(Ann2="7"))
    msg = bad_input_message(tmp_path, raw, "--dataset", "par")
    assert "Paraphrase_dev.json" in msg and "annotations.Ann2" in msg and "'7'" in msg and "line" in msg


def test_annotator_with_too_few_records(tmp_path, raw):
    msg = bad_input_message(tmp_path, raw, "--dataset", "varierr", data__min_train_records_per_annotator=50)
    assert "annotator A0" in msg and "fewer than" in msg
    out = run_prepare(tmp_path / "skip", raw, "--dataset", "varierr", "--skip-invalid",
                      data__min_train_records_per_annotator=13)
    stats = json.loads((out / "varierr" / "stats.json").read_text())
    assert stats["annotators"] == ["A3"]  # only A3 (two labels on even items) has 13+ train records
    assert stats["dropped"]["records of annotators below the minimum"] > 0


def test_unknown_label_in_custom_data(tmp_path):
    custom = tmp_path / "mine.jsonl"
    rows = [{"item_id": "i1", "text_a": "a", "text_b": "b", "annotator": "x", "label": "yes", "explanation": "ok"},
            {"item_id": "i2", "text_a": "c", "text_b": "d", "annotator": "x", "label": "perhaps", "explanation": "ok"}]
    custom.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = write_config(tmp_path)
    with pytest.raises(common.InputError) as err:
        prepare.main(["--config", str(config), "--custom", str(custom), "--name", "mine",
                      "--label-type", "categorical", "--labels", "yes,no"])
    assert "mine.jsonl, line 2, field 'label'" in str(err.value) and "perhaps" in str(err.value)


def test_missing_raw_file_offline_gives_short_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = bad_input_message(tmp_path, empty, "--dataset", "varierr")
    assert "varierr.json is missing" in msg and "github" in msg and str(empty) in msg
    assert not (empty / "varierr.json").exists()


def test_cli_prints_one_line_and_exits_nonzero_without_traceback(tmp_path):
    config = write_config(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    # An unreachable proxy makes the download fail fast and deterministically.
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, str(ROOT / "01_prepare.py"), "--config", str(config),
                           "--dataset", "par", "--raw-dir", str(empty)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Paraphrase_train.json is missing" in proc.stderr
    assert not (tmp_path / "run" / "data" / "par").exists()


def test_unknown_config_override_is_rejected(tmp_path, raw):
    msg = bad_input_message(tmp_path, raw, "--data.max_itemz", "3")
    assert "unknown config key 'data.max_itemz'" in msg


# ---------------------------------------------------------------------------- custom data
def test_custom_csv_with_three_annotators(tmp_path):
    custom = tmp_path / "mine.csv"
    lines = ["item_id,text_a,text_b,annotator,label,explanation"]
    for i in range(10):
        for ann, score in (("r1", 1), ("r2", -1), ("r3", 0)):
            lines.append(f'q{i},"Is tea {i} hot?","Is tea {i} warm?",{ann},{score},"  {ann}   thinks  {i} "')
    custom.write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path, data__split_items=[6, 2, 2], data__min_train_records_per_annotator=2)
    prepare.main(["--config", str(config), "--custom", str(custom), "--name", "tea", "--label-type", "numeric"])
    out = tmp_path / "run" / "data" / "tea"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["annotators"] == ["r1", "r2", "r3"]
    assert stats["task"]["score_range"] == [-1, 1] and stats["records"]["total"] == 30
    train = read(out / "train.jsonl")
    assert train[0]["explanation"] == f"{train[0]['annotator']} thinks {train[0]['item_id'][1:]}"
    assert isinstance(train[0]["label"], int)


# ---------------------------------------------------------------------------- real data
RAW_DIR = os.environ.get("CAPO_RAW_DIR")


@pytest.mark.skipif(not RAW_DIR or not Path(RAW_DIR).exists(), reason="CAPO_RAW_DIR (raw data mirror) not set")
def test_real_data_counts(tmp_path):
    config = write_config(tmp_path, base="cpu")
    prepare.main(["--config", str(config), "--raw-dir", RAW_DIR])
    out = tmp_path / "run" / "data"
    varierr = json.loads((out / "varierr" / "stats.json").read_text())
    par = json.loads((out / "par" / "stats.json").read_text())
    assert varierr["items"] == par["items"] == {"train": 300, "dev": 100, "test": 100, "total": 500}
    assert varierr["annotators"] == ["A0", "A1", "A2", "A3"]
    assert par["annotators"] == ["Ann1", "Ann2", "Ann3", "Ann4"]
    assert 1900 <= varierr["records"]["total"] <= 1933
    assert par["records"]["total"] == 2000
    for dataset in ("varierr", "par"):
        for split in ("train", "dev", "test"):
            for r in read(out / dataset / f"{split}.jsonl"):
                assert r["explanation"] == " ".join(r["explanation"].split()) != ""


@pytest.mark.parametrize("change,expected", [
    ({"annotator": None}, "line 1, field 'annotator'"),
    ({"text_b": "  "}, "line 1, field 'text_b'"),
    ({"explanation": " "}, "line 1, field 'explanation': empty explanation"),
])
def test_custom_missing_or_empty_fields(tmp_path, change, expected):
    row = {"item_id": "i1", "text_a": "a", "text_b": "b", "annotator": "x", "label": "yes", "explanation": "ok"}
    row.update(change)
    row = {k: v for k, v in row.items() if v is not None}
    custom = tmp_path / "mine.jsonl"
    custom.write_text(json.dumps(row) + "\n")
    with pytest.raises(common.InputError) as err:
        prepare.main(["--config", str(write_config(tmp_path)), "--custom", str(custom), "--name", "mine",
                      "--label-type", "categorical"])
    assert expected in str(err.value)
