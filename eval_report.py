"""eval_report.py: 06_eval.py's presentation: tables, figures, report.md, the human-validation form and its
scores' markdown, from the plain dicts and the metric registry 06 hands over. It opens no run file and never
imports 06 (not a module name), so the few names both need (the human row's name, formats, group sizes) live here.
"""
from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

import common  # noqa: E402

HUMAN = "human"  # reference row: the target's own held-out test explanations, scored the same way
RATING_SCALE = (1, 5)  # human validation's ratings (our protocol; 06_eval.py, block HUMAN VALIDATION)

# The paper's numbers as summarised second-hand (VariErr NLI), shown beside ours as the paper's.
PAPER_TABLE4 = [
    # model, method, label acc, feature KL, group clf conf, norm. imitation
    ("Qwen3-4B", "base", 0.472, None, None, None),
    ("Qwen3-4B", "sft", 0.638, 0.084, 0.845, 0.859),
    ("Qwen3-4B", "capo", 0.627, 0.081, 0.867, 0.888),
    ("Llama-3.2-3B", "base", 0.315, None, None, None),
    ("Llama-3.2-3B", "sft", 0.512, 0.113, 0.909, 0.946),
    ("Llama-3.2-3B", "capo", 0.512, 0.121, 0.924, 0.964),
]
PAPER_JUDGE = {"dataset": "varierr", "method": "capo", "accuracy": 0.328, "chance": 0.25}
# LeWiDi-2025's published results (the overview and Opt-ICL's paper), lower is better, labelled
# "published" in tables/lewidi.*: (dataset, system, soft, perspectivist)
PUBLISHED_LEWIDI = [
    ("par", "best system (twinhter)", None, 0.080),
    ("par", "Opt-ICL", None, 0.119),
    ("par", "most frequent label baseline", None, 0.362),
    ("par", "random label baseline", None, 0.367),
    ("varierr", "best system (twinhter)", None, 0.124),
    ("varierr", "Opt-ICL", None, 0.270),
    ("varierr", "most frequent label baseline", None, 0.345),
    ("varierr", "random label baseline", None, 0.497),
    ("varierr", "best system (joint first)", 0.31, None),
]
LEWIDI_CAVEAT = ("The shared task's blind test inputs carried each annotator's own explanation of the test item, "
                 "and the top systems used it; the kit's models see only the two texts, so the published numbers "
                 "are not a like-for-like comparison.")


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, (bool, int)) else f"{value:.{digits}f}"


def fmt_ci(value, interval, digits: int = 3) -> str:
    """`value [low, high]`; the value alone when it has no interval."""
    if interval is None or value is None or isinstance(value, (bool, int)):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(interval[0], digits)}, {fmt(interval[1], digits)}]"


# ---- Tables: markdown + CSV; every cell is a value or says why not ----------------------------
def rows_index(rows: list[dict]) -> dict[tuple, dict]:
    """06's results rows pooled over seeds, by (dataset, model, method, target, metric, m, feature)."""
    return {(r["dataset"], r["model"], r["method"], r["target"], r["metric"], r["m"], r["feature"]): r
            for r in rows if r["seed"] is None}


def cell(index: dict, where: tuple, metric, task: dict, m: int | None = None, feature: str | None = None) -> str:
    """`value [low, high]` of registry `metric` at `where` = (dataset, model, method, target), from
    the results rows; or why not: "missing: <why>" / "n/a: <why>"."""
    if task["label_type"] not in metric.tasks:
        return f"n/a: {metric.label} is for {' and '.join(metric.tasks)} tasks"
    row = index.get((*where, metric.name, m, feature))
    if row is None or row["value"] is None:
        reason = row["reason"] if row else "not computed"
        return reason if reason.startswith("n/a: ") else f"missing: {reason}"
    return fmt_ci(row["value"], None if row["ci_low"] is None else [row["ci_low"], row["ci_high"]])


def write_table(path_stem: Path, header: list[str], rows: list[list[str]], title: str, notes: list[str]) -> str:
    """CSV with every cell in full; markdown with "missing: why" / "n/a: why" cells shortened to
    "missing [k]" / "n/a [k]", each reason listed once under the table. Returns the markdown."""
    footnotes: dict[str, int] = {}

    def md_cell(text: str) -> str:
        text = str(text)
        for prefix in ("missing: ", "n/a: "):
            if text.startswith(prefix):
                number = footnotes.setdefault(text[len(prefix):], len(footnotes) + 1)
                text = f"{prefix[:-2]} [{number}]"
        return text.replace("|", "\\|").replace("\n", " ")

    body = ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *body, ""]
    lines += [f"- {note}" for note in notes]
    lines += [f"- [{number}] {reason}" for reason, number in footnotes.items()]
    markdown = "\n".join(lines) + "\n"
    common.atomic_write_text(path_stem.with_suffix(".md"), markdown)
    write_csv(path_stem.with_suffix(".csv"), header, rows)
    return markdown


