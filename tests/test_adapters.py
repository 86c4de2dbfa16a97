"""Trainer settings and saved adapters: `sft.trainer` / `capo.trainer` entries reach trl's config
classes (bad ones stop with one line), adapters name their base model by hub ID and carry a model
card, and a SmolLM2 adapter copied elsewhere loads with plain `AutoPeftModelForCausalLM` offline.

    .venv/bin/python -m pytest -q tests/test_adapters.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import common
from conftest import ROOT, load_stage
from test_sft import write_fixture

sft = load_stage("04_sft")
capo = load_stage("05_capo")
pytestmark = pytest.mark.usefixtures("one_thread")


def config_with(tmp_path, sft_trainer=None, capo_trainer=None):
    return common.load_config(write_fixture(tmp_path, sft__trainer=sft_trainer or {},
                                            capo__trainer=capo_trainer or {}))


# ----------------------------------------------------------------------------
# sft.trainer / capo.trainer
# ----------------------------------------------------------------------------
def test_trainer_entries_pass_through_and_override_the_kits_defaults(tmp_path):
    cfg = config_with(tmp_path, sft_trainer={"optim": "adamw_torch", "weight_decay": 0.01, "max_grad_norm": 0.5,
                                             "save_total_limit": 3},
                      capo_trainer={"max_grad_norm": 0.25, "loss_type": ["hinge"]})
    args = sft.sft_config(cfg, tmp_path / "work", has_dev=False)
    assert (args.optim, args.weight_decay, args.max_grad_norm, args.save_total_limit) == \
        ("adamw_torch", 0.01, 0.5, 3)  # the kit's default save_total_limit is 1
    assert args.learning_rate == cfg["sft"]["learning_rate"]  # section keys still apply
    dpo = capo.dpo_config(cfg, tmp_path / "work")
    assert dpo.max_grad_norm == 0.25 and list(dpo.loss_type) == ["hinge"] and dpo.beta == cfg["capo"]["beta"]
    defaults = sft.sft_config(config_with(tmp_path / "plain"), tmp_path / "work", has_dev=False)
    assert defaults.max_grad_norm == 1.0 and defaults.report_to == []  # kit default: report to nothing


def test_trainer_entries_can_be_set_on_the_command_line(tmp_path):
    path = write_fixture(tmp_path)
    cfg = common.load_config(path, ["--sft.trainer.optim", "adafactor", "--capo.trainer", "{weight_decay: 0.1}"])
    assert cfg["sft"]["trainer"] == {"optim": "adafactor"} and cfg["capo"]["trainer"] == {"weight_decay": 0.1}
    assert sft.sft_config(cfg, tmp_path / "work", has_dev=False).optim == "adafactor"
    with pytest.raises(common.InputError, match="unknown config key 'sft.optim'"):
        common.load_config(path, ["--sft.optim", "adafactor"])  # only the trainer mapping is open


@pytest.mark.parametrize("entries, message", [
    ({"optimm": "adamw_torch"}, "sft.trainer.optimm: not a field of SFTConfig (did you mean optim?)"),
    ({"learning_rate": 0.1}, "sft.trainer.learning_rate: set by sft.learning_rate; change that instead"),
    ({"seed": 3}, "sft.trainer.seed: set by the top-level `seed`"),
    ({"output_dir": "/tmp/x"}, "sft.trainer.output_dir: the kit places checkpoints"),
    ({"weight_decay": "a lot"}, "sft.trainer.weight_decay: expected float or int, got 'a lot'"),
    ({"weight_decay": 0.0, "optim": "adamw_nope"}, "sft.trainer.optim: SFTConfig rejects it (adamw_nope is not"),
    ({"report_to": "tensorbored"}, "sft.trainer.report_to: unknown integration 'tensorbored'"),
])
def test_bad_trainer_entries_stop_with_one_line_naming_the_key(tmp_path, entries, message):
    cfg = config_with(tmp_path, sft_trainer=entries)
    with pytest.raises(common.InputError) as err:
        sft.sft_config(cfg, tmp_path / "work", has_dev=False)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_bad_trainer_entry_stops_the_stage_with_exit_code_2(tmp_path, capsys):
    config_path = write_fixture(tmp_path, capo__trainer={"max_grad_nrom": 0.5})
    argv = ["--config", str(config_path), "--dataset", "toy", "--annotators", "A0"]
    capo_stage_error = None
    with pytest.raises(SystemExit) as exit_info:
        common.run_stage(lambda: capo.dpo_config(common.load_config(config_path), tmp_path / "w"))
    capo_stage_error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert capo_stage_error == ("error: capo.trainer.max_grad_nrom: not a field of DPOConfig "
                                "(did you mean max_grad_norm?)\n")
    with pytest.raises(SystemExit):  # the stage itself, before any training
        common.run_stage(lambda: sft.main(argv + ["--sft.trainer", "{optimm: sgd}"]))
    err = capsys.readouterr().err  # (a fresh cache also shows the one-time GGUF conversion's progress)
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        "error: sft.trainer.optimm: not a field of SFTConfig (did you mean optim?)"]
    assert "Traceback" not in err


def test_tensorboard_not_installed_says_pip_install(tmp_path, monkeypatch):
    from transformers.integrations import integration_utils
    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: [])
    cfg = config_with(tmp_path, sft_trainer={"report_to": "tensorboard"})
    with pytest.raises(common.InputError, match=r"^sft\.trainer\.report_to: 'tensorboard' is not installed; "
                                                r"pip install tensorboard$"):
        sft.sft_config(cfg, tmp_path / "work", has_dev=False)


def test_integration_logs_go_under_the_run_directory(tmp_path, monkeypatch):
    from transformers.integrations import integration_utils
    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: ["tensorboard"])
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "unset")  # restored after the test
    cfg = config_with(tmp_path, sft_trainer={"report_to": ["tensorboard"]})
    work = common.training_work_dir(cfg, "toy", "tiny", "sft", "A0")
    args = sft.sft_config(cfg, work, has_dev=False)
    assert args.report_to == ["tensorboard"]
    logs = common.run_dir(cfg) / "logs" / "sft" / "toy" / "tiny" / "A0"
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(logs)  # not in work/, which is deleted after training


# ----------------------------------------------------------------------------
# Adapter folders: hub ID, model card, test metrics section
# ----------------------------------------------------------------------------
def test_sft_run_writes_a_model_card_and_06_can_fill_its_metrics(tmp_path):
    config_path = write_fixture(tmp_path, sft__epochs=1, sft__max_train_examples=2,
                                sft__trainer={"max_grad_norm": 0.5, "optim": "adamw_torch"},
                                data__max_eval_items=1, generation__max_new_tokens=2)
    cfg = common.load_config(config_path)
    sft.main(["--config", str(config_path), "--dataset", "toy", "--annotators", "A0"])
    adapter = common.adapter_dir(cfg, "toy", "tiny", "sft", "A0")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] is None  # the tiny model is on no hub
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card
    assert "annotator A0" in card or "annotator **A0**" in card
    assert "max_grad_norm: 0.5" in card and "optim: adamw_torch" in card  # the training config as used
    assert "the last epoch's adapter is kept" in card
    assert "Not measured yet" in card and "[More Information Needed]" not in card  # not peft's template
    assert common.stale_reason(adapter, cfg) is None  # the card does not make the adapter stale

    common.update_adapter_card_metrics(adapter, {"label_acc": 0.5, "imitation": {"m": 10, "norm": None}},
                                       source="06_eval.py")
    card = (adapter / "README.md").read_text()
    assert "| label_acc | 0.5000 |" in card and "| imitation.m | 10 |" in card
    assert "| imitation.norm | missing |" in card and "Not measured yet" not in card
    common.update_adapter_card_metrics(adapter, {"label_acc": 0.25})  # replaces, never appends twice
    card = (adapter / "README.md").read_text()
    assert card.count(common.CARD_METRICS_START) == 1 and "| label_acc | 0.2500 |" in card
    assert "imitation" not in card.split(common.CARD_METRICS_START)[1]
    assert common.stale_reason(adapter, cfg) is None  # filling in test metrics keeps the adapter current


def test_base_model_hub_ids_per_source():
    assert common.base_model_hub_id({"source": "gguf"}) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert common.base_model_hub_id({"source": "hub", "name_or_path": "Qwen/Qwen3-4B"}) == "Qwen/Qwen3-4B"
    assert common.base_model_hub_id({"source": "tiny"}) is None
    paper = common.load_config(ROOT / "configs" / "paper.yaml")
    assert [common.base_model_hub_id(m) for m in paper["models"]] == [m["name_or_path"] for m in paper["models"]]


LOAD_ELSEWHERE = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    logits = model(input_ids=torch.tensor([json.loads(sys.argv[2])])).logits[0, -1]
torch.save(logits, sys.argv[3])
print(model.peft_config["default"].base_model_name_or_path)
"""


