"""The kit's documents stand on their own: every relative link and every repository path that
README.md and docs/*.md mention exists, and no file cites notes that are not in the repository.

    .venv/bin/python -m pytest -q tests/test_docs.py
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_RE = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)
# Notes that were never part of the repository (split so this file does not mention them itself).
FOREIGN_NOTES = ("PAPER" + "_NOTES", "ANCHORS" + ".md")


def repository_files() -> list[Path]:
    """Tracked and new (not ignored) files: what a clone of this branch holds."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [ROOT / line for line in out.splitlines() if line and (ROOT / line).is_file()]
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "runs", ".cache", "__pycache__", ".pytest_cache"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


FILES = repository_files()
TOP_LEVEL = {path.relative_to(ROOT).parts[0] for path in FILES}


def expand_braces(token: str) -> list[str]:
    """`configs/{paper,cpu}.yaml` -> both paths."""
    match = re.search(r"\{([^{}]*)\}", token)
    if not match or "," not in match.group(1):
        return [token]
    return [expanded for part in match.group(1).split(",")
            for expanded in expand_braces(token[:match.start()] + part + token[match.end():])]


def mentioned_repo_paths(text: str) -> set[str]:
    """Code spans and blocks: words whose first path part is a top-level entry of the repository
    (`bench/RESULTS.md`, `configs/cpu.yaml`, `common.py`). Run outputs (`runs/...`, `adapters/...`)
    and placeholders (`<profile>`) are not repository paths and are left alone."""
    paths = set()
    for span in CODE_RE.findall(text):
        for word in re.split(r"[\s=]+", span.strip("`")):
            word = word.strip("\"'(),;:").rstrip(".")
            if not word or "<" in word or word.startswith(("-", "http")):
                continue
            for path in expand_braces(word):
                if path.split("/")[0] in TOP_LEVEL:
                    paths.add(path)
    return paths


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_repo_path_exists(doc):
    text = doc.read_text(encoding="utf-8")
    missing = []
    for target in LINK_RE.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        if not (doc.parent / target.split("#")[0]).exists():
            missing.append(f"link {target}")
    for path in mentioned_repo_paths(text):
        if "*" in path:
            if not list(ROOT.glob(path)):
                missing.append(f"path {path}")
        elif not (ROOT / path).exists():
            missing.append(f"path {path}")
    assert not missing, f"{doc.relative_to(ROOT)} mentions what the repository does not have: {missing}"


def test_the_docs_are_found_and_the_checker_catches_a_missing_path():
    assert {ROOT / "README.md", ROOT / "docs/DESIGN.md", ROOT / "docs/CHOICES.md"} <= set(DOCS)
    assert "bench/RESULTS.md" in mentioned_repo_paths("see `bench/RESULTS.md`.")
    assert mentioned_repo_paths("`configs/{paper,cpu}.yaml`") == {"configs/paper.yaml", "configs/cpu.yaml"}
    assert mentioned_repo_paths("`runs/<profile>/report.md` and `bench/NOPE.md`") == {"bench/NOPE.md"}


def test_no_file_cites_notes_outside_the_repository():
    offenders = []
    for path in FILES:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files
        rel = path.relative_to(ROOT)
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(note in line for note in FOREIGN_NOTES):
                offenders.append(f"{rel}:{lineno}")
            # the kit's design notes live in docs/; a bare file name elsewhere points at nothing
            elif rel.parts[0] != "docs" and re.search(r"(?<!docs/)\bDESIGN\.md", line):
                offenders.append(f"{rel}:{lineno}")
    assert not offenders, f"cite files that are not in the repository: {offenders}"


def budget_table(text: str) -> dict[str, tuple[str, str]]:
    """The README's SFT / CAPO budget table: {row name: (SFT cell, CAPO cell)}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| per annotator | SFT"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_the_readme_budget_table_is_the_cpu_profiles():
    """The side-by-side SFT / CAPO budgets in the README are read from configs/cpu.yaml, so they cannot drift."""
    import common
    cfg = common.load_config(ROOT / "configs" / "cpu.yaml")
    sft_b = common.training_budget(cfg["sft"]["max_train_examples"], cfg["sft"])
    capo_b = common.training_budget(cfg["capo"]["max_pairs"], cfg["capo"])
    expected = {"examples / pairs": (cfg["sft"]["max_train_examples"], cfg["capo"]["max_pairs"]),
                "epochs": (cfg["sft"]["epochs"], cfg["capo"]["epochs"]),
                "global batch": (cfg["sft"]["global_batch_size"], cfg["capo"]["global_batch_size"]),
                "optimizer steps": (sft_b["steps"], capo_b["steps"]),
                "examples / pairs per step": (sft_b["per_step"], capo_b["per_step"]),
                "learning rate": (cfg["sft"]["learning_rate"], cfg["capo"]["learning_rate"])}
    table = budget_table((ROOT / "README.md").read_text(encoding="utf-8"))
    assert set(table) == set(expected)
    for row, values in expected.items():
        assert tuple(float(cell) for cell in table[row]) == tuple(float(v) for v in values), row
    # the checker reads what it should: a changed number is caught
    changed = budget_table("| per annotator | SFT | CAPO |\n|---|---|---|\n| optimizer steps | 24 | 4 |\n")
    assert changed == {"optimizer steps": ("24", "4")}
