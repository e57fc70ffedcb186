"""Pruning rules: a dataset's ordered rules, their preview, and their copy onto a deployment."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import insert

from services.api.datasets.models import Dataset, DatasetEntry
from services.api.datasets.rows import parse_entry
from services.api.datasets.service import draft_values
from services.common.clock import now
from services.common.ids import new_id
from tests.conftest import Project, RunningPlatform
from tests.fake_upstream import OPENAI_KEY, FakeUpstream
from tests.helpers import sdk, wait_for_router


def tokens(value: Any) -> int:
    """~4 characters per token of compact JSON (an independent restatement of the estimator)."""
    return (len(json.dumps(value, separators=(",", ":"), ensure_ascii=False)) + 3) // 4


@pytest.fixture
def make_dataset(running: RunningPlatform) -> Callable[..., Awaitable[str]]:
    """A dataset of the project holding ``rows`` (OpenAI fine-tuning rows), oldest first."""

    async def make(project: Project, rows: list[dict] | None = None) -> str:
        moment = now()
        async with running.platform.state["sessions"].begin() as session:
            dataset = Dataset(
                id=new_id("ds"), project_id=project.id, name="pruning", created_at=moment, updated_at=moment
            )
            session.add(dataset)
            await session.flush()
            values = []
            for i, row in enumerate(rows or []):
                value = draft_values(
                    parse_entry(row),
                    dataset_id=dataset.id,
                    source="api",
                    entry_id=new_id("dse"),
                    moment=moment + timedelta(seconds=i),
                )
                values.append(value)
            if values:
                await session.execute(insert(DatasetEntry), values)
        return dataset.id

    return make


async def add_rule(client, dataset_id: str, text: str, position: int | None = None) -> dict:
    body: dict[str, Any] = {"text": text}
    if position is not None:
        body["position"] = position
    response = await client.post(f"/datasets/{dataset_id}/pruning-rules", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def listed(client, dataset_id: str) -> list[tuple[int, str]]:
    response = await client.get(f"/datasets/{dataset_id}/pruning-rules")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return [(rule["position"], rule["text"]) for rule in body["data"]]


# --- CRUD and order ------------------------------------------------------------------------------


async def test_rules_are_ordered_and_positions_stay_dense(project: Project, make_dataset) -> None:
    dataset_id = await make_dataset(project)
    async with project.client() as client:
        assert await listed(client, dataset_id) == []
        a = await add_rule(client, dataset_id, "A")
        assert a["object"] == "pruning_rule" and a["dataset_id"] == dataset_id and a["position"] == 0
        assert a["id"].startswith("prr_") and a["created"]
        b = await add_rule(client, dataset_id, "B")
        c = await add_rule(client, dataset_id, "C", position=0)  # inserted first
        d = await add_rule(client, dataset_id, "D", position=99)  # past the end: appended
        assert (b["position"], c["position"], d["position"]) == (1, 0, 3)
        assert await listed(client, dataset_id) == [(0, "C"), (1, "A"), (2, "B"), (3, "D")]

        moved = await client.patch(f"/pruning-rules/{d['id']}", json={"position": 1})
        assert moved.status_code == 200 and moved.json()["position"] == 1
        assert await listed(client, dataset_id) == [(0, "C"), (1, "D"), (2, "A"), (3, "B")]
        moved = await client.patch(f"/pruning-rules/{c['id']}", json={"position": 50, "text": "C2"})
        assert moved.json() == {**c, "position": 3, "text": "C2"}
        assert await listed(client, dataset_id) == [(0, "D"), (1, "A"), (2, "B"), (3, "C2")]

        deleted = await client.delete(f"/pruning-rules/{a['id']}")
        assert deleted.status_code == 200
        assert deleted.json() == {"id": a["id"], "object": "pruning_rule", "deleted": True}
        assert await listed(client, dataset_id) == [(0, "D"), (1, "B"), (2, "C2")]
        again = await client.delete(f"/pruning-rules/{a['id']}")
        assert again.status_code == 404


async def test_bad_input_and_other_projects(
    project: Project, make_project: Callable[[], Awaitable[Project]], make_dataset
) -> None:
    dataset_id = await make_dataset(project)
    stranger = await make_project()
    async with project.client() as client:
        rule = await add_rule(client, dataset_id, "keep")
        for body, param in (
            ({"text": ""}, "text"),
            ({}, "text"),
            ({"text": "x", "position": -1}, "position"),
            ({"text": "x", "extra": 1}, "extra"),
        ):
            response = await client.post(f"/datasets/{dataset_id}/pruning-rules", json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param
        response = await client.patch(f"/pruning-rules/{rule['id']}", json={"text": None})
        assert response.status_code == 400 and response.json()["error"]["param"] == "text"
        response = await client.post(
            f"/datasets/{dataset_id}/pruning-rules/preview", json={"rule_ids": ["nope"]}
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "rule_ids.0"
        assert (await client.get("/datasets/ds_missing/pruning-rules")).status_code == 404
    async with stranger.client() as client:  # another project's dataset and rules are not found
        assert (await client.get(f"/datasets/{dataset_id}/pruning-rules")).status_code == 404
        response = await client.post(f"/datasets/{dataset_id}/pruning-rules", json={"text": "x"})
        assert response.status_code == 404
        assert (await client.patch(f"/pruning-rules/{rule['id']}", json={"text": "y"})).status_code == 404
        assert (await client.delete(f"/pruning-rules/{rule['id']}")).status_code == 404
        response = await client.post(f"/datasets/{dataset_id}/pruning-rules/preview", json={})
        assert response.status_code == 404
    async with project.client() as client:
        assert await listed(client, dataset_id) == [(0, "keep")]


# --- preview -------------------------------------------------------------------------------------

SYSTEM = "You are Acme's assistant. Answer briefly."
CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
ROWS = [
    {  # the system message is only the rule text: dropped
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Where is my order?"},
            {"role": "assistant", "content": "On its way."},
        ]
    },
    {  # rule text inside a longer message, twice
        "messages": [
            {"role": "user", "content": f"{SYSTEM} Refund? {SYSTEM}"},
            {"role": "assistant", "content": "Yes."},
        ]
    },
    {  # nothing to prune
        "messages": [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
        ]
    },
    {  # emptied, but it carries tool calls: kept
        "messages": [
            {"role": "user", "content": "Look it up"},
            {"role": "assistant", "content": SYSTEM, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "found"},
            {"role": "assistant", "content": "Found it."},
        ]
    },
]


async def test_preview_numbers_are_exact(project: Project, make_dataset) -> None:
    dataset_id = await make_dataset(project, ROWS)
    inputs = [row["messages"][:-1] for row in ROWS]
    pruned = [
        [{"role": "user", "content": "Where is my order?"}],
        [{"role": "user", "content": " Refund? "}],
        inputs[2],
        [
            {"role": "user", "content": "Look it up"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "found"},
        ],
    ]
    assert tokens(inputs[2]) == 9  # [{"role":"user","content":"Hello"}] is 35 characters
    async with project.client() as client:
        rule = await add_rule(client, dataset_id, SYSTEM)
        unused = await add_rule(client, dataset_id, "never appears anywhere")
        response = await client.post(f"/datasets/{dataset_id}/pruning-rules/preview", json={"limit": 3})
        assert response.status_code == 200, response.text
        preview = response.json()
        assert preview["object"] == "pruning_rules.preview" and preview["dataset_id"] == dataset_id
        assert preview["rule_ids"] == [rule["id"], unused["id"]]
        before = [tokens(m) for m in inputs]
        after = [tokens(m) for m in pruned]
        assert preview["totals"] == {
            "entries": 4,
            "entries_affected": 3,
            "tokens_before": sum(before),
            "tokens_after": sum(after),
            "tokens_saved": sum(before) - sum(after),
        }
        assert sum(before) - sum(after) > 0
        assert [entry["messages"] for entry in preview["data"]] == pruned[:3]  # first 3, oldest first
        assert [entry["affected"] for entry in preview["data"]] == [True, True, False]
        for entry, b, a in zip(preview["data"], before, after, strict=False):
            assert (entry["tokens_before"], entry["tokens_after"], entry["tokens_saved"]) == (b, a, b - a)

        # only the unused rule: nothing changes
        response = await client.post(
            f"/datasets/{dataset_id}/pruning-rules/preview", json={"rule_ids": [unused["id"]], "limit": 0}
        )
        only = response.json()
        assert only["rule_ids"] == [unused["id"]] and only["data"] == []
        assert only["totals"]["entries_affected"] == 0 and only["totals"]["tokens_saved"] == 0

        # order matters: "Answer briefly." first leaves the longer rule nothing to match in row 1
        await add_rule(client, dataset_id, " Answer briefly.", position=0)
        response = await client.post(f"/datasets/{dataset_id}/pruning-rules/preview", json={"limit": 1})
        [first] = response.json()["data"]
        assert first["messages"] == [
            {"role": "system", "content": "You are Acme's assistant."},
            {"role": "user", "content": "Where is my order?"},
        ]


# --- copied onto a deployment --------------------------------------------------------------------

RULE_1 = "You are an expert support agent for Acme."
RULE_2 = " Follow the style guide strictly."


@pytest.fixture
async def routed(project: Project) -> Project:
    async with project.client() as client:
        response = await client.put("/provider-keys", json={"openai": OPENAI_KEY})
        assert response.status_code == 200, response.text
    await wait_for_router(project)
    return project


def deployment(fake_upstream: FakeUpstream, **extra: Any) -> dict:
    return {"baseUrl": f"{fake_upstream.base_url}/v1", "model": "support-lora", "apiKey": OPENAI_KEY, **extra}


async def test_deployment_copies_rules_and_later_edits_do_not_touch_it(
    routed: Project, fake_upstream: FakeUpstream, make_dataset
) -> None:
    dataset_id = await make_dataset(routed)
    async with routed.client() as client:
        r1 = await add_rule(client, dataset_id, RULE_1)
        r2 = await add_rule(client, dataset_id, RULE_2)
        r3 = await add_rule(client, dataset_id, "Where")
        body = deployment(fake_upstream, datasetId=dataset_id, pruningRuleIds=[r2["id"], r1["id"]])
        response = await client.put("/deployments/copied-ft", json=body)
        assert response.status_code == 201, response.text
        assert response.json()["pruningRules"] == [RULE_1, RULE_2]  # the dataset's order

        # later edits of the dataset's rules leave the deployment alone
        assert (await client.patch(f"/pruning-rules/{r1['id']}", json={"text": "Acme"})).status_code == 200
        assert (await client.patch(f"/pruning-rules/{r2['id']}", json={"position": 0})).status_code == 200
        assert (await client.delete(f"/pruning-rules/{r3['id']}")).status_code == 200
        await add_rule(client, dataset_id, "order")
        response = await client.get("/deployments/copied-ft")
        assert response.json()["pruningRules"] == [RULE_1, RULE_2]

    await wait_for_router(routed, "openpipe:copied-ft")
    messages = [
        {"role": "system", "content": RULE_1 + RULE_2},
        {"role": "user", "content": f"{RULE_1} Where is my order?"},
    ]
    await sdk(routed).chat.completions.create(model="openpipe:copied-ft", messages=messages)
    sent = fake_upstream.last("/v1/chat/completions").body
    assert sent["model"] == "support-lora"
    assert sent["messages"] == [{"role": "user", "content": " Where is my order?"}]  # old rules only

    async with routed.client() as client:  # a new copy takes the rules as they are now
        response = await client.put(
            "/deployments/copied-ft", json=deployment(fake_upstream, datasetId=dataset_id)
        )
        assert response.status_code == 200, response.text
        assert response.json()["pruningRules"] == [RULE_2, "Acme", "order"]


async def test_deployment_rule_copy_errors(
    project: Project,
    make_project: Callable[[], Awaitable[Project]],
    fake_upstream: FakeUpstream,
    make_dataset,
) -> None:
    dataset_id = await make_dataset(project)
    other_dataset = await make_dataset(project)
    stranger_dataset = await make_dataset(await make_project())
    async with project.client() as client:
        rule = await add_rule(client, dataset_id, "static text")
        elsewhere = await add_rule(client, other_dataset, "other text")
        for extra, status, param in (
            ({"pruningRuleIds": [rule["id"]]}, 400, "datasetId"),
            ({"datasetId": dataset_id, "pruningRuleIds": [rule["id"], "prr_nope"]}, 400, "pruningRuleIds.1"),
            ({"datasetId": dataset_id, "pruningRuleIds": [elsewhere["id"]]}, 400, "pruningRuleIds.0"),
            ({"datasetId": dataset_id, "pruningRules": ["x"]}, 400, "pruningRules"),
            ({"datasetId": stranger_dataset}, 404, "datasetId"),
        ):
            response = await client.put("/deployments/bad-copy", json=deployment(fake_upstream, **extra))
            assert response.status_code == status, response.text
            assert response.json()["error"]["param"] == param
        assert (await client.get("/deployments/bad-copy")).status_code == 404  # nothing half-written
        response = await client.put(
            "/deployments/empty-copy", json=deployment(fake_upstream, datasetId=dataset_id, pruningRuleIds=[])
        )
        assert response.status_code == 201 and response.json()["pruningRules"] == []
