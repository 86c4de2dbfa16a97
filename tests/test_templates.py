"""The paper models' real tokenizers and chat templates, on stand-ins of their architectures:
what is trained is what is asked (SFT and DPO), generation stops at each template's end of turn,
padding never hides it, and no prompt depends on the day it is rendered.

    CAPO_TOKENIZERS=<folder with qwen3/ and llama3/> .venv/bin/python -m pytest -q tests/test_templates.py

The tokenizer files are not in the repository (CI points CAPO_TOKENIZERS at its copy; each
folder holds a model family's tokenizer.json and tokenizer_config.json, as on the hub). Without
them these tests are skipped. Three templates: Qwen3's (thinking off: an empty think block in the
generation prompt; end of turn <|im_end|>), Llama-3's (<|eot_id|>, no pad token of its own), and
a Llama-3.2-Instruct-style one written here: the real template's system header, whose
`Today Date:` comes from strftime_now() unless `date_string` is given (its tool-calling branches
left out).
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from peft import LoraConfig, get_peft_model

import common
import engine
from conftest import load_stage
from test_sft import NLI, write_fixture

TOKENIZERS = Path(os.environ.get("CAPO_TOKENIZERS", "/nonexistent"))
pytestmark = [pytest.mark.skipif(not (TOKENIZERS / "qwen3").is_dir() or not (TOKENIZERS / "llama3").is_dir(),
                                 reason="CAPO_TOKENIZERS does not point at the qwen3/ and llama3/ tokenizer folders"),
              pytest.mark.usefixtures("one_thread")]
sft = load_stage("04_sft")
capo = load_stage("05_capo")

LLAMA32_STYLE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now(\"%d %b %Y\") %}{%- else %}{%- set date_string = \"26 Jul 2024\" %}"
    "{%- endif %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = \"\" %}{%- endif %}"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}"
    "{{- system_message }}{{- \"<|eot_id|>\" }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

# family: (architecture, tokenizer folder name, end-of-turn token)
FAMILIES = {"qwen3": ("qwen3-4b", "qwen3", "<|im_end|>"),
            "llama3": ("llama3.2-3b", "llama3", "<|eot_id|>"),
            "llama3.2-style": ("llama3.2-3b", "llama3.2-style", "<|eot_id|>")}
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 4}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """The two real folders, and a copy of llama3/ with the Llama-3.2-Instruct-style template."""
    root = tmp_path_factory.mktemp("tokenizers")
    styled = root / "llama3.2-style"
    shutil.copytree(TOKENIZERS / "llama3", styled)
    config = json.loads((styled / "tokenizer_config.json").read_text())
    config["chat_template"] = LLAMA32_STYLE_TEMPLATE
    (styled / "tokenizer_config.json").write_text(json.dumps(config))
    return {"qwen3": TOKENIZERS / "qwen3", "llama3": TOKENIZERS / "llama3", "llama3.2-style": styled}


def stand_in(family: str, tokenizer_dirs) -> dict:
    architecture, folder, _ = FAMILIES[family]
    return {"tag": family, "source": "random", "name_or_path": None, "architecture": architecture,
            "tokenizer": str(tokenizer_dirs[folder]),
            "dtype": "float32", "init_seed": 0, "tiny": TINY}


def toy_config(tmp_path, family, tokenizer_dirs) -> dict:
    """test_sft's invented toy set, with a stand-in of `family` as the profile's model."""
    return common.load_config(write_fixture(tmp_path, models=[stand_in(family, tokenizer_dirs)],
                                            sft__padding_free=False))


def serve_ids(tokenizer, messages) -> list[int]:
    """The prompt tokens the kit's generation feeds the model (common.generate_token_ids)."""
    return tokenizer(common.render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def expected_completion(tokenizer, messages, response: str, end_of_turn: str) -> str:
    """What follows the generation prompt in prompt + response: the response, the end-of-turn token
    and what the template writes after it (ChatML: a line break; Llama-3: nothing)."""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False,
                                         **common.CHAT_TEMPLATE_KWARGS)
    prompt = common.render_prompt(tokenizer, messages)
    assert full.startswith(prompt)
    completion = full[len(prompt):]
    assert completion in (response + end_of_turn, response + end_of_turn + "\n"), completion
    return completion


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stand_in_uses_the_real_tokenizer_and_the_architecture(family, tokenizer_dirs):
    model, tokenizer = common.load_model_and_tokenizer(stand_in(family, tokenizer_dirs), device="cpu")
    architecture, _, end_of_turn = FAMILIES[family]
    assert model.config.model_type == common.STAND_IN_ARCHITECTURES[architecture]["model_type"]
    assert model.config.vocab_size == common.STAND_IN_ARCHITECTURES[architecture]["vocab_size"] >= len(tokenizer)
    assert model.config.hidden_size == TINY["hidden_size"] and model.config.num_hidden_layers == 1
    assert tokenizer.eos_token == end_of_turn and model.generation_config.eos_token_id == tokenizer.eos_token_id
    # A pad token of the vocabulary's own, never the end of turn (padding must not mask the stop)
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id < common.STAND_IN_ARCHITECTURES[architecture]["vocab_size"]
    if family == "qwen3":
        assert common.render_prompt(tokenizer, [{"role": "user", "content": "x"}]).endswith(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_trains_on_the_served_prompt_and_supervises_only_the_response(family, tokenizer_dirs, tmp_path):
    cfg = toy_config(tmp_path, family, tokenizer_dirs)
    model, tokenizer = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
    rows = sft.sft_examples(common.load_split(cfg, "toy", "train"), NLI, "A0")
    trainer = sft.SFTTrainer(model=model, args=sft.sft_config(cfg, tmp_path / "work", has_dev=False),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=sft.lora_config(cfg["sft"]))
    end_of_turn = FAMILIES[family][2]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])  # padded to one length
    for i, row in enumerate(rows[:2]):
        input_ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        real = [t for t, m in zip(input_ids, batch["attention_mask"][i].tolist()) if m]
        supervised = [t for t, label in zip(input_ids, labels) if label != -100]
        prompt = real[:len(real) - len(supervised)]
        assert prompt == serve_ids(tokenizer, row["prompt"])  # trained context == generation context
        assert [label for label in labels if label != -100] == supervised == real[len(prompt):]
        completion = expected_completion(tokenizer, row["prompt"], row["completion"][0]["content"], end_of_turn)
        assert tokenizer.decode(supervised) == completion  # the response and the end of turn, nothing of the prompt
        assert tokenizer.eos_token_id in supervised and "<think>" not in completion
    assert sft.check_supervision(trainer, tokenizer, rows[0]).startswith("Label: ")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dpo_pairs_share_the_served_prompt(family, tokenizer_dirs, tmp_path):
    cfg = toy_config(tmp_path, family, tokenizer_dirs)
    model, tokenizer = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
    sft_path = tmp_path / "sft-adapter"  # an untrained LoRA adapter stands in for 04's
    get_peft_model(model, sft.lora_config(cfg["sft"])).save_pretrained(sft_path)
    pairs = capo.build_pairs(common.load_split(cfg, "toy", "train"), NLI, "A0", "same_label", 1, True)
    trainer, _ = capo.build_trainer(cfg, cfg["models"][0], sft_path, pairs, [], tmp_path / "work")
    end_of_turn = FAMILIES[family][2]
    for row, pair in zip(trainer.train_dataset, pairs):
        assert row["prompt_ids"] == serve_ids(tokenizer, pair["prompt"])
        for side in ("chosen", "rejected"):
            completion = expected_completion(tokenizer, pair["prompt"], pair[side][0]["content"], end_of_turn)
            assert tokenizer.decode(row[f"{side}_ids"]) == completion


