"""02_analyze_hlv.py: annotator agreement and identifiability (the paper's Fig 1 and Fig 5).

    python 02_analyze_hlv.py --config configs/cpu.yaml --dataset all        # varierr + par
    python 02_analyze_hlv.py --config configs/cpu.yaml --dataset mine --hlv.group_sizes "[1, 5, 10]"
    accelerate launch 02_analyze_hlv.py --config configs/paper.yaml        # same; no training, one process is enough

Reads every split of 01's data (the human annotations, not a model's) and writes runs/<profile>/hlv/<dataset>/:
pairwise Cohen's kappa (agreement.png/.md, Fig 1); how well a classifier tells the annotators apart from
groups of m of their explanations, in item-grouped cross-validation, beside a control with the IDs permuted
within each item (identification.png/.md, Fig 5); summary.json (docs/DESIGN.md, "hlv summary.json");
cache/ (sentence embeddings) and config.resolved.yaml. The method and our choices: docs/CHOICES.md.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402
from sklearn.metrics import cohen_kappa_score  # noqa: E402
from sklearn.model_selection import GroupKFold  # noqa: E402

import common  # noqa: E402
from common import InputError  # noqa: E402

SPLITS = ("train", "dev", "test")
# The paper's figures as summarised second-hand (docs/CHOICES.md); shown beside ours.
PAPER_REPORTED = {"kappa_range": [0.31, 0.41], "single_instance_accuracy": 0.419, "content_removed_m50_accuracy": 0.964,
                  "source": "second-hand summaries of the paper (docs/CHOICES.md); which "
                            "dataset, binning, representation and m each number belongs to is not stated"}
SHORT_NAMES = {"E1": "explanation", "E2": "label + explanation", "E3": "E1 - item mean", "E4": "E2 - item mean"}
CONTROL_METHOD = ("annotator IDs permuted within each item (texts and items unchanged); mean over "
                  "hlv.control_permutations permutations, 95% t-interval over permutations")


# ---- Agreement (Fig 1) -----------------------------------------------------------------------
# hlv.par_kappa_binning: how scores are binned for kappa, and its description.
BINNINGS = {"sign3": (lambda s: int(np.sign(s)), "3-way sign {<0, 0, >0}"),
            "sign2": (lambda s: int(s > 0), "2-way {<=0, >0}"), "none": (int, "raw scores, unweighted")}


def pair_kappa(first: list, second: list, labels: list, weights: str | None = None) -> tuple[float | None, str | None]:
    """Cohen's kappa, or (None, reason) when it is undefined."""
    if len(first) < 2:
        return None, f"only {len(first)} shared item(s)"
    if len(set(first) | set(second)) < 2:
        return None, "both annotators used a single category on the shared items"
    value = cohen_kappa_score(first, second, labels=labels, weights=weights)
    if not math.isfinite(value):
        return None, "kappa undefined (expected agreement is 1)"
    return float(value), None


def pairwise_kappa(records: list[dict], annotators: list[str], task: dict, binning: str) -> dict:
    """Cohen's kappa for every annotator pair on the items both gave exactly one label; scores are
    binned (hlv.par_kappa_binning), and their quadratic-weighted kappa on the raw scores added."""
    cells: dict[tuple[str, str], list] = defaultdict(list)  # (item, annotator) -> the labels given
    for record in records:
        cells[(record["item_id"], record["annotator"])].append(record["label"])
    single = {key: labels[0] for key, labels in cells.items() if len(labels) == 1}
    items = sorted({item for item, _ in cells})
    shared = {(a, b): [item for item in items if (item, a) in single and (item, b) in single]
              for i, a in enumerate(annotators) for b in annotators[i + 1:]}

    def kappas(value_of, labels: list, weights: str | None = None) -> dict:
        block = {"pairs": {}, "missing": {}}
        for (a, b), pair_items in shared.items():
            value, why = pair_kappa([value_of(single[(item, a)]) for item in pair_items],
                                    [value_of(single[(item, b)]) for item in pair_items], labels, weights)
            block["pairs"][f"{a}|{b}"] = value
            if why:
                block["missing"][f"{a}|{b}"] = why
        values = [v for v in block["pairs"].values() if v is not None]
        block["min"], block["max"] = (min(values), max(values)) if values else (None, None)
        return block

    n_items = {f"{a}|{b}": len(pair_items) for (a, b), pair_items in shared.items()}
    if task["label_type"] != "numeric":
        block = kappas(lambda label: label, list(task["labels"]))
        return {"pairs": block["pairs"], "n_items": n_items, **block,
                "binning": "labels as given; items where both annotators gave exactly one label",
                "short": "Cohen's kappa, items where both gave exactly one label"}
    if binning not in BINNINGS:
        raise InputError(f"hlv.par_kappa_binning: unknown binning '{binning}' (sign3, sign2 or none)")
    bin_score, binning_text = BINNINGS[binning]
    scores = list(range(task["score_range"][0], task["score_range"][1] + 1))
    block = kappas(bin_score, sorted({bin_score(s) for s in scores}))
    return {"pairs": block["pairs"], "n_items": n_items, **block,
            "binning": f"{binning_text} of the scores; cells with exactly one score "
                       "(our choice: the paper's binning is not stated)",
            "short": f"Cohen's kappa, scores binned {binning_text}",
            "quadratic": kappas(lambda s: s, scores, "quadratic") | {"binning": "raw scores, quadratic weights"}}


