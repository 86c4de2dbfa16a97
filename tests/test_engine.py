"""engine.py, the decoder, through its one door (common.generate_token_ids): padding correctness
(batched greedy == one-at-a-time greedy) of both engines (the kit's continuous batching and
model.generate on static batches), the shared-prefix KV cache and attention, reply constraints,
seeded sampling; and the prediction records built from its outputs (request building, record
shape and order, the parser over real outputs of the smoke model)."""
from __future__ import annotations

import copy

import pytest
import torch

import common
import engine

TASK_NLI = {"label_type": "categorical", "labels": ["entailment", "neutral", "contradiction"],
            "text_a_name": "Premise", "text_b_name": "Hypothesis",
            "instruction": "Decide whether the hypothesis follows from the premise."}
TASK_PAR = {"label_type": "numeric", "score_range": [-5, 5], "text_a_name": "Question 1",
            "text_b_name": "Question 2", "instruction": "Rate how well the questions paraphrase each other."}

SENTENCES = [
    ("A violinist tunes her instrument on the pier.", "Someone is preparing to play music."),
    ("Two dogs chase a red ball across the lawn.", "The animals are asleep."),
    ("The bakery closes early on Sundays.", "Bread can be bought late on Sunday evening."),
    ("He painted the fence blue last summer.", "The fence has a colour."),
    ("The committee postponed its vote until spring.", "A decision was delayed."),
    ("Snow covered the mountain pass overnight.", "The road may be hard to cross this morning."),
    ("A child laughs at a puppet show.", "Nobody is watching the show."),
]


def record(item_id, annotator, text_a, text_b, label="neutral", split="test"):
    return {"dataset": "toy", "item_id": item_id, "split": split, "annotator": annotator,
            "text_a": text_a, "text_b": text_b, "label": label, "explanation": "Because.", "valid": None}


def gen_cfg(**changes):
    cfg = {"engine": "kit", "batch_size": 4, "max_new_tokens": 12, "do_sample": False,
           "temperature": 0.0, "autocast_bf16": False, "prefix_cache_min_tokens": 32,
           "share_prefix_attention": True, "constrain_response": False, "top_p": 1.0}
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def varied_model(tiny_model):
    """The smoke model with larger seeded weights, so greedy outputs differ between prompts.

    (The smoke model itself echoes the last prompt token, so every prompt would agree.)"""
    model, tokenizer = tiny_model
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model.eval(), tokenizer


