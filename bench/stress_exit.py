"""Many short two-process launches in a row, run_all.sh's way (common.accelerate_launch): counts the
launches that do not exit 0, and prints each failure's tail (which process, which signal). Exits
1 if a launch failed or kept its gloo threads after leaving the group.

    .venv/bin/python bench/stress_exit.py --launches 200                          # stage-like payload
    .venv/bin/python bench/stress_exit.py --launches 50 --probe --gloo-delay-ms 60
    .venv/bin/python bench/stress_exit.py --launches 50 --payload minimal --probe --gloo-delay-ms 60

A payload ends the way a stage ends: it joins the group (common.process_state), takes its share
(this_process_share), works alone (training_alone, as 04/05 do), gathers (gather_to_all), and
process 1 returns at once while process 0 goes on a little (03-06 print their summary on the main
process only), all inside common.run_stage. Payloads:

  stage-like  imports torch, transformers and tokenizers first, as the stages do; builds a tiny
              Llama inside training_alone (transformers imports its model code then, with the
              group up, as 03's model loading does), a forward and backward, then gathers
  minimal     common and accelerate only: join, share, training_alone, gather
  no-leave    minimal, but leave_process_group does nothing: the group is up at exit

--probe compiles bench/exit_probe.c and preloads it into the launched processes: a process that
aborts prints its aborting thread's stack and its threads' names (in the failure's tail). With
--gloo-delay-ms N, gloo's worker threads also pause a random 0..N ms after finishing each
collective, as on a busy machine, which makes the exit race this script looks for frequent
(docs/DESIGN.md, "Processes"). Each process also reports the gloo threads it still has once
common.run_stage has left the group: none, unless something still holds the group. Results go in
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PAYLOAD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    KIND = {kind!r}
    if KIND == "stage-like":
        import tokenizers, torch, transformers
    import common
    if KIND == "no-leave":
        common.leave_process_group = lambda: None

    def main():
        rank = int(os.environ["RANK"])
        common.process_state()
        mine = common.this_process_share(list("abcd"))
        with common.training_alone():
            if KIND == "stage-like":
                torch.manual_seed(rank)
                config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  num_key_value_heads=1)
                model = transformers.LlamaForCausalLM(config)
                ids = torch.randint(0, 64, (2, 8))
                model(input_ids=ids, labels=ids).loss.backward()
        done = common.gather_to_all([(rank, unit) for unit in mine])
        assert [r for r, _ in done] == [0, 0, 1, 1], done
        if not common.is_main_process():
            return  # process 1 leaves while process 0 still works (writes its summary)
        time.sleep(0.05)
        print("summary:", done, flush=True)

    common.run_stage(main)
    # what of the group is still up once run_stage has left it (nothing, when the group was freed)
    names = [open(f"/proc/self/task/{{task}}/comm").read().strip() for task in os.listdir("/proc/self/task")]
    print(f"[stress_exit] process {{os.environ['RANK']}}: gloo threads after leave_process_group: "
          f"{{sorted(n for n in names if 'gloo' in n)}}", flush=True)
""")

LAUNCH = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--main_process_port", "0", "--num_cpu_threads_per_process", "1"]


def build_probe(work: Path) -> Path:
    library = work / "exit_probe.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(library), str(ROOT / "bench" / "exit_probe.c"), "-ldl"],
                   check=True)
    return library


def failure_tail(text: str, lines: int) -> str:
    """A failure's output from its first line that says what failed (terminate, the probe's
    backtrace, the launcher's verdict), at most `lines` lines of it."""
    kept = text.strip().splitlines()
    marks = ("terminate called", "exit_probe", "exitcode", "failed on process", "Traceback")
    first = next((i for i, line in enumerate(kept) if any(m in line for m in marks)), max(len(kept) - lines, 0))
    return "\n".join(kept[first:first + lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=100)
    parser.add_argument("--payload", choices=("stage-like", "minimal", "no-leave"), default="stage-like")
    parser.add_argument("--probe", action="store_true", help="preload bench/exit_probe.c (backtrace on abort)")
    parser.add_argument("--gloo-delay-ms", type=int, default=0,
                        help="gloo's worker threads pause up to this long after each collective (implies --probe)")
    parser.add_argument("--stop-after", type=int, default=0, help="stop after this many failures (0: never)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds one launch may take")
    parser.add_argument("--tail", type=int, default=60, help="lines of a failure's output to print")
    args = parser.parse_args(argv)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="stress_exit_") as tmp:
        work = Path(tmp)
        script = work / "payload.py"
        script.write_text(PAYLOAD.format(root=str(ROOT), kind=args.payload))
        if args.probe or args.gloo_delay_ms:
            env["LD_PRELOAD"] = str(build_probe(work))
            env["EXIT_PROBE_GLOO_DELAY_MS"] = str(args.gloo_delay_ms)
        command = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import common; "
                   "sys.exit(common.accelerate_launch(sys.argv[1:]))", *LAUNCH, str(script)]
        failures, group_left_up, started = [], [], time.time()
        for launch in range(1, args.launches + 1):
            t0 = time.time()
            try:
                done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=args.timeout)
                code, output = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as err:
                code = "timeout"
                output = "".join(o.decode() if isinstance(o, bytes) else (o or "") for o in (err.stdout, err.stderr))
            seconds = time.time() - t0
            if any(not line.endswith("[]") for line in output.splitlines()
                   if "gloo threads after leave_process_group" in line):
                group_left_up.append(launch)
            if code != 0:
                failures.append(launch)
                print(f"--- launch {launch}: exit {code} after {seconds:.1f}s ---\n{failure_tail(output, args.tail)}",
                      flush=True)
                if args.stop_after and len(failures) >= args.stop_after:
                    break
            elif launch % 10 == 0:
                print(f"launch {launch}: ok ({seconds:.1f}s); {len(failures)} failed so far", flush=True)
        total = time.time() - started
    print(f"{args.payload}: {launch} launches, {len(failures)} not exit 0{f' {failures}' if failures else ''}; "
          f"{len(group_left_up)} with gloo threads up after leave_process_group; "
          f"{total:.0f}s ({total / launch:.1f}s a launch)", flush=True)
    return 1 if failures or (group_left_up and args.payload != "no-leave") else 0


if __name__ == "__main__":
    sys.exit(main())
