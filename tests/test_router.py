"""The inference router through the official openai SDK, against faked upstream providers."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.conftest import Project, wait_for_count
from tests.fake_upstream import ANTHROPIC_KEY, OPENAI_KEY, FakeUpstream, fixture
from tests.helpers import MESSAGES, sdk, wait_for_router

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


async def test_completion_with_the_async_sdk(ready: Project, fake_upstream: FakeUpstream) -> None:
    completion = await sdk(ready).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        temperature=0.2,
        max_tokens=50,
        seed=7,
        store=True,
        metadata={"prompt_id": "count"},
    )
    assert completion.model == "gpt-4o-mini"
    assert completion.choices[0].message.content == "Answer to: Count to 3"
    assert completion.usage.total_tokens > 0
    sent = fake_upstream.last("/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert sent.body["model"] == "gpt-4o-mini" and sent.body["seed"] == 7 and sent.body["max_tokens"] == 50
    assert "store" not in sent.body and "metadata" not in sent.body  # our logging controls stay here


async def test_sync_sdk_streaming_and_not(ready: Project) -> None:
    client = openai.OpenAI(api_key=ready.key, base_url=ready.base_url, max_retries=0)

    def call() -> tuple[str, str, object]:
        plain = client.chat.completions.create(model="openai:gpt-4o-mini", messages=MESSAGES)
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return plain.choices[0].message.content, text, chunks[-1].usage

    plain, streamed, usage = await asyncio.to_thread(call)
    assert plain == streamed == "Answer to: Count to 3"
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_tool_calls_streamed_and_not(ready: Project) -> None:
    client = sdk(ready)
    kwargs = dict(model="gpt-4o", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="auto")
    whole = await client.chat.completions.create(**kwargs)
    call = whole.choices[0].message.tool_calls[0]
    assert whole.choices[0].finish_reason == "tool_calls" and call.function.name
    stream = await client.chat.completions.create(**kwargs, stream=True)
    arguments, names = "", []
    async for chunk in stream:
        for delta in chunk.choices[0].delta.tool_calls or []:
            names += [delta.function.name] if delta.function and delta.function.name else []
            arguments += delta.function.arguments or "" if delta.function else ""
    assert names == [call.function.name]
    assert json.loads(arguments) == json.loads(call.function.arguments)


async def test_anthropic_and_gemini_behind_the_openai_interface(ready: Project, fake_upstream) -> None:
    client = sdk(ready)
    claude = await client.chat.completions.create(
        model="anthropic:claude-3-5-sonnet-20241022", messages=MESSAGES
    )
    assert claude.model == "anthropic:claude-3-5-sonnet-20241022" and claude.choices[0].message.content
    sent = fake_upstream.last("/v1/messages")
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.body["model"] == "claude-3-5-sonnet-20241022" and sent.body["system"] == "You are terse."

    stream = await client.chat.completions.create(
        model="anthropic:claude-3-5-sonnet-20241022",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens > 0

    gemini = await client.chat.completions.create(model="gemini:gemini-1.5-flash", messages=MESSAGES)
    assert gemini.choices[0].message.content
    assert "gemini-1.5-flash:generateContent" in fake_upstream.last("/v1beta/").path
    stream = await client.chat.completions.create(
        model="gemini:gemini-1.5-flash", messages=MESSAGES, stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_logging_decisions_and_merged_stream_logs(ready: Project) -> None:
    client = sdk(ready)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # not logged
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, store=True, metadata={"prompt_id": "p1", "n": 1}
    )
    await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        extra_headers={"op-log-request": "true", "op-tags": '{"via": "header"}'},
    )
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, store=True, extra_headers={"op-log-request": "false"}
    )  # header wins: not logged
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, store=True, metadata={"prompt_id": "streamed"}
    )
    assert [c async for c in stream]
    async with ready.client() as http:
        assert await wait_for_count(http, 3) == 3
        await asyncio.sleep(0.5)
        assert (await http.get("/logs/count")).json()["count"] == 3
        logged = (await http.get("/logs", params={"metadata.prompt_id": "p1"})).json()["data"][0]
        assert logged["metadata"] == {"prompt_id": "p1", "n": "1"}
        assert logged["reqPayload"]["messages"] == MESSAGES and logged["usage"]["total_tokens"] > 0
        assert (await http.get("/logs/count", params={"metadata.via": "header"})).json()["count"] == 1
        streamed = (await http.get("/logs", params={"metadata.prompt_id": "streamed"})).json()["data"][0]
    assert streamed["respPayload"]["object"] == "chat.completion"
    assert streamed["respPayload"]["choices"][0]["message"]["content"] == "Answer to: Count to 3"


async def test_cache_modes_and_stream_replay(ready: Project, fake_upstream: FakeUpstream) -> None:
    client = sdk(ready)
    messages = [{"role": "user", "content": "cache me please"}]
    before = len(fake_upstream.requests)
    cache = {"op-cache": "readWrite"}
    first = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, extra_headers=cache)
    second = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=messages,
        temperature=1.5,
        extra_headers={**cache, "op-log-request": "true"},
    )
    assert (
        second.id == first.id and len(fake_upstream.requests) == before + 1
    )  # temperature is not in the key
    streamed = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, stream=True, extra_body={"openpipe": {"cache": "readOnly"}}
    )
    assert (
        "".join([c.choices[0].delta.content or "" async for c in streamed if c.choices])
        == first.choices[0].message.content
    )
    assert len(fake_upstream.requests) == before + 1
    other = [{"role": "user", "content": "cache me too"}]
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=other, extra_headers={"op-cache": "readOnly"}
    )
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=other, extra_headers={"op-cache": "writeOnly"}
    )
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=other, extra_headers={"op-cache": "writeOnly"}
    )
    assert len(fake_upstream.requests) == before + 4  # readOnly did not write; writeOnly never reads
    async with ready.client() as http:
        checked = await http.post(
            "/check-cache", json={"reqPayload": {"model": "gpt-4o-mini", "messages": other}}
        )
        assert checked.json()["respPayload"]["choices"][0]["message"]["content"] == "Answer to: cache me too"
        assert await wait_for_count(http, 1) == 1
        assert (await http.get("/logs")).json()["data"][0]["cacheHit"] is True


async def test_caches_are_per_project(make_project, fake_upstream: FakeUpstream) -> None:
    a, b = await make_project(), await make_project()
    for project in (a, b):
        async with project.client() as http:
            await http.put("/provider-keys", json={"openai": OPENAI_KEY})
        await wait_for_router(project)
    before = len(fake_upstream.requests)
    messages = [{"role": "user", "content": "per project"}]
    for project in (a, b):
        await sdk(project).chat.completions.create(
            model="gpt-4o-mini", messages=messages, extra_headers={"op-cache": "readWrite"}
        )
    assert len(fake_upstream.requests) == before + 2


async def test_retries_fallback_and_upstream_errors(ready: Project, fake_upstream: FakeUpstream) -> None:
    client = sdk(ready)
    recovered = await client.chat.completions.create(model="gpt-4o-429-once", messages=MESSAGES)
    assert recovered.choices[0].message.content and fake_upstream.calls["gpt-4o-429-once"] == 2

    fallback = await client.chat.completions.create(
        model="gpt-4o-500",
        messages=MESSAGES,
        store=True,
        metadata={"case": "fallback"},
        extra_body={"openpipe": {"fallback": {"model": "gpt-4o-mini"}}},
    )
    assert fallback.model == "gpt-4o-mini" and fake_upstream.calls["gpt-4o-500"] == 3  # 1 try + 2 retries
    timed = await client.chat.completions.create(
        model="gpt-4o-slow",
        messages=MESSAGES,
        extra_body={"openpipe": {"fallback": {"model": "gpt-4o-mini", "timeout": 300}}},
    )
    assert timed.model == "gpt-4o-mini"

    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="gpt-4o-400", messages=MESSAGES)
    assert (
        "Invalid value for 'messages'" in refused.value.message
        and refused.value.body["code"] == "invalid_value"
    )
    with pytest.raises(openai.APIStatusError) as broken:
        await client.chat.completions.create(model="gpt-4o-500", messages=MESSAGES, store=True)
    assert broken.value.status_code == 502 and "upstream error (500)" in broken.value.message

    async with ready.client() as http:
        assert await wait_for_count(http, 2) == 2
        log = (await http.get("/logs", params={"metadata.case": "fallback"})).json()["data"][0]
        assert (
            log["metadata"]["$fallback.from"] == "gpt-4o-500" and "500" in log["metadata"]["$fallback.reason"]
        )
        failed = (await http.get("/logs", params={"status": "error"})).json()["data"][0]
    assert failed["statusCode"] == 502 and "upstream error" in failed["errorMessage"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "gpt-4o-mini"}, 400, "messages"),
        ({"model": "gpt-4o-mini", "messages": []}, 400, "messages"),
        ({"model": "gpt-4o-mini", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
        ({"model": "gpt-4o-mini", "messages": MESSAGES, "n": 0}, 400, "n"),
        (
            {"model": "gpt-4o-mini", "messages": MESSAGES, "response_format": {"type": "json_schema"}},
            400,
            "json_schema",
        ),
        ({"model": "mistral:large", "messages": MESSAGES}, 404, "unknown provider prefix"),
        ({"model": "openpipe:no-such-model", "messages": MESSAGES}, 404, "no deployed fine-tuned model"),
        ({"model": "openpipe:nope/gpt-4o", "messages": MESSAGES}, 404, "no external provider"),
    ],
)
async def test_bad_requests_name_the_problem(ready: Project, body: dict, status: int, fragment: str) -> None:
    async with ready.client() as http:
        response = await http.post("/chat/completions", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["message"]


async def test_malformed_json_missing_keys_and_wrong_project_key(project: Project) -> None:
    async with project.client() as http:
        response = await http.post(
            "/chat/completions",
            content=b'{"model": "gpt-4o-mini", "messa',
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400 and "not valid JSON" in response.json()["message"]
        missing = await http.post("/chat/completions", json={"model": "gpt-4o-mini", "messages": MESSAGES})
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "provider_key_missing"
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(
            api_key="opk_nope", base_url=project.base_url, max_retries=0
        ).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


async def test_concurrency_limit_gives_a_clear_429(ready: Project, running) -> None:
    chat = running.platform.state["chat"]
    chat.limiter.limit = 1
    try:
        client = sdk(ready)
        slow = asyncio.create_task(client.chat.completions.create(model="gpt-4o-slow", messages=MESSAGES))
        await asyncio.sleep(0.3)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert "Too many concurrent requests" in limited.value.message
        assert (await slow).choices[0].message.content
    finally:
        chat.limiter.limit = running.settings.project_max_concurrency


async def test_external_providers_openai_compatible_and_azure(
    ready: Project, fake_upstream: FakeUpstream
) -> None:
    async with ready.client() as http:
        created = await http.post(
            "/external-providers",
            json={
                "slug": "my-azure",
                "type": "azure",
                "baseUrl": fake_upstream.base_url,
                "apiKey": OPENAI_KEY,
                "apiVersion": "2024-06-01",
                "models": [
                    {"slug": "gpt-4o-2024-08-06", "inputPricePerMillion": 2.0, "outputPricePerMillion": 8.0}
                ],
            },
        )
        assert created.status_code == 201, created.text
        compatible = await http.post(
            "/external-providers",
            json={
                "slug": "local-vllm",
                "type": "openai",
                "baseUrl": f"{fake_upstream.base_url}/v1",
                "apiKey": OPENAI_KEY,
                "models": [],
            },
        )
        assert compatible.status_code == 201, compatible.text
    await wait_for_router(ready, "openpipe:local-vllm/qwen2.5-7b")
    completion = await sdk(ready).chat.completions.create(
        model="openpipe:my-azure/gpt-4o-2024-08-06", messages=MESSAGES, store=True, metadata={"case": "azure"}
    )
    assert completion.model == "openpipe:my-azure/gpt-4o-2024-08-06"
    sent = fake_upstream.last("/openai/deployments/")
    assert sent.path.endswith("/openai/deployments/gpt-4o-2024-08-06/chat/completions?api-version=2024-06-01")
    assert sent.headers["api-key"] == OPENAI_KEY
    assert fake_upstream.last("/v1/chat/completions").body["model"] == "qwen2.5-7b"
    with pytest.raises(openai.NotFoundError):
        await sdk(ready).chat.completions.create(model="openpipe:my-azure/unlisted-model", messages=MESSAGES)
    async with ready.client() as http:
        await wait_for_count(http, 1, params={"metadata.case": "azure"})
        log = (await http.get("/logs", params={"metadata.case": "azure"})).json()["data"][0]
    usage = completion.usage
    assert log["cost"] == pytest.approx((usage.prompt_tokens * 2.0 + usage.completion_tokens * 8.0) / 1e6)


async def test_fine_tuned_deployment_applies_pruning_rules(
    ready: Project, fake_upstream: FakeUpstream
) -> None:
    rule = "You are an expert support agent for Acme. Follow the style guide strictly."
    async with ready.client() as http:
        response = await http.put(
            "/deployments/support-ft",
            json={
                "baseUrl": f"{fake_upstream.base_url}/v1",
                "model": "qwen2.5-1.5b-support-lora",
                "apiKey": OPENAI_KEY,
                "pruningRules": [rule],
                "defaultTemperature": 0.1,
            },
        )
        assert response.status_code == 201, response.text
    await wait_for_router(ready, "openpipe:support-ft")
    messages = [
        {"role": "system", "content": rule},
        {"role": "user", "content": f"{rule} Where is my order?"},
    ]
    completion = await sdk(ready).chat.completions.create(model="openpipe:support-ft", messages=messages)
    assert completion.model == "openpipe:support-ft"
    sent = fake_upstream.last("/v1/chat/completions").body
    assert sent["model"] == "qwen2.5-1.5b-support-lora" and sent["temperature"] == 0.1
    assert sent["messages"] == [
        {"role": "user", "content": " Where is my order?"}
    ]  # the emptied system is gone


async def test_mixture_of_agents(ready: Project, fake_upstream: FakeUpstream) -> None:
    before = len(fake_upstream.requests)
    completion = await sdk(ready).chat.completions.create(
        model="openpipe:moa-gpt-4o-mini-v1", messages=MESSAGES
    )
    calls = fake_upstream.requests[before:]
    assert completion.model == "openpipe:moa-gpt-4o-mini-v1" and completion.choices[0].message.content
    assert len(calls) == 5  # 3 drafts, a critique, a synthesis
    assert [c.body.get("temperature") for c in calls[:3]] == [0.9, 0.9, 0.9]
    assert "Critique each one" in calls[3].body["messages"][-1]["content"]
    assert "<critique>" in calls[4].body["messages"][-1]["content"]
    per_call = fixture("openai_chat_completion.json")["usage"]["total_tokens"]
    assert completion.usage.total_tokens == 5 * per_call  # usage covers every call it took
    stream = await sdk(ready).chat.completions.create(
        model="openpipe:moa-gpt-4o-mini-v1", messages=MESSAGES, stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_provider_keys_never_leak(ready: Project, fake_upstream: FakeUpstream) -> None:
    async with ready.client() as http:
        await http.put("/provider-keys", json={"openai": "sk-wrong-key-that-must-not-leak"})
    client = sdk(ready)
    for _ in range(100):
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, store=True)
        except openai.AuthenticationError as exc:
            assert "sk-wrong-key-that-must-not-leak" not in json.dumps(exc.body)
            assert "rejected the provider API key" in exc.message
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the wrong key never reached the router")
    async with ready.client() as http:
        await wait_for_count(http, 1, params={"status": "error"})
        text = (await http.get("/logs/export")).text
    assert "sk-wrong-key-that-must-not-leak" not in text and OPENAI_KEY not in text


async def test_oversize_and_cancelled_streams(ready: Project, running) -> None:
    """The body limit guards /chat/completions; a client leaving mid-stream still gets its call logged."""
    limit = running.settings.max_body_bytes
    async with ready.client() as http:
        big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (limit + 10)}]}
        response = await http.post("/chat/completions", json=big)
        assert response.status_code == 413 and str(limit) in response.json()["message"]
        body = {
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "stream": True,
            "store": True,
            "metadata": {"case": "left-early"},
        }
        async with http.stream("POST", "/chat/completions", json=body) as stream:
            async for _ in stream.aiter_bytes():
                break  # the client goes away after the first bytes
        await wait_for_count(http, 1, params={"metadata.case": "left-early"})
        log = (await http.get("/logs", params={"metadata.case": "left-early"})).json()["data"][0]
    assert log["reqPayload"]["stream"] is True
