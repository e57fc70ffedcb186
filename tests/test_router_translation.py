"""OpenAI <-> Anthropic / Gemini translation for the router's ``anthropic:`` and ``gemini:`` routes.

Pure unit tests over recorded upstream payloads (tests/fixtures/upstream): requests, responses,
streams, errors, and a tool-call round trip.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from services.common.errors import APIError
from services.router.providers.anthropic_translate import (
    DEFAULT_MAX_TOKENS,
    JSON_OBJECT_INSTRUCTION,
    AnthropicStreamTranslator,
    from_anthropic_response,
    to_anthropic_request,
)
from services.router.providers.gemini_translate import (
    GeminiStreamTranslator,
    clean_schema,
    from_gemini_response,
    to_gemini_request,
)
from services.router.providers.sse import DONE_EVENT, SSEParser, aparse_sse_lines, parse_sse_lines
from services.router.providers.translation import TranslationError, UpstreamStreamError

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"
COUNT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10"
WEATHER_ARGS = {"location": "San Francisco, CA", "unit": "celsius"}
CREATED = 1_700_000_000

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and state"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def transcript(name: str) -> list[str]:
    """The fixture's lines as httpx ``aiter_lines`` would give them (CRLF kept for the parser)."""
    with open(FIXTURES / name, newline="") as f:
        return f.read().split("\n")


def events(name: str) -> list[dict[str, Any]]:
    return [data for _, data in parse_sse_lines(transcript(name))]


