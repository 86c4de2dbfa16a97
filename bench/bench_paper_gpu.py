"""The paper profile on one GPU, measured on a stand-in: 03's generation, 04 and 05 for one
annotator, then the whole paper run extrapolated to 1 and N GPUs.

    .venv/bin/python bench/bench_paper_gpu.py --architecture qwen3-4b --raw-dir ../data   # a GPU
    .venv/bin/python bench/bench_paper_gpu.py --architecture llama3.2-3b --dataset par --raw-dir ../data
    .venv/bin/python bench/bench_paper_gpu.py --architecture qwen3-4b --num-layers 2 --raw-dir ../data  # quick GPU check
    .venv/bin/python bench/bench_paper_gpu.py --tiny --run-dir /tmp/bench-tiny          # CPU check of the bench

The model is `source: random` with the paper model's exact architecture (common.STAND_IN_
ARCHITECTURES) and its real tokenizer and chat template (--tokenizer: a folder, or the hub id
from the local cache), so no weights are needed; every other setting is
configs/paper.yaml's (bf16, batch sizes, max_new_tokens 256, 50 ICL demonstrations, epochs).
Random weights never emit the end-of-turn token, so every generation runs to max_new_tokens:
the generation figures are an upper bound (--max-new-tokens caps them, e.g. near the human
responses' length). --tiny swaps in the smoke profile (tiny model, CPU)
to check the bench itself; its figures mean nothing.

Per stage: wall seconds, tokens/s, peak GPU memory (torch.cuda.max_memory_allocated; missing on
CPU) and model FLOP utilisation. FLOPs per token, N = parameters: forward 2N plus causal
attention 4 * layers * context * (heads * head_dim); LoRA training 4N plus three times the
attention (forward, then activation gradients only: the frozen base needs no weight gradients,
so the usual 6N would overstate the work); DPO adds the reference forward of its precompute. MFU = FLOPs / seconds / peak
(--peak-tflops, default 989: H100 SXM bf16 dense).

Extrapolation (one dataset, one model; run once per dataset and architecture and add up):
03: seconds per request of the Base and ICL prompts times the requests of every annotator
(VP counted as Base, VP-ICL as ICL: their profile adds ~100-200 prompt tokens, so slightly
low); 04/05: the measured training seconds scaled by each annotator's examples/pairs, plus
model loading and test generation scaled by test items. N GPUs: run_all.sh's `accelerate launch`
split of 04/05's adapters and 03's (dataset, annotator) units over N processes (contiguous
shares, as accelerate's split_between_processes), makespan = the busiest process. Not included:
value-profile writing in 03 (one request per annotator), 01, 02 and 06 (the judge's
generations, shared out the same way).
Writes <run-dir>/bench_paper_gpu.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from benchkit import ROOT, load_stage  # noqa: E402  (first: the kit on the path, offline settings)

import torch  # noqa: E402
import yaml  # noqa: E402

import common  # noqa: E402



def bench_config(args) -> Path:
    """The profile (paper, or smoke with --tiny) with the stand-in model, written into the run dir."""
    cfg, _ = common.read_profile(ROOT / "configs" / ("smoke.yaml" if args.tiny else "paper.yaml"))
    if not args.tiny:
        cfg["models"] = [{"tag": f"{args.architecture}-stand-in", "source": "random", "name_or_path": None,
                          "architecture": args.architecture, "num_layers": args.num_layers,
                          "tokenizer": args.tokenizer, "dtype": "bfloat16", "init_seed": 0}]
    if args.max_new_tokens:
        cfg["generation"]["max_new_tokens"] = args.max_new_tokens
    cfg["run_dir"] = str(args.run_dir)
    cfg["datasets"] = [args.dataset]
    path = Path(args.run_dir) / "bench_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---- FLOPs ------------------------------------------------------------------------------
def model_shape(model) -> dict:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return {"params": sum(p.numel() for p in model.parameters()), "layers": c.num_hidden_layers,
            "attn_width": c.num_attention_heads * head_dim}


def forward_flops(shape: dict, context_lengths) -> float:
    """Forward FLOPs of tokens at the given context lengths (each token attends to that many)."""
    tokens = len(context_lengths)
    attention = 2 * 2 * shape["layers"] * shape["attn_width"] * sum(context_lengths)  # QK^T and AV
    return 2 * shape["params"] * tokens + attention


def sequence_forward_flops(shape: dict, length: int) -> float:
    """Forward FLOPs of one sequence of `length` tokens under a causal mask."""
    return 2 * shape["params"] * length + 2 * 2 * shape["layers"] * shape["attn_width"] * length * (length + 1) / 2


def cuda_peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# ---- stages -----------------------------------------------------------------------------
def bench_generation(cfg: dict, dataset: str, annotator: str, shape_out: dict) -> dict:
    """03's Base and ICL prompts for the annotator's test items, greedy, the profile's settings."""
    baselines = load_stage("03_prompt_baselines")
    task, train = common.load_task(cfg, dataset), common.load_split(cfg, dataset, "train")
    test = common.load_eval_split(cfg, dataset, "test")
    reset_peak()
    started = time.time()
    model, tokenizer = common.load_model_and_tokenizer(cfg["models"][0])
    load_seconds = time.time() - started
    shape_out.update(model_shape(model))
    demos = baselines.sample_train_records(train, annotator, cfg["baselines"]["icl_k"], cfg["seed"], "icl")
    # Untimed warm-up (kernel selection, allocator), so the first method is not charged for it.
    common.generate_token_ids(model, tokenizer, [[{"role": "user", "content": "Hello"}]],
                              dict(cfg["generation"], max_new_tokens=4), desc="bench warm-up")
    rows = {}
    for method in ("base", "icl"):
        requests = common.annotator_requests(test, task, annotator,
                                             **baselines.prompt_kwargs(method, demos, None))
        prompts = [common.render_prompt(tokenizer, r["messages"]) for r in requests]
        prompt_lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.time()
        new_ids = common.generate_token_ids(model, tokenizer, prompts, cfg["generation"], desc=f"bench {method}")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.time() - t0
        new_tokens = [len(ids) for ids in new_ids]
        flops = sum(sequence_forward_flops(shape_out, p) for p in prompt_lengths)  # prefill
        flops += sum(forward_flops(shape_out, range(p + 1, p + n + 1)) for p, n in zip(prompt_lengths, new_tokens))
        rows[method] = {"requests": len(prompts), "seconds": round(seconds, 2),
                        "seconds_per_request": seconds / max(1, len(prompts)),
                        "prompt_tokens": sum(prompt_lengths), "new_tokens": sum(new_tokens),
                        "new_tokens_per_s": round(sum(new_tokens) / seconds, 1) if seconds else None,
                        "tokens_per_s": round((sum(prompt_lengths) + sum(new_tokens)) / seconds, 1) if seconds else None,
                        "flops": flops}
    del model
    return {"load_seconds": round(load_seconds, 1), "methods": rows, "peak_gpu_gib": cuda_peak_gib()}


