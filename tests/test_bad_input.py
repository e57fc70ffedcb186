"""Bad input never gets a 5xx: one JSON policy on every route, each refusal a 400 naming the field.

The policy (services/common/http.loads_json): UTF-8 only (a leading UTF-8 BOM is ignored, UTF-16/32
refused), no NaN/Infinity or numbers beyond the float range, integers within 64 bits, no lone
UTF-16 surrogates. Found by fuzzing: these reached SQLite, ClickHouse or orjson and answered 500
(or a misleading 503) on eight routes.
"""

from __future__ import annotations

import grpc
import httpx
import orjson
import pytest
from fastapi import FastAPI
from sqlalchemy.exc import DBAPIError

from services.common.errors import APIError, install_error_handlers
from services.common.grpc.distillery.v1 import inference_pb2
from services.common.http import loads_json
from tests.conftest import Project, RunningPlatform
from tests.helpers import Stub, assert_error, auth, trailing, wait_for_job

BIG = "10000000000000000000000"  # 10^22
NEGATIVE = "-18446744073709551616"  # -2^64
SURROGATE = '"a\\ud800b"'
BAD_VALUES = {
    "10^22": (BIG, "64-bit"),
    "-2^64": (NEGATIVE, "64-bit"),
    "lone surrogate": (SURROGATE, "surrogate"),
    "NaN": ("NaN", "not finite"),
    "Infinity": ("-Infinity", "not finite"),
    "1e400": ("1e400", "not finite"),
}
ENTRY = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


def json_client(project: Project) -> httpx.AsyncClient:
    client = project.client()
    client.headers["content-type"] = "application/json"
    return client


@pytest.fixture
async def ids(project: Project) -> dict[str, str]:
    async with project.client() as client:
        dataset = (await client.post("/datasets", json={"name": "bad input"})).json()["id"]
        added = await client.post(f"/datasets/{dataset}/entries", json={"entries": [ENTRY]})
        assert added.status_code == 200, added.text
        entry = (await client.get(f"/datasets/{dataset}/entries")).json()["data"][0]["id"]
        provider = await client.post(
            "/external-providers",
            json={"slug": "bad-input", "type": "openai", "baseUrl": "http://127.0.0.1:9/v1"},
        )
        assert provider.status_code == 201, provider.text
    return {"dataset": dataset, "entry": entry, "provider": provider.json()["id"]}


# (method, path, body with {v} where the bad value goes, the field the 400 must name)
CASES = [
    (
        "POST",
        "/datasets/{dataset}/entries",
        '{"entries": [{"messages": [{"role": "user", "content": {v}},'
        ' {"role": "assistant", "content": "x"}]}]}',
        "entries.0.messages.0.content",
    ),
    (
        "POST",
        "/datasets/{dataset}/entries",
        '{"entries": [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],'
        ' "tools": [{"type": "function", "function": {"name": "f", "parameters": {"maximum": {v}}}}]}]}',
        "entries.0.tools.0.function.parameters.maximum",
    ),
    (
        "PATCH",
        "/datasets/{dataset}/entries/{entry}",
        '{"output": {"role": "assistant", "content": {v}}}',
        "output.content",
    ),
    (
        "POST",
        "/external-providers",
        '{"slug": "p", "type": "openai", "baseUrl": "http://x",'
        ' "models": [{"slug": "m", "contextWindow": {v}}]}',
        "models.0.contextWindow",
    ),
    (
        "PATCH",
        "/external-providers/{provider}",
        '{"models": [{"slug": "m", "contextWindow": {v}}]}',
        "models.0.contextWindow",
    ),
    (
        "POST",
        "/datasets/{dataset}/import-logs",
        '{"filters": {"requestedAfter": {v}}}',
        "filters.requestedAfter",
    ),
    ("POST", "/datasets/{dataset}/import-logs", '{"filters": {"model": {v}}}', "filters.model"),
    (
        "POST",
        "/logs/update-metadata",
        '{"filters": [{"field": "model", "equals": {v}}], "metadata": {"k": "v"}}',
        "filters.0.equals",
    ),
    (
        "POST",
        "/logs/update-tags",
        '{"filters": [{"field": "model", "equals": "m"}], "tags": {"k": {v}}}',
        "tags.k",
    ),
    (
        "POST",
        "/datasets/{dataset}/relabel",
        '{"model": "gpt-4o-mini", "filters": {"entryIds": [{v}]}}',
        "filters.entryIds.0",
    ),
    ("POST", "/datasets/{dataset}/entries/delete", '{"ids": [{v}]}', "ids.0"),
    ("POST", "/datasets", '{"name": {v}}', "name"),
    ("PATCH", "/datasets/{dataset}", '{"name": {v}}', "name"),
    ("POST", "/datasets/{dataset}/pruning-rules", '{"text": "t", "position": {v}}', "position"),
    (
        "PUT",
        "/deployments/bad-input",
        '{"baseUrl": "http://x/v1", "model": "m", "defaultTemperature": {v}}',
        "defaultTemperature",
    ),
    ("PUT", "/provider-keys", '{"openai": {v}}', "openai"),
    (
        "POST",
        "/report",
        '{"requestedAt": 1, "receivedAt": 2, "statusCode": 200, "reqPayload": {"messages": [{v}]}}',
        "reqPayload.messages.0",
    ),
    (
        "POST",
        "/report-anthropic",
        '{"requestedAt": 1, "receivedAt": 2, "statusCode": 200,'
        ' "respPayload": {"usage": {"input_tokens": {v}}}}',
        "respPayload.usage.input_tokens",
    ),
    (
        "POST",
        "/chat/completions",
        '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "seed": {v}}',
        "seed",
    ),
    ("POST", "/check-cache", '{"reqPayload": {"model": {v}}}', "reqPayload.model"),
]


