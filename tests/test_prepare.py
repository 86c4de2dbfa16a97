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


def run_prepare(tmp_path, raw, *extra, accept_modified=True, **cfg_changes):
    """01 on the invented raw files; those are not the public releases, hence --accept-modified-raw."""
    cfg_changes.setdefault("data__split_items", [12, 4, 4])
    cfg_changes.setdefault("data__max_items", None)
    cfg_changes.setdefault("data__min_train_records_per_annotator", 3)
    config = write_config(tmp_path, **cfg_changes)
    flags = ["--accept-modified-raw"] if accept_modified else []
    prepare.main(["--config", str(config), "--raw-dir", str(raw), *flags, *extra])
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
    assert varierr["modified_raw"] == par["modified_raw"] == []  # the known public releases
    for dataset in ("varierr", "par"):
        for split in ("train", "dev", "test"):
            for r in read(out / dataset / f"{split}.jsonl"):
                assert r["explanation"] == " ".join(r["explanation"].split()) != ""


@pytest.mark.skipif(not RAW_DIR or not Path(RAW_DIR).exists(), reason="CAPO_RAW_DIR (raw data mirror) not set")
def test_cut_real_varierr_is_refused_unless_accepted(tmp_path):
    real = prepare.find_raw_file(Path(RAW_DIR), "varierr.json")
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "varierr.json").write_bytes(b"".join(real.read_bytes().splitlines(keepends=True)[:250]))
    msg = bad_input_message(tmp_path, cut, "--dataset", "varierr", accept_modified=False)
    assert "varierr.json: not the known release" in msg
    assert "expected 500 items" in msg and "found 250 items" in msg
    out = run_prepare(tmp_path / "ok", cut, "--dataset", "varierr", data__split_items=[150, 50, 50])
    stats = json.loads((out / "varierr" / "stats.json").read_text())
    assert stats["items_in_source"] == 250 and stats["modified_raw"][0]["found_items"] == 250


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


# ---------------------------------------------------------------------------- trustworthy inputs
def run_custom(tmp_path, custom, *extra, name="mine", label_type="categorical", **cfg):
    cfg.setdefault("data__split_items", [6, 2, 2])
    cfg.setdefault("data__min_train_records_per_annotator", 1)
    config = write_config(tmp_path, **cfg)
    prepare.main(["--config", str(config), "--custom", str(custom), "--name", name,
                  "--label-type", label_type, *extra])
    return tmp_path / "run" / "data" / name


def custom_bad(tmp_path, custom, *extra, **kwargs):
    with pytest.raises(common.InputError) as err:
        run_custom(tmp_path, custom, *extra, **kwargs)
    return str(err.value)


def custom_rows(n_items=10, annotators=("r1", "r2"), label=lambda i, a: "yes" if i % 2 else "no"):
    return [{"item_id": f"q{i}", "text_a": f"Is tea {i} hot?", "text_b": f"Is tea {i} warm?", "annotator": a,
             "label": label(i, a), "explanation": f"{a} on tea {i}"} for i in range(n_items) for a in annotators]


