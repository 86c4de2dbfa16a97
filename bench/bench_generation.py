"""Batched generation vs one-prompt-at-a-time model.generate, side by side in one process.

    .venv/bin/python bench/bench_generation.py                          # 32 base prompts, cpu profile model
    .venv/bin/python bench/bench_generation.py --workload icl --prompts 12
    .venv/bin/python bench/bench_generation.py --variant batch_size=32 --variant autocast_bf16=true

Prompts are what 03_prompt_baselines sends in one call: one annotator's test items of
runs/<profile>/data/<dataset>/test.jsonl (run 01_prepare first) as Base prompts
(--workload base) or as ICL prompts with the profile's icl_k demonstrations
(--workload icl). Both paths decode greedily with the same max_new_tokens and stop at the
end-of-turn token. Generated tokens are counted per prompt up to and including the first
end-of-turn token (no padding, nothing after it), the same way for both paths.

The one-at-a-time path (plain model.generate per prompt, no padding, no cache reuse) runs
first on a warmed-up model, then the kit's previous path (model.generate on static
left-padded batches; the "before" of the continuous-batching speed-up), then
common.generate_token_ids once per batched variant:
first the profile's own generation settings, then each --variant (key=value overrides of
the `generation:` section). Other processes share the cores, so everything runs in this
one process, back to back, and the load average is printed.

The last line is `ratio=<batched tokens/s / one-at-a-time tokens/s>` for the profile's own
settings (the first variant).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CAPO_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402

import common  # noqa: E402


def workload_prompts(cfg: dict, dataset: str, workload: str, count: int, annotator: str | None,
                     icl_k: int) -> tuple[str, list[list[dict]]]:
    task = common.load_task(cfg, dataset)
    annotator = annotator or common.dataset_annotators(cfg, dataset)[0]
    demonstrations = None
    if workload == "icl":
        train = [r for r in common.load_split(cfg, dataset, "train") if r["annotator"] == annotator]
        demonstrations = sorted(train, key=lambda r: r["item_id"])[:icl_k]
    requests = common.annotator_requests(common.load_split(cfg, dataset, "test"), task, annotator,
                                         demonstrations=demonstrations)
    return annotator, [r["messages"] for r in requests[:count]]


def one_at_a_time(model, tokenizer, prompts, gen_cfg) -> list[list[int]]:
    generation_config = common._generation_config(tokenizer, gen_cfg)
    outputs = []
    for messages in prompts:
        inputs = tokenizer(common.render_prompt(tokenizer, messages), add_special_tokens=False,
                           return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=generation_config)
        outputs.append(common._trim_at_eos(out[0, inputs["input_ids"].shape[1]:].tolist(),
                                           tokenizer.eos_token_id, tokenizer.pad_token_id))
    return outputs


def batched_model_generate(model, tokenizer, prompts, gen_cfg) -> list[list[int]]:
    """The kit's previous path (commit 1493622), kept here as the 'before' of its speed-up:
    model.generate on static batches of gen_cfg['batch_size'] prompts (longest first,
    left-padded), each batch running until its last row stops. No prefix cache."""
    generation_config = common._generation_config(tokenizer, gen_cfg)
    encoded = [tokenizer(common.render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results = [None] * len(prompts)
    for start in range(0, len(order), int(gen_cfg["batch_size"])):
        batch = order[start:start + int(gen_cfg["batch_size"])]
        padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, padding=True, padding_side="left",
                               return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**padded, generation_config=generation_config)
        for index, ids in zip(batch, out[:, padded["input_ids"].shape[1]:].tolist()):
            results[index] = common._trim_at_eos(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--dataset", default="varierr")
    parser.add_argument("--workload", choices=["base", "icl"], default="base")
    parser.add_argument("--annotator", default=None, help="default: the dataset's first")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the profile's")
    parser.add_argument("--variant", action="append", default=[],
                        help="key=value[,key=value] overrides of generation: for an extra batched run")
    args = parser.parse_args()

    cfg = common.load_config(args.config)
    gen_cfg = dict(cfg["generation"], backend="hf")
    if args.max_new_tokens:
        gen_cfg["max_new_tokens"] = args.max_new_tokens
    variants = [("profile settings", gen_cfg)]
    for spec in args.variant:
        changes = {k: yaml.safe_load(v) for k, v in (pair.split("=", 1) for pair in spec.split(","))}
        variants.append((spec, dict(gen_cfg, **changes)))

    model, tokenizer = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
    annotator, prompts = workload_prompts(cfg, args.dataset, args.workload, args.prompts, args.annotator,
                                          cfg["baselines"]["icl_k"])
    lengths = [len(tokenizer(common.render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"])
               for p in prompts]
    print(f"model={cfg['models'][0]['tag']} workload={args.workload} annotator={annotator} "
          f"prompts={len(prompts)} prompt_tokens(min/mean/max)={min(lengths)}/"
          f"{sum(lengths) / len(lengths):.0f}/{max(lengths)} max_new_tokens={gen_cfg['max_new_tokens']} "
          f"torch_threads={torch.get_num_threads()} cpus={os.cpu_count()}", flush=True)
    one_at_a_time(model, tokenizer, prompts[:1], dict(gen_cfg, max_new_tokens=4))  # warm-up

    start, load = time.perf_counter(), os.getloadavg()[0]
    single = one_at_a_time(model, tokenizer, prompts, gen_cfg)
    single_s = time.perf_counter() - start
    single_tokens = sum(len(ids) for ids in single)
    single_rate = single_tokens / single_s
    print(f"one-at-a-time: {single_tokens} tokens in {single_s:.1f}s = {single_rate:.2f} tokens/s "
          f"(load avg {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)

    start, load = time.perf_counter(), os.getloadavg()[0]
    static = batched_model_generate(model, tokenizer, prompts, gen_cfg)
    static_s = time.perf_counter() - start
    static_tokens = sum(len(ids) for ids in static)
    print(f"batched model.generate (static batches of {gen_cfg['batch_size']}, the kit's previous path): "
          f"{static_tokens} tokens in {static_s:.1f}s = {static_tokens / static_s:.2f} tokens/s, ratio "
          f"{static_tokens / static_s / single_rate:.2f}, greedy agreement {sum(a == b for a, b in zip(single, static))}/"
          f"{len(prompts)} (load avg {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)

    ratios = []
    for name, settings in variants:
        start, load = time.perf_counter(), os.getloadavg()[0]
        batched = common.generate_token_ids(model, tokenizer, prompts, settings)
        batched_s = time.perf_counter() - start
        batched_tokens = sum(len(ids) for ids in batched)
        identical = sum(a == b for a, b in zip(single, batched))
        ratios.append((batched_tokens / batched_s) / single_rate)
        print(f"batched [{name}: batch_size={settings['batch_size']} autocast_bf16={settings.get('autocast_bf16')} "
              f"prefix_cache_min_tokens={settings.get('prefix_cache_min_tokens')}]: {batched_tokens} tokens in "
              f"{batched_s:.1f}s = {batched_tokens / batched_s:.2f} tokens/s, ratio {ratios[-1]:.2f}, "
              f"greedy agreement {identical}/{len(prompts)} identical outputs "
              f"(load avg {load:.1f} -> {os.getloadavg()[0]:.1f})", flush=True)
    print(f"kit continuous batching / batched model.generate: {ratios[0] * single_rate / (static_tokens / static_s):.2f}x")
    print(f"ratio={ratios[0]:.2f}")


if __name__ == "__main__":
    main()