# ---- Identification (Fig 5) ------------------------------------------------------------------
def item_grouped_folds(item_ids: list[str], n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_rows, test_rows) per fold; every response to an item lands in the same fold."""
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(item_ids)), groups=item_ids))


def permute_within_items(annotators: list[str], item_ids: list[str], seed) -> list[str]:
    """The control's labels: each item's annotator IDs shuffled among that item's responses."""
    rng = np.random.default_rng(seed)
    permuted = list(annotators)
    rows_by_item: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(item_ids):
        rows_by_item[item].append(index)
    for item in sorted(rows_by_item):
        rows = rows_by_item[item]
        for row, source in zip(rows, rng.permutation(rows)):
            permuted[row] = annotators[source]
    return permuted


def t_interval(values: list[float]) -> list[float] | None:
    if len(values) < 2:
        return None
    mean, sem = float(np.mean(values)), float(stats.sem(values))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sem if sem > 0 else 0.0
    return [max(0.0, mean - half), min(1.0, mean + half)]


def identification_accuracy(X: np.ndarray, labels: list[str], item_ids: list[str], annotator_order: list[str],
                            folds: list, hlv_cfg: dict, seed: int) -> dict:
    """{m: {accuracy, ci95, per_fold, ...}}: per fold, a classifier fit on the training rows classifies
    seeded groups of m of an annotator's responses to distinct test-fold items, averaged (common.group_scores)."""
    labels_arr, items_arr = np.asarray(labels), np.asarray(item_ids)
    group_sizes, n_groups = [int(m) for m in hlv_cfg["group_sizes"]], int(hlv_cfg["bootstrap_groups"])
    correct = {m: defaultdict(dict) for m in group_sizes}  # m -> fold -> annotator -> share correct
    effective = {m: [] for m in group_sizes}
    for fold, (train_rows, test_rows) in enumerate(folds):
        if len(set(labels_arr[train_rows])) < 2:
            continue
        clf = common.fit_annotator_classifier(hlv_cfg, X[train_rows], labels_arr[train_rows].tolist(), seed)
        classes = [str(c) for c in clf.classes_]
        for a_index, annotator in enumerate(annotator_order):
            rows = test_rows[labels_arr[test_rows] == annotator]
            if len(rows) == 0:
                continue
            _, item = np.unique(items_arr[rows], return_inverse=True)
            n_items = int(item.max()) + 1
            # One generator per (fold, annotator): the same groups whatever the representation.
            scores = (common.group_scores(common.row_logits(clf, X[rows]), item, np.arange(n_items)[None, :],
                                          classes.index(annotator), group_sizes, n_groups, [seed, fold, a_index])
                      if annotator in classes else None)  # not in this fold's training rows: never predicted
            for m in group_sizes:
                correct[m][fold][annotator] = float(scores[m]["accuracy"][0]) if scores else 0.0
                effective[m].append(min(m, n_items))
    result = {}
    for m in group_sizes:
        per_fold = [float(np.mean(list(cells.values()))) for _, cells in sorted(correct[m].items())]
        if not per_fold:
            result[m] = {"accuracy": None, "reason": "no fold had two or more annotators to train on"}
            continue
        per_annotator = {a: float(np.mean([cells[a] for cells in correct[m].values() if a in cells]))
                         for a in annotator_order if any(a in cells for cells in correct[m].values())}
        result[m] = {"accuracy": float(np.mean(per_fold)), "ci95": t_interval(per_fold),
                     "per_fold": per_fold, "per_annotator": per_annotator,
                     "effective_group_size": {"min": min(effective[m]), "max": max(effective[m])},
                     "groups_per_annotator_and_fold": n_groups}
    return result