def write_csv(path: Path, columns: list[str], rows: list) -> None:
    """A CSV of list rows, or of dict rows keyed by the columns."""
    with common.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows([[row.get(c, "") for c in columns] if isinstance(row, dict) else row for row in rows])


def ordered_methods(methods: dict) -> list[str]:
    return sorted(methods, key=lambda method: method == HUMAN)  # the human reference row last


def result_cells(results: dict):
    """(dataset, model tag, method, result) for every table row group, methods in table order."""
    for dataset, models in results.items():
        for model_tag, methods in models.items():
            for method in ordered_methods(methods):
                yield dataset, model_tag, method, methods[method]


def method_label(method: str) -> str:
    return "human (target's test explanations)" if method == HUMAN else method


def requested_group_sizes(ev: dict) -> list[int]:
    """eval.group_sizes in the config's order without repeats (as 06 scores them)."""
    return list(dict.fromkeys(int(m) for m in ev["group_sizes"]))


def primary_group_size(ev: dict) -> int:
    """The m behind the plain group metric names (and the claims): the largest requested."""
    return max(requested_group_sizes(ev))


def group_sizes_used(result: dict, sizes: list[int]) -> str:
    """`1, 5, 10, 50->18`: each requested m, with the m used where the cap changed it (a range over
    targets where they differ)."""
    parts = []
    for m in sizes:
        span = (result.get("group_m_used") or {}).get(str(m))
        low, high = (span, span) if isinstance(span, int) else span or (None, None)  # an int: one target's
        parts.append(f"{m}->missing" if span is None else str(m) if low == high == m else
                     f"{m}->{low}" if low == high else f"{m}->{low}-{high}")
    return ", ".join(parts)


def table_notes(cfg: dict, features: list[str]) -> tuple[list[str], list[str]]:
    """(the notes under Table 4 and the per-annotator table, the notes on group sizes)."""
    ev = cfg["eval"]
    share = float(ev["group_size_max_share"])
    group_notes = [
        "Group clf conf and norm. imitation at each m of eval.group_sizes "
        f"({', '.join(map(str, requested_group_sizes(ev)))}); "
        f"the plain columns of Table 4 are m = {primary_group_size(ev)} (the paper's group size). [low, high]: 95% "
        f"bootstrap interval over test items, {int(ev['bootstrap_group_draws'])} groups redrawn per resample.",
        f"Cap (our choice): each m is used as min(m, floor({share:g} x n)), n = min(the target's outputs, its human "
        "test responses), so a group is a real subsample and never the whole set; the human reference uses the "
        "same m. 'm used' lists each requested m, with '->' the m used where the cap changed it (a range over "
        "target annotators where they differ). Two requested m that cap to the same m have the same value. A "
        "cap below 1 leaves the value missing.",
        "Why several m: a group of m outputs averages out item content and noise, so confidence rises with m; when m "
        "approaches the n outputs there are, every group is nearly the same set and each target's value is close to "
        "0 or 1 (the macro mean then moves in steps of 1/annotators: it saturates). Small m grades how "
        "recognisable single outputs are.",
    ]
    return [
        "Per target annotator, then the mean over annotators. Unparsed outputs count as wrong "
        "(label), as the worst possible error (MAE) and are scored on their raw text (explanations).",
        f"[low, high]: 95% percentile interval from {int(ev['bootstrap_resamples'])} bootstrap resamples of the "
        "test items, drawn per target annotator (seeded; the same resamples for every method). Group metrics "
        f"redraw {int(ev['bootstrap_group_draws'])} groups inside each resample with the classifier fixed; "
        "feature KL is recomputed on each resample (a resample repeats items, so its histograms are coarser "
        "and its KL is biased upwards: the interval can sit above the value).",
        "ROUGE-L (stemmed), BERTScore F1 "
        f"({ev['bertscore_model']}, layer {ev['bertscore_num_layers'] or 'default'}) and embedding cosine: "
        "max over the target's reference explanations for the item.",
        f"Feature KL: KL(human || model) over {int(ev['feature_bins'])} fixed train-quantile bins "
        f"(smoothing {ev['kl_smoothing']}), averaged over {len(features)} features (our definition).",
        f"Group clf conf: probability of the target for averaged groups of m outputs "
        f"({ev['classifier_representation']}, {int(ev['bootstrap_groups'])} bootstrap groups; m = "
        f"{primary_group_size(ev)}, the largest of eval.group_sizes, capped at "
        f"floor({float(ev['group_size_max_share']):g} x n), n = min(the target's outputs, its human test "
        "responses), so that a group is a real subsample; 'group m' is the smallest m used). "
        "Norm. imitation = that confidence / the same for the target's human test explanations at the same m "
        "(our definition). Every m of eval.group_sizes: tables/group_sizes.",
        "Judge attribution: share of single outputs the judge attributes to the target annotator; its "
        "chance (tables/judge_attribution) is always naming the most frequent target; the figures' chance line "
        "is 1/annotators, every annotator being a candidate.",
    ], group_notes


