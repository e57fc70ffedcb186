"""Evals end to end: api → eval.requests.v1 → eval worker (router over gRPC, sandbox, fake judge at
the HTTP boundary) → eval.events.v1 → api; results, rows, matrix, exports, chart, cancel, delete."""

from __future__ import annotations

import asyncio
import csv
import io
import math
import time
from collections.abc import AsyncIterator

import orjson
import pytest

from services.common.events import EVAL_EVENTS_TOPIC, EvalEvent, EvalScore
from tests.conftest import Project, wait_until
from tests.fake_judge import create_criterion, fake_judge, use_fake_judge  # noqa: F401
from tests.helpers_eval import (
    EXACT_MATCH,
    FakeJudge,
    N,
    entry,
    make_dataset,
    register_judge,
    start_fake_judge,
    wait_for_eval,
)

ECHO = "openpipe:judge/student-echo"
OTHER = "openpipe:judge/base-model"
JUDGE = "openpipe:judge/h2h-judge"


@pytest.fixture(scope="module")
async def judge() -> AsyncIterator[FakeJudge]:
    fake, server, task = await start_fake_judge()
    yield fake
    server.should_exit = True
    await task


@pytest.fixture
async def judged(project: Project, judge: FakeJudge) -> Project:
    async with project.client() as http:
        await register_judge(http, judge)
    return project


def eval_body(dataset_id: str, **extra: object) -> dict:
    return {
        "name": "student vs base",
        "datasetId": dataset_id,
        "models": ["original", ECHO, OTHER],
        "evaluators": [
            {"type": "code", "name": "exact", "source": EXACT_MATCH},
            {
                "type": "grader",
                "grader": {
                    "type": "string_check",
                    "name": "contains-answer",
                    "input": "{{sample.output_text}}",
                    "reference": "{{item.output_text}}",
                    "operation": "like",
                },
            },
            {"type": "head_to_head", "judgeModel": JUDGE, "instructions": "Prefer the concise answer."},
        ],
        **extra,
    }


