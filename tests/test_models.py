"""Model sources: the paper-shaped random stand-ins (`source: random`) and the check that stops
a stage in one line when a hub model is not in the local cache.

    .venv/bin/python -m pytest -q tests/test_models.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import common
from conftest import ROOT, TOKENIZERS, hf_download, load_stage, write_config

FAKE_HUB_ID = "capo-kit-test/no-such-model"


def layer_shapes(architecture: str) -> dict[str, tuple]:
    """Per-layer weight shapes written out from the architecture's published values."""
    a = common.STAND_IN_ARCHITECTURES[architecture]
    h, i, q, kv = a["hidden_size"], a["intermediate_size"], a["num_attention_heads"] * a["head_dim"], \
        a["num_key_value_heads"] * a["head_dim"]
    shapes = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
              "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
              "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    if a["model_type"] == "qwen3":  # QK-norm over each head
        shapes.update({"self_attn.q_norm.weight": (a["head_dim"],), "self_attn.k_norm.weight": (a["head_dim"],)})
    return shapes


def parameter_count(architecture: str, num_layers: int | None = None) -> int:
    """Parameters of a stand-in by formula (tied embeddings, bias-free projections, RMSNorm
    weights; Qwen3 adds a per-head-dim RMSNorm on queries and keys)."""
    a = common.STAND_IN_ARCHITECTURES[architecture]
    hidden, heads, kv_heads, head_dim = a["hidden_size"], a["num_attention_heads"], a["num_key_value_heads"], a["head_dim"]
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * a["intermediate_size"]  # gate, up, down
    norms = 2 * hidden + (2 * head_dim if a["model_type"] == "qwen3" else 0)
    layers = num_layers or a["num_hidden_layers"]
    return a["vocab_size"] * hidden + layers * (attention + mlp + norms) + hidden


def shapes_of(module) -> dict[str, tuple]:
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


# Totals from the model cards: Qwen3-4B 4.0B parameters, 3.6B without embeddings;
# Llama-3.2-3B(-Instruct) 3.21B.
@pytest.mark.parametrize("architecture, billions, non_embedding_billions, model_class",
                         [("qwen3-4b", 4.02, 3.63, "Qwen3ForCausalLM"),
                          ("llama3.2-3b", 3.21, 2.82, "LlamaForCausalLM")])
def test_stand_in_at_full_depth_has_the_published_shape(architecture, billions, non_embedding_billions,
                                                        model_class):
    a = common.STAND_IN_ARCHITECTURES[architecture]
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(common.stand_in_config({"architecture": architecture}))
    assert type(model).__name__ == model_class
    assert len(model.model.layers) == a["num_hidden_layers"]
    for layer in model.model.layers:
        assert shapes_of(layer) == layer_shapes(architecture)
    count = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert count == parameter_count(architecture)
    assert round(count / 1e9, 2) == billions
    assert round((count - a["vocab_size"] * a["hidden_size"]) / 1e9, 2) == non_embedding_billions
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.rope_parameters["rope_theta"] == a["rope_theta"]


def test_stand_in_builds_on_cpu_at_reduced_depth_and_runs_with_the_kit_tokenizer():
    # any tokenizer folder will do (the real Qwen3 one: tests/test_templates.py); SmolLM2's is here offline
    entry = {"tag": "qwen3-4b", "source": "random", "architecture": "qwen3-4b", "num_layers": 1,
             "tokenizer": str(common.gguf_cache_dir()), "dtype": "bfloat16", "init_seed": 0}
    model, tokenizer = common.load_model_and_tokenizer(entry, device="cpu")
    a = common.STAND_IN_ARCHITECTURES["qwen3-4b"]
    assert len(model.model.layers) == 1 and model.dtype == torch.bfloat16
    assert shapes_of(model.model.layers[0]) == layer_shapes("qwen3-4b")
    assert sum(p.numel() for p in model.parameters()) == parameter_count("qwen3-4b", 1)
    assert model.get_input_embeddings().num_embeddings == a["vocab_size"] > len(tokenizer)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    weights = model.model.layers[0].mlp.up_proj.weight.float()
    assert 0.005 < weights.std().item() < 0.1  # random, not an empty allocation
    prompt = common.render_prompt(tokenizer, [{"role": "user", "content": "Premise: A cat sleeps."}])
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], a["vocab_size"])
    assert torch.isfinite(logits).all()


