"""endpoint_judge.py: 06's LLM judge served by any OpenAI-compatible endpoint (eval.judge.backend:
openai: a local llama.cpp, vLLM or `transformers serve` server, or a hosted API), kept apart from the
models it judges. Imported by 06_eval.py only:

    python 06_eval.py --config configs/cpu.yaml --eval.judge.backend openai \
        --eval.judge.base_url http://127.0.0.1:8080/v1 --eval.judge.model NAME [--eval.judge.api_key_env VAR]

The judge answers the local judge's forced choice (06's `judge_messages`: which annotator wrote
this response?) by the first of ROUTES the server honours, probed once before the first real
request: vLLM's `guided_choice`, llama.cpp's GBNF `grammar`, a `response_format` JSON schema with an
enum of the IDs (each greedy: the local judge's decision token by token), else a short free reply
parsed like the local judge's (unparseable: scored wrong). Top log-probabilities are not used: they
need each ID to be one token on the server's tokenizer, which a client cannot know (A0..A3 are two
tokens in SmolLM2's). Which route ran goes into metrics.json and the report.

The `openai` client brings a timeout per request and its own retries with exponential backoff (429,
5xx, dropped connections); at most eval.judge.max_concurrency requests are in flight. The key is read
from the environment variable eval.judge.api_key_env and written nowhere. Replies are appended as they
arrive to judge_cache/<identity>.jsonl in the run directory, keyed by the judge's identity (base URL,
model; the server's own model id is recorded beside it) and the prompt: a rerun, or a run stopped
halfway, asks only for what is missing, so the verdicts are the same.
"""
from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import openai

import common
from common import InputError

ROUTES = ("guided_choice", "grammar", "json_schema", "free")
FREE_REPLY_TOKENS = 12
PROBE_CHOICE = "zebra-7"  # a reply no model gives unprompted: seeing it means the constraint holds


def client(judge: dict):
    """An OpenAI client for the endpoint; the key from its environment variable."""
    key = os.environ.get(judge["api_key_env"]) if judge["api_key_env"] else "no-key"
    if not key:
        raise InputError(f"eval.judge.api_key_env: the environment variable {judge['api_key_env']} is not set "
                         f"(it holds the key for {judge['base_url']})")
    return openai.OpenAI(base_url=judge["base_url"], api_key=key, timeout=float(judge["timeout_s"]),
                         max_retries=int(judge["max_retries"]))


def one_line(err: Exception, judge: dict) -> InputError:
    """The endpoint's failure as the kit's one line (no traceback)."""
    where = f"judge endpoint {judge['base_url']}"
    if isinstance(err, openai.AuthenticationError | openai.PermissionDeniedError):
        return InputError(f"{where} refused the key ({err.status_code}): check the key in "
                          f"${judge['api_key_env'] or '(eval.judge.api_key_env is null: no key sent)'}")
    if isinstance(err, openai.NotFoundError):
        return InputError(f"{where} does not serve model {judge['model']!r} (404): see its GET /models")
    if isinstance(err, openai.APITimeoutError):
        return InputError(f"{where}: no reply within {judge['timeout_s']} s, {judge['max_retries']} retries used up")
    if isinstance(err, openai.APIConnectionError):
        return InputError(f"{where} is unreachable ({err.__cause__ or err}); is the server running? "
                          f"({judge['max_retries']} retries used up)")
    if isinstance(err, openai.RateLimitError | openai.InternalServerError):
        return InputError(f"{where}: {err.status_code} after {judge['max_retries']} retries; try again later "
                          "(replies so far are cached)")
    if isinstance(err, openai.APIStatusError):
        return InputError(f"{where}: {err.status_code} {str(err)[:200]}")
    return InputError(f"{where}: {type(err).__name__}: {err}")


def route_request(route: str, choices: list[str]) -> dict:
    """The request fields that force one of `choices` (greedy) on `route`."""
    if route == "guided_choice":
        return {"max_tokens": 16, "extra_body": {"guided_choice": choices}}
    if route == "grammar":
        alternatives = " | ".join(json.dumps(choice) for choice in choices)
        return {"max_tokens": 16, "extra_body": {"grammar": f"root ::= {alternatives}"}}
    if route == "json_schema":
        schema = {"type": "object", "properties": {"annotator": {"type": "string", "enum": choices}},
                  "required": ["annotator"], "additionalProperties": False}
        verdict = {"name": "verdict", "schema": schema, "strict": True}
        return {"max_tokens": 32, "response_format": {"type": "json_schema", "json_schema": verdict}}
    return {"max_tokens": FREE_REPLY_TOKENS}