def write_tables(cfg: dict, results: dict, result_rows: list[dict], datasets: dict, metrics, features: list[str],
                 tables_dir: Path) -> dict[str, str]:
    """Table 4, Table 6, judge attribution, the per-annotator breakdown and the group sizes, each as
    .md and .csv: the numbers from 06's results rows, the columns from its metric registry
    (`metrics`), each row's status, notes and judge counts from `results`. Returns {table: markdown}."""
    ev, index = cfg["eval"], rows_index(result_rows)
    sizes, shown = requested_group_sizes(ev), [m for m in metrics if m.table]
    main = [(metric, primary_group_size(ev) if metric.kind == "group" else None) for metric in shown]
    group, kl = [m for m in shown if m.kind == "group"], next(m for m in metrics if m.kind == "distribution")
    rows: dict[str, list] = {"table4": [], "table6": [], "judge": [], "per_annotator": [], "group_sizes": []}
    routes = set()
    for dataset, model_tag, method, result in result_cells(results):
        task, label, status = datasets[dataset]["task"], method_label(method), result["status"]
        where, why = (dataset, model_tag, method, "macro"), f"missing: {result.get('reason', 'no predictions')}"
        missing = status == "missing"
        rows["table4"].append([dataset, model_tag, label, status, *([why] * len(shown) if missing else
                               [cell(index, where, metric, task, m) for metric, m in main]), result.get("note", "")])
        if method != HUMAN:
            rows["table6"].append([dataset, model_tag, method, status] + (
                [f"missing: {result.get('reason')}"] * (len(features) + 1) if missing else
                [cell(index, where, kl, task, feature=name) for name in features] + [cell(index, where, kl, task)]))
        rows["group_sizes"].append([dataset, model_tag, label, status] + (
            [why] * (len(group) * len(sizes) + 1) if missing else
            [cell(index, where, metric, task, m) for m in sizes for metric in group]
            + [group_sizes_used(result, sizes)]))
        if missing:  # one row, not one per annotator
            rows["per_annotator"].append([dataset, model_tag, label, "all", "missing"]
                                         + [f"missing: {result.get('reason', 'missing')}"] * (len(shown) + 1))
        for annotator in [] if missing else datasets[dataset]["annotators"]:
            entry = result.get("per_annotator", {}).get(annotator)
            if entry is None or entry.get("status") != "ok":
                reason = f"missing: {(entry or result).get('reason', 'missing')}"
                rows["per_annotator"].append([dataset, model_tag, label, annotator, "missing",
                                              *[reason] * (len(shown) + 1)])
            else:
                cells = [cell(index, (*where[:3], annotator), metric, task, m) for metric, m in main]
                rows["per_annotator"].append([dataset, model_tag, label, annotator, "ok", str(entry["n"]), *cells])
        judge = result.get("judge", {})
        routes.add(judge.get("judge_route"))
        label = "calibration: " + label if method == HUMAN else label
        if judge.get("accuracy") is None:
            why = "missing: " + judge.get("reason", "not computed")
            rows["judge"].append([dataset, model_tag, label, why, why, why, fmt(judge.get("chance")), *[why] * 4])
            continue
        ci = judge.get("accuracy_ci")
        reading = ("n/a (see the calibration row)" if method != HUMAN else "informative (interval above chance)"
                   if ci and ci[0] > judge["chance"] else
                   "UNINFORMATIVE: not above chance on the human references, so this column measures nothing here")
        rows["judge"].append([dataset, model_tag, label, str(judge["n"]), str(judge["correct"]),
                              fmt_ci(judge["accuracy"], ci), fmt(judge["chance"]), str(judge["unparseable"]),
                              str(judge["no_output"]), judge["judge_model"], reading])
    notes, group_notes = table_notes(cfg, features)
    first = ["dataset", "model", "method"]
    return {
        "table4": write_table(tables_dir / "table4_main", [*first, "status", *(m.label for m in shown), "notes"],
                              rows["table4"], "Table 4: main results (this run)", notes),
        "table6": write_table(
            tables_dir / "table6_feature_kl", [*first, "status", *features, "mean"], rows["table6"],
            "Table 6: feature KL by feature, KL(human || model)",
            [notes[1], notes[3], "Features: " + ", ".join(features) + " (label: the label/score distribution, "
             "with an 'unparsed' category)."]),
        "judge": write_table(
            tables_dir / "judge_attribution", [*first, "judged outputs", "correct", "accuracy", "chance",
                                               "unparseable verdicts", "cells without output", "judge model",
                                               "calibration"], rows["judge"], "LLM-as-judge attribution",
            [f"The same {int(cfg['eval']['judge_items'])} sampled test cells (item, target annotator) for every "
             f"method; the judge sees {int(cfg['eval']['judge_examples_per_annotator'])} train responses of each "
             "annotator and "
             + ("answers in a short free reply, parsed (the endpoint offered no constraint; an unparseable "
                "reply is counted and scored wrong). " if "free" in routes else
                "answers by forced choice among the annotator IDs (so every output gets a verdict). ")
             + "The judge model column names the judge (an endpoint judge with its URL, its server's model "
             "id and how the choice was forced). "
             "The calibration row is the judge on the targets' own human test responses: where its interval "
             "is not above chance, the judge is uninformative for this profile. [low, high]: 95% bootstrap "
             "interval over the judged cells' items, drawn per target annotator.",
             f"Paper (as summarised): CAPO about {PAPER_JUDGE['accuracy']} on VariErr "
             f"(chance {PAPER_JUDGE['chance']}), above SFT and prompting."]),
        "per_annotator": per_annotator_table(
            tables_dir, [*first, "annotator", "status", "n", *(m.label for m in shown)], rows["per_annotator"], notes),
        "group_sizes": write_table(
            tables_dir / "group_sizes",
            [*first, "status", *(f"{metric.label} m={m}" for m in sizes for metric in group), "m used"],
            rows["group_sizes"], "Group classifier confidence and normalised imitation by group size m",
            [*group_notes, notes[0]]),
    }


