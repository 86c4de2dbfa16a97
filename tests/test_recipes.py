"""Recipes are derived: each stage declares the config sections its outputs are made from
(CONFIG_SECTIONS, common.ADAPTER_PREDICTION_SECTIONS), common.recipe records those sections
whole, less the keys common.OUTPUT_NEUTRAL_KEYS declares. On one in-process smoke run of the six
stages (the README's own-data example: 20 items, 3 annotators) these tests check:

- after the run, every stage's --dry-run finds all its outputs current, and writes nothing;
- every leaf config value a stage's manifests record (read from the manifests, not listed here),
  changed to another value, makes that stage's --dry-run say it would redo work naming the key
  (or its outputs move elsewhere, or the stage refuses every other value, naming the key);
- every config key a stage reads (the config records its reads) lies inside a section its
  recipes record, or is declared output-neutral: a forgotten section fails here;
- a stage that forgets a section it reads fails that check (02 without `hlv`);
- changing an output-neutral key inside a section leaves every output current;
- `run_all.sh --dry-run` has every stage find its outputs current, and writes nothing.

    .venv/bin/python -m pytest -q tests/test_recipes.py
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import shutil
import subprocess

import pytest
import yaml

import common
from conftest import ROOT, load_stage, write_config
from test_own_data import write_mine

STAGES = ("01_prepare", "02_analyze_hlv", "03_prompt_baselines", "04_sft", "05_capo", "06_eval")
BUDGET = {"eval__bertscore": False, "eval__judge_items": 4, "capo__max_pairs": 4}  # test_own_data's
PLAN_LINE = re.compile(r"^\[[^\]]+\] dry run: (?P<path>.+?): (?:current|would redo \((?P<why>.*)\))$")
MAX_CANDIDATES = 8


# ---- a config that records the dotted path of every value a stage reads --------------------------
class Reads:
    def __init__(self):
        self.paths: set[str] = set()
        self.sections: set[str] = set()
        self.paused = 0

    def note(self, path: str) -> None:
        if not self.paused:
            self.paths.add(path)

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def recording(value, path: str, reads: Reads):
    if isinstance(value, Recording):
        return value
    if isinstance(value, dict):
        return Recording(value, path, reads)
    if path == "models" and isinstance(value, list):
        return [recording(m, f"models[{m.get('tag')}]", reads) if isinstance(m, dict) else m for m in value]
    return value


class Recording(dict):
    """A config mapping whose reads (item, get, items, values, and copies made with dict() or
    {**...}) note the path of each leaf read; a section read to get at its keys is not a leaf."""

    def __init__(self, data: dict, path: str, reads: Reads):
        super().__init__()
        self._path, self._reads = path, reads
        for key, value in dict.items(data):
            dict.__setitem__(self, key, recording(value, self._sub(key), reads))

    def _sub(self, key) -> str:
        return f"{self._path}.{key}" if self._path else str(key)

    def _read(self, key, value):
        container = isinstance(value, Recording) or (isinstance(value, list) and any(isinstance(v, Recording)
                                                                                      for v in value))
        if not container:
            self._reads.note(self._sub(key))
        return value

    def __getitem__(self, key):
        return self._read(key, dict.__getitem__(self, key))

    def get(self, key, default=None):
        if dict.__contains__(self, key):
            return self[key]
        self._reads.note(self._sub(key))
        return default

    def items(self):
        return [(key, self[key]) for key in dict.keys(self)]

    def values(self):
        return [self[key] for key in dict.keys(self)]

    def __iter__(self):  # not dict's own: dict(x) and {**x} then copy through __getitem__ (a read)
        return dict.__iter__(self)

    def __deepcopy__(self, memo):
        return Recording(copy.deepcopy(dict(dict.items(self)), memo), self._path, self._reads)

    def __reduce__(self):
        return dict, (dict(dict.items(self)),)


# The config's copies in config.resolved.yaml, the report and model cards are provenance, not reads.
yaml.SafeDumper.add_representer(Recording, lambda dumper, data: dumper.represent_dict(dict(dict.items(data))))


# ---- one smoke run, recorded ----------------------------------------------------------------------
def stage_argv(stage: str, config, mine) -> list[str]:
    if stage == "01_prepare":
        return ["--config", str(config), "--custom", str(mine), "--name", "mine", "--label-type", "categorical"]
    return ["--config", str(config), "--dataset", "mine"]


def record_reads(patch: pytest.MonkeyPatch, log: Reads) -> None:
    """Stages load recording configs; each recipe's sections are noted in `log.sections`."""
    load_config, recipe = common.load_config, common.recipe

    def recorded_recipe(*args, **kwargs):
        made = recipe(*args, **kwargs)
        log.sections.update(made["config"])
        return made

    patch.setattr(common, "load_config", lambda *a, **k: recording(load_config(*a, **k), "", log))
    patch.setattr(common, "recipe", recorded_recipe)
    patch.setenv("CAPO_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The six stages on the smoke profile, each reading a recording config: {config, run, modules,
    reads: {stage: paths read}, sections: {stage: sections its recipes recorded}}."""
    tmp = tmp_path_factory.mktemp("recipes")
    mine = tmp / "mine.jsonl"
    write_mine(mine)
    config = write_config(tmp, **BUDGET)
    modules = {stage: load_stage(stage) for stage in STAGES}
    stale_reason, reads, sections = common.stale_reason, {}, {}
    with pytest.MonkeyPatch.context() as patch:
        log = Reads()

        def unrecorded_stale_reason(*args, **kwargs):  # checking an upstream manifest is not a read
            with log.pause():
                return stale_reason(*args, **kwargs)

        record_reads(patch, log)
        patch.setattr(common, "stale_reason", unrecorded_stale_reason)
        for stage in STAGES:
            log.paths, log.sections = set(), set()
            modules[stage].main(stage_argv(stage, config, mine))
            reads[stage], sections[stage] = log.paths, log.sections
    return {"config": config, "run": tmp / "run", "modules": modules, "reads": reads, "sections": sections,
            "tmp": tmp}


def dry_run(module, config) -> dict[str, str | None]:
    """{output: None if current, else why it would be redone} from the stage's --dry-run lines."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(["--config", str(config), "--dataset", "mine", "--dry-run"])
    plan = {}
    for line in out.getvalue().splitlines():
        match = PLAN_LINE.match(line)
        if match:
            plan[match["path"]] = match["why"]
    return plan


