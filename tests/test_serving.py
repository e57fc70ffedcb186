"""The local model server, served for real over HTTP and driven by the official openai SDK: a tiny
base trained for real into two LoRA adapters (tests/helpers_serving.py), dynamic batching, sampling
options, tool calls, streaming, adapter loading and eviction, and its 4xx errors."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from services.common.kafka import free_port
from services.serving.engine import Engine, SamplingParams, Sequence, collect, threadsafe_emitter
from services.serving.registry import ModelRegistry
from services.serving.server import create_app
from tests.helpers_serving import (
    BONJOUR_ANSWER,
    HELLO,
    HELLO_ANSWER,
    TEST_BASE,
    WEATHER,
    WEATHER_TOOL,
    greedy_with_generate,
    serving_assets,
)


@dataclass
class Served:
    registry: ModelRegistry
    url: str

    def sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30)


async def start_server(registry: ModelRegistry) -> tuple[uvicorn.Server, asyncio.Task, str]:
    port = free_port()
    config = uvicorn.Config(create_app(registry), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    return server, task, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    assets = serving_assets()
    root = tmp_path_factory.mktemp("model-server")
    registry = ModelRegistry(
        blobs=assets.blobs(), store_dir=root / "models", cache_dir=root / "adapters", max_batch=8
    )
    server, task, url = await start_server(registry)
    yield Served(registry, url)
    server.should_exit = True
    await task


async def test_adapter_answers_through_the_openai_sdk(served: Served) -> None:
    client = served.sdk()
    assets = serving_assets()
    completion = await client.chat.completions.create(
        model=assets.adapter_a, messages=HELLO, temperature=0, max_tokens=40
    )
    choice = completion.choices[0]
    assert choice.message.content == HELLO_ANSWER
    assert choice.finish_reason == "stop"
    engine = served.registry.engines[TEST_BASE]
    prompt = engine.tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
    assert completion.usage.prompt_tokens == len(engine.count_tokens(prompt))
    answer_tokens = len(engine.count_tokens(HELLO_ANSWER)) + 1  # and the end-of-turn token
    assert completion.usage.completion_tokens == answer_tokens
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + answer_tokens
    assert completion.model == assets.adapter_a

    # The other adapter on the same base, and the base itself, answer differently.
    other = await client.chat.completions.create(
        model=assets.adapter_b, messages=HELLO, temperature=0, max_tokens=40
    )
    assert other.choices[0].message.content == BONJOUR_ANSWER
    base = await client.chat.completions.create(model=TEST_BASE, messages=HELLO, temperature=0, max_tokens=5)
    assert base.choices[0].message.content not in (HELLO_ANSWER, BONJOUR_ANSWER)
    assert base.choices[0].finish_reason == "length" and base.usage.completion_tokens == 5

    listed = {m.id: m for m in (await client.models.list()).data}
    assert TEST_BASE in listed and assets.adapter_a in listed and assets.adapter_b in listed


async def test_streaming_matches_the_json_answer_and_reports_usage(served: Served) -> None:
    client = served.sdk()
    stream = await client.chat.completions.create(
        model=serving_assets().adapter_a,
        messages=HELLO,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == HELLO_ANSWER
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2  # token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


async def test_tool_calls_are_parsed_json_and_streaming(served: Served) -> None:
    client = served.sdk()
    model = serving_assets().adapter_a
    completion = await client.chat.completions.create(
        model=model, messages=WEATHER, tools=[WEATHER_TOOL], temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}'
    assert call.id.startswith("call_") and call.type == "function"

    stream = await client.chat.completions.create(
        model=model, messages=WEATHER, tools=[WEATHER_TOOL], temperature=0, stream=True
    )
    chunks = [c async for c in stream]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # markup held back
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_sampling_options(served: Served) -> None:
    client = served.sdk()
    model = serving_assets().adapter_a
    # n choices, seeded: the same seed gives the same choices, each choice its own stream of samples.
    ask = dict(model=TEST_BASE, messages=HELLO, n=3, temperature=1.0, top_p=0.9, seed=7, max_tokens=6)
    first, again = await client.chat.completions.create(**ask), await client.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1
    assert first.usage.completion_tokens == 18 and all(c.finish_reason == "length" for c in first.choices)
    # A stop sequence ends the answer before it, with finish_reason stop.
    stopped = await client.chat.completions.create(model=model, messages=HELLO, temperature=0, stop=[" the"])
    assert stopped.choices[0].message.content == "Hello from"
    assert stopped.choices[0].finish_reason == "stop"


async def test_concurrent_requests_share_decoding_steps(served: Served) -> None:
    client = served.sdk()
    engine = served.registry.engines[TEST_BASE]
    assets = serving_assets()
    steps_before = engine.steps
    models = [assets.adapter_a, assets.adapter_b, TEST_BASE] * 3
    answers = await asyncio.gather(
        *(
            client.chat.completions.create(model=m, messages=HELLO, temperature=0, max_tokens=40)
            for m in models
        )
    )
    tokens = sum(a.usage.completion_tokens for a in answers)
    steps = engine.steps - steps_before
    # One request at a time would take a decoding step per token; batched, most steps carry several.
    assert steps < tokens / 2, (steps, tokens)
    assert engine.peak_batch > 1
    assert answers[0].choices[0].message.content == HELLO_ANSWER
    assert answers[1].choices[0].message.content == BONJOUR_ANSWER


async def test_errors_are_openai_shaped_4xx(served: Served) -> None:
    client = served.sdk()
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="fine_tunes/proj/nope/job/adapter", messages=HELLO)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-base", messages=HELLO)
    long = [{"role": "user", "content": "Paris " * 2000}]
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.chat.completions.create(model=TEST_BASE, messages=long)
    assert too_long.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in too_long.value.body["message"]
    with pytest.raises(openai.BadRequestError) as too_many:
        await client.chat.completions.create(model=TEST_BASE, messages=HELLO, max_tokens=5000)
    assert too_many.value.body["code"] == "context_length_exceeded"

    async with served.http() as http:
        for body, field in (
            ({"model": TEST_BASE, "messages": HELLO, "n": 0}, "n"),
            ({"model": TEST_BASE, "messages": HELLO, "temperature": "hot"}, "temperature"),
            ({"model": TEST_BASE, "messages": []}, "messages"),
            ({"model": TEST_BASE, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
            ({"messages": HELLO}, "model"),
            ({"model": TEST_BASE, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ):
            response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == field, response.text
        response = await http.post("/v1/chat/completions", content=b"{not json")
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
        response = await http.post("/v1/unload_lora_adapter", json={"lora_name": "never-loaded"})
        assert response.status_code == 404


async def test_load_and_unload_adapters_by_name(served: Served) -> None:
    assets = serving_assets()
    async with served.http() as http:
        response = await http.post(
            "/v1/load_lora_adapter", json={"lora_name": "greeter", "lora_path": assets.adapter_b}
        )
        assert response.status_code == 200, response.text
        response = await http.post(
            "/v1/load_lora_adapter", json={"lora_name": "ghost", "lora_path": "fine_tunes/none/adapter"}
        )
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    client = served.sdk()
    answer = await client.chat.completions.create(model="greeter", messages=HELLO, temperature=0)
    assert answer.choices[0].message.content == BONJOUR_ANSWER
    async with served.http() as http:
        assert (await http.post("/v1/unload_lora_adapter", json={"lora_name": "greeter"})).status_code == 200
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="greeter", messages=HELLO)


async def test_least_recently_used_adapter_is_evicted(tmp_path: Path) -> None:
    """Three adapters on a base that keeps two in memory: each answers right, the oldest idle one goes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = serving_assets()
    engine = Engine(
        AutoModelForCausalLM.from_pretrained(assets.base_dir),
        AutoTokenizer.from_pretrained(assets.base_dir),
        max_adapters=2,
    )
    try:
        for name in ("x1", "x2", "x3"):
            shutil.copytree(assets.adapter_a_dir, tmp_path / name)
            engine.register_adapter(name, tmp_path / name)
        prompt = engine.tokenizer.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True)
        ids = engine.count_tokens(prompt)
        loop = asyncio.get_running_loop()

        async def ask(adapter: str) -> str:
            queue: asyncio.Queue = asyncio.Queue()
            params = SamplingParams(max_tokens=40, temperature=0)
            engine.submit(Sequence(ids, adapter, params, threadsafe_emitter(loop, queue)))
            return (await collect(queue))[0]

        assert await ask("x1") == HELLO_ANSWER
        assert await ask("x2") == HELLO_ANSWER
        assert await ask("x1") == HELLO_ANSWER  # x1 is now the most recently used
        assert await ask("x3") == HELLO_ANSWER
        assert list(engine.adapters) == ["x1", "x3"]  # x2 was the least recently used
        assert await asyncio.gather(ask("x2"), ask("x3")) == [HELLO_ANSWER, HELLO_ANSWER]
        assert set(engine.adapters) == {"x2", "x3"}
    finally:
        engine.stop()


