"""common.py core: config, atomic IO, response format and parser, prompts, models, embedder."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml

import common
from conftest import ROOT, write_config

NLI = common.BUILTIN_TASKS["varierr"]
PAR = common.BUILTIN_TASKS["par"]


# ---------------------------------------------------------------------------- config
def keys(tree, prefix=""):
    """Nested key paths of a config; list entries (models) are compared by their first entry."""
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= keys(value, prefix + key + ".")
    return out


def test_every_profile_parses_and_has_the_same_keys():
    profiles = {p: common.load_config(ROOT / "configs" / f"{p}.yaml") for p in ("paper", "cpu", "smoke")}
    reference = keys(profiles["cpu"])
    for name, cfg in profiles.items():
        assert keys(cfg) == reference, f"{name}.yaml keys differ from cpu.yaml"
        assert cfg["profile"] == name and cfg["run_dir"] == f"runs/{name}"
        for model in cfg["models"]:
            assert model["source"] in ("hub", "gguf", "tiny") and model["tag"]


def test_a_profile_names_its_base_and_changes_keys(tmp_path):
    (tmp_path / "first.yaml").write_text(yaml.safe_dump(common.read_profile(ROOT / "configs" / "smoke.yaml")[0]))
    (tmp_path / "second.yaml").write_text("base: first\nprofile: second\ngeneration: {max_new_tokens: 5}\n")
    cfg = common.load_config(tmp_path / "second.yaml", ["--seed", "3"])
    smoke = common.load_config(ROOT / "configs" / "smoke.yaml")
    assert cfg["config_chain"] == [str(tmp_path / "first.yaml"), str(tmp_path / "second.yaml")]
    assert cfg["profile"] == "second" and cfg["generation"]["max_new_tokens"] == 5 and cfg["seed"] == 3
    assert cfg["generation"]["batch_size"] == smoke["generation"]["batch_size"]  # merged key by key
    assert cfg["models"] == smoke["models"]
    (tmp_path / "first.yaml").write_text("base: second\n")
    with pytest.raises(common.InputError, match="comes back to itself"):
        common.load_config(tmp_path / "second.yaml")
    (tmp_path / "third.yaml").write_text("base: nowhere\n")
    with pytest.raises(common.InputError, match="nowhere.yaml: config file not found"):
        common.load_config(tmp_path / "third.yaml")


@pytest.mark.parametrize("tag, message", [("a/b", "not a usable tag"), (".hidden", "not a usable tag"),
                                          ("", "not a usable tag")])
def test_a_model_tag_that_cannot_name_a_folder_is_refused_in_one_line(tag, message):
    with pytest.raises(common.InputError, match=message):
        common.load_config(ROOT / "configs" / "smoke.yaml", ["--models", f"[{{tag: '{tag}', source: tiny, "
                                                              "name_or_path: null, dtype: float32}]"])
    twice = "{tag: x, source: tiny, name_or_path: null, dtype: float32}"
    with pytest.raises(common.InputError, match="used twice"):
        common.load_config(ROOT / "configs" / "smoke.yaml", ["--models", f"[{twice}, {twice}]"])


def test_a_tag_with_dots_is_a_recipe_section_and_a_changed_value_names_it():
    cfg = common.load_config(ROOT / "configs" / "paper.yaml")
    assert common.config_value(cfg, "models[llama3.2-3b]")["name_or_path"] == "meta-llama/Llama-3.2-3B-Instruct"
    assert common.config_value(cfg, "models[llama3.2-3b].dtype") == "bfloat16"
    made = common.recipe(cfg, "04_sft", [], ("sft", "models[]"), model_tag="llama3.2-3b")
    assert made["config"]["models[llama3.2-3b]"]["tag"] == "llama3.2-3b"
    changed = common.load_config(ROOT / "configs" / "paper.yaml", ["--models", yaml.safe_dump(
        [dict(m, dtype="float32") for m in cfg["models"]], default_flow_style=True)])
    again = common.recipe(changed, "04_sft", [], ("sft", "models[]"), model_tag="llama3.2-3b")
    assert common._first_difference(made, again) == 'config models[llama3.2-3b].dtype was "bfloat16", now "float32"'
    with pytest.raises(ValueError):  # a section that is not one
        common.recipe(cfg, "04_sft", [], ("sft.lora_r",))


def test_a_change_to_the_decoder_or_a_patch_makes_every_stages_outputs_stale(tmp_path, monkeypatch):
    import shutil
    for name in ("03_prompt_baselines.py", *common.KIT_MODULES):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.setattr(common, "KIT_ROOT", tmp_path)
    cfg = common.load_config(ROOT / "configs" / "smoke.yaml")
    made = common.recipe(cfg, "03_prompt_baselines", [], ("generation",))
    assert {"03_prompt_baselines.py", "common.py", "engine.py", "patches.py"} <= set(made["code"])
    for module in ("engine.py", "patches.py"):
        (tmp_path / module).write_text((tmp_path / module).read_text() + "\n# changed\n")
        again = common.recipe(cfg, "03_prompt_baselines", [], ("generation",))
        assert module in common._first_difference(made, again)
        made = again


def test_overrides_are_typed_and_strict():
    cfg = common.load_config(ROOT / "configs" / "smoke.yaml", ["--seed", "7", "--data.max_items=12",
                                                                "--datasets", "[varierr]"])
    assert cfg["seed"] == 7 and cfg["data"]["max_items"] == 12 and cfg["datasets"] == ["varierr"]
    for bad in (["--sede", "1"], ["--data.nope", "1"], ["--seed"], ["seed", "3"]):
        with pytest.raises(common.InputError):
            common.load_config(ROOT / "configs" / "smoke.yaml", bad)


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(common.InputError, match="bad.yaml: not valid YAML"):
        common.load_config(bad)
    missing = tmp_path / "partial.yaml"
    missing.write_text(yaml.safe_dump({"profile": "x", "seed": 1}))
    with pytest.raises(common.InputError, match="partial.yaml: missing config key 'seeds'"):
        common.load_config(missing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(common.InputError, match="empty.yaml: empty or not a mapping"):
        common.load_config(empty)


def yaml_with(tmp_path, **changes) -> Path:
    """configs/smoke.yaml with `section__key` set (a key that is not there is added: a typo)."""
    cfg, _ = common.read_profile(ROOT / "configs" / "smoke.yaml")
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_yaml_typo_is_refused_with_the_nearest_key(tmp_path):
    # Before the schema, `max_itmes` was ignored and the smoke profile ran on all 500 items.
    with pytest.raises(common.InputError, match=r"unknown config key 'data.max_itmes' \(did you mean 'max_items'"):
        common.load_config(yaml_with(tmp_path, data__max_itmes=40))
    with pytest.raises(common.InputError, match=r"unknown config key 'sft.lerning_rate'.*'learning_rate'"):
        common.load_config(yaml_with(tmp_path, sft__lerning_rate=1e-4))


@pytest.mark.parametrize("override, message", [
    (["--seed", "abc"], "seed = 'abc' is not int"),
    (["--sft.epochs", "abc"], "sft.epochs = 'abc' is not float"),
    (["--data.max_items", "ten"], "data.max_items = 'ten' is not int or null"),
    (["--generation.do_sample", "3"], "generation.do_sample = 3 is not bool"),
    (["--datasets", "varierr"], "datasets = 'varierr' is not list"),
    (["--sft.lerning_rate", "1"], r"unknown config key 'sft.lerning_rate' \(did you mean 'sft.learning_rate'"),
])
def test_override_values_are_type_checked(override, message):
    with pytest.raises(common.InputError, match=message):
        common.load_config(ROOT / "configs" / "smoke.yaml", override)


def test_yaml_values_are_type_checked(tmp_path):
    with pytest.raises(common.InputError, match=r"typo.yaml: hlv.folds = 'five' is not int"):
        common.load_config(yaml_with(tmp_path, hlv__folds="five"))
    with pytest.raises(common.InputError, match=r"models\[0\].dtype = None is not str"):
        common.load_config(yaml_with(tmp_path, models=[{"tag": "t", "source": "tiny", "name_or_path": None,
                                                         "dtype": None}]))


def test_an_optional_key_left_out_takes_its_default_from_the_schema_only(tmp_path):
    smoke = ROOT / "configs" / "smoke.yaml"
    assert "top_p" not in yaml.safe_load(smoke.read_text())["generation"]
    default = yaml.safe_load(common.CONFIG_SCHEMA["generation"]["top_p?"].partition(" = ")[2])
    assert common.load_config(smoke)["generation"]["top_p"] == default
    assert common.load_config(smoke, ["--generation.top_p", "0.5"])["generation"]["top_p"] == 0.5
    with pytest.raises(common.InputError, match=r"generation.top_p = 'x' is not float"):
        common.load_config(smoke, ["--generation.top_p", "x"])


def test_a_tiny_model_without_its_size_stops_in_one_line(tiny_model):
    with pytest.raises(common.InputError, match="source tiny needs its size"):
        common.build_tiny_model({"tag": "t", "source": "tiny", "init_seed": 0}, tiny_model[1])


def test_stage_cli_bad_value_is_one_line(tmp_path):
    import subprocess
    result = subprocess.run([sys.executable, str(ROOT / "02_analyze_hlv.py"), "--config",
                             str(ROOT / "configs" / "smoke.yaml"), "--seed", "abc"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {ROOT / 'configs' / 'smoke.yaml'} with the command-line overrides: seed = 'abc' is not int"]


# ---------------------------------------------------------------------------- IO
def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "preds.jsonl"

    def records():
        yield {"a": 1}
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        common.write_jsonl(target, records())
    assert not target.exists() and list(target.parent.iterdir()) == []
    common.write_jsonl(target, [{"a": "é"}, {"b": 2}])
    assert common.read_jsonl(target) == [{"a": "é"}, {"b": 2}]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with common.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with common.atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_outputs_follow_the_umask_and_stale_temps_are_cleaned(tmp_path):
    import os
    import stat
    old = os.umask(0o022)
    try:
        common.write_jsonl(tmp_path / "preds.jsonl", [{"a": 1}])  # was 0600 (mkstemp's mode)
        with common.atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "w.bin").write_bytes(b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "preds.jsonl").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "adapter").stat().st_mode) == 0o755
    # A killed writer left a temp folder and a temp file; the next write of the same path removes them.
    (tmp_path / ".varierr.abc123.tmp").mkdir()
    (tmp_path / ".preds.jsonl.xyz.tmp").write_text("half")
    with common.atomic_dir(tmp_path / "varierr") as tmp:
        (tmp / "train.jsonl").write_text("")
    common.write_jsonl(tmp_path / "preds.jsonl", [{"a": 2}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "preds.jsonl", "varierr"]


def test_ctrl_c_prints_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as stop:
        common.run_stage(interrupted)
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted: ")


def test_manifest_marks_outputs_current_until_an_input_config_or_output_changes(tmp_path):
    cfg = common.load_config(write_config(tmp_path))
    data = common.run_dir(cfg) / "in.jsonl"
    common.write_jsonl(data, [{"a": 1}])
    out = common.run_dir(cfg) / "out.jsonl"
    made_from = common.recipe(cfg, "02_analyze_hlv", [data], ["seed", "hlv"])
    assert common.why_not_current(out, made_from) == "not there yet"
    common.write_jsonl(out, [{"b": 1}])
    assert common.why_not_current(out, made_from).startswith("no manifest")
    common.write_manifest(out, made_from)
    assert common.why_not_current(out, made_from) is None and common.stale_reason(out, cfg) is None
    other_seed = common.load_config(write_config(tmp_path, seed=7))
    assert common.stale_reason(out, other_seed) == "config seed was 42, now 7"
    common.write_jsonl(data, [{"a": 2}])
    assert common.stale_reason(out, cfg) == "input in.jsonl has changed"
    assert common.why_not_current(out, common.recipe(cfg, "02_analyze_hlv", [data], ["seed", "hlv"])) \
        == "input in.jsonl has changed"
    common.write_jsonl(data, [{"a": 1}])
    common.write_jsonl(out, [{"b": "edited by hand"}])
    assert common.why_not_current(out, made_from) == "changed after it was written"
    with pytest.raises(common.InputError, match=r"out.jsonl: not made from .* redo it with: rerun"):
        common.require_current(out, cfg, "rerun")


def test_read_jsonl_names_line_and_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"item_id": "1", "label": "neutral"}\n{"item_id": "2"}\n')
    with pytest.raises(common.InputError, match=r"x.jsonl, line 2, field 'label'"):
        common.read_jsonl(path, required=("item_id", "label"))
    path.write_text('{"item_id": "1"}\nnot json\n')
    with pytest.raises(common.InputError, match=r"x.jsonl, line 2: malformed JSON"):
        common.read_jsonl(path)


# ---------------------------------------------------------------------------- response format
@pytest.mark.parametrize("text,label,explanation", [
    ("Label: entailment\nExplanation: The shop opened at dawn.", "entailment", "The shop opened at dawn."),
    ("label: NEUTRAL\n\nexplanation:   We   cannot tell.  ", "neutral", "We cannot tell."),
    ("<think>\n\n</think>\n\nLabel: **contradiction**\nExplanation: Opposite claims.", "contradiction",
     "Opposite claims."),
    ("Label: contradiction\nExplanation: Opposite.\n\nLabel: neutral\nExplanation: more", "contradiction",
     "Opposite."),
])
def test_parser_accepts_the_format(text, label, explanation):
    assert common.parse_response(text, NLI) == (label, explanation, True)


@pytest.mark.parametrize("text", [
    "", "entailment", "Label: entailment", "Explanation: only reasons",
    "Label: maybe\nExplanation: unsure", "Label: entailment\nExplanation:   ",
    "The answer is Label: entailment\nExplanation: x", "Label: entailment, neutral\nExplanation: both",
    "\x00\x01 garbage ### Label", None,
])
def test_parser_rejects_garbage(text):
    assert common.parse_response(text, NLI) == (None, None, False)


@pytest.mark.parametrize("text,expected", [
    ("Label: 4\nExplanation: Same question.", 4), ("Label: -5\nExplanation: Unrelated.", -5),
    ("Label: +2\nExplanation: Close.", 2), ("Label: 6\nExplanation: too high", None),
    ("Label: 2.5\nExplanation: halfway", None), ("Label: four\nExplanation: words", None),
])
def test_parser_scores(text, expected):
    label, _, ok = common.parse_response(text, PAR)
    assert label == expected and ok == (expected is not None)


def test_format_then_parse_round_trips():
    for task, label in ((NLI, "neutral"), (PAR, -3)):
        text = common.format_response(label, "A short reason.")
        assert common.parse_response(text, task) == (label, "A short reason.", True)


def test_normalize_label():
    assert common.normalize_label(" Entailment ", NLI) == "entailment"
    assert common.normalize_label("idk", NLI) is None
    assert common.normalize_label("-5", PAR) == -5 and common.normalize_label(True, PAR) is None
    assert common.normalize_label(5.0, PAR) == 5 and common.normalize_label(11, PAR) is None


# ---------------------------------------------------------------------------- prompts
QWEN3_STYLE_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


def test_prompt_rendering_applies_template(tiny_model):
    _, tokenizer = tiny_model
    demo = {"text_a": "Cats purr.", "text_b": "Cats make sounds.", "label": "entailment",
            "explanation": "Purring is a sound."}
    messages = common.build_messages(NLI, "A2", "A dog barks.", "An animal is loud.",
                                     profile="Short, literal reasons.", demonstrations=[demo])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "annotator A2" in messages[0]["content"] and "Short, literal reasons." in messages[0]["content"]
    assert messages[2]["content"] == "Label: entailment\nExplanation: Purring is a sound."
    prompt = common.render_prompt(tokenizer, messages)
    assert prompt.startswith("<|im_start|>system\nYou are annotator A2.")
    assert prompt.endswith("<|im_start|>assistant\n")  # generation prompt present
    assert "Hypothesis: An animal is loud." in prompt and "SmolLM" not in prompt  # no default system prompt


def test_qwen3_style_template_renders_with_thinking_off(tiny_model):
    _, tokenizer = tiny_model
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
        prompt = common.render_prompt(tokenizer, common.build_messages(PAR, "Ann1", "Q one?", "Q two?"))
    finally:
        tokenizer.chat_template = original
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# ---------------------------------------------------------------------------- models
def test_tiny_model_forward_and_pad_token(tiny_model):
    model, tokenizer = tiny_model
    assert tokenizer.pad_token_id != tokenizer.eos_token_id and tokenizer.padding_side == "left"
    batch = tokenizer(["Label: neutral", "Explanation: a longer line of text"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    assert torch.isfinite(out.loss)


def test_tiny_model_is_seeded():
    cfg = common.load_config(ROOT / "configs" / "smoke.yaml")
    a, _ = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
    b, _ = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_smollm2_gguf_loads_offline_and_generates():
    cfg = common.load_config(ROOT / "configs" / "cpu.yaml")
    model, tokenizer = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
    assert model.config.num_hidden_layers == 30 and "quantization_config" not in model.config.to_dict()
    assert (common.gguf_cache_dir() / "model.safetensors").exists()
    prompt = common.render_prompt(tokenizer, [{"role": "user", "content": "What colour is the sky?"}])
    ids = tokenizer([prompt], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
    assert "sky" in text.lower() or "blue" in text.lower()  # a real instruct model, not noise


# ---------------------------------------------------------------------------- embedder
def test_embedder_loads_offline_and_caches(tmp_path):
    cfg = common.load_config(ROOT / "configs" / "smoke.yaml")
    texts = ["The cat sleeps on the mat.", "A cat is sleeping on a rug.", "Stock prices fell sharply."]
    vectors = common.embed_texts(cfg, texts, cache_dir=tmp_path)
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # meaning, not noise
    assert len(list(tmp_path.glob("emb-*.npy"))) == 1
    again = common.embed_texts(cfg, texts, cache_dir=tmp_path)
    assert np.array_equal(vectors, again)


def test_config_hash_is_stable_and_sensitive():
    assert common.config_hash({"a": 1, "b": 2}) == common.config_hash({"b": 2, "a": 1})
    assert common.config_hash({"a": 1}) != common.config_hash({"a": 2})
    json.dumps(common.package_versions())


def test_hub_source_loads_a_local_stand_in_in_bf16(tiny_model, tmp_path):
    """The paper profile's code path (source: hub), exercised with the tiny model saved locally."""
    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = common.load_model_and_tokenizer(
        {"tag": "stand-in", "source": "hub", "name_or_path": str(tmp_path), "dtype": "bfloat16"}, device="cpu")
    assert loaded.dtype == torch.bfloat16 and loaded_tok.pad_token_id != loaded_tok.eos_token_id
    ids = tokenizer(["Label: neutral"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits
        got = loaded(**ids).logits.float()
    assert torch.allclose(expected, got, atol=0.05, rtol=0.05)


def test_stage_arguments_apply_the_profiles_torch_threads(tmp_path):
    torch.set_num_threads(3)  # restored after the test (conftest)
    parser = common.stage_parser("test")
    _, cfg = common.parse_stage_args(parser, ["--config", str(write_config(tmp_path)), "--torch_threads", "1"])
    assert cfg["torch_threads"] == 1 and torch.get_num_threads() == 1


@pytest.mark.parametrize("native", [True, False])
def test_bf16_settings_apply_only_where_the_hardware_computes_bf16(monkeypatch, capsys, native):
    """On a CPU without AVX512-BF16/AMX, torch emulates bf16 (100x slower matmuls measured on an
    AVX2 machine): the profile's bf16 settings fall back to float32 there, with one line, and the
    stages' recipes record which it was (so a run directory moved between the two redoes them)."""
    cfg = common.load_config(ROOT / "configs" / "cpu.yaml")
    monkeypatch.setattr(common, "native_bf16", lambda: native)
    monkeypatch.setattr(common, "_BF16_FALLBACK_SAID", set())
    assert common.trainer_args(cfg, "sft")["bf16"] is native
    assert common.trainer_args(cfg, "capo")["bf16"] is native
    import engine
    seen = {}
    monkeypatch.setattr(engine, "generate", lambda model, tokenizer, texts, settings, *args, **kwargs:
                        seen.update(settings) or [])
    common.generate_token_ids(None, None, ["a rendered prompt"], cfg["generation"])
    assert seen["autocast_bf16"] is native  # what the decoder is told (engine._decoding autocasts on it)
    common.trainer_args(cfg, "sft")  # said once per setting, not per call
    said = capsys.readouterr().out
    assert said.count("float32 instead") == (0 if native else 3)
    recipe = common.adapter_predictions_recipe(cfg, "04_sft", "varierr", cfg["models"][0], ROOT / "README.md")
    assert recipe["bf16_native"] is native
