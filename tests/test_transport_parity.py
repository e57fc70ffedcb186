"""The framework-free fast paths and the documented FastAPI routes answer alike.

``running.base_url`` reaches the fast paths (``Platform.asgi``); ``running.platform.app`` over
``httpx.ASGITransport`` reaches the FastAPI routes, which serve apps mounted without the fast
routes and document the endpoints in OpenAPI. Both call the same service functions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from services.judge.protocol import parse_server_timing
from tests.conftest import Project, RunningPlatform, wait_for_count
from tests.fake_judge import FakeJudge, create_criterion, fake_judge, use_fake_judge  # noqa: F401
from tests.helpers import MESSAGES, openai_body


@pytest.fixture
async def views(running: RunningPlatform, project: Project) -> AsyncIterator[httpx.AsyncClient]:
    """The project's client, served by the FastAPI app only (no fast routes)."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=running.platform.app),
        base_url="http://views/api/v1",
        headers={"Authorization": f"Bearer {project.key}"},
        timeout=30,
    ) as client:
        yield client


ANTHROPIC_REPORT = {
    "reqPayload": {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
    },
    "respPayload": {
        "id": "msg_parity",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku-latest",
        "content": [{"type": "text", "text": "hello"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 1},
    },
    "statusCode": 200,
}


async def test_reports_through_both_transports(project: Project, views: httpx.AsyncClient) -> None:
    async with project.client() as fast:
        for client in (fast, views):
            for route, body in (("/report", openai_body()), ("/report-anthropic", ANTHROPIC_REPORT)):
                response = await client.post(route, json=body)
                assert (response.status_code, response.json()) == (200, {"status": "ok"}), response.text
            bad = await client.post("/report-anthropic", content=b'{"reqPayload": ')
            assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        await wait_for_count(fast, 4)
        logs = (await fast.get("/logs", params={"limit": 10})).json()["data"]
    assert sorted(log["model"] for log in logs) == ["claude-3-5-haiku-latest"] * 2 + ["gpt-4o-mini"] * 2


async def test_chat_completions_through_both_transports(ready: Project, views: httpx.AsyncClient) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    async with ready.client() as fast:
        answers = [(await client.post("/chat/completions", json=body)) for client in (fast, views)]
        assert [a.status_code for a in answers] == [200, 200]
        contents = [a.json()["choices"][0]["message"]["content"] for a in answers]
        assert contents[0] == contents[1] and contents[0]

        streams = [
            (await client.post("/chat/completions", json={**body, "stream": True}))
            for client in (fast, views)
        ]
        for stream in streams:
            assert stream.status_code == 200 and stream.headers["content-type"].startswith(
                "text/event-stream"
            )
            events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            text = "".join(
                (orjson.loads(e)["choices"] or [{"delta": {}}])[0]["delta"].get("content") or ""
                for e in events[:-1]
            )
            assert text == contents[0]

        errors = [
            (await client.post("/chat/completions", json={**body, "openpipe": {"cache": "sometimes"}}))
            for client in (fast, views)
        ]
        assert [e.status_code for e in errors] == [400, 400]
        assert errors[0].json() == errors[1].json()


async def test_judge_through_both_transports(
    project: Project,
    views: httpx.AsyncClient,
    fake_judge: FakeJudge,  # noqa: F811
) -> None:
    body = {"criterion_id": "no-such-criterion", "output": {"role": "assistant", "content": "hi"}}
    async with project.client() as fast:
        await use_fake_judge(fast, fake_judge)
        await create_criterion(fast, "parity")
        judged = [
            (await client.post("/criteria/judge", json={**body, "criterion_id": "parity"}))
            for client in (fast, views)
        ]
        unknown = [(await client.post("/criteria/judge", json=body)) for client in (fast, views)]
        bad = [(await client.post("/criteria/judge", json={"output": {}})) for client in (fast, views)]
    assert [r.status_code for r in judged] == [200, 200]
    assert judged[0].json() == judged[1].json() and judged[0].json()["judgement"] == "PASS"
    for response in judged:  # the handler's time and the judge model's part of it, in ms
        timing = parse_server_timing(response.headers["server-timing"])
        assert timing["judge"] >= timing["model"] > 0
    assert [r.status_code for r in unknown] == [404, 404]
    assert (
        unknown[0].json() == unknown[1].json() and unknown[0].json()["error"]["code"] == "criterion_not_found"
    )
    assert [r.status_code for r in bad] == [400, 400]
    assert bad[0].json()["error"]["param"] == bad[1].json()["error"]["param"] == "criterion_id"
