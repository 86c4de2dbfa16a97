"""03_prompt_baselines.py: the prompting baselines Base, ICL, VP and VP-ICL -> predictions JSONL.

    python 03_prompt_baselines.py --config configs/cpu.yaml --dataset varierr
    python 03_prompt_baselines.py --config configs/cpu.yaml --baselines.methods "[base, icl]"
    accelerate launch --num_processes 2 03_prompt_baselines.py --config configs/paper.yaml   # annotators shared out

Each method asks for `Label: ...` / `Explanation: ...` as the target annotator: base with the ID and
task only, icl with baselines.icl_k of the annotator's train responses as earlier turns, vp with a
value profile the writer model made from a sample of them (cached under profiles/), vp_icl with
both; only train records are shown. Writes predictions/<dataset>/<model>/<method>/<annotator>.jsonl;
current files are kept. Our choices: docs/CHOICES.md, "Prompting baselines".
"""
from __future__ import annotations

import random
import time

import common

METHODS = ("base", "icl", "vp", "vp_icl")


# ---- demonstrations and profile sources: train records of the target annotator only --------
def sample_train_records(train: list[dict], annotator: str, k: int, seed: int, purpose: str) -> list[dict]:
    """A seeded sample of up to k of `annotator`'s train records (all of them if fewer); sorted first,
    so independent of file order, and seeded per purpose ("icl", "profile"), dataset and annotator."""
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


