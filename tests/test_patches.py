"""patches.py: each private-API patch still finds what it patches, in the version it was written for.

A failure names the patch: re-check that patch against the new library version (or delete it,
if the library now does the job), then update the version pinned here and in requirements.txt.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patches

WRITTEN_FOR = {  # patch -> (package, the version it was written and tested against)
    "lm_head_on_labelled_positions_only": ("trl", "1.16.0"),
    "fingerprint_tokenizer_without_copies": ("datasets", "5.2.0"),
    "reset_accelerate_state": ("accelerate", "1.15.0"),
    "bert_score_in_input_order": ("bert-score", "0.3.13"),
    "append_layer_class": ("transformers", "5.23.0"),
    "attention_implementation": ("transformers", "5.23.0"),
    "silence_library_warnings": ("peft", "0.21.2"),
}


@pytest.mark.parametrize("patch", list(WRITTEN_FOR))
def test_each_patch_meets_the_version_it_was_written_for(patch):
    package, version = WRITTEN_FOR[patch]
    installed = importlib.metadata.version(package)
    assert installed == version, (f"patches.{patch} was written for {package} {version}, but {installed} is "
                                  f"installed: re-check the patch against it")
    assert callable(getattr(patches, patch))


def test_lm_head_on_labelled_positions_only_finds_trls_switch():
    import trl.trainer.utils as trl_utils
    assert callable(getattr(trl_utils, "_use_triton", None)), \
        "patches.lm_head_on_labelled_positions_only: trl.trainer.utils._use_triton is gone"
    try:
        patches.lm_head_on_labelled_positions_only(enabled=False)  # an in-process stage may have left it on
        assert trl_utils._use_triton(torch.device("cpu")) is False  # what the patch is for
        assert patches.lm_head_on_labelled_positions_only() is True
        assert trl_utils._use_triton(torch.device("cpu")) is True
    finally:
        patches.lm_head_on_labelled_positions_only(enabled=False)
    assert trl_utils._use_triton(torch.device("cpu")) is False


def test_fingerprint_tokenizer_without_copies_finds_the_pickler_and_the_copies():
    from datasets.utils import _dill
    from transformers import Qwen2Tokenizer  # a BPE tokenizer built from Python objects, as the hub's are
    assert callable(getattr(_dill, "_save_transformersPreTrainedTokenizerBase", None)), \
        "patches.fingerprint_tokenizer_without_copies: datasets' tokenizer pickler is gone"
    tokenizer = Qwen2Tokenizer(vocab={"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}, merges=[("a", "b")])
    kept = set(patches.TOKENIZER_PYTHON_COPIES) & set(vars(tokenizer))
    assert kept, "patches.fingerprint_tokenizer_without_copies: tokenizers no longer keep Python vocabulary copies"


def test_reset_accelerate_state_finds_the_state_classes():
    from accelerate.state import AcceleratorState, GradientState, PartialState
    for cls in (AcceleratorState, GradientState):
        assert callable(getattr(cls, "_reset_state", None)), f"patches.reset_accelerate_state: {cls.__name__}._reset_state is gone"
    PartialState(cpu=True)
    assert PartialState._shared_state
    patches.reset_accelerate_state()
    assert not PartialState._shared_state, "patches.reset_accelerate_state: the launch's state survives the reset"


def test_append_layer_class_keeps_the_cache_layer_interface(tiny_model):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    for name in ("update", "lazy_initialization", "batch_select_indices", "batch_repeat_interleave"):
        assert hasattr(DynamicLayer, name), f"patches.append_layer_class: DynamicLayer.{name} is gone"
    assert hasattr(DynamicCache(), "layer_class_to_replicate"), \
        "patches.append_layer_class: DynamicCache.layer_class_to_replicate is gone"
    model, tokenizer = tiny_model
    ids = torch.tensor([tokenizer("A short prompt for the cache.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        plain = model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        mine = model(input_ids=ids, past_key_values=patches.new_append_cache(), use_cache=True)
        step = torch.tensor([[5]])
        plain_next = model(input_ids=step, past_key_values=plain.past_key_values, use_cache=True).logits
        mine_next = model(input_ids=step, past_key_values=mine.past_key_values, use_cache=True).logits
    assert isinstance(mine.past_key_values.layers[0], patches.append_layer_class()), \
        "patches.append_layer_class: the cache no longer builds its layers from layer_class_to_replicate"
    assert torch.allclose(plain_next, mine_next, atol=1e-6)
    assert patches.cache_mergeable(mine.past_key_values)


def test_attention_implementation_reads_the_models_setting(tiny_model):
    model, _ = tiny_model
    assert patches.attention_implementation(model) in ("sdpa", "eager"), \
        "patches.attention_implementation: config._attn_implementation no longer names the model's attention"


def test_silence_library_warnings_matches_the_libraries_own_messages():
    import inspect
    import warnings

    import peft.utils.save_and_load
    import transformers.modeling_utils
    assert "will assume that the vocabulary was not modified" in inspect.getsource(peft.utils.save_and_load), \
        "patches.silence_library_warnings: peft's vocabulary warning changed"
    assert "`is_gradient_checkpointing` is deprecated" in inspect.getsource(transformers.modeling_utils), \
        "patches.silence_library_warnings: transformers' deprecation warning changed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patches.silence_library_warnings()
        warnings.warn("Could not find a config file in HuggingFaceTB/SmolLM2-135M-Instruct - will assume that the "
                      "vocabulary was not modified.", UserWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("another warning", UserWarning)
    assert [str(w.message) for w in caught] == ["another warning"]


# One process per hash seed: which batches bert-score embeds, its model stubbed out (shapes only).
BERT_SCORE_BATCHES = """
import collections, json, torch, bert_score.utils as utils, patches
batches = []
def embed(sentences, model, tokenizer, idf_dict, device="cpu", all_layers=False):
    batches.append(list(sentences))
    n = len(sentences)
    return torch.ones(n, 2, 4), torch.ones(n, 2, dtype=torch.long), torch.ones(n, 2)
utils.get_bert_embedding = embed
hyps = [f"output number {i}" for i in range(12)]
refs = [f"reference number {i}" for i in range(12)]
idf = collections.defaultdict(lambda: 1.0)
utils.bert_cos_score_idf(torch.nn.Linear(1, 1), refs, hyps, None, idf, batch_size=5, device="cpu")
plain, batches = batches, []
with patches.bert_score_in_input_order():
    utils.bert_cos_score_idf(torch.nn.Linear(1, 1), refs, hyps, None, idf, batch_size=5, device="cpu")
print(json.dumps({"plain": plain, "patched": batches}))
"""


def test_bert_score_in_input_order_gives_the_same_batches_whatever_the_hash_seed():
    runs = []
    for seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", BERT_SCORE_BATCHES], capture_output=True, text=True, check=True,
                             cwd=Path(patches.__file__).parent, env={**os.environ, "PYTHONHASHSEED": seed})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert len({json.dumps(run["plain"]) for run in runs}) > 1, \
        "patches.bert_score_in_input_order: bert-score's batches no longer depend on the hash seed; delete the patch?"
    assert all(run["patched"] == runs[0]["patched"] for run in runs)
    assert runs[0]["patched"][0] == (["reference number 0", "reference number 1", "reference number 2",
                                      "reference number 3", "reference number 4"])  # first come, first batched