async def test_code_grader_and_head_to_head_eval(judged: Project, judge: FakeJudge) -> None:
    async with judged.client() as http:
        dataset_id = await make_dataset(http)
        estimate = (await http.post("/evals/estimate", json=eval_body(dataset_id))).json()["estimatedCost"]
        assert estimate["entries"] == N and estimate["headToHeadComparisons"] == N * 3
        assert estimate["generationCalls"] == 2 * N and estimate["judgeCalls"] == N * 3

        judge_requests_before = len(judge.requests)
        started = await http.post("/evals", json=eval_body(dataset_id))
        assert started.status_code == 202, started.text
        body = started.json()
        assert body["object"] == "eval" and body["status"] == "queued"
        assert body["progress"] == {"done": 0, "total": N} and body["estimatedCost"] == estimate
        done = await wait_for_eval(http, body["id"])
        assert done["status"] == "succeeded" and done["progress"] == {"done": N, "total": N}

        results = (await http.get(f"/evals/{body['id']}/results")).json()["data"]
        by = {(r["evaluator"], r["model"]): r for r in results}
        assert by[("exact", "original")]["score"] == 1.0 and by[("exact", ECHO)]["score"] == 1.0
        assert by[("exact", OTHER)]["score"] == 0.0 and by[("exact", OTHER)]["passRate"] == 0.0
        assert by[("contains-answer", OTHER)]["score"] == 1.0  # "Answer to: ... [expect=4]" contains "4"
        h2h = {m: by[("head_to_head", m)] for m in ("original", ECHO, OTHER)}
        assert h2h["original"]["winRate"] == pytest.approx(0.75) and h2h[ECHO]["winRate"] == pytest.approx(
            0.75
        )
        assert h2h[OTHER]["winRate"] == 0.0 and h2h[OTHER]["losses"] == 2 * N
        assert h2h["original"]["ties"] == N  # original and the echo model gave identical outputs
        # Identical outputs tie without a judge call: only pairs with the other model reach the judge
        # (and the router's response cache answers a question asked twice).
        asked = [r for r in judge.requests[judge_requests_before:] if r.get("model") == "h2h-judge"]
        assert 0 < len(asked) <= 2 * N
        assert all("Answer to" in r["messages"][1]["content"] for r in asked)
        assert all("Prefer the concise answer." in r["messages"][0]["content"] for r in asked)
        orders = {"<output_a>Answer to" in r["messages"][1]["content"] for r in asked}
        assert orders == {True, False}  # the order is randomized per row and pair
        assert [r["evaluator"] for r in results[:3]] == ["exact"] * 3 and results[2]["model"] == OTHER

        matrix = (await http.get(f"/evals/{body['id']}/matrix")).json()
        assert matrix["winRates"]["original"][OTHER] == 1.0 and matrix["winRates"][OTHER]["original"] == 0.0
        assert matrix["winRates"]["original"][ECHO] == 0.5 and matrix["winRates"][ECHO][ECHO] is None
        assert matrix["counts"]["original"][OTHER] == {"wins": N, "losses": 0, "ties": 0}

        page = (
            await http.get(f"/evals/{body['id']}/rows", params={"evaluator": "head_to_head", "limit": 4})
        ).json()
        assert len(page["data"]) == 4 and page["hasMore"]
        rest = (
            await http.get(
                f"/evals/{body['id']}/rows",
                params={"evaluator": "head_to_head", "limit": 100, "cursor": page["nextCursor"]},
            )
        ).json()
        assert len(page["data"]) + len(rest["data"]) == 3 * N and not rest["hasMore"]
        judged_row = next(
            r for r in page["data"] + rest["data"] if r["opponent"] == OTHER and r["model"] == "original"
        )
        assert judged_row["winner"] == "original" and "shorter wins" in judged_row["explanation"]
        assert judged_row["output"]["content"] and judged_row["opponentOutput"]["content"].startswith(
            "Answer to"
        )
        mine = (
            await http.get(f"/evals/{body['id']}/rows", params={"model": OTHER, "evaluator": "exact"})
        ).json()
        assert len(mine["data"]) == N and all(r["score"] == 0.0 for r in mine["data"])

        jsonl = await http.get(f"/evals/{body['id']}/export", params={"format": "jsonl"})
        assert jsonl.headers["content-type"].startswith("application/x-ndjson")
        assert len(jsonl.text.strip().splitlines()) == 3 * N + 2 * 3 * N
        exported = list(
            csv.DictReader(io.StringIO((await http.get(f"/evals/{body['id']}/export?format=csv")).text))
        )
        assert len(exported) == 3 * N + 2 * 3 * N and {"entryId", "score", "winner"} <= set(exported[0])
        assert (await http.get(f"/evals/{body['id']}/export?format=xml")).status_code == 400
        chart = await http.get(f"/evals/{body['id']}/chart.png")
        assert chart.headers["content-type"] == "image/png" and chart.content[:8] == b"\x89PNG\r\n\x1a\n"

        # Outputs are generated once per (model, input, settings): a second eval reuses them all.
        generated_before = judge.calls["student-echo"] + judge.calls["base-model"]
        again = (await http.post("/evals", json={**eval_body(dataset_id), "name": "again"})).json()
        assert (
            again["estimatedCost"]["generationCalls"] == 0
            and again["estimatedCost"]["reusedOutputs"] == 2 * N
        )
        assert (await wait_for_eval(http, again["id"]))["status"] == "succeeded"
        assert judge.calls["student-echo"] + judge.calls["base-model"] == generated_before
        listed = (await http.get("/evals")).json()
        assert {e["id"] for e in listed["data"]} >= {body["id"], again["id"]}


async def test_score_model_grader_sample_and_failing_generations(judged: Project) -> None:
    async with judged.client() as http:
        dataset_id = await make_dataset(http, count=8)
        body = {
            "name": "scored",
            "datasetId": dataset_id,
            "sample": 5,
            "models": ["original", "openpipe:judge/second", "openpipe:nobody/x"],
            "evaluators": [
                {
                    "type": "grader",
                    "grader": {
                        "type": "score_model",
                        "name": "quality",
                        "model": "openpipe:judge/grader",
                        "input": [{"role": "user", "content": "Rate: {{sample.output_text}} [score=0.8]"}],
                    },
                },
                {"type": "code", "name": "raises", "source": "def grader(*args):\n    raise KeyError('x')\n"},
            ],
        }
        started = (await http.post("/evals", json=body)).json()
        done = await wait_for_eval(http, started["id"])
        assert done["status"] == "succeeded" and done["progress"]["total"] == 5
        results = {
            (r["evaluator"], r["model"]): r
            for r in (await http.get(f"/evals/{started['id']}/results")).json()["data"]
        }
        assert results[("quality", "original")]["score"] == pytest.approx(0.8)
        assert (
            results[("raises", "original")]["errors"] == 5
            and results[("raises", "original")]["score"] is None
        )
        unroutable = results[("quality", "openpipe:nobody/x")]
        assert unroutable["errors"] == 5 and unroutable["generationErrors"] == 5
        rows = (
            await http.get(f"/evals/{started['id']}/rows", params={"evaluator": "raises", "errors": "true"})
        ).json()
        assert len(rows["data"]) == 15
        for row in rows["data"]:
            expected = "no output:" if row["model"] == "openpipe:nobody/x" else "KeyError: 'x' (line 2)"
            assert expected in row["error"], row
        nobody = (
            await http.get(f"/evals/{started['id']}/rows", params={"model": "openpipe:nobody/x"})
        ).json()
        assert all(r["error"].startswith("no output:") for r in nobody["data"])


