"""engine.py: the kit's decoder. Prompts in, new token ids out:

    engine.generate(model, tokenizer, texts, settings, constraint=None) -> [[token id, ...], ...]

`texts` are rendered prompts; `settings` is the profile's `generation:` section with
`autocast_bf16` already resolved for this machine and the run's `seed`. Decoding is greedy
(or seeded sampling) up to and including the end-of-turn token. settings["engine"]: `kit`,
continuous batching with a plain forward loop (rows leave the batch and its KV cache when they
stop, waiting prompts join, a token prefix shared by every prompt is prefilled once and, with
`share_prefix_attention`, kept once and read once per step by all rows); or `generate`, plain
`model.generate` on static left-padded batches. Both give the outputs of one-prompt-at-a-time
`model.generate` (tests/test_engine.py). A ReplyConstraint says how replies must open and end.
Why the kit keeps its own decoder: bench/RESULTS.md, "Generation engine".
"""
from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import patches

ENGINES = ("kit", "generate")


def generate(model, tokenizer, texts: list[str], settings: dict, constraint: ReplyConstraint | None = None,
             desc: str = "generate", progress: bool = True) -> list[list[int]]:
    """New token ids per text, up to and including the end-of-turn token (if one came)."""
    if not texts:
        return []
    if settings["engine"] == "generate":
        return _static_batches(model, tokenizer, texts, settings, constraint)
    return _continuous_batches(model, tokenizer, texts, settings, constraint, desc, progress)


class ReplyConstraint:
    """A reply begins with one of `openings` (texts or token sequences), chosen token by token by
    the model among the tokens that continue some opening (greedy: the most likely path through
    the openings' tokens). After the opening the reply is free; with `end_at_line_break` it ends
    at its first line break. The end-of-turn token is never allowed inside an opening."""

    def __init__(self, tokenizer, openings: list[str | list[int]], end_at_line_break: bool = False):
        sequences = [tuple(o) if not isinstance(o, str) else tuple(tokenizer(o, add_special_tokens=False)["input_ids"])
                     for o in openings]
        if not sequences or not all(sequences):
            raise ValueError("ReplyConstraint needs at least one non-empty opening")
        self.next_tokens: dict[tuple, list[int]] = {}
        for seq in sequences:
            for k in range(len(seq)):
                options = self.next_tokens.setdefault(seq[:k], [])
                if seq[k] not in options:
                    options.append(seq[k])
        self.complete = set(sequences)
        self.lengths = sorted({len(seq) for seq in sequences})
        self.line_breaks = _line_break_ids(tokenizer) if end_at_line_break else frozenset()

    def allowed(self, generated: list[int]) -> list[int] | None:
        """The tokens that may come next, or None once the opening is complete (free)."""
        if len(generated) > self.lengths[-1]:
            return None
        return self.next_tokens.get(tuple(generated))

    def ends(self, generated: list[int]) -> bool:
        """True when the last token is a line break after a complete opening."""
        if not self.line_breaks or not generated or generated[-1] not in self.line_breaks:
            return False
        return any(len(generated) > k and tuple(generated[:k]) in self.complete for k in self.lengths)

    def mask(self, logits, generated: list[list[int]]):
        """`logits` [rows, vocab] with every token outside a row's allowed set at -inf (in place)."""
        for row, tokens in enumerate(generated):
            allowed = self.allowed(tokens)
            if allowed is not None:
                keep = torch.full_like(logits[row], float("-inf"))
                index = torch.tensor(allowed, device=logits.device)
                keep[index] = logits[row, index]
                logits[row] = keep
        return logits


_LINE_BREAK_IDS: dict[tuple, frozenset] = {}


def _line_break_ids(tokenizer) -> frozenset:
    """Ids of the vocabulary's tokens whose text holds a line break (once per tokenizer)."""
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    if key not in _LINE_BREAK_IDS:
        _LINE_BREAK_IDS[key] = frozenset(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))
    return _LINE_BREAK_IDS[key]