def test_smollm2_adapter_copied_elsewhere_loads_with_auto_peft_model_offline(tmp_path):
    from peft import LoraConfig, get_peft_model
    cpu_cfg = common.load_config(ROOT / "configs" / "cpu.yaml", ["--run_dir", str(tmp_path / "run")])
    model_cfg = cpu_cfg["models"][0]
    base, tokenizer = common.load_model_and_tokenizer(model_cfg, device="cpu")
    torch.manual_seed(0)  # random A and B (not peft's B = 0), so the adapter changes the output
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    saved = tmp_path / "trained" / "A0"
    model.save_pretrained(saved)
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(common.gguf_cache_dir())  # what peft records by itself: a path on this machine
    common.write_json(saved / "train_log.json", {"dataset": "varierr", "annotator": "A0", "method": "sft",
                                                 "train_examples": 0, "steps": 0, "train_loss": None})
    common.finish_adapter_dir(saved, cpu_cfg, model_cfg)
    card = (saved / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "dequantised to float32" in card

    # "Another machine": the adapter at a new path, an HF cache holding only the base model under its
    # hub ID (files linked from the kit's converted SmolLM2), offline, outside the repository.
    elsewhere = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(saved, elsewhere)
    hub_cache = tmp_path / "hf" / "hub"
    repo = hub_cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    revision = "0" * 40
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for file in common.gguf_cache_dir().iterdir():
        (repo / "snapshots" / revision / file.name).symlink_to(file)
    ids = tokenizer("Premise: A cat sleeps.\nHypothesis: An animal rests.")["input_ids"]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, str(elsewhere), json.dumps(ids),
                          str(tmp_path / "logits.pt")], cwd=tmp_path / "elsewhere", env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    loaded = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0, -1]
        with model.disable_adapter():
            bare = model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(loaded, expected, atol=1e-3)  # the adapter, on the same weights
    assert not torch.allclose(loaded, bare, atol=1e-3)  # and it is really applied
