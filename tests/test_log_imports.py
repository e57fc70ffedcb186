"""Importing request logs into a dataset: ``POST /datasets/{id}/import-logs`` through ingest's gRPC LogQuery.

Logs are reported over HTTP exactly as clients do; the api reads them back from ingest as an
internal caller (``x-distillery-internal-token`` + ``x-distillery-project``) and turns every
successful call into an entry.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, timedelta

import grpc
import orjson
import pytest
from sqlalchemy import select, text

from services.api.datasets import jobs
from services.api.datasets.models import Dataset, DatasetEntry, DatasetJob
from services.api.log_imports import service as imports
from services.api.log_imports.client import LogImporter
from services.api.log_imports.convert import convert_batch
from services.api.projects.models import Project as ProjectRow
from services.common.clock import now
from services.common.db import make_engine, make_sessionmaker, migrate
from services.common.grpc.distillery.v1 import logs_pb2, logs_pb2_grpc
from services.common.ids import new_id
from services.common.secrets import internal_token
from tests.conftest import Project, RunningPlatform, wait_for_count, wait_until

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TERMINAL = ("succeeded", "partial", "failed")


# --- reporting logs ------------------------------------------------------------------------------


def openai_report(
    *,
    question: str,
    answer: str = "ok",
    model: str = "gpt-4o-mini",
    metadata: dict | None = None,
    requested_at: int,
    status: int = 200,
) -> dict:
    request = {
        "model": model,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": question}],
        "metadata": metadata or {},
    }
    response = {
        "id": f"chatcmpl-{question}",
        "object": "chat.completion",
        "created": requested_at // 1000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer, "refusal": None},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
    }
    body = {
        "requestedAt": requested_at,
        "receivedAt": requested_at + 100,
        "reqPayload": request,
        "respPayload": response,
        "statusCode": status,
    }
    if status != 200:
        body["respPayload"] = {"error": {"message": "upstream exploded", "type": "server_error"}}
        body["errorMessage"] = "upstream exploded"
    return body


def tool_call_report(*, requested_at: int) -> dict:
    request = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Weather in Hobart?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "auto",
        "response_format": {"type": "text"},
        "metadata": {"prompt_id": "weather", "n": 3},
    }
    response = {
        "id": "chatcmpl-weather",
        "object": "chat.completion",
        "created": requested_at // 1000,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Hobart"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
    }
    return {
        "requestedAt": requested_at,
        "receivedAt": requested_at + 300,
        "reqPayload": request,
        "respPayload": response,
        "statusCode": 200,
        "tags": {"team": "ops"},
    }


def anthropic_tool_report(*, requested_at: int) -> dict:
    return {
        "requestedAt": requested_at,
        "receivedAt": requested_at + 400,
        "reqPayload": {
            "model": "claude-3-5-sonnet-20241022",
            "max_tokens": 100,
            "system": "Use tools.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Perth?"}]}],
            "tools": [
                {
                    "name": "get_weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                }
            ],
        },
        "respPayload": {
            "id": "msg_import",
            "type": "message",
            "role": "assistant",
            "model": "claude-3-5-sonnet-20241022",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Perth"}},
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 40, "output_tokens": 12},
        },
        "statusCode": 200,
        "metadata": {"prompt_id": "weather-anthropic"},
    }


async def report(project: Project, *bodies: dict) -> None:
    """Report in this order (log ids are time-ordered: later reports list first)."""
    async with project.client() as client:
        before = (await client.get("/logs/count")).json()["count"]
        for body in bodies:
            route = "/report-anthropic" if body["reqPayload"].get("max_tokens") else "/report"
            response = await client.post(route, json=body)
            assert response.status_code == 200, response.text
            await asyncio.sleep(0.003)  # distinct milliseconds: a deterministic newest-first order
        await wait_for_count(client, before + len(bodies))


async def log_ids(project: Project, **params: str) -> dict[str, str]:
    """completionId → log id (errors have no completion id: keyed by their first user message)."""
    async with project.client() as client:
        logs = (await client.get("/logs", params={"limit": 100, **params})).json()["data"]
    return {log["completionId"] or log["reqPayload"]["messages"][-1]["content"]: log["id"] for log in logs}


# --- datasets and jobs ---------------------------------------------------------------------------


@pytest.fixture
def make_dataset(running: RunningPlatform) -> Callable[[Project], Awaitable[str]]:
    async def make(project: Project) -> str:
        async with running.platform.state["sessions"].begin() as session:
            moment = now()
            dataset = Dataset(
                id=new_id("ds"), project_id=project.id, name="imports", created_at=moment, updated_at=moment
            )
            session.add(dataset)
        return dataset.id

    return make


async def start_import(project: Project, dataset_id: str, body: dict) -> dict:
    async with project.client() as client:
        response = await client.post(f"/datasets/{dataset_id}/import-logs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["object"] == "dataset.job" and job["kind"] == "import_logs"
    assert job["status"] in ("queued", "running", *TERMINAL)
    return job


async def job_row(running: RunningPlatform, project: Project, dataset_id: str, job_id: str) -> DatasetJob:
    async with running.platform.state["sessions"]() as session:
        return await jobs.get_job(
            session=session, project_id=project.id, dataset_id=dataset_id, job_id=job_id
        )


async def finished(running: RunningPlatform, project: Project, dataset_id: str, job_id: str) -> DatasetJob:
    async def done() -> bool:
        return (await job_row(running, project, dataset_id, job_id)).status in TERMINAL

    await wait_until(done, timeout=30, what=f"import job {job_id}")
    return await job_row(running, project, dataset_id, job_id)


async def import_logs(running: RunningPlatform, project: Project, dataset_id: str, body: dict) -> DatasetJob:
    job = await start_import(project, dataset_id, body)
    return await finished(running, project, dataset_id, job["id"])


async def entries(running: RunningPlatform, dataset_id: str) -> list[DatasetEntry]:
    async with running.platform.state["sessions"]() as session:
        query = select(DatasetEntry).where(DatasetEntry.dataset_id == dataset_id)
        return list(await session.scalars(query))


# --- a project with varied logs ------------------------------------------------------------------


@pytest.fixture
async def logged(project: Project) -> tuple[Project, int]:
    """Two plain OpenAI calls, a tool call, an Anthropic tool call, and one failed call (newest)."""
    base = int(time.time() * 1000) - 100_000
    await report(
        project,
        openai_report(question="q1", answer="a1", metadata={"prompt_id": "faq"}, requested_at=base + 1),
        openai_report(question="q2", answer="a2", model="gpt-4o", requested_at=base + 2),
        tool_call_report(requested_at=base + 3),
        anthropic_tool_report(requested_at=base + 4),
        openai_report(question="boom", status=500, requested_at=base + 5),
    )
    return project, base


async def test_import_turns_successful_logs_into_entries(
    running: RunningPlatform, logged: tuple[Project, int], make_dataset
) -> None:
    project, _ = logged
    dataset_id = await make_dataset(project)
    ids = await log_ids(project)
    job = await import_logs(running, project, dataset_id, {"filters": {}})
    assert job.status == "succeeded", job.errors
    assert job.kind == "import_logs"
    assert (job.progress_done, job.progress_total) == (5, 5)
    assert job.result == {
        "logs_read": 5,
        "entries_created": 4,
        "skipped_duplicates": 0,
        "skipped_failed": 1,
        "skipped_invalid": 0,
    }
    by_log = {e.source_log_id: e for e in await entries(running, dataset_id)}
    assert set(by_log) == {ids["chatcmpl-q1"], ids["chatcmpl-q2"], ids["chatcmpl-weather"], ids["msg_import"]}
    assert ids["boom"] not in by_log  # the failed call is skipped

    plain = by_log[ids["chatcmpl-q1"]]
    assert plain.messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "q1"},
    ]
    assert plain.output == {"role": "assistant", "content": "a1"}  # response-only fields dropped
    assert plain.entry_metadata == {"prompt_id": "faq"}
    assert plain.tools is None and plain.tool_choice is None and plain.response_format is None
    assert (plain.source, plain.provenance, plain.revision) == ("request_log", "request_log", 1)
    assert plain.split in ("TRAIN", "TEST") and plain.prompt_tokens > 0 and plain.output_tokens > 0

    tool = by_log[ids["chatcmpl-weather"]]
    assert tool.messages == [{"role": "user", "content": "Weather in Hobart?"}]
    assert tool.output == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Hobart"}'},
            }
        ],
    }
    assert tool.tools == [WEATHER_TOOL] and tool.tool_choice == "auto"
    assert tool.response_format == {"type": "text"}
    assert tool.entry_metadata == {"prompt_id": "weather", "n": "3", "team": "ops"}  # metadata + tags

    claude = by_log[ids["msg_import"]]  # stored normalized to the OpenAI shape
    assert claude.messages == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Perth?"},
    ]
    assert claude.output["role"] == "assistant" and claude.output["content"] == "Checking."
    [call] = claude.output["tool_calls"]
    assert call["id"] == "toolu_1" and call["function"]["name"] == "get_weather"
    assert call["function"]["arguments"] == '{"city": "Perth"}' or call["function"]["arguments"] == (
        '{"city":"Perth"}'
    )
    assert claude.tools and claude.tools[0]["function"]["name"] == "get_weather"
    assert claude.entry_metadata == {"prompt_id": "weather-anthropic"}

    # rows go in through the driver directly: stored exactly as SQLAlchemy stores them
    async with running.platform.state["sessions"]() as session:
        query = text("SELECT created_at, tools FROM dataset_entries WHERE id = :id")
        raw = (await session.execute(query, {"id": plain.id})).one()
    if running.settings.resolved_database_url().startswith("sqlite"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}", raw.created_at), raw.created_at
        assert raw.tools == "null"  # JSON null, as the JSON type stores None


async def test_reimport_skips_logs_already_in_the_dataset(
    running: RunningPlatform, logged: tuple[Project, int], make_dataset
) -> None:
    project, _ = logged
    dataset_id = await make_dataset(project)
    first = await import_logs(running, project, dataset_id, {"filters": {"model": "gpt-4o-mini"}})
    assert first.result["entries_created"] == 1
    everything = await import_logs(running, project, dataset_id, {})
    assert everything.status == "succeeded"
    assert everything.result == {
        "logs_read": 5,
        "entries_created": 3,
        "skipped_duplicates": 1,
        "skipped_failed": 1,
        "skipped_invalid": 0,
    }
    again = await import_logs(running, project, dataset_id, {})
    assert again.status == "succeeded"
    assert again.result["entries_created"] == 0 and again.result["skipped_duplicates"] == 4
    rows = await entries(running, dataset_id)
    assert len(rows) == 4 and len({e.source_log_id for e in rows}) == 4


async def test_filters_select_the_logs_to_import(
    running: RunningPlatform, logged: tuple[Project, int], make_dataset
) -> None:
    project, base = logged
    ids = await log_ids(project)

    async def imported(body: dict) -> set[str]:
        dataset_id = await make_dataset(project)
        job = await import_logs(running, project, dataset_id, body)
        assert job.status == "succeeded", job.errors
        return {e.source_log_id for e in await entries(running, dataset_id)}

    q1, q2, weather, claude = (
        ids[k] for k in ("chatcmpl-q1", "chatcmpl-q2", "chatcmpl-weather", "msg_import")
    )
    assert await imported({"filters": {"model": "gpt-4o"}}) == {q2, weather}
    assert await imported({"filters": {"metadata": {"prompt_id": "faq"}}}) == {q1}
    assert await imported({"filters": {"completionId": "chatcmpl-q2"}}) == {q2}
    assert await imported({"filters": {"requestContains": "WEATHER IN"}}) == {weather, claude}
    assert await imported({"filters": {"responseNotContains": "get_weather"}}) == {q1, q2}
    assert await imported({"filters": {"requestedAfter": base + 2, "requestedBefore": base + 4}}) == {
        q2,
        weather,
    }
    assert await imported({"filters": {"status": "error"}}) == set()
    # newest first: the failed call and the Anthropic one are the two newest
    assert await imported({"limit": 2}) == {claude}


async def test_progress_is_committed_transaction_by_transaction(
    running: RunningPlatform, logged: tuple[Project, int], make_dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two logs per stream message, a transaction once two rows are pending; converted inline."""
    project, _ = logged
    dataset_id = await make_dataset(project)
    monkeypatch.setattr(imports, "SEARCH_BATCH_LOGS", 2)
    monkeypatch.setattr(imports, "ROWS_PER_TRANSACTION", 2)
    seen: list[tuple[int, int | None, int]] = []
    write_batch = imports._write_batch

    async def recording(**kwargs) -> None:
        await write_batch(**kwargs)
        job = await job_row(running, project, dataset_id, kwargs["job_id"])
        seen.append((job.progress_done, job.progress_total, len(await entries(running, dataset_id))))

    monkeypatch.setattr(imports, "_write_batch", recording)
    state = running.platform.app.state
    importer = state.log_importer
    state.log_importer = LogImporter(importer.address, importer.token, workers=0)
    try:
        job = await import_logs(running, project, dataset_id, {})
    finally:
        state.log_importer = importer
    assert job.status == "succeeded"
    # newest first: [failed call, Anthropic] holds 1 row, + [tool call, q2] = 3: committed; then q1
    assert seen == [(4, 5, 3), (5, 5, 4)]