def write_jsonl_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv_rows(path, rows, encoding="utf-8"):
    lines = [",".join(prepare.CUSTOM_COLUMNS)]
    lines += [",".join(f'"{r[c]}"' for c in prepare.CUSTOM_COLUMNS) for r in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def test_check_release_on_invented_files(tmp_path):
    path = tmp_path / "release.json"
    path.write_text('{"a": 1, "b": 2, "c": 3}')
    known = {"items": 3, "sha256": common.file_sha256(path)}
    assert prepare.check_release(path, 3, known, accept_modified=False) is None
    path.write_text('{"a": 1, "b": 2}')
    with pytest.raises(common.InputError) as err:
        prepare.check_release(path, 2, known, accept_modified=False)
    msg = str(err.value)
    assert msg.startswith(f"{path}: not the known release") and "expected 3 items" in msg
    assert f"sha256 {known['sha256'][:12]}" in msg and "found 2 items" in msg and "--accept-modified-raw" in msg
    note = prepare.check_release(path, 2, known, accept_modified=True)
    assert note == {"file": "release.json", "expected_items": 3, "found_items": 2,
                    "expected_sha256": known["sha256"], "found_sha256": common.file_sha256(path)}
    # Same bytes but a different count (a reader that skipped items) is not the release either.
    with pytest.raises(common.InputError):
        prepare.check_release(path, 3, {"items": 2, "sha256": common.file_sha256(path)}, accept_modified=False)


def test_raw_files_other_than_the_release_stop_unless_accepted(tmp_path, raw):
    msg = bad_input_message(tmp_path, raw, "--dataset", "varierr", accept_modified=False)
    assert "varierr.json: not the known release" in msg
    assert "expected 500 items" in msg and "found 20 items" in msg
    msg = bad_input_message(tmp_path, raw, "--dataset", "par", accept_modified=False)
    assert "Paraphrase_train.json: not the known release" in msg and "expected 400 items" in msg
    assert "found 10 items" in msg
    out = run_prepare(tmp_path / "ok", raw)
    varierr = json.loads((out / "varierr" / "stats.json").read_text())
    par = json.loads((out / "par" / "stats.json").read_text())
    assert [(n["file"], n["found_items"]) for n in varierr["modified_raw"]] == [("varierr.json", 20)]
    assert [(n["file"], n["expected_items"], n["found_items"]) for n in par["modified_raw"]] == [
        ("Paraphrase_train.json", 400, 10), ("Paraphrase_dev.json", 50, 5), ("Paraphrase_test.json", 50, 5)]


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_raw_file_always_stops(tmp_path, raw, content):
    (raw / "varierr.json").write_text(content)
    msg = bad_input_message(tmp_path, raw, "--dataset", "varierr")  # even with --accept-modified-raw
    assert msg == f"{raw / 'varierr.json'}: file is empty"
    (raw / "Paraphrase_dev.json").write_text(content)
    assert bad_input_message(tmp_path, raw, "--dataset", "par").endswith("Paraphrase_dev.json: file is empty")


def test_raw_file_with_wrong_structure_names_line_and_field(tmp_path):
    raw = tmp_path / "raw"
    def null_labels(lines):
        item = json.loads(lines[2]); item["neutral"] = None; lines[2] = json.dumps(item); return lines
    write_varierr(raw, mutate=null_labels)
    msg = bad_input_message(tmp_path, raw, "--dataset", "varierr")
    assert "varierr.json, line 3, field 'neutral'" in msg
    def duplicate(lines):
        return lines + [lines[0]]
    write_varierr(raw, mutate=duplicate)
    msg = bad_input_message(tmp_path, raw, "--dataset", "varierr")
    assert "line 21, item 0000x, field 'id': item id appears twice" in msg
    write_par(raw, mutate=lambda split, data: split == "test" and data[next(iter(data))].update(annotations=[3]))
    assert "Paraphrase_test.json, line" in bad_input_message(tmp_path, raw, "--dataset", "par")


@pytest.mark.parametrize("annotator", ["../../../../escaped", "a/b", ".hidden", "a b", "é\\x"])
def test_annotator_ids_must_be_path_safe(tmp_path, annotator):
    rows = custom_rows()
    rows[3]["annotator"] = annotator
    msg = custom_bad(tmp_path, write_jsonl_rows(tmp_path / "mine.jsonl", rows))
    assert msg.startswith(f"{tmp_path / 'mine.jsonl'}, line 4, field 'annotator': annotator ID {annotator!r}")
    assert "not path-safe" in msg
    out = run_custom(tmp_path / "skip", tmp_path / "mine.jsonl", "--skip-invalid")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"] == {"annotator ID not path-safe": 1} and stats["annotators"] == ["r1", "r2"]


def test_paraphrase_annotator_ids_must_be_path_safe(tmp_path):
    raw = tmp_path / "raw"
    def unsafe(split, data):
        if split == "dev":
            item = data[next(iter(data))]
            item["annotators"] = "Ann1,../Ann2,Ann3,Ann4"
            item["annotations"]["../Ann2"] = "1"
    write_par(raw, mutate=unsafe)
    msg = bad_input_message(tmp_path, raw, "--dataset", "par")
    assert "Paraphrase_dev.json, line" in msg and "'../Ann2' is not path-safe" in msg


@pytest.mark.parametrize("name", ["../../../../escaped", "a/b", ".hidden", "", "varierr", "par", "x y"])
def test_dataset_name_must_be_path_safe(tmp_path, name):
    custom = write_jsonl_rows(tmp_path / "mine.jsonl", custom_rows())
    msg = custom_bad(tmp_path, custom, name=name)
    assert (f"--name {name!r} is not allowed" in msg) if name else msg.startswith("--custom needs --name")
    assert not (tmp_path / "run").exists()


def test_dotted_names_are_allowed(tmp_path):
    rows = custom_rows(annotators=("r.1", "R-2_b"))
    out = run_custom(tmp_path, write_jsonl_rows(tmp_path / "mine.jsonl", rows), name="tea.v1-b_2")
    assert json.loads((out / "stats.json").read_text())["annotators"] == ["R-2_b", "r.1"]


@pytest.mark.parametrize("score_range,expected", [
    ("1-5", "--score-range '1-5': expected LOW,HIGH (two integers, e.g. -5,5)"),
    ("5,1", "--score-range '5,1': LOW must be below HIGH (e.g. 1,5)"),
    ("3,3", "--score-range '3,3': LOW must be below HIGH"),
])
def test_bad_score_range(tmp_path, score_range, expected):
    custom = write_jsonl_rows(tmp_path / "mine.jsonl", custom_rows(label=lambda i, a: i % 3))
    assert custom_bad(tmp_path, custom, "--score-range", score_range, label_type="numeric").startswith(expected)


def test_negative_score_range_as_documented(tmp_path):
    custom = write_jsonl_rows(tmp_path / "mine.jsonl", custom_rows(label=lambda i, a: i % 3 - 1))
    out = run_custom(tmp_path, custom, "--score-range", "-5,5", label_type="numeric")
    assert json.loads((out / "stats.json").read_text())["task"]["score_range"] == [-5, 5]


@pytest.mark.parametrize("content,expected", [
    ("", "file is empty"),
    ("item_id,text_a,text_b,annotator,label,explanation\n", "no annotation rows (only a header?)"),
])
@pytest.mark.parametrize("label_type", ["numeric", "categorical"])
def test_empty_custom_file(tmp_path, content, expected, label_type):
    custom = tmp_path / "mine.csv"
    custom.write_text(content)
    assert custom_bad(tmp_path, custom, label_type=label_type) == f"{custom}: {expected}"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_latin1_file_names_line_and_byte(tmp_path, suffix):
    rows = custom_rows()
    rows[4]["explanation"] = "caf\u00e9 au lait"
    path = tmp_path / f"mine{suffix}"
    if suffix == ".csv":
        write_csv_rows(path, rows, encoding="latin-1")
        line = 6  # header + 5th row
    else:
        path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("latin-1"))
        line = 5
    offset = path.read_bytes().index(b"\xe9")
    msg = custom_bad(tmp_path, path)
    assert msg == (f"{path}, line {line}: not UTF-8: byte 0xe9 at offset {offset} cannot be decoded "
                   "(save the file as UTF-8)")


