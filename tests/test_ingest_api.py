"""Request-log capture through the HTTP API: report, derive, search, export, update metadata."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from openpipe.client import AsyncOpenPipe, UpdateLogTagsRequestFiltersItem

from services.sample_traffic import sample_reports
from tests.conftest import Project, wait_for_count
from tests.helpers import openai_body, report_all


async def test_openpipe_sdk_report_is_captured_with_derived_fields(project: Project) -> None:
    op = AsyncOpenPipe(api_key=project.key, base_url=project.base_url)
    body = openai_body(
        completion_id="chatcmpl-sdk-1", model="gpt-4o-2024-08-06", metadata={"prompt_id": "counting"}
    )
    await op.report(
        requested_at=body["requestedAt"],
        received_at=body["receivedAt"],
        req_payload=body["reqPayload"],
        resp_payload=body["respPayload"],
        status_code=200,
        tags={"any_key": "any_value", "n": 3},
    )
    async with project.client() as client:
        await wait_for_count(client, 1)
        logs = (await client.get("/logs", params={"completionId": "chatcmpl-sdk-1"})).json()["data"]
    assert len(logs) == 1
    log = logs[0]
    assert log["model"] == "gpt-4o-2024-08-06"
    assert log["provider"] == "openai"
    assert log["status"] == "success" and log["statusCode"] == 200
    assert log["latencyMs"] == 420
    assert log["finishReason"] == "stop"
    assert log["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    assert log["cost"] == pytest.approx((12 * 2.50 + 5 * 10.00) / 1e6)
    # metadata = reqPayload.metadata merged with tags; numbers stringified; the SDK adds $sdk keys
    assert log["metadata"]["prompt_id"] == "counting"
    assert log["metadata"]["any_key"] == "any_value"
    assert log["metadata"]["n"] == "3"
    assert log["metadata"]["$sdk"] == "python"
    assert log["reqPayload"] == body["reqPayload"]


async def test_failed_call_is_logged_with_its_error(project: Project) -> None:
    body = openai_body(status=429)
    error = {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}
    body["respPayload"] = {"error": error}
    body["errorMessage"] = "Rate limit reached"
    async with project.client() as client:
        await report_all(client, [body])
        await wait_for_count(client, 1, params={"status": "error"})
        log = (await client.get("/logs", params={"status": "error"})).json()["data"][0]
        export = (await client.get("/logs/export")).text.splitlines()
    assert log["statusCode"] == 429 and log["errorMessage"] == "Rate limit reached"
    assert log["cost"] is None and log["completionId"] == ""
    assert orjson.loads(export[0])["output"]["error"]["code"] == "rate_limit"


async def test_anthropic_report_is_normalized_to_openai_shape(project: Project) -> None:
    now = int(time.time() * 1000)
    body = {
        "requestedAt": now,
        "receivedAt": now + 900,
        "reqPayload": {
            "model": "claude-3-5-sonnet-20241022",
            "max_tokens": 100,
            "system": "You are terse.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}],
            "tools": [
                {
                    "name": "get_weather",
                    "description": "Weather",
                    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                }
            ],
        },
        "respPayload": {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-3-5-sonnet-20241022",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 40, "output_tokens": 20},
        },
        "statusCode": 200,
        "metadata": {"prompt_id": "weather", "flag": True},
    }
    async with project.client() as client:
        await report_all(client, [body], route="/report-anthropic")
        await wait_for_count(client, 1)
        log = (await client.get("/logs")).json()["data"][0]
        line = orjson.loads((await client.get("/logs/export")).text.splitlines()[0])
    assert log["provider"] == "anthropic" and log["completionId"] == "msg_01"
    assert log["usage"]["total_tokens"] == 60 and log["finishReason"] == "tool_calls"
    assert log["cost"] == pytest.approx((40 * 3 + 20 * 15) / 1e6)
    assert log["metadata"] == {"prompt_id": "weather", "flag": "true"}
    assert log["reqPayload"] == body["reqPayload"]  # stored as given
    # ...and exported in the OpenAI chat shape, ready for dataset import
    assert line["input"]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert line["input"]["messages"][1] == {"role": "user", "content": "Weather in Paris?"}
    assert line["input"]["tools"][0]["function"]["name"] == "get_weather"
    message = line["output"]["choices"][0]["message"]
    assert message["content"] == "Checking."
    assert orjson.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert line["tags"] == {"prompt_id": "weather", "flag": "true"}


async def test_search_filters_and_cursor_pagination(project: Project) -> None:
    base = int(time.time() * 1000) - 100_000
    bodies = [
        openai_body(
            content=f"question {i} about invoices" if i % 2 else f"question {i} about refunds",
            answer="As an AI language model" if i % 5 == 0 else f"answer {i}",
            model="gpt-4o" if i < 6 else "gpt-4o-mini",
            completion_id=f"c-{i}",
            metadata={"prompt_id": f"p{i % 3}"},
            requested_at=base + i * 1000,
        )
        for i in range(12)
    ]
    async with project.client() as client:
        await report_all(client, bodies)
        await wait_for_count(client, 12)

        async def count(**params: object) -> int:
            response = await client.get("/logs/count", params=params)
            assert response.status_code == 200, response.text
            return response.json()["count"]

        assert await count(model="gpt-4o") == 6
        assert await count(completionId="c-3") == 1
        assert await count(**{"metadata.prompt_id": "p1"}) == 4
        assert await count(**{"tags.prompt_id": "p1", "model": "gpt-4o"}) == 2
        assert await count(requestContains="INVOICES") == 6
        assert await count(responseNotContains="as an ai language model") == 9
        assert await count(requestedAfter=base + 4000, requestedBefore=base + 8000) == 4
        assert await count(status="success") == 12

        seen, cursor = [], None
        while True:
            params = {"limit": 5, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/logs", params=params)).json()
            seen += [log["id"] for log in page["data"]]
            if not page["has_more"]:
                assert page["next_cursor"] is None
                break
            cursor = page["next_cursor"]
    assert len(seen) == 12 and len(set(seen)) == 12
    assert seen == sorted(seen, reverse=True)  # newest first


async def test_export_streams_documented_shape(project: Project) -> None:
    reports = sample_reports(30, seed=11, anthropic_share=0.0)
    async with project.client() as client:
        await report_all(client, [body for _, body in reports])
        await wait_for_count(client, 30)
        response = await client.get("/logs/export")
        limited = await client.get("/logs/export", params={"limit": 7})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [orjson.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 30 and len(limited.text.splitlines()) == 7
    for line in lines:
        assert set(line) == {"input", "output", "tags"}
        assert "messages" in line["input"]
    requests = sorted(orjson.dumps(line["input"]) for line in lines)
    assert requests == sorted(orjson.dumps(body["reqPayload"]) for _, body in reports)


async def test_update_metadata_merges_deletes_and_counts(project: Project) -> None:
    bodies = [
        openai_body(
            completion_id=f"m-{i}",
            model="gpt-4o-mini" if i < 3 else "gpt-4o",
            metadata={"prompt_id": "counting", "tag_to_remove": "x"},
        )
        for i in range(5)
    ]
    op = AsyncOpenPipe(api_key=project.key, base_url=project.base_url)
    async with project.client() as client:
        await report_all(client, bodies)
        await wait_for_count(client, 5)
        result = await op.update_log_metadata(
            filters=[
                UpdateLogTagsRequestFiltersItem(field="model", equals="gpt-4o-mini"),
                UpdateLogTagsRequestFiltersItem(field="metadata.prompt_id", equals="counting"),
            ],
            metadata={"relabel": "true", "tag_to_remove": None, "score": 7},
        )
        assert result.matched_logs == 3
        log = (await client.get("/logs", params={"completionId": "m-0"})).json()["data"][0]
        assert log["metadata"] == {"prompt_id": "counting", "relabel": "true", "score": "7"}
        untouched = (await client.get("/logs", params={"completionId": "m-4"})).json()["data"][0]
        assert untouched["metadata"] == {"prompt_id": "counting", "tag_to_remove": "x"}
        # the deprecated alias, and an update no log matches
        alias = await client.post(
            "/logs/update-tags",
            json={"filters": [{"field": "completionId", "equals": "m-4"}], "tags": {"checked": True}},
        )
        assert alias.json() == {"matchedLogs": 1}
        none = await client.post(
            "/logs/update-metadata",
            json={"filters": [{"field": "completionId", "equals": "nope"}], "metadata": {"a": "b"}},
        )
        assert none.json() == {"matchedLogs": 0}
        # updates are new versions of the row: still 5 logs, never duplicates
        assert (await client.get("/logs/count")).json()["count"] == 5
        assert await wait_for_count(client, 1, params={"metadata.checked": "true"}) == 1


async def test_log_by_id_and_unknown_id(project: Project) -> None:
    async with project.client() as client:
        await report_all(client, [openai_body(completion_id="one")])
        await wait_for_count(client, 1)
        log_id = (await client.get("/logs")).json()["data"][0]["id"]
        found = await client.get(f"/logs/{log_id}")
        missing = await client.get("/logs/00000000-0000-7000-8000-000000000000")
    assert found.status_code == 200 and found.json()["completionId"] == "one"
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


async def test_concurrent_reports_are_all_captured(project: Project) -> None:
    reports = sample_reports(300, seed=3)
    async with project.client() as client:
        results = await asyncio.gather(*(client.post(route, json=body) for route, body in reports))
        assert all(r.status_code == 200 for r in results)
        assert await wait_for_count(client, 300) == 300


async def test_official_openai_sdk_reports_and_reads_errors(project: Project) -> None:
    """The ``openai`` SDK's generic client reaches our routes and parses our error envelope."""
    import openai

    sdk = openai.AsyncOpenAI(api_key=project.key, base_url=project.base_url, max_retries=0)
    body = openai_body(completion_id="via-openai-sdk")
    result = await sdk.post("/report", body=body, cast_to=object)
    assert result == {"status": "ok"}
    async with project.client() as client:
        assert await wait_for_count(client, 1, params={"completionId": "via-openai-sdk"}) == 1

    wrong = openai.AsyncOpenAI(api_key="opk_wrong", base_url=project.base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        await wrong.post("/report", body=body, cast_to=object)
    assert denied.value.status_code == 401 and "Invalid API key" in denied.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.get("/logs", options={"params": {"colour": "blue"}}, cast_to=object)
    assert bad.value.body["param"] == "colour" and "Unknown filter" in bad.value.message
