"""03_prompt_baselines.py on a tiny fixture run dir (invented sentences, smoke profile):
a file per method, dataset and annotator; the right demonstrations and profile in each
prompt; no dev/test item in any demonstration or profile source; profiles reused by key."""
from __future__ import annotations

import re

import pytest

import common
from conftest import load_stage, mark_prepared, write_config

stage = load_stage("03_prompt_baselines")

ANNOTATORS = {"varierr": ["A0", "A1", "A2"], "par": ["Ann1", "Ann2", "Ann3"]}
PAIRS = [
    ("The ferry leaves at noon.", "The boat departs at midday."),
    ("A man is slicing onions.", "Someone is cooking."),
    ("The museum is closed for repairs.", "Visitors can tour the museum today."),
    ("She forgot her umbrella at the cafe.", "She left something behind."),
    ("The river flooded the lower fields.", "The fields are dry."),
    ("Children built a snowman in the yard.", "It was winter."),
    ("The printer ran out of toner.", "Pages are printing normally."),
    ("A cyclist fixed a flat tyre.", "A bicycle was repaired."),
    ("The orchestra rehearsed all evening.", "Musicians practised."),
    ("The bridge was painted green.", "The bridge has no paint."),
    ("He sold his old car last week.", "He still owns every car he bought."),
    ("The lamp flickered during the storm.", "There was bad weather."),
]
SPLITS = {"train": range(0, 8), "dev": range(8, 10), "test": range(10, 12)}
TASKS = {"varierr": common.BUILTIN_TASKS["varierr"], "par": common.BUILTIN_TASKS["par"]}


def fixture_records(dataset: str, leak_item: str | None = None) -> dict[str, list[dict]]:
    labels = ["entailment", "neutral", "contradiction"] if dataset == "varierr" else [-4, 0, 3]
    splits = {}
    for split, indices in SPLITS.items():
        records = []
        for i in indices:
            for a, annotator in enumerate(ANNOTATORS[dataset]):
                if split == "test" and i == 11 and a == 2:
                    continue  # the third annotator skipped one test item
                records.append({"dataset": dataset, "item_id": f"{dataset[0]}{i:02d}", "split": split,
                                "annotator": annotator, "text_a": PAIRS[i][0], "text_b": PAIRS[i][1],
                                "label": labels[(i + a) % 3],
                                "explanation": f"{annotator} says item {i} is about {PAIRS[i][1].lower()}",
                                "valid": None})
        splits[split] = records
    if leak_item:  # a train record whose item is also a test item
        splits["train"].append(dict(splits["test"][0], split="train"))
    return splits


def write_fixture_run(tmp_path, leak_item: str | None = None, **config_changes):
    changes = {"generation__max_new_tokens": 6, "generation__batch_size": 4,
               "baselines__icl_k": 3, "baselines__profile_source_examples": 4,
               "baselines__profile_max_new_tokens": 6}
    changes.update(config_changes)
    config = write_config(tmp_path, "smoke", **changes)
    cfg = common.load_config(config)
    for dataset in ("varierr", "par"):
        folder = common.data_dir(cfg, dataset)
        for split, records in fixture_records(dataset, leak_item if dataset == "varierr" else None).items():
            common.write_jsonl(folder / f"{split}.jsonl", records)
        common.write_json(folder / "stats.json", {"dataset": dataset, "task": TASKS[dataset],
                                                  "annotators": ANNOTATORS[dataset]})
        mark_prepared(cfg, dataset)
    return config, cfg


@pytest.fixture
def captured(monkeypatch):
    """Record every prediction request the stage makes; profiles come back as marker text."""
    calls = {"requests": [], "profile_prompts": []}
    real_predictions, real_texts = common.generate_predictions, common.generate_texts

    def generate_predictions(model, tokenizer, requests, task, gen_cfg, **kwargs):
        calls["requests"].append((kwargs["method"], requests))
        return real_predictions(model, tokenizer, requests, task, gen_cfg, **kwargs)

    def generate_texts(model, tokenizer, prompts, gen_cfg, desc="generate", constraint=None):
        if desc.endswith("profiles"):
            calls["profile_prompts"] += prompts
            annotators = [re.search(r"annotator (\S+):", p[1]["content"]).group(1) for p in prompts]
            return [f"MARKER profile of {annotator}." for annotator in annotators]
        return real_texts(model, tokenizer, prompts, gen_cfg, desc=desc, constraint=constraint)

    monkeypatch.setattr(common, "generate_predictions", generate_predictions)
    monkeypatch.setattr(common, "generate_texts", generate_texts)
    return calls


def demo_turns(messages):
    """(user, assistant) pairs shown before the final question."""
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(1, len(messages) - 1, 2)]


def test_smoke_profile_writes_every_method_dataset_and_annotator(tmp_path):
    config, cfg = write_fixture_run(tmp_path)  # the real profile writer (the tiny model) this time
    stage.main(["--config", str(config), "--dataset", "all"])

    for dataset, annotators in ANNOTATORS.items():
        test = fixture_records(dataset)["test"]
        for method in stage.METHODS:
            folder = common.predictions_path(cfg, dataset, "tiny", method, "x").parent
            assert (folder / "config.resolved.yaml").exists()
            for annotator in annotators:
                predictions = common.read_jsonl(common.predictions_path(cfg, dataset, "tiny", method, annotator),
                                                required=common.PREDICTION_FIELDS)
                expected = sorted({r["item_id"] for r in test if r["annotator"] == annotator})
                assert [p["item_id"] for p in predictions] == expected
                assert {(p["method"], p["model"], p["annotator"], p["dataset"]) for p in predictions} == \
                    {(method, "tiny", annotator, dataset)}
        for annotator in annotators:
            profile_dir = common.run_dir(cfg) / "profiles" / dataset
            assert (profile_dir / f"{annotator}.txt").exists()
            assert common.read_json(profile_dir / f"{annotator}.json")["annotator"] == annotator


