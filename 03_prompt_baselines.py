"""03_prompt_baselines.py: Base, ICL, VP and VP-ICL prompting -> predictions JSONL.

    python 03_prompt_baselines.py --config configs/cpu.yaml --dataset varierr
    python 03_prompt_baselines.py --config configs/smoke.yaml --dataset all
    python 03_prompt_baselines.py --config configs/cpu.yaml --baselines.methods "[base, icl]" --baselines.icl_k 10
    accelerate launch 03_prompt_baselines.py --config configs/paper.yaml   # annotators are shared out over processes

Methods (PAPER_NOTES 3 and 10), all asking for `Label: ...` / `Explanation: ...`:
  base    the annotator ID and the task instructions only
  icl     + k demonstrations: the target annotator's own train responses (baselines.icl_k)
  vp      + a value profile: the profile writer model's short description of how the
          annotator decides and explains, written from a sample of their train responses
  vp_icl  profile and demonstrations together

Writes runs/<profile>/predictions/<dataset>/<model>/<method>/<annotator>.jsonl (one
generation per test item the annotator labelled, DESIGN.md prediction records; with
data.max_eval_items, per item of a seeded sample of test items, as in 04-06) with a
config.resolved.yaml in each method folder, and runs/<profile>/profiles/<dataset>/
<annotator>.txt (+ .json: cache key, writer model, source items, prompt). A profile is
reused while its key (writer model, prompt with its source responses, decoding settings)
is unchanged and rewritten otherwise. The parse rate of every file is printed.

Our choices where the paper is silent: demonstrations and profile sources are seeded
random samples of the annotator's own train records (salted by purpose, dataset and
annotator), the same demonstrations for every test item, in sampled order; one model
(baselines.profile_writer, default the config's first) writes every profile, so all
models are conditioned on the same text; only train records are ever shown, and a
train item that is also a dev or test item stops the stage.
"""
from __future__ import annotations

import os
import random
import time

import common

METHODS = ("base", "icl", "vp", "vp_icl")


# ---- demonstrations and profile sources: train records of the target annotator only --------
def sample_train_records(train: list[dict], annotator: str, k: int, seed: int, purpose: str) -> list[dict]:
    """A seeded sample of up to k of `annotator`'s train records (all of them if fewer).

    Sorting first makes the sample independent of file order; the string seed makes it
    differ per purpose ("icl", "profile"), dataset and annotator.
    """
    own = sorted((r for r in train if r["annotator"] == annotator and r["split"] == "train"),
                 key=lambda r: (r["item_id"], str(r["label"]), r["explanation"]))
    dataset = own[0]["dataset"] if own else ""
    rng = random.Random(f"{seed}:{purpose}:{dataset}:{annotator}")
    return rng.sample(own, min(int(k), len(own)))


def check_no_leakage(train: list[dict], held_out: list[dict], dataset: str) -> None:
    """Stop if an item of the train split is also a dev or test item."""
    held_out_ids = {r["item_id"] for r in held_out}
    for record in train:
        if record["split"] != "train" or record["item_id"] in held_out_ids:
            raise common.InputError(
                f"{dataset}: train.jsonl item {record['item_id']} is also a dev/test item "
                f"(or has split '{record['split']}'): demonstrations and profiles would leak it; "
                "re-run 01_prepare")


# ---- value profiles ---------------------------------------------------------------------------
def profile_messages(task: dict, annotator: str, sources: list[dict], max_words: int) -> list[dict]:
    """Ask the writer model for a short description of how `annotator` decides and explains."""
    examples = "\n\n".join(
        f"Example {n}:\n{common.item_text(task, r['text_a'], r['text_b'])}\n"
        f"{common.format_response(r['label'], r['explanation'])}"
        for n, r in enumerate(sources, 1))
    return [
        {"role": "system", "content": "You describe how one annotator of a labelling task decides "
                                      "and explains their decisions."},
        {"role": "user", "content": (
            f"The task given to annotator {annotator}: {task['instruction']}\n\n"
            f"Here are {len(sources)} of annotator {annotator}'s answers.\n\n{examples}\n\n"
            f"In at most {max_words} words, describe how annotator {annotator} decides and explains: "
            "which labels they tend to choose and when, and what their explanations look like "
            "(length, wording, tone, what they point to). Write only the description.")},
    ]