async def test_logs_that_cannot_become_entries_are_reported(
    running: RunningPlatform, project: Project, make_dataset
) -> None:
    base = int(time.time() * 1000) - 50_000
    no_choices = openai_report(question="empty", requested_at=base)
    no_choices["respPayload"] = {"id": "chatcmpl-empty", "object": "chat.completion", "choices": []}
    await report(project, no_choices, openai_report(question="fine", requested_at=base + 1))
    dataset_id = await make_dataset(project)
    job = await import_logs(running, project, dataset_id, {})
    assert job.status == "partial"
    assert job.result["entries_created"] == 1 and job.result["skipped_invalid"] == 1
    [problem] = job.errors
    assert problem["message"] == "the logged response has no choices[0].message" and problem["log_id"]


async def test_another_projects_logs_are_never_imported(
    running: RunningPlatform,
    logged: tuple[Project, int],
    make_project: Callable[[], Awaitable[Project]],
    make_dataset,
) -> None:
    project, _ = logged
    stranger = await make_project()
    base = int(time.time() * 1000) - 10_000
    await report(stranger, openai_report(question="stranger", requested_at=base))

    stranger_dataset = await make_dataset(stranger)
    job = await import_logs(running, stranger, stranger_dataset, {})
    assert job.result["entries_created"] == 1
    [entry] = await entries(running, stranger_dataset)
    assert entry.messages[-1]["content"] == "stranger"

    mine = await make_dataset(project)
    job = await import_logs(running, project, mine, {"filters": {"requestContains": "stranger"}})
    assert job.result["logs_read"] == 0 and await entries(running, mine) == []

    async with stranger.client() as client:  # another project's dataset is not found
        response = await client.post(f"/datasets/{mine}/import-logs", json={})
    assert response.status_code == 404 and response.json()["error"]["param"] == "dataset_id"