@contextlib.contextmanager
def _decoding(settings: dict, device):
    """No gradients, bf16 autocast where asked. Not inference_mode: only outside it does autocast
    keep its bf16 copy of each weight for the whole call (bench/RESULTS.md)."""
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if settings["autocast_bf16"]
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        yield


# ----------------------------------------------------------------------------
# engine: generate, model.generate on static batches
# ----------------------------------------------------------------------------
def _static_batches(model, tokenizer, texts: list[str], settings: dict,
                    constraint: ReplyConstraint | None = None) -> list[list[int]]:
    """Batches of settings["batch_size"] prompts, longest first, left-padded; a batch runs until its
    last row stops. A constraint enters as a logits processor and a stopping criterion."""
    from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                              StoppingCriteriaList)
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    config = {"max_new_tokens": int(settings["max_new_tokens"]), "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, "do_sample": bool(settings["do_sample"])}
    if config["do_sample"]:  # the profile's settings, not the checkpoint's sampling defaults
        config.update(temperature=float(settings["temperature"] or 1.0), top_p=float(settings["top_p"]), top_k=0)
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    batch_size = max(1, int(settings["batch_size"]))
    results: list[list[int]] = [[] for _ in texts]
    # Sampling draws from torch's global generator: seeded for this call, the caller's given back.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(settings.get("seed", 0)))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding=True, padding_side="left",
                                   return_tensors="pt").to(device)
            width = padded["input_ids"].shape[1]
            extra = {}
            if constraint is not None:
                class Constrain(LogitsProcessor):
                    def __call__(self, input_ids, scores):
                        return constraint.mask(scores, input_ids[:, width:].tolist())

                class EndOfLine(StoppingCriteria):
                    def __call__(self, input_ids, scores, **kwargs):
                        return torch.tensor([constraint.ends(ids) for ids in input_ids[:, width:].tolist()],
                                            device=input_ids.device)
                extra = {"logits_processor": LogitsProcessorList([Constrain()]),
                         "stopping_criteria": StoppingCriteriaList([EndOfLine()])}
            with _decoding(settings, device):
                out = model.generate(**padded, generation_config=GenerationConfig(**config), **extra)
            for index, ids in zip(batch, out[:, width:].tolist()):
                ids = _trim_at_eos(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
                if constraint is not None:  # a row that ended at its line break is padded after it
                    ids = next((ids[:k] for k, token in enumerate(ids, 1)
                                if token in constraint.line_breaks and constraint.ends(ids[:k])), ids)
                results[index] = ids
    return results


def _trim_at_eos(ids: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Tokens up to and including the first EOS; trailing padding dropped."""
    if eos_id in ids:
        return ids[:ids.index(eos_id) + 1]
    while ids and ids[-1] == pad_id:
        ids = ids[:-1]
    return ids


# ----------------------------------------------------------------------------
# engine: kit, continuous batching
# ----------------------------------------------------------------------------
def _continuous_batches(model, tokenizer, texts: list[str], settings: dict, constraint: ReplyConstraint | None,
                        desc: str, progress: bool) -> list[list[int]]:
    """Rows leave the batch (and its KV cache) when they stop; waiting prompts join once a quarter
    of the batch is free, prefilled in groups of similar length and merged into the cache,
    left-padded. The prompt pass keeps only the last position's logits; position ids follow the
    attention mask, so greedy outputs match unpadded one-at-a-time model.generate. Sampling draws
    from a generator seeded with settings["seed"]."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    batch_size = max(1, int(settings["batch_size"]))
    max_new_tokens, eos_id = int(settings["max_new_tokens"]), tokenizer.eos_token_id
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(int(settings.get("seed", 0)))

    prefix_len = _shared_prefix_length(encoded) if len(encoded) > 1 else 0
    if prefix_len < int(settings["prefix_cache_min_tokens"]):
        prefix_len = 0
    prefix_cache = shared_prefix = None
    if prefix_len:
        with _decoding(settings, device):
            prefix_cache = model(input_ids=torch.tensor([encoded[0][:prefix_len]], device=device),
                                 past_key_values=patches.new_append_cache(), use_cache=True,
                                 logits_to_keep=1).past_key_values
        # Shared in place where it is most of every row's keys (ICL prompts); a short system prompt
        # ahead of long rows is copied (float32 attention over it would cost more than it saves).
        longest_tail = max(len(ids) for ids in encoded) - prefix_len + max_new_tokens
        if settings["share_prefix_attention"] and prefix_len > longest_tail and _can_share_prefix(model, prefix_cache):
            # float32 once here, not at every step (the attention over it is float32)
            shared_prefix = tuple((layer.keys.float(), layer.values.float()) for layer in prefix_cache.layers)

    def prefill(indices: list[int]) -> _DecodeBatch:
        tails = tokenizer.pad({"input_ids": [encoded[i][prefix_len:] for i in indices]}, padding=True,
                              padding_side="left", return_tensors="pt")
        input_ids = tails["input_ids"].to(device)
        if shared_prefix is not None:  # the rows' own tokens only: the prefix is attended to in place
            mask, cache = tails["attention_mask"].to(device), patches.new_append_cache()
            positions = prefix_len + (mask.cumsum(-1) - 1).clamp(min=0)
            attention = {"attention_mask": _own_tokens_mask(mask, input_ids.shape[1]), "shared_prefix": shared_prefix}
        else:
            mask = torch.cat([torch.ones(len(indices), prefix_len, dtype=torch.long), tails["attention_mask"]],
                             dim=1).to(device)
            cache = patches.new_append_cache()
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(indices))
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            attention = {"attention_mask": mask}
        out = model(input_ids=input_ids, position_ids=positions[:, -input_ids.shape[1]:],
                    past_key_values=cache, use_cache=True, logits_to_keep=1, **attention)
        logits = out.logits[:, -1, :]
        if constraint is not None:
            constraint.mask(logits, [[] for _ in indices])
        return _DecodeBatch(torch.tensor(indices, device=device), _next_tokens(logits, settings, generator),
                            mask, positions[:, -1] + 1, out.past_key_values, shared_prefix)

    tail_lengths = [len(ids) - prefix_len for ids in encoded]
    # Longest first: similar lengths share a prefill (little padding) and memory peaks early.
    pending = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))[::-1]  # pop() takes the longest
    results: list[list[int]] = [[] for _ in texts]
    live: _DecodeBatch | None = None
    shared_attention = SHARED_PREFIX_ATTENTION if shared_prefix is not None else None
    with tqdm(total=len(texts), desc=desc, unit="prompt", leave=False, disable=not progress) as bar, \
            _decoding(settings, device), _attention(model, shared_attention):
        while pending or live is not None:
            free = batch_size - (0 if live is None else len(live.rows))
            mergeable = live is None or patches.cache_mergeable(live.cache)
            if pending and (live is None or (mergeable and free >= max(1, batch_size // 4))):
                joining = [pending.pop() for _ in range(min(free, len(pending)))]  # longest first
                for chunk in _similar_length_chunks(joining, tail_lengths):
                    fresh = prefill(chunk)
                    fresh = fresh.record_and_drop(results, eos_id, max_new_tokens, constraint)  # first tokens
                    bar.update(len(chunk) - (0 if fresh is None else len(fresh.rows)))
                    if fresh is not None:
                        live = fresh if live is None else live.merge(fresh)
                    if live is not None and not patches.cache_mergeable(live.cache):
                        pending.extend(reversed(joining[joining.index(chunk[-1]) + 1:]))  # wait for the next round
                        break
                continue
            live.step(model, settings, generator, constraint, results)
            decoding = len(live.rows)
            live = live.record_and_drop(results, eos_id, max_new_tokens, constraint)
            bar.update(decoding - (0 if live is None else len(live.rows)))
    return results


def _shared_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each to feed the model."""
    shortest = min(len(seq) for seq in sequences)
    first = sequences[0]
    length = 0
    while length < shortest - 1 and all(seq[length] == first[length] for seq in sequences):
        length += 1
    return length


def _similar_length_chunks(indices: list[int], lengths: list[int], slack: float = 1.25) -> list[list[int]]:
    """Split prompts (longest first) into prefill groups padded to at most `slack` x their real tokens."""
    chunks, current, real = [], [], 0
    for index in indices:
        if current and lengths[current[0]] * (len(current) + 1) > slack * (real + lengths[index]):
            chunks.append(current)
            current, real = [], 0
        current.append(index)
        real += lengths[index]
    return chunks + [current] if current else chunks


def _next_tokens(logits, settings: dict, generator):
    """Greedy, or a draw at `temperature` within the `top_p` nucleus."""
    if not settings["do_sample"]:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / float(settings["temperature"] or 1.0), dim=-1)
    top_p = float(settings["top_p"])
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _DecodeBatch:
    """The rows being decoded: prompt index, next input token, attention mask, next position, KV cache."""

    def __init__(self, rows, tokens, mask, next_position, cache, shared_prefix=None):
        self.rows, self.tokens, self.mask, self.next_position, self.cache = rows, tokens, mask, next_position, cache
        self.shared_prefix = shared_prefix  # None: the mask and cache hold the prefix, per row

    def step(self, model, settings: dict, generator, constraint=None, results=None) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        attention = ({"attention_mask": self.mask} if self.shared_prefix is None else
                     {"attention_mask": _own_tokens_mask(self.mask, 1), "shared_prefix": self.shared_prefix})
        out = model(input_ids=self.tokens[:, None], position_ids=self.next_position[:, None],
                    past_key_values=self.cache, use_cache=True, **attention)
        self.cache, self.next_position = out.past_key_values, self.next_position + 1
        logits = out.logits[:, -1, :]
        if constraint is not None:
            constraint.mask(logits, [results[row] for row in self.rows.tolist()])
        self.tokens = _next_tokens(logits, settings, generator)

    def record_and_drop(self, results: list[list[int]], eos_id: int, max_new_tokens: int,
                        constraint=None) -> _DecodeBatch | None:
        """Append each row's new token; rows that stopped leave (None when none is left)."""
        live = []
        for position, (row, token) in enumerate(zip(self.rows.tolist(), self.tokens.tolist())):
            results[row].append(token)
            if (token != eos_id and len(results[row]) < max_new_tokens
                    and not (constraint is not None and constraint.ends(results[row]))):
                live.append(position)
        if not live:
            return None
        if len(live) < len(self.rows):
            keep = torch.tensor(live, device=self.rows.device)
            self.rows, self.tokens, self.mask, self.next_position = (
                self.rows[keep], self.tokens[keep], self.mask[keep], self.next_position[keep])
            self.cache.batch_select_indices(keep)
            first_used = int(self.mask.any(dim=0).long().argmax())  # columns no row attends to go
            if first_used and patches.cache_mergeable(self.cache):
                self.mask = self.mask[:, first_used:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first_used:], layer.values[:, :, first_used:]
        return self

    def merge(self, other: _DecodeBatch) -> _DecodeBatch:
        """Both batches as one: the shorter cache and mask are left-padded (masked out)."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        for batch in (self, other):
            pad = length - batch.mask.shape[1]
            if pad:
                batch.mask = F.pad(batch.mask, (pad, 0))
                for layer in batch.cache.layers:
                    layer.keys, layer.values = F.pad(layer.keys, (0, 0, pad, 0)), F.pad(layer.values, (0, 0, pad, 0))
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys, mine.values = torch.cat([mine.keys, theirs.keys]), torch.cat([mine.values, theirs.values])
        return _DecodeBatch(*(torch.cat([mine, theirs]) for mine, theirs in
                              ((self.rows, other.rows), (self.tokens, other.tokens), (self.mask, other.mask),
                               (self.next_position, other.next_position))), self.cache, self.shared_prefix)


# ----------------------------------------------------------------------------
# Shared-prefix attention: one copy of the prefix's keys and values (system prompt, ICL
# demonstrations), read once per decoding step for all rows (generation.share_prefix_attention)
# ----------------------------------------------------------------------------
SHARED_PREFIX_ATTENTION = "kit_shared_prefix"


def _can_share_prefix(model, prefix_cache) -> bool:
    """Plain full-attention layers whose attention goes through transformers' attention interface."""
    return (patches.cache_mergeable(prefix_cache) and patches.attention_implementation(model) in ("sdpa", "eager")
            and _register_shared_prefix_attention())


@functools.cache
def _register_shared_prefix_attention() -> bool:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask
    AttentionInterface.register(SHARED_PREFIX_ATTENTION, _shared_prefix_attention)
    AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)  # only 4D masks reach it here
    return True


@contextlib.contextmanager
def _attention(model, name: str | None):
    """The model's attention implementation set to `name` for the block (None: left as it is)."""
    if name is None:
        yield
        return
    before = patches.attention_implementation(model)
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _own_tokens_mask(mask, query_length: int):
    """[rows, 1, query, own tokens] boolean mask: a row's own (non-pad) tokens, causally."""
    key_length = mask.shape[1]
    causal = torch.ones(query_length, key_length, dtype=torch.bool, device=mask.device).tril(key_length - query_length)
    return mask.bool()[:, None, None, :] & causal


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             shared_prefix=None, **kwargs):
    """Attention over [the shared prefix, the row's own tokens] with one softmax; the prefix's keys
    and values ([1, kv heads, P, dim], one copy) are read in one product for every row and query
    head. Without `shared_prefix`: transformers' SDPA attention. A prefill (several query positions)
    goes through SDPA over the prefix repeated per row for this call only (faster there;
    bench/RESULTS.md); the cache still keeps only the rows' own tokens."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if shared_prefix is not None and query.shape[2] > 1:
        prefix_keys, prefix_values = shared_prefix[module.layer_idx]
        rows, query_length = query.shape[0], query.shape[2]
        key = torch.cat([prefix_keys.expand(rows, -1, -1, -1).to(key.dtype), key], dim=2)
        value = torch.cat([prefix_values.expand(rows, -1, -1, -1).to(value.dtype), value], dim=2)
        attention_mask = torch.cat([attention_mask.new_ones(rows, 1, query_length, prefix_keys.shape[2]),
                                    attention_mask], dim=-1)
        shared_prefix = None
    if shared_prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    with torch.autocast(query.device.type, enabled=False):  # float32 throughout, as SDPA accumulates
        return _shared_prefix_attention_fp32(module, query.float(), key.float(), value.float(), attention_mask,
                                             scaling, shared_prefix)


def _shared_prefix_attention_fp32(module, query, key, value, attention_mask, scaling, shared_prefix):
    prefix_keys, prefix_values = shared_prefix[module.layer_idx]  # float32 (made so once)
    rows, heads, query_length, dim = query.shape
    kv_heads, prefix_length = key.shape[1], prefix_keys.shape[2]
    grouped = heads // kv_heads * query_length  # the queries that read one key/value head, per row
    scaling = dim ** -0.5 if scaling is None else scaling
    query = query.reshape(rows, kv_heads, grouped, dim)
    by_head = query.transpose(0, 1).reshape(kv_heads, rows * grouped, dim)
    prefix_scores = torch.matmul(by_head, prefix_keys[0].transpose(1, 2))
    prefix_scores = prefix_scores.reshape(kv_heads, rows, grouped, prefix_length).transpose(0, 1)
    own_scores = torch.matmul(query, key.transpose(2, 3))
    own_mask = attention_mask[:, :, None].expand(rows, 1, heads // kv_heads, query_length, key.shape[2])
    own_scores = own_scores.masked_fill(~own_mask.reshape(rows, 1, grouped, key.shape[2]), float("-inf"))
    weights = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1) * scaling, dim=-1)
    prefix_weights = weights[..., :prefix_length].transpose(0, 1).reshape(kv_heads, rows * grouped, prefix_length)
    output = torch.matmul(prefix_weights, prefix_values[0]).reshape(kv_heads, rows, grouped, dim).transpose(0, 1)
    output = output + torch.matmul(weights[..., prefix_length:], value)
    return output.reshape(rows, heads, query_length, dim).transpose(1, 2).contiguous(), None
