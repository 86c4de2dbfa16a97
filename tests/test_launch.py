"""run_all.sh's launcher: accelerate launch for every stage, its multi-node config file, and the
process helpers the stages share work with (common.this_process_share, gather_to_all,
training_alone). The end-to-end check that 2 processes write the bytes 1 process writes is
tests/test_own_data.py's.

    .venv/bin/python -m pytest -q tests/test_launch.py
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

import common
from conftest import ROOT

PROBE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    import common
    from accelerate import PartialState

    def main():  # a stage's main, run as the stages run theirs (common.run_stage)
        rank = int(os.environ["RANK"])
        mine = common.this_process_share(list("abcde"))
        assert mine == (list("abc") if rank == 0 else list("de")), mine
        with common.training_alone():  # what a trainer sees while each process trains its own adapter
            state = PartialState(cpu=True)
            assert state.num_processes == 1 and state.is_main_process and common.is_main_process()
            assert "WORLD_SIZE" not in os.environ
        assert common.world_size() == 2 and common.process_state().num_processes == 2
        assert common.gather_to_all([f"r{{rank}}"]) == ["r0", "r1"]
        common.wait_for_everyone()
        sys.exit(3 if rank == 1 else 0)

    common.run_stage(main)
""")


def test_processes_share_units_train_alone_gather_and_report_the_exit_code(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(root=str(ROOT)))
    argv = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "0", "--num_cpu_threads_per_process", "1", str(script)]
    done = subprocess.run([sys.executable, "-c", "import sys, common; sys.exit(common.accelerate_launch(sys.argv[1:]))",
                           *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    # Every assertion held on both processes; rank 1's exit code 3 comes back, in one line, no traceback
    assert done.returncode == 3, done.stdout + done.stderr
    assert "probe.py failed on process(es) 1 (exit code 3)" in done.stderr
    assert "Traceback" not in done.stderr and "AssertionError" not in done.stderr


def test_two_process_launches_exit_0_and_leave_no_gloo_thread_behind():
    """bench/stress_exit.py's short form (issue 33): stage-like launches (a transformers model class
    first used with the group up, as 03 does), with gloo's worker threads paused after each
    collective (bench/exit_probe.c, where gcc is there), which makes the exit abort of a group left
    alive after leave_process_group frequent; and every process must have no gloo thread left once
    run_stage has left the group, which holds whatever the timing."""
    probe = ["--probe", "--gloo-delay-ms", "60"] if shutil.which("gcc") else []
    done = subprocess.run([sys.executable, "bench/stress_exit.py", "--launches", "2", *probe], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "stage-like: 2 launches, 0 not exit 0; 0 with gloo threads up after leave_process_group" in done.stdout


def test_the_two_node_config_file_parses_with_accelerate():
    path = ROOT / "configs" / "accelerate" / "two_nodes.yaml"
    config = load_config_from_file(str(path))
    assert (config.num_machines, config.machine_rank, config.num_processes) == (2, 0, 16)
    assert config.main_process_ip and config.main_process_port
    args = launch_command_parser().parse_args(["--config_file", str(path), "03_prompt_baselines.py",
                                                "--config", "configs/paper.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.multi_gpu and args.num_machines == 2 and args.num_processes == 16


def test_run_all_launches_with_accelerate_and_has_no_scheduler_of_its_own():
    script = (ROOT / "run_all.sh").read_text()
    assert "py launch_stage" in script and "--num_processes" in script  # common.launch_stage: accelerate launch
    assert "CUDA_VISIBLE_DEVICES" not in script and "fan_out" not in script  # the old bash scheduler


def test_run_all_rejects_a_bad_process_count_or_config_file_in_one_line():
    for args, message in ((["--processes", "two"], "--processes needs a whole number"),
                          (["--accelerate-config", "no/such.yaml"], "no such file")):
        done = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2 and message in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_one_process_shares_everything_with_itself():
    assert common.world_size() == 1
    assert common.this_process_share([1, 2, 3]) == [1, 2, 3] and common.gather_to_all([4]) == [4]
    with common.training_alone():
        assert common.is_main_process()


# ---- the launcher on a laptop: bash 3.2, BSD tools, no GPU or no paper weights --------------------
BASH4_OR_GNU = {"mapfile": "bash 4", "readarray": "bash 4", "declare -A": "bash 4", "${!": "bash 4 indirection",
                ",,}": "bash 4", "^^}": "bash 4", "|&": "bash 4", "&>>": "bash 4", "coproc": "bash 4",
                "nproc": "GNU coreutils", "/usr/bin/time": "GNU time", "sha256sum": "GNU coreutils",
                "readlink -f": "GNU coreutils", "sed -i": "GNU sed", "date -d": "GNU date"}


def test_the_shell_scripts_use_nothing_bash_3_2_or_bsd_userland_lacks():
    for script in ("run_all.sh", "setup.sh", "run_tests.sh"):
        text = "\n".join(line.split(" #")[0] for line in (ROOT / script).read_text().splitlines()
                         if not line.lstrip().startswith("#"))
        found = {construct: why for construct, why in BASH4_OR_GNU.items() if construct in text}
        assert not found, f"{script} uses {found}"
        # an empty array expanded under `set -u` is an error in bash < 4.4: guard it as ${a[@]+"${a[@]}"}
        assert '"${extra[@]}"' not in text.replace('${extra[@]+"${extra[@]}"}', ""), script


def test_with_gpus_but_without_the_papers_weights_the_default_is_cpu_said_in_one_line(monkeypatch, capsys):
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(common, "hub_model_cached", lambda repo_id: False)
    common.run_all_plan(["", "", ""])
    out, err = capsys.readouterr()
    assert out.split()[0] == "cpu" and out.split()[3:5] == ["2", "0"]  # a process per GPU, no CPU threads
    assert err.count("\n") == 1 and "paper profile's models are not in the local Hugging Face cache" in err
    assert "--profile paper --download-models" in err
    common.run_all_plan(["", "", "1"])  # --download-models: paper, and the hub models to fetch
    out = capsys.readouterr().out.split()
    assert out[0] == "paper" and "Qwen/Qwen3-4B" in out and "meta-llama/Llama-3.2-3B-Instruct" in out
    monkeypatch.setattr(common, "hub_model_cached", lambda repo_id: True)  # the weights are here
    common.run_all_plan(["", "", ""])
    assert capsys.readouterr().out.split()[:2] == ["paper", "runs/paper"]


def test_setup_stops_in_one_line_on_a_python_other_than_3_11(tmp_path):
    fake = tmp_path / "python3.13"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-V" ]; then echo "Python 3.13.1"; exit 0; fi\nexit 1\n')
    fake.chmod(0o755)
    done = subprocess.run(["bash", "setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "CAPO_VENV": str(tmp_path / "venv")})
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"setup.sh: capo-kit needs Python 3.11; {fake} is Python 3.13.1 (choose one: PYTHON=python3.11 bash setup.sh)"]
    assert not (tmp_path / "venv").exists()