@pytest.mark.parametrize("engine_name", ["kit", "generate"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_stops_at_the_end_of_turn(family, engine_name, tokenizer_dirs):
    """A forced reply (`Label: yes`, then the end-of-turn token) ends there for every row of a
    left-padded batch of prompts of different lengths; the text has no special token."""
    model, tokenizer = common.load_model_and_tokenizer(stand_in(family, tokenizer_dirs), device="cpu")
    reply = tokenizer("Label: yes", add_special_tokens=False)["input_ids"]
    constraint = engine.ReplyConstraint(tokenizer, [reply + [tokenizer.eos_token_id]])
    gen_cfg = {"engine": engine_name, "max_new_tokens": 40, "batch_size": 4, "do_sample": False, "temperature": 0.0,
               "prefix_cache_min_tokens": 32, "share_prefix_attention": False, "autocast_bf16": False,
               "constrain_response": False, "top_p": 1.0}
    prompts = [[{"role": "user", "content": "Short."}], [{"role": "user", "content": "A longer question " * 12}]]
    ids = common.generate_token_ids(model, tokenizer, prompts, gen_cfg, constraint=constraint)
    assert ids == [reply + [tokenizer.eos_token_id]] * 2  # stopped at the end of turn, not at max_new_tokens
    assert common.generate_texts(model, tokenizer, prompts, gen_cfg, constraint=constraint) == ["Label: yes"] * 2


class OtherDay(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2031, 3, 14, 9, 26)


def test_prompts_and_predictions_do_not_depend_on_the_date(tokenizer_dirs, monkeypatch, tmp_path):
    model, tokenizer = common.load_model_and_tokenizer(stand_in("llama3.2-style", tokenizer_dirs), device="cpu")
    messages = common.build_messages(NLI, "A0", "A cat sleeps.", "An animal rests.")
    # The template reads the clock unless given a date: unpinned, the prompt changes with the day.
    unpinned = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)]
    monkeypatch.setattr("transformers.utils.chat_template_utils.datetime", OtherDay)
    unpinned.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert unpinned[0] != unpinned[1] and "Today Date: 14 Mar 2031" in unpinned[1]
    monkeypatch.undo()

    requests = [{"dataset": "toy", "item_id": "i0", "annotator": "A0", "messages": messages}]
    gen_cfg = {"engine": "kit", "max_new_tokens": 6, "batch_size": 2, "do_sample": False, "temperature": 0.0,
               "prefix_cache_min_tokens": 32, "share_prefix_attention": False, "autocast_bf16": False,
               "constrain_response": False, "top_p": 1.0}
    seen = []
    for clock in (datetime, OtherDay):
        monkeypatch.setattr("transformers.utils.chat_template_utils.datetime", clock)
        prompt = common.render_prompt(tokenizer, messages)
        predictions = common.generate_predictions(model, tokenizer, requests, NLI, gen_cfg, method="base",
                                                  model_tag="t", seed=0)
        seen.append((prompt, json.dumps(predictions)))
    assert seen[0] == seen[1]
    assert f"Today Date: {common.CHAT_TEMPLATE_KWARGS['date_string']}" in seen[0][0]
    # The pinned date is our choice, recorded with every output
    record = yaml.safe_load(common.save_resolved_config({"seed": 0}, tmp_path, stage="test").read_text())
    assert record["chat_template_kwargs"] == common.CHAT_TEMPLATE_KWARGS


def test_a_missing_stand_in_tokenizer_stops_in_one_line(tmp_path):
    model_cfg = {"tag": "q", "source": "random", "architecture": "qwen3-4b", "tokenizer": str(tmp_path / "none"),
                 "dtype": "float32"}
    with pytest.raises(common.InputError, match="tokenizer .* is neither a folder nor in the local Hugging Face cache"):
        common.load_tokenizer(model_cfg)
