"""Dataset files: JSONL upload (streamed, parsed by a job with progress), export and snapshots.

Against the live platform (``file://`` blobs), plus one upload → export → re-import → snapshot
round trip on the S3 code path (SeaweedFS).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import func, select

from services.api.dataset_files import service as files
from services.api.datasets.models import Dataset, DatasetEntry, DatasetJob
from services.api.pruning.models import PruningRule
from services.common.blobstore import BlobStore
from services.common.clock import now
from services.common.ids import new_id
from services.common.kafka import TansuBroker
from services.platform import Platform
from tests.conftest import Project, RunningPlatform, platform_settings, wait_until
from tests.helpers import FINISHED, assert_error, export_and_wait, new_dataset, wait_for_job

# The examples of the docs' "Uploading Data" and "Exporting Data" pages, verbatim.
DOCS_UPLOAD_LINES = [
    b'{"messages":[{"role":"system","content":"You are a helpful assistant"},{"role":"user","content":'
    b'"What is the capital of Tasmania?"},{"role":"assistant","content":"Hobart"}], "rejected_message":'
    b'{"role": "assistant", "content": "Paris"}, "split": "TRAIN", "metadata": {"prompt_id": '
    b'"capital_cities", "any_key": "any_value"}}',
    b'{"messages":[{"role":"system","content":"You are a helpful assistant"},{"role":"user","content":'
    b'"What is the capital of Sweden?"},{"role":"assistant","content":"Stockholm"}], "rejected_message":'
    b'{"role": "assistant", "content": "London"}, "split": "TEST", "metadata": {"prompt_id": '
    b'"capital_cities", "any_key": "any_value"}}',
]
DOCS_EXPORT_LINES = [
    b'{"messages":[{"role":"system","content":"You are a helpful assistant"},{"role":"user","content":'
    b'"What is the capital of Tasmania?"},{"role":"assistant","content":null,"tool_calls":[{"id":"",'
    b'"type":"function","function":{"name":"identify_capital","arguments":"{\\"capital\\":\\"Hobart\\"}"}}'
    b']}],"tools":[{"type":"function","function":{"name":"identify_capital","parameters":{"type":"object",'
    b'"properties":{"capital":{"type":"string"}}}}}]}',
    b'{"messages":[{"role":"system","content":"You are a helpful assistant"},{"role":"user","content":'
    b'"What is the capital of Sweden?"},{"role":"assistant","content":null,"tool_calls":[{"id":"",'
    b'"type":"function","function":{"name":"identify_capital","arguments":"{\\"capital\\":\\"Stockholm\\"}"}}'
    b']}],"tools":[{"type":"function","function":{"name":"identify_capital","parameters":{"type":"object",'
    b'"properties":{"capital":{"type":"string"}}}}}]}',
]


def line(question: str, answer: str = "an answer", **extra: object) -> bytes:
    row = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant"},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        **extra,
    }
    return orjson.dumps(row)


def jsonl(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"


async def upload(
    client: httpx.AsyncClient, dataset_id: str, data: bytes, filename: str = "data.jsonl"
) -> httpx.Response:
    return await client.post(
        f"/datasets/{dataset_id}/files", files={"file": (filename, data, "application/jsonl")}
    )


async def upload_and_wait(client: httpx.AsyncClient, dataset_id: str, data: bytes) -> dict:
    response = await upload(client, dataset_id, data)
    assert response.status_code == 202, response.text
    return await wait_for_job(client, dataset_id, response.json()["id"])


async def canonical_entries(sessions, dataset_id: str) -> list[bytes]:
    """What an entry *is*, independent of ids, timestamps and order."""
    async with sessions() as session:
        entries = list(
            await session.scalars(select(DatasetEntry).where(DatasetEntry.dataset_id == dataset_id))
        )
    return sorted(
        orjson.dumps(
            {
                "messages": e.messages,
                "output": e.output,
                "tools": e.tools,
                "tool_choice": e.tool_choice,
                "response_format": e.response_format,
                "rejected_message": e.rejected_message,
                "split": e.split,
                "metadata": e.entry_metadata,
            },
            option=orjson.OPT_SORT_KEYS,
        )
        for e in entries
    )


async def count_rows(sessions, table: type, *where: object) -> int:
    async with sessions() as session:
        return await session.scalar(select(func.count()).select_from(table).where(*where))


def sessions_of(running: RunningPlatform):
    return running.platform.state["sessions"]


# --- upload ----------------------------------------------------------------------------------


async def test_upload_the_docs_examples(running: RunningPlatform, project: Project) -> None:
    data = jsonl(*DOCS_UPLOAD_LINES, *DOCS_EXPORT_LINES)
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        response = await upload(client, dataset_id, data, filename="capitals.jsonl")
        assert response.status_code == 202, response.text
        accepted = response.json()
        assert accepted["object"] == "dataset.job" and accepted["kind"] == "upload"
        assert accepted["status"] in ("queued", "running")
        assert accepted["progress"] == {"done": 0, "total": 4}
        assert response.headers["location"] == f"/api/v1/datasets/{dataset_id}/jobs/{accepted['id']}"
        job = await wait_for_job(client, dataset_id, accepted["id"])
        assert job["status"] == "succeeded", job
        assert job["progress"] == {"done": 4, "total": 4}
        assert job["errors"] == [] and job["error_count"] == 0
        result = job["result"]
        assert (result["entries_created"], result["duplicates"], result["errors"]) == (4, 0, 0)
        assert result["file"]["name"] == "capitals.jsonl" and result["file"]["bytes"] == len(data)
        assert result["file"]["sha256"] == hashlib.sha256(data).hexdigest()
        dataset = (await client.get(f"/datasets/{dataset_id}")).json()
        assert dataset["dataset_entry_count"] == 4

    # The file itself stays in the blob store, byte for byte, under the job's id.
    key = f"uploads/{project.id}/{dataset_id}/{accepted['id']}.jsonl"
    assert await running.platform.blobs.get_bytes(key) == data
    assert result["file"]["uri"].endswith(key)

    async with sessions_of(running)() as session:
        entries = {
            e.messages[1]["content"] + ("/tool" if e.tools else ""): e
            for e in await session.scalars(select(DatasetEntry).where(DatasetEntry.dataset_id == dataset_id))
        }
    tasmania = entries["What is the capital of Tasmania?"]
    assert tasmania.output == {"role": "assistant", "content": "Hobart"}
    assert tasmania.rejected_message == {"role": "assistant", "content": "Paris"}
    assert tasmania.split == "TRAIN" and entries["What is the capital of Sweden?"].split == "TEST"
    assert tasmania.entry_metadata == {"prompt_id": "capital_cities", "any_key": "any_value"}
    assert tasmania.source == "upload" and tasmania.provenance == "upload"
    tool = entries["What is the capital of Sweden?/tool"]
    assert tool.output["content"] is None
    assert tool.output["tool_calls"][0]["function"]["arguments"] == '{"capital":"Stockholm"}'
    assert tool.tools[0]["function"]["name"] == "identify_capital"
    assert tool.split in ("TRAIN", "TEST") and tool.entry_metadata == {}


async def test_bad_lines_are_reported_by_line_number(running: RunningPlatform, project: Project) -> None:
    data = jsonl(
        line("good one"),  # 1
        b'{"messages": [{"role": "user", "content": "cut off"',  # 2: malformed JSON
        orjson.dumps({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}),
        line("bad metadata", metadata={"attempt": 3}),  # 4: a non-string metadata value
        b"   ",  # 5: blank, skipped
        line("good two"),  # 6
        b"[1, 2, 3]",  # 7: not an object
        line("good one"),  # 8: a duplicate of line 1
        line("bad split", split="VALIDATION"),  # 9
        b"null",  # 10
    )
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        job = await upload_and_wait(client, dataset_id, data)
    assert job["status"] == "partial", job
    assert job["progress"] == {"done": 10, "total": 10}
    assert [e["line"] for e in job["errors"]] == [2, 3, 4, 7, 9, 10]
    messages = {e["line"]: e["message"] for e in job["errors"]}
    assert all(message.startswith(f"line {n}: ") for n, message in messages.items())
    assert "not valid JSON" in messages[2]
    assert "the last message must be" in messages[3]
    assert "Input validation failed" in messages[4] and "metadata" in messages[4]
    assert "JSON object" in messages[7]
    assert "split" in messages[9]
    assert "JSON object" in messages[10]
    result = job["result"]
    assert (result["entries_created"], result["duplicates"], result["errors"]) == (2, 1, 6)
    assert job["error_count"] == 6
    assert await count_rows(sessions_of(running), DatasetEntry, DatasetEntry.dataset_id == dataset_id) == 2


async def test_lines_split_across_chunks() -> None:
    async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async def lines(*parts: bytes, max_line: int = 100) -> list[tuple[int, bytes | None]]:
        return [item async for item in files.iter_lines(chunks(*parts), max_line=max_line)]

    assert await lines(b"ab", b"c\nd", b"e\n\nf") == [(1, b"abc"), (2, b"de"), (3, b""), (4, b"f")]
    assert await lines(b"a\n", b"") == [(1, b"a")]
    too_long = [b"x" * 8] * 5  # 40 bytes over several chunks, never buffered past the limit
    assert await lines(b"ok\n", *too_long, b"\nfine", max_line=16) == [(1, b"ok"), (2, None), (3, b"fine")]
    assert await lines(*too_long, max_line=16) == [(1, None)]


async def test_bom_and_overlong_lines(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "MAX_LINE_BYTES", 400)
    data = b"\xef\xbb\xbf" + jsonl(line("after a byte order mark"), line("long", "w" * 500), line("short"))
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        job = await upload_and_wait(client, dataset_id, data)
    assert job["status"] == "partial", job
    assert job["result"]["entries_created"] == 2
    assert [(e["line"], e["message"]) for e in job["errors"]] == [
        (2, "line 2: the line is longer than the limit of 400 bytes")
    ]


async def test_a_file_of_only_bad_lines_fails(running: RunningPlatform, project: Project) -> None:
    data = jsonl(b"not json", b'{"messages": []}', line("no metadata map", metadata="oops"))
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        job = await upload_and_wait(client, dataset_id, data)
        assert job["status"] == "failed", job
        assert [e["line"] for e in job["errors"]] == [1, 2, 3]
        assert job["result"]["entries_created"] == 0

        blank = await upload_and_wait(client, dataset_id, b"\n\n  \n")
        assert blank["status"] == "failed"
        assert "no JSON lines" in blank["errors"][0]["message"]
    assert await count_rows(sessions_of(running), DatasetEntry, DatasetEntry.dataset_id == dataset_id) == 0


async def test_legacy_functions_format(running: RunningPlatform, project: Project) -> None:
    legacy = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": "{}"}},
            {"role": "function", "name": "weather", "content": "sunny"},
            {"role": "assistant", "function_call": {"name": "report", "arguments": '{"sky":"sunny"}'}},
        ],
        "functions": [{"name": "weather", "parameters": {"type": "object"}}, {"name": "report"}],
        "function_call": {"name": "report"},
        "temperature": 0.2,  # ignored, as the docs say
    }
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        job = await upload_and_wait(client, dataset_id, jsonl(orjson.dumps(legacy)))
    assert job["status"] == "succeeded", job
    async with sessions_of(running)() as session:
        entry = await session.scalar(select(DatasetEntry).where(DatasetEntry.dataset_id == dataset_id))
    assert entry.tools == [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "report"}},
    ]
    assert entry.tool_choice == {"type": "function", "function": {"name": "report"}}
    assert entry.messages[1]["tool_calls"][0]["function"]["name"] == "weather"
    assert entry.messages[2] == {"role": "tool", "tool_call_id": "weather", "content": "sunny"}
    assert entry.output["content"] is None  # the missing content of a tool call
    assert entry.output["tool_calls"][0]["function"] == {"name": "report", "arguments": '{"sky":"sunny"}'}


async def test_progress_is_visible_while_the_job_runs(
    running: RunningPlatform, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = files.add_entries

    async def slow_add_entries(**kwargs: object):
        await asyncio.sleep(0.05)
        return await original(**kwargs)

    monkeypatch.setattr(files, "UPLOAD_BATCH_LINES", 50)
    monkeypatch.setattr(files, "add_entries", slow_add_entries)
    data = jsonl(*(line(f"question {i}") for i in range(1000)))
    seen: list[tuple[str, int]] = []
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        response = await upload(client, dataset_id, data)
        job_id = response.json()["id"]

        async def finished() -> bool:
            job = (await client.get(f"/datasets/{dataset_id}/jobs/{job_id}")).json()
            assert job["progress"]["total"] == 1000
            seen.append((job["status"], job["progress"]["done"]))
            return job["status"] in FINISHED

        await wait_until(finished, timeout=60, what="upload job")
    moving = [done for status, done in seen if status == "running" and 0 < done < 1000]
    assert len(set(moving)) >= 2, seen  # a poller sees it move
    assert [done for _, done in seen] == sorted(done for _, done in seen)
    assert seen[-1] == ("succeeded", 1000)


async def test_bad_requests(project: Project, running: RunningPlatform) -> None:
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        no_file = await client.post(f"/datasets/{dataset_id}/files", files={"other": ("x.jsonl", b"{}")})
        assert_error(no_file, 400, "'file'")
        assert_error(await upload(client, dataset_id, b""), 400, "empty")
        two = await client.post(
            f"/datasets/{dataset_id}/files",
            files=[("file", ("a.jsonl", line("a"))), ("file", ("b.jsonl", line("b")))],
        )
        assert_error(two, 400, "one file")
        wrong_type = await client.post(f"/datasets/{dataset_id}/files", json={"messages": []})
        assert_error(wrong_type, 415, "multipart/form-data")
        assert_error(await upload(client, "ds_missing", line("a")), 404)

        # The raw body works too (curl --data-binary @file -H 'Content-Type: application/jsonl').
        raw = await client.post(
            f"/datasets/{dataset_id}/files",
            content=jsonl(line("raw one"), line("raw two")),
            headers={"content-type": "application/jsonl"},
        )
        assert raw.status_code == 202, raw.text
        job = await wait_for_job(client, dataset_id, raw.json()["id"])
        assert job["status"] == "succeeded" and job["result"]["entries_created"] == 2
        assert job["result"]["file"]["name"] is None
    sessions = sessions_of(running)
    assert await count_rows(sessions, DatasetJob, DatasetJob.dataset_id == dataset_id) == 1


# --- size limits -----------------------------------------------------------------------------


async def test_upload_size_limit(
    running: RunningPlatform, project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    platform, sessions = running.platform, sessions_of(running)
    spool_dir = running.settings.data_dir / "tmp" / "uploads"
    async with project.client() as client:
        dataset_id = await new_dataset(client)

        # A Content-Length over the (default, 1 GiB) limit is refused before a byte is read: claim
        # 2 GiB, send a few bytes, and the 413 comes back at once.
        port = running.settings.http_port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"POST /api/v1/datasets/{dataset_id}/files HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Authorization: Bearer {project.key}\r\n"
                "Content-Type: multipart/form-data; boundary=xyz\r\n"
                f"Content-Length: {2 * 1024**3}\r\n\r\n".encode()
                + b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n{'
            )
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), timeout=10)
            headers = {}
            while (header := await asyncio.wait_for(reader.readline(), timeout=10)) not in (b"\r\n", b""):
                name, _, value = header.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = orjson.loads(await reader.readexactly(int(headers["content-length"])))
        finally:
            writer.close()
        assert status.split()[1] == b"413", status
        assert str(1024**3) in body["message"] and body["error"]["code"] == "file_too_large"

        monkeypatch.setattr(running.settings, "max_upload_bytes", 10_000)
        # Declared (httpx sends Content-Length) and far over the limit.
        big = jsonl(*(line(f"q{i}", "x" * 200) for i in range(600)))
        assert len(big) > 100_000
        assert_error(await upload(client, dataset_id, big), 413, "10000 bytes")

        # Streamed without a Content-Length, just over the limit: refused while streaming.
        boundary = "distillery-test-boundary"
        payload = jsonl(*(line(f"s{i}", "y" * 100) for i in range(60)))
        assert 10_000 < len(payload) < 20_000

        async def multipart() -> AsyncIterator[bytes]:
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.jsonl"\r\n'
                "Content-Type: application/jsonl\r\n\r\n"
            ).encode()
            for start in range(0, len(payload), 1000):
                yield payload[start : start + 1000]
            yield f"\r\n--{boundary}--\r\n".encode()

        streamed = await client.post(
            f"/datasets/{dataset_id}/files",
            content=multipart(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert_error(streamed, 413, "10000 bytes")

        # Just under the limit is fine, streamed the same way.
        payload = jsonl(*(line(f"s{i}", "y" * 100) for i in range(40)))
        assert len(payload) < 10_000
        accepted = await client.post(
            f"/datasets/{dataset_id}/files",
            content=multipart(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
        assert accepted.status_code == 202, accepted.text
        job = await wait_for_job(client, dataset_id, accepted.json()["id"])
        assert job["status"] == "succeeded" and job["result"]["entries_created"] == 40

    # Nothing of the refused uploads remains: one job, one blob, no spooled files.
    assert await count_rows(sessions, DatasetJob, DatasetJob.dataset_id == dataset_id) == 1
    assert await platform.blobs.list(f"uploads/{project.id}/{dataset_id}/") == [
        f"uploads/{project.id}/{dataset_id}/{job['id']}.jsonl"
    ]
    assert not any(spool_dir.iterdir())


async def test_uploads_pass_the_body_limit_other_routes_keep_it(
    running: RunningPlatform, project: Project
) -> None:
    limit = running.settings.max_body_bytes
    answer = "z" * 4000
    count = limit // 4000 + 200
    data = jsonl(*(line(f"long {i}", answer) for i in range(count)))
    assert len(data) > limit
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        job = await upload_and_wait(client, dataset_id, data)
        assert job["status"] == "succeeded", job
        assert job["result"]["entries_created"] == count

        big_json = {"entries": [{"padding": "p" * (limit + 1)}]}
        assert_error(await client.post(f"/datasets/{dataset_id}/entries", json=big_json), 413, str(limit))
        assert_error(await client.post(f"/datasets/{dataset_id}/snapshots", json=big_json), 413, str(limit))
        assert_error(await client.post(f"/datasets/{dataset_id}/export", content=b"x" * (limit + 1)), 413)


# --- export ----------------------------------------------------------------------------------

MIXED_ROWS = [
    *DOCS_UPLOAD_LINES,
    *DOCS_EXPORT_LINES,
    line("auto split, no metadata"),
    line("json please", '{"ok": true}', response_format={"type": "json_object"}),
    line("with tool choice", tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto"),
    line("unicode ✓ — Ünïcödé", "ответ 👍", metadata={"lang": "mixed"}),
    orjson.dumps(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "parts"}]},
                {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
            ],
            "functions": [{"name": "f"}],
            "rejected_message": {"role": "assistant", "content": "no call"},
        }
    ),
]


async def test_export_reimports_to_an_identical_dataset(running: RunningPlatform, project: Project) -> None:
    sessions = sessions_of(running)
    async with project.client() as client:
        source = await new_dataset(client, "source")
        assert (await upload_and_wait(client, source, jsonl(*MIXED_ROWS)))["status"] == "succeeded"

        export = await export_and_wait(client, source)
        assert export["object"] == "dataset.export" and export["dataset_id"] == source
        assert export["entry_count"] == len(MIXED_ROWS)
        assert export["url"] is None and export["url_expires"] is None  # file:// has no presigned URLs
        assert export["download"] == f"/api/v1/datasets/{source}/exports/{export['name']}"
        key = f"exports/{project.id}/{source}/{export['name']}"
        assert export["uri"].endswith(key)

        download = await client.get(export["download"].removeprefix("/api/v1"))
        assert download.status_code == 200, download.text
        assert download.headers["content-type"] == "application/x-ndjson"
        body = download.content
        assert body == await running.platform.blobs.get_bytes(key)
        assert len(body) == export["bytes"]
        lines = [orjson.loads(x) for x in body.splitlines()]
        assert len(lines) == len(MIXED_ROWS)
        for row in lines:
            assert row["messages"][-1]["role"] == "assistant"
            assert row["split"] in ("TRAIN", "TEST") and isinstance(row["metadata"], dict)
        tasmania = next(
            r for r in lines if r.get("rejected_message") == {"role": "assistant", "content": "Paris"}
        )
        assert tasmania["messages"][-1] == {"role": "assistant", "content": "Hobart"}
        assert tasmania["metadata"] == {"prompt_id": "capital_cities", "any_key": "any_value"}

        copy = await new_dataset(client, "copy")
        job = await upload_and_wait(client, copy, body)
        assert job["status"] == "succeeded" and job["result"]["entries_created"] == len(MIXED_ROWS)

        assert_error(await client.get(f"/datasets/{source}/exports/20990101T000000000000Z.jsonl"), 404)
        assert_error(await client.get(f"/datasets/{source}/exports/..%2F..%2Fsecret.jsonl"), 404)
    assert await canonical_entries(sessions, copy) == await canonical_entries(sessions, source)


async def test_export_of_an_empty_dataset_is_an_empty_file(project: Project) -> None:
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        export = await export_and_wait(client, dataset_id)
        assert (export["entry_count"], export["bytes"]) == (0, 0)
        assert (await client.get(export["download"].removeprefix("/api/v1"))).content == b""


# --- snapshots -------------------------------------------------------------------------------


async def add_rules(sessions, dataset_id: str, *texts: str) -> None:
    async with sessions.begin() as session:
        for position, text in enumerate(texts):
            session.add(
                PruningRule(
                    id=new_id("pr"), dataset_id=dataset_id, position=position, text=text, created_at=now()
                )
            )


async def test_snapshots_are_pruned_content_addressed_and_immutable(
    running: RunningPlatform, project: Project
) -> None:
    blobs, sessions = running.platform.blobs, sessions_of(running)
    system = "You are a helpful assistant. Answer with the city name only."
    rows = [
        orjson.dumps(
            {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"Capital of {country}? Answer with the city name only."},
                    {"role": "assistant", "content": city},
                ],
                "split": "TRAIN",
            }
        )
        for country, city in (("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"))
    ]
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        await upload_and_wait(client, dataset_id, jsonl(*rows))
        # Rules apply in position order: the second only matches once the first has been removed.
        await add_rules(
            sessions, dataset_id, " Answer with the city name only.", "You are a helpful assistant."
        )

        response = await client.post(f"/datasets/{dataset_id}/snapshots")
        assert response.status_code == 200, response.text
        first = response.json()
        assert first["object"] == "dataset.snapshot" and first["dataset_id"] == dataset_id
        assert first["entry_count"] == 3
        key = f"snapshots/{dataset_id}/{first['content_hash']}.jsonl"
        assert first["uri"].endswith(key)
        content = await blobs.get_bytes(key)
        assert hashlib.sha256(content).hexdigest() == first["content_hash"]
        lines = [orjson.loads(x) for x in content.splitlines()]
        for row in lines:
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["user", "assistant"], row  # the system prompt was pruned away entirely
            assert "Answer with" not in row["messages"][0]["content"]
            assert row["split"] == "TRAIN" and row["entry_id"].startswith("dse_")
        # Canonical serialization: sorted keys, no spaces, entries in content-hash order.
        assert content == b"".join(orjson.dumps(x, option=orjson.OPT_SORT_KEYS) + b"\n" for x in lines)

        # Unchanged dataset: the same snapshot, not a new row.
        again = (await client.post(f"/datasets/{dataset_id}/snapshots")).json()
        assert again == first
        listed = (await client.get(f"/datasets/{dataset_id}/snapshots")).json()
        assert listed["object"] == "list" and [s["id"] for s in listed["data"]] == [first["id"]]
        assert (await client.get(f"/datasets/{dataset_id}/snapshots/{first['id']}")).json() == first

        # A change gives a new snapshot; the old blob stays exactly as it was.
        await upload_and_wait(client, dataset_id, jsonl(line("Capital of Chile?", "Santiago")))
        second = (await client.post(f"/datasets/{dataset_id}/snapshots")).json()
        assert second["id"] != first["id"] and second["content_hash"] != first["content_hash"]
        assert second["entry_count"] == 4
        assert await blobs.get_bytes(key) == content
        listed = (await client.get(f"/datasets/{dataset_id}/snapshots")).json()
        assert {s["id"] for s in listed["data"]} == {first["id"], second["id"]}

    # The service function (what the models domain calls): same content → same row; explicit rules
    # (a model's copied texts) → a different freeze.
    async with sessions.begin() as session:
        dataset = await session.get(Dataset, dataset_id)
        same = await files.create_snapshot(session=session, blobs=blobs, dataset=dataset)
        unpruned = await files.create_snapshot(session=session, blobs=blobs, dataset=dataset, rules=[])
    assert same.id == second["id"]
    assert unpruned.content_hash != second["content_hash"]
    raw = [
        orjson.loads(x)
        for x in (await blobs.get_bytes(f"snapshots/{dataset_id}/{unpruned.content_hash}.jsonl")).splitlines()
    ]
    assert any(m["role"] == "system" for row in raw for m in row["messages"])


async def test_snapshot_of_an_empty_dataset_is_refused(project: Project) -> None:
    async with project.client() as client:
        dataset_id = await new_dataset(client)
        assert_error(await client.post(f"/datasets/{dataset_id}/snapshots"), 400, "no entries")
        assert (await client.get(f"/datasets/{dataset_id}/snapshots")).json()["data"] == []


# --- isolation -------------------------------------------------------------------------------


async def test_another_projects_dataset_is_not_found(
    running: RunningPlatform, make_project: Callable[[], Awaitable[Project]]
) -> None:
    owner, other = await make_project(), await make_project()
    async with owner.client() as mine, other.client() as theirs:
        dataset_id = await new_dataset(mine)
        job = await upload_and_wait(mine, dataset_id, jsonl(line("private")))
        export = await export_and_wait(mine, dataset_id)
        snapshot = (await mine.post(f"/datasets/{dataset_id}/snapshots")).json()

        assert_error(await upload(theirs, dataset_id, jsonl(line("intruder"))), 404)
        assert_error(await theirs.get(f"/datasets/{dataset_id}/jobs/{job['id']}"), 404)
        assert_error(await theirs.post(f"/datasets/{dataset_id}/export"), 404)
        assert_error(await theirs.get(f"/datasets/{dataset_id}/exports/{export['name']}"), 404)
        assert_error(await theirs.post(f"/datasets/{dataset_id}/snapshots"), 404)
        assert_error(await theirs.get(f"/datasets/{dataset_id}/snapshots"), 404)
        assert_error(await theirs.get(f"/datasets/{dataset_id}/snapshots/{snapshot['id']}"), 404)
        # Their own dataset does not open a door to ours either.
        theirs_id = await new_dataset(theirs)
        assert_error(await theirs.get(f"/datasets/{theirs_id}/snapshots/{snapshot['id']}"), 404)
        assert_error(await theirs.get(f"/datasets/{theirs_id}/exports/{export['name']}"), 404)
        async with httpx.AsyncClient(base_url=owner.base_url) as anonymous:
            assert_error(await upload(anonymous, dataset_id, jsonl(line("anon"))), 401)
    assert await count_rows(sessions_of(running), DatasetEntry, DatasetEntry.dataset_id == dataset_id) == 1


# --- the S3 code path ------------------------------------------------------------------------


@pytest.fixture
async def s3_platform(
    tmp_path: Path, tansu: TansuBroker, chdb_url: str, s3_url: str
) -> AsyncIterator[Platform]:
    """An api-only platform whose blob store is a real S3 endpoint (SeaweedFS)."""
    settings = platform_settings(
        tmp_path,
        tansu.url,
        chdb_url,
        blob_url=s3_url + "-files",
        bootstrap_api_key=f"opk_files_s3_{secrets.token_hex(8)}",
    )
    platform = Platform(settings, services=("api",))
    await platform.start()
    try:
        yield platform
    finally:
        await platform.stop()


async def test_upload_export_snapshot_round_trip_on_s3(s3_platform: Platform) -> None:
    blobs: BlobStore = s3_platform.blobs
    sessions = s3_platform.state["sessions"]
    key = s3_platform.settings.bootstrap_api_key.get_secret_value()
    transport = httpx.ASGITransport(app=s3_platform.app)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://distillery/api/v1",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as client:
        source = await new_dataset(client, "s3-source")
        upload_job = await upload_and_wait(client, source, jsonl(*MIXED_ROWS))
        assert upload_job["status"] == "succeeded", upload_job
        assert upload_job["result"]["file"]["uri"].startswith("s3://")

        export = await export_and_wait(client, source)
        assert export["uri"].startswith("s3://") and export["entry_count"] == len(MIXED_ROWS)
        assert export["url"] and export["url_expires"]
        body = (await client.get(export["download"].removeprefix("/api/v1"))).content
        async with httpx.AsyncClient(timeout=30) as anonymous:  # the presigned URL needs no credentials
            presigned = await anonymous.get(export["url"])
        assert presigned.status_code == 200 and presigned.content == body
        assert len(body) == export["bytes"]

        copy = await new_dataset(client, "s3-copy")
        assert (await upload_and_wait(client, copy, body))["status"] == "succeeded"
        assert await canonical_entries(sessions, copy) == await canonical_entries(sessions, source)

        await add_rules(sessions, source, "You are a helpful assistant")
        snapshot = (await client.post(f"/datasets/{source}/snapshots")).json()
        assert snapshot["uri"] == f"s3://{blobs.bucket}/snapshots/{source}/{snapshot['content_hash']}.jsonl"
        content = await blobs.get_bytes(f"snapshots/{source}/{snapshot['content_hash']}.jsonl")
        assert hashlib.sha256(content).hexdigest() == snapshot["content_hash"]
        assert b"You are a helpful assistant" not in content
        assert (await client.post(f"/datasets/{source}/snapshots")).json()["id"] == snapshot["id"]
