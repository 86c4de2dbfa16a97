"""What the benchmark scripts share: the kit importable, offline and quiet settings, stage loading.

Every script in bench/ imports it first (`import benchkit`: Python puts bench/ on the path of a
script run from there).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                   ("TQDM_DISABLE", "1"), ("CAPO_NO_PROGRESS", "1")):
    os.environ.setdefault(key, value)


@functools.cache
def load_stage(name: str):
    """Import a numbered stage script (its file name is not a valid module name), once."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