def test_unknown_stand_in_architecture_is_one_clear_error():
    with pytest.raises(common.InputError, match="architecture: one of qwen3-4b, llama3.2-3b"):
        common.stand_in_config({"tag": "x", "source": "random", "architecture": "gpt5"})


def fake_hub_config(tmp_path, name_or_path=FAKE_HUB_ID):
    path = write_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["models"] = [{"tag": "fake", "source": "hub", "name_or_path": name_or_path, "dtype": "float32"}]
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_a_missing_hub_model_stops_a_model_stage_in_one_line_with_the_download_command(tmp_path):
    config_path = fake_hub_config(tmp_path)
    done = subprocess.run([sys.executable, "03_prompt_baselines.py", "--config", str(config_path),
                           "--dataset", "varierr"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert FAKE_HUB_ID in lines[0] and f".venv/bin/hf download {FAKE_HUB_ID}" in lines[0]
    assert not (tmp_path / "run").exists()  # stopped before any work
    for stage in ("04_sft", "05_capo"):  # the training stages check first too
        with pytest.raises(common.InputError, match=f"{FAKE_HUB_ID} not in the local Hugging Face cache"):
            load_stage(stage).main(["--config", str(config_path), "--dataset", "varierr"])


def fake_snapshot(cache, repo_id, files: dict[str, str]):
    """A Hugging Face cache entry laid out as huggingface_hub writes it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return snapshot


@pytest.mark.skipif(not (TOKENIZERS / "qwen3").is_dir(), reason="needs CAPO_TOKENIZERS (qwen3/)")
def test_a_tokenizer_loads_by_hub_id_from_the_two_fetched_files_and_a_missing_one_is_named(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import
    files = {name: (TOKENIZERS / "qwen3" / name).read_bytes() for name in common.TOKENIZER_FILES}
    hf_download(tmp_path / "hub", "Qwen/Qwen3-4B", files)  # what `hf download <id> <the two files>` leaves
    entry = {"tag": "qwen3-4b", "source": "random", "architecture": "qwen3-4b"}
    tokenizer = common.load_tokenizer(entry)
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) > 150_000
    hf_download(tmp_path / "hub", "Qwen/Half", {"tokenizer.json": files["tokenizer.json"]})
    with pytest.raises(common.InputError, match=r"'Qwen/Half' is neither a folder nor in the local Hugging "
                                                r"Face cache \(tokenizer_config.json missing\); fetch with "
                                                r"`.venv/bin/hf download Qwen/Half "):
        common.load_tokenizer({**entry, "tokenizer": "Qwen/Half"})


def test_a_model_counts_as_present_only_with_its_config_and_every_weight_shard(tmp_path, monkeypatch):
    import huggingface_hub.constants
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    cfg = common.load_config(fake_hub_config(tmp_path))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    snapshot = fake_snapshot(cache, FAKE_HUB_ID, {"config.json": "{}",
                                                  "model.safetensors.index.json": json.dumps(index),
                                                  "model-00001-of-00002.safetensors": "x"})
    assert not common.hub_model_cached(FAKE_HUB_ID)  # an interrupted download: one shard missing
    with pytest.raises(common.InputError, match=f"model\\(s\\) {FAKE_HUB_ID} not in the local"):
        common.require_models(cfg)
    (snapshot / "model-00002-of-00002.safetensors").write_text("x")
    assert common.hub_model_cached(FAKE_HUB_ID)
    common.require_models(cfg)  # no error
    assert not common.hub_model_cached("capo-kit-test/other")


def test_download_list_covers_hub_models_and_a_hub_bertscore_model_only():
    paper = common.load_config(ROOT / "configs" / "paper.yaml")
    assert common.hub_model_ids(paper) == ["Qwen/Qwen3-4B", "meta-llama/Llama-3.2-3B-Instruct"]
    assert common.hub_model_ids(paper, with_metrics=True)[-1] == paper["eval"]["bertscore_model"]
    smoke = common.load_config(ROOT / "configs" / "smoke.yaml")
    assert common.hub_model_ids(smoke, with_metrics=True) == []  # tiny model, packaged scorer
    common.require_models(smoke)