LISTED_ANNOTATORS = 12  # beyond, the report summarises annotators (a crowd would be pages of rows)


def per_annotator_table(tables_dir: Path, header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    """tables/per_annotator.{md,csv}, every annotator's row; its markdown for the report, or with more
    than LISTED_ANNOTATORS annotators a summary: per method, each metric's min, median and max over
    the annotators (tables/per_annotator_summary.{md,csv})."""
    full = write_table(tables_dir / "per_annotator", header, rows, "Per-annotator breakdown", notes)
    groups: dict[tuple, list[list[str]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[:3]), []).append(row)
    if max(len(members) for members in groups.values()) <= LISTED_ANNOTATORS:
        return full

    def spread(texts: list[str]) -> str:
        values = sorted(float(t.split(" ")[0]) for t in texts if t[:1].isdigit() or t[:1] == "-")
        return (f"{fmt(values[0])} / {fmt(float(np.median(values)))} / {fmt(values[-1])}" if values
                else "missing: no annotator has a value")
    summary = [[*key, str(sum(r[4] == "ok" for r in members)), *(spread([r[col] for r in members if r[4] == "ok"])
                                                                  for col in range(6, len(header)))]
               for key, members in groups.items()]
    return write_table(tables_dir / "per_annotator_summary", [*header[:3], "annotators with a value",
                                                               *header[6:]], summary,
                       "Per-annotator breakdown, summarised: min / median / max over annotators",
                       [f"More than {LISTED_ANNOTATORS} annotators: every annotator's row is in "
                        "tables/per_annotator.csv.", *notes])


def write_lewidi_table(cfg: dict, lewidi: dict, tables_dir: Path) -> str:
    """tables/lewidi.{md,csv}: the shared task's official metrics for this run's methods and the
    kit's baselines (value [95% interval]) beside the published results (labelled published)."""
    header = ["dataset", "source", "system", "soft metric", "soft", "perspectivist metric", "perspectivist",
              "fallback cells (unparsed, missing / scored)", "notes"]
    rows = []
    for dataset, view in lewidi.items():
        soft_name, pe_name = view["metrics"]["soft"], view["metrics"]["pe"]
        for system in view["systems"]:
            label, fallback = f"{system['model']}/{method_label(system['method'])}", system.get("fallback")
            soft, pe = ((f"missing: {system['reason']}",) * 2 if system["status"] != "ok" else
                        (fmt_ci(system[k], system[f"{k}_ci"]) for k in ("soft", "pe")))
            rows.append([dataset, "this run", label, soft_name, soft, pe_name, pe,
                         f"{fallback['unparsed']}, {fallback['missing']} / {fallback['cells']}" if fallback else "",
                         system.get("note", "")])
        for published_dataset, system, soft, pe in PUBLISHED_LEWIDI:
            if published_dataset == dataset:
                rows.append([dataset, "published", system, soft_name, fmt(soft, 2), pe_name, fmt(pe), "",
                             "LeWiDi-2025 test set, all items"])
    n_items = ", ".join(f"{d}: {v['n_items']} of {v['n_test_items']}" for d, v in lewidi.items())
    notes = [LEWIDI_CAVEAT,
             "Lower is better. Ours: the mean over the test items this run scored "
             f"({n_items}), with a seeded 95% bootstrap interval over "
             "items (every system resampled on the same items); published: the full test set.",
             "Perspectivist prediction: each simulated annotator's parsed label. Soft label: the distribution of the "
             "item's simulated annotators' predicted labels (one generated label each; no label likelihoods). An "
             "unparsed output or a missing prediction falls back to the annotator's most frequent train label "
             "(counted in the fallback column). With several training seeds, the first seed's predictions.",
             "Baselines computed by the kit from this run's train split: each annotator's most frequent train label "
             "(ties: the label that sorts first); for the soft task also the mean train soft label; on VariErrNLI "
             "also every yes/no variable at its most frequent train value pooled over labels and annotators "
             "(most_frequent_yes_no: 'no' everywhere), which is the rule that gives the published .345 on the "
             "gold test file (each annotator's most frequent label gives .355).",
             "Metrics as in the organisers' evaluation notebook: Par soft = Wasserstein distance over -5..5, Par "
             "perspectivist = ANAD (|gold - predicted| / 11); VariErrNLI soft = Manhattan distance of per-label "
             "yes/no distributions, perspectivist = per-label error rate over the item's annotators."]
    return write_table(tables_dir / "lewidi", header, rows, "The LeWiDi-2025 view: official metrics (lower is better)",
                       notes)


# ---- Figures: one bar chart per metric, the training curves ----------------------------------
def save_figure(fig, path: Path) -> bool:
    fig.tight_layout()
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def plot_metric(results: dict, index: dict, datasets: dict, metric, m: int | None, path: Path) -> bool:
    """One bar chart of registry `metric` (at group size `m` for a group metric): the macro values and
    intervals of rows_index `index`, a panel per dataset it applies to; False (no file) if none."""
    panels = [d for d in results if datasets[d]["task"]["label_type"] in metric.tasks]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], panels):
        models = results[dataset]
        methods = list(dict.fromkeys(name for per in models.values() for name in ordered_methods(per)))
        width = 0.8 / max(1, len(models))
        for j, model_tag in enumerate(models):
            xs = np.arange(len(methods)) + j * width
            found = [index.get((dataset, model_tag, method, "macro", metric.name, m, None), {}) for method in methods]
            values = [row.get("value") for row in found]
            # Error bars: the 95% bootstrap interval (asymmetric), none where it is missing.
            errors = np.array([[v - row["ci_low"], row["ci_high"] - v] if v is not None and row.get("ci_low")
                               is not None else [0.0, 0.0] for v, row in zip(values, found)]).T.clip(min=0)
            ax.bar(xs, [v if v is not None else 0 for v in values], width, label=model_tag,
                   yerr=errors, capsize=2, error_kw={"linewidth": 0.8})
            for x, v in zip(xs, values):
                if v is None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(np.arange(len(methods)) + width * (len(models) - 1) / 2)
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.set_title(f"{dataset}: {metric.label}")
        if metric.chance:
            # every annotator is a candidate (the classifier's classes, the judge's choices), targets or not
            ax.axhline(1.0 / len(datasets[dataset]["everyone"]), color="grey", linestyle="--", linewidth=1,
                       label="chance")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_training_curves(panels: list[tuple], path: Path) -> bool:
    """One panel per (title, {annotator: (steps, values)}, y label) from 06's training_curves:
    training loss per step and CAPO's dev-selection score; False (no file) if there are none."""
    if not panels:
        return False
    cols = min(3, len(panels))
    n_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.6 * cols, 3.2 * n_rows), squeeze=False)
    for ax, (title, curves, ylabel) in zip(axes.flat, panels):
        for annotator, (steps, values) in curves.items():
            ax.plot(steps, values, marker=".", linewidth=1, label=annotator)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if len(curves) <= LISTED_ANNOTATORS:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save_figure(fig, path)


