"""Training speed and memory of 04_sft / 05_capo, side by side, on one profile's model and data.

    .venv/bin/python bench/bench_training.py                                  # cpu profile, varierr A0
    .venv/bin/python bench/bench_training.py --config configs/cpu.yaml --examples 48 --repeats 2
    .venv/bin/python bench/bench_training.py --tiny    # smoke model, 2 steps, seconds (tests/test_bench.py)

Throughput: the same LoRA, data and number of training examples under
  kit      the kit's SFTConfig for the profile (04_sft.sft_config; cpu: bf16 autocast,
           padding-free batches, no gradient checkpointing)
  default  trl's default SFTConfig (fp32 on CPU, gradient checkpointing on, padded batches of 8)
and, with --variants, one-change variants of the kit's config that settle its CPU choices:
kit-fullhead (trl's CPU default: every position, prompt included, through the loss's LM head
instead of the labelled ones only; patches.lm_head_on_labelled_positions_only), kit-bf16 (fp32), kit+ckpt (gradient checkpointing on), kit-padfree (padded batches),
kit-batch8 (8 examples per forward instead of the profile's per-device batch).
Tokens/s counts non-padding tokens of optimizer steps after the first (warm-up). Variants run
interleaved, --repeats times; the median is reported.

Memory: peak resident memory (CPU) or peak allocated GPU memory of a process that trains the
kit's SFT for a few steps, against one that trains CAPO from that adapter (05_capo.build_trainer:
the SFT adapter trainable, trl's frozen "ref" copy as reference, reference log-probs precomputed).
Each runs in its own process so that peaks do not mix.

The last line is `ratio=<kit tokens/s / default tokens/s>` (target >= 2.5; CAPO/SFT memory target <= 1.3).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from benchkit import ROOT, load_stage  # noqa: E402  (first: the kit on the path, offline settings)

import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import common  # noqa: E402
import patches  # noqa: E402

transformers.logging.set_verbosity_error()



sft = load_stage("04_sft")


class Throughput(TrainerCallback):
    """Non-padding tokens per second over the optimizer steps after the first.

    Wall-clock seconds, and this process's CPU seconds: on a shared machine the second is
    far less sensitive to other people's jobs (with one thread it is the work itself).
    """

    def __init__(self):
        self.start = None

    def on_step_end(self, args, state, control, **kwargs):
        now = (time.perf_counter(), time.process_time(), state.num_input_tokens_seen)
        if state.global_step == 1:
            self.start = now
        self.end = now


def sft_rows(cfg, dataset, annotator, n):
    task = common.load_task(cfg, dataset)
    rows = sft.sft_examples(common.load_split(cfg, dataset, "train"), task, annotator)
    return rows[:n]


def variant_config(cfg, name, out_dir, examples):
    section = cfg["sft"]
    common_args = dict(report_to="none", save_strategy="no", logging_strategy="no",
                       include_num_input_tokens_seen="non_padding", seed=int(cfg["seed"]))
    if name == "default":
        # trl's defaults, except what a CPU run must set (bf16 defaults to on) and the bounded length.
        per_step = SFTConfig.per_device_train_batch_size * SFTConfig.gradient_accumulation_steps
        return SFTConfig(output_dir=str(out_dir), max_steps=max(2, examples // per_step),
                         use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False, **common_args)
    changes = {"kit": {}, "kit-fullhead": {}, "kit-bf16": {"bf16": False}, "kit+ckpt": {"activation_checkpointing": True},
               "kit-padfree": {"padding_free": False, "max_length": int(section["max_length"])},
               "kit-batch8": {"per_device_train_batch_size": 8,
                              "gradient_accumulation_steps": max(1, int(section["global_batch_size"]) // 8)}}[name]
    per_step = int(section["global_batch_size"])
    return sft.sft_config(cfg, out_dir, has_dev=False, max_steps=max(2, examples // per_step),
                          **common_args, **changes)


def run_variant(cfg, name, rows):
    model_cfg = cfg["models"][0]
    # kit-fullhead: trl's own CPU behaviour, every position through the loss's LM head
    patches.lm_head_on_labelled_positions_only(enabled=name != "kit-fullhead")
    common.set_seed(int(cfg["seed"]))
    model, tokenizer = common.load_model_and_tokenizer(model_cfg)
    meter = Throughput()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = SFTTrainer(model=model, args=variant_config(cfg, name, out_dir, len(rows)),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=sft.lora_config(cfg["sft"]), callbacks=[meter])
        trainer.train()
        args = trainer.args
    seconds, cpu_seconds, tokens = (end - start for end, start in zip(meter.end, meter.start))
    return {"variant": name, "tokens_per_s": tokens / seconds, "tokens_per_cpu_s": tokens / cpu_seconds,
            "tokens": int(tokens), "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "steps": args.max_steps, "per_device_batch": args.per_device_train_batch_size,
            "accumulation": args.gradient_accumulation_steps, "bf16": args.bf16,
            "activation_checkpointing": args.activation_checkpointing}


# ---------------------------------------------------------------------------- CAPO steps
def quick_sft_adapter(cfg, dataset, annotator, adapter_dir) -> None:
    """A one-step SFT adapter to start CAPO from: its weights do not change CAPO's cost."""
    model_cfg, task = cfg["models"][0], common.load_task(cfg, dataset)
    rows = sft.sft_examples(common.load_split(cfg, dataset, "train"), task, annotator)[:int(cfg["sft"]["global_batch_size"])]
    common.set_seed(int(cfg["seed"]))
    model, tokenizer = common.load_model_and_tokenizer(model_cfg)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = SFTTrainer(model=model, args=sft.sft_config(cfg, out_dir, has_dev=False, max_steps=1,
                                                              save_strategy="no", report_to="none"),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=sft.lora_config(cfg["sft"]))
        trainer.train()
        trainer.model.save_pretrained(adapter_dir)