async def test_batched_greedy_decoding_matches_plain_generate() -> None:
    """Rows of different lengths and adapters joining mid-batch decode exactly as generate() does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = serving_assets()
    tokenizer = AutoTokenizer.from_pretrained(assets.base_dir)
    prompts = ["The capital of France", "Hello, how can I help you today? The capital of", "abc"]
    expected = greedy_with_generate(assets, prompts, max_new_tokens=8)
    engine = Engine(AutoModelForCausalLM.from_pretrained(assets.base_dir), tokenizer)
    engine.eos_ids = set()
    engine.register_adapter("a", assets.adapter_a_dir)
    try:
        sequences = []
        loop = asyncio.get_running_loop()
        queues = []
        for i, prompt in enumerate(prompts * 2):
            queue: asyncio.Queue = asyncio.Queue()
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            sequence = Sequence(
                ids,
                "a" if i >= 3 else None,
                SamplingParams(max_tokens=8, temperature=0),
                threadsafe_emitter(loop, queue),
            )
            engine.submit(sequence)
            sequences.append(sequence)
            queues.append(queue)
            await asyncio.sleep(0.02)  # arrive while earlier ones are decoding
        for queue in queues:
            await collect(queue)
        assert [s.output_ids for s in sequences] == expected
    finally:
        engine.stop()


async def test_base_adapter_and_mixed_batches_in_turn_each_decode_as_generate_does() -> None:
    """Once an adapter is loaded the engine switches peft between the base alone, the adapter and
    mixed batches only when the batch changes; every order of them still decodes as generate() does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = serving_assets()
    tokenizer = AutoTokenizer.from_pretrained(assets.base_dir)
    prompt = "Hello, how can I help you today? The capital of"
    base_tokens, adapter_tokens = greedy_with_generate(assets, [prompt], max_new_tokens=6)
    engine = Engine(AutoModelForCausalLM.from_pretrained(assets.base_dir), tokenizer)
    engine.eos_ids = set()
    engine.register_adapter("a", assets.adapter_a_dir)
    loop = asyncio.get_running_loop()

    async def run(*adapters: str | None) -> list[list[int]]:
        queues, sequences = [], []
        for adapter in adapters:
            queue: asyncio.Queue = asyncio.Queue()
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            sequence = Sequence(
                ids, adapter, SamplingParams(max_tokens=6, temperature=0), threadsafe_emitter(loop, queue)
            )
            engine.submit(sequence)
            queues.append(queue)
            sequences.append(sequence)
        for queue in queues:
            await collect(queue)
        return [s.output_ids for s in sequences]

    expected = {None: base_tokens, "a": adapter_tokens}
    try:
        for turn in [("a",), (None,), ("a",), (None, "a"), (None,), ("a",), (None, None)]:
            assert await run(*turn) == [expected[adapter] for adapter in turn], turn
        assert base_tokens != adapter_tokens
    finally:
        engine.stop()