def control_accuracy(X: np.ndarray, labels: list[str], item_ids: list[str], annotator_order: list[str],
                     folds: list, hlv_cfg: dict, seed: int) -> dict:
    """identification_accuracy on annotator IDs permuted within items, averaged over
    hlv.control_permutations permutations (one alone scatters widely at large m)."""
    runs = [identification_accuracy(X, permute_within_items(labels, item_ids, [seed, p]), item_ids,
                                    annotator_order, folds, hlv_cfg, seed)
            for p in range(int(hlv_cfg["control_permutations"]))]
    result = {}
    for m in runs[0]:
        values = [run[m]["accuracy"] for run in runs if run[m].get("accuracy") is not None]
        if not values:
            result[m] = {"accuracy": None, "reason": runs[0][m].get("reason")}
            continue
        result[m] = {"accuracy": float(np.mean(values)), "ci95": t_interval(values),
                     "per_permutation": values, "null_range": [min(values), max(values)],
                     "effective_group_size": runs[0][m]["effective_group_size"],
                     "groups_per_annotator_and_fold": runs[0][m]["groups_per_annotator_and_fold"]}
    return result


# ---- Figures and tables ----------------------------------------------------------------------
def rounded(obj, digits: int = 5):
    """Floats rounded for a readable summary.json (far below the bootstrap noise)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {key: rounded(value, digits) for key, value in obj.items()}
    if isinstance(obj, list):
        return [rounded(value, digits) for value in obj]
    return obj


def fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def md_row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def save_figure(fig, path: Path) -> None:
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)


LISTED = 12  # annotators shown one by one; a crowd's pairwise kappas are summarised instead


def write_agreement(kappa: dict, annotators: list[str], dataset: str, out_dir: Path) -> None:
    """agreement.png and agreement.md: one kappa matrix per block (scores: binned and quadratic-weighted);
    with more than LISTED annotators, their distribution."""
    blocks = [(kappa["short"], "kappa", kappa)]  # (figure title, table title, block)
    if "quadratic" in kappa:
        blocks.append(("quadratic-weighted kappa, raw scores", "quadratic-weighted kappa (raw scores)",
                       kappa["quadratic"]))
    n = len(annotators)
    if n > LISTED:
        write_agreement_summary(kappa, blocks, n, dataset, out_dir)
        return
    fig, axes = plt.subplots(1, len(blocks), figsize=((1.1 * n + 2) * len(blocks), 1.1 * n + 2), squeeze=False,
                             layout="constrained")
    lines = [f"# {dataset}: pairwise annotator agreement (Cohen's kappa)", "", f"Binning: {kappa['binning']}.", ""]
    for ax, (figure_title, table_title, block) in zip(axes[0], blocks):
        matrix = np.full((n, n), np.nan)
        for pair, value in block["pairs"].items():
            i, j = (annotators.index(a) for a in pair.split("|"))
            matrix[i, j] = matrix[j, i] = np.nan if value is None else value
        image = ax.imshow(matrix, vmin=min(0.0, np.nanmin(matrix) if np.isfinite(matrix).any() else 0.0),
                          vmax=1.0, cmap="viridis")
        for (i, j), value in np.ndenumerate(matrix):
            if i != j:
                ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.2f}", ha="center", va="center",
                        color="white" if np.isnan(value) or value < 0.6 else "black", fontsize=10)
        ax.set_xticks(range(n), annotators)
        ax.set_yticks(range(n), annotators)
        ax.set_title(figure_title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        lines += [f"## {table_title}: {fmt(block['min'])} to {fmt(block['max'])}", "",
                  "| | " + " | ".join(annotators) + " |", "|---|" + "---|" * n]
        for i, first in enumerate(annotators):
            cells = ["-" if i == j else "n/a" if np.isnan(value) else f"{value:.3f}"
                     for j, value in enumerate(matrix[i])]
            lines.append(md_row(first, *cells))
        lines += ["", *(f"- {name}: n/a ({why})" for name, why in block["missing"].items())]
        if block["missing"]:
            lines.append("")
    fig.suptitle(f"{dataset}: pairwise annotator agreement")
    save_figure(fig, out_dir / "agreement.png")
    lines += ["Shared single-label items per pair: "
              + ", ".join(f"{name} {count}" for name, count in kappa["n_items"].items()), "",
              f"The paper reports pairwise kappa from {PAPER_REPORTED['kappa_range'][0]} to "
              f"{PAPER_REPORTED['kappa_range'][1]} (from {PAPER_REPORTED['source']}).", ""]
    common.atomic_write_text(out_dir / "agreement.md", "\n".join(lines))


def write_agreement_summary(kappa: dict, blocks: list, n: int, dataset: str, out_dir: Path) -> None:
    """A crowd's agreement: per block, the pairs' kappa as a histogram and its quartiles."""
    fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 3.5), squeeze=False, layout="constrained")
    lines = [f"# {dataset}: pairwise annotator agreement (Cohen's kappa), {n} annotators", "",
             f"Binning: {kappa['binning']}. {n * (n - 1) // 2} pairs; a pair has a value where it shares items.", ""]
    for ax, (figure_title, table_title, block) in zip(axes[0], blocks):
        values = np.array([v for v in block["pairs"].values() if v is not None])
        ax.hist(values, bins=20)
        ax.set_title(f"{figure_title}: {len(values)} pairs", fontsize=9)
        ax.set_xlabel("kappa")
        quartiles = np.percentile(values, [25, 50, 75]) if len(values) else [np.nan] * 3
        lines += [f"## {table_title}: {fmt(block['min'])} to {fmt(block['max'])}", "",
                  f"{len(values)} pairs with a value; quartiles {' / '.join(fmt(float(q)) for q in quartiles)}.", ""]
    fig.suptitle(f"{dataset}: pairwise annotator agreement")
    save_figure(fig, out_dir / "agreement.png")
    shared = list(kappa["n_items"].values())
    lines += [f"Shared items per pair: {min(shared, default=0)} to {max(shared, default=0)}.", ""]
    common.atomic_write_text(out_dir / "agreement.md", "\n".join(lines))


def measured(per_m: dict) -> dict:
    """{m: row} of the group sizes that have an accuracy."""
    return {m: row for m, row in per_m.items() if row.get("accuracy") is not None}


def with_interval(row: dict) -> str:
    if row.get("accuracy") is None:
        return "n/a"
    ci = row.get("ci95")
    return f"{row['accuracy']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def write_identification(summary: dict, identification: dict, control: dict, out_dir: Path) -> None:
    """identification.png (accuracy against m, the control and chance) and identification.md (the
    same numbers, and the paper's figures beside ours)."""
    dataset, chance, ms = summary["dataset"], summary["chance"], summary["group_sizes"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, per_m in identification.items():
        rows = measured(per_m)
        bounds = np.array([row["ci95"] or [row["accuracy"]] * 2 for row in rows.values()]).reshape(-1, 2)
        line, = ax.plot(list(rows), [row["accuracy"] for row in rows.values()], marker="o",
                        label=f"{name}: {SHORT_NAMES.get(name, name)}")
        ax.fill_between(list(rows), bounds[:, 0], bounds[:, 1], color=line.get_color(), alpha=0.15)
    for index, per_m in enumerate(control.values()):
        rows = measured(per_m)
        ax.plot(list(rows), [row["accuracy"] for row in rows.values()], color="grey", linestyle=":", linewidth=1,
                label="control: IDs permuted\nwithin item (E1-E4)" if index == 0 else None)
    ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
    ax.set_xscale("log")
    all_ms = sorted({m for per_m in identification.values() for m in per_m})
    ax.set_xticks(all_ms, [str(m) for m in all_ms])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("group size m (responses of one annotator to distinct items, averaged)")
    ax.set_ylabel("annotator identification accuracy")
    ax.set_title(f"{dataset}: who wrote it? (item-grouped CV, 95% interval over folds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    save_figure(fig, out_dir / "identification.png")

    lines = [f"# {dataset}: annotator identification accuracy", "",
             f"Classifier: {summary['classifier']}; embedder: {summary['embedder']}; "
             f"{summary['folds']}-fold item-grouped CV; {summary['bootstrap_groups']} bootstrap groups per "
             f"m, annotator and fold; chance {chance:.3f}. Cells: mean accuracy [95% interval over folds].", "",
             md_row("representation", *(f"m={m}" for m in ms)), "|---|" + "---|" * len(ms)]
    lines += [md_row(name, *(with_interval(per_m[m]) for m in ms)) for name, per_m in identification.items()]
    lines += [md_row(f"control {name}", *(with_interval(per_m[m]) for m in ms)) for name, per_m in control.items()]
    effective = {m: next(iter(identification.values()))[m].get("effective_group_size") for m in ms}
    capped = [f"m={m}: {e['min']}" for m, e in effective.items() if e and e["min"] < m]
    if capped:
        lines += ["", "Group size capped by the items an annotator has in a test fold (smallest effective m): "
                  + ", ".join(capped) + "."]

    def acc(per_m: dict, m: int) -> str:
        return fmt(per_m[m].get("accuracy"), 3)

    kappa, m_single, m_big = summary["kappa"], ms[0], (50 if 50 in ms else ms[-1])
    lines += ["", "Representations: " + "; ".join(f"{k} = {v}" for k, v in summary["representations"].items())
              + ".", "", "## The paper's figures beside ours", "",
              f"The paper's figures come from {PAPER_REPORTED['source']}.", "",
              "| quantity | the paper's (reported) | ours |", "|---|---|---|",
              f"| pairwise Cohen's kappa | {PAPER_REPORTED['kappa_range'][0]} to {PAPER_REPORTED['kappa_range'][1]} | "
              f"{fmt(kappa['min'])} to {fmt(kappa['max'])} |",
              f"| single-instance identification (m={m_single}) | {PAPER_REPORTED['single_instance_accuracy']:.1%} | "
              f"E1 {acc(identification['E1'], m_single)}, E2 {acc(identification['E2'], m_single)} |",
              f"| content removed, aggregated (m={m_big}) | {PAPER_REPORTED['content_removed_m50_accuracy']:.1%} "
              f"(m=50) | E3 {acc(identification['E3'], m_big)}, E4 {acc(identification['E4'], m_big)} |",
              f"| control (IDs permuted within item), m={m_big} | (chance) | "
              + ", ".join(f"{name} {acc(per_m, m_big)}" for name, per_m in control.items()) + " |",
              f"| chance | 25% (4 annotators) | {chance:.3f} ({len(summary['annotators'])} annotators) |", ""]
    common.atomic_write_text(out_dir / "identification.md", "\n".join(lines))


# ---- One dataset -----------------------------------------------------------------------------
def analyse_dataset(cfg: dict, dataset: str) -> dict:
    hlv_cfg, seed, out_dir = cfg["hlv"], int(cfg["seed"]), common.hlv_dir(cfg, dataset)
    records = [record for split in SPLITS for record in common.load_split(cfg, dataset, split)]
    annotators = common.all_annotators(cfg, dataset)  # everyone, whichever annotators 03-06 target
    item_ids = [record["item_id"] for record in records]
    labels = [record["annotator"] for record in records]
    n_items = len(set(item_ids))
    print(f"[hlv] {dataset}: {len(records)} responses, {n_items} items, annotators {common.listed(annotators)}",
          flush=True)

    # ---- agreement (Fig 1)
    kappa = pairwise_kappa(records, annotators, common.load_task(cfg, dataset), hlv_cfg["par_kappa_binning"])
    print(f"[hlv] {dataset}: kappa {fmt(kappa['min'])} to {fmt(kappa['max'])}"
          + (f"; quadratic {fmt(kappa['quadratic']['min'])} to {fmt(kappa['quadratic']['max'])}"
             if "quadratic" in kappa else ""), flush=True)

    # ---- identification (Fig 5) and its control, on E1..E4 (E3/E4: minus the mean of all responses to the item)
    n_folds = min(int(hlv_cfg["folds"]), n_items)
    if n_folds < 2 or len(annotators) < 2:
        raise InputError(f"{common.data_dir(cfg, dataset)}: identification needs at least 2 items and 2 "
                         f"annotators (found {n_items} items, {len(annotators)} annotators)")
    folds = item_grouped_folds(item_ids, n_folds, seed)
    cache_dir = common.embedding_cache_dir(cfg, dataset)
    identification, control = {}, {}
    for name in common.REPRESENTATIONS:
        X, _ = common.representation_vectors(cfg, records, name, cache_dir)
        started = time.time()
        identification[name] = identification_accuracy(X, labels, item_ids, annotators, folds, hlv_cfg, seed)
        control[name] = control_accuracy(X, labels, item_ids, annotators, folds, hlv_cfg, seed)
        print(f"[hlv] {dataset} {name}: " + ", ".join(
            f"m={m} {fmt(row.get('accuracy'), 3)}" for m, row in identification[name].items())
            + f" | control m={max(identification[name])} {fmt(control[name][max(control[name])].get('accuracy'), 3)}"
            + f" ({time.time() - started:.0f}s)", flush=True)

    def by_m(detail: dict, key: str | None = None) -> dict:
        """{representation: {"m": row, or row[key]}}: JSON keys are strings."""
        return {name: {str(m): row if key is None else row.get(key) for m, row in per_m.items()}
                for name, per_m in detail.items()}

    summary = {
        "dataset": dataset, "annotators": annotators, "chance": 1.0 / len(annotators), "kappa": kappa,
        "identification": by_m(identification, "accuracy"), "representations": dict(common.REPRESENTATIONS),
        "embedder": cfg["embedder"].get("name") or common.embedder_path(cfg["embedder"]),
        "classifier": (f"{hlv_cfg['classifier']} ({'standardised features, ' if hlv_cfg['standardize'] else ''}"
                       f"C={hlv_cfg['C']})"),
        "identification_ci95": by_m(identification, "ci95"), "identification_detail": by_m(identification),
        "control": {"method": CONTROL_METHOD, "identification": by_m(control, "accuracy"),
                    "identification_ci95": by_m(control, "ci95"), "identification_detail": by_m(control)},
        "n_responses": len(records), "n_items": n_items, "folds": n_folds,
        "group_sizes": [int(m) for m in hlv_cfg["group_sizes"]], "bootstrap_groups": int(hlv_cfg["bootstrap_groups"]),
        "interval": "95% t-interval over the item-grouped folds",
        "residual_means": "per item, over all annotators' responses to that item (within-item only)",
        "paper_reported": PAPER_REPORTED,
    }
    write_agreement(kappa, annotators, dataset, out_dir)
    write_identification(summary, identification, control, out_dir)
    common.write_json(out_dir / "summary.json", rounded(summary))
    common.save_resolved_config(cfg, out_dir, stage="02_analyze_hlv")
    print(f"[hlv] {dataset}: wrote {out_dir}/summary.json, agreement.png/.md, identification.png/.md", flush=True)
    return summary


# The config sections summary.json is made from, besides 01's files.
CONFIG_SECTIONS = ("seed", "torch_threads", "data", "hlv", "embedder")


def main(argv: list[str] | None = None) -> None:
    parser = common.stage_parser(__doc__)
    args, cfg = common.parse_stage_args(parser, argv)
    if not common.is_main_process():  # under `accelerate launch`: one process's work, done by rank 0
        return
    common.set_seed(cfg["seed"])
    hlv_cfg, sizes = cfg["hlv"], cfg["hlv"]["group_sizes"]
    if not isinstance(sizes, list) or not sizes or not all(isinstance(m, int) and m >= 1 for m in sizes):
        raise common.input_error(cfg["config_path"], "must be a non-empty list of positive integers",
                                 field="hlv.group_sizes")
    for key, low in (("folds", 2), ("bootstrap_groups", 1), ("control_permutations", 1)):
        if not isinstance(hlv_cfg[key], int) or hlv_cfg[key] < low:
            raise common.input_error(cfg["config_path"], f"must be an integer >= {low}", field=f"hlv.{key}")
    for dataset in common.selected_datasets(cfg, args.dataset):
        common.require_data(cfg, dataset)
        summary_path = common.hlv_dir(cfg, dataset) / "summary.json"
        made_from = common.recipe(cfg, "02_analyze_hlv", common.data_files(cfg, dataset), CONFIG_SECTIONS)
        reason = "--force" if args.force else common.why_not_current(summary_path, made_from)
        if args.dry_run:
            common.say_plan("hlv", summary_path, reason)
            continue
        if reason is None:
            print(f"[hlv] {dataset}: {summary_path} is current; skipped", flush=True)
            continue
        print(f"[hlv] {dataset}: analysing ({reason})", flush=True)
        common.forget_output(summary_path)
        analyse_dataset(cfg, dataset)
        common.write_manifest(summary_path, made_from)


if __name__ == "__main__":
    common.run_stage(main)