def ask(api, judge: dict, route: str, messages: list[dict], choices: list[str]) -> str:
    """The reply as the local judge would give it: the ID itself (json_schema unwrapped)."""
    response = api.chat.completions.create(model=judge["model"], messages=messages, temperature=0.0,
                                           **route_request(route, choices))
    content = response.choices[0].message.content or ""
    if route == "json_schema":
        try:
            return str(json.loads(content).get("annotator", ""))
        except (json.JSONDecodeError, AttributeError):
            pass
    return content


def find_route(api, judge: dict) -> str:
    """The first route whose constraint the server honours: a probe that asks for a reply no
    model gives unprompted, with that reply the only one allowed."""
    messages = [{"role": "user", "content": "Say hello."}]
    for route in ROUTES[:-1]:
        try:
            if ask(api, judge, route, messages, [PROBE_CHOICE]).strip() == PROBE_CHOICE:
                return route
        except (openai.BadRequestError, openai.UnprocessableEntityError):
            continue  # the server refuses the field: not this route
        except openai.APIError as err:
            raise one_line(err, judge) from None
    return "free"


def served_model_id(api, judge: dict) -> str | None:
    """The server's id for the model (GET /models), where it gives one."""
    try:
        ids = [model.id for model in api.models.list()]
    except (openai.NotFoundError, openai.InternalServerError, openai.BadRequestError):
        return None  # some servers have no /models
    except openai.APIError as err:
        raise one_line(err, judge) from None
    return judge["model"] if judge["model"] in ids else (ids[0] if len(ids) == 1 else None)


class ReplyCache(dict):
    """Replies of one judge identity by key, one JSON line each in `path`, appended as they arrive.
    A line cut short by a kill is skipped on reading (that reply is asked again)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.lock = path, threading.Lock()
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self[entry["key"]] = entry

    def put(self, key: str, **values) -> None:
        entry = {"key": key, **values}
        with self.lock:
            self[key] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())


def run(cfg: dict, jobs: list[dict], annotators: dict[str, list[str]], parse_verdict) -> dict:
    """Adds "reply" and "verdict" (06's `parse_verdict` of the reply) to every job (06's judge jobs
    with messages); returns the judge's identity (backend, base URL, model, the server's model
    id, the route)."""
    judge = cfg["eval"]["judge"]
    identity = {"backend": "openai", "base_url": judge["base_url"], "model": judge["model"]}
    cache = ReplyCache(common.run_dir(cfg) / "judge_cache" / f"{common.config_hash(identity)[:16]}.jsonl")
    if not jobs:
        return {**identity, "label": f"{judge['model']} at {judge['base_url']} (nothing to judge)"}
    api = None
    about = cache.get("identity")
    if about is None:  # first contact: the server's id for the model and the route it honours
        api = client(judge)
        about = {"served_model_id": served_model_id(api, judge), "route": find_route(api, judge)}
        cache.put("identity", **about)
    identity.update(served_model_id=about["served_model_id"], route=about["route"])
    identity["label"] = (f"{judge['model']} at {judge['base_url']}"
                         + (f" (server id {about['served_model_id']})" if about["served_model_id"] else "")
                         + f", {about['route']}")
    keyed = [(common.config_hash([identity["base_url"], identity["model"], about["route"], job["messages"]]), job)
             for job in jobs]
    missing = list({key: job for key, job in keyed if key not in cache}.items())  # one request per prompt
    prompt_chars = sum(len(m["content"]) for _, job in missing for m in job["messages"])
    print(f"[eval] judge {identity['label']}: {len(missing)} requests to send for {len(jobs)} verdicts "
          f"({len({key for key, _ in keyed}) - len(missing)} distinct prompts answered from the cache), about "
          f"{prompt_chars // 4} prompt tokens (characters / 4)", flush=True)
    if missing:
        api = api or client(judge)

        def answer(key: str, job: dict) -> None:
            cache.put(key, reply=ask(api, judge, about["route"], job["messages"], annotators[job["dataset"]]))

        with ThreadPoolExecutor(max_workers=int(judge["max_concurrency"])) as pool:
            futures = [pool.submit(answer, key, job) for key, job in missing]
            try:
                for future in as_completed(futures):
                    future.result()
            except openai.APIError as err:
                raise one_line(err, judge) from None
            finally:
                pool.shutdown(cancel_futures=True)  # after a failure, the requests not yet sent are dropped
    for key, job in keyed:
        job["reply"] = cache[key]["reply"]
        job["verdict"] = parse_verdict(job["reply"], annotators[job["dataset"]])
    return identity