@pytest.fixture
async def stub(running: RunningPlatform) -> AsyncIterator[logs_pb2_grpc.LogQueryStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.settings.grpc_port}") as channel:
        yield logs_pb2_grpc.LogQueryStub(channel)


def internal(token: str, project_id: str | None) -> tuple[tuple[str, str], ...]:
    metadata = [("x-distillery-internal-token", token)]
    if project_id is not None:
        metadata.append(("x-distillery-project", project_id))
    return tuple(metadata)


async def test_internal_token_reads_exactly_the_named_project(
    running: RunningPlatform,
    stub: logs_pb2_grpc.LogQueryStub,
    logged: tuple[Project, int],
    make_project: Callable[[], Awaitable[Project]],
) -> None:
    project, _ = logged
    token = internal_token(running.settings)
    logs = [
        log async for log in stub.Search(logs_pb2.SearchLogsRequest(), metadata=internal(token, project.id))
    ]
    assert len(logs) == 5
    other = await make_project()
    counted = await stub.Count(logs_pb2.CountLogsRequest(), metadata=internal(token, other.id))
    assert counted.count == 0


async def test_search_batches_stream_the_same_logs_in_batches(
    running: RunningPlatform, stub: logs_pb2_grpc.LogQueryStub, logged: tuple[Project, int]
) -> None:
    project, _ = logged
    metadata = internal(internal_token(running.settings), project.id)
    logs = [log async for log in stub.Search(logs_pb2.SearchLogsRequest(), metadata=metadata)]
    request = logs_pb2.SearchLogsRequest(batch_size=2)
    batches = [batch async for batch in stub.SearchBatches(request, metadata=metadata)]
    assert [len(b.logs) for b in batches] == [2, 2, 1]
    assert [log for b in batches for log in b.logs] == logs  # every field, same order

    request = logs_pb2.SearchLogsRequest(limit=3, omit_raw_payloads=True)
    [batch] = [batch async for batch in stub.SearchBatches(request, metadata=metadata)]
    assert [log.id for log in batch.logs] == [log.id for log in logs[:3]]
    for slim, full in zip(batch.logs, logs, strict=False):
        assert slim.req_payload_json == "" and slim.resp_payload_json == ""
        assert slim.openai_request_json == full.openai_request_json and slim.openai_request_json
        assert slim.openai_response_json == full.openai_response_json
    slim_search = [log async for log in stub.Search(request, metadata=metadata)]  # Search honours it too
    assert [log.id for log in slim_search] == [log.id for log in batch.logs]
    assert all(log.req_payload_json == "" and log.openai_request_json for log in slim_search)