# ---- Human validation: the form (templates/human_form.html with 06's cells) and the scores ----
FORM_TEMPLATE = Path(__file__).resolve().parent / "templates" / "human_form.html"
FORM_DATA_SLOT = "/*FORM_DATA*/"


def write_human_form(data: dict, key_rows: list[dict], out_dir: Path, rated_version: str | None = None) -> str:
    """form.html (the template with `data` embedded and its version hash) and key.csv beside it.
    `rated_version`: the version of the form already there when raters' exports sit beside it
    (06 reads it); a form of another version is then left as it is, with its key. Returns a
    one-line status for the report."""
    template = FORM_TEMPLATE.read_text(encoding="utf-8")
    version = common.config_hash([template, data])[:12]
    key_path, form_path = out_dir / "key.csv", out_dir / "form.html"
    if rated_version is not None and rated_version != version:
        return (f"{form_path} (version {rated_version}) left as it is: ratings-*.json "
                f"exports of it are beside it (score them with --score-ratings; move them away for a new form)")
    # Inside <script type="application/json"> only "</" could end the element early.
    embedded = json.dumps({"version": version, **data}, ensure_ascii=False).replace("</", "<\\/")
    common.atomic_write_text(form_path, template.replace(FORM_DATA_SLOT, embedded))
    write_csv(key_path, ["cell", "form_version", *[c for c in key_rows[0] if c != "cell"]] if key_rows else
              ["cell", "form_version"], [{**row, "form_version": version} for row in key_rows])
    targets = {(row["dataset"], row["item_id"], row["target"]) for row in key_rows}
    attention = sum(bool(row["attention_of"]) for row in key_rows)
    return (f"{form_path} (version {version}): {len(key_rows)} blinded responses to {len(targets)} test cells, "
            f"{attention} of them attention copies; the key is {key_path}")