async def test_unrepresentable_values_are_a_400_naming_the_field_on_every_route(
    project: Project, ids: dict[str, str]
) -> None:
    failures = []
    async with json_client(project) as client:
        for method, path, template, field in CASES:
            for label, (value, reason) in BAD_VALUES.items():
                response = await client.request(
                    method, path.format(**ids), content=template.replace("{v}", value).encode()
                )
                body = response.json()
                error = body.get("error") or {}
                named = (response.status_code, error.get("param")) == (400, field)
                if not named or reason not in body["message"]:
                    failures.append(f"{method} {path} {label}: {response.status_code} {body}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/datasets", {"name": "encoded"}),
        ("POST", "/report", {"requestedAt": 1, "receivedAt": 2, "statusCode": 200}),
        ("POST", "/chat/completions", {"model": "", "messages": []}),
        ("POST", "/logs/update-metadata", {"filters": [], "metadata": {}}),
        ("PUT", "/provider-keys", {}),
    ],
)
async def test_utf16_is_refused_and_a_utf8_bom_ignored_on_every_kind_of_route(
    project: Project, method: str, path: str, body: dict
) -> None:
    """The framework routes, the framework-free fast paths and the views that read raw bodies agree."""
    text = orjson.dumps(body).decode()
    async with json_client(project) as client:
        for encoding in ("utf-16", "utf-16-le", "utf-32"):
            response = await client.request(method, path, content=text.encode(encoding))
            assert_error(response, 400, "UTF-8")
            assert response.json()["error"]["param"] == "body"
        plain = await client.request(method, path, content=text.encode())
        with_bom = await client.request(method, path, content=b"\xef\xbb\xbf" + text.encode())
    assert plain.status_code < 500 and with_bom.status_code == plain.status_code, with_bom.text
    if plain.status_code >= 400:
        assert with_bom.json()["error"]["param"] == plain.json()["error"]["param"]


async def test_malformed_and_non_object_bodies(project: Project, ids: dict[str, str]) -> None:
    async with json_client(project) as client:
        for path in ("/datasets", "/report", "/chat/completions", f"/datasets/{ids['dataset']}/entries"):
            for raw in (b'{"name": ', b"\xff\xfe\xfd", b"[" * 5000, b'{"a": 1}}'):
                response = await client.post(path, content=raw)
                assert_error(response, 400)
            assert (await client.post(path, content=b"[1, 2]")).status_code == 400
            assert (await client.post(path, content=b'"text"')).status_code == 400


async def test_integers_at_the_64_bit_edges(project: Project, ids: dict[str, str]) -> None:
    """The largest values the policy allows reach the schemas, which bound them; none is a 5xx."""
    provider = (
        '{"slug": "edge", "type": "openai", "baseUrl": "http://x",'
        ' "models": [{"slug": "m", "contextWindow": %s}]}'
    )
    async with json_client(project) as client:
        for value in ("18446744073709551615", "9223372036854775808", "2147483648", "-9223372036854775808"):
            response = await client.post("/external-providers", content=(provider % value).encode())
            assert_error(response, 400)
            assert response.json()["error"]["param"] == "models.0.contextWindow"
        ok = await client.post("/external-providers", content=(provider % "2147483647").encode())
        assert ok.status_code == 201, ok.text
        row = {**ENTRY, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"max": 0}}}]}
        row["tools"][0]["function"]["parameters"]["max"] = 2**64 - 1
        added = await client.post(f"/datasets/{ids['dataset']}/entries", json={"entries": [row]})
        assert added.status_code == 200 and added.json()["entries_created"] == 1, added.text
        imported = await client.post(
            f"/datasets/{ids['dataset']}/import-logs", json={"filters": {"requestedAfter": 2**63}}
        )
        assert_error(imported, 400)
        assert imported.json()["error"]["param"] == "filters.requestedAfter"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"requestedAfter": BIG}, "requestedAfter"),
        ({"requestedBefore": "-1"}, "requestedBefore"),
        ({"limit": "²"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": BIG}, "limit"),
    ],
)
async def test_log_search_query_bounds(project: Project, query: dict, param: str) -> None:
    async with project.client() as client:
        for path in ("/logs", "/logs/count"):
            if param == "limit" and path == "/logs/count":
                continue
            response = await client.get(path, params=query)
            assert_error(response, 400, param)
            assert response.json()["error"]["param"] == param


