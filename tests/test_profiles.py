"""Every shipped profile, with its own model entries, through every stage's recipe.

For each configs/*.yaml: 01 prepares the data for real, then every later stage builds the recipe
of each output it would make, for every model entry as the profile ships it (tags with dots
included), and says what it would do: `bash run_all.sh --profile paper --dry-run` as README
writes it, the other profiles through the same dry run in this process (common.run_all_dry_run,
which run_all.sh calls). The paper profile's hub models get stand-in weights (their architecture,
narrowed, random) in a Hugging Face cache laid out as `hf download` leaves it, so its entries stay
as shipped: only the weights are substituted. The rehearsal's stand-ins find their tokenizers in
the same cache; tests/test_rehearsal.py runs the rehearsal for real.

    CAPO_RAW_DIR=<raw files> CAPO_TOKENIZERS=<tokenizer folders> .venv/bin/python -m pytest -q tests/test_profiles.py
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path

import pytest

import common
from conftest import ROOT, TOKENIZER_FOLDER_OF, TOKENIZERS, hf_download, load_stage

RAW = Path(os.environ.get("CAPO_RAW_DIR", "/nonexistent"))
PROFILES = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))
pytestmark = pytest.mark.skipif(not (RAW / "varierr.json").exists() and not (RAW / "varierr").exists()
                                or not (TOKENIZERS / "qwen3").is_dir(),
                                reason="needs CAPO_RAW_DIR (the raw files) and CAPO_TOKENIZERS (qwen3/, llama3/)")


def hf_download_stand_in(cache: Path, model_cfg: dict) -> None:
    """A hub model as `hf download <id>` leaves it, but with stand-in weights: its tokenizer files,
    and the config and random weights of its architecture at 2 layers of width 16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = TOKENIZERS / TOKENIZER_FOLDER_OF[model_cfg["name_or_path"]]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = common.stand_in_config({**model_cfg, "tiny": {"hidden_size": 16, "intermediate_size": 32,
                                                           "num_layers": 2, "num_heads": 2}}, tokenizer)
    saved = cache.parent / "saved" / model_cfg["tag"]
    AutoModelForCausalLM.from_config(config).save_pretrained(saved)
    files = {path.name: path.read_bytes() for path in saved.iterdir()}
    files.update({name: (folder / name).read_bytes() for name in common.TOKENIZER_FILES})
    hf_download(cache, model_cfg["name_or_path"], files)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding the paper models (stand-in weights) and their tokenizers."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    for model_cfg in common.load_config(ROOT / "configs" / "paper.yaml")["models"]:
        hf_download_stand_in(cache, model_cfg)
    return cache


def assert_every_recipe_built(profile: str, out: str) -> None:
    cfg = common.load_config(ROOT / "configs" / f"{profile}.yaml")
    assert "error" not in out.lower() and "Traceback" not in out, out[-3000:]
    for stage in ("02_analyze_hlv", "03_prompt_baselines", "04_sft", "05_capo", "06_eval"):
        assert f"== {stage}" in out
    for model in cfg["models"]:  # every entry's outputs were planned by 03, 04 and 05 (their recipes built)
        for dataset in cfg["datasets"]:
            methods = ["base", *(m for kind, m in (("per_annotator", "sft"), ("per_annotator", "capo"),
                                                    ("shared", "sft_shared"), ("shared", "capo_shared"))
                                 if kind in cfg["adapters"])]
            for method in methods:
                planned = f"predictions/{dataset}/{model['tag']}/{method}/"
                assert planned in out, f"{profile}: no dry-run line for {planned}"
    assert "[eval] dry run:" in out


def test_readme_dry_run_of_the_paper_profile_builds_every_recipe(hub_cache, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "CAPO_NO_PROGRESS": "1"}
    overrides = ["--run_dir", str(tmp_path / "run")]
    prepared = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "01_prepare.py", "--config", "configs/paper.yaml",
                               "--raw-dir", str(RAW), *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    done = subprocess.run(["bash", "run_all.sh", "--profile", "paper", "--dry-run", "--", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0
    assert_every_recipe_built("paper", done.stdout + done.stderr)


@pytest.mark.parametrize("profile", [p for p in PROFILES if p != "paper"])
def test_every_other_profile_builds_every_recipe_in_a_dry_run(profile, hub_cache, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))  # read at import
    overrides = ["--run_dir", str(tmp_path / "run")]
    load_stage("01_prepare").main(["--config", f"configs/{profile}.yaml", "--raw-dir", str(RAW), *overrides])
    cfg = common.load_config(ROOT / "configs" / f"{profile}.yaml")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        common.run_all_dry_run([f"configs/{profile}.yaml", "all", ",".join(map(str, common.training_seeds(cfg))),
                                *overrides])
    assert_every_recipe_built(profile, printed.getvalue())