def ratings_markdown(scores: dict) -> str:
    """scores.md from 06's score_ratings."""
    questions = list(scores["alpha"])
    lines = ["## Human validation scores", "",
             f"Form version {scores['form_version']}; raters: {', '.join(scores['raters'])}. Mean 1-5 ratings "
             "and attribution accuracy with 95% intervals (cells resampled, each with all its raters); the judge's "
             "attribution on the same cells; chance = naming the most frequent target.", "",
             "| dataset | model | method | cells | " + " | ".join(questions)
             + " | human attribution | judge attribution (cells) | chance |",
             "|---|---|---|---|" + "---|" * len(questions) + "---|---|---|"]
    for row in scores["methods"]:
        lines.append(f"| {row['dataset']} | {row['model'] or '-'} | {row['method']} | {row['cells']} | "
                     + " | ".join(fmt_ci(row[q], row[f'{q}_ci'], 2) for q in questions) + " | "
                     + f"{fmt_ci(row['human_attribution'], row['human_attribution_ci'])} | "
                     + f"{fmt_ci(row['judge_attribution'], row['judge_attribution_ci'])} ({row['judge_cells']}) | "
                     + f"{fmt(row['chance'])} |")
    lines += ["", "Agreement between raters: ordinal Krippendorff's alpha per rating ("
              + ", ".join(f"{q} {fmt(a) if a is not None else 'n/a (fewer than two raters or one value)'}"
                          for q, a in scores["alpha"].items()) + "); Cohen's kappa on the attribution:"]
    for pair in scores["attribution_kappa"] or [{"raters": ["-", "-"], "cells": 0, "kappa": None}]:
        kappa = fmt(pair["kappa"]) if pair["kappa"] is not None else "n/a"
        lines.append(f"- {pair['raters'][0]} vs {pair['raters'][1]}: {kappa} over {pair['cells']} cells")
    lines += ["", "Attention checks (a human reference shown twice; passed = the same attribution and ratings "
              "within 1):"]
    lines += [f"- {rater}: {check['passed']} of {check['pairs']} passed"
              for rater, check in scores["attention"].items()]
    return "\n".join(lines) + "\n"


def hlv_section(hlv: dict, report_dir: Path) -> list[str]:
    """Section 1 from 06's hlv_outputs: per dataset 02's markdown texts and figure paths, or None."""
    lines = ["## 1. Human label variation (02_analyze_hlv)", ""]
    for dataset, outputs in hlv.items():
        lines.append(f"### {dataset}")
        if outputs is None:
            lines += ["", "Not available: 02's summary.json is missing (run 02_analyze_hlv.py).", ""]
            continue
        for text in outputs["markdown"]:
            lines += ["", re.sub(r"^(#+)", r"###\1", text.strip(), flags=re.MULTILINE), ""]
        for png in outputs["figures"]:
            lines += [f"![{dataset} {png.stem}]({png.relative_to(report_dir)})", ""]
    return lines


