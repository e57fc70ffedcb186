"""gRPC Inference against the live platform: the same routing, caching, logging and errors as HTTP.

Upstreams are the shared fakes (tests/fake_upstream.py), plus a small OpenAI-compatible server
here whose streams break in the middle or stall, registered as an external provider.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import orjson
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from services.common.grpc.distillery.v1 import inference_pb2
from services.common.kafka import free_port
from services.common.rpc import status_code
from tests.conftest import Project, RunningPlatform, wait_for_count, wait_until
from tests.fake_upstream import ANTHROPIC_KEY, GEMINI_KEY, OPENAI_KEY, FakeUpstream
from tests.helpers import MESSAGES, Stub, auth, trailing

ANSWER = "Answer to: Count to 3"
# The fake upstream picks a failure by suffix and counts calls per model for the whole session
# (test_router asserts on its own models' counts), so these tests use their own model names.
BROKEN, SLOW, REFUSED = "grpc-gpt-4o-500", "grpc-gpt-4o-slow", "grpc-gpt-4o-400"


def request(body: dict | None = None, **options: object) -> inference_pb2.CompletionRequest:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES} if body is None else body
    return inference_pb2.CompletionRequest(request_json=orjson.dumps(body).decode(), **options)


async def complete(stub: Stub, key: str, body: dict | None = None, **options: object) -> dict:
    response = await stub.Complete(request(body, **options), metadata=auth(key))
    return orjson.loads(response.completion_json)


async def stream(stub: Stub, key: str, body: dict | None = None, **options: object) -> list[dict]:
    call = stub.StreamComplete(request(body, **options), metadata=auth(key))
    return [orjson.loads(chunk.chunk_json) async for chunk in call]


def streamed_text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


@pytest.fixture
async def stub(running: RunningPlatform) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.settings.grpc_port}") as channel:
        yield Stub(channel)


async def wait_for_router(stub: Stub, project: Project, model: str = "gpt-4o-mini") -> None:
    """Provider settings travel over catalog.v1; wait until the router can serve ``model``."""
    for _ in range(100):
        try:
            await complete(stub, project.key, {"model": model, "messages": MESSAGES})
            return
        except grpc.aio.AioRpcError as exc:
            assert trailing(exc).get("error-code") in ("provider_key_missing", "model_not_found"), exc
            await asyncio.sleep(0.1)
    raise AssertionError("router never learned the project's provider settings")


@pytest.fixture
async def ready(project: Project, stub: Stub) -> Project:
    async with project.client() as client:
        response = await client.put(
            "/provider-keys", json={"openai": OPENAI_KEY, "anthropic": ANTHROPIC_KEY, "gemini": GEMINI_KEY}
        )
        assert response.status_code == 200, response.text
    await wait_for_router(stub, project)
    return project


# --- answers ---------------------------------------------------------------------------------------


async def test_complete_routes_openai_and_anthropic(stub: Stub, ready: Project, fake_upstream: FakeUpstream):
    completion = await complete(
        stub, ready.key, {"model": "gpt-4o-mini", "messages": MESSAGES, "seed": 7, "store": False}
    )
    assert completion["object"] == "chat.completion" and completion["model"] == "gpt-4o-mini"
    assert completion["choices"][0]["message"]["content"] == ANSWER
    assert completion["usage"]["total_tokens"] > 0
    sent = fake_upstream.last("/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert sent.body["seed"] == 7 and "store" not in sent.body and not sent.body.get("stream")

    claude = await complete(
        stub, ready.key, {"model": "anthropic:claude-3-5-sonnet-20241022", "messages": MESSAGES}
    )
    assert claude["model"] == "anthropic:claude-3-5-sonnet-20241022"
    assert claude["choices"][0]["message"]["content"]
    sent = fake_upstream.last("/v1/messages")
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.body["model"] == "claude-3-5-sonnet-20241022" and sent.body["system"] == "You are terse."

    # the RPC decides whether to stream: a body asking for a stream still gets one completion
    whole = await complete(stub, ready.key, {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"]["content"] == ANSWER


async def test_stream_complete_reassembles(stub: Stub, ready: Project) -> None:
    chunks = await stream(
        stub,
        ready.key,
        {"model": "gpt-4o-mini", "messages": MESSAGES, "stream_options": {"include_usage": True}},
    )
    assert len(chunks) > 3 and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert streamed_text(chunks) == ANSWER
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop"

    claude = await stream(
        stub, ready.key, {"model": "anthropic:claude-3-5-sonnet-20241022", "messages": MESSAGES}
    )
    assert streamed_text(claude) and {c["model"] for c in claude} == {"anthropic:claude-3-5-sonnet-20241022"}

    # mixture of agents answers whole, then replays as chunks: the same as over HTTP
    moa = await stream(stub, ready.key, {"model": "openpipe:moa-gpt-4o-mini-v1", "messages": MESSAGES})
    assert streamed_text(moa)


# --- call options ------------------------------------------------------------------------------------


async def test_tags_and_log_request_reach_the_logs(stub: Stub, ready: Project) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "metadata": {"prompt_id": "from-body", "kept": "yes"},
    }
    await complete(stub, ready.key, body, log_request=True, tags={"prompt_id": "grpc", "caller": "relabel"})
    await complete(
        stub, ready.key, {**body, "store": True}, log_request=False
    )  # typed option wins: not logged
    await complete(
        stub, ready.key, {**body, "store": True, "metadata": {"prompt_id": "stored"}}
    )  # body decides
    await stream(stub, ready.key, body, log_request=True, tags={"prompt_id": "streamed"})
    async with ready.client() as http:
        assert await wait_for_count(http, 3) == 3
        await asyncio.sleep(0.5)
        assert (await http.get("/logs/count")).json()["count"] == 3
        [logged] = (await http.get("/logs", params={"metadata.caller": "relabel"})).json()["data"]
        assert logged["metadata"] == {"prompt_id": "grpc", "kept": "yes", "caller": "relabel"}
        assert logged["reqPayload"]["messages"] == MESSAGES and logged["statusCode"] == 200
        assert logged["respPayload"]["choices"][0]["message"]["content"] == ANSWER
        assert (await http.get("/logs/count", params={"metadata.prompt_id": "stored"})).json()["count"] == 1
        [streamed] = (await http.get("/logs", params={"metadata.prompt_id": "streamed"})).json()["data"]
    assert streamed["reqPayload"]["stream"] is True
    assert streamed["respPayload"]["object"] == "chat.completion"
    assert streamed["respPayload"]["choices"][0]["message"]["content"] == ANSWER


async def test_cache_read_write(stub: Stub, ready: Project, fake_upstream: FakeUpstream) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "cache me over grpc"}]}
    before = len(fake_upstream.requests)
    first = await complete(stub, ready.key, body, cache="readWrite")
    second = await complete(stub, ready.key, body, cache="readWrite", log_request=True)
    assert second["id"] == first["id"] and len(fake_upstream.requests) == before + 1
    replayed = await stream(stub, ready.key, body, cache="readOnly")
    assert streamed_text(replayed) == first["choices"][0]["message"]["content"]
    assert len(fake_upstream.requests) == before + 1
    # "off" overrides the body's own cache mode; "" leaves it to the body
    await complete(stub, ready.key, {**body, "openpipe": {"cache": "readOnly"}}, cache="off")
    assert len(fake_upstream.requests) == before + 2
    await complete(stub, ready.key, {**body, "openpipe": {"cache": "readOnly"}})
    assert len(fake_upstream.requests) == before + 2
    async with ready.client() as http:
        await wait_for_count(http, 1)
        assert (await http.get("/logs")).json()["data"][0]["cacheHit"] is True


async def test_typed_fallback(stub: Stub, ready: Project, fake_upstream: FakeUpstream) -> None:
    broken = {"model": BROKEN, "messages": MESSAGES}
    tries = fake_upstream.calls[BROKEN]
    answered = await complete(
        stub, ready.key, broken, fallback=inference_pb2.Fallback(model="gpt-4o-mini"), log_request=True
    )
    assert answered["model"] == "gpt-4o-mini" and answered["choices"][0]["message"]["content"] == ANSWER
    assert fake_upstream.calls[BROKEN] == tries + 3  # 1 try + 2 retries, then the fallback
    slow = {"model": SLOW, "messages": MESSAGES}
    timed = await complete(
        stub, ready.key, slow, fallback=inference_pb2.Fallback(model="gpt-4o-mini", timeout_ms=300)
    )
    assert timed["model"] == "gpt-4o-mini"
    chunks = await stream(stub, ready.key, broken, fallback=inference_pb2.Fallback(model="gpt-4o-mini"))
    assert streamed_text(chunks) == ANSWER
    async with ready.client() as http:
        await wait_for_count(http, 1)
        log = (await http.get("/logs")).json()["data"][0]
    assert log["metadata"]["$fallback.from"] == BROKEN and "500" in log["metadata"]["$fallback.reason"]


# --- errors ------------------------------------------------------------------------------------------


async def test_missing_or_wrong_key_is_unauthenticated(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Complete(request())
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED

    wrong_key = "opk_definitely_not_a_real_key_456"
    for call in (complete, stream):
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await call(stub, wrong_key)
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert wrong_key not in str(wrong.value) and wrong_key not in repr(wrong.value.trailing_metadata())


@pytest.mark.parametrize(
    ("request_json", "fragment", "param"),
    [
        ('{"model": "gpt-4o-mini", "messa', "not valid JSON", "request_json"),
        ("[1, 2]", "JSON object", "request_json"),
        ('{"model": "gpt-4o-mini"}', "messages", "messages"),
        (
            '{"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "x"}]}',
            "role",
            "messages.0.role",
        ),
        (
            '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            "temperature",
            "temperature",
        ),
    ],
)
async def test_bad_request_json_is_invalid_argument(
    stub: Stub, project: Project, request_json: str, fragment: str, param: str
) -> None:
    message = inference_pb2.CompletionRequest(request_json=request_json)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.Complete(message, metadata=auth(project.key))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in failed.value.details()
    assert trailing(failed.value)["error-param"] == param
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in stub.StreamComplete(message, metadata=auth(project.key)):
            pass
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_options_are_invalid_argument(stub: Stub, project: Project) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as cache:
        await complete(stub, project.key, cache="sometimes")
    assert cache.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache" in cache.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as fallback:
        await complete(stub, project.key, fallback=inference_pb2.Fallback(timeout_ms=100))
    assert fallback.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing(fallback.value)["error-param"] == "fallback.model"


async def test_missing_provider_key_names_the_code(stub: Stub, project: Project) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await complete(stub, project.key)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert trailing(failed.value)["error-code"] == "provider_key_missing"
    assert "PUT /api/v1/provider-keys" in failed.value.details()


@pytest.mark.parametrize("model", ["mistral:large", "openpipe:no-such-model", "openpipe:nope/gpt-4o"])
async def test_unknown_model_is_not_found(stub: Stub, ready: Project, model: str) -> None:
    for call in (complete, stream):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call(stub, ready.key, {"model": model, "messages": MESSAGES})
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        assert model in failed.value.details() and trailing(failed.value)["error-code"] == "model_not_found"


async def test_upstream_failures_map_to_codes(
    stub: Stub, ready: Project, fake_upstream: FakeUpstream
) -> None:
    for call in (complete, stream):
        with pytest.raises(grpc.aio.AioRpcError) as broken:
            await call(stub, ready.key, {"model": BROKEN, "messages": MESSAGES}, log_request=True)
        assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "upstream error (500)" in broken.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await complete(stub, ready.key, {"model": REFUSED, "messages": MESSAGES})
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Invalid value for 'messages'" in refused.value.details()
    assert trailing(refused.value)["error-code"] == "invalid_value"
    async with ready.client() as http:
        await wait_for_count(http, 2, params={"status": "error"})
        failed = (await http.get("/logs", params={"status": "error"})).json()["data"]
    assert {log["statusCode"] for log in failed} == {502}


async def test_rejected_provider_key_never_leaks(
    stub: Stub, make_project: Callable[[], Awaitable[Project]]
) -> None:
    project, secret = await make_project(), "sk-wrong-key-that-must-not-leak-grpc"
    async with project.client() as http:
        assert (await http.put("/provider-keys", json={"openai": secret})).status_code == 200
    for _ in range(100):
        try:
            await complete(stub, project.key)
        except grpc.aio.AioRpcError as exc:
            if trailing(exc).get("error-code") == "provider_key_missing":
                await asyncio.sleep(0.1)
                continue
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED  # the provider refused the key (HTTP 401)
            assert "rejected the provider API key" in exc.details()
            assert secret not in str(exc) and secret not in repr(exc.trailing_metadata())
            return
    raise AssertionError("the wrong key never reached the router")


async def test_concurrency_limit_is_resource_exhausted(stub: Stub, ready: Project, running: RunningPlatform):
    chat = running.platform.state["chat"]
    chat.limiter.limit = 1
    try:
        slow = asyncio.create_task(complete(stub, ready.key, {"model": SLOW, "messages": MESSAGES}))
        await asyncio.sleep(0.3)
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await complete(stub, ready.key)
        assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Too many concurrent requests" in limited.value.details()
        assert (await slow)["choices"][0]["message"]["content"]
    finally:
        chat.limiter.limit = running.settings.project_max_concurrency


# --- streams that break ----------------------------------------------------------------------------


def _chunk(text: str) -> bytes:
    body = {
        "id": "chatcmpl-flaky",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "flaky",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def flaky_app() -> FastAPI:
    """``breaks``: two chunks, then an error event. ``stalls``: one chunk, then nothing for a minute."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        model = (await request.json())["model"]

        async def events() -> AsyncIterator[bytes]:
            yield _chunk("Half an ")
            if model == "stalls":
                await asyncio.sleep(60)
            yield _chunk("answer")
            yield b'data: {"error": {"message": "the model crashed", "type": "server_error"}}\n\n'

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture
async def flaky(ready: Project, stub: Stub) -> AsyncIterator[Project]:
    """``ready`` plus an external provider ``flaky`` whose streams break or stall."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(flaky_app(), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started, what="flaky upstream")
    async with ready.client() as http:
        created = await http.post(
            "/external-providers",
            json={
                "slug": "flaky",
                "type": "openai",
                "baseUrl": f"http://127.0.0.1:{port}/v1",
                "apiKey": "sk-flaky",
                "models": [],
            },
        )
        assert created.status_code == 201, created.text
    for _ in range(100):  # wait until the router knows the provider
        try:
            await stream(stub, ready.key, {"model": "openpipe:flaky/breaks", "messages": MESSAGES})
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                break
        await asyncio.sleep(0.1)
    yield ready
    server.should_exit = True
    await task


async def test_error_mid_stream_aborts_with_the_mapped_code(stub: Stub, flaky: Project) -> None:
    body = {"model": "openpipe:flaky/breaks", "messages": MESSAGES}
    received: list[dict] = []
    call = stub.StreamComplete(request(body, log_request=True), metadata=auth(flaky.key))
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        async for chunk in call:
            received.append(orjson.loads(chunk.chunk_json))
    assert streamed_text(received) == "Half an answer"  # what came before the error was delivered
    assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the model crashed" in broken.value.details()
    async with flaky.client() as http:
        await wait_for_count(http, 1)
        [log] = (await http.get("/logs")).json()["data"]
    assert log["statusCode"] == 502 and "the model crashed" in log["errorMessage"]
    assert log["respPayload"]["choices"][0]["message"]["content"] == "Half an answer"


async def test_caller_cancelling_a_stream_is_logged(stub: Stub, flaky: Project) -> None:
    body = {"model": "openpipe:flaky/stalls", "messages": MESSAGES}
    call = stub.StreamComplete(request(body, log_request=True), metadata=auth(flaky.key))
    first = orjson.loads((await call.read()).chunk_json)
    assert first["choices"][0]["delta"]["content"] == "Half an "
    call.cancel()
    async with flaky.client() as http:
        await wait_for_count(http, 1)
        [log] = (await http.get("/logs")).json()["data"]
    assert log["statusCode"] == 499 and "closed the stream" in log["errorMessage"]
    assert log["respPayload"]["choices"][0]["message"]["content"] == "Half an "


async def test_caller_deadline_is_logged_as_cancelled(stub: Stub, ready: Project) -> None:
    """A deadline cancels the call on the server too; the log says so (not a 200 with no answer)."""
    slow = request({"model": SLOW, "messages": MESSAGES}, log_request=True)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await stub.Complete(slow, metadata=auth(ready.key), timeout=0.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    async with ready.client() as http:
        await wait_for_count(http, 1)
        [log] = (await http.get("/logs")).json()["data"]
    assert log["status"] == "error" and log["statusCode"] == 499 and log["respPayload"]["error"]


def test_http_statuses_map_to_grpc_codes() -> None:
    expected = {
        400: grpc.StatusCode.INVALID_ARGUMENT,
        401: grpc.StatusCode.UNAUTHENTICATED,
        403: grpc.StatusCode.PERMISSION_DENIED,
        404: grpc.StatusCode.NOT_FOUND,
        429: grpc.StatusCode.RESOURCE_EXHAUSTED,
        499: grpc.StatusCode.CANCELLED,
        502: grpc.StatusCode.UNAVAILABLE,
        503: grpc.StatusCode.UNAVAILABLE,
        504: grpc.StatusCode.DEADLINE_EXCEEDED,
        409: grpc.StatusCode.INTERNAL,
        500: grpc.StatusCode.INTERNAL,
    }
    assert {status: status_code(status) for status in expected} == expected