def test_folder_as_custom_file(tmp_path):
    folder = tmp_path / "annotations.jsonl"
    folder.mkdir()
    assert custom_bad(tmp_path, folder) == f"{folder}: is a folder, expected a file"


def test_csv_with_byte_order_mark(tmp_path):
    custom = write_csv_rows(tmp_path / "mine.csv", custom_rows(), encoding="utf-8-sig")
    assert custom.read_bytes().startswith(b"\xef\xbb\xbfitem_id")
    stats = json.loads((run_custom(tmp_path, custom) / "stats.json").read_text())
    assert stats["records"]["total"] == 20 and stats["task"]["labels"] == ["no", "yes"]


@pytest.mark.parametrize("labels", [["--labels", "0,1"], []])
def test_integer_labels_on_a_categorical_task(tmp_path, labels):
    custom = write_jsonl_rows(tmp_path / "mine.jsonl", custom_rows(label=lambda i, a: i % 2))
    out = run_custom(tmp_path, custom, *labels)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["task"]["labels"] == ["0", "1"] and stats["records"]["total"] == 20
    assert {r["label"] for r in read(out / "train.jsonl")} == {"0", "1"}


def test_two_scores_from_one_annotator_for_one_item(tmp_path):
    rows = custom_rows(label=lambda i, a: i % 3)
    rows.insert(7, dict(rows[2], label=2, explanation="second thoughts"))  # r1 on q1: 1 (line 3), 2 (line 8)
    custom = write_jsonl_rows(tmp_path / "mine.jsonl", rows)
    msg = custom_bad(tmp_path, custom, label_type="numeric")
    assert msg == (f"{custom}, line 8, item q1, field 'label': annotator r1 gave this item two different "
                   "scores: 1 (line 3) and 2 (line 8)")
    out = run_custom(tmp_path / "skip", custom, "--skip-invalid", label_type="numeric")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["dropped"] == {"two different scores from one annotator for one item": 2}
    assert stats["records"]["total"] == 19  # 20 rows less r1's record on q1
    records = [r for s in ("train", "dev", "test") for r in read(out / f"{s}.jsonl")]
    assert not any(r["item_id"] == "q1" and r["annotator"] == "r1" for r in records)
    # Categorical: two labels from one annotator for one item are both kept (as in VariErr).
    rows[7]["label"], rows[2]["label"] = "yes", "no"
    out = run_custom(tmp_path / "cat", write_jsonl_rows(tmp_path / "cat.jsonl", rows), name="cat")
    records = [r for s in ("train", "dev", "test") for r in read(out / f"{s}.jsonl")]
    r1_on_q1 = [r["label"] for r in records if r["item_id"] == "q1" and r["annotator"] == "r1"]
    assert sorted(r1_on_q1) == ["no", "yes"]