def train_log(cfg: dict, dataset: str, method: str, annotator: str) -> dict:
    return common.read_json(common.adapter_dir(cfg, dataset, cfg["models"][0]["tag"], method, annotator)
                            / "train_log.json")


def chat_lengths(tokenizer, conversations: list[list[dict]]) -> list[int]:
    """Token count of each conversation as the trainers render it (chat template, thinking off)."""
    texts = [tokenizer.apply_chat_template(c, tokenize=False, **common.CHAT_TEMPLATE_KWARGS)
             for c in conversations]
    return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def training_sequences(cfg: dict, dataset: str, annotator: str, method: str, tokenizer) -> list[int]:
    """Lengths of the sequences one epoch trains on: 04's examples, or 05's chosen and rejected
    sequences of the pairs it wrote (so the count does not depend on trl's logging steps)."""
    if method == "sft":
        rows = load_stage("04_sft").sft_examples(common.load_split(cfg, dataset, "train"),
                                                 common.load_task(cfg, dataset), annotator)
        return chat_lengths(tokenizer, [r["prompt"] + r["completion"] for r in rows])
    pairs = common.read_jsonl(common.pairs_dir(cfg, dataset, cfg["models"][0]["tag"]) / f"{annotator}.jsonl")
    return chat_lengths(tokenizer, [p["prompt"] + p[side] for p in pairs for side in ("chosen", "rejected")])


