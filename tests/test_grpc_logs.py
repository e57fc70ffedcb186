"""gRPC LogQuery: committed stubs are current; search and count a project's logs, and only its own."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import orjson
import pytest

from services.common.auth import KeyRing, hash_api_key
from services.common.clickhouse import ClickHouse
from services.common.grpc import generate as stubs
from services.common.grpc.distillery.v1 import logs_pb2, logs_pb2_grpc
from services.common.kafka import free_port
from services.ingest import log_query
from tests.conftest import Project, RunningPlatform, wait_for_count


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    stubs.generate(tmp_path)
    fresh_root, committed_root = tmp_path / "distillery", stubs.DEFAULT_OUT / "distillery"

    def files(root: Path) -> set[Path]:
        return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    fresh = files(fresh_root)
    assert fresh == files(committed_root), "stub files differ: run `make protos` and commit"
    for name in sorted(fresh):
        assert (fresh_root / name).read_bytes() == (committed_root / name).read_bytes(), (
            f"{name} is stale: run `make protos` and commit"
        )


def openai_report(
    *, content: str, completion_id: str, model: str = "gpt-4o-mini", prompt_id: str = "x", requested_at: int
) -> dict:
    request = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "metadata": {"prompt_id": prompt_id},
    }
    response = {
        "id": completion_id,
        "object": "chat.completion",
        "created": requested_at // 1000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"re: {content}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }
    return {
        "requestedAt": requested_at,
        "receivedAt": requested_at + 250,
        "reqPayload": request,
        "respPayload": response,
        "statusCode": 200,
    }


def anthropic_report(*, requested_at: int) -> dict:
    return {
        "requestedAt": requested_at,
        "receivedAt": requested_at + 300,
        "reqPayload": {
            "model": "claude-3-5-sonnet-20241022",
            "max_tokens": 50,
            "system": "Be terse.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}],
        },
        "respPayload": {
            "id": "msg_grpc",
            "type": "message",
            "role": "assistant",
            "model": "claude-3-5-sonnet-20241022",
            "content": [{"type": "text", "text": "Hi."}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 9, "output_tokens": 2},
        },
        "statusCode": 200,
        "metadata": {"prompt_id": "greet"},
    }


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def stub(running: RunningPlatform) -> AsyncIterator[logs_pb2_grpc.LogQueryStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.settings.grpc_port}") as channel:
        yield logs_pb2_grpc.LogQueryStub(channel)


async def search(stub: logs_pb2_grpc.LogQueryStub, key: str, **request: object) -> list[logs_pb2.RequestLog]:
    return [log async for log in stub.Search(logs_pb2.SearchLogsRequest(**request), metadata=auth(key))]


async def count(stub: logs_pb2_grpc.LogQueryStub, key: str, **filters: object) -> int:
    request = logs_pb2.CountLogsRequest(filters=logs_pb2.LogFilters(**filters))
    return (await stub.Count(request, metadata=auth(key))).count


@pytest.fixture
async def reported(project: Project) -> Project:
    """Four OpenAI logs (three ``prompt_id=x`` on gpt-4o-mini, one other) and one Anthropic log."""
    base = int(time.time() * 1000) - 60_000
    bodies = [
        openai_report(content=f"question {i}", completion_id=f"chatcmpl-grpc-{i}", requested_at=base + i)
        for i in range(3)
    ]
    bodies.append(
        openai_report(
            content="other",
            completion_id="chatcmpl-grpc-other",
            model="gpt-4o",
            prompt_id="y",
            requested_at=base + 3,
        )
    )
    async with project.client() as client:
        for body in bodies:
            assert (await client.post("/report", json=body)).status_code == 200
        response = await client.post("/report-anthropic", json=anthropic_report(requested_at=base + 4))
        assert response.status_code == 200, response.text
        await wait_for_count(client, 5)
    return project


async def test_search_streams_matching_logs_with_every_field(
    stub: logs_pb2_grpc.LogQueryStub, reported: Project
) -> None:
    filters = logs_pb2.LogFilters(model="gpt-4o-mini", metadata={"prompt_id": "x"})
    logs = await search(stub, reported.key, filters=filters)
    assert [log.completion_id for log in logs] == [f"chatcmpl-grpc-{i}" for i in (2, 1, 0)]  # newest first
    log = logs[-1]
    assert log.model == "gpt-4o-mini" and log.provider == "openai" and log.status == "success"
    assert log.HasField("status_code") and log.status_code == 200
    assert log.latency_ms == 250 and log.received_at_ms - log.requested_at_ms == 250
    assert log.finish_reason == "stop" and log.error_message == ""
    assert (log.prompt_tokens, log.completion_tokens) == (12, 5)
    assert log.HasField("cost_usd") and log.cost_usd > 0
    assert not log.cache_hit
    assert dict(log.metadata) == {"prompt_id": "x"}
    request = orjson.loads(log.req_payload_json)
    assert request["messages"] == [{"role": "user", "content": "question 0"}]
    assert orjson.loads(log.resp_payload_json)["id"] == "chatcmpl-grpc-0"
    # OpenAI logs are already in OpenAI shape: the normalized payloads are the raw ones
    assert log.openai_request_json == log.req_payload_json
    assert log.openai_response_json == log.resp_payload_json
    assert await count(stub, reported.key, model="gpt-4o-mini", metadata={"prompt_id": "x"}) == 3
    assert await count(stub, reported.key) == 5
    assert await count(stub, reported.key, status="error") == 0


async def test_anthropic_logs_carry_openai_shaped_payloads(
    stub: logs_pb2_grpc.LogQueryStub, reported: Project
) -> None:
    [log] = await search(stub, reported.key, filters=logs_pb2.LogFilters(metadata={"prompt_id": "greet"}))
    assert log.provider == "anthropic" and log.completion_id == "msg_grpc"
    assert orjson.loads(log.req_payload_json)["system"] == "Be terse."  # raw, as reported
    request = orjson.loads(log.openai_request_json)
    assert request["messages"][0] == {"role": "system", "content": "Be terse."}
    assert request["messages"][1] == {"role": "user", "content": "Hi?"}
    response = orjson.loads(log.openai_response_json)
    assert response["choices"][0]["message"]["content"] == "Hi."


async def test_limit_and_before_id_page_through_results(
    stub: logs_pb2_grpc.LogQueryStub, reported: Project
) -> None:
    everything = await search(stub, reported.key)
    assert len(everything) == 5
    first = await search(stub, reported.key, limit=2)
    assert [log.id for log in first] == [log.id for log in everything[:2]]
    rest = await search(stub, reported.key, before_id=first[-1].id)
    assert [log.id for log in rest] == [log.id for log in everything[2:]]
    filtered = await search(stub, reported.key, limit=1, filters=logs_pb2.LogFilters(model="gpt-4o"))
    assert [log.completion_id for log in filtered] == ["chatcmpl-grpc-other"]


async def test_fields_sets_only_the_named_fields(stub: logs_pb2_grpc.LogQueryStub, reported: Project) -> None:
    everything = await search(stub, reported.key)
    wanted = ["status", "metadata", "openai_request_json"]
    masked = await search(stub, reported.key, fields=wanted)
    assert [log.id for log in masked] == [log.id for log in everything]  # id comes always
    for full, log in zip(everything, masked, strict=True):
        assert (log.status, dict(log.metadata)) == (full.status, dict(full.metadata))
        assert log.openai_request_json == full.openai_request_json
        assert log.model == "" and log.openai_response_json == "" and log.req_payload_json == ""
        assert not log.HasField("status_code")
    # a mask does not break paging: the cursor is the id
    first = await search(stub, reported.key, limit=2, fields=["model"])
    rest = await search(stub, reported.key, before_id=first[-1].id, fields=["model"])
    assert [log.model for log in first + rest] == [log.model for log in everything]
    request = logs_pb2.SearchLogsRequest(fields=["status"], batch_size=2)
    batches = [batch async for batch in stub.SearchBatches(request, metadata=auth(reported.key))]
    assert [len(batch.logs) for batch in batches] == [2, 2, 1]
    assert {log.status for batch in batches for log in batch.logs} == {"success"}
    assert all(log.openai_request_json == "" for batch in batches for log in batch.logs)


async def test_unknown_field_is_invalid_argument(stub: logs_pb2_grpc.LogQueryStub, project: Project) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await search(stub, project.key, fields=["status", "password"])
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fields" in (failed.value.details() or "") and "password" in (failed.value.details() or "")
    request = logs_pb2.SearchLogsRequest(fields=["password"])
    with pytest.raises(grpc.aio.AioRpcError) as batched:
        [batch async for batch in stub.SearchBatches(request, metadata=auth(project.key))]
    assert batched.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_batches_end_at_their_size_or_once_their_payloads_are_large() -> None:
    names = ("id", "status", "openai_request_json")
    small = [(f"log{i}", "success", "x" * 10) for i in range(5)]
    assert [len(b.logs) for b in log_query.batches_of(small, names, 2)] == [2, 2, 1]
    half = log_query.BATCH_PAYLOAD_BYTES // 2
    large = [("a", "success", "x" * half), ("b", "success", "x" * half), ("c", "success", "x")]
    batches = log_query.batches_of(large, names, 10)
    assert [[log.id for log in b.logs] for b in batches] == [["a", "b"], ["c"]]
    alone = [("big", "success", "x" * (log_query.BATCH_PAYLOAD_BYTES + 1)), ("next", "success", "")]
    assert [[log.id for log in b.logs] for b in log_query.batches_of(alone, names, 10)] == [["big"], ["next"]]
    assert log_query.batches_of([], names, 10) == []


async def test_another_projects_key_sees_nothing(
    stub: logs_pb2_grpc.LogQueryStub, reported: Project, make_project: Callable[[], Awaitable[Project]]
) -> None:
    stranger = await make_project()
    assert await count(stub, stranger.key) == 0
    assert await count(stub, stranger.key, model="gpt-4o-mini", metadata={"prompt_id": "x"}) == 0
    assert await search(stub, stranger.key) == []
    by_id = logs_pb2.LogFilters(completion_id="chatcmpl-grpc-0")
    assert await search(stub, stranger.key, filters=by_id) == []


async def test_missing_or_wrong_key_is_unauthenticated(stub: logs_pb2_grpc.LogQueryStub) -> None:
    request = logs_pb2.CountLogsRequest()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Count(request)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED

    wrong_key = "opk_definitely_not_a_real_key_123"
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await stub.Count(request, metadata=auth(wrong_key))
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong_key not in (wrong.value.details() or "")
    assert wrong_key not in str(wrong.value)

    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        await search(stub, wrong_key)
    assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert wrong_key not in (streamed.value.details() or "")


async def test_invalid_status_is_invalid_argument(stub: logs_pb2_grpc.LogQueryStub, project: Project) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as counted:
        await count(stub, project.key, status="done")
    assert counted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "status" in (counted.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as searched:
        await search(stub, project.key, filters=logs_pb2.LogFilters(status="done"))
    assert searched.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_log_store_failure_is_unavailable() -> None:
    """A ClickHouse nobody listens on: every call fails UNAVAILABLE, not UNKNOWN."""
    key, keyring = "opk_unavailable_test_key", KeyRing()
    keyring.add(hash_api_key(key), "project-unavailable")
    clickhouse = ClickHouse(f"http://127.0.0.1:{free_port()}")
    server = grpc.aio.server()
    log_query.add_to_server(server, clickhouse=clickhouse, keyring=keyring)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = logs_pb2_grpc.LogQueryStub(channel)
            for call in (count, search):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await call(stub, key)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            batches = stub.SearchBatches(
                logs_pb2.SearchLogsRequest(), metadata=(("authorization", f"Bearer {key}"),)
            )
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                [batch async for batch in batches]
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace=None)
        clickhouse.close()