def merge(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Fold chunks per choice, checking the OpenAI streaming invariants on the way."""
    choices: dict[int, dict[str, Any]] = {}
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        for choice in c["choices"]:
            state = choices.setdefault(
                choice["index"], {"role": None, "content": "", "tool_calls": {}, "finish_reason": None}
            )
            assert state["finish_reason"] is None, "nothing may follow a choice's finish_reason"
            delta = choice["delta"]
            if "role" in delta:
                assert state["role"] is None and not state["content"], "role comes once, first"
                state["role"] = delta["role"]
            else:
                assert state["role"] == "assistant", "the first chunk of a choice carries the role"
            state["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                slot = state["tool_calls"].setdefault(
                    call["index"], {"id": None, "name": None, "arguments": ""}
                )
                if "id" in call:
                    assert slot["id"] is None
                    slot["id"] = call["id"]
                    assert call["type"] == "function"
                function = call.get("function") or {}
                if "name" in function:
                    assert slot["name"] is None, "a tool name is sent once"
                    slot["name"] = function["name"]
                slot["arguments"] += function.get("arguments") or ""
            state["finish_reason"] = choice["finish_reason"]
    return choices


def feed_all(translator: Any, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in items:
        out += translator.feed(item)
    return out


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def req(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "anthropic:claude-3-5-sonnet", "messages": list(messages), **extra}


def weather_call(call_id: str = "call_abc", arguments: str = '{"location": "Paris"}') -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}


# ============================================ Anthropic: request ============================================


def test_anthropic_minimal_request() -> None:
    out = to_anthropic_request(req(user("Count to 10")), "claude-3-5-sonnet-20241022")
    assert out == {
        "model": "claude-3-5-sonnet-20241022",
        "max_tokens": DEFAULT_MAX_TOKENS,
        "messages": [{"role": "user", "content": "Count to 10"}],
    }


def test_anthropic_system_and_developer_messages_merge_into_system() -> None:
    out = to_anthropic_request(
        req(
            {"role": "system", "content": "You are terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Use digits."}]},
            user("Count to 10"),
            {"role": "system", "content": "Never apologise."},
        ),
        "m",
    )
    assert out["system"] == "You are terse.\n\nUse digits.\n\nNever apologise."
    assert out["messages"] == [{"role": "user", "content": "Count to 10"}]


def test_anthropic_system_only_request_becomes_the_user_turn() -> None:
    # The OpenPipe docs' own example: messages=[{"role": "system", "content": "count to 10"}]
    out = to_anthropic_request(req({"role": "system", "content": "count to 10"}), "m")
    assert "system" not in out
    assert out["messages"] == [{"role": "user", "content": "count to 10"}]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, DEFAULT_MAX_TOKENS),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 200}, 200),
        ({"max_completion_tokens": 200, "max_tokens": 100}, 200),
        ({"max_tokens": None}, DEFAULT_MAX_TOKENS),
    ],
)
def test_anthropic_max_tokens(extra: dict, expected: int) -> None:
    assert to_anthropic_request(req(user("hi"), **extra), "m")["max_tokens"] == expected


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_anthropic_max_tokens_must_be_positive(param: str) -> None:
    with pytest.raises(TranslationError) as err:
        to_anthropic_request(req(user("hi"), **{param: 0}), "m")
    assert err.value.param == param


@pytest.mark.parametrize(("given", "sent"), [(0, 0.0), (0.3, 0.3), (1, 1.0), (1.7, 1.0), (2, 1.0)])
def test_anthropic_temperature_is_clamped_to_0_1(given: float, sent: float) -> None:
    assert to_anthropic_request(req(user("hi"), temperature=given), "m")["temperature"] == sent


def test_anthropic_sampling_stop_and_stream() -> None:
    out = to_anthropic_request(req(user("hi"), top_p=0.9, stop="END", stream=True), "m")
    assert out["top_p"] == 0.9
    assert out["stop_sequences"] == ["END"]
    assert out["stream"] is True
    out = to_anthropic_request(req(user("hi"), stop=["A", "B"], stream=False), "m")
    assert out["stop_sequences"] == ["A", "B"]
    assert "stream" not in out
    out = to_anthropic_request(req(user("hi"), stop=None, temperature=None, top_p=None), "m")
    assert not {"stop_sequences", "temperature", "top_p"} & set(out)


def test_anthropic_drops_what_it_cannot_use() -> None:
    out = to_anthropic_request(
        req(
            user("hi"),
            seed=4,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            logit_bias={"50256": -100},
            stream_options={"include_usage": True},
            n=1,
            response_format={"type": "text"},
            user="user-42",
        ),
        "m",
    )
    assert set(out) == {"model", "max_tokens", "messages", "metadata"}
    assert out["metadata"] == {"user_id": "user-42"}


def test_anthropic_images_and_documents() -> None:
    out = to_anthropic_request(
        req(
            user(
                [
                    {"type": "text", "text": "What is in these?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    {"type": "image_url", "image_url": "https://example.com/dog.webp"},
                    {
                        "type": "file",
                        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"},
                    },
                ]
            )
        ),
        "m",
    )
    assert out["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/dog.webp"}},
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
                },
            ],
        }
    ]


def test_anthropic_text_part_cache_control_passes_through() -> None:
    part = {"type": "text", "text": "long context", "cache_control": {"type": "ephemeral"}}
    out = to_anthropic_request(req(user([part])), "m")
    assert out["messages"][0]["content"] == [part]


@pytest.mark.parametrize(
    ("part", "param"),
    [
        (
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            "messages[0].content[1].type",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png,raw"}},
            "messages[0].content[1].image_url.url",
        ),
        ({"type": "file", "file": {"file_id": "file-abc"}}, "messages[0].content[1].file"),
        ({"type": "video", "video": {}}, "messages[0].content[1].type"),
    ],
)
def test_anthropic_unsupported_content_parts_name_the_param(part: dict, param: str) -> None:
    with pytest.raises(TranslationError) as err:
        to_anthropic_request(req(user([{"type": "text", "text": "hi"}, part])), "m")
    assert err.value.param == param
    assert err.value.status_code == 400


def test_anthropic_tool_round_trip_with_merged_tool_results() -> None:
    out = to_anthropic_request(
        req(
            {"role": "system", "content": "Use tools."},
            user("Weather in Paris and the time there?"),
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    weather_call("call_1"),
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]},
            user("Thanks! And tomorrow?"),
        ),
        "m",
    )
    assert out["system"] == "Use tools."
    assert out["messages"] == [
        {"role": "user", "content": "Weather in Paris and the time there?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": '{"temp": 18}'},
                {
                    "type": "tool_result",
                    "tool_use_id": "call_2",
                    "content": [{"type": "text", "text": "14:05"}],
                },
                {"type": "text", "text": "Thanks! And tomorrow?"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"location": "Paris"}', {"location": "Paris"}),
        ("", {}),
        (None, {}),
        ("{not json", {"_raw": "{not json"}),
        ("[1, 2]", {"_raw": "[1, 2]"}),
    ],
)
def test_anthropic_tool_call_arguments(arguments: Any, expected: dict) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    out = to_anthropic_request(
        req(
            user("hi"),
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        ),
        "m",
    )
    assert out["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": expected}],
    }


def test_anthropic_tool_ids_are_sanitized_consistently() -> None:
    out = to_anthropic_request(
        req(
            user("hi"),
            {"role": "assistant", "content": None, "tool_calls": [weather_call("fc:1.abc/x")]},
            {"role": "tool", "tool_call_id": "fc:1.abc/x", "content": "ok"},
        ),
        "m",
    )
    assert out["messages"][1]["content"][0]["id"] == "fc_1_abc_x"
    assert out["messages"][2]["content"][0]["tool_use_id"] == "fc_1_abc_x"


def test_anthropic_tools_definitions() -> None:
    bare = {"type": "function", "function": {"name": "ping"}}
    out = to_anthropic_request(req(user("hi"), tools=[WEATHER_TOOL, bare]), "m")
    assert out["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        },
        {"name": "ping", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in out


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
    ],
)
def test_anthropic_tool_choice(choice: Any, expected: dict) -> None:
    out = to_anthropic_request(req(user("hi"), tools=[WEATHER_TOOL], tool_choice=choice), "m")
    assert out["tool_choice"] == expected
    assert out["tools"][0]["name"] == "get_weather"  # kept even for "none": history may hold tool_use blocks


def test_anthropic_tool_choice_without_tools_is_dropped() -> None:
    out = to_anthropic_request(req(user("hi"), tool_choice="required"), "m")
    assert "tool_choice" not in out and "tools" not in out


def test_anthropic_parallel_tool_calls_false() -> None:
    out = to_anthropic_request(req(user("hi"), tools=[WEATHER_TOOL], parallel_tool_calls=False), "m")
    assert out["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    out = to_anthropic_request(
        req(user("hi"), tools=[WEATHER_TOOL], tool_choice="required", parallel_tool_calls=False), "m"
    )
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    out = to_anthropic_request(
        req(user("hi"), tools=[WEATHER_TOOL], tool_choice="none", parallel_tool_calls=False), "m"
    )
    assert out["tool_choice"] == {"type": "none"}


def test_anthropic_legacy_functions() -> None:
    out = to_anthropic_request(
        req(
            user("Weather in Paris?"),
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": "{}"},
            },
            {"role": "function", "name": "get_weather", "content": "18C"},
            {"role": "assistant", "content": "18C and"},
            user("and the time?"),
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_time", "arguments": '{"tz":"CET"}'},
            },
            {"role": "function", "name": "get_time", "content": "14:05"},
            functions=[WEATHER_TOOL["function"], TIME_TOOL["function"]],
            function_call={"name": "get_time"},
        ),
        "m",
    )
    assert [t["name"] for t in out["tools"]] == ["get_weather", "get_time"]
    assert out["tool_choice"] == {"type": "tool", "name": "get_time"}
    msgs = out["messages"]
    assert msgs[1]["content"] == [
        {"type": "tool_use", "id": "toolu_legacy_0", "name": "get_weather", "input": {}}
    ]
    assert msgs[2]["content"][0] == {"type": "tool_result", "tool_use_id": "toolu_legacy_0", "content": "18C"}
    assert msgs[3] == {"role": "assistant", "content": "18C and"}
    assert msgs[4] == {"role": "user", "content": "and the time?"}
    assert msgs[5]["content"][0]["id"] == "toolu_legacy_1"
    assert msgs[5]["content"][0]["input"] == {"tz": "CET"}
    assert msgs[6]["content"][0]["tool_use_id"] == "toolu_legacy_1"


@pytest.mark.parametrize(("choice", "expected"), [("auto", {"type": "auto"}), ("none", {"type": "none"})])
def test_anthropic_legacy_function_call_modes(choice: str, expected: dict) -> None:
    out = to_anthropic_request(
        req(user("hi"), functions=[WEATHER_TOOL["function"]], function_call=choice), "m"
    )
    assert out["tool_choice"] == expected


def test_anthropic_function_message_without_a_call_is_an_error() -> None:
    with pytest.raises(TranslationError) as err:
        to_anthropic_request(req(user("hi"), {"role": "function", "name": "f", "content": "x"}), "m")
    assert err.value.param == "messages[1]"


def test_anthropic_message_merging_and_prefill() -> None:
    out = to_anthropic_request(
        req(
            user("one"),
            user([{"type": "text", "text": "two"}]),
            {"role": "assistant", "content": ""},  # empty turns are dropped
            {"role": "assistant", "content": "The answer is "},  # final assistant turn = prefill
        ),
        "m",
    )
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": "The answer is"},
    ]


def test_anthropic_json_object_adds_a_system_instruction() -> None:
    out = to_anthropic_request(req(user("hi"), response_format={"type": "json_object"}), "m")
    assert out["system"] == JSON_OBJECT_INSTRUCTION
    out = to_anthropic_request(
        req({"role": "system", "content": "Be brief."}, user("hi"), response_format={"type": "json_object"}),
        "m",
    )
    assert out["system"] == f"Be brief.\n\n{JSON_OBJECT_INSTRUCTION}"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
            "response_format",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [{"role": "critic", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_anthropic_translation_errors_name_the_param(extra: dict, param: str) -> None:
    body = {**req(user("hi")), **extra}
    with pytest.raises(TranslationError) as err:
        to_anthropic_request(body, "m")
    exc = err.value
    assert isinstance(exc, APIError)
    assert (exc.status_code, exc.type, exc.param) == (400, "invalid_request_error", param)
    assert exc.message


def test_anthropic_request_translation_does_not_mutate_the_input() -> None:
    body = req(
        {"role": "system", "content": "s"},
        user([{"type": "text", "text": "hi"}]),
        {"role": "assistant", "content": "x ", "tool_calls": [weather_call()]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "ok"},
        {"role": "assistant", "content": "done "},
        tools=[WEATHER_TOOL],
        response_format={"type": "json_object"},
    )
    before = copy.deepcopy(body)
    to_anthropic_request(body, "m")
    to_gemini_request(body)
    assert body == before


# ============================================ Anthropic: response ===========================================


def test_anthropic_text_response() -> None:
    out = from_anthropic_response(
        load("anthropic_message_text.json"), model="anthropic:claude-3-5-sonnet", created=CREATED
    )
    assert out == {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "object": "chat.completion",
        "created": CREATED,
        "model": "anthropic:claude-3-5-sonnet",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": COUNT, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 14,
            "completion_tokens": 31,
            "total_tokens": 45,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


def test_anthropic_tool_use_response() -> None:
    resp = load("anthropic_message_tool_use.json")
    out = from_anthropic_response(
        resp, model="anthropic:claude-3-5-sonnet", created=CREATED, completion_id="chatcmpl-x"
    )
    assert out["id"] == "chatcmpl-x"
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll check the current weather in San Francisco for you."
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_01A09q90qw90lq917835lq9"
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == WEATHER_ARGS
    assert out["usage"]["total_tokens"] == 384 + 76


def test_anthropic_tool_only_response_has_null_content() -> None:
    resp = load("anthropic_message_tool_use.json")
    resp["content"] = resp["content"][1:]
    message = from_anthropic_response(resp, model="m", created=0)["choices"][0]["message"]
    assert message["content"] is None and len(message["tool_calls"]) == 1


def test_anthropic_thinking_blocks_are_not_shown() -> None:
    resp = load("anthropic_message_text.json")
    resp["content"].insert(0, {"type": "thinking", "thinking": "Let me count.", "signature": "sig"})
    assert from_anthropic_response(resp, model="m", created=0)["choices"][0]["message"]["content"] == COUNT


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        (None, "stop"),
    ],
)
def test_anthropic_finish_reasons(stop_reason: str | None, finish: str) -> None:
    resp = {**load("anthropic_message_text.json"), "stop_reason": stop_reason}
    assert from_anthropic_response(resp, model="m", created=0)["choices"][0]["finish_reason"] == finish


def test_anthropic_cache_tokens_count_as_prompt_tokens() -> None:
    resp = load("anthropic_message_text.json")
    resp["usage"].update(
        input_tokens=10, cache_creation_input_tokens=100, cache_read_input_tokens=1000, output_tokens=5
    )
    usage = from_anthropic_response(resp, model="m", created=0)["usage"]
    assert usage == {
        "prompt_tokens": 1110,
        "completion_tokens": 5,
        "total_tokens": 1115,
        "prompt_tokens_details": {"cached_tokens": 1000},
    }


@pytest.mark.parametrize(
    ("fixture", "status", "kind", "code"),
    [
        ("anthropic_error_529_overloaded.json", 502, "upstream_error", "overloaded"),
        ("anthropic_error_429_rate_limit.json", 429, "rate_limit_error", "rate_limit_exceeded"),
    ],
)
def test_anthropic_error_bodies_raise(fixture: str, status: int, kind: str, code: str) -> None:
    body = load(fixture)
    with pytest.raises(UpstreamStreamError) as err:
        from_anthropic_response(body, model="m", created=0)
    assert (err.value.status_code, err.value.type, err.value.code) == (status, kind, code)
    assert body["error"]["message"][:40] in err.value.message


# ============================================ Anthropic: stream =============================================


def test_anthropic_text_stream() -> None:
    translator = AnthropicStreamTranslator("anthropic:claude-3-5-sonnet", CREATED)
    chunks = feed_all(translator, events("anthropic_stream_text.txt"))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks} == {"msg_01XFDUDYJgAACzvnptvVoYEL"}
    assert {c["model"] for c in chunks} == {"anthropic:claude-3-5-sonnet"}
    assert {c["created"] for c in chunks} == {CREATED}
    [choice] = merge(chunks).values()
    assert choice["content"] == load("anthropic_message_text.json")["content"][0]["text"] == COUNT
    assert choice["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert translator.finished and translator.finish_reason == "stop"
    assert translator.finish() == []
    assert translator.usage() == {
        "prompt_tokens": 14,
        "completion_tokens": 31,
        "total_tokens": 45,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    tail = translator.usage_chunk()
    assert tail["choices"] == [] and tail["usage"] == translator.usage() and tail["id"] == chunks[0]["id"]


def test_anthropic_tool_stream_matches_the_non_streamed_message() -> None:
    translator = AnthropicStreamTranslator("m", CREATED, completion_id="chatcmpl-fixed")
    chunks = feed_all(translator, events("anthropic_stream_tool_use.txt"))
    assert {c["id"] for c in chunks} == {"chatcmpl-fixed"}
    starts = [
        c["choices"][0]["delta"]["tool_calls"][0]
        for c in chunks
        if "id" in (c["choices"][0]["delta"].get("tool_calls") or [{}])[0]
    ]
    assert starts == [
        {
            "index": 0,
            "id": "toolu_01A09q90qw90lq917835lq9",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
    ]
    [choice] = merge(chunks).values()
    [call] = choice["tool_calls"].values()
    assert json.loads(call["arguments"]) == WEATHER_ARGS
    assert choice["finish_reason"] == "tool_calls"

    expected = from_anthropic_response(load("anthropic_message_tool_use.json"), model="m", created=CREATED)
    message = expected["choices"][0]["message"]
    assert choice["content"] == message["content"]
    assert [(call["id"], call["name"])] == [(c["id"], c["function"]["name"]) for c in message["tool_calls"]]
    assert translator.usage() == expected["usage"]


def test_anthropic_stream_error_event_raises_after_partial_content() -> None:
    translator = AnthropicStreamTranslator("m", CREATED)
    chunks: list[dict] = []
    with pytest.raises(UpstreamStreamError) as err:
        for event in events("anthropic_stream_overloaded_error.txt"):
            chunks += translator.feed(event)
    assert merge(chunks)[0]["content"] == "1, 2, 3"
    assert err.value.code == "overloaded" and "Overloaded" in err.value.message
    assert not translator.finished
    with pytest.raises(UpstreamStreamError):
        translator.finish()


def test_anthropic_stream_tool_without_arguments_gets_empty_object() -> None:
    translator = AnthropicStreamTranslator("m", 0)
    chunks = feed_all(
        translator,
        [
            {
                "type": "message_start",
                "message": {"id": "msg_1", "usage": {"input_tokens": 3, "output_tokens": 1}},
            },
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": ""},
            },
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}},
            {"type": "message_stop"},
        ],
    )
    [choice] = merge(chunks).values()
    assert choice["tool_calls"][0]["arguments"] == "{}"
    assert translator.usage()["completion_tokens"] == 9


def test_anthropic_stream_ignores_pings_thinking_and_unknown_events() -> None:
    translator = AnthropicStreamTranslator("m", 0)
    translator.feed({"type": "message_start", "message": {"id": "msg_1", "usage": {}}})
    assert translator.feed({"type": "ping"}) == []
    assert (
        translator.feed(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}
        )
        == []
    )
    assert (
        translator.feed(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "hmm"},
            }
        )
        == []
    )
    assert translator.feed({"type": "some_future_event"}) == []


def test_anthropic_stream_max_tokens_and_missing_message_start() -> None:
    translator = AnthropicStreamTranslator("m", 0)
    chunks = feed_all(
        translator,
        [
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
            {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 1}},
            {"type": "message_stop"},
        ],
    )
    assert merge(chunks)[0] == {
        "role": "assistant",
        "content": "Hi",
        "tool_calls": {},
        "finish_reason": "length",
    }


# ============================================ SSE parsing ===================================================


def test_sse_parser_line_by_line() -> None:
    parser = SSEParser()
    lines = [
        ": comment",
        "event: message_start",
        'data: {"type": "message_start",',
        'data:  "n": 1}',
        "",
        "",
        'data: {"type": "ping"}\r',
        "\r",
        'data: {"candidates": []}',
        "",
        "data: [DONE]",
        "",
        'data: {"last": true}',
    ]
    out = [item for line in lines if (item := parser.feed_line(line)) is not None]
    assert out == [
        ("message_start", {"type": "message_start", "n": 1}),
        ("ping", {"type": "ping"}),
        ("message", {"candidates": []}),
        (DONE_EVENT, {}),
    ]
    assert parser.flush() == ("message", {"last": True})
    assert parser.flush() is None


def test_sse_parser_unwraps_gemini_error_arrays_and_rejects_garbage() -> None:
    parser = SSEParser()
    parser.feed_line('data: [{"error": {"code": 500, "message": "boom", "status": "INTERNAL"}}]')
    assert parser.feed_line("") == (
        "message",
        {"error": {"code": 500, "message": "boom", "status": "INTERNAL"}},
    )
    parser.feed_line("data: {not json")
    with pytest.raises(UpstreamStreamError):
        parser.feed_line("")


async def test_aparse_sse_lines() -> None:
    async def lines():
        for line in transcript("anthropic_stream_text.txt"):
            yield line

    names = [event async for event, _ in aparse_sse_lines(lines())]
    assert names[0] == "message_start" and names[-1] == "message_stop" and "ping" in names


def test_openai_fixtures_are_self_consistent() -> None:
    for stream, body in [
        ("openai_stream_text.txt", "openai_chat_completion.json"),
        ("openai_stream_tool_calls.txt", "openai_chat_completion_tool_calls.json"),
    ]:
        parsed = list(parse_sse_lines(transcript(stream)))
        assert parsed[-1] == (DONE_EVENT, {})
        chunks = [data for _, data in parsed[:-1]]
        assert chunks[-1]["choices"] == [] and all(c["usage"] is None for c in chunks[:-1])
        completion = load(body)
        assert chunks[-1]["usage"] == completion["usage"]
        [choice] = merge(chunks[:-1]).values()
        message = completion["choices"][0]["message"]
        assert choice["content"] == (message["content"] or "")
        assert choice["finish_reason"] == completion["choices"][0]["finish_reason"]
        assert [c["arguments"] for c in choice["tool_calls"].values()] == [
            c["function"]["arguments"] for c in message.get("tool_calls") or []
        ]
    assert load("openai_error_429_rate_limit.json")["error"]["code"] == "rate_limit_exceeded"
    assert load("openai_error_400_invalid_request.json")["error"]["type"] == "invalid_request_error"


# ============================================ Gemini: request ===============================================


def test_gemini_basic_request() -> None:
    out = to_gemini_request(
        req(
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": "Digits only."},
            user("Count to 3"),
            {"role": "assistant", "content": "1, 2, 3"},
            user("Again"),
        )
    )
    assert out == {
        "systemInstruction": {"parts": [{"text": "Be terse.\n\nDigits only."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Count to 3"}]},
            {"role": "model", "parts": [{"text": "1, 2, 3"}]},
            {"role": "user", "parts": [{"text": "Again"}]},
        ],
    }


def test_gemini_system_only_request_becomes_the_user_turn() -> None:
    out = to_gemini_request(req({"role": "system", "content": "count to 10"}))
    assert out == {"contents": [{"role": "user", "parts": [{"text": "count to 10"}]}]}


def test_gemini_images_audio_and_files() -> None:
    out = to_gemini_request(
        req(
            user(
                [
                    {"type": "text", "text": "Describe"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png?size=2"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}},
                    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}},
                ]
            )
        )
    )
    assert out["contents"][0]["parts"] == [
        {"text": "Describe"},
        {"inlineData": {"mimeType": "image/png", "data": PNG}},
        {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/cat.png?size=2"}},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGR"}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}},
    ]


def test_gemini_tool_round_trip() -> None:
    out = to_gemini_request(
        req(
            user("Weather in Paris and the time?"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    weather_call("call_0"),
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{bad"},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 18}'},
            {"role": "tool", "tool_call_id": "call_1", "content": "14:05"},
            user("Thanks"),
            tools=[WEATHER_TOOL, TIME_TOOL],
        )
    )
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris and the time?"}]},
        {
            "role": "model",
            "parts": [
                {"functionCall": {"name": "get_weather", "args": {"location": "Paris"}}},
                {"functionCall": {"name": "get_time", "args": {"_raw": "{bad"}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
                {"functionResponse": {"name": "get_time", "response": {"content": "14:05"}}},
                {"text": "Thanks"},
            ],
        },
    ]


def test_gemini_tool_ids_resolve_to_the_latest_assistant_turn() -> None:
    # Gemini ids restart at call_0 in every response; a tool message answers the latest call with its id.
    out = to_gemini_request(
        req(
            user("a"),
            {"role": "assistant", "content": None, "tool_calls": [weather_call("call_0")]},
            {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_0", "content": "noon"},
        )
    )
    names = [
        p["functionResponse"]["name"] for c in out["contents"] for p in c["parts"] if "functionResponse" in p
    ]
    assert names == ["get_weather", "get_time"]


def test_gemini_tool_message_with_unknown_id_is_an_error() -> None:
    with pytest.raises(TranslationError) as err:
        to_gemini_request(req(user("a"), {"role": "tool", "tool_call_id": "call_9", "content": "x"}))
    assert err.value.param == "messages[1].tool_call_id"


def test_gemini_legacy_functions() -> None:
    out = to_gemini_request(
        req(
            user("Weather?"),
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": '{"location": "Oslo"}'},
            },
            {"role": "function", "name": "get_weather", "content": "-3C"},
            functions=[WEATHER_TOOL["function"]],
            function_call={"name": "get_weather"},
        )
    )
    assert out["contents"][1] == {
        "role": "model",
        "parts": [{"functionCall": {"name": "get_weather", "args": {"location": "Oslo"}}}],
    }
    assert out["contents"][2] == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "get_weather", "response": {"content": "-3C"}}}],
    }
    assert out["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"
    assert out["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    with pytest.raises(TranslationError) as err:
        to_gemini_request(req(user("a"), {"role": "function", "content": "x"}))
    assert err.value.param == "messages[1].name"


def test_gemini_function_declarations() -> None:
    out = to_gemini_request(
        req(
            user("hi"),
            tools=[
                WEATHER_TOOL,
                {
                    "type": "function",
                    "function": {"name": "now", "parameters": {"type": "object", "properties": {}}},
                },
            ],
        )
    )
    assert out["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "location": {"type": "string", "description": "City and state"},
                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                        },
                        "required": ["location"],
                    },
                },
                {"name": "now"},
            ]
        }
    ]
    assert "toolConfig" not in out


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ("none", {"mode": "NONE"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_gemini_tool_choice(choice: Any, config: dict) -> None:
    out = to_gemini_request(req(user("hi"), tools=[WEATHER_TOOL], tool_choice=choice))
    assert out["toolConfig"] == {"functionCallingConfig": config}


def test_gemini_generation_config() -> None:
    out = to_gemini_request(
        req(
            user("hi"),
            temperature=1.5,
            top_p=0.8,
            max_tokens=50,
            stop="END",
            n=3,
            seed=7,
            presence_penalty=0.4,
            frequency_penalty=0,
            user="u1",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert out["generationConfig"] == {
        "stopSequences": ["END"],
        "candidateCount": 3,
        "maxOutputTokens": 50,
        "temperature": 1.5,
        "topP": 0.8,
        "seed": 7,
        "presencePenalty": 0.4,
    }
    assert set(out) == {"contents", "generationConfig"}
    assert to_gemini_request(req(user("hi"), max_completion_tokens=9, max_tokens=5, n=1))[
        "generationConfig"
    ] == {"maxOutputTokens": 9}


def test_gemini_response_formats() -> None:
    out = to_gemini_request(req(user("hi"), response_format={"type": "json_object"}))
    assert out["generationConfig"] == {"responseMimeType": "application/json"}
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Answer",
        "type": "object",
        "properties": {
            "city": {"$ref": "#/$defs/City"},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        },
        "required": ["city", "note"],
        "additionalProperties": False,
        "$defs": {
            "City": {
                "title": "City",
                "type": "object",
                "properties": {"name": {"type": "string", "format": "email"}},
                "required": ["name"],
                "additionalProperties": False,
            }
        },
    }
    out = to_gemini_request(
        req(
            user("hi"),
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "strict": True, "schema": schema},
            },
        )
    )
    assert out["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "object",
            "properties": {
                "city": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
                "note": {"type": "string", "nullable": True},
            },
            "required": ["city", "note"],
        },
    }


@pytest.mark.parametrize(
    ("schema", "cleaned"),
    [
        ({"type": ["string", "null"]}, {"type": "string", "nullable": True}),
        ({"type": ["string", "integer"]}, {"anyOf": [{"type": "string"}, {"type": "integer"}]}),
        ({"const": "fixed"}, {"enum": ["fixed"], "type": "string"}),
        ({"type": "string", "format": "date-time"}, {"type": "string", "format": "date-time"}),
        ({"type": "string", "format": "uri"}, {"type": "string"}),
        (
            {"type": "integer", "format": "int64", "minimum": 0},
            {"type": "integer", "format": "int64", "minimum": 0},
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", "ghost"]},
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
        ),
        (
            {"type": "array", "items": {"type": "string", "examples": ["x"]}, "maxItems": 3},
            {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        ),
        ({"allOf": [{"type": "string"}], "description": "d"}, {"type": "string", "description": "d"}),
        (
            {"oneOf": [{"type": "string"}, {"type": "integer"}]},
            {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        ),
    ],
)
def test_gemini_clean_schema(schema: dict, cleaned: dict) -> None:
    assert clean_schema(schema) == cleaned


def test_gemini_clean_schema_survives_recursive_refs() -> None:
    schema = {
        "type": "object",
        "properties": {"child": {"$ref": "#/$defs/Node"}},
        "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
    }
    cleaned = clean_schema(schema)
    assert cleaned["properties"]["child"]["type"] == "object"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"modalities": ["audio"]}, "modalities"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [user([{"type": "file", "file": {"file_id": "file-1"}}])]},
            "messages[0].content[0].file",
        ),
        ({"max_tokens": -1}, "max_tokens"),
    ],
)
def test_gemini_translation_errors_name_the_param(extra: dict, param: str) -> None:
    with pytest.raises(TranslationError) as err:
        to_gemini_request({**req(user("hi")), **extra})
    assert (err.value.status_code, err.value.param) == (400, param)


# ============================================ Gemini: response ==============================================


def test_gemini_text_response() -> None:
    out = from_gemini_response(
        load("gemini_response_text.json"), model="gemini:gemini-2.0-flash", created=CREATED
    )
    assert out == {
        "id": "chatcmpl-mAitZ9qTNMGfz7IPkOfn-AU",
        "object": "chat.completion",
        "created": CREATED,
        "model": "gemini:gemini-2.0-flash",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": COUNT + "\n", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 4,
            "completion_tokens": 29,
            "total_tokens": 33,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    assert (
        from_gemini_response(
            load("gemini_response_text.json"), model="m", created=0, completion_id="chatcmpl-mine"
        )["id"]
        == "chatcmpl-mine"
    )


def test_gemini_function_call_response() -> None:
    out = from_gemini_response(
        load("gemini_response_function_call.json"), model="m", created=0, completion_id="c"
    )
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert (call["id"], call["type"], call["function"]["name"]) == ("call_0", "function", "get_weather")
    assert json.loads(call["function"]["arguments"]) == WEATHER_ARGS
    assert out["usage"]["total_tokens"] == 61


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("OTHER", "stop"),
        (None, "stop"),
    ],
)
def test_gemini_finish_reasons(reason: str | None, finish: str) -> None:
    resp = load("gemini_response_text.json")
    resp["candidates"][0]["finishReason"] = reason
    assert from_gemini_response(resp, model="m", created=0)["choices"][0]["finish_reason"] == finish


def test_gemini_multiple_candidates_thoughts_and_signatures() -> None:
    resp = {
        "candidates": [
            {
                "index": 1,
                "content": {
                    "role": "model",
                    "parts": [{"text": "B"}, {"functionCall": {"name": "h", "args": {}}}],
                },
                "finishReason": "MAX_TOKENS",
            },
            {
                "index": 0,
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "thinking about it", "thought": True},
                        {"text": "A"},
                        {"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "c2ln"},
                        {"functionCall": {"name": "g", "args": {"x": 1}}},
                    ],
                },
                "finishReason": "STOP",
            },
        ],
        "usageMetadata": {
            "promptTokenCount": 10,
            "candidatesTokenCount": 5,
            "thoughtsTokenCount": 20,
            "cachedContentTokenCount": 4,
            "totalTokenCount": 35,
        },
    }
    out = from_gemini_response(resp, model="m", created=0)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    first, second = out["choices"]
    assert first["message"]["content"] == "A" and first["finish_reason"] == "tool_calls"
    assert [c["id"] for c in first["message"]["tool_calls"]] == [
        "call_1",
        "call_2",
    ]  # numbered across candidates
    assert first["message"]["tool_calls"][0]["extra_content"] == {"google": {"thought_signature": "c2ln"}}
    assert "extra_content" not in first["message"]["tool_calls"][1]
    assert second["message"]["content"] == "B" and second["finish_reason"] == "length"
    assert [c["id"] for c in second["message"]["tool_calls"]] == ["call_0"]
    assert out["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 25,
        "total_tokens": 35,
        "prompt_tokens_details": {"cached_tokens": 4},
        "completion_tokens_details": {"reasoning_tokens": 20},
    }


def test_gemini_thought_signature_goes_back_upstream() -> None:
    call = {**weather_call("call_0"), "extra_content": {"google": {"thought_signature": "c2ln"}}}
    out = to_gemini_request(req(user("a"), {"role": "assistant", "content": None, "tool_calls": [call]}))
    assert out["contents"][1]["parts"][0]["thoughtSignature"] == "c2ln"


def test_gemini_blocked_prompt() -> None:
    resp = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
    }
    out = from_gemini_response(resp, model="m", created=0)
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": None, "refusal": None},
            "logprobs": None,
            "finish_reason": "content_filter",
        }
    ]
    assert out["usage"]["prompt_tokens"] == 7


@pytest.mark.parametrize(
    ("fixture", "status", "kind", "code"),
    [
        ("gemini_error_400_invalid_argument.json", 400, "invalid_request_error", None),
        ("gemini_error_400_api_key_invalid.json", 401, "upstream_auth_error", "invalid_api_key"),
        ("gemini_error_429_resource_exhausted.json", 429, "rate_limit_error", "rate_limit_exceeded"),
    ],
)
def test_gemini_error_bodies_raise(fixture: str, status: int, kind: str, code: str | None) -> None:
    body = load(fixture)
    with pytest.raises(UpstreamStreamError) as err:
        from_gemini_response(body, model="m", created=0)
    assert (err.value.status_code, err.value.type, err.value.code) == (status, kind, code)
    assert body["error"]["message"].strip() in err.value.message


# ============================================ Gemini: stream ================================================


def test_gemini_text_stream() -> None:
    translator = GeminiStreamTranslator("gemini:gemini-2.0-flash", CREATED)
    chunks = feed_all(translator, events("gemini_stream_text.txt"))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks} == {"chatcmpl-mAitZ9qTNMGfz7IPkOfn-AU"}
    assert {c["model"] for c in chunks} == {"gemini:gemini-2.0-flash"}
    [choice] = merge(chunks).values()
    expected = from_gemini_response(load("gemini_response_text.json"), model="m", created=0)
    assert choice["content"] == expected["choices"][0]["message"]["content"]
    assert choice["finish_reason"] == "stop"
    assert translator.finished and translator.finish_reason == "stop"
    assert translator.finish() == []
    assert translator.usage() == expected["usage"]
    assert (
        translator.usage_chunk()["usage"] == expected["usage"] and translator.usage_chunk()["choices"] == []
    )


def test_gemini_function_call_stream() -> None:
    translator = GeminiStreamTranslator("m", CREATED, completion_id="chatcmpl-1")
    chunks = feed_all(translator, events("gemini_stream_function_call.txt"))
    [choice] = merge(chunks).values()
    assert choice["content"] == ""
    assert choice["tool_calls"] == {
        0: {
            "id": "call_0",
            "name": "get_weather",
            "arguments": json.dumps(WEATHER_ARGS, separators=(",", ":")),
        }
    }
    assert choice["finish_reason"] == "tool_calls"
    expected = from_gemini_response(load("gemini_response_function_call.json"), model="m", created=0)
    assert translator.usage() == expected["usage"]
    assert json.loads(choice["tool_calls"][0]["arguments"]) == json.loads(
        expected["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    )


def test_gemini_stream_several_candidates_and_finish() -> None:
    translator = GeminiStreamTranslator("m", 0, completion_id="c")
    chunks = feed_all(
        translator,
        [
            {
                "candidates": [
                    {"index": 0, "content": {"parts": [{"text": "A"}]}},
                    {"index": 1, "content": {"parts": [{"text": "B"}]}},
                ]
            },
            {"candidates": [{"index": 0, "content": {"parts": [{"text": "a"}]}, "finishReason": "STOP"}]},
        ],
    )
    assert not translator.finished
    chunks += translator.finish()
    merged = merge(chunks)
    assert {i: (c["content"], c["finish_reason"]) for i, c in merged.items()} == {
        0: ("Aa", "stop"),
        1: ("B", "stop"),
    }
    assert translator.finished


def test_gemini_stream_errors() -> None:
    translator = GeminiStreamTranslator("m", 0)
    with pytest.raises(UpstreamStreamError):
        translator.finish()  # nothing arrived
    translator.feed({"candidates": [{"content": {"parts": [{"text": "Hel"}]}}]})
    with pytest.raises(UpstreamStreamError) as err:
        translator.feed(
            {
                "error": {
                    "code": 503,
                    "message": "The model is overloaded. Please try again later.",
                    "status": "UNAVAILABLE",
                }
            }
        )
    assert (err.value.status_code, err.value.code) == (502, "overloaded")


def test_gemini_stream_blocked_prompt() -> None:
    translator = GeminiStreamTranslator("m", 0)
    chunks = translator.feed({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}})
    assert merge(chunks)[0]["finish_reason"] == "content_filter"


# ============================================ round trips ===================================================


TOOL_SETS = [
    [("get_weather", {"location": "Paris"})],
    [("get_weather", {"location": "Paris"}), ("get_time", {"tz": "Europe/Paris"})],
    [("search_docs", {"query": 'naïve "quotes" \\ and ünïcode', "limit": 3}), ("noop", {})],
]


@pytest.mark.parametrize("calls", TOOL_SETS)
def test_anthropic_tool_round_trip_keeps_names_and_ids(calls: list[tuple[str, dict]]) -> None:
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
        for name, _ in calls
    ]
    first = {"model": "anthropic:claude", "messages": [user("go")], "tools": tools, "tool_choice": "required"}
    upstream_req = to_anthropic_request(first, "claude-x")
    assert [t["name"] for t in upstream_req["tools"]] == [name for name, _ in calls]

    # The upstream answers with one tool_use per requested tool.
    message = {
        "id": "msg_01RoundTrip",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "tool_use", "id": f"toolu_01Rt{i}", "name": name, "input": args}
            for i, (name, args) in enumerate(calls)
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 20},
    }
    completion = from_anthropic_response(message, model="anthropic:claude", created=CREATED)
    assistant = completion["choices"][0]["message"]
    assert [(c["id"], c["function"]["name"]) for c in assistant["tool_calls"]] == [
        (f"toolu_01Rt{i}", n) for i, (n, _) in enumerate(calls)
    ]
    assert [json.loads(c["function"]["arguments"]) for c in assistant["tool_calls"]] == [a for _, a in calls]

    # The client sends the assistant turn back with its tool results (as the openai SDK would).
    results = [
        {"role": "tool", "tool_call_id": c["id"], "content": f"result of {c['function']['name']}"}
        for c in assistant["tool_calls"]
    ]
    second = to_anthropic_request({**first, "messages": [user("go"), assistant, *results]}, "claude-x")
    turn, answers = second["messages"][1], second["messages"][2]
    assert [(b["id"], b["name"], b["input"]) for b in turn["content"]] == [
        (b["id"], b["name"], b["input"]) for b in message["content"]
    ]
    assert [b["tool_use_id"] for b in answers["content"]] == [b["id"] for b in message["content"]]
    assert answers["role"] == "user" and len(second["messages"]) == 3


@pytest.mark.parametrize("calls", TOOL_SETS)
def test_gemini_tool_round_trip_keeps_names(calls: list[tuple[str, dict]]) -> None:
    tools = [{"type": "function", "function": {"name": name}} for name, _ in calls]
    first = {"model": "gemini:x", "messages": [user("go")], "tools": tools}
    resp = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [{"functionCall": {"name": n, "args": a}} for n, a in calls],
                },
                "finishReason": "STOP",
            }
        ]
    }
    assistant = from_gemini_response(resp, model="gemini:x", created=0)["choices"][0]["message"]
    results = [{"role": "tool", "tool_call_id": c["id"], "content": "{}"} for c in assistant["tool_calls"]]
    second = to_gemini_request({**first, "messages": [user("go"), assistant, *results]})
    model_turn, answers = second["contents"][1], second["contents"][2]
    assert [(p["functionCall"]["name"], p["functionCall"]["args"]) for p in model_turn["parts"]] == calls
    assert [p["functionResponse"]["name"] for p in answers["parts"]] == [n for n, _ in calls]