def one_at_a_time(model, tokenizer, prompts, cfg):
    from transformers import GenerationConfig
    generation_config = GenerationConfig(max_new_tokens=int(cfg["max_new_tokens"]), do_sample=False,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    outputs = []
    for messages in prompts:
        inputs = tokenizer(common.render_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=generation_config)
        outputs.append(engine._trim_at_eos(out[0, inputs["input_ids"].shape[1]:].tolist(),
                                           tokenizer.eos_token_id, tokenizer.pad_token_id))
    return outputs


def varied_prompts(count=7, icl=False):
    """Different annotators and items give prompts of different lengths (real padding). icl: one
    annotator's prompts with the same three demonstrations, a shared prefix longer than each
    prompt's own tokens (what generation.share_prefix_attention shares)."""
    if icl:
        demos = [record(f"d{i}", "A1", a, b, label="entailment", split="train")
                 for i, (a, b) in enumerate(SENTENCES[-3:])]
        return [common.build_messages(TASK_NLI, "A1", a + " " + ("Indeed. " * (i % 4)), b, demonstrations=demos)
                for i, (a, b) in enumerate(SENTENCES[:count])]
    return [common.build_messages(TASK_NLI, f"A{i % 3}", a + " " * 0 + ("Indeed. " * (i % 4)), b)
            for i, (a, b) in enumerate(SENTENCES[:count])]


def test_annotator_requests_one_per_distinct_item_sorted():
    records = [record("i3", "A1", *SENTENCES[2]), record("i1", "A1", *SENTENCES[0]),
               record("i1", "A1", *SENTENCES[0], label="entailment"),  # two labels, one item
               record("i2", "A2", *SENTENCES[1])]
    requests = common.annotator_requests(records, TASK_NLI, "A1")
    assert [r["item_id"] for r in requests] == ["i1", "i3"]
    assert all(r["annotator"] == "A1" and r["dataset"] == "toy" for r in requests)
    assert requests[0]["messages"] == common.build_messages(TASK_NLI, "A1", *SENTENCES[0])
    with_profile = common.annotator_requests(records, TASK_NLI, "A1", profile="Likes neutral.")
    assert "Likes neutral." in with_profile[0]["messages"][0]["content"]
    assert common.annotator_requests(records, TASK_NLI, "A9") == []


def test_generate_predictions_records_in_request_order(varied_model):
    model, tokenizer = varied_model
    requests = [{"dataset": "toy", "item_id": f"q{i}", "annotator": f"A{i % 3}", "messages": m}
                for i, m in enumerate(varied_prompts())]
    requests = requests[::-1]  # not in length or id order
    predictions = common.generate_predictions(model, tokenizer, requests, TASK_NLI, gen_cfg(batch_size=3),
                                              method="base", model_tag="tiny", seed=5)
    assert [p["item_id"] for p in predictions] == [r["item_id"] for r in requests]
    assert [p["annotator"] for p in predictions] == [r["annotator"] for r in requests]
    for prediction in predictions:
        assert tuple(prediction) == common.PREDICTION_FIELDS
        assert (prediction["method"], prediction["model"], prediction["seed"]) == ("base", "tiny", 5)
        assert isinstance(prediction["output"], str)
        assert prediction["parse_ok"] is False and prediction["label"] is None  # random weights: garbage
    # Each record carries its own prompt's output: the same prompt alone gives the same text.
    alone = common.generate_texts(model, tokenizer, [requests[2]["messages"]], gen_cfg())
    assert alone[0] == predictions[2]["output"]
    assert common.generate_predictions(model, tokenizer, [], TASK_NLI, gen_cfg(), method="base",
                                       model_tag="tiny", seed=5) == []


# The three ways the kit's decoder treats a shared prompt prefix: attended to in place, one copy
# for every row (share_prefix_attention); prefilled once and copied into every row; not shared.
# (on varied_prompts(icl=True): a shared prefix of demonstrations)
PREFIX_MODES = {"shared-prefix": {"prefix_cache_min_tokens": 32, "share_prefix_attention": True},
                "prefix-copied": {"prefix_cache_min_tokens": 32, "share_prefix_attention": False},
                "no-prefix-cache": {"prefix_cache_min_tokens": 10**9, "share_prefix_attention": True}}


@pytest.fixture
def shared_prefix_calls(monkeypatch):
    """Counts attention calls that read a shared prefix (so a test knows that path ran)."""
    calls = []
    original = engine._shared_prefix_attention

    def spy(*args, shared_prefix=None, **kwargs):
        calls.append(shared_prefix is not None)
        return original(*args, shared_prefix=shared_prefix, **kwargs)
    from transformers import AttentionInterface
    engine._register_shared_prefix_attention()
    monkeypatch.setitem(AttentionInterface._global_mapping, engine.SHARED_PREFIX_ATTENTION, spy)
    return calls


@pytest.mark.parametrize("mode", list(PREFIX_MODES))
def test_batched_greedy_equals_one_at_a_time(varied_model, mode, shared_prefix_calls):
    model, tokenizer = varied_model
    prompts = varied_prompts(icl=True)
    cfg = gen_cfg(batch_size=4, **PREFIX_MODES[mode])
    single = one_at_a_time(model, tokenizer, prompts, cfg)
    assert len({tuple(ids) for ids in single}) > 2, "the test model must give different outputs"
    lengths = {len(tokenizer(common.render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"])
               for p in prompts}
    assert len(lengths) > 2, "prompts of different lengths are needed to exercise padding"
    assert common.generate_token_ids(model, tokenizer, prompts, cfg) == single
    assert any(shared_prefix_calls) == (mode == "shared-prefix")


@pytest.mark.parametrize("query_length", [1, 3], ids=["decoding step", "prefill"])
def test_shared_prefix_attention_equals_attention_over_the_whole_sequence(query_length):
    """One softmax over [the prefix, the row's own tokens], the prefix stored once, is SDPA over
    per-row copies of the prefix followed by the row's tokens (grouped query heads, padding;
    a decoding step takes the float32 product, a prefill SDPA over the prefix repeated)."""
    from types import SimpleNamespace
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, dim, prefix_length, own_length = 3, 6, 2, 8, 7, 5
    prefix_keys, prefix_values = (torch.randn(1, kv_heads, prefix_length, dim, generator=generator) for _ in "kv")
    keys, values = (torch.randn(rows, kv_heads, own_length, dim, generator=generator) for _ in "kv")
    query = torch.randn(rows, heads, query_length, dim, generator=generator)
    own = torch.ones(rows, own_length, dtype=torch.long)
    own[1, :2] = 0  # left padding
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    mine, _ = engine._shared_prefix_attention(module, query, keys, values, engine._own_tokens_mask(own, query_length),
                                              scaling=0.3, shared_prefix=[(prefix_keys, prefix_values)])
    whole_mask = engine._own_tokens_mask(torch.cat([torch.ones(rows, prefix_length, dtype=torch.long), own], 1),
                                         query_length)
    reference, _ = sdpa_attention_forward(module, query, torch.cat([prefix_keys.expand(rows, -1, -1, -1), keys], 2),
                                          torch.cat([prefix_values.expand(rows, -1, -1, -1), values], 2),
                                          whole_mask, scaling=0.3)
    assert mine.shape == reference.shape == (rows, query_length, heads, dim)
    assert torch.allclose(mine, reference, atol=1e-5)


def test_shared_prefix_of_icl_prompts_is_cached_and_equivalent(varied_model):
    model, tokenizer = varied_model
    demos = [record(f"d{i}", "A1", a, b, label="entailment", split="train") for i, (a, b) in enumerate(SENTENCES[:3])]
    prompts = [common.build_messages(TASK_NLI, "A1", a, b, demonstrations=demos) for a, b in SENTENCES[3:]]
    encoded = [tokenizer(common.render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    assert engine._shared_prefix_length(encoded) > 100  # system prompt + demonstrations
    cfg = gen_cfg(batch_size=3)
    single = one_at_a_time(model, tokenizer, prompts, cfg)
    for share in (True, False):
        assert common.generate_token_ids(model, tokenizer, prompts, dict(cfg, share_prefix_attention=share)) == single


def test_shared_prefix_length_leaves_one_token():
    assert engine._shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert engine._shared_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert engine._shared_prefix_length([[9], [9, 1]]) == 0
    assert engine._shared_prefix_length([[1, 2], [3, 2]]) == 0


def test_generation_stops_at_end_of_turn_and_counts_no_padding():
    eos, pad = 2, 0
    assert engine._trim_at_eos([5, 6, eos, pad, pad], eos, pad) == [5, 6, eos]
    assert engine._trim_at_eos([5, 6, pad, pad], eos, pad) == [5, 6]
    assert engine._trim_at_eos([eos, 7], eos, pad) == [eos]


def test_rendered_string_prompts_give_the_same_texts(varied_model):
    model, tokenizer = varied_model
    prompts = varied_prompts(3)
    texts = common.generate_texts(model, tokenizer, prompts, gen_cfg())
    rendered = [common.render_prompt(tokenizer, p) for p in prompts]
    assert common.generate_texts(model, tokenizer, rendered, gen_cfg()) == texts
    assert common.generate_texts(model, tokenizer, [], gen_cfg()) == []


def test_generate_engine_gives_the_same_greedy_outputs(varied_model):
    """generation.engine: generate (model.generate on static left-padded batches) against
    one-at-a-time generation and the kit's decoder."""
    model, tokenizer = varied_model
    prompts = varied_prompts()
    cfg = gen_cfg(batch_size=3)
    single = one_at_a_time(model, tokenizer, prompts, cfg)
    assert common.generate_token_ids(model, tokenizer, prompts, dict(cfg, engine="generate")) == single
    assert common.generate_token_ids(model, tokenizer, prompts, cfg) == single
    with pytest.raises(common.InputError, match="generation.engine: unknown engine 'vllm'"):
        common.generate_token_ids(model, tokenizer, prompts, dict(cfg, engine="vllm"))


def test_generate_engine_sampling_is_seeded_and_keeps_the_callers_random_stream(varied_model):
    model, tokenizer = varied_model
    prompts = varied_prompts(4)
    cfg = gen_cfg(engine="generate", do_sample=True, temperature=1.5, top_p=0.95, max_new_tokens=8)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    first = common.generate_token_ids(model, tokenizer, prompts, dict(cfg, seed=1))
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is left as it was
    assert common.generate_token_ids(model, tokenizer, prompts, dict(cfg, seed=1)) == first
    assert common.generate_token_ids(model, tokenizer, prompts, dict(cfg, seed=2)) != first


def test_bf16_autocast_runs_and_mostly_agrees(varied_model):
    model, tokenizer = varied_model
    prompts = varied_prompts(4)
    fp32 = common.generate_token_ids(model, tokenizer, prompts, gen_cfg(max_new_tokens=4))
    bf16 = common.generate_token_ids(model, tokenizer, prompts, gen_cfg(max_new_tokens=4, autocast_bf16=True))
    assert len(bf16) == len(fp32) and all(0 < len(ids) <= 4 for ids in bf16)
    assert sum(a[0] == b[0] for a, b in zip(fp32, bf16)) >= 2  # first token agrees on most prompts


def test_parser_over_real_smoke_model_outputs(tiny_model, varied_model):
    """Garbage from the smoke model (and worse) parses as parse_ok False, never a crash."""
    outputs = []
    for model, tokenizer in (tiny_model, varied_model):
        prompts = varied_prompts(4) + [common.build_messages(TASK_PAR, "Ann1", *SENTENCES[0])]
        outputs += common.generate_texts(model, tokenizer, prompts, gen_cfg(max_new_tokens=24))
    outputs += ["", "\n\n\n", "Label:", "Label: maybe\nExplanation: unsure", "Explanation: first\nLabel: neutral",
                "Label: 12\nExplanation: out of range", "Label: 2.5\nExplanation: not an integer",
                "Label: neutral\nExplanation:   ", "\x00\ufffd" * 50, "Label: " + "e" * 10000]
    for task in (TASK_NLI, TASK_PAR):
        for text in outputs:
            label, explanation, parse_ok = common.parse_response(text, task)
            assert parse_ok is False and label is None and explanation is None, text[:80]
    # The parser is not simply always False: well-formed answers parse.
    assert common.parse_response("Label: Neutral\nExplanation: Not said.\n\nmore", TASK_NLI) == ("neutral", "Not said.", True)
    assert common.parse_response("Label: -3\nExplanation: Different topics.", TASK_PAR) == (-3, "Different topics.", True)


def test_peft_model_generates_like_one_at_a_time(varied_model):
    """A model with a LoRA adapter (as 04/05 pass it) goes through the same batched path."""
    from peft import LoraConfig, get_peft_model
    model, tokenizer = varied_model
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    prompts = varied_prompts(5)
    cfg = gen_cfg(batch_size=3, prefix_cache_min_tokens=16)
    single = one_at_a_time(peft_model, tokenizer, prompts, cfg)
    assert single != one_at_a_time(model, tokenizer, prompts, cfg)  # the adapter matters
    for share in (True, False):
        assert common.generate_token_ids(peft_model, tokenizer, prompts, dict(cfg, share_prefix_attention=share)) == single
    assert peft_model.config._attn_implementation == model.config._attn_implementation  # restored


def test_rows_leave_and_waiting_prompts_join_without_changing_outputs(varied_model, monkeypatch, shared_prefix_calls):
    """Continuous batching: rows that stop early free their slot for a waiting prompt (the
    KV caches are merged, left-padded); outputs still equal one-at-a-time generation."""
    model, tokenizer = varied_model
    prompts = varied_prompts(7, icl=True)
    probe = one_at_a_time(model, tokenizer, prompts, gen_cfg(max_new_tokens=10))
    # Make a token the random model emits early in some outputs (late or never in others) the stop token.
    counts = {}
    for ids in probe:
        for position, token in enumerate(ids[:6]):
            counts.setdefault(token, set()).add(position)
    stop_token = max(counts, key=lambda t: (len(counts[t]), -min(counts[t])))
    stopping = copy.deepcopy(tokenizer)
    stopping.eos_token = stopping.convert_ids_to_tokens(stop_token)
    cfg = gen_cfg(batch_size=3, max_new_tokens=10)
    single = one_at_a_time(model, stopping, prompts, cfg)
    assert len({len(ids) for ids in single}) > 1, "rows must stop at different steps"
    merges = []
    original_merge = engine._DecodeBatch.merge
    monkeypatch.setattr(engine._DecodeBatch, "merge", lambda self, other: merges.append(1) or original_merge(self, other))
    for mode in PREFIX_MODES.values():
        assert common.generate_token_ids(model, stopping, prompts, dict(cfg, **mode)) == single
    assert merges, "no waiting prompt joined a running batch"
    assert any(shared_prefix_calls), "the shared-prefix path did not run"


def test_sampling_is_seeded(varied_model):
    model, tokenizer = varied_model
    prompts = varied_prompts(4)
    cfg = gen_cfg(do_sample=True, temperature=1.5, top_p=0.95, max_new_tokens=8)
    first = common.generate_token_ids(model, tokenizer, prompts, dict(cfg, seed=1))
    assert common.generate_token_ids(model, tokenizer, prompts, dict(cfg, seed=1)) == first
    assert common.generate_token_ids(model, tokenizer, prompts, dict(cfg, seed=2)) != first
    assert first != common.generate_token_ids(model, tokenizer, prompts, gen_cfg(max_new_tokens=8))  # not greedy


# ---- Constrained replies (generation.constrain_response, the judge's forced choice) ----------
@pytest.mark.parametrize("task", [TASK_NLI, TASK_PAR], ids=["nli", "par"])
def test_constrained_replies_open_with_a_label_and_end_at_the_line(varied_model, task):
    """Every reply opens with `Label: <a label of the task>` and `Explanation:`, has one line of
    explanation, and both engines agree; the random model's free replies never parse."""
    model, tokenizer = varied_model
    requests = [{"dataset": "toy", "item_id": f"i{i}", "annotator": "A0",
                 "messages": common.build_messages(task, "A0", a, b)} for i, (a, b) in enumerate(SENTENCES)]
    constrained = dict(gen_cfg(max_new_tokens=24, batch_size=3), constrain_response=True)
    free = common.generate_predictions(model, tokenizer, requests, task, gen_cfg(max_new_tokens=24),
                                       method="base", model_tag="t", seed=1)
    assert common.parse_rate(free) == 0.0
    predictions = common.generate_predictions(model, tokenizer, requests, task, constrained,
                                              method="base", model_tag="t", seed=1)
    labels = task.get("labels") or list(range(-5, 6))
    for p in predictions:
        head, _, explanation = p["output"].partition("\nExplanation:")
        assert head.startswith("Label: ") and common.normalize_label(head[len("Label: "):], task) in labels
        assert "\n" not in explanation.rstrip("\n")
        assert p["label"] in labels and p["parse_ok"] == bool(p["explanation"])
    static = common.generate_predictions(model, tokenizer, requests, task, dict(constrained, engine="generate"),
                                         method="base", model_tag="t", seed=1)
    assert [p["output"] for p in static] == [p["output"] for p in predictions]


def test_constrained_label_is_the_models_most_likely_allowed_token(varied_model):
    """The first label token is the argmax of the model's logits over the tokens that continue
    some opening, right after the forced `Label:` (no other rule picks it)."""
    model, tokenizer = varied_model
    constraint = engine.ReplyConstraint(tokenizer, common.response_openings(TASK_NLI), end_at_line_break=True)
    prompts = varied_prompts(5)
    replies = common.generate_token_ids(model, tokenizer, prompts, gen_cfg(max_new_tokens=8), constraint=constraint)
    forced = constraint.allowed([])
    assert len(forced) == 1  # every opening starts with the same `Label` token(s)
    for messages, reply in zip(prompts, replies):
        prefix = tokenizer(common.render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        depth = next(k for k in range(len(reply)) if len(constraint.allowed(reply[:k])) > 1)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prefix + reply[:depth]])).logits[0, -1]
        options = constraint.allowed(reply[:depth])
        assert reply[depth] == options[int(logits[options].argmax())]


def test_reply_constraint_trie():
    class Tok:  # characters as tokens; "\n" is token 10
        name_or_path = "chars"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

        def decode(self, ids):
            return "".join(map(chr, ids))

        def __len__(self):
            return 128

    eos = 3
    ids = engine.ReplyConstraint(Tok(), [[ord("A"), ord("1"), eos], [ord("A"), ord("1"), ord("0"), eos]])
    assert ids.allowed([]) == [ord("A")]
    assert sorted(ids.allowed([ord("A"), ord("1")])) == sorted([eos, ord("0")])  # A1 or A10, no other
    assert ids.allowed([ord("A"), ord("1"), eos]) is None
    lines = engine.ReplyConstraint(Tok(), ["L: x\nE:", "L: y\nE:"], end_at_line_break=True)
    assert sorted(lines.allowed([ord(c) for c in "L: "])) == [ord("x"), ord("y")]
    assert lines.allowed([ord(c) for c in "L: x\nE: so"]) is None
    assert not lines.ends([ord(c) for c in "L: x\n"])  # the opening's own line break
    assert lines.ends([ord(c) for c in "L: x\nE: so\n"]) and not lines.ends([ord(c) for c in "L: x\nE: so"])
    logits = torch.zeros(2, 128)
    logits[0, ord("y")] = 5.0
    logits[0, ord("z")] = 9.0
    masked = lines.mask(logits, [[ord(c) for c in "L: "], [ord(c) for c in "L: x\nE: so"]])
    assert int(masked[0].argmax()) == ord("y") and torch.isinf(masked[0, ord("z")])
    assert torch.equal(masked[1], torch.zeros(128))  # free once the opening is complete
