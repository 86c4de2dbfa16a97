"""patches.py: every use of a pinned library's private API, in one place.

Each patch names the version it was written against (requirements.txt pins them) and what goes
wrong without it. tests/test_patches.py fails, naming the patch, when a library changes under
one; then re-check the patch against the new version, or delete it if the library now does
the job.
"""
from __future__ import annotations

import contextlib
import functools


# ---- trl 1.16 (trl.trainer.utils._use_triton): the losses' LM head on labelled positions only.
# trl projects only the response positions through its fused LM head on CUDA/XPU, every position
# elsewhere. On a CPU the prompt's positions (most of an example) would go through the LM head
# only to be masked out: same log-probs and gradients, slower steps (bench/RESULTS.md).
def lm_head_on_labelled_positions_only(enabled: bool = True) -> bool:
    """Let trl's fused LM head skip unlabelled positions on a CPU too; returns whether it does."""
    import trl.trainer.utils as trl_utils
    current = getattr(trl_utils, "_use_triton", None)
    if current is None:
        return False
    original = getattr(current, "trl_original", current)
    if not enabled:
        trl_utils._use_triton = original
        return False

    def labelled_positions_only(device) -> bool:
        return device.type == "cpu" or original(device)

    labelled_positions_only.trl_original = original
    trl_utils._use_triton = labelled_positions_only
    return True


# ---- datasets 5.2 (datasets.utils._dill) with transformers 5.23 tokenizers (`_vocab`, `_merges`).
# trl's Dataset.map pickles the tokenizer to fingerprint each map. A transformers 5 tokenizer keeps
# its vocabulary twice, in the Rust backend and as Python objects; pickling the Python copies of
# a 150k-word vocabulary takes seconds per map. The backend holds the same content, so the
# fingerprint still changes whenever the tokenizer does (tests/test_sft.py).
TOKENIZER_PYTHON_COPIES = ("_vocab", "_merges")


def fingerprint_tokenizer_without_copies(tokenizer) -> bool:
    """Let `datasets` fingerprint `tokenizer` without its Python vocabulary copies; returns whether it does."""
    try:
        from datasets.utils import _dill
        save_tokenizer = _dill._save_transformersPreTrainedTokenizerBase
    except (ImportError, AttributeError):  # another datasets: its own fingerprint stays
        return False

    def save_without_copies(pickler, obj):
        hidden = {key: obj.__dict__.pop(key) for key in TOKENIZER_PYTHON_COPIES if key in obj.__dict__}
        try:
            save_tokenizer(pickler, obj)
        finally:
            obj.__dict__.update(hidden)

    _dill.pklregister(type(tokenizer))(save_without_copies)
    return True


# ---- accelerate 1.15 (AcceleratorState._reset_state, GradientState._reset_state).
# A process of a launch that trains an adapter alone (04/05's default) must look like a plain
# `python` process to the trainer: accelerate caches the launch's state in class attributes, so
# without a reset the trainer wraps the model for DDP and waits for the other processes.
def reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ---- bert-score 0.3.13 (bert_score.utils' module-level `set`): BERTScore the same on every run.
# bert_cos_score_idf batches its sentences as `sorted(list(set(...)), key=word count)`: ties keep
# the set's order, which Python's per-process string hashing changes from run to run. Other
# batches pad differently, and F1 moves in its last float32 digits (06's metrics.json and
# tables/results.csv then differ between two runs of the same inputs). Inside the block, the
# set keeps the order in which the sentences first came, so the batches are the same every run.
@contextlib.contextmanager
def bert_score_in_input_order():
    import bert_score.utils as bert_score_utils
    bert_score_utils.set = lambda items: list(dict.fromkeys(items))  # found before builtins' set
    try:
        yield
    finally:
        del bert_score_utils.set


# ---- transformers 5.23 (cache_utils.DynamicLayer internals: keys/values, lazy_initialization;
# DynamicCache.layer_class_to_replicate). The decoder's KV cache appends new keys and values into
# spare room instead of concatenating the whole cache every step: with ICL prompts of thousands
# of tokens the per-step copy cost more than the model (bench/RESULTS.md). Without it: the
# decoder's outputs stay the same, it is slower.
@functools.cache
def append_layer_class():
    """A DynamicLayer whose `keys`/`values` are views of a buffer grown by half when full."""
    from transformers.cache_utils import DynamicLayer

    def filled(name):
        def get(self):
            buffer = getattr(self, f"_{name}_buffer", None)
            return buffer if buffer is None or buffer.dim() != 4 else buffer[:, :, :getattr(self, f"_{name}_length")]

        def set_(self, tensor):  # assignments (batch selection, merging, trimming) replace the buffer
            setattr(self, f"_{name}_buffer", tensor)
            setattr(self, f"_{name}_length", tensor.shape[-2] if tensor is not None and tensor.dim() == 4 else 0)
        return property(get, set_)

    class AppendLayer(DynamicLayer):
        keys, values = filled("keys"), filled("values")

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            for name, new in (("keys", key_states), ("values", value_states)):
                buffer, length = getattr(self, f"_{name}_buffer"), getattr(self, f"_{name}_length")
                needed = length + new.shape[-2]
                if buffer.dim() != 4 or buffer.shape[-2] < needed:
                    grown = new.new_empty(*new.shape[:2], max(needed * 3 // 2, 32), new.shape[-1])
                    grown[:, :, :length] = buffer[:, :, :length] if length else grown[:, :, :0]
                    buffer = grown
                buffer[:, :, length:needed] = new
                setattr(self, f"_{name}_buffer", buffer)
                setattr(self, f"_{name}_length", needed)
            return self.keys, self.values

    return AppendLayer


def new_append_cache():
    from transformers import DynamicCache
    cache = DynamicCache()
    cache.layer_class_to_replicate = append_layer_class()
    return cache


def cache_mergeable(cache) -> bool:
    """Plain full-attention layers (keys/values [batch, heads, length, dim]) can be padded and merged."""
    from transformers.cache_utils import DynamicLayer
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in layers)


# ---- transformers 5.23 (PretrainedConfig._attn_implementation; no public getter): the decoder's
# shared-prefix attention applies to models whose attention is SDPA or eager. Without it: the
# decoder cannot tell, and would have to copy the prefix into every row (slower, same outputs).
def attention_implementation(model) -> str:
    return model.config._attn_implementation


# ---- peft 0.21 and trl 1.16 read PreTrainedModel.is_gradient_checkpointing, which transformers
# 5.23 deprecates for is_activation_checkpointing: the FutureWarning is theirs, not the kit's
# (the kit passes activation_checkpointing). peft 0.21's save_pretrained looks for the base model's
# config on the hub to learn whether the vocabulary was resized; offline it warns and assumes it
# was not, which holds: the kit never resizes it. Without this: warnings in every training log.
def silence_library_warnings() -> None:
    import warnings
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Could not find a config file in .* will assume that the vocabulary "
                                              "was not modified", category=UserWarning)
