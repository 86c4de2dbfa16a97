"""Generation engines side by side in one process, on the profile's real 03 workload.

    .venv/bin/python bench/bench_generation.py                         # cpu profile, varierr, first annotator
    .venv/bin/python bench/bench_generation.py --prompts 12 --batch-size 8 --single-prompts 3   # a shorter run
    .venv/bin/python bench/bench_generation.py --tiny                  # smoke model, seconds (tests/test_bench.py)

Workload: what 03_prompt_baselines asks of one annotator, one generate call per method: the
Base prompts and the ICL prompts (the profile's icl_k demonstrations, sampled as 03 samples
them) of the annotator's eval test items (data.max_eval_items), so each call has more prompts
than generation.batch_size on the cpu profile. `--methods base,icl,judge` adds 06's judge prompts
(the sampled test cells' human responses, its forced choice: a few new tokens, so the call is
mostly prefill). Reads runs/<profile>/data (run 01_prepare first).

Per call, back to back on the same warmed-up model:
  library   transformers' continuous batching, `model.generate_batch` (paged KV cache, prefix
            sharing), its cache capped as `library_token_ids` does
  kit       the kit's own continuous-batching decoder, common.generate_token_ids (engine: kit)
  generate  model.generate on static left-padded batches, common.generate_token_ids (engine: generate)
  single    plain `model.generate`, one prompt at a time, on the first --single-prompts prompts
            of the call, free replies (the machine-speed figure; the reference for identical
            outputs when the profile's replies are free)
  kit_infmode the kit's decoder under torch.inference_mode, as before (autocast re-casts weights)
  kit_copyprefix the kit's decoder with the shared prompt prefix copied into every row's cache,
            as before generation.share_prefix_attention
  kit_fp32  the kit's decoder without bf16 autocast (the speed-up of generation.autocast_bf16)
  kit_free  the kit's decoder, fp32, free replies (the cpu profile's 03 path before the label
            opening and the end at the line break: generation.constrain_response)
kit, generate (and kit_fp32) apply the profile's generation.constrain_response.
All decode greedily with the profile's max_new_tokens and stop at the end-of-turn token;
generated tokens are counted up to and including it. Wall seconds and this process's CPU
seconds are both printed (others share the cores), with the load average.

Last lines: `ratio=<path>/kit <x>` (tokens/s over the kit's decoder, all calls together; per
CPU-second in brackets), `time_ratio=<path>/kit <x>` (seconds for the same prompts), `ratio=<path>/single <x>`, and `single_tokens_per_s=<x>` (compare
machines across sessions with it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from unittest import mock

from benchkit import ROOT, load_stage  # noqa: E402  (first: the kit on the path, offline settings)

import torch  # noqa: E402

import common  # noqa: E402
import engine  # noqa: E402


def generation_config(tokenizer, gen_cfg: dict):
    """Greedy decoding with the profile's max_new_tokens (the library's and the single path's)."""
    from transformers import GenerationConfig
    return GenerationConfig(max_new_tokens=int(gen_cfg["max_new_tokens"]), do_sample=False,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)



def workload(cfg: dict, dataset: str, annotator: str | None, methods: list[str]) -> tuple[str, dict]:
    """{method: prompts} as 03_prompt_baselines builds them for one annotator; `judge`: 06's judge
    prompts for the sampled test cells' human responses (the calibration row, all annotators)."""
    baselines = load_stage("03_prompt_baselines")
    calls = {}
    if "judge" in methods:
        evaluation = load_stage("06_eval")
        calls["judge"] = [job["messages"] for job in evaluation.judge_jobs(cfg, evaluation.load_dataset(cfg, dataset), {})]
        methods = [m for m in methods if m != "judge"]
    task = common.load_task(cfg, dataset)
    annotator = annotator or common.dataset_annotators(cfg, dataset)[0]
    demonstrations = baselines.sample_train_records(common.load_split(cfg, dataset, "train"), annotator,
                                                    cfg["baselines"]["icl_k"], cfg["seed"], "icl")
    test = common.load_eval_split(cfg, dataset, "test")
    return annotator, {**{method: [r["messages"] for r in common.annotator_requests(
        test, task, annotator, **baselines.prompt_kwargs(method, demonstrations, None))] for method in methods},
        **calls}