def write_value_profiles(cfg: dict, dataset: str, annotators: list[str], task: dict, train: list[dict],
                         model, tokenizer, model_cfg: dict) -> dict[str, str]:
    """Profiles of `annotators`: read from runs/<profile>/profiles/ when their key matches, else written."""
    base_cfg = cfg["baselines"]
    gen_cfg = dict(cfg["generation"], max_new_tokens=base_cfg["profile_max_new_tokens"])
    folder = common.run_dir(cfg) / "profiles" / dataset
    profiles, todo = {}, []
    for annotator in annotators:
        sources = sample_train_records(train, annotator, base_cfg["profile_source_examples"],
                                       cfg["seed"], "profile")
        messages = profile_messages(task, annotator, sources, base_cfg["profile_max_new_tokens"] // 2)
        key = common.config_hash({k: v for k, v in model_cfg.items() if k != "tag"}, messages,
                                 {k: gen_cfg.get(k) for k in ("max_new_tokens", "do_sample", "temperature")},
                                 cfg["seed"])
        meta_path = folder / f"{annotator}.json"
        if meta_path.exists() and (folder / f"{annotator}.txt").exists() and common.read_json(meta_path).get("key") == key:
            profiles[annotator] = (folder / f"{annotator}.txt").read_text(encoding="utf-8")
            print(f"[03] {dataset} {annotator}: value profile reused ({folder / f'{annotator}.txt'})", flush=True)
        else:
            todo.append((annotator, sources, messages, key))
    if todo:
        if gen_cfg.get("do_sample"):
            common.set_seed(cfg["seed"])
        texts = common.generate_texts(model, tokenizer, [m for _, _, m, _ in todo], gen_cfg,
                                      desc=f"{dataset} profiles")
        for (annotator, sources, messages, key), text in zip(todo, texts):
            profile = text.strip()
            if not profile:
                print(f"[03] warning: {dataset} {annotator}: the writer model returned an empty profile; "
                      "vp prompts for this annotator carry none", flush=True)
            common.atomic_write_text(folder / f"{annotator}.txt", profile + ("\n" if profile else ""))
            common.write_json(folder / f"{annotator}.json", {
                "key": key, "writer_model": model_cfg["tag"], "annotator": annotator, "dataset": dataset,
                "source_item_ids": [r["item_id"] for r in sources], "prompt": messages})
            profiles[annotator] = profile
            print(f"[03] {dataset} {annotator}: value profile written ({len(profile.split())} words)", flush=True)
    return {a: profiles[a].strip() for a in annotators}


# ---- stage ----------------------------------------------------------------------------------------
def prompt_kwargs(method: str, demonstrations: list[dict], profile: str | None) -> dict:
    return {"base": {}, "icl": {"demonstrations": demonstrations}, "vp": {"profile": profile},
            "vp_icl": {"profile": profile, "demonstrations": demonstrations}}[method]


def ordered_models(cfg: dict) -> list[dict]:
    """The config's models, the profile writer first (it writes profiles before it predicts)."""
    models = common.model_configs(cfg)
    writer = cfg["baselines"].get("profile_writer") or models[0]["tag"]
    tags = [m["tag"] for m in models]
    if writer not in tags:
        raise common.InputError(f"{cfg['config_path']}: baselines.profile_writer '{writer}' is not one of "
                                f"the models {tags}")
    return sorted(models, key=lambda m: m["tag"] != writer)


def main(argv: list[str] | None = None) -> None:
    parser = common.stage_parser(__doc__)
    args, cfg = common.parse_stage_args(parser, argv)
    common.require_models(cfg)  # a missing hub model stops here, in one line
    common.set_seed(cfg["seed"])
    base_cfg, gen_cfg = cfg["baselines"], cfg["generation"]
    methods = list(base_cfg["methods"])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise common.InputError(f"{cfg['config_path']}: baselines.methods has unknown {unknown} (known: {list(METHODS)})")

    # ---- data: train records feed demonstrations and profiles; test items are asked ----
    data = {}
    for dataset in common.selected_datasets(cfg, args.dataset):
        train = common.load_split(cfg, dataset, "train")
        check_no_leakage(train, common.load_split(cfg, dataset, "dev") + common.load_split(cfg, dataset, "test"), dataset)
        test = common.load_eval_split(cfg, dataset, "test")
        data[dataset] = {"train": train, "test": test, "task": common.load_task(cfg, dataset),
                         "annotators": common.dataset_annotators(cfg, dataset)}
    # Under `accelerate launch`, each process takes every world_size-th (dataset, annotator).
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    units = [(d, a) for d in data for a in data[d]["annotators"]][rank::world]
    demonstrations = {(d, a): sample_train_records(data[d]["train"], a, base_cfg["icl_k"], cfg["seed"], "icl")
                      for d, a in units}
    for (d, a), demos in demonstrations.items():
        if any(m in ("icl", "vp_icl") for m in methods) and len(demos) < base_cfg["icl_k"]:
            print(f"[03] {d} {a}: only {len(demos)} train records for icl_k={base_cfg['icl_k']}", flush=True)

    # ---- models: each loaded once; the profile writer goes first ----
    profiles: dict[tuple[str, str], str | None] = {}
    summary = []
    for model_cfg in ordered_models(cfg):
        model, tokenizer = common.load_model_and_tokenizer(model_cfg)
        tag = model_cfg["tag"]
        if any(m.startswith("vp") for m in methods) and not profiles:
            for dataset, d in data.items():
                mine = [a for ds, a in units if ds == dataset]
                written = write_value_profiles(cfg, dataset, mine, d["task"], d["train"], model, tokenizer, model_cfg)
                profiles.update({(dataset, a): text for a, text in written.items()})

        # ---- work: one file per dataset, method and annotator ----
        for dataset, annotator in units:
            d = data[dataset]
            for method in methods:
                started = time.time()
                requests = common.annotator_requests(
                    d["test"], d["task"], annotator,
                    **prompt_kwargs(method, demonstrations[(dataset, annotator)], profiles.get((dataset, annotator))))
                predictions = common.generate_predictions(
                    model, tokenizer, requests, d["task"], gen_cfg, method=method, model_tag=tag,
                    seed=cfg["seed"], desc=f"{dataset} {tag} {method} {annotator}")
                path = common.predictions_path(cfg, dataset, tag, method, annotator)
                common.write_jsonl(path, predictions)
                rate = common.parse_rate(predictions)
                summary.append((dataset, tag, method, annotator, len(predictions), rate))
                rate_text = "n/a" if rate is None else f"{rate:.1%}"
                print(f"[03] {path}: {len(predictions)} predictions, parse rate {rate_text}, "
                      f"{time.time() - started:.0f}s", flush=True)

        # ---- save: the resolved config beside every method folder ----
        if rank == 0:
            for dataset in data:
                for method in methods:
                    folder = common.predictions_path(cfg, dataset, tag, method, "x").parent
                    common.save_resolved_config(cfg, folder, stage="03_prompt_baselines", argv=argv)
        del model

    print("[03] parse rate per dataset, model and method:")
    for dataset, tag, method in dict.fromkeys((s[0], s[1], s[2]) for s in summary):
        rows = [s for s in summary if s[:3] == (dataset, tag, method)]
        total = sum(s[4] for s in rows)
        parsed = sum(round(s[4] * s[5]) for s in rows if s[5] is not None)
        print(f"  {dataset:10s} {tag:16s} {method:7s} {parsed}/{total} parsed"
              + (f" ({parsed / total:.1%})" if total else ""))


if __name__ == "__main__":
    common.run_stage(main)