async def test_events_apply_once_and_cancel_and_delete(judged: Project, running) -> None:  # type: ignore[no-untyped-def]
    async with judged.client() as http:
        dataset_id = await make_dataset(http)
        body = eval_body(dataset_id, models=["original", "openpipe:judge/slow-model"])
        body["evaluators"] = body["evaluators"][:1]
        started = (await http.post("/evals", json=body)).json()
        # A duplicate delivery of a row's event is applied once.
        event = EvalEvent(
            event_id=f"{started['id']}:dup-entry",
            eval_id=started["id"],
            project_id=judged.id,
            type="row",
            entry_id="dup-entry",
            scores=[EvalScore(evaluator="exact", model="original", score=1.0)],
        )
        for _ in range(2):
            await running.platform.broker.publish(
                event.model_dump(mode="json"), EVAL_EVENTS_TOPIC, key=started["id"].encode()
            )
        await wait_until(
            lambda: _rows_for(http, started["id"], "dup-entry"),
            timeout=20,
            what="the duplicate event applied",
        )
        cancelled = await http.post(f"/evals/{started['id']}/cancel")
        if cancelled.status_code == 200:
            assert cancelled.json()["status"] == "cancelled"
            again = await http.post(f"/evals/{started['id']}/cancel")
            assert again.status_code == 409
        else:  # it finished first
            assert cancelled.status_code == 409
        state = (await http.get(f"/evals/{started['id']}")).json()
        assert state["progress"]["done"] <= state["progress"]["total"] + 1
        deleted = await http.delete(f"/evals/{started['id']}")
        assert deleted.json() == {"id": started["id"], "object": "eval", "deleted": True}
        assert (await http.get(f"/evals/{started['id']}")).status_code == 404