def library_token_ids(model, tokenizer, prompts, gen_cfg, constraint=None) -> list[list[int]]:
    """transformers' `generate_batch`, its KV cache sized for this call (not 60% of free RAM on
    CPU), the model's own attention, errors raised (the library only logs them)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    encoded = [tokenizer(common.render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    batch_size = min(int(gen_cfg["batch_size"]), len(encoded))
    page_size = 256
    pages_per_request = -(-(max(map(len, encoded)) + int(gen_cfg["max_new_tokens"])) // page_size)
    cb_config = ContinuousBatchingConfig(max_requests_per_batch=batch_size, page_size=page_size,
                                         num_blocks=batch_size * pages_per_request, max_batch_tokens=2048,
                                         seed=0, auto_switch_to_flash=False)
    outputs = list(model.generate_batch(encoded, generation_config=generation_config(tokenizer, gen_cfg),
                                        continuous_batching_config=cb_config).values())
    failed = [o.error for o in outputs if o.error is not None]
    if failed or len(outputs) != len(encoded):
        raise RuntimeError(f"generate_batch: {len(encoded) - len(outputs)} missing, errors {failed[:1]}")
    return [engine._trim_at_eos(list(o.generated_tokens), tokenizer.eos_token_id, tokenizer.pad_token_id)
            for o in outputs]


def kit_token_ids(model, tokenizer, prompts, gen_cfg, constraint=None) -> list[list[int]]:
    return common.generate_token_ids(model, tokenizer, prompts, dict(gen_cfg, engine="kit"), constraint=constraint)


def kit_fp32_token_ids(model, tokenizer, prompts, gen_cfg, constraint=None) -> list[list[int]]:
    """The kit's decoder in fp32 (the cpu profile's generation before bf16 autocast)."""
    return kit_token_ids(model, tokenizer, prompts, dict(gen_cfg, autocast_bf16=False), constraint)


def kit_free_token_ids(model, tokenizer, prompts, gen_cfg, constraint=None) -> list[list[int]]:
    """The cpu profile's earlier 03 path: fp32, free replies (no label opening, no end at the
    line break), up to the end-of-turn token or max_new_tokens."""
    return kit_token_ids(model, tokenizer, prompts, dict(gen_cfg, autocast_bf16=False), None)


def kit_infmode_token_ids(model, tokenizer, prompts, gen_cfg, constraint=None) -> list[list[int]]:
    """The kit's decoder under torch.inference_mode, as before: there CPU autocast casts every
    weight again at every forward (engine._decoding says why the kit no longer does)."""
    @contextlib.contextmanager
    def inference_mode_decoding(gen_cfg, device):
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if gen_cfg["autocast_bf16"]
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            yield
    with mock.patch.object(engine, "_decoding", inference_mode_decoding):
        return kit_token_ids(model, tokenizer, prompts, gen_cfg, constraint)


def kit_copyprefix_token_ids(model, tokenizer, prompts, gen_cfg, constraint=None) -> list[list[int]]:
    """The kit's decoder with the shared prompt prefix copied into every row's KV cache (as
    before generation.share_prefix_attention)."""
    return kit_token_ids(model, tokenizer, prompts, dict(gen_cfg, share_prefix_attention=False), constraint)


def generate_token_ids(model, tokenizer, prompts, gen_cfg, constraint=None) -> list[list[int]]:
    return common.generate_token_ids(model, tokenizer, prompts, dict(gen_cfg, engine="generate"),
                                     constraint=constraint)


def single_token_ids(model, tokenizer, prompts, gen_cfg, constraint=None) -> list[list[int]]:
    """One prompt at a time, free replies in the model's dtype: a machine-speed figure."""
    config = generation_config(tokenizer, gen_cfg)
    outputs = []
    for messages in prompts:
        inputs = tokenizer(common.render_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=config)
        outputs.append(engine._trim_at_eos(out[0, inputs["input_ids"].shape[1]:].tolist(),
                                           tokenizer.eos_token_id, tokenizer.pad_token_id))
    return outputs