@pytest.mark.parametrize("extra,expected", [
    (["--name", "mine"], "--name is only used with --custom FILE"),
    (["--score-range", "1,5"], "--score-range is only used with --custom FILE"),
])
def test_custom_flags_without_custom(tmp_path, raw, extra, expected):
    assert bad_input_message(tmp_path, raw, *extra) == expected


def test_wrong_flag_for_label_type(tmp_path):
    custom = write_jsonl_rows(tmp_path / "mine.jsonl", custom_rows())
    msg = custom_bad(tmp_path, custom, "--score-range", "1,5")
    assert msg.startswith("--score-range is for --label-type numeric")
    assert custom_bad(tmp_path, custom, "--labels", "yes,no", label_type="numeric").startswith(
        "--labels is for --label-type categorical")
    assert "at least two different labels" in custom_bad(tmp_path, custom, "--labels", "yes")
    assert "at least two different labels" in custom_bad(tmp_path, custom, "--labels", "yes,no,Yes")
    assert custom_bad(tmp_path, custom, "--accept-modified-raw").startswith("--accept-modified-raw is for the built-in")


def cli(tmp_path, *args, **cfg):
    cfg.setdefault("torch_threads", None)  # no torch import: these runs stop before any model work
    config = write_config(tmp_path, **cfg)
    return subprocess.run([sys.executable, str(ROOT / "01_prepare.py"), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_inputs_print_one_error_line_and_exit_2(tmp_path):
    """A few of the cases above through the real command line: exit 2, one stderr line starting
    with error:. (Each run costs a torch import, so the rest are checked in-process.)"""
    numeric = write_jsonl_rows(tmp_path / "scores.jsonl", custom_rows(label=lambda i, a: i % 3))
    latin1 = write_csv_rows(tmp_path / "latin1.csv", [dict(r, explanation="caf\u00e9") for r in custom_rows()],
                            encoding="latin-1")
    (tmp_path / "folder").mkdir()
    cut = tmp_path / "cut"
    write_varierr(cut, n=5)
    custom = ["--label-type", "numeric", "--name", "mine", "--custom"]
    cases = {
        "LOW must be below HIGH": [*custom, str(numeric), "--score-range", "5,1"],
        "line 2: not UTF-8": [*custom, str(latin1)],
        "is a folder": [*custom, str(tmp_path / "folder")],
        "not the known release": ["--dataset", "varierr", "--raw-dir", str(cut)],
    }
    for expected, args in cases.items():
        proc = cli(tmp_path, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, proc.stderr)
    assert not (tmp_path / "run" / "data").exists()