def profile_request(cfg: dict, dataset: str, annotator: str, task: dict, train: list[dict],
                    writer_cfg: dict) -> dict:
    """What `annotator`'s value profile is written from, and its cache key (no model needed)."""
    base_cfg = cfg["baselines"]
    gen_cfg = dict(cfg["generation"], max_new_tokens=base_cfg["profile_max_new_tokens"])
    sources = sample_train_records(train, annotator, base_cfg["profile_source_examples"], cfg["seed"], "profile")
    messages = profile_messages(task, annotator, sources, base_cfg["profile_max_new_tokens"] // 2)
    key = common.config_hash({k: v for k, v in writer_cfg.items() if k != "tag"}, messages,
                             {k: gen_cfg[k] for k in ("max_new_tokens", "do_sample", "temperature")},
                             cfg["seed"])
    folder = common.profiles_dir(cfg, dataset)
    return {"dataset": dataset, "annotator": annotator, "sources": sources, "messages": messages, "key": key,
            "gen_cfg": gen_cfg, "text_path": folder / f"{annotator}.txt", "meta_path": folder / f"{annotator}.json"}


def profile_is_current(request: dict) -> bool:
    return (request["text_path"].is_file() and request["meta_path"].is_file()
            and common.read_json(request["meta_path"]).get("key") == request["key"])


def write_value_profiles(cfg: dict, dataset: str, requests: list[dict], model, tokenizer, writer_tag: str) -> None:
    """Write the profiles of `requests` with the writer model (one batch)."""
    if not requests:
        return
    if requests[0]["gen_cfg"]["do_sample"]:
        common.set_seed(cfg["seed"])
    texts = common.generate_texts(model, tokenizer, [r["messages"] for r in requests], requests[0]["gen_cfg"],
                                  desc=f"{dataset} profiles")
    for request, text in zip(requests, texts):
        profile, annotator = text.strip(), request["annotator"]
        if not profile:
            print(f"[03] warning: {dataset} {annotator}: the writer model returned an empty profile; "
                  "vp prompts for this annotator carry none", flush=True)
        common.atomic_write_text(request["text_path"], profile + ("\n" if profile else ""))
        common.write_json(request["meta_path"], {
            "key": request["key"], "writer_model": writer_tag, "annotator": annotator, "dataset": dataset,
            "source_item_ids": [r["item_id"] for r in request["sources"]], "prompt": request["messages"]})
        print(f"[03] {dataset} {annotator}: value profile written ({len(profile.split())} words)", flush=True)


# ---- stage ----------------------------------------------------------------------------------------
def prompt_kwargs(method: str, demonstrations: list[dict], profile: str | None) -> dict:
    return {"base": {}, "icl": {"demonstrations": demonstrations}, "vp": {"profile": profile},
            "vp_icl": {"profile": profile, "demonstrations": demonstrations}}[method]


def ordered_models(cfg: dict) -> list[dict]:
    """The config's models, the profile writer first (it writes profiles before it predicts)."""
    models = common.model_configs(cfg)
    writer = cfg["baselines"]["profile_writer"] or models[0]["tag"]
    tags = [m["tag"] for m in models]
    if writer not in tags:
        raise common.InputError(f"{cfg['config_path']}: baselines.profile_writer '{writer}' is not one of "
                                f"the models {tags}")
    return sorted(models, key=lambda m: m["tag"] != writer)


# The config sections a predictions file is made from, besides 01's files and (vp methods) the
# value profile; `models[]` is the entry of the file's model.
CONFIG_SECTIONS = ("seed", "torch_threads", "data", "generation", "baselines", "models[]")


def prediction_recipe(cfg: dict, dataset: str, model_cfg: dict, method: str, profile_path) -> dict:
    """What one predictions file depends on: 01's files, the profile (vp methods), the config."""
    inputs = common.data_files(cfg, dataset) + ([profile_path] if method.startswith("vp") else [])
    return common.recipe(cfg, "03_prompt_baselines", inputs, CONFIG_SECTIONS, model_tag=model_cfg["tag"],
                         method=method, bf16_native=common.native_bf16())


def main(argv: list[str] | None = None) -> None:
    parser = common.stage_parser(__doc__)
    args, cfg = common.parse_stage_args(parser, argv)
    common.require_models(cfg)  # a missing hub model stops here, in one line
    common.set_seed(cfg["seed"])
    base_cfg, gen_cfg = cfg["baselines"], cfg["generation"]
    methods = list(base_cfg["methods"])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise common.InputError(f"{cfg['config_path']}: baselines.methods has unknown {unknown} "
                                f"(known: {list(METHODS)})")
    models = ordered_models(cfg)
    writer = models[0]

    # ---- data: train records feed demonstrations and profiles; test items are asked ----
    data = {}
    for dataset in common.selected_datasets(cfg, args.dataset):
        common.require_data(cfg, dataset)
        train = common.load_split(cfg, dataset, "train")
        held_out = common.load_split(cfg, dataset, "dev") + common.load_split(cfg, dataset, "test")
        check_no_leakage(train, held_out, dataset)
        test = common.load_eval_split(cfg, dataset, "test")
        data[dataset] = {"train": train, "test": test, "task": common.load_task(cfg, dataset),
                         "annotators": common.dataset_annotators(cfg, dataset)}
    # Under `accelerate launch`, each process takes its share of the (dataset, annotator) units: their
    # value profiles and predictions files. A file is one generation call whichever process makes
    # it, so N processes write the bytes one process writes.
    units = common.this_process_share([(d, a) for d in data for a in data[d]["annotators"]])
    demonstrations = {(d, a): sample_train_records(data[d]["train"], a, base_cfg["icl_k"], cfg["seed"], "icl")
                      for d, a in units}
    for (d, a), demos in demonstrations.items():
        if any(m in ("icl", "vp_icl") for m in methods) and len(demos) < base_cfg["icl_k"]:
            print(f"[03] {d} {a}: only {len(demos)} train records for icl_k={base_cfg['icl_k']}", flush=True)
    profile_requests = {(d, a): profile_request(cfg, d, a, data[d]["task"], data[d]["train"], writer)
                        for d, a in units}

    # ---- plan: a predictions file is redone when missing or stale (its manifest says from what) ----
    todo = []  # (model_cfg, dataset, annotator, method, why)
    for model_cfg in models:
        for dataset, annotator in units:
            for method in methods:
                path = common.predictions_path(cfg, dataset, model_cfg["tag"], method, annotator)
                request = profile_requests[(dataset, annotator)]
                made_from = prediction_recipe(cfg, dataset, model_cfg, method, request["text_path"])
                reason = "--force" if args.force else common.why_not_current(path, made_from)
                if not reason and method.startswith("vp") and not profile_is_current(request):
                    reason = "its value profile is missing or stale"
                if args.dry_run:
                    common.say_plan("03", path, reason)
                elif reason:
                    todo.append((model_cfg, dataset, annotator, method, reason))
    if args.dry_run:
        for request in profile_requests.values():
            if any(m.startswith("vp") for m in methods):
                common.say_plan("03", request["text_path"], None if profile_is_current(request) else
                                "missing, or written from other sources, writer model, decoding or seed")
        return
    print(f"[03] {len(todo)} of {len(models) * len(units) * len(methods)} predictions files to (re)do"
          f"{common.process_label()}; the rest are current", flush=True)
    stale_profiles = [request for (d, a), request in profile_requests.items() if not profile_is_current(request)
                      and any(m.startswith("vp") for _, d2, a2, m, _ in todo if (d2, a2) == (d, a))]

    # ---- models: each loaded once, only if it has work; the profile writer goes first ----
    summary = []
    for model_cfg in models:
        jobs = [job for job in todo if job[0] is model_cfg]
        writes_profiles = model_cfg is writer and stale_profiles
        if not jobs and not writes_profiles:
            continue
        model, tokenizer = common.load_model_and_tokenizer(model_cfg)
        tag = model_cfg["tag"]
        if writes_profiles:
            for dataset in data:
                write_value_profiles(cfg, dataset, [r for r in stale_profiles if r["dataset"] == dataset],
                                     model, tokenizer, tag)

        # ---- work: one file per dataset, method and annotator, each with its manifest ----
        for _, dataset, annotator, method, reason in jobs:
            d, started = data[dataset], time.time()
            request = profile_requests[(dataset, annotator)]
            profile = request["text_path"].read_text(encoding="utf-8").strip() if method.startswith("vp") else None
            requests = common.annotator_requests(
                d["test"], d["task"], annotator, **prompt_kwargs(method, demonstrations[(dataset, annotator)], profile))
            predictions = common.generate_predictions(
                model, tokenizer, requests, d["task"], gen_cfg, method=method, model_tag=tag,
                seed=cfg["seed"], desc=f"{dataset} {tag} {method} {annotator}")
            path = common.predictions_path(cfg, dataset, tag, method, annotator)
            common.forget_output(path)
            common.write_jsonl(path, predictions)
            common.save_resolved_config(cfg, path.parent, stage="03_prompt_baselines", argv=argv)
            common.write_manifest(path, prediction_recipe(cfg, dataset, model_cfg, method, request["text_path"]))
            rate = common.parse_rate(predictions)
            summary.append((dataset, tag, method, annotator, len(predictions), rate))
            rate_text = "n/a" if rate is None else f"{rate:.1%}"
            print(f"[03] {path} ({reason}): {len(predictions)} predictions, parse rate {rate_text}, "
                  f"{time.time() - started:.0f}s", flush=True)
        del model

    summary = common.gather_to_all(summary)
    if not common.is_main_process():
        return
    print("[03] parse rate per dataset, model and method:")
    for dataset, tag, method in sorted({s[:3] for s in summary}):
        rows = [s for s in summary if s[:3] == (dataset, tag, method)]
        total = sum(s[4] for s in rows)
        parsed = sum(round(s[4] * s[5]) for s in rows if s[5] is not None)
        print(f"  {dataset:10s} {tag:16s} {method:7s} {parsed}/{total} parsed"
              + (f" ({parsed / total:.1%})" if total else ""))


if __name__ == "__main__":
    common.run_stage(main)
