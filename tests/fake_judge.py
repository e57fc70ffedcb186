"""A fake OpenAI-compatible judge model (and generator) at the HTTP boundary, for criteria tests.

Reached through an external provider (``openpipe:fakejudge/<model>``), so it needs no change to
the shared fake upstream. What it answers:

- a request with the ``record_judgement`` tool: a realistic forced tool call. The verdict is FAIL
  when the output under ``<output>`` contains ``[bad]`` (or, when the criterion prompt contains
  ``STRICT``, also ``[meh]``), else PASS.
- a request with ``record_preference``: the winner is the output without ``[bad]`` (TIE if both
  or neither have it).
- anything else (generation): ``n`` choices ``candidate <k>`` (k counts calls per prompt);
  every second one carries ``[bad]``, so best-of-N has something to sort and preference data
  something to reject.

Model scenarios: ``judge-malformed`` (arguments never valid JSON), ``judge-malformed-once``
(malformed until the judge's retry hint arrives), ``judge-content`` (the verdict as JSON
content, no tool call), ``judge-500`` (always a 500), ``judge-429-once`` (one 429 per distinct
row, then fine). ``latency`` delays every answer (the benchmark uses 200 ms).
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
from fastapi.responses import JSONResponse, Response

JUDGE_KEY = "sk-fake-judge-0123456789"


@dataclass
class FakeJudge:
    base_url: str = ""
    latency: float = 0.0
    calls: Counter = field(default_factory=Counter)
    requests: list[dict[str, Any]] = field(default_factory=list)


def _error(status: int, message: str, kind: str) -> JSONResponse:
    headers = {"retry-after": "0"} if status == 429 else {}
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": None}},
        status_code=status,
        headers=headers,
    )


def completion_body(model: str, message: dict[str, Any], finish: str, prompt_tokens: int, n: int = 1) -> dict:
    return {
        "id": f"chatcmpl-fake{time.time_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fakejudge",
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish},
        ]
        * n,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 24,
            "total_tokens": prompt_tokens + 24,
        },
    }


def tool_call_message(name: str, arguments: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": f"call_{time.time_ns() % 10**12}",
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ],
    }


def _section(text: str, tag: str) -> str:
    match = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.S)
    return match.group(1) if match else ""


def _fails(output: str, strict: bool) -> bool:
    return "[bad]" in output or (strict and "[meh]" in output)


def _judge(model: str, body: dict[str, Any], tool: str) -> dict[str, Any]:
    messages = body["messages"]
    system, row = messages[0]["content"], messages[1]["content"]
    prompt_tokens = (len(system) + len(row)) // 4
    if tool == "record_preference":
        a_bad, b_bad = "[bad]" in _section(row, "output_a"), "[bad]" in _section(row, "output_b")
        winner = "TIE" if a_bad == b_bad else ("B" if a_bad else "A")
        verdict = {
            "explanation": f"Output {winner} avoids the mistake." if winner != "TIE" else "Equal.",
            "winner": winner,
        }
    else:
        failed = _fails(_section(row, "output"), "STRICT" in system)
        verdict = {
            "explanation": "The output contains a marked mistake."
            if failed
            else "The output meets the criterion.",
            "judgement": "FAIL" if failed else "PASS",
        }
    arguments = orjson.dumps(verdict).decode()
    retried = len(messages) > 2
    if model == "judge-malformed" or (model == "judge-malformed-once" and not retried):
        arguments = '{"explanation": "The output is fine", "judgement": PASS'  # truncated, not JSON
    if model == "judge-content":
        message = {"role": "assistant", "content": f"```json\n{arguments}\n```", "refusal": None}
        return completion_body(body["model"], message, "stop", prompt_tokens)
    return completion_body(body["model"], tool_call_message(tool, arguments), "tool_calls", prompt_tokens)


def build_app(fake: FakeJudge) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        fake.requests.append(body)
        if request.headers.get("authorization") != f"Bearer {JUDGE_KEY}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error")
        if fake.latency:
            await asyncio.sleep(fake.latency)
        model = body.get("model", "")
        tools = [t["function"]["name"] for t in body.get("tools") or []]
        row = str(body.get("messages", [{}])[-1].get("content"))
        fake.calls[(model, row)] += 1
        if model == "judge-500":
            return _error(500, "The server had an error while processing your request.", "server_error")
        if model == "judge-429-once" and fake.calls[(model, row)] == 1:
            return _error(429, "Rate limit reached for requests", "requests")
        for tool in ("record_judgement", "record_preference"):
            if tool in tools:
                return JSONResponse(_judge(model, body, tool))
        choices = []
        base = fake.calls[(model, row)]  # per prompt, so concurrent rows each get a mix
        for index in range(body.get("n") or 1):
            k = base + index
            text = f"candidate {k}" + (" [bad]" if k % 2 == 0 else "")
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            )
        completion = completion_body(model, choices[0]["message"], "stop", 12)
        completion["choices"] = choices
        return JSONResponse(completion)

    return app


async def start_fake_judge(port: int) -> tuple[FakeJudge, uvicorn.Server, asyncio.Task]:
    fake = FakeJudge(base_url=f"http://127.0.0.1:{port}")
    server = uvicorn.Server(uvicorn.Config(build_app(fake), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn exposes no start event)
        await asyncio.sleep(0.02)
    return fake, server, task


# --- fixtures and helpers for the criteria tests ----------------------------------------------

import pytest  # noqa: E402

from services.common.kafka import free_port  # noqa: E402


@pytest.fixture(scope="session")
async def fake_judge():  # type: ignore[no-untyped-def]
    fake, server, task = await start_fake_judge(free_port())
    yield fake
    server.should_exit = True
    await task


async def use_fake_judge(client: Any, fake: FakeJudge) -> None:
    """Register the fake as the project's ``fakejudge`` provider and wait until the router routes it."""
    response = await client.post(
        "/external-providers",
        json={"slug": "fakejudge", "type": "openai", "baseUrl": f"{fake.base_url}/v1", "apiKey": JUDGE_KEY},
    )
    assert response.status_code == 201, response.text
    deadline = time.monotonic() + 20
    while True:
        probe = await client.post(
            "/chat/completions",
            json={"model": "openpipe:fakejudge/gen", "messages": [{"role": "user", "content": "ping"}]},
        )
        if probe.status_code == 200:
            return
        assert time.monotonic() < deadline, probe.text
        await asyncio.sleep(0.1)


async def create_criterion(
    client: Any, name: str, model: str = "openpipe:fakejudge/judge", **extra: Any
) -> dict:
    body = {"name": name, "model": model, "prompt": "Fail outputs with a marked mistake.", **extra}
    response = await client.post("/criteria", json=body)
    assert response.status_code == 201, response.text
    return response.json()
