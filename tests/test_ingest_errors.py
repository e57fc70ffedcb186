"""Unhappy paths of the ingest API: auth, isolation, bad input, oversize bodies. Nothing half-written."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Project, wait_for_count
from tests.helpers import assert_error, openai_body, report_all


async def test_missing_or_wrong_key_is_401_and_never_echoed(project: Project) -> None:
    async with httpx.AsyncClient(base_url=project.base_url) as anonymous:
        assert_error(await anonymous.post("/report", json=openai_body()), 401, "Missing API key")
        wrong = "opk_definitely-not-a-real-key-1234567890"
        response = await anonymous.get("/logs", headers={"Authorization": f"Bearer {wrong}"})
        assert_error(response, 401, "Invalid API key")
        assert wrong not in response.text
        assert_error(await anonymous.get("/logs", headers={"Authorization": "Basic abc"}), 401)


async def test_one_project_never_sees_another(make_project) -> None:
    a, b = await make_project(), await make_project()
    async with a.client() as client_a, b.client() as client_b:
        await report_all(client_a, [openai_body(completion_id="secret-a", metadata={"who": "a"})])
        await wait_for_count(client_a, 1)
        log_id = (await client_a.get("/logs")).json()["data"][0]["id"]

        assert (await client_b.get("/logs")).json()["data"] == []
        assert (await client_b.get("/logs/count")).json()["count"] == 0
        assert_error(await client_b.get(f"/logs/{log_id}"), 404)
        assert (await client_b.get("/logs/export")).text == ""
        update = await client_b.post(
            "/logs/update-metadata",
            json={"filters": [{"field": "completionId", "equals": "secret-a"}], "metadata": {"who": "b"}},
        )
        assert update.json() == {"matchedLogs": 0}
        assert (await client_a.get(f"/logs/{log_id}")).json()["metadata"] == {"who": "a"}


@pytest.mark.parametrize(
    ("body", "headers", "fragments"),
    [
        (b'{"reqPayload": {"model": ', {"content-type": "application/json"}, ["JSON"]),
        (b'{"statusCode": "two hundred"}', {"content-type": "application/json"}, ["statusCode"]),
        (b'{"requestedAt": [1]}', {"content-type": "application/json"}, ["requestedAt"]),
        (b'{"requestedAt": -5}', {"content-type": "application/json"}, ["requestedAt"]),
        (b'{"receivedAt": 1e300}', {"content-type": "application/json"}, ["receivedAt"]),
        (b'{"statusCode": 1e12}', {"content-type": "application/json"}, ["statusCode"]),
        (b'{"tags": {"bad tag!": "x"}}', {"content-type": "application/json"}, ["bad tag!"]),
        (b'{"tags": {"k": {"nested": 1}}}', {"content-type": "application/json"}, ["tags.k"]),
        (b"[1, 2, 3]", {"content-type": "application/json"}, ["Input validation failed"]),
    ],
)
async def test_bad_report_bodies_are_400_and_write_nothing(
    project: Project, body: bytes, headers: dict, fragments: list[str]
) -> None:
    async with project.client() as client:
        assert_error(await client.post("/report", content=body, headers=headers), 400, *fragments)
        await report_all(client, [openai_body(completion_id="after-bad")])
        assert await wait_for_count(client, 1) == 1
        assert (await client.get("/logs")).json()["data"][0]["completionId"] == "after-bad"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"colour": "blue"}, "colour"),
        ({"limit": "0"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"requestedAfter": "yesterday"}, "requestedAfter"),
        ({"status": "maybe"}, "status"),
    ],
)
async def test_bad_search_parameters_name_the_problem(project: Project, params: dict, param: str) -> None:
    async with project.client() as client:
        body = assert_error(await client.get("/logs", params=params), 400)
    assert body["error"]["param"] == param


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"filters": [{"field": "prompt", "equals": "x"}], "metadata": {"a": "b"}}, "Unknown filter field"),
        ({"filters": [], "metadata": {"a": "b"}}, "At least one filter"),
        ({"filters": [{"field": "model"}], "metadata": {"a": "b"}}, "equals"),
        ({"filters": [{"field": "model", "equals": "m"}]}, "metadata"),
        ({"filters": [{"field": "model", "equals": "m"}], "metadata": {"a": ["b"]}}, "metadata.a"),
        ({"filters": [{"field": "model", "equals": "m"}], "metadata": {"a b": "c"}}, "a b"),
    ],
)
async def test_bad_update_metadata_requests(project: Project, payload: dict, fragment: str) -> None:
    async with project.client() as client:
        assert_error(await client.post("/logs/update-metadata", json=payload), 400, fragment)


async def test_oversize_bodies_are_refused(project: Project, running) -> None:
    limit = running.settings.max_body_bytes
    big = openai_body(content="x" * (limit + 1024))
    async with project.client() as client:
        assert_error(await client.post("/report", json=big), 413, str(limit))

        async def chunks():  # no Content-Length: the limit is enforced while streaming
            for _ in range(limit // 65536 + 2):
                yield b"x" * 65536

        json_type = {"content-type": "application/json"}
        streamed = await client.post("/report", content=chunks(), headers=json_type)
        assert_error(streamed, 413)
        assert (await client.get("/logs/count")).json()["count"] == 0
