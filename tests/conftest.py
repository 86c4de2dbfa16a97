"""Shared test helpers: offline, CPU, small fixtures written by the tests themselves."""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))  # benchmark scripts imported by tests find their benchkit
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import common  # noqa: E402


def load_stage(name: str):
    """Import a numbered stage script (its file name is not a valid module name)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(tmp_path: Path, base: str = "smoke", **changes) -> Path:
    """A copy of configs/<base>.yaml with run_dir under tmp_path and `section.key` changes."""
    cfg, _ = common.read_profile(ROOT / "configs" / f"{base}.yaml")  # over its base: chain
    cfg["run_dir"] = str(tmp_path / "run")
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{base}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def mark_prepared(config, dataset: str) -> None:
    """A data/<dataset>/ folder a test wrote by hand counts as 01's output: write the manifest
    01 would write beside it (later stages refuse data without one)."""
    cfg = config if isinstance(config, dict) else common.load_config(config)
    prepare = load_stage("01_prepare")
    made_from = common.recipe(cfg, "01_prepare", [], prepare.CONFIG_SECTIONS, dataset=dataset, options={})
    common.write_manifest(common.data_dir(cfg, dataset), made_from)


STAGE_OF_METHOD = {"base": "03_prompt_baselines", "icl": "03_prompt_baselines", "vp": "03_prompt_baselines",
                   "vp_icl": "03_prompt_baselines", "sft": "04_sft", "capo": "05_capo"}


def mark_predictions(config) -> None:
    """Predictions files a test wrote by hand count as made by their stage from the data now
    present: write the manifests 03-05 would write (06 refuses predictions without one)."""
    cfg = config if isinstance(config, dict) else common.load_config(config)
    for path in sorted((common.seed_dir(cfg) / "predictions").glob("*/*/*/*.jsonl")):
        dataset, model_tag, method = path.parts[-4], path.parts[-3], path.parts[-2]
        made_from = common.recipe(cfg, STAGE_OF_METHOD.get(method, "05_capo"), common.data_files(cfg, dataset),
                                  common.ADAPTER_PREDICTION_SECTIONS, model_tag=model_tag)
        common.write_manifest(path, made_from)


TOKENIZERS = Path(os.environ.get("CAPO_TOKENIZERS", "/nonexistent"))  # qwen3/, llama3/: the real tokenizer files
TOKENIZER_FOLDER_OF = {"Qwen/Qwen3-4B": "qwen3", "meta-llama/Llama-3.2-3B-Instruct": "llama3"}


def hf_download(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Files put into a Hugging Face hub cache (HF_HUB_CACHE) the way `hf download <repo_id>
    <files>` leaves them: refs/main names a snapshot whose files link to content-addressed blobs.
    Returns the snapshot folder."""
    import hashlib
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    return snapshot


def hf_download_tokenizers(cache: Path) -> None:
    """What README's fetch leaves: the paper models' tokenizer.json and tokenizer_config.json."""
    for repo_id, folder in TOKENIZER_FOLDER_OF.items():
        hf_download(cache, repo_id, {name: (TOKENIZERS / folder / name).read_bytes() for name in common.TOKENIZER_FILES})


PORTABLE_TOOLS = ("bash", "sh", "env", "dirname", "date", "mkdir", "tee", "cat", "sed", "rm", "git")


def portable_path(folder: Path) -> str:
    """A PATH holding only the tools run_all.sh, setup.sh and run_tests.sh may use beside bash's
    builtins (as on macOS: no GNU nproc, time, sha256sum or readlink -f): links in `folder`."""
    import shutil
    folder.mkdir(parents=True, exist_ok=True)
    for tool in PORTABLE_TOOLS:
        if shutil.which(tool) and not (folder / tool).exists():
            (folder / tool).symlink_to(shutil.which(tool))
    return str(folder)


@pytest.fixture
def smoke_config(tmp_path):
    return write_config(tmp_path)


@pytest.fixture(scope="session")
def tiny_model():
    """(model, tokenizer) of the smoke profile: a seeded random tiny Llama, built in-process."""
    cfg = common.load_config(ROOT / "configs" / "smoke.yaml")
    return common.load_model_and_tokenizer(cfg["models"][0], device="cpu")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Stages set torch's thread count from the config (smoke: 1); keep that inside the test."""
    import torch
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are too small to share between threads; on a busy 2-core machine the
    second thread mostly waits (10x slower). For the training test modules; restored afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
