"""Datasets API: datasets, entries (create, list, filter, page, edit, delete), jobs, /unstable routes.

Driven with the official ``openpipe`` SDK wherever it has a method (so its strict response
types parse our shapes), and with raw HTTP for the rest. The service functions also run on both
databases (SQLite and Postgres), since the filters and counts are SQL over JSON columns.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import httpx
import pytest
from openpipe.api_client.core.api_error import ApiError
from openpipe.api_client.types.create_dataset_entries_request_entries_item import (
    CreateDatasetEntriesRequestEntriesItem,
)
from openpipe.client import AsyncOpenPipe
from sqlalchemy import func, select

from services.api import models as catalog_models  # noqa: F401  (every table on Base.metadata)
from services.api.datasets import jobs, service
from services.api.datasets.models import Dataset, DatasetEntry, DatasetEntryRevision, DatasetJob
from services.api.datasets.rows import automatic_split, parse_entry
from services.api.datasets.schemas import EntryFilters, EntryUpdate
from services.api.projects import service as projects
from services.common.db import make_engine, make_sessionmaker, migrate
from services.common.errors import APIError
from tests.conftest import Project, RunningPlatform
from tests.helpers import assert_error

DATASET_KEYS = {"object", "id", "name", "created", "updated", "dataset_entry_count", "fine_tune_count"}
STATS_KEYS = {
    "train_entry_count",
    "test_entry_count",
    "sft_entry_count",
    "preference_entry_count",
    "prompt_tokens",
    "output_tokens",
}
ENTRY_KEYS = {
    "object",
    "id",
    "dataset_id",
    "messages",
    "output",
    "rejected_message",
    "tools",
    "tool_choice",
    "response_format",
    "split",
    "metadata",
    "provenance",
    "source",
    "source_log_id",
    "relabel_model",
    "revision",
    "prompt_tokens",
    "output_tokens",
    "created",
    "updated",
    "revisions",
}


def row(question: str, answer: str = "an answer", **extra: object) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant"},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        **extra,
    }


def sdk(project: Project) -> AsyncOpenPipe:
    return AsyncOpenPipe(api_key=project.key, base_url=project.base_url)


async def new_dataset(c: httpx.AsyncClient, name: str = "capitals") -> str:
    response = await c.post("/datasets", json={"name": name})
    assert response.status_code == 200, response.text
    return response.json()["id"]


async def add(c: httpx.AsyncClient, dataset_id: str, rows: list) -> dict:
    response = await c.post(f"/datasets/{dataset_id}/entries", json={"entries": rows})
    assert response.status_code == 200, response.text
    return response.json()


async def all_entries(c: httpx.AsyncClient, dataset_id: str, **params: object) -> list[dict]:
    response = await c.get(f"/datasets/{dataset_id}/entries", params={"limit": 1000, **params})
    assert response.status_code == 200, response.text
    assert response.json()["has_more"] is False
    return response.json()["data"]


async def walk(c: httpx.AsyncClient, dataset_id: str, limit: int, **params: object) -> list[list[dict]]:
    """Every page, following ``next_cursor``."""
    pages, cursor = [], None
    while True:
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        response = await c.get(f"/datasets/{dataset_id}/entries", params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and len(body["data"]) <= limit
        pages.append(body["data"])
        if not body["has_more"]:
            assert body["next_cursor"] is None
            return pages
        assert body["next_cursor"] == body["data"][-1]["id"]
        cursor = body["next_cursor"]


# --- datasets --------------------------------------------------------------------------------


async def test_dataset_lifecycle_through_the_sdk(project: Project) -> None:
    op = sdk(project)
    created = await op.create_dataset(name="  Capitals  ")
    assert created.object == "dataset" and created.name == "Capitals"
    assert created.dataset_entry_count == 0 and created.fine_tune_count == 0
    assert datetime.fromisoformat(created.created).tzinfo is not None

    listed = await op.list_datasets()
    assert listed.object == "list" and [d.id for d in listed.data] == [created.id]

    async with project.client() as c:
        raw = (await c.get(f"/datasets/{created.id}")).json()
        assert set(raw) == DATASET_KEYS | STATS_KEYS
        assert {k: raw[k] for k in STATS_KEYS} == dict.fromkeys(STATS_KEYS, 0)
        assert (await c.get("/datasets")).json() == {"object": "list", "data": [raw]}

        renamed = await c.patch(f"/datasets/{created.id}", json={"name": "World capitals"})
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["name"] == "World capitals" and renamed.json()["created"] == raw["created"]
        assert renamed.json()["updated"] >= raw["updated"]
        assert_error(await c.patch(f"/datasets/{created.id}", json={"name": ""}), 400, "name")
        assert_error(await c.patch(f"/datasets/{created.id}", json={"nam": "x"}), 400, "name")
        assert_error(await c.post("/datasets", json={}), 400, "name")
        assert_error(await c.post("/datasets", json={"name": "x" * 201}), 400, "name")

        second = await op.create_dataset(name="Second")
        assert [d.id for d in (await op.list_datasets()).data] == [second.id, created.id]  # newest first

    deleted = await op.delete_dataset(dataset_id=created.id)
    assert deleted.id == created.id and deleted.object == "dataset" and deleted.deleted is True
    async with project.client() as c:
        assert_error(await c.get(f"/datasets/{created.id}"), 404, created.id)
        assert_error(await c.delete(f"/datasets/{created.id}"), 404)
    assert [d.id for d in (await op.list_datasets()).data] == [second.id]
    with pytest.raises(ApiError) as exc:
        await op.delete_dataset(dataset_id=created.id)
    assert exc.value.status_code == 404 and created.id in exc.value.body["message"]


async def test_routes_need_a_key(project: Project) -> None:
    async with httpx.AsyncClient(base_url=project.base_url) as anonymous:
        assert_error(await anonymous.get("/datasets"), 401, "Missing API key")
        assert_error(await anonymous.post("/datasets", json={"name": "x"}), 401)
        assert_error(await anonymous.get("/unstable/dataset/list"), 401)


# --- creating entries ------------------------------------------------------------------------


async def test_entries_through_the_sdk_report_bad_rows_by_index(project: Project) -> None:
    op = sdk(project)
    dataset = await op.create_dataset(name="rows")
    typed = CreateDatasetEntriesRequestEntriesItem.parse_obj(
        row("Capital of Sweden?", "Stockholm", split="TEST", metadata={"prompt_id": "capitals"})
    )
    rows = [
        row("Capital of Tasmania?", "Hobart", rejected_message={"role": "assistant", "content": "Paris"}),
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "anyone?"}]},
        {"messages": [{"role": "assistant", "content": "no question before me"}]},
        {"messages": []},
        typed,
        row("Capital of Tasmania?", "Hobart"),  # same content as row 0: a duplicate, skipped
        {
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
                    ],
                },
            ],
            "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}],
            "tool_choice": "auto",
            "response_format": {"type": "text"},
            "temperature": 0.2,  # other chat parameters are accepted and ignored
        },
    ]
    result = await op.create_dataset_entries(dataset_id=dataset.id, entries=rows)
    assert result.object == "dataset.entries.creation" and result.entries_created == 3
    assert result.errors.object == "list"
    errors = {int(e.entry_index): e.message for e in result.errors.data}
    assert all(e.object == "dataset.entries.creation.error" for e in result.errors.data)
    assert set(errors) == {1, 2, 3}
    assert "assistant" in errors[1] and "input message" in errors[2] and "non-empty" in errors[3]

    async with project.client() as c:
        entries = await all_entries(c, dataset.id)
        assert len(entries) == 3 and all(set(e) == ENTRY_KEYS for e in entries)
        by_answer = {e["output"].get("content"): e for e in entries}
        hobart = by_answer["Hobart"]
        assert hobart["messages"][-1] == hobart["output"] == {"role": "assistant", "content": "Hobart"}
        assert [m["role"] for m in hobart["messages"]] == ["system", "user", "assistant"]
        assert hobart["rejected_message"] == {"role": "assistant", "content": "Paris"}
        assert hobart["provenance"] == hobart["source"] == "api" and hobart["source_log_id"] is None
        assert hobart["revision"] == 1 and hobart["revisions"] is None and hobart["metadata"] == {}
        stockholm = by_answer["Stockholm"]
        assert stockholm["split"] == "TEST" and stockholm["metadata"] == {"prompt_id": "capitals"}
        tool = by_answer[None]
        assert tool["tools"][0]["function"]["name"] == "w" and tool["tool_choice"] == "auto"
        assert tool["response_format"] == {"type": "text"} and tool["output"]["tool_calls"][0]["id"] == "c1"
        assert "temperature" not in tool

        # the same rows again: all duplicates, nothing created, the same errors
        again = await add(c, dataset.id, [r.dict() if hasattr(r, "dict") else r for r in rows])
        assert again["entries_created"] == 0 and again["duplicates"] == 4  # the 3 entries and row 5
        assert [e["entry_index"] for e in again["errors"]["data"]] == [1, 2, 3]
        body = (await c.get(f"/datasets/{dataset.id}")).json()
        assert body["dataset_entry_count"] == 3 and body["preference_entry_count"] == 1

        empty = await add(c, dataset.id, [])
        assert empty == {
            "object": "dataset.entries.creation",
            "entries_created": 0,
            "duplicates": 0,
            "errors": {"object": "list", "data": []},
        }


@pytest.mark.parametrize(
    ("bad", "fragments"),
    [
        ({**row("q"), "metadata": {"prompt_id": 7}}, ["entries.1.metadata.prompt_id", "string"]),
        ({**row("q"), "metadata": {"flag": True}}, ["entries.1.metadata.flag"]),
        ({**row("q"), "metadata": "prompt=1"}, ["entries.1.metadata"]),
        ({**row("q"), "split": "VALIDATION"}, ["entries.1.split", "TRAIN"]),
        ({**row("q"), "split": "train"}, ["entries.1.split"]),
        ({"input": {"messages": []}}, ["entries.1.messages", "required"]),
        ({"messages": "hello"}, ["entries.1.messages"]),
        ({"messages": [{"role": "robot", "content": "x"}]}, ["entries.1.messages.0.role"]),
        ({"messages": [{"role": "user", "content": 5}]}, ["entries.1.messages.0.content"]),
        ({**row("q"), "tools": {"type": "function"}}, ["entries.1.tools"]),
        ({**row("q"), "rejected_message": "Paris"}, ["entries.1.rejected_message"]),
        ({**row("q"), "response_format": "json"}, ["entries.1.response_format"]),
        ("just a string", ["entries.1"]),
    ],
)
async def test_schema_violations_reject_the_whole_request(
    project: Project, bad: object, fragments: list[str]
) -> None:
    async with project.client() as c:
        dataset_id = await new_dataset(c)
        response = await c.post(f"/datasets/{dataset_id}/entries", json={"entries": [row("fine"), bad]})
        body = assert_error(response, 400, "Input validation failed", *fragments)
        assert body["error"]["param"].startswith("entries.1")
        assert (await c.get(f"/datasets/{dataset_id}")).json()["dataset_entry_count"] == 0


async def test_sdk_sees_the_input_validation_message(project: Project) -> None:
    op = sdk(project)
    dataset = await op.create_dataset(name="strict")
    with pytest.raises(ApiError) as exc:
        await op.create_dataset_entries(dataset_id=dataset.id, entries=[row("q", metadata={"n": 1})])
    assert exc.value.status_code == 400
    assert "Input validation failed" in exc.value.body["message"]


async def test_malformed_oversize_and_misshapen_bodies(project: Project) -> None:
    async with project.client() as c:
        dataset_id = await new_dataset(c)
        url = f"/datasets/{dataset_id}/entries"
        headers = {"Content-Type": "application/json"}
        assert_error(await c.post(url, content=b'{"entries": [', headers=headers), 400, "JSON")
        assert_error(await c.post(url, content=b"", headers=headers), 400)
        assert_error(await c.post(url, json={"entries": {"messages": []}}), 400, "entries")
        assert_error(await c.post(url, json={"rows": []}), 400, "entries")
        assert_error(await c.post(url, json=[row("q")]), 400)

        many = [{"messages": [{"role": "user", "content": f"{i}"}, {"role": "assistant", "content": "a"}]}
                for i in range(10_001)]  # fmt: skip
        body = assert_error(await c.post(url, json={"entries": many}), 400, "10001", "10000")
        assert body["error"]["param"] == "entries" and body["error"]["code"] == "too_many_entries"
        assert (await c.get(f"/datasets/{dataset_id}")).json()["dataset_entry_count"] == 0

        created = await add(c, dataset_id, many[:10_000])  # exactly the limit is fine
        assert created["entries_created"] == 10_000 and created["errors"]["data"] == []

        assert_error(await c.post("/datasets/ds_nope/entries", json={"entries": [row("q")]}), 404, "ds_nope")
        assert_error(await c.post("/datasets", content=b"{name: 1}", headers=headers), 400)


async def test_split_is_deterministic_and_roughly_ninety_ten(project: Project) -> None:
    rows = [row(f"Question number {i}: what is {i} * 7?", f"{i * 7}") for i in range(1000)]
    async with project.client() as c:
        first, second = await new_dataset(c, "one"), await new_dataset(c, "two")
        assert (await add(c, first, rows))["entries_created"] == 1000
        assert (await add(c, second, list(reversed(rows))))["entries_created"] == 1000
        one = {e["output"]["content"]: e["split"] for e in await all_entries(c, first)}
        two = {e["output"]["content"]: e["split"] for e in await all_entries(c, second)}
        assert one == two  # same row, same split, whatever the order or dataset
        for answer, split in one.items():  # and it is the documented content-hash rule
            assert split == automatic_split(parse_entry(rows[int(answer) // 7]).content_hash)
        tests = sum(1 for split in one.values() if split == "TEST")
        assert 60 <= tests <= 140, tests  # expected 100; ±4 standard deviations
        stats = (await c.get(f"/datasets/{first}")).json()
        assert stats["test_entry_count"] == tests and stats["train_entry_count"] == 1000 - tests

        explicit = await new_dataset(c, "explicit")
        chosen = [{**r, "split": "TEST" if i % 2 else "TRAIN"} for i, r in enumerate(rows[:100])]
        await add(c, explicit, chosen)
        got = {e["output"]["content"]: e["split"] for e in await all_entries(c, explicit)}
        assert got == {r["messages"][-1]["content"]: r["split"] for r in chosen}


async def test_concurrent_adds_of_the_same_rows_do_not_duplicate(project: Project) -> None:
    rows = [row(f"concurrent {i}") for i in range(300)]
    async with project.client() as c:
        dataset_id = await new_dataset(c)
        results = await asyncio.gather(*(add(c, dataset_id, rows) for _ in range(4)))
        assert sum(r["entries_created"] for r in results) == 300
        assert (await c.get(f"/datasets/{dataset_id}")).json()["dataset_entry_count"] == 300


# --- listing ---------------------------------------------------------------------------------


async def test_filters_search_and_pagination(project: Project) -> None:
    rows = [
        row(f"Filler question {i}", f"filler {i}", metadata={"prompt_id": "a" if i % 2 else "b"})
        for i in range(40)
    ]
    rows += [
        row("Capital of Tasmania?", "HOBART is the capital", metadata={"prompt_id": "capitals", "k.x": "1"}),
        row("Où est le café?", "Le CAFÉ est ici", split="TEST"),
        row('A "quoted" 100% match_', "ok"),
    ]
    async with project.client() as c:
        dataset_id = await new_dataset(c)
        assert (await add(c, dataset_id, rows))["entries_created"] == 43
        everything = await all_entries(c, dataset_id)
        order = [e["id"] for e in everything]
        assert len(order) == 43 and order == [e["id"] for e in await all_entries(c, dataset_id)]

        pages = await walk(c, dataset_id, limit=7)
        assert [len(p) for p in pages] == [7, 7, 7, 7, 7, 7, 1]
        assert [e["id"] for p in pages for e in p] == order  # complete, no overlap, same order
        pages = await walk(c, dataset_id, limit=43)
        assert len(pages) == 1 and len(pages[0]) == 43

        async def ids(**params: object) -> set[str]:
            return {e["id"] for e in await all_entries(c, dataset_id, **params)}

        assert len(await ids(**{"metadata.prompt_id": "a"})) == 20
        assert len(await ids(**{"metadata.prompt_id": "capitals"})) == 1
        assert len(await ids(**{"metadata.k.x": "1"})) == 1
        assert await ids(**{"metadata.prompt_id": "zzz"}) == set()
        hobart = await all_entries(c, dataset_id, search="hobart")
        assert [e["output"]["content"] for e in hobart] == ["HOBART is the capital"]
        assert len(await ids(search="TASMANIA")) == 1
        assert len(await ids(search="café")) == 1  # non-ASCII, and case-insensitive
        assert len(await ids(search='"quoted" 100% match_')) == 1  # quotes and LIKE wildcards literal
        assert len(await ids(search="100%")) == 1 and await ids(search="_%") == set()
        assert await ids(search="content") == await ids(search="system") == set()  # keys, roles: not text
        assert len(await ids(search="assistant")) == 43  # in the system prompt of every row
        assert len(await ids(search="filler 1")) == 11  # filler 1, 10..19
        assert await ids(split="TEST") >= await ids(search="café")
        assert len(await ids(split="TEST")) + len(await ids(split="TRAIN")) == 43
        assert len(await ids(source="api")) == 43 and await ids(source="upload") == set()
        assert len(await ids(provenance="api")) == 43 and await ids(provenance="relabeled_by_human") == set()
        both = await ids(**{"metadata.prompt_id": "b", "search": "filler 1"})
        assert len(both) == 5  # filler 10, 12, 14, 16, 18

        # filters and pages together: the union of pages is the filtered set
        paged = await walk(c, dataset_id, limit=3, search="FILLER", **{"metadata.prompt_id": "a"})
        flat = [e["id"] for p in paged for e in p]
        assert len(flat) == len(set(flat)) == 20 and set(flat) == await ids(**{"metadata.prompt_id": "a"})

        url = f"/datasets/{dataset_id}/entries"
        assert_error(await c.get(url, params={"colour": "red"}), 400, "colour")
        assert_error(await c.get(url, params={"metadata": "x"}), 400, "'metadata'")
        assert_error(await c.get(url, params={"split": "VALID"}), 400, "split", "TRAIN")
        assert_error(await c.get(url, params={"provenance": "magic"}), 400, "provenance")
        assert_error(await c.get(url, params={"source": "ftp"}), 400, "source")
        for limit in ("0", "1001", "ten", "-1"):
            assert_error(await c.get(url, params={"limit": limit}), 400, "limit")
        assert_error(await c.get(url, params=[("split", "TEST"), ("split", "TRAIN")]), 400, "split")
        assert_error(await c.get(url, params={"cursor": "dse_unknown"}), 400, "cursor")
        other = await new_dataset(c, "other")
        assert_error(await c.get(f"/datasets/{other}/entries", params={"cursor": order[0]}), 400, "cursor")
        assert (await c.get(url, params={"limit": 1000, "cursor": order[-1]})).json()["data"] == []


# --- editing ---------------------------------------------------------------------------------


async def test_human_edit_keeps_revisions_and_can_make_a_preference_pair(project: Project) -> None:
    async with project.client() as c:
        dataset_id = await new_dataset(c)
        await add(c, dataset_id, [row("Capital of Tasmania?", "Paris", split="TEST", metadata={"a": "1"})])
        [entry] = await all_entries(c, dataset_id)
        url = f"/datasets/{dataset_id}/entries/{entry['id']}"
        fetched = (await c.get(url)).json()
        assert fetched["revisions"] == [] and {k: v for k, v in fetched.items() if k != "revisions"} == {
            k: v for k, v in entry.items() if k != "revisions"
        }

        response = await c.patch(
            url, json={"output": {"role": "assistant", "content": "Hobart, on the Derwent"}}
        )
        assert response.status_code == 200, response.text
        edited = response.json()
        assert edited["output"] == {"role": "assistant", "content": "Hobart, on the Derwent"}
        assert (
            edited["messages"][:-1] == entry["messages"][:-1] and edited["messages"][-1] == edited["output"]
        )
        assert edited["provenance"] == "relabeled_by_human" and edited["source"] == "api"
        assert edited["revision"] == 2 and edited["split"] == "TEST" and edited["rejected_message"] is None
        assert edited["output_tokens"] > entry["output_tokens"]
        assert edited["prompt_tokens"] == entry["prompt_tokens"]
        [revision] = edited["revisions"]
        assert set(revision) == {
            "revision",
            "output",
            "rejected_message",
            "provenance",
            "relabel_model",
            "created",
        }
        assert revision["revision"] == 1 and revision["output"] == {"role": "assistant", "content": "Paris"}
        assert revision["provenance"] == "api" and revision["relabel_model"] is None
        assert (await c.get(url)).json() == edited
        assert [e["id"] for e in await all_entries(c, dataset_id, provenance="relabeled_by_human")] == [
            entry["id"]
        ]

        # track_rejected: the replaced output becomes the rejected one (a DPO pair)
        stats = (await c.get(f"/datasets/{dataset_id}")).json()
        assert (stats["sft_entry_count"], stats["preference_entry_count"]) == (1, 0)
        response = await c.patch(
            url, json={"output": {"role": "assistant", "content": "Hobart"}, "track_rejected": True}
        )
        assert response.status_code == 200, response.text
        pair = response.json()
        assert pair["rejected_message"] == edited["output"] and pair["output"]["content"] == "Hobart"
        assert pair["revision"] == 3 and [r["revision"] for r in pair["revisions"]] == [1, 2]
        assert pair["revisions"][1]["provenance"] == "relabeled_by_human"
        stats = (await c.get(f"/datasets/{dataset_id}")).json()
        assert (stats["sft_entry_count"], stats["preference_entry_count"]) == (0, 1)

        # metadata merges (null removes a key); split changes only when given
        response = await c.patch(url, json={"metadata": {"a": None, "b": "2"}, "split": "TRAIN"})
        assert response.json()["metadata"] == {"b": "2"} and response.json()["split"] == "TRAIN"
        assert response.json()["revision"] == 3  # no new output, no new revision

        # the whole conversation, and clearing the rejected output
        conversation = [
            {"role": "user", "content": "Capital of Tasmania, Australia?"},
            {"role": "assistant", "content": "Hobart"},
        ]
        response = await c.patch(url, json={"messages": conversation, "rejected_message": None})
        assert response.status_code == 200, response.text
        redone = response.json()
        assert redone["messages"] == conversation and redone["rejected_message"] is None
        assert redone["revision"] == 3  # the output did not change
        assert redone["prompt_tokens"] != pair["prompt_tokens"]
        response = await c.patch(url, json={"rejected_message": {"role": "assistant", "content": "Paris"}})
        assert response.json()["rejected_message"] == {"role": "assistant", "content": "Paris"}

        # the edited row is now a duplicate of the same row sent again
        assert (await add(c, dataset_id, [{"messages": conversation}]))["entries_created"] == 0

        assistant = {"role": "assistant", "content": "x"}
        assert_error(await c.patch(url, json={"output": {"role": "user", "content": "x"}}), 400, "assistant")
        assert_error(await c.patch(url, json={"output": assistant, "messages": conversation}), 400, "either")
        assert_error(await c.patch(url, json={"track_rejected": True}), 400, "track_rejected")
        assert_error(
            await c.patch(
                url, json={"output": {"role": "assistant", "content": "Hobart"}, "track_rejected": True}
            ),
            400,
            "different",
        )
        assert_error(
            await c.patch(url, json={"output": assistant, "track_rejected": True, "rejected_message": None}),
            400,
            "track_rejected",
        )
        assert_error(
            await c.patch(url, json={"messages": [conversation[0], conversation[0]]}), 400, "assistant"
        )
        assert_error(await c.patch(url, json={"split": None}), 400, "split")
        assert_error(await c.patch(url, json={"split": "VALID"}), 400, "split")
        assert_error(await c.patch(url, json={"metadata": {"n": 1}}), 400, "metadata")
        assert_error(await c.patch(url, json={"provenance": "api"}), 400, "provenance")
        assert (await c.get(url)).json()["revision"] == 3  # failed edits changed nothing


async def test_counts_and_token_totals(project: Project) -> None:
    rows = [row(f"q{i}", f"a{i}", split="TRAIN") for i in range(5)]
    rows += [row(f"p{i}", f"good {i}", split="TEST", rejected_message={"role": "assistant", "content": "bad"})
             for i in range(3)]  # fmt: skip
    rows += [row(f"t{i}", f"b{i}", split="TEST") for i in range(2)]
    async with project.client() as c:
        dataset_id = await new_dataset(c)
        await add(c, dataset_id, rows)
        entries = await all_entries(c, dataset_id)
        stats = (await c.get(f"/datasets/{dataset_id}")).json()
        assert stats["dataset_entry_count"] == 10
        assert (stats["train_entry_count"], stats["test_entry_count"]) == (5, 5)
        assert (stats["sft_entry_count"], stats["preference_entry_count"]) == (7, 3)
        assert stats["prompt_tokens"] == sum(e["prompt_tokens"] for e in entries) > 0
        assert stats["output_tokens"] == sum(e["output_tokens"] for e in entries) > 0
        [listed] = (await c.get("/datasets")).json()["data"]
        assert listed == stats


# --- deleting --------------------------------------------------------------------------------


async def count(running: RunningPlatform, table: type, *where: object) -> int:
    async with running.platform.state["sessions"]() as session:
        return await session.scalar(select(func.count()).select_from(table).where(*where))


async def test_deletes_cascade(running: RunningPlatform, project: Project) -> None:
    async with project.client() as c:
        dataset_id = await new_dataset(c)
        await add(c, dataset_id, [row(f"q{i}") for i in range(6)])
        entries = await all_entries(c, dataset_id)
        first = entries[0]["id"]
        url = f"/datasets/{dataset_id}/entries/{first}"
        await c.patch(url, json={"output": {"role": "assistant", "content": "better"}})
        assert await count(running, DatasetEntryRevision, DatasetEntryRevision.entry_id == first) == 1

        response = await c.delete(url)
        assert response.status_code == 200, response.text
        assert response.json() == {"id": first, "object": "dataset.entry", "deleted": True}
        assert await count(running, DatasetEntryRevision, DatasetEntryRevision.entry_id == first) == 0
        assert_error(await c.get(url), 404, first)
        assert_error(await c.delete(url), 404)
        assert_error(await c.patch(url, json={"split": "TEST"}), 404)

        doomed = [entries[1]["id"], entries[2]["id"]]
        response = await c.post(
            f"/datasets/{dataset_id}/entries/delete", json={"ids": [*doomed, doomed[0], first, "dse_nope"]}
        )
        assert response.status_code == 200, response.text
        assert response.json() == {
            "object": "dataset.entries.deletion",
            "deleted": 2,
            "not_found": [first, "dse_nope"],
        }
        assert (await c.get(f"/datasets/{dataset_id}")).json()["dataset_entry_count"] == 3
        assert_error(await c.post(f"/datasets/{dataset_id}/entries/delete", json={"ids": "x"}), 400, "ids")

        remaining = [e["id"] for e in await all_entries(c, dataset_id)]
        await c.patch(
            f"/datasets/{dataset_id}/entries/{remaining[0]}",
            json={"output": {"role": "assistant", "content": "z"}},
        )
        async with running.platform.state["sessions"].begin() as session:
            await jobs.create_job(
                session=session, project_id=project.id, dataset_id=dataset_id, kind="export"
            )
        assert (await c.delete(f"/datasets/{dataset_id}")).json()["deleted"] is True
    assert await count(running, DatasetEntry, DatasetEntry.dataset_id == dataset_id) == 0
    assert await count(running, DatasetEntryRevision, DatasetEntryRevision.entry_id.in_(remaining)) == 0
    assert await count(running, DatasetJob, DatasetJob.dataset_id == dataset_id) == 0


# --- jobs ------------------------------------------------------------------------------------


async def test_jobs(running: RunningPlatform, project: Project) -> None:
    async with project.client() as c:
        dataset_id, other = await new_dataset(c), await new_dataset(c, "other")
        sessions = running.platform.state["sessions"]
        async with sessions.begin() as session:
            job = await jobs.create_job(
                session=session, project_id=project.id, dataset_id=dataset_id, kind="upload", total=10
            )
            jobs.record_progress(job, done=7, errors=[{"line": 3, "message": "bad row"}], status="running")
        response = await c.get(f"/datasets/{dataset_id}/jobs/{job.id}")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body == {
            "object": "dataset.job",
            "id": job.id,
            "kind": "upload",
            "status": "running",
            "progress": {"done": 7, "total": 10},
            "errors": [{"line": 3, "message": "bad row"}],
            "error_count": 1,
            "result": {},
            "created": body["created"],
            "updated": body["updated"],
        }
        assert datetime.fromisoformat(body["created"]).tzinfo is not None
        assert (await c.get(f"/datasets/{dataset_id}/jobs")).json() == {"object": "list", "data": [body]}
        assert (await c.get(f"/datasets/{other}/jobs")).json() == {"object": "list", "data": []}
        assert_error(await c.get(f"/datasets/{other}/jobs/{job.id}"), 404, job.id)
        assert_error(await c.get(f"/datasets/{dataset_id}/jobs/job_nope"), 404)


# --- isolation -------------------------------------------------------------------------------


async def test_another_projects_ids_are_not_found_anywhere(running: RunningPlatform, make_project) -> None:
    owner, stranger = await make_project(), await make_project()
    async with owner.client() as c:
        dataset_id = await new_dataset(c, "private")
        await add(c, dataset_id, [row("secret question", "secret answer")])
        [entry] = await all_entries(c, dataset_id)
    async with running.platform.state["sessions"].begin() as session:
        job = await jobs.create_job(
            session=session, project_id=owner.id, dataset_id=dataset_id, kind="export"
        )
    base, entry_url = f"/datasets/{dataset_id}", f"/datasets/{dataset_id}/entries/{entry['id']}"
    async with stranger.client() as c:
        assert (await c.get("/datasets")).json() == {"object": "list", "data": []}
        assert (await c.get("/unstable/dataset/list")).json() == []
        for response in (
            await c.get(base),
            await c.patch(base, json={"name": "mine now"}),
            await c.delete(base),
            await c.post(f"{base}/entries", json={"entries": [row("q")]}),
            await c.get(f"{base}/entries"),
            await c.post(f"{base}/entries/delete", json={"ids": [entry["id"]]}),
            await c.get(entry_url),
            await c.patch(entry_url, json={"split": "TEST"}),
            await c.delete(entry_url),
            await c.get(f"{base}/jobs"),
            await c.get(f"{base}/jobs/{job.id}"),
            await c.post("/unstable/dataset/delete", json={"datasetId": dataset_id}),
            await c.post(
                "/unstable/dataset-entry/create", json={"datasetId": dataset_id, "entries": [row("q")]}
            ),
        ):
            assert_error(response, 404, dataset_id)
            assert "secret" not in response.text
        # and another dataset of the stranger's own does not reach into the owner's entries
        mine = await new_dataset(c, "mine")
        assert_error(await c.get(f"/datasets/{mine}/entries/{entry['id']}"), 404, entry["id"])
        assert_error(await c.delete(f"/datasets/{mine}/entries/{entry['id']}"), 404)
        response = await c.post(f"/datasets/{mine}/entries/delete", json={"ids": [entry["id"]]})
        assert response.json()["deleted"] == 0
    async with owner.client() as c:
        body = (await c.get(base)).json()
        assert body["name"] == "private" and body["dataset_entry_count"] == 1
        assert (await c.get(entry_url)).json()["split"] == entry["split"]


# --- deprecated /unstable routes -------------------------------------------------------------


async def test_unstable_routes_through_the_sdk(project: Project) -> None:
    api = sdk(project).base_client
    created = await api.unstable_dataset_create(name="legacy")
    dataset_id = created.dataset_id
    [item] = await api.unstable_dataset_list()
    assert item.id == dataset_id and item.name == "legacy" and item.dataset_entry_count == 0
    assert isinstance(item.created_at, datetime) and item.created_at.tzinfo is not None
    assert item.fine_tune_count == 0

    legacy = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "function_call": {"name": "weather", "arguments": "{}"}},
        ],
        "functions": [{"name": "weather", "parameters": {"type": "object"}}],
        "function_call": {"name": "weather"},
        "judgement": "PASS",
    }
    result = await api.unstable_dataset_entry_create(
        dataset_id=dataset_id,
        entries=[row("q1", "a1", split="TEST"), {"messages": [{"role": "user", "content": "?"}]}, legacy],
    )
    assert result.created_entries == 2
    assert [(int(e.index), "assistant" in e.message) for e in result.errors] == [(1, True)]
    [item] = await api.unstable_dataset_list()
    assert item.dataset_entry_count == 2

    async with project.client() as c:
        raw = (await c.get("/unstable/dataset/list")).json()
        assert set(raw[0]) == {"id", "name", "createdAt", "updatedAt", "datasetEntryCount", "fineTuneCount"}
        entries = await all_entries(c, dataset_id)
        tool = next(e for e in entries if e["tools"])
        assert tool["tools"] == [
            {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
        ]
        assert tool["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
        assert tool["output"]["tool_calls"][0]["function"]["name"] == "weather"
        bad = await c.post("/unstable/dataset-entry/create", json={"datasetId": dataset_id, "entries": [
            row("q", metadata={"n": 2})
        ]})  # fmt: skip
        assert_error(bad, 400, "Input validation failed", "entries.0.metadata.n")
        assert_error(await c.post("/unstable/dataset/create", json={"name": ""}), 400, "name")
        assert_error(await c.post("/unstable/dataset/delete", json={}), 400, "datasetId")

    deleted = await api.unstable_dataset_delete(dataset_id=dataset_id)
    assert deleted.dataset_id == dataset_id
    assert await api.unstable_dataset_list() == []
    with pytest.raises(ApiError) as exc:
        await api.unstable_dataset_delete(dataset_id=dataset_id)
    assert exc.value.status_code == 404


# --- both databases --------------------------------------------------------------------------


async def test_dataset_service_on_both_databases(database_url: str) -> None:
    await migrate(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions.begin() as session:
            project = await projects.create_project(session=session, name="team")
            dataset = await service.create_dataset(session=session, project_id=project.id, name="d")
            result = await service.add_entries(
                session=session,
                dataset=dataset,
                source="api",
                rows=[
                    row("Capital of Tasmania?", "Hobart", metadata={'odd "key".x': "v", "p": "1"}),
                    row("Où est le CAFÉ?", "ici", rejected_message={"role": "assistant", "content": "là"}),
                    *[row(f"filler {i}", split="TEST") for i in range(10)],
                ],
            )
        assert result.created == 12 and not result.errors
        async with sessions() as session:
            stats = (await service.dataset_stats(session=session, dataset_ids=[dataset.id]))[dataset.id]
            assert (stats.entries, stats.preference, stats.sft, stats.test) == (12, 1, 11, stats.test)
            assert stats.test >= 10 and stats.prompt_tokens > 0

            async def listed(**kwargs: object) -> list[DatasetEntry]:
                entries, _ = await service.list_entries(
                    session=session, dataset=dataset, filters=EntryFilters(limit=1000, **kwargs)
                )
                return entries

            assert len(await listed(metadata={'odd "key".x': "v"})) == 1
            assert len(await listed(metadata={"p": "1", 'odd "key".x': "v"})) == 1
            assert len(await listed(metadata={"p": "2"})) == 0
            assert len(await listed(search="café")) == 1 and len(await listed(search="HOBART")) == 1
            assert len(await listed(search="user")) == 0
            ordered = [e.id for e in await listed()]
            paged, cursor = [], None
            while True:
                page, more = await service.list_entries(
                    session=session, dataset=dataset, filters=EntryFilters(limit=5, cursor=cursor)
                )
                paged += [e.id for e in page]
                if not more:
                    break
                cursor = page[-1].id
            assert paged == ordered
            hobart = (await listed(search="hobart"))[0]
        async with sessions.begin() as session:
            dataset = await service.lock_dataset(
                session=session, project_id=project.id, dataset_id=dataset.id
            )
            update = EntryUpdate.model_validate(
                {"output": {"role": "assistant", "content": "Hobart!"}, "track_rejected": True}
            )
            entry = await service.update_entry(
                session=session, dataset=dataset, entry_id=hobart.id, update=update
            )
            assert entry.revision == 2 and entry.rejected_message == {
                "role": "assistant",
                "content": "Hobart",
            }
        async with sessions() as session:
            stats = (await service.dataset_stats(session=session, dataset_ids=[dataset.id]))[dataset.id]
            assert stats.preference == 2
            assert len(await service.entry_revisions(session=session, entry_id=hobart.id)) == 1
            with pytest.raises(APIError) as exc:
                await service.get_dataset(session=session, project_id="prj_other", dataset_id=dataset.id)
            assert exc.value.status_code == 404
        async with sessions.begin() as session:
            await service.delete_dataset(session=session, project_id=project.id, dataset_id=dataset.id)
        async with sessions() as session:
            for table in (Dataset, DatasetEntry, DatasetEntryRevision):
                assert await session.scalar(select(func.count()).select_from(table)) == 0
    finally:
        await engine.dispose()