async def test_prompts_sharing_a_start_prefill_from_the_cached_prefix_and_decode_as_generate_does() -> None:
    """A shared instruction block is computed once per adapter; what follows it, and the tokens
    generated, are exactly what generate() gives on the whole prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = serving_assets()
    tokenizer = AutoTokenizer.from_pretrained(assets.base_dir)
    shared = "You are a terse assistant. Answer in one short sentence, in plain words, without lists. "
    prompts = [shared + q for q in ("The capital of France", "Hello, how are you", "abc", "Count to three")]
    expected = greedy_with_generate(assets, prompts, max_new_tokens=8)
    engine = Engine(AutoModelForCausalLM.from_pretrained(assets.base_dir), tokenizer)
    engine.eos_ids = set()
    engine.register_adapter("a", assets.adapter_a_dir)
    loop = asyncio.get_running_loop()

    async def run(prompt: str, adapter: str | None) -> list[int]:
        queue: asyncio.Queue = asyncio.Queue()
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sequence = Sequence(
            ids, adapter, SamplingParams(max_tokens=8, temperature=0), threadsafe_emitter(loop, queue)
        )
        engine.submit(sequence)
        await collect(queue)
        return sequence.output_ids

    try:
        # two at once (their shared start is cached), then one at a time (each hits it), per adapter
        outputs = []
        for adapter in (None, "a"):
            outputs += await asyncio.gather(run(prompts[0], adapter), run(prompts[1], adapter))
            outputs += [await run(prompts[2], adapter), await run(prompts[3], adapter)]
        assert outputs == expected
        # the first prompt of each adapter may be prefilled alone, before anything is shared
        assert engine.prefix_hits >= 6
        assert {adapter for adapter, _ in engine._prefixes} == {None, "a"}  # one entry per adapter
    finally:
        engine.stop()
