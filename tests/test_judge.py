"""The judge: POST /criteria/judge (also via the openpipe SDK), gRPC Judge and HeadToHead, runtime
best-of-N (op-criteria, via the openai SDK). Judge models are faked at the HTTP boundary
(tests/fake_judge.py) with realistic tool-call verdicts, malformed replies and errors."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import replace

import grpc
import httpx
import orjson
import pytest
from openai import AsyncOpenAI
from openpipe.api_client.core.api_error import ApiError
from openpipe.client import AsyncOpenPipe

from services.common.grpc.distillery.v1 import judge_pb2, judge_pb2_grpc
from services.judge.criteria import CriteriaCatalog, CriterionVersion
from services.judge.service import Judge, ModelError, parse_judgement
from tests.conftest import Project, RunningPlatform, wait_until
from tests.fake_judge import FakeJudge, create_criterion, fake_judge, use_fake_judge  # noqa: F401

ROW = {"messages": [{"role": "user", "content": "What is the capital of Sweden?"}]}
GOOD = {"role": "assistant", "content": "Stockholm"}
BAD = {"role": "assistant", "content": "Beijing [bad]"}


@pytest.fixture
async def judged(project: Project, fake_judge: FakeJudge) -> Project:  # noqa: F811
    async with project.client() as c:
        await use_fake_judge(c, fake_judge)
    return project


async def _judge(c, criterion_id: str, output: dict, **extra):  # type: ignore[no-untyped-def]
    return await c.post(
        "/criteria/judge", json={"criterion_id": criterion_id, "input": ROW, "output": output, **extra}
    )


# --- POST /criteria/judge ---------------------------------------------------------------------


async def test_judge_pass_and_fail_with_versions(judged: Project, fake_judge: FakeJudge) -> None:  # noqa: F811
    async with judged.client() as c:
        created = await create_criterion(c, "capitals")
        assert created["id"] == "capitals@v1"
        passed = await _judge(c, "capitals", GOOD)
        assert passed.status_code == 200, passed.text
        body = passed.json()
        assert body["score"] == 1 and body["judgement"] == "PASS" and body["criterion_id"] == "capitals@v1"
        assert body["explanation"] == "The output meets the criterion."
        assert body["usage"]["total_tokens"] > 24
        failed = (await _judge(c, "capitals@v1", BAD)).json()
        assert failed["score"] == 0 and failed["judgement"] == "FAIL"

        # v2 is stricter: "[meh]" fails too; v1 stays pinned
        patched = await c.patch("/criteria/capitals", json={"prompt": "STRICT: fail any marked mistake."})
        assert patched.json()["id"] == "capitals@v2"
        meh = {"role": "assistant", "content": "Stockholm [meh]"}
        assert (await _judge(c, "capitals", meh)).json()["score"] == 0
        assert (await _judge(c, "capitals@v2", meh)).json()["criterion_id"] == "capitals@v2"
        assert (await _judge(c, "capitals@v1", meh)).json()["score"] == 1

        # the judge model saw the prompt, the templated input and the output, with a forced tool call
        sent = next(r for r in reversed(fake_judge.requests) if "STRICT" in r["messages"][0]["content"])
        assert sent["tool_choice"] == {"type": "function", "function": {"name": "record_judgement"}}
        assert (
            "capital of Sweden" in sent["messages"][1]["content"]
            and "[meh]" in sent["messages"][1]["content"]
        )

        # stored judgements: criterion version, model, tokens (judgements.v1 -> api)
        async def stored() -> list:
            return (await c.get("/criteria/capitals/judgements")).json()["data"]

        await wait_until(lambda: _at_least(stored, 5), what="5 stored judgements")
        rows = await stored()
        assert {r["criterionId"] for r in rows} == {"capitals@v1", "capitals@v2"}
        assert all(r["model"] == "openpipe:fakejudge/judge" and r["usage"]["total_tokens"] > 0 for r in rows)
        assert all(r["source"] == "api" for r in rows)


async def _at_least(fetch, n: int) -> bool:  # type: ignore[no-untyped-def]
    return len(await fetch()) >= n


async def test_judge_unknown_criterion_and_bad_input(judged: Project) -> None:
    async with judged.client() as c:
        await create_criterion(c, "known")
        for criterion_id in ("missing", "known@v7", "known@vx"):
            response = await _judge(c, criterion_id, GOOD)
            assert response.status_code == 404, response.text
            body = response.json()
            assert body["error"]["code"] == "criterion_not_found" and body["error"]["param"] == "criterion_id"
            assert criterion_id in body["message"]
        missing_output = await c.post("/criteria/judge", json={"criterion_id": "known", "input": ROW})
        assert missing_output.status_code == 400 and missing_output.json()["error"]["param"] == "output"
        wrong_type = await c.post("/criteria/judge", json={"criterion_id": "known", "output": "text"})
        assert wrong_type.status_code == 400
        not_json = await c.post(
            "/criteria/judge", content=b"{oops", headers={"content-type": "application/json"}
        )
        assert not_json.status_code == 400
    async with httpx.AsyncClient(
        base_url=judged.base_url, headers={"Authorization": "Bearer opk_wrong"}
    ) as other:
        assert (await _judge(other, "known", GOOD)).status_code == 401


async def test_judge_another_projects_criterion_is_not_found(judged: Project, make_project) -> None:  # type: ignore[no-untyped-def]
    async with judged.client() as c:
        await create_criterion(c, "private")
    other = await make_project()
    async with other.client() as c:
        assert (await _judge(c, "private", GOOD)).status_code == 404


async def test_malformed_reply_retried_then_clear_error(judged: Project, fake_judge: FakeJudge) -> None:  # noqa: F811
    async with judged.client() as c:
        await create_criterion(c, "once", model="openpipe:fakejudge/judge-malformed-once")
        await create_criterion(c, "never", model="openpipe:fakejudge/judge-malformed")
        await create_criterion(c, "content", model="openpipe:fakejudge/judge-content")
        recovered = await _judge(c, "once", BAD)
        assert recovered.status_code == 200 and recovered.json()["score"] == 0
        assert recovered.json()["usage"]["completion_tokens"] == 48  # two calls counted
        broken = await _judge(c, "never", GOOD)
        assert broken.status_code == 422, broken.text
        assert broken.json()["error"]["code"] == "invalid_judgement"
        assert "not a valid verdict" in broken.json()["message"]
        assert (await _judge(c, "content", GOOD)).json()["score"] == 1


async def test_upstream_errors_retried_or_reported(judged: Project) -> None:
    async with judged.client() as c:
        await create_criterion(c, "flaky", model="openpipe:fakejudge/judge-429-once")
        await create_criterion(c, "down", model="openpipe:fakejudge/judge-500")
        await create_criterion(c, "nowhere", model="openpipe:nosuchprovider/judge")
        assert (await _judge(c, "flaky", GOOD)).json()["score"] == 1
        down = await _judge(c, "down", GOOD)
        assert down.status_code == 502 and down.json()["error"]["code"] == "upstream_error"
        nowhere = await _judge(c, "nowhere", GOOD)
        assert nowhere.status_code == 400, nowhere.text
        assert "nosuchprovider" in nowhere.json()["message"]


async def test_openpipe_sdk_criterion_judgement(judged: Project) -> None:
    async with judged.client() as c:
        await create_criterion(c, "sdk-check")
    op = AsyncOpenPipe(api_key=judged.key, base_url=judged.base_url)
    result = await op.get_criterion_judgement(criterion_id="sdk-check@v1", input=ROW, output=BAD)
    assert result.score == 0 and "mistake" in (result.explanation or "")
    assert result.usage is not None and result.usage.total_tokens > 0
    with pytest.raises(ApiError) as info:
        await op.get_criterion_judgement(criterion_id="sdk-check@v9", input=ROW, output=GOOD)
    assert info.value.status_code == 404


# --- gRPC Judge / HeadToHead ------------------------------------------------------------------


async def test_grpc_judge_and_head_to_head(judged: Project, running: RunningPlatform) -> None:
    async with judged.client() as c:
        await create_criterion(c, "grpc-crit")
        await create_criterion(c, "grpc-broken", model="openpipe:fakejudge/judge-malformed")
    metadata = (("authorization", f"Bearer {judged.key}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.settings.grpc_port}") as channel:
        stub = judge_pb2_grpc.JudgeStub(channel)
        request = judge_pb2.JudgeRequest(
            criterion_id="grpc-crit",
            input_json=orjson.dumps(ROW).decode(),
            output_json=orjson.dumps(BAD).decode(),
        )
        verdict = await stub.Judge(request, metadata=metadata)
        assert (verdict.status, verdict.score, verdict.judgement) == ("success", 0.0, "FAIL")
        assert verdict.criterion_id == "grpc-crit@v1" and verdict.model == "openpipe:fakejudge/judge"
        assert verdict.usage.total_tokens > 0 and verdict.judgement_id.startswith("jdg_")

        broken = await stub.Judge(
            judge_pb2.JudgeRequest(criterion_id="grpc-broken", output_json=orjson.dumps(GOOD).decode()),
            metadata=metadata,
        )
        assert broken.status == "error" and broken.error_code == "invalid_judgement"

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Judge(judge_pb2.JudgeRequest(criterion_id="nope", output_json="{}"), metadata=metadata)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as bad_json:
            await stub.Judge(
                judge_pb2.JudgeRequest(criterion_id="grpc-crit", output_json="{x"), metadata=metadata
            )
        assert bad_json.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as unauth:
            await stub.Judge(request, metadata=(("authorization", "Bearer opk_nope"),))
        assert unauth.value.code() == grpc.StatusCode.UNAUTHENTICATED

        h2h = judge_pb2.HeadToHeadRequest(
            model="openpipe:fakejudge/judge",
            input_json=orjson.dumps(ROW).decode(),
            output_a_json=orjson.dumps(BAD).decode(),
            output_b_json=orjson.dumps(GOOD).decode(),
            swap_check=True,
        )
        preference = await stub.HeadToHead(h2h, metadata=metadata)
        assert (preference.status, preference.winner) == ("success", "B"), preference
        assert preference.usage.completion_tokens == 48  # both orders asked
        tie = await stub.HeadToHead(
            judge_pb2.HeadToHeadRequest(
                criterion_id="grpc-crit",
                output_a_json=orjson.dumps(GOOD).decode(),
                output_b_json=orjson.dumps(GOOD).decode(),
            ),
            metadata=metadata,
        )
        assert tie.winner == "TIE" and tie.model == "openpipe:fakejudge/judge"
        with pytest.raises(grpc.aio.AioRpcError) as no_model:
            await stub.HeadToHead(
                judge_pb2.HeadToHeadRequest(output_a_json="{}", output_b_json="{}"), metadata=metadata
            )
        assert no_model.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- runtime best-of-N --------------------------------------------------------------------------


async def test_best_of_n_with_openai_sdk(judged: Project, fake_judge: FakeJudge) -> None:  # noqa: F811
    async with judged.client() as c:
        await create_criterion(c, "no-mistakes")
        await create_criterion(c, "strict", prompt="STRICT: fail any marked mistake.")
    client = AsyncOpenAI(api_key=judged.key, base_url=judged.base_url)
    completion = await client.chat.completions.create(
        model="openpipe:fakejudge/gen",
        messages=[{"role": "user", "content": "Count to 3"}],
        n=4,
        extra_headers={"op-criteria": '["no-mistakes@v1", "strict"]'},
    )
    assert len(completion.choices) == 4
    results = [choice.model_extra["criteria_results"] for choice in completion.choices]
    scores = [sum(r["score"] for r in result.values()) for result in results]
    assert scores == sorted(scores, reverse=True) and scores[0] == 2 and scores[-1] == 0
    assert all(set(r) == {"no-mistakes", "strict"} for r in results)
    assert all(r["no-mistakes"]["status"] == "success" and r["no-mistakes"]["explanation"] for r in results)
    assert "[bad]" not in completion.choices[0].message.content
    assert "[bad]" in completion.choices[-1].message.content
    usage = completion.usage.model_extra["criteria"]
    assert usage["no-mistakes"]["total_tokens"] > 0 and usage["strict"]["total_tokens"] > 0

    # a criterion that cannot judge: status "error" per choice, the request still succeeds
    async with judged.client() as c:
        await create_criterion(c, "broken", model="openpipe:fakejudge/judge-malformed")
    completion = await client.chat.completions.create(
        model="openpipe:fakejudge/gen",
        messages=[{"role": "user", "content": "Count to 3"}],
        n=2,
        extra_headers={"op-criteria": '["broken"]'},
    )
    result = completion.choices[0].model_extra["criteria_results"]["broken"]
    assert (
        result["status"] == "error" and result["errorCode"] == "invalid_judgement" and result["errorMessage"]
    )


async def test_best_of_n_judges_concurrently(judged: Project, fake_judge: FakeJudge) -> None:  # noqa: F811
    async with judged.client() as c:
        await create_criterion(c, "c1")
        await create_criterion(c, "c2")
        body = {"model": "openpipe:fakejudge/gen", "messages": [{"role": "user", "content": "hi"}], "n": 4}
        fake_judge.latency = 0.3
        try:
            started = time.perf_counter()
            response = await c.post("/chat/completions", json=body, headers={"op-criteria": '["c1", "c2"]'})
            elapsed = time.perf_counter() - started
        finally:
            fake_judge.latency = 0.0
        assert response.status_code == 200, response.text
        # one generation + one round of 8 judge calls at once: ~0.6 s, not 0.3 + 8 x 0.3
        assert elapsed < 1.2, elapsed


async def test_best_of_n_errors(judged: Project) -> None:
    body = {"model": "openpipe:fakejudge/gen", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    async with judged.client() as c:
        unknown = await c.post("/chat/completions", json=body, headers={"op-criteria": '["ghost"]'})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "criterion_not_found"
        for header in ("not json", '{"a": 1}', "[1, 2]", '[""]'):
            bad = await c.post("/chat/completions", json=body, headers={"op-criteria": header})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "op-criteria", header
        await create_criterion(c, "streamy")
        stream = await c.post(
            "/chat/completions", json={**body, "stream": True}, headers={"op-criteria": '["streamy"]'}
        )
        assert stream.status_code == 400
        # the body's openpipe.criteria works like the header
        via_body = await c.post("/chat/completions", json={**body, "openpipe": {"criteria": ["streamy"]}})
        assert via_body.status_code == 200 and "criteria_results" in via_body.json()["choices"][0]


# --- units ------------------------------------------------------------------------------------


def _completion(message: dict) -> dict:
    return {"choices": [{"message": message}], "usage": {"prompt_tokens": 10, "completion_tokens": 5}}


def test_parse_judgement_shapes() -> None:
    call = {
        "tool_calls": [
            {
                "function": {
                    "name": "record_judgement",
                    "arguments": '{"judgement": "fail", "explanation": "x"}',
                }
            }
        ]
    }
    assert parse_judgement(_completion(call)) == ("FAIL", "x")
    assert parse_judgement(_completion({"content": '{"judgement": "PASSED"}'})) == ("PASS", "")
    for bad in ({"content": "PASS"}, {"content": '{"judgement": "MAYBE"}'}, {"content": "[1]"}, {}):
        with pytest.raises(ValueError):
            parse_judgement(_completion(bad))


async def test_judge_caps_concurrency_per_project_and_retries() -> None:
    in_flight, peak, calls = 0, 0, 0

    async def model(project_id: str, request: dict) -> dict:
        nonlocal in_flight, peak, calls
        calls += 1
        if calls == 1:
            raise ModelError("429", code="rate_limited", retryable=True, status=429)
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        args = orjson.dumps({"explanation": "ok", "judgement": "PASS"}).decode()
        return _completion({"tool_calls": [{"function": {"name": "record_judgement", "arguments": args}}]})

    judge = Judge(model, max_concurrency=3, base_delay=0.01)
    criterion = CriterionVersion("p", "c", 1, "m", "prompt")
    verdicts = await asyncio.gather(*(judge.judge("p", criterion, ROW, GOOD) for _ in range(12)))
    assert all(v.status == "success" and v.score == 1 for v in verdicts)
    assert peak == 3 and calls == 13


def test_catalog_versions_and_tombstones() -> None:
    from services.common.events import CatalogRecord

    catalog = CriteriaCatalog()
    data = {
        "project_id": "p",
        "name": "tone",
        "versions": [
            {"version": 1, "model": "m1", "prompt": "a", "templated_variables": ["output"]},
            {"version": 2, "model": "m2", "prompt": "b"},
        ],
    }
    catalog.apply(CatalogRecord(kind="criterion", id="p/tone", data=data))
    assert catalog.find("p", "tone").id == "tone@v2"
    assert catalog.find("p", "tone@v1").templated_variables == ("output",)
    with pytest.raises(Exception, match="No criterion"):
        catalog.find("other", "tone")
    catalog.apply(CatalogRecord(kind="criterion", id="p/tone", deleted=True))
    with pytest.raises(Exception, match="No criterion"):
        catalog.find("p", "tone")


async def test_judgements_stored_once_and_poison_dead_lettered(
    project: Project, running: RunningPlatform
) -> None:
    from services.common.events import JUDGEMENTS_TOPIC, DeadLetter, JudgementEvent, dlq_topic
    from tests.helpers import read_topic, send_raw

    marker = secrets.token_hex(6)
    event = JudgementEvent(
        judgement_id=f"jdg_{marker}",
        project_id=project.id,
        criterion="ext",
        criterion_version=3,
        model="openai:gpt-4o-mini",
        source="eval",
        status="success",
        score=1.0,
        judgement="PASS",
        prompt_tokens=100,
        completion_tokens=20,
        cost_usd=0.00003,
        created_at=int(time.time() * 1000),
    )
    good = event.model_dump_json().encode()
    poison = [b"not json " + marker.encode(), orjson.dumps({"judgement_id": f"x{marker}", "status": "maybe"})]
    await send_raw(running.settings.kafka_url, JUDGEMENTS_TOPIC, [poison[0], good, poison[1], good], key=b"k")
    async with project.client() as c:

        async def stored() -> list:
            return (await c.get("/criteria/ext/judgements")).json()["data"]

        await wait_until(lambda: _at_least(stored, 1), what="the stored judgement")
        rows = await stored()
        assert len(rows) == 1  # delivered twice, stored once
        assert rows[0]["criterionId"] == "ext@v3" and rows[0]["source"] == "eval"
        assert rows[0]["usage"] == {
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "total_tokens": 120,
            "cost_usd": 3e-05,
        }

    async def parked() -> list[DeadLetter]:
        letters = [
            DeadLetter.model_validate_json(v)
            for v in await read_topic(running.settings.kafka_url, dlq_topic(JUDGEMENTS_TOPIC))
        ]
        # the api's letters (ingest's ClickHouse writer parks its own copy, "invalid JudgementEvent")
        return [d for d in letters if marker in d.payload and "not a JudgementEvent" in d.reason]

    await wait_until(lambda: _count(parked, 2), what="2 dead letters")


async def _count(fetch, n: int) -> bool:  # type: ignore[no-untyped-def]
    return len(await fetch()) >= n


def test_router_errors_become_model_errors() -> None:
    from services.judge.client import model_error

    def rpc(code: grpc.StatusCode, trailing: tuple = ()) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details="boom")

    limited = model_error(rpc(grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert limited.retryable and limited.code == "rate_limited" and limited.status == 429
    assert model_error(rpc(grpc.StatusCode.UNAVAILABLE)).retryable
    missing = model_error(rpc(grpc.StatusCode.NOT_FOUND, (("error-code", "model_not_found"),)))
    assert not missing.retryable and missing.code == "model_not_found" and missing.status == 400


def test_rendering_templates_only_the_chosen_fields() -> None:
    from services.judge.service import head_to_head_request, judgement_request

    row = {**ROW, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}
    full = judgement_request(CriterionVersion("p", "c", 1, "m", "Be right."), row, GOOD)["messages"][1][
        "content"
    ]
    assert "<messages>" in full and "<tools>" in full and "<tool_choice>" in full and "Stockholm" in full
    only_output = CriterionVersion("p", "c", 1, "m", "Be right.", templated_variables=("output",))
    text = judgement_request(only_output, row, GOOD)["messages"][1]["content"]
    assert "<input>" not in text and "capital of Sweden" not in text and "<output>" in text
    pair = head_to_head_request("m", "Prefer short.", ROW, GOOD, BAD)
    content = pair["messages"][1]["content"]
    assert "<output_a>" in content and "Beijing" in content and "<output>" not in content
    assert "Prefer short." in pair["messages"][0]["content"]


async def test_judge_alone_reaches_the_router_over_grpc(judged: Project, running: RunningPlatform) -> None:
    """The judge service deployed alone calls judge models through the router's gRPC Inference."""
    from services.common.inference_client import InferenceClient
    from services.common.secrets import internal_token
    from services.judge.client import router_caller

    client = InferenceClient(f"127.0.0.1:{running.settings.grpc_port}", internal_token(running.settings))
    try:
        judge = Judge(router_caller(client), base_delay=0.01)
        criterion = CriterionVersion(
            judged.id, "alone", 1, "openpipe:fakejudge/judge", "Fail marked mistakes."
        )
        verdict = await judge.judge(judged.id, criterion, ROW, BAD)
        assert (verdict.status, verdict.judgement, verdict.score) == ("success", "FAIL", 0.0)
        assert verdict.usage.total_tokens > 0 and verdict.usage.model_seconds > 0
        missing = await judge.judge(judged.id, replace(criterion, model="openpipe:nosuch/judge"), ROW, BAD)
        assert missing.status == "error" and missing.error_status == 400 and "nosuch" in missing.error_message
    finally:
        await client.close()