async def test_entry_list_limit_with_non_ascii_digits(project: Project, ids: dict[str, str]) -> None:
    async with project.client() as client:
        response = await client.get(f"/datasets/{ids['dataset']}/entries", params={"limit": "١٢"})
    assert_error(response, 400, "limit")


async def test_upload_lines_follow_the_same_policy(project: Project, ids: dict[str, str]) -> None:
    good = orjson.dumps(ENTRY)
    lines = [
        good,
        b'{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "n": '
        + BIG.encode()
        + b"}",
        b'{"messages": [{"role": "user", "content": NaN}, {"role": "assistant", "content": "x"}]}',
    ]
    async with project.client() as client:
        response = await client.post(
            f"/datasets/{ids['dataset']}/files",
            files={"file": ("bad.jsonl", b"\n".join(lines) + b"\n", "application/jsonl")},
        )
        assert response.status_code == 202, response.text
        job = await wait_for_job(client, ids["dataset"], response.json()["id"])
    messages = {e["line"]: e["message"] for e in job["errors"]}
    assert set(messages) == {2, 3, 4}, job
    assert "messages.0.content" in messages[2] and "surrogate" in messages[2]
    assert "n:" in messages[3] and "64-bit" in messages[3]
    assert "not finite" in messages[4]


async def test_another_projects_key_and_missing_key_on_the_json_routes(project: Project) -> None:
    """The JSON policy runs before auth on framework routes: a bad body without a key is still a 4xx."""
    async with httpx.AsyncClient(base_url=project.base_url) as anonymous:
        for path in ("/datasets", "/report", "/chat/completions"):
            response = await anonymous.post(path, content=b'{"x": NaN}')
            assert 400 <= response.status_code < 500, response.text


async def test_grpc_request_json_follows_the_same_policy(running: RunningPlatform, project: Project) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.settings.grpc_port}")
    stub = Stub(channel)
    template = '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "seed": {v}}'
    for value, reason in BAD_VALUES.values():
        body = template.replace("{v}", value)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Complete(
                inference_pb2.CompletionRequest(request_json=body), metadata=auth(project.key)
            )
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in failed.value.details()
        assert trailing(failed.value)["error-param"] == "request_json.seed"
    await channel.close()


async def test_a_value_postgres_cannot_store_is_a_400_not_a_500() -> None:
    """asyncpg refuses a NUL character in text with SQLSTATE 22021 (a data exception)."""

    class Refused(Exception):
        sqlstate = "22021"

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/datasets/{dataset_id}")
    async def lookup(dataset_id: str) -> dict:
        raise DBAPIError("SELECT ...", {"id": dataset_id}, Refused("invalid byte sequence"))

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert_error(await client.get("/datasets/a%00b"), 400, "NUL")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a": 18446744073709551615}', {"a": 2**64 - 1}),
        (b'{"a": -9223372036854775808}', {"a": -(2**63)}),
        (b'{"a": 1234567890123456789, "b": 0.5}', {"a": 1234567890123456789, "b": 0.5}),
        (b'{"id": "123456789012345678901234567890"}', {"id": "123456789012345678901234567890"}),
        (b'\xef\xbb\xbf[1, "\\ud83d\\ude00"]', [1, "\U0001f600"]),
    ],
)
def test_loads_json_keeps_every_value_exactly(body: bytes, expected: object) -> None:
    """Both parsing paths (orjson for most bodies, the checked one for long digit runs) give the
    same values: 64-bit edge integers stay integers, never floats."""
    value = loads_json(body)
    assert value == expected
    assert orjson.dumps(value) == orjson.dumps(expected)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"a": [1, {"b": 18446744073709551616}]}', "a.1.b"),
        (b'{"a": -9223372036854775809}', "a"),
        (b'{"a": 100000000000000000000000}', "a"),
        (b'{"a": 1e400}', "a"),
        (b'{"a": NaN}', "a"),
        (b'{"a": "x\\ud800y"}', "a"),
    ],
)
def test_loads_json_refuses_what_the_policy_forbids_naming_the_field(body: bytes, param: str) -> None:
    with pytest.raises(APIError) as refused:
        loads_json(body)
    assert refused.value.status_code == 400 and refused.value.param == param