def run_capo_variant(cfg, name, pairs, adapter_dir) -> dict:
    """Seconds of trl's reference pass (in DPOTrainer's constructor) and of the DPO steps on `pairs`."""
    capo = load_stage("05_capo")
    steps = max(1, len(pairs) // int(cfg["capo"]["global_batch_size"]))
    enabled = name != "kit-fullhead"
    patches.lm_head_on_labelled_positions_only(enabled)
    # build_trainer switches the labelled-positions head on; kit-fullhead keeps trl's own behaviour
    switch = mock.patch.object(patches, "lm_head_on_labelled_positions_only", lambda *a, **k: enabled)
    with tempfile.TemporaryDirectory() as out_dir, switch:
        started = time.perf_counter()
        trainer, _ = capo.build_trainer(cfg, cfg["models"][0], adapter_dir, pairs, [], out_dir, max_steps=steps,
                                        save_strategy="no", report_to="none", logging_strategy="no")
        reference = time.perf_counter() - started
        started = time.perf_counter()
        trainer.train()
        train = time.perf_counter() - started
    return {"variant": name, "pairs": len(pairs), "steps": steps, "reference_s": reference, "train_s": train}


def measure_capo(cfg, args, variants) -> None:
    capo = load_stage("05_capo")
    section, task = cfg["capo"], common.load_task(cfg, args.dataset)
    pairs = capo.build_pairs(common.load_split(cfg, args.dataset, "train"), task, args.annotator,
                             section["pair_policy"], section["score_delta"], section["rejected_valid_only"])
    pairs = capo.sample_pairs_across_items(pairs, args.pairs, f"{cfg['seed']}/{args.dataset}/{args.annotator}")
    runs = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as adapter_dir:
        quick_sft_adapter(cfg, args.dataset, args.annotator, adapter_dir)
        for repeat in range(args.repeats):
            for name in variants:  # interleaved
                result = run_capo_variant(cfg, name, pairs, adapter_dir)
                runs[name].append(result)
                print(f"  capo repeat {repeat + 1} {name:12s} reference pass {result['reference_s']:6.1f} s, "
                      f"{result['steps']} DPO steps {result['train_s']:6.1f} s ({result['pairs']} pairs)", flush=True)
    median = {name: {key: statistics.median(r[key] for r in results) for key in ("reference_s", "train_s")}
              for name, results in runs.items()}
    for name in variants:
        print(f"capo {name:12s} median: reference pass {median[name]['reference_s']:.1f} s, "
              f"DPO steps {median[name]['train_s']:.1f} s", flush=True)
    if "kit" in median and "kit-fullhead" in median:
        total = {name: median[name]["reference_s"] + median[name]["train_s"] for name in ("kit", "kit-fullhead")}
        print(f"time_ratio=capo kit-fullhead/kit {total['kit-fullhead'] / total['kit']:.2f}")


# ---------------------------------------------------------------------------- memory (child processes)
def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # VmHWM: this process image's peak RSS. (getrusage's ru_maxrss survives fork + exec, so a
    # child would report its parent's peak.)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(cfg, dataset, annotator, method, steps, adapter_dir):
    model_cfg = cfg["models"][0]
    task = common.load_task(cfg, dataset)
    train = common.load_split(cfg, dataset, "train")
    with tempfile.TemporaryDirectory() as out_dir:
        if method == "sft":
            rows = sft.sft_examples(train, task, annotator)[:steps * int(cfg["sft"]["global_batch_size"])]
            common.set_seed(int(cfg["seed"]))
            model, tokenizer = common.load_model_and_tokenizer(model_cfg)
            trainer = SFTTrainer(model=model, args=sft.sft_config(cfg, out_dir, has_dev=False, max_steps=steps,
                                                                  save_strategy="no", report_to="none"),
                                 train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                 peft_config=sft.lora_config(cfg["sft"]))
            trainer.train()
            trainer.model.save_pretrained(adapter_dir)
        else:
            capo = load_stage("05_capo")
            section = cfg["capo"]
            pairs = capo.build_pairs(train, task, annotator, section["pair_policy"], section["score_delta"],
                                     section["rejected_valid_only"])
            pairs = pairs[:steps * int(section["global_batch_size"])]  # the reference pass covers these only
            trainer, _ = capo.build_trainer(cfg, model_cfg, adapter_dir, pairs, [], out_dir, max_steps=steps,
                                            save_strategy="no", report_to="none")
            trainer.train()
        args = trainer.args
    print(json.dumps({"method": method, "peak_mb": round(peak_memory_mb(), 1),
                      "measure": "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS (VmHWM)",
                      "steps": steps, "per_device_batch": args.per_device_train_batch_size,
                      "accumulation": args.gradient_accumulation_steps}))


def measure_memory(args) -> dict:
    """Peak memory of an SFT process and of a CAPO process started from its adapter."""
    results = {}
    with tempfile.TemporaryDirectory() as adapter_dir:
        for method in ("sft", "capo"):
            out = subprocess.run([sys.executable, __file__, "--config", str(args.config), "--dataset", args.dataset,
                                  "--annotator", args.annotator, "--memory-child", method,
                                  "--memory-steps", str(args.memory_steps), "--adapter-dir", adapter_dir],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                raise SystemExit(f"memory child {method} failed:\n{out.stderr[-3000:]}")
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="default: configs/cpu.yaml (--tiny: configs/smoke.yaml)")
    parser.add_argument("--dataset", default="varierr")
    parser.add_argument("--annotator", default="A0")
    parser.add_argument("--examples", type=int, default=48, help="training examples per throughput run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="kit,default",
                        help="comma-separated: kit, default, kit-fullhead, kit-bf16, kit+ckpt, kit-padfree, kit-batch8")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--parts", default="throughput,memory",
                        help="comma-separated: throughput (SFT), memory, capo (reference pass and DPO steps; "
                             "variants kit and kit-fullhead)")
    parser.add_argument("--pairs", type=int, default=16, help="CAPO pairs per run of the capo part")
    parser.add_argument("--memory-child", choices=["sft", "capo"], help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true",
                        help="smoke model, 8 examples (2 steps), 1 repeat, 1 memory step: checks the benchmark runs")
    args = parser.parse_args(argv)
    args.config = Path(args.config or ROOT / "configs" / ("smoke.yaml" if args.tiny else "cpu.yaml"))
    if not args.config.is_absolute():
        args.config = ROOT / args.config
    if args.tiny:
        args.examples, args.repeats, args.memory_steps, args.pairs = 8, 1, 1, 4
    cfg = common.load_config(args.config)

    if args.memory_child:
        return memory_child(cfg, args.dataset, args.annotator, args.memory_child, args.memory_steps,
                            args.adapter_dir)

    parts = args.parts.split(",")
    if "memory" in parts:
        memory = measure_memory(args)
        capo_over_sft = memory["capo"]["peak_mb"] / memory["sft"]["peak_mb"]
        print(f"memory ({memory['sft']['measure']}): sft {memory['sft']['peak_mb']:.0f} MB "
              f"(batch {memory['sft']['per_device_batch']} examples), capo {memory['capo']['peak_mb']:.0f} MB "
              f"(batch {memory['capo']['per_device_batch']} pairs); capo/sft = {capo_over_sft:.2f} "
              "(target <= 1.3)", flush=True)
    if "capo" in parts:
        measure_capo(cfg, args, [name for name in args.variants.split(",") if name in ("kit", "kit-fullhead")])
    if "throughput" not in parts:
        return
    rows = sft_rows(cfg, args.dataset, args.annotator, args.examples)
    variants = args.variants.split(",")
    print(f"model {cfg['models'][0]['tag']}, {args.dataset}/{args.annotator}: {len(rows)} examples per run, "
          f"{args.repeats} repeats, torch threads {torch.get_num_threads()}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}; load average {os.getloadavg()[0]:.1f}",
          flush=True)
    runs = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name in variants:  # interleaved, so a busy spell on the machine hits every variant
            result = run_variant(cfg, name, rows)
            runs[name].append(result)
            print(f"  repeat {repeat + 1} {name:11s} {result['tokens_per_s']:8.1f} tokens/s, "
                  f"{result['tokens_per_cpu_s']:8.1f} tokens/CPU-s ({result['tokens']} tokens in "
                  f"{result['seconds']}s, {result['cpu_seconds']} CPU-s; batch {result['per_device_batch']} x "
                  f"{result['accumulation']}, bf16 {result['bf16']}, "
                  f"checkpointing {result['activation_checkpointing']})", flush=True)
    median = {name: statistics.median(r["tokens_per_s"] for r in results) for name, results in runs.items()}
    median_cpu = {name: statistics.median(r["tokens_per_cpu_s"] for r in results) for name, results in runs.items()}
    for name in variants:
        print(f"{name:11s} median {median[name]:8.1f} tokens/s, {median_cpu[name]:8.1f} tokens/CPU-s", flush=True)
    if "kit" in median and "default" in median:
        print(f"kit / default per CPU-second: {median_cpu['kit'] / median_cpu['default']:.2f}; "
              f"per wall-clock second: {median['kit'] / median['default']:.2f} (load average now "
              f"{os.getloadavg()[0]:.1f})", flush=True)
    if "kit" in median and "default" in median:
        print(f"ratio={median['kit'] / median['default']:.2f}")


if __name__ == "__main__":
    main()