ENGINES = {"library": library_token_ids, "kit": kit_token_ids, "generate": generate_token_ids,
           "single": single_token_ids, "kit_fp32": kit_fp32_token_ids, "kit_free": kit_free_token_ids,
           "kit_infmode": kit_infmode_token_ids, "kit_copyprefix": kit_copyprefix_token_ids}
# Paths whose outputs are not expected to equal the kit's: free replies, another precision, or
# bf16 arithmetic in another order (kit_copyprefix: SDPA over per-row prefix copies, where the
# kit attends in float32 over the shared prefix; both agree with kit_fp32 about equally often).
DIFFERENT_OUTPUTS = {"library", "single", "kit_fp32", "kit_free", "kit_copyprefix"}
BF16_PATHS = {"kit", "kit_copyprefix", "kit_infmode", "generate"}


def timed(path, model, tokenizer, prompts, gen_cfg, constraint=None) -> dict:
    load, wall, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
    ids = ENGINES[path](model, tokenizer, prompts, gen_cfg, constraint)
    return {"ids": ids, "tokens": sum(map(len, ids)), "seconds": time.perf_counter() - wall,
            "cpu_seconds": time.process_time() - cpu, "load": (load, os.getloadavg()[0])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="default: configs/cpu.yaml (--tiny: configs/smoke.yaml)")
    parser.add_argument("--dataset", default="varierr")
    parser.add_argument("--annotator", default=None, help="default: the dataset's first")
    parser.add_argument("--methods", default="base,icl",
                        help="03 methods, one generate call each; `judge` adds 06's judge prompts")
    parser.add_argument("--engines", default=",".join(ENGINES), help="paths to run (kit always runs)")
    parser.add_argument("--prompts", type=int, default=None, help="at most this many prompts per call (default: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the profile's generation.batch_size")
    parser.add_argument("--single-prompts", type=int, default=None,
                        help="prompts per call for one-at-a-time model.generate (default 6; --tiny 2)")
    parser.add_argument("--tiny", action="store_true", help="smoke model, 4 prompts per call, 8 new tokens")
    args = parser.parse_args(argv)

    cfg = common.load_config(args.config or ROOT / "configs" / ("smoke.yaml" if args.tiny else "cpu.yaml"))
    if cfg["torch_threads"]:
        torch.set_num_threads(int(cfg["torch_threads"]))
    gen_cfg = dict(cfg["generation"])
    single_prompts = args.single_prompts or (2 if args.tiny else 6)
    model, tokenizer = common.load_model_and_tokenizer(cfg["models"][0], device="cpu")
    annotator, calls = workload(cfg, args.dataset, args.annotator, args.methods.split(","))
    task = common.load_task(cfg, args.dataset)
    constraint = (engine.ReplyConstraint(tokenizer, common.response_openings(task), end_at_line_break=True)
                  if gen_cfg["constrain_response"] else None)
    if args.tiny:
        gen_cfg.update(max_new_tokens=8, batch_size=3)
        args.prompts = args.prompts or 4
    if args.batch_size:
        gen_cfg["batch_size"] = args.batch_size
    calls = {method: prompts[:args.prompts] for method, prompts in calls.items()}
    print(f"model={cfg['models'][0]['tag']} dataset={args.dataset} annotator={annotator} "
          f"batch_size={gen_cfg['batch_size']} max_new_tokens={gen_cfg['max_new_tokens']} "
          f"torch_threads={torch.get_num_threads()} cpus={os.cpu_count()} load_avg={os.getloadavg()[0]:.2f}",
          flush=True)
    warm = next(iter(calls.values()))[:2]
    engines = ["kit"] + [e for e in args.engines.split(",") if e in ENGINES and e != "kit"]
    for path in engines:  # one-time work (kernels, allocator) lands on no measured path
        ENGINES[path](model, tokenizer, warm, dict(gen_cfg, max_new_tokens=2), constraint)

    totals = {path: {"tokens": 0, "seconds": 0.0, "cpu_seconds": 0.0} for path in engines}
    mismatches = 0
    for method, prompts in calls.items():
        lengths = [len(tokenizer(common.render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"])
                   for p in prompts]
        print(f"{method}: {len(prompts)} prompts, prompt tokens min/mean/max "
              f"{min(lengths)}/{sum(lengths) / len(lengths):.0f}/{max(lengths)}", flush=True)
        call_constraint, call_cfg = constraint, gen_cfg
        if method == "judge":  # 06's forced choice among the annotator IDs, a few new tokens
            call_constraint, call_cfg = load_stage("06_eval").judge_decoding(
                dict(cfg, generation=gen_cfg), tokenizer, common.dataset_annotators(cfg, args.dataset))
        runs = {path: timed(path, model, tokenizer, prompts if path != "single" else prompts[:single_prompts],
                              call_cfg, call_constraint) for path in engines}
        # One-at-a-time free replies are the reference only when the profile's replies are free.
        single_reference = "single" in runs and call_constraint is None
        for path, run in runs.items():
            for key in ("tokens", "seconds", "cpu_seconds"):
                totals[path][key] += run[key]
            same_as_kit = sum(a == b for a, b in zip(run["ids"], runs["kit"]["ids"]))
            compared = f"identical to kit {same_as_kit}/{len(run['ids'])}"
            if single_reference:
                same_as_single = sum(a == b for a, b in zip(run["ids"], runs["single"]["ids"]))
                compared += f", to single {same_as_single}/{min(len(run['ids']), len(runs['single']['ids']))}"
            if "kit_fp32" in runs and path in BF16_PATHS:  # bf16 paths against the float32 reference
                same_as_fp32 = sum(a == b for a, b in zip(run["ids"], runs["kit_fp32"]["ids"]))
                compared += f", to kit_fp32 {same_as_fp32}/{len(run['ids'])}"
            if path not in DIFFERENT_OUTPUTS or (path == "single" and single_reference):
                mismatches += len(run["ids"]) - same_as_kit
            print(f"  {path:8s} {len(run['ids']):3d} prompts {run['tokens']:5d} tokens {run['seconds']:7.1f} s "
                  f"{run['tokens'] / run['seconds']:7.2f} tokens/s {run['tokens'] / run['cpu_seconds']:7.2f} "
                  f"tokens/CPU-s; {compared if path not in DIFFERENT_OUTPUTS or single_reference or path in BF16_PATHS else 'other replies'}"
                  f" (load avg {run['load'][0]:.2f} -> {run['load'][1]:.2f})", flush=True)
    rate = {path: t["tokens"] / t["seconds"] for path, t in totals.items()}
    cpu_rate = {path: t["tokens"] / t["cpu_seconds"] for path, t in totals.items()}
    print(f"identical outputs (paths meant to match the kit): {'all' if not mismatches else f'NOT ALL ({mismatches} differ)'}")
    for path in [e for e in engines[1:] if e != "single"]:
        print(f"ratio={path}/kit {rate[path] / rate['kit']:.2f} (per CPU-second "
              f"{cpu_rate[path] / cpu_rate['kit']:.2f})")
        # Seconds for the same prompts: the speed-up of a whole call where paths write different replies.
        print(f"time_ratio={path}/kit {totals[path]['seconds'] / totals['kit']['seconds']:.2f}")
    if "single" in rate:
        for path in [e for e in engines if e != "single"]:
            print(f"ratio={path}/single {rate[path] / rate['single']:.2f}")
        print(f"single_tokens_per_s={rate['single']:.2f}")


if __name__ == "__main__":
    main()