def bench_training(cfg: dict, config_path: Path, dataset: str, annotator: str, stage: str, method: str,
                   shape: dict, tokenizer) -> dict:
    module = load_stage(stage)
    reset_peak()
    started = time.time()
    module.main(["--config", str(config_path), "--dataset", dataset, "--annotators", annotator, "--force"])
    seconds = time.time() - started
    log = train_log(cfg, dataset, method, annotator)
    section = cfg["sft" if method == "sft" else "capo"]
    lengths = [n for n in training_sequences(cfg, dataset, annotator, method, tokenizer)
               if n <= int(section["max_length"])]  # longer ones are left out (04) or cut (05)
    epochs = float(section["epochs"])
    tokens = sum(lengths) * epochs
    fwd = sum(sequence_forward_flops(shape, n) for n in lengths) * epochs
    attention = fwd - 2 * shape["params"] * tokens
    # forward, then activation gradients only (2N, and Q/K/V gradients: twice the attention)
    flops = fwd + 2 * shape["params"] * tokens + 2 * attention
    if method != "sft":
        flops += fwd / epochs  # the reference forward of trl's precompute, once
    return {"stage_seconds": round(seconds, 1), "train_seconds": log["seconds"], "steps": log["steps"],
            "examples": log.get("train_examples", log.get("train_pairs")), "train_tokens": tokens,
            "peak_gpu_gib": cuda_peak_gib(),
            "tokens_per_s": round(tokens / log["seconds"], 1) if log["seconds"] else None, "flops": flops}


# ---- extrapolation ------------------------------------------------------------------------
def makespan(job_seconds: list[float], gpus: int) -> float:
    """run_all.sh's split (accelerate's split_between_processes): contiguous shares, the first
    len % N processes one job more; the run ends with the busiest process."""
    per, extra = divmod(len(job_seconds), gpus)
    loads, start = [], 0
    for rank in range(gpus):
        end = start + per + (1 if rank < extra else 0)
        loads.append(sum(job_seconds[start:end]))
        start = end
    return max(loads) if loads else 0.0