def write_examples(tables_dir: Path, examples: list[dict]) -> str:
    """tables/examples.md: per example item its two texts and, per target annotator, their own response
    and what each method wrote for them. Returns the markdown."""
    lines = ["## What the methods wrote: examples", "",
             "Seeded test items (the same in every run with this seed). For each target annotator who answered the "
             "item: their own test response, then what each method wrote when asked to answer as them. An output "
             "that did not parse is shown raw, marked *(unparsed)*.", ""]
    for example in examples:
        task = example["task"]
        lines += [f"### {example['dataset']}, item {example['item_id']}", "",
                  f"- {task['text_a_name']}: {example['text_a']}", f"- {task['text_b_name']}: {example['text_b']}", ""]
        for target in example["targets"]:
            lines += [f"Answering as **{target['target']}**:", "", "| written by | label | explanation |",
                      "|---|---|---|"]
            for model_tag, method, label, explanation, parsed in target["responses"]:
                who = f"{target['target']} (the human)" if method == HUMAN else f"{model_tag} / {method_label(method)}"
                text = "no output" if explanation is None else explanation + ("" if parsed else " *(unparsed)*")
                lines.append(f"| {who} | {'-' if label is None else label} | {text.replace('|', '/')} |")
            lines.append("")
    markdown = "\n".join(lines)
    common.atomic_write_text(tables_dir / "examples.md", markdown)
    return markdown