def files_of(run) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


# ---- config paths: leaves of a manifest's config, values at a path, other values ------------------
def leaves(value, path: str):
    """The dotted paths of a recorded config section's leaves (a model entry as models[<tag>])."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from leaves(inner, f"{path}.{key}")
    elif path == "models" and isinstance(value, list):
        for entry in value:
            yield from leaves(entry, f"models[{entry['tag']}]")
    else:
        yield path


def steps(path: str) -> list:
    """'models[tiny].tiny.num_layers' -> [('models', 'tiny'), 'tiny', 'num_layers']."""
    out = []
    for part in path.split("."):
        match = re.fullmatch(r"models\[(.*)\]", part)
        out.append(("models", match[1]) if match else part)
    return out


def node_at(cfg: dict, path: str):
    """(parent mapping, key) of `path` in a plain config; None where it is not there."""
    node, parts = cfg, steps(path)
    for part in parts[:-1]:
        if isinstance(part, tuple):
            node = next((m for m in node.get("models", []) if m.get("tag") == part[1]), None)
        else:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return None
    return node, parts[-1]


def schema_type(path: str) -> str | None:
    node = common.CONFIG_SCHEMA
    for part in steps(path):
        if isinstance(part, tuple):
            node = node["models"][0]
            continue
        keys = {k.rstrip("?"): v for k, v in node.items()} if isinstance(node, dict) else {}
        if part not in keys:
            return None
        node = keys[part]
    return node if isinstance(node, str) else None


def profile_values(path: str) -> list:
    """The values other profiles in configs/ give this key (for a model's key: any model's)."""
    values = []
    for profile in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(profile.read_text())
        if not isinstance(cfg, dict):
            continue
        parts = steps(path)
        entries = cfg.get("models", []) if isinstance(parts[0], tuple) else [cfg]
        rest = ".".join(path.split(".")[1:]) if isinstance(parts[0], tuple) else path
        for entry in entries:
            found = node_at(entry, rest)
            if found and isinstance(found[0], dict) and found[1] in found[0]:
                values.append(found[0][found[1]])
    return values


def string_leaves(value):
    if isinstance(value, dict):
        for inner in value.values():
            yield from string_leaves(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from string_leaves(inner)
    elif isinstance(value, str):
        yield value


def other_values(path: str, current, cfg: dict) -> list:
    """Values of the key's schema type other than `current`: other profiles' first, then derived."""
    spec = schema_type(path) or ""
    derived = []
    if isinstance(current, bool):
        derived.append(not current)
    elif isinstance(current, int):
        derived.append(current + 1)
    elif isinstance(current, float):
        derived.append(current * 2 if current else 0.5)
    elif isinstance(current, list) and len(current) > 1:
        derived.append(current[:-1])
    elif isinstance(current, list) and current and isinstance(current[0], int):
        derived.append([current[0] + 1])
    if current is None or isinstance(current, str):
        derived += [1] if "int" in spec else []
        derived += [0.5] if "float" in spec else []
        derived += list(dict.fromkeys(string_leaves(cfg))) if "str" in spec else []
    candidates = []
    for value in [*profile_values(path), *derived]:
        if value != current and value not in candidates:
            candidates.append(value)
    return candidates[:MAX_CANDIDATES]


def with_value(cfg: dict, path: str, value) -> dict | None:
    """A copy of `cfg` with `path` set to `value`, or None where the schema refuses it."""
    changed = copy.deepcopy(cfg)
    parent, key = node_at(changed, path)
    parent[key] = value
    try:
        common.check_config(changed, common.CONFIG_SCHEMA, "changed")
    except common.InputError:
        return None
    return changed


def recorded_leaves(run, stage: str) -> list[str]:
    found = set()
    for manifest in run.rglob("*" + common.MANIFEST_SUFFIX):
        made_from = common.read_json(manifest).get("made_from", {})
        if made_from.get("stage") == stage:
            for section, value in made_from["config"].items():
                found.update(leaves(value, section))
    return sorted(found)


# ---- the tests ------------------------------------------------------------------------------------
def test_after_a_run_every_stage_dry_run_finds_its_outputs_current_and_writes_nothing(smoke_run):
    before = files_of(smoke_run["run"])
    for stage in STAGES:
        plan = dry_run(smoke_run["modules"][stage], smoke_run["config"])
        assert plan, stage
        assert {why for why in plan.values()} == {None}, (stage, {p: w for p, w in plan.items() if w})
    assert files_of(smoke_run["run"]) == before


@pytest.mark.parametrize("stage", STAGES)
def test_any_recorded_config_value_changed_makes_the_dry_run_redo_naming_it(smoke_run, stage, tmp_path, monkeypatch):
    # Earlier stages' outputs count as current here, so that each stage's own recipe is what is
    # checked (a stage run for real refuses a stale input first, naming the key: test_common).
    monkeypatch.setattr(common, "stale_reason", lambda output, cfg: None)
    module, run = smoke_run["modules"][stage], smoke_run["run"]
    base = yaml.safe_load(smoke_run["config"].read_text())
    keys = recorded_leaves(run, stage)
    assert keys, f"{stage} recorded no config"
    baseline = dry_run(module, smoke_run["config"])
    failed = {}
    for key in keys:
        found = node_at(base, key)
        current = found[0].get(found[1]) if found else None
        verdict, refusals = None, []
        for value in other_values(key, current, base):
            changed = with_value(base, key, value)
            if changed is None:
                continue
            config = tmp_path / "changed.yaml"
            config.write_text(yaml.safe_dump(changed, sort_keys=False))
            try:
                plan = dry_run(module, config)
            except common.InputError as err:  # this stage refuses the value (checked below)
                refusals.append(str(err))
                continue
            named = any(why and f"config {key} was" in why for why in plan.values())
            elsewhere = [why for path, why in plan.items() if path not in baseline]  # the key says where
            moved = bool(elsewhere) and None not in elsewhere
            verdict = f"{value!r}: " + ("redone, naming it" if named else "outputs moved" if moved
                                         else f"not redone naming it: {plan}")
            if not (named or moved):
                failed[key] = verdict
            break
        if verdict is None and not (refusals and key.split(".")[-1] in refusals[-1]):
            failed[key] = f"no other value tried, or refused without naming the key: {refusals[-1:]}"
    assert not failed, failed


def test_every_config_key_a_stage_reads_lies_in_its_recorded_sections_or_is_output_neutral(smoke_run):
    schema_keys = {key.rstrip("?") for key in common.CONFIG_SCHEMA}

    def covered(path: str, sections) -> bool:
        return any(path == s or path.startswith(s + ".") or path.startswith(s + "[") for s in sections)

    outside = {}
    for stage in STAGES:
        reads, sections = smoke_run["reads"][stage], smoke_run["sections"][stage]
        assert reads and sections, stage
        config_reads = {p for p in reads if re.split(r"[.\[]", p)[0] in schema_keys}
        stray = sorted(p for p in config_reads if not covered(p, sections)
                       and not covered(p, common.OUTPUT_NEUTRAL_KEYS))
        if stray:
            outside[stage] = stray
    assert not outside, outside


def test_a_forgotten_section_is_caught_by_the_read_check(smoke_run):
    """The check above can fail: 02 rerun with `hlv` left out of its declaration reads hlv.* outside."""
    module = smoke_run["modules"]["02_analyze_hlv"]
    log = Reads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "CONFIG_SECTIONS", tuple(s for s in module.CONFIG_SECTIONS if s != "hlv"))
        record_reads(patch, log)
        config = write_config(smoke_run["tmp"] / "forgot", **BUDGET)  # a run of its own, from the same data
        shutil.copytree(smoke_run["run"] / "data", smoke_run["tmp"] / "forgot" / "run" / "data")
        with contextlib.redirect_stdout(io.StringIO()):
            module.main(["--config", str(config), "--dataset", "mine"])
    assert "hlv" not in log.sections
    assert any(p.startswith("hlv.") for p in log.paths)


def test_changing_an_output_neutral_key_redoes_nothing(smoke_run, tmp_path):
    base = yaml.safe_load(smoke_run["config"].read_text())
    tried = 0
    for key in common.OUTPUT_NEUTRAL_KEYS:
        found = node_at(base, key) if "." in key else None
        if not found or found[1] not in found[0]:
            continue  # a top-level key (where outputs go, which are made): not inside a recorded section
        value = next((v for v in other_values(key, found[0][found[1]], base) if with_value(base, key, v)), None)
        assert value is not None, key
        config = tmp_path / "neutral.yaml"
        config.write_text(yaml.safe_dump(with_value(base, key, value), sort_keys=False))
        for stage in STAGES:
            baseline = dry_run(smoke_run["modules"][stage], smoke_run["config"])
            plan = dry_run(smoke_run["modules"][stage], config)
            # the same outputs stay current, but for what 06 pools (its recipe records the list)
            assert all(plan[p] is None or not plan[p].startswith("config ") for p in plan if p in baseline), \
                (key, value, stage, plan)
        tried += 1
    assert tried


def test_run_all_dry_run_has_every_stage_say_its_outputs_are_current_and_writes_nothing(smoke_run):
    run = smoke_run["run"]
    before = files_of(run)
    overrides = ["--run_dir", str(run)] + [arg for key, value in BUDGET.items()
                                           for arg in (f"--{key.replace('__', '.')}", json.dumps(value))]
    done = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--dataset", "mine", "--dry-run", "--",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    plans = [line for line in done.stdout.splitlines() if PLAN_LINE.match(line)]
    assert {line.split("]")[0] for line in plans} >= {"[prepare", "[hlv", "[03", "[sft", "[capo", "[eval"}
    assert all(line.endswith(": current") for line in plans), [p for p in plans if not p.endswith(": current")]
    assert files_of(run) == before