def extrapolate(cfg: dict, dataset: str, annotator: str, measured: dict, gpu_counts: list[int]) -> dict:
    annotators = common.dataset_annotators(cfg, dataset)
    train, test = common.load_split(cfg, dataset, "train"), common.load_eval_split(cfg, dataset, "test")
    pairs_stats = common.read_json(common.pairs_dir(cfg, dataset, cfg["models"][0]["tag"])
                                   / "pairs_stats.json")["per_annotator"]
    policy = cfg["capo"]["pair_policy"]
    n_train = {a: sum(r["annotator"] == a for r in train) for a in annotators}
    n_test = {a: len({r["item_id"] for r in test if r["annotator"] == a}) for a in annotators}
    n_pairs = {a: pairs_stats[a][policy].get("pairs_used", pairs_stats[a][policy]["pairs"]) for a in annotators}
    gen = measured["03_generation"]["methods"]
    per_request = {m: gen[m]["seconds_per_request"] for m in gen}
    jobs = {"03": [], "04": [], "05": []}
    for a in annotators:  # 03: base + vp at Base cost, icl + vp_icl at ICL cost
        jobs["03"].append(n_test[a] * 2 * (per_request["base"] + per_request["icl"]))
    for stage, key, count in (("04", "04_sft", n_train), ("05", "05_capo", n_pairs)):
        row = measured[key]
        other = row["stage_seconds"] - row["train_seconds"]  # loading and test generation
        for a in annotators:
            if count[a] == 0 and stage == "05":
                jobs[stage].append(0.0)
                continue
            train_part = row["train_seconds"] * count[a] / max(1, count[annotator])
            jobs[stage].append(train_part + other * max(1, n_test[a]) / max(1, n_test[annotator]))
    load = measured["03_generation"]["load_seconds"]
    out = {"annotators": len(annotators), "train_records": n_train, "pairs": n_pairs, "test_items": n_test,
           "hours": {}}
    for gpus in gpu_counts:
        stages = {"03": makespan(jobs["03"], gpus) + load, "04": makespan(jobs["04"], gpus),
                  "05": makespan(jobs["05"], gpus)}
        out["hours"][str(gpus)] = {**{k: round(v / 3600, 2) for k, v in stages.items()},
                                   "total": round(sum(stages.values()) / 3600, 2)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="qwen3-4b", choices=sorted(common.STAND_IN_ARCHITECTURES))
    parser.add_argument("--dataset", default="varierr")
    parser.add_argument("--annotator", default=None, help="default: the one with the most train records")
    parser.add_argument("--run-dir", default="/tmp/capo-bench-paper", type=Path)
    parser.add_argument("--raw-dir", default=os.environ.get("CAPO_RAW_DIR"), help="for 01 if the data is missing")
    parser.add_argument("--gpus", default="1,2,4,8", help="GPU counts to extrapolate to")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator bf16 dense peak")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="stand-in depth (default: the full model's); fewer for a quick pipeline check")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap generation (default: the profile's 256; random weights never stop early)")
    parser.add_argument("--tokenizer", default=None,
                        help="the stand-in's tokenizer: a folder or hub id (default: the real model's hub id, "
                             "from the local cache)")
    parser.add_argument("--tiny", action="store_true", help="smoke profile on CPU: checks the bench only")
    args = parser.parse_args(argv)

    config_path = bench_config(args)
    cfg = common.load_config(config_path)
    common.set_seed(cfg["seed"])
    if not (common.data_dir(cfg, args.dataset) / "stats.json").exists():
        if not args.raw_dir:
            raise SystemExit(f"no prepared data in {args.run_dir} and no --raw-dir for 01_prepare")
        load_stage("01_prepare").main(["--config", str(config_path), "--dataset", args.dataset,
                                       "--raw-dir", str(args.raw_dir)])
    train = common.load_split(cfg, args.dataset, "train")
    annotators = common.dataset_annotators(cfg, args.dataset)
    annotator = args.annotator or max(annotators, key=lambda a: sum(r["annotator"] == a for r in train))

    shape: dict = {}
    measured = {"03_generation": bench_generation(cfg, args.dataset, annotator, shape)}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tokenizer = common.load_tokenizer(cfg["models"][0])
    for stage, method in (("04_sft", "sft"), ("05_capo", "capo")):
        measured[stage] = bench_training(cfg, config_path, args.dataset, annotator, stage, method, shape, tokenizer)

    peak = args.peak_tflops * 1e12 if torch.cuda.is_available() else None
    gen = measured["03_generation"]["methods"]
    for row in [*gen.values(), measured["04_sft"], measured["05_capo"]]:
        seconds = row.get("seconds") or row.get("train_seconds")
        row["achieved_tflops"] = round(row["flops"] / seconds / 1e12, 6) if row.get("flops") and seconds else None
        row["mfu"] = round(row["flops"] / seconds / peak, 4) if peak and row.get("flops") and seconds else None
    if args.num_layers or args.tiny:
        print("note: a reduced model (--num-layers or --tiny): the figures check the pipeline, they are "
              "not the paper model's", flush=True)
    result = {"architecture": "tiny (smoke)" if args.tiny else args.architecture, "num_layers": args.num_layers,
              "max_new_tokens": cfg["generation"]["max_new_tokens"], "dataset": args.dataset,
              "annotator": annotator, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "model": shape, "peak_tflops": args.peak_tflops if peak else None, "measured": measured,
              "extrapolated": extrapolate(cfg, args.dataset, annotator, measured,
                                          [int(g) for g in args.gpus.split(",")])}
    common.write_json(Path(args.run_dir) / "bench_paper_gpu.json", result)

    print(f"\n{result['architecture']} stand-in ({shape['params'] / 1e9:.2f}B parameters) on {result['device']}, "
          f"{args.dataset}, annotator {annotator}")
    print(f"{'stage':16s} {'seconds':>9s} {'tokens/s':>10s} {'peak GiB':>9s} {'TFLOP/s':>8s} {'MFU':>7s}")
    for name, row in [(f"03 {m}", gen[m]) for m in gen] + [("04 sft (train)", measured["04_sft"]),
                                                           ("05 capo (train)", measured["05_capo"])]:
        seconds = row.get("seconds", row.get("train_seconds"))
        peak_gib = row.get("peak_gpu_gib", measured["03_generation"]["peak_gpu_gib"])
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
        print(f"{name:16s} {seconds:9.1f} {row['tokens_per_s'] or float('nan'):10.1f} "
              f"{'n/a' if peak_gib is None else peak_gib:>9} {row['achieved_tflops'] or float('nan'):8.3f} {mfu:>7}")
    print("extrapolated paper run for this dataset and model, hours (03 / 04 / 05 / total):")
    for gpus, hours in result["extrapolated"]["hours"].items():
        print(f"  {gpus} GPU(s): {hours['03']} / {hours['04']} / {hours['05']} / {hours['total']}")
    print(f"written: {Path(args.run_dir) / 'bench_paper_gpu.json'}")
    return result


if __name__ == "__main__":
    common.run_stage(main)
