"""A fake OpenAI-compatible judge/embeddings server for eval and grader tests (and bench/eval.py).

Registered in a project as the external provider ``judge`` so its models route as
``openpipe:judge/<anything>``. Answers are deterministic functions of the request:

- ``response_format`` named ``score_model``: ``{"steps": [...], "result": x}`` with x read from a
  ``[score=x]`` marker in the prompt (0.5 without one); ``[refuse]`` → a refusal; ``[garbage]`` →
  text that is not JSON;
- named ``label_model``: the label from a ``[label=x]`` marker;
- a head-to-head prompt (``<output_a>``/``<output_b>``): the shorter output wins, equal length → TIE;
- anything else: ``Answer to: <last user text>`` (a model under evaluation), or, for a model name
  ending ``-echo``, the dataset's expected answer marker ``[expect=...]``;
- ``POST /v1/embeddings``: a 26-dim letter-count vector per input (cosine is hand-computable).

``latency`` (seconds) delays every answer, for the benchmark.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.common.kafka import free_port
from tests.conftest import wait_until

JUDGE_KEY = "sk-judge-test-key"


def letter_vector(text: str) -> list[float]:
    counts = Counter(c for c in text.lower() if "a" <= c <= "z")
    return [float(counts.get(chr(ord("a") + i), 0)) for i in range(26)]


def _text(messages: list[dict[str, Any]]) -> str:
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p.get("text", "") for p in content if isinstance(p, dict)]
    return "\n".join(parts)


def _last_user(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return ""


def _completion(model: str, content: str | None, refusal: str | None = None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
    }


def judge_answer(body: dict[str, Any]) -> dict[str, Any]:
    model = body.get("model", "")
    messages = body.get("messages") or []
    prompt = _text(messages)
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
    if "[refuse]" in prompt:
        return _completion(model, None, refusal="I can't grade this.")
    if "[garbage]" in prompt:
        return _completion(model, "not json at all")
    if schema == "score_model":
        found = re.search(r"\[score=([-0-9.]+)\]", prompt)
        result = float(found.group(1)) if found else 0.5
        return _completion(model, orjson.dumps({"steps": ["looked at it"], "result": result}).decode())
    if schema == "label_model":
        found = re.search(r"\[label=([^\]]+)\]", prompt)
        label = found.group(1) if found else "unknown"
        return _completion(model, orjson.dumps({"steps": ["read it"], "result": label}).decode())
    a = re.search(r"<output_a>(.*?)</output_a>", prompt, re.S)
    b = re.search(r"<output_b>(.*?)</output_b>", prompt, re.S)
    if a and b:
        size_a, size_b = len(a.group(1)), len(b.group(1))
        winner = "A" if size_a < size_b else "B" if size_b < size_a else "TIE"
        verdict = {
            "explanation": f"A has {size_a} characters, B has {size_b}: shorter wins",
            "winner": winner,
        }
        return _completion(model, orjson.dumps(verdict).decode())
    user = _last_user(messages)
    if model.endswith("-echo"):
        found = re.search(r"\[expect=([^\]]*)\]", user)
        return _completion(model, found.group(1) if found else user)
    return _completion(model, f"Answer to: {user}")


@dataclass
class FakeJudge:
    base_url: str = ""
    latency: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)

    def count(self, kind: str) -> int:
        return self.calls[kind]


def build_app(fake: FakeJudge) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {JUDGE_KEY}":
            return JSONResponse({"error": {"message": "bad key", "type": "auth"}}, status_code=401)
        body = orjson.loads(await request.body())
        fake.requests.append(body)
        fake.calls["chat"] += 1
        fake.calls[body.get("model", "")] += 1
        if fake.latency:
            await asyncio.sleep(fake.latency)
        return JSONResponse(judge_answer(body))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = orjson.loads(await request.body())
        fake.requests.append(body)
        fake.calls["embeddings"] += 1
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": letter_vector(str(text))}
            for i, text in enumerate(inputs)
        ]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": 3 * len(inputs), "total_tokens": 3 * len(inputs)},
            }
        )

    return app


async def start_fake_judge(latency: float = 0.0) -> tuple[FakeJudge, uvicorn.Server, asyncio.Task]:
    port = free_port()
    fake = FakeJudge(base_url=f"http://127.0.0.1:{port}/v1", latency=latency)
    server = uvicorn.Server(
        uvicorn.Config(build_app(fake), host="127.0.0.1", port=port, log_level="warning", backlog=2048)
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    return fake, server, task


async def register_judge(http: Any, fake: FakeJudge) -> None:
    """Add the fake as the project's external provider ``judge`` and wait until the router routes it."""
    response = await http.post(
        "/external-providers",
        json={"slug": "judge", "type": "openai", "baseUrl": fake.base_url, "apiKey": JUDGE_KEY},
    )
    assert response.status_code == 201, response.text
    for _ in range(200):
        probe = await http.post(
            "/chat/completions",
            json={"model": "openpipe:judge/probe", "messages": [{"role": "user", "content": "hi"}]},
        )
        if probe.status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the router never routed openpipe:judge/...: {probe.text}")


# --- evals over a dataset ----------------------------------------------------------------------

N = 6
EXACT_MATCH = """
def exact_tool_calls_match(calls1, calls2):
    if not calls1 and not calls2:
        return True
    if not calls1 or not calls2 or len(calls1) != len(calls2):
        return False
    return all(
        a["function"]["name"] == b["function"]["name"]
        and a["function"]["arguments"] == b["function"]["arguments"]
        for a, b in zip(calls1, calls2)
    )


def grader(messages, tools, tool_choice, generated_output, dataset_output):
    if not exact_tool_calls_match(generated_output["tool_calls"], dataset_output["tool_calls"]):
        return 0.0
    if generated_output["content"] != dataset_output["content"]:
        return 0.0
    return 1.0
"""


def entry(i: int, split: str = "TEST") -> dict:
    answer = str(2 * i)
    return {
        "messages": [
            {"role": "system", "content": "Add."},
            {"role": "user", "content": f"What is {i}+{i}? [expect={answer}]"},
            {"role": "assistant", "content": answer},
        ],
        "split": split,
    }


async def make_dataset(http, count: int = N) -> str:  # type: ignore[no-untyped-def]
    dataset = (await http.post("/datasets", json={"name": "eval me"})).json()
    rows = [entry(i) for i in range(count)] + [entry(100 + i, "TRAIN") for i in range(3)]
    created = await http.post(f"/datasets/{dataset['id']}/entries", json={"entries": rows})
    assert created.json()["entries_created"] == len(rows), created.text
    return dataset["id"]


async def wait_for_eval(http, eval_id: str, statuses=("succeeded", "failed", "cancelled")) -> dict:  # type: ignore[no-untyped-def]
    found: dict = {}

    async def finished() -> bool:
        nonlocal found
        found = (await http.get(f"/evals/{eval_id}")).json()
        return found["status"] in statuses

    await wait_until(finished, timeout=60, what=f"eval {eval_id}")
    return found
