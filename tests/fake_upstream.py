"""Fake LLM providers at the HTTP boundary: OpenAI, Anthropic and Gemini, served for real over HTTP.

Answers are recorded, realistic payloads (``tests/fixtures/upstream``). The upstream model
name picks a scenario, so a test can ask for failures:

- ``*-429-once``: the first call gets a 429 with ``Retry-After: 0``, then success
- ``*-500``: always a 500 server error
- ``*-400``: a 400 invalid_request_error
- ``*-slow``: answers after 2 s
- a last user message containing ``[fail]``: always a 500 (a failure in the middle of a batch)
- anything else: success (echoing the last user message so answers differ per prompt)

Every request is recorded (path, headers, JSON body) for assertions.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests import fake_openai_fine_tuning

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
OPENAI_KEY = "sk-test-openai-0123456789"
ANTHROPIC_KEY = "sk-ant-test-0123456789"
GEMINI_KEY = "AIza-test-0123456789"


def fixture(name: str) -> Any:
    path = FIXTURES / name
    return orjson.loads(path.read_bytes()) if name.endswith(".json") else path.read_text()


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeUpstream:
    requests: list[Recorded] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)
    base_url: str = ""

    def last(self, path_part: str = "") -> Recorded:
        return next(r for r in reversed(self.requests) if path_part in r.path)

    def reset(self) -> None:
        self.requests.clear()
        self.calls.clear()


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _openai_error(status: int, message: str, kind: str, code: str | None) -> JSONResponse:
    headers = {"retry-after": "0"} if status == 429 else {}
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
        headers=headers,
    )


async def _scenario(fake: FakeUpstream, model: str) -> Response | None:
    fake.calls[model] += 1
    if model.endswith("-429-once") and fake.calls[model] == 1:
        return _openai_error(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded")
    if model.endswith("-500"):
        return _openai_error(
            500, "The server had an error while processing your request.", "server_error", None
        )
    if model.endswith("-400"):
        return _openai_error(400, "Invalid value for 'messages'.", "invalid_request_error", "invalid_value")
    if model.endswith("-slow"):
        await asyncio.sleep(2)
    return None


def _openai_completion(body: dict[str, Any]) -> dict[str, Any]:
    tools = body.get("tools")
    completion = copy.deepcopy(
        fixture("openai_chat_completion_tool_calls.json" if tools else "openai_chat_completion.json")
    )
    completion["model"] = body.get("model")
    completion["created"] = int(time.time())
    if not tools:
        text = f"Answer to: {_last_user_text(body.get('messages') or [])}"
        completion["choices"] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
            for i in range(body.get("n") or 1)
        ]
    return completion


def _openai_sse(completion: dict[str, Any], include_usage: bool) -> list[bytes]:
    """The completion as OpenAI streams it: role, content in 7-character pieces, each tool call's
    header then its arguments in 10-character pieces, the finish reason, and optionally usage."""
    base = {
        "id": completion["id"],
        "object": "chat.completion.chunk",
        "created": completion["created"],
        "model": completion["model"],
        "system_fingerprint": "fp_test",
    }
    events = []
    for choice in completion["choices"]:
        message = choice["message"]

        def chunk(
            delta: dict[str, Any], finish_reason: str | None = None, index: int = choice["index"]
        ) -> dict:
            item = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**base, "choices": [item]}

        events.append(chunk({"role": "assistant", "content": ""}))
        content = message.get("content") or ""
        events += [chunk({"content": content[start : start + 7]}) for start in range(0, len(content), 7)]
        for i, call in enumerate(message.get("tool_calls") or []):
            header = {"index": i, "id": call["id"], "type": "function"}
            header["function"] = {"name": call["function"]["name"], "arguments": ""}
            events.append(chunk({"tool_calls": [header]}))
            arguments = call["function"]["arguments"]
            events += [
                chunk(
                    {"tool_calls": [{"index": i, "function": {"arguments": arguments[start : start + 10]}}]}
                )
                for start in range(0, len(arguments), 10)
            ]
        events.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        events.append({**base, "choices": [], "usage": completion["usage"]})
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def build_app(fake: FakeUpstream) -> FastAPI:
    app = FastAPI()

    async def record(request: Request) -> dict[str, Any]:
        body = orjson.loads(await request.body())
        fake.requests.append(
            Recorded(
                request.url.path + ("?" + request.url.query if request.url.query else ""),
                dict(request.headers),
                body,
            )
        )
        return body

    @app.post("/v1/chat/completions")
    @app.post("/openai/deployments/{deployment}/chat/completions")
    async def openai_chat(request: Request, deployment: str | None = None) -> Response:
        body = await record(request)
        authorized = (
            request.headers.get("authorization") == f"Bearer {OPENAI_KEY}"
            or request.headers.get("api-key") == OPENAI_KEY
        )
        if not authorized:
            return _openai_error(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )
        model = deployment or body.get("model", "")
        if (failure := await _scenario(fake, model)) is not None:
            return failure
        if "[fail]" in _last_user_text(body.get("messages") or []):
            return _openai_error(
                500, "The server had an error while processing your request.", "server_error", None
            )
        completion = _openai_completion({**body, "model": model})
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _iterate(_openai_sse(completion, include_usage)), media_type="text/event-stream"
            )
        return JSONResponse(completion)

    @app.post("/v1/messages")
    async def anthropic_messages(request: Request) -> Response:
        body = await record(request)
        if request.headers.get("x-api-key") != ANTHROPIC_KEY:
            return JSONResponse(
                {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
                status_code=401,
            )
        if (failure := await _scenario(fake, body.get("model", ""))) is not None:
            return failure
        if body.get("stream"):
            name = "anthropic_stream_tool_use.txt" if body.get("tools") else "anthropic_stream_text.txt"
            return StreamingResponse(
                _iterate([line.encode() + b"\n" for line in fixture(name).splitlines()]),
                media_type="text/event-stream",
            )
        message = copy.deepcopy(
            fixture("anthropic_message_tool_use.json" if body.get("tools") else "anthropic_message_text.json")
        )
        message["model"] = body.get("model")
        return JSONResponse(message)

    @app.post("/v1beta/models/{target}")
    async def gemini(request: Request, target: str) -> Response:
        body = await record(request)
        if request.headers.get("x-goog-api-key") != GEMINI_KEY:
            return JSONResponse(
                {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT"}},
                status_code=400,
            )
        model, _, method = target.partition(":")
        if (failure := await _scenario(fake, model)) is not None:
            return failure
        has_tools = bool(body.get("tools"))
        if method == "streamGenerateContent":
            return StreamingResponse(
                _iterate([line.encode() + b"\n" for line in fixture("gemini_stream_text.txt").splitlines()]),
                media_type="text/event-stream",
            )
        return JSONResponse(
            fixture("gemini_response_function_call.json" if has_tools else "gemini_response_text.json")
        )

    fake_openai_fine_tuning.install(app)  # /v1/files and /v1/fine_tuning/jobs
    return app


async def _iterate(items: list[bytes]):  # type: ignore[no-untyped-def]
    for item in items:
        yield item
        await asyncio.sleep(0)


async def start_fake_upstream(port: int) -> tuple[FakeUpstream, uvicorn.Server, asyncio.Task]:
    fake = FakeUpstream(base_url=f"http://127.0.0.1:{port}")
    server = uvicorn.Server(uvicorn.Config(build_app(fake), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    return fake, server, task