async def _rows_for(http, eval_id: str, entry_id: str) -> bool:  # type: ignore[no-untyped-def]
    rows = (await http.get(f"/evals/{eval_id}/rows", params={"limit": 1000})).json()["data"]
    matching = [r for r in rows if r["entryId"] == entry_id]
    return len(matching) == 1


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (
            {"models": ["original"], "evaluators": [{"type": "head_to_head", "judgeModel": "m"}]},
            "head_to_head",
        ),
        ({"evaluators": [{"type": "code", "name": "c", "source": "def grader(:"}]}, "source"),
        ({"evaluators": [{"type": "code", "name": "c", "source": "x = 1"}]}, "source"),
        ({"evaluators": [{"type": "sql"}]}, "evaluators"),
        ({"evaluators": []}, "evaluators"),
        ({"models": []}, "models"),
        ({"models": ["a", "a"]}, "repeat"),
        ({"split": "VALID"}, "split"),
        ({"sample": 0}, "sample"),
        ({"datasetId": None}, "datasetId"),
        (
            {
                "evaluators": [
                    {
                        "type": "grader",
                        "grader": {
                            "type": "string_check",
                            "name": "x",
                            "input": "{{bad.x}}",
                            "reference": "",
                            "operation": "eq",
                        },
                    }
                ]
            },
            "grader",
        ),
    ],
)
async def test_bad_eval_definitions_are_400s(judged: Project, change: dict, param: str) -> None:
    async with judged.client() as http:
        dataset_id = await make_dataset(http, count=1)
        response = await http.post("/evals", json={**eval_body(dataset_id), **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert param in (error["param"] or "") or param in error["message"], error


async def test_unknown_ids_and_other_projects(judged: Project, make_project) -> None:  # type: ignore[no-untyped-def]
    async with judged.client() as http:
        dataset_id = await make_dataset(http, count=1)
        missing = await http.post("/evals", json={**eval_body("ds_nope"), "datasetId": "ds_nope"})
        assert missing.status_code == 404
        empty = (await http.post("/datasets", json={"name": "empty"})).json()
        assert (await http.post("/evals", json=eval_body(empty["id"]))).status_code == 400
        started = (await http.post("/evals", json=eval_body(dataset_id))).json()
        assert (await http.get("/evals/eval_nope")).status_code == 404
        bad_cursor = await http.get(f"/evals/{started['id']}/rows", params={"cursor": "!!"})
        assert bad_cursor.status_code == 400
    other = await make_project()
    async with other.client() as http:
        for path in ("", "/results", "/rows", "/matrix", "/export", "/chart.png"):
            assert (await http.get(f"/evals/{started['id']}{path}")).status_code == 404, path
        assert (await http.post(f"/evals/{started['id']}/cancel")).status_code == 404
        assert (await http.delete(f"/evals/{started['id']}")).status_code == 404
        assert (await http.post("/evals", json=eval_body(dataset_id))).status_code == 404
    assert math.isfinite(1.0)


async def test_criterion_eval_through_the_judge(project: Project, fake_judge) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    async with project.client() as http:
        await use_fake_judge(http, fake_judge)
        await create_criterion(http, "no-mistakes")
        dataset = (await http.post("/datasets", json={"name": "criterion"})).json()
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}" + (" [bad]" if i % 2 else "")},
                ],
                "split": "TEST",
            }
            for i in range(4)
        ]
        await http.post(f"/datasets/{dataset['id']}/entries", json={"entries": rows})
        body = {
            "name": "criterion eval",
            "datasetId": dataset["id"],
            "models": ["original"],
            "evaluators": [
                {"type": "criterion", "criterion": "no-mistakes"},
                {"type": "criterion", "criterion": "no-such-criterion"},
            ],
        }
        started = (await http.post("/evals", json=body)).json()
        assert started["estimatedCost"]["judgeCalls"] == 8
        assert (await wait_for_eval(http, started["id"]))["status"] == "succeeded"
        results = {
            r["evaluator"]: r for r in (await http.get(f"/evals/{started['id']}/results")).json()["data"]
        }
        assert results["no-mistakes"]["passRate"] == 0.5 and results["no-mistakes"]["errors"] == 0
        assert results["no-such-criterion"]["errors"] == 4
        judged_rows = (
            await http.get(f"/evals/{started['id']}/rows", params={"evaluator": "no-mistakes"})
        ).json()
        assert all(r["explanation"] for r in judged_rows["data"])
        failed = [r for r in judged_rows["data"] if r["score"] == 0.0]
        assert len(failed) == 2 and all("[bad]" in r["output"]["content"] for r in failed)
        unknown = (
            await http.get(f"/evals/{started['id']}/rows", params={"evaluator": "no-such-criterion"})
        ).json()
        assert all("no-such-criterion" in r["error"] for r in unknown["data"]), unknown["data"][0]