def claims_markdown(claims: list[dict], judge_calibration: dict, rules_note: str) -> list[str]:
    """The claims table (from metrics.json's `claims`) and the judge's calibration per dataset."""
    lines = ["| dataset | model | claim | metric | a | b | a - b [95% CI] | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for claim in claims:
        verdict = claim["verdict"] + (f" ({claim['reason']})" if claim.get("reason") else "")
        lines.append("| " + " | ".join([claim["dataset"], claim["model"], claim["claim"], claim["metric"],
                                         claim["a"], claim["b"], fmt_ci(claim["difference"], claim["ci"]),
                                         verdict.replace("|", "\\|")]) + " |")
    lines += ["", "Each claim compares two methods on the same test items: the difference of their macro "
              "averages and its 95% paired-bootstrap interval (the same resampled items for both methods). "
              "`holds`: the interval excludes 0 in the claimed direction; `contradicted`: it excludes 0 the other "
              f"way; otherwise `not resolved`. {rules_note} 'best prompting' is the prompting method with the "
              "best value on that metric, picked on the point estimates (which favours it slightly).", ""]
    for dataset, calibration in judge_calibration.items():
        if calibration.get("accuracy") is None:
            lines.append(f"- Judge on {dataset}: not calibrated ({calibration.get('reason', 'no verdicts')}); "
                         "its claims are not resolved.")
            continue
        lines.append(f"- Judge on {dataset}: accuracy on the human references "
                     f"{fmt_ci(calibration['accuracy'], calibration['ci'])} over {calibration['n']} cells, "
                     f"chance {fmt(calibration['chance'])}: " + ("informative" if calibration["informative"] else
                     "**uninformative for this profile** (its interval does not lie above chance): its claims are "
                     "not resolved") + ".")
    return lines + [""]


def write_report(cfg: dict, results: dict, claims: list[dict], judge_calibration: dict, rules_note: str,
                 datasets: dict, hlv: dict, tables: dict[str, str], figures: list[Path], curves: Path | None,
                 form_status: str, scores: str | None, started: float, lewidi: dict | None = None) -> Path:
    """report.md from what 06 hands over: the claims, 02's outputs (`hlv`), the tables' markdown,
    figure paths, the form's status and the human scores' markdown (`scores`, None before a rating round)."""
    run, path = common.run_dir(cfg), common.report_path(cfg)

    def include(markdown: str) -> list[str]:
        return [re.sub(r"^## ", "### ", markdown.strip(), flags=re.MULTILINE), ""]

    lines = [f"# capo-kit report: profile `{cfg['profile']}`", "",
             "A reproduction attempt of CAPO (arXiv 2605.28802). The paper's full text and code were not available: "
             "every metric marked 'our definition' is a reconstruction (see the kit's docs/METRICS.md and "
             "docs/CHOICES.md, and 06_eval.py's block OUR DEFINITIONS). Numbers labelled 'paper' are the paper's, "
             "as summarised second-hand; all others were computed by this run.", "",
             f"Datasets: {', '.join(datasets)}. Models: {', '.join(m['tag'] for m in common.model_configs(cfg))}. "
             f"Judge: {common.model_configs(cfg)[0]['tag']} (the config's first model).", "",
             "## At a glance: do the paper's claims hold in this run?", "",
             *claims_markdown(claims, judge_calibration, rules_note), tables["examples"], "", *hlv_section(hlv, run),
             "## 2. Main results (Table 4)", ""]
    if "varierr" in results:
        lines += ["**The paper's numbers** (Table 4 as summarised second-hand; VariErr NLI; not computed by this "
                  "kit):", "", "| model (paper) | method | label acc | feature KL (lower better) | group clf conf | "
                  "norm. imitation |", "|---|---|---|---|---|---|"]
        lines += [f"| {model} | {method} | {fmt(acc)} | " + " | ".join(fmt(v) if v is not None else "not reported"
                                                                      for v in rest) + " |"
                  for model, method, acc, *rest in PAPER_TABLE4] + [""]
    lines += include(tables["table4"])
    lines += ["### Group metrics at several group sizes", "",
              "Group classifier confidence and normalised imitation at every m of `eval.group_sizes`. Each m is "
              f"capped at floor({float(cfg['eval']['group_size_max_share']):g} x n) (n = min(the target's outputs, "
              "its human test responses)) so that a group is a real subsample; the m used is shown. With a few "
              "dozen outputs per target, m near n makes every group nearly the whole output set: each target's "
              "value is then close to 0 or 1 and the mean moves in steps of 1/annotators (it saturates), while "
              "small m grades how recognisable the outputs are. Table 4 and the claims use the largest m.", ""]
    lines += [re.sub(r"^### ", "#### ", block, flags=re.MULTILINE) for block in include(tables["group_sizes"])]
    lines += ["## 3. Feature KL by feature (Table 6)", "", "The paper's Table 6 was not recovered.", "",
              *include(tables["table6"]), "## 4. LLM-as-judge attribution", "",
              f"**Paper** (as summarised): CAPO about {PAPER_JUDGE['accuracy']} on VariErr, "
              f"chance {PAPER_JUDGE['chance']}.", "", *include(tables["judge"]),
              "## 5. Per-annotator breakdown", "", *include(tables["per_annotator"]), "## 6. Figures", "",
              "Bars: the macro average; error bars: its 95% bootstrap interval.", "",
              *(f"![{p.stem}]({p.relative_to(run)})" for p in figures), "", "### Training curves", ""]
    if curves is not None:
        lines += ["Training loss per optimizer step (04 SFT, 05 CAPO; train_log.json) and CAPO's dev-selection "
                  "score per evaluation (selection.json), one line per annotator.", "",
                  f"![training curves]({curves.relative_to(run)})", ""]
    else:
        lines += ["Not available: no train_log.json or selection.json under adapters/ (run 04_sft.py, "
                  "05_capo.py).", ""]
    lines += ["## 7. Human validation", "", f"Form: {form_status}.", ""]
    lines += include(scores) if scores is not None else [
        "Not rated yet. Send form.html to the raters (it opens from disk in any browser), put their "
        "ratings-<rater>.json exports beside key.csv, then: `python 06_eval.py --config "
        f"{cfg.get('config_path', 'configs/<profile>.yaml')} --score-ratings {run / 'human_eval'}/ratings-*.json`. "
        "Paper (as summarised, unverified): 82.8% agreement between two validators; CAPO judged more "
        "coherent, better grounded and closer to the target's style.", ""]
    lines += ["## 8. The LeWiDi-2025 view", ""]
    if lewidi is None:
        lines += ["Skipped: this run uses the kit's own split (data.split: paper); run with `--split lewidi` "
                  "for the shared task's split, official metrics and submission files.", ""]
    else:
        lines += [LEWIDI_CAVEAT, "", *include(tables["lewidi"])]
        submissions = sorted({str(Path(p).parent.relative_to(run)) for view in lewidi.values()
                              for system in view["systems"] for p in system.get("submission", [])})
        lines += ["Submission files (the shared task's format, `id<TAB>python list`): "
                  + ", ".join(f"`{s}/`" for s in submissions) + ".", ""]
    lines += ["## 9. Resolved config and package versions", "", "```yaml",
              yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).strip(), "```", "",
              "| package | version |", "|---|---|"]
    lines += [f"| {name} | {version or 'not installed'} |" for name, version in common.package_versions().items()]
    lines += ["", f"git: {common.git_sha() or 'unknown'}. 06_eval took {time.time() - started:.0f}s.", ""]
    common.atomic_write_text(path, "\n".join(lines))
    return path