def test_prompts_carry_the_annotators_own_demonstrations_and_profile(tmp_path, captured):
    config, cfg = write_fixture_run(tmp_path)
    stage.main(["--config", str(config), "--dataset", "varierr"])
    train = fixture_records("varierr")["train"]
    held_out = {r["item_id"] for split in ("dev", "test") for r in fixture_records("varierr")[split]}
    seen = set()
    for method, requests in captured["requests"]:
        for request in requests:
            annotator, messages = request["annotator"], request["messages"]
            system = messages[0]["content"]
            own_train = {(common.item_text(TASKS["varierr"], r["text_a"], r["text_b"]),
                          common.format_response(r["label"], r["explanation"]))
                         for r in train if r["annotator"] == annotator}
            demos = demo_turns(messages)
            if method in ("icl", "vp_icl"):
                assert len(demos) == 3 and set(demos) <= own_train  # own train responses only
                assert not any(item in user for user, _ in demos for item in
                               (PAIRS[i][0] for i in (*SPLITS["dev"], *SPLITS["test"])))
            else:
                assert demos == []
            has_profile = f"MARKER profile of {annotator}." in system
            assert has_profile == (method in ("vp", "vp_icl"))
            assert "MARKER" not in system.replace(f"MARKER profile of {annotator}.", "")  # not another's
            assert messages[-1]["content"].startswith("Premise: ")
            seen.add((method, annotator))
    assert seen == {(m, a) for m in stage.METHODS for a in ANNOTATORS["varierr"]}
    # The demonstrations are the same for every test item of an annotator (seeded rule).
    icl = [r for m, reqs in captured["requests"] if m == "icl" for r in reqs]
    by_annotator = {}
    for request in icl:
        by_annotator.setdefault(request["annotator"], set()).add(tuple(demo_turns(request["messages"])))
    assert all(len(variants) == 1 for variants in by_annotator.values())
    # Profile sources: the annotator's own train items, never a dev or test item.
    for annotator in ANNOTATORS["varierr"]:
        meta = common.read_json(common.run_dir(cfg) / "profiles" / "varierr" / f"{annotator}.json")
        assert meta["source_item_ids"] and not set(meta["source_item_ids"]) & held_out
        own_ids = {r["item_id"] for r in train if r["annotator"] == annotator}
        assert set(meta["source_item_ids"]) <= own_ids
        prompt_text = meta["prompt"][1]["content"]
        assert f"{annotator} says item" in prompt_text
        assert not any(other in prompt_text for other in ANNOTATORS["varierr"] if other != annotator and
                       f"{other} says" in prompt_text)
    assert len(captured["profile_prompts"]) == 3


def test_profiles_are_reused_until_their_key_changes(tmp_path, captured):
    config, cfg = write_fixture_run(tmp_path, baselines__methods=["vp"])
    stage.main(["--config", str(config), "--dataset", "varierr"])
    assert len(captured["profile_prompts"]) == 3
    stage.main(["--config", str(config), "--dataset", "varierr"])
    assert len(captured["profile_prompts"]) == 3  # reused, not rewritten
    stage.main(["--config", str(config), "--dataset", "varierr", "--baselines.profile_source_examples", "2"])
    assert len(captured["profile_prompts"]) == 6  # a changed config rewrites them
    meta = common.read_json(common.run_dir(cfg) / "profiles" / "varierr" / "A0.json")
    assert len(meta["source_item_ids"]) == 2 and meta["writer_model"] == "tiny"


def test_demonstration_sampling_never_takes_held_out_records():
    records = [r for split in fixture_records("varierr").values() for r in split]
    for annotator in ANNOTATORS["varierr"]:
        for k in (1, 3, 50):
            sample = stage.sample_train_records(records, annotator, k, seed=42, purpose="icl")
            assert len(sample) == min(k, 8)
            assert all(r["split"] == "train" and r["annotator"] == annotator for r in sample)
    first = stage.sample_train_records(records, "A0", 3, seed=42, purpose="icl")
    assert stage.sample_train_records(records[::-1], "A0", 3, seed=42, purpose="icl") == first  # file order
    assert stage.sample_train_records(records, "A0", 3, seed=43, purpose="icl") != first


def test_a_train_item_that_is_also_a_test_item_stops_the_stage(tmp_path):
    config, _ = write_fixture_run(tmp_path, leak_item="v10")
    with pytest.raises(common.InputError, match="also a dev/test item"):
        stage.main(["--config", str(config), "--dataset", "varierr"])


def test_unknown_method_is_one_clear_error(tmp_path):
    config, _ = write_fixture_run(tmp_path, baselines__methods=["base", "zero_shot"])
    with pytest.raises(common.InputError, match="zero_shot"):
        stage.main(["--config", str(config), "--dataset", "varierr"])