async def test_wrong_internal_token_is_unauthenticated(
    running: RunningPlatform,
    stub: logs_pb2_grpc.LogQueryStub,
    logged: tuple[Project, int],
    make_dataset,
) -> None:
    project, _ = logged
    token = internal_token(running.settings)
    wrong = "f" * len(token)
    for metadata in (internal(wrong, project.id), internal(token, None), internal(token, "")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Count(logs_pb2.CountLogsRequest(), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert wrong not in str(refused.value) and token not in str(refused.value)
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        [log async for log in stub.Search(logs_pb2.SearchLogsRequest(), metadata=internal(wrong, project.id))]
    assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as batched:
        request = logs_pb2.SearchLogsRequest()
        [b async for b in stub.SearchBatches(request, metadata=internal(wrong, project.id))]
    assert batched.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # an api holding the wrong token: the job fails and says why, without the token
    state = running.platform.app.state
    importer = state.log_importer
    state.log_importer = LogImporter(importer.address, wrong)
    try:
        dataset_id = await make_dataset(project)
        job = await import_logs(running, project, dataset_id, {})
    finally:
        state.log_importer = importer
    assert job.status == "failed" and job.progress_done == 0
    assert "internal token" in job.errors[0]["message"] and wrong not in str(job.errors)
    assert await entries(running, dataset_id) == []


async def test_invalid_bodies_name_the_field(
    running: RunningPlatform, project: Project, make_dataset
) -> None:
    dataset_id = await make_dataset(project)
    async with project.client() as client:
        for body, param in (
            ({"filters": {"tags": {}}}, "filters.tags"),
            ({"filters": {"status": "done"}}, "filters.status"),
            ({"filters": {"requestedAfter": "yesterday"}}, "filters.requestedAfter"),
            ({"limit": 0}, "limit"),
        ):
            response = await client.post(f"/datasets/{dataset_id}/import-logs", json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param
        response = await client.post("/datasets/ds_missing/import-logs", json={})
        assert response.status_code == 404
    async with running.platform.state["sessions"]() as session:
        assert (await jobs.list_jobs(session=session, project_id=project.id, dataset_id=dataset_id)) == []


# --- the writer on both catalog databases --------------------------------------------------------


async def test_bulk_writer_round_trips_on_sqlite_and_postgres(database_url: str) -> None:
    """Rows go to the driver pre-serialized: they must read back through the ORM exactly."""
    await migrate(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions.begin() as session:
            moment = now()
            session.add(ProjectRow(id="proj_bulk", name=f"bulk-{secrets.token_hex(3)}", created_at=moment))
            await session.flush()
            session.add(
                Dataset(id="ds_bulk", project_id="proj_bulk", name="d", created_at=moment, updated_at=moment)
            )
            await session.flush()
            job = await jobs.create_job(
                session=session, project_id="proj_bulk", dataset_id="ds_bulk", kind="import_logs"
            )
        request = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "héllo \u2603"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
        batch = logs_pb2.RequestLogBatch()
        for i in range(1700):  # more than one multi-row statement
            response = {"choices": [{"message": {"role": "assistant", "content": f"answer {i}"}}]}
            batch.logs.add(
                id=f"log-{i:05d}",
                status="success" if i % 10 else "error",
                metadata={"i": str(i)},
                openai_request_json=orjson.dumps(request).decode(),
                openai_response_json=orjson.dumps(response).decode(),
            )
        batch.logs.add(id="log-bad", status="success", openai_request_json="{", openai_response_json="{}")
        stamp = await imports._timestamp_value(sessions)
        converted = convert_batch(batch.SerializeToString(), "ds_bulk", stamp)
        assert (converted.read, converted.failed_calls, len(converted.rows)) == (1701, 170, 1530)
        assert converted.errors == [{"log_id": "log-bad", "message": "the logged payload is not valid JSON"}]
        tally = imports.Tally()
        for _ in range(2):  # the second time, every row is already there
            await imports._write_batch(
                sessions=sessions,
                job_id=job.id,
                dataset_id="ds_bulk",
                batch=converted,
                tally=tally,
            )
        assert tally.result() == {
            "logs_read": 3402,
            "entries_created": 1530,
            "skipped_duplicates": 1530,
            "skipped_failed": 340,
            "skipped_invalid": 2,
        }
        async with sessions() as session:
            rows = list(await session.scalars(select(DatasetEntry).order_by(DatasetEntry.id)))
            stored_job = await session.get(DatasetJob, job.id)
        assert len(rows) == 1530 and len({r.id for r in rows}) == 1530
        assert [r.source_log_id for r in rows[:2]] == ["log-00001", "log-00002"]  # ids follow the stream
        first = rows[0]
        assert first.messages == [{"role": "user", "content": "héllo \u2603"}]
        assert first.output == {"role": "assistant", "content": "answer 1"}
        assert first.tools == [WEATHER_TOOL] and first.tool_choice == request["tool_choice"]
        assert first.response_format is None and first.rejected_message is None
        assert first.entry_metadata == {"i": "1"} and first.source == first.provenance == "request_log"
        assert first.created_at.replace(tzinfo=None) == first.updated_at.replace(tzinfo=None)
        assert abs(first.created_at.replace(tzinfo=UTC) - moment) < timedelta(minutes=5)
        assert stored_job.progress_done == 3402 and stored_job.error_count == 2
    finally:
        await engine.dispose()