async def test_poison_eval_messages_go_to_the_dlq(running) -> None:  # type: ignore[no-untyped-def]
    from aiokafka import AIOKafkaConsumer

    from services.common.events import EVAL_REQUESTS_TOPIC, dlq_topic

    broker = running.platform.broker
    marker = f"poison-{time.monotonic_ns()}"
    await broker.publish({"not": "an eval request", "marker": marker}, EVAL_REQUESTS_TOPIC, key=b"poison")
    await broker.publish({"event_id": marker}, EVAL_EVENTS_TOPIC, key=b"poison")
    found: dict[str, str] = {}
    consumer = AIOKafkaConsumer(
        dlq_topic(EVAL_REQUESTS_TOPIC),
        dlq_topic(EVAL_EVENTS_TOPIC),
        bootstrap_servers=running.settings.kafka_url,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while len(found) < 2 and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    letter = orjson.loads(record.value)
                    # ingest's ClickHouse writer parks its own copy ("invalid EvalEvent: ...")
                    if marker in letter["payload"] and not letter["reason"].startswith("invalid "):
                        found[letter["topic"]] = letter["reason"]
    finally:
        await consumer.stop()
    assert "not an EvalRequest" in found[EVAL_REQUESTS_TOPIC]
    assert "not an EvalEvent" in found[EVAL_EVENTS_TOPIC]


async def test_a_cancelled_eval_stops_its_worker(make_project) -> None:  # type: ignore[no-untyped-def]
    slow, server, task = await start_fake_judge(latency=1.0)
    try:
        project = await make_project()
        async with project.client() as http:
            await register_judge(http, slow)
            dataset_id = await make_dataset(http, count=30)
            body = {
                "name": "to cancel",
                "datasetId": dataset_id,
                "models": ["openpipe:judge/slow-student"],
                "evaluators": [{"type": "code", "name": "exact", "source": EXACT_MATCH}],
            }
            started = (await http.post("/evals", json=body)).json()
            cancelled = await http.post(f"/evals/{started['id']}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
            generated = slow.calls["slow-student"]
            await asyncio.sleep(3)
            state = (await http.get(f"/evals/{started['id']}")).json()
        assert state["status"] == "cancelled" and state["progress"]["done"] < 30
        assert state["finishedAt"] is not None
        assert slow.calls["slow-student"] - generated <= 30  # at most the batch already in flight
    finally:
        server.should_exit = True
        await task


async def test_a_redelivered_batch_calls_no_model_twice(judged: Project, judge: FakeJudge, running) -> None:  # type: ignore[no-untyped-def]
    """After a crash the unacknowledged batch comes again: the same events (the api keeps the first),
    and every model call it already made is answered by the router's cache, not the upstream."""
    from services.common.events import EvalEvaluator, EvalRequest, EvalRow
    from services.common.secrets import internal_token
    from services.eval.clients import RouterClient
    from services.eval.service import EvalWorker

    settings = running.settings
    client = RouterClient(settings.resolved_router_grpc_url(), internal_token(settings))
    worker = EvalWorker(client, settings)
    rows = [
        EvalRow(
            entry_id=f"e{i}",
            input={"messages": [{"role": "user", "content": f"redelivered {i} {time.monotonic_ns()}"}]},
            expected={"role": "assistant", "content": str(i)},
            output_keys={OTHER: f"k{i}"},
        )
        for i in range(4)
    ]
    request = EvalRequest(
        request_id="ev_redelivery:0",
        eval_id="ev_redelivery",
        project_id=judged.id,
        models=["original", OTHER],
        evaluators=[EvalEvaluator(type="head_to_head", name="h2h", judge_model=JUDGE)],
        rows=rows,
    )
    runs: list[list[EvalEvent]] = [[], []]
    try:
        before = len(judge.requests)
        await worker.handle(request, lambda e: _collect(runs[0], e))
        first_calls = len(judge.requests) - before
        await worker.handle(request, lambda e: _collect(runs[1], e))
        second_calls = len(judge.requests) - before - first_calls
    finally:
        await worker.close()
        await client.close()
    assert first_calls == 8 and second_calls == 0  # 4 generations + 4 judgements, then none
    assert sorted(e.event_id for e in runs[0]) == sorted(e.event_id for e in runs[1])
    first = {e.event_id: e.scores for e in runs[0]}
    assert all(first[e.event_id] == e.scores for e in runs[1])


async def _collect(into: list, event: EvalEvent) -> None:  # type: ignore[type-arg]
    into.append(event)


async def test_cli_watches_an_eval_and_prints_results(judged: Project) -> None:
    from typer.testing import CliRunner

    from services.cli import app

    async with judged.client() as http:
        dataset_id = await make_dataset(http, count=2)
        body = {**eval_body(dataset_id), "evaluators": eval_body(dataset_id)["evaluators"][:1]}
        started = (await http.post("/evals", json=body)).json()
    arguments = ["evals", "watch", started["id"], "--base-url", judged.base_url, "--api-key", judged.key]
    result = await asyncio.to_thread(CliRunner().invoke, app, arguments, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "student vs base (succeeded)" in result.output and "2/2" in result.output
    assert "exact" in result.output and "1.000" in result.output


async def test_estimate_prices_the_calls_it_can(project: Project) -> None:
    from services.api.datasets.rows import estimate_tokens

    async with project.client() as http:
        created = await http.post(
            "/external-providers",
            json={
                "slug": "priced",
                "type": "openai",
                "baseUrl": "http://127.0.0.1:9/v1",
                "models": [{"slug": "gen", "inputPricePerMillion": 2.0, "outputPricePerMillion": 4.0}],
            },
        )
        assert created.status_code == 201, created.text
        dataset_id = await make_dataset(http, count=3)
        body = {
            "name": "priced",
            "datasetId": dataset_id,
            "models": ["original", "openpipe:priced/gen"],
            "evaluators": [{"type": "code", "name": "exact", "source": EXACT_MATCH}],
        }
        priced = (await http.post("/evals/estimate", json=body)).json()["estimatedCost"]
        unpriced = (
            await http.post("/evals/estimate", json={**body, "models": ["original", "openpipe:priced/other"]})
        ).json()["estimatedCost"]
    expected = 0.0
    for i in range(3):
        row = entry(i)
        tokens_in = estimate_tokens({"messages": row["messages"][:-1]})
        tokens_out = estimate_tokens(row["messages"][-1])
        expected += (tokens_in * 2.0 + tokens_out * 4.0) / 1_000_000
    assert priced["usd"] == pytest.approx(expected, rel=0.05) and priced["usdCoversEveryCall"] is True
    assert unpriced["usd"] is None and unpriced["usdCoversEveryCall"] is False
