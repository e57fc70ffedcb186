"""Judgements and eval results reach ClickHouse through the ingest service's analytics writers."""

from __future__ import annotations

import asyncio
import secrets
import time

import orjson

from services.common.clickhouse import ClickHouse
from services.common.events import (
    EVAL_EVENTS_TOPIC,
    JUDGEMENTS_TOPIC,
    DeadLetter,
    EvalEvent,
    EvalOutput,
    EvalScore,
    JudgementEvent,
    dlq_topic,
)
from services.ingest.analytics import distinct_rows
from tests.conftest import Project, wait_until
from tests.helpers import read_topic, send_raw


def clickhouse(running) -> ClickHouse:
    """The running platform's own client (chDB allows one process on its path)."""
    return running.platform.state["ingest"].clickhouse


async def stored(running, table: str, project_id: str) -> list[dict]:
    ch = clickhouse(running)
    return await ch.query_dicts(
        f"SELECT * FROM {ch.database}.{table} FINAL WHERE project_id = {{p:String}}", {"p": project_id}
    )


async def count_raw(running, table: str, project_id: str) -> int:
    """Rows without FINAL: a re-delivered batch dropped by ClickHouse never shows up here either."""
    ch = clickhouse(running)
    sql = f"SELECT count() FROM {ch.database}.{table} WHERE project_id = {{p:String}}"
    return int((await ch.query_rows(sql, {"p": project_id}))[0][0])


def judgement(project_id: str, **overrides: object) -> JudgementEvent:
    fields: dict = {
        "judgement_id": f"jdg-{secrets.token_hex(6)}",
        "project_id": project_id,
        "criterion": "politeness",
        "criterion_version": 3,
        "model": "gpt-4o-mini",
        "status": "success",
        "score": 0.9,
        "judgement": "PASS",
        "explanation": "courteous",
        "prompt_tokens": 120,
        "completion_tokens": 14,
        "cost_usd": 0.00027,
        "latency_ms": 310,
        "created_at": int(time.time() * 1000),
    }
    return JudgementEvent.model_validate({**fields, **overrides})


def eval_row_event(project_id: str, eval_id: str, entry_id: str) -> EvalEvent:
    return EvalEvent(
        event_id=f"{eval_id}:{entry_id}",
        eval_id=eval_id,
        project_id=project_id,
        type="row",
        entry_id=entry_id,
        outputs=[
            EvalOutput(
                model="gpt-4o-mini",
                output_key="k1",
                output={"role": "assistant", "content": "4"},
                latency_ms=90,
                prompt_tokens=12,
                completion_tokens=1,
                cost_usd=0.00001,
            ),
            EvalOutput(model="ft:small", error="upstream 500"),
        ],
        scores=[
            EvalScore(evaluator="exact", model="gpt-4o-mini", score=1.0),
            EvalScore(
                evaluator="judge",
                model="gpt-4o-mini",
                score=0.8,
                explanation="right",
                judge_calls=1,
                cost_usd=0.0002,
            ),
        ],
        created_at=int(time.time() * 1000),
    )


async def publish(running, topic: str, events: list, key: str) -> None:
    values = [e if isinstance(e, bytes) else e.model_dump_json().encode() for e in events]
    await send_raw(running.settings.kafka_url, topic, values, key=key.encode())


async def test_judgements_are_stored_once_with_version_model_tokens_and_cost(
    project: Project, running
) -> None:
    ok = judgement(project.id)
    failed = judgement(
        project.id, status="error", score=0.0, judgement=None, error_code="upstream_error", cost_usd=None
    )
    for _ in range(3):  # re-delivery
        await publish(running, JUDGEMENTS_TOPIC, [ok, failed], project.id)

    await wait_until(lambda: _has(running, "judgements", project.id, 2), timeout=15, what="2 judgements")
    await asyncio.sleep(0.5)  # any duplicate has had time to land
    rows = {r["judgement_id"]: r for r in await stored(running, "judgements", project.id)}
    assert set(rows) == {ok.judgement_id, failed.judgement_id}
    assert await count_raw(running, "judgements", project.id) == 2
    row = rows[ok.judgement_id]
    assert (row["criterion"], row["criterion_version"], row["model"]) == ("politeness", 3, "gpt-4o-mini")
    assert (row["status"], row["score"], row["judgement"]) == ("success", 0.9, "PASS")
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]) == (120, 14, 0.00027)
    assert row["explanation"] == "courteous" and row["created_at_ms"] == ok.created_at
    bad = rows[failed.judgement_id]
    assert bad["status"] == "error" and bad["error_code"] == "upstream_error" and bad["cost_usd"] is None


async def test_a_batch_larger_than_a_decoding_slice_is_stored_whole(project: Project, running) -> None:
    from services.ingest.analytics import DECODE_SLICE

    events = [judgement(project.id) for _ in range(DECODE_SLICE * 2 + 10)]
    await publish(running, JUDGEMENTS_TOPIC, [*events, events[0]], project.id)  # one repeated
    await wait_until(
        lambda: _has(running, "judgements", project.id, len(events)), timeout=15, what="all judgements"
    )
    rows = await stored(running, "judgements", project.id)
    assert {r["judgement_id"] for r in rows} == {e.judgement_id for e in events}


async def test_eval_outputs_and_scores_are_stored_once(project: Project, running) -> None:
    eval_id = f"eval-{secrets.token_hex(6)}"
    row_event = eval_row_event(project.id, eval_id, "entry-1")
    status = EvalEvent(
        event_id=f"{eval_id}:status", eval_id=eval_id, project_id=project.id, type="status", status="running"
    )
    for _ in range(2):
        await publish(running, EVAL_EVENTS_TOPIC, [status, row_event], eval_id)

    await wait_until(lambda: _has(running, "eval_results", project.id, 4), timeout=15, what="4 results")
    await asyncio.sleep(0.5)
    rows = await stored(running, "eval_results", project.id)
    assert len(rows) == 4 and await count_raw(running, "eval_results", project.id) == 4
    outputs = {r["model"]: r for r in rows if r["kind"] == "output"}
    scores = {r["evaluator"]: r for r in rows if r["kind"] == "score"}
    assert set(outputs) == {"gpt-4o-mini", "ft:small"} and set(scores) == {"exact", "judge"}
    good = outputs["gpt-4o-mini"]
    assert orjson.loads(good["output"]) == {"role": "assistant", "content": "4"}
    assert (good["prompt_tokens"], good["completion_tokens"], good["latency_ms"]) == (12, 1, 90)
    assert good["eval_id"] == eval_id and good["entry_id"] == "entry-1"
    assert outputs["ft:small"]["error"] == "upstream 500" and outputs["ft:small"]["output"] == ""
    assert scores["judge"]["score"] == 0.8 and scores["judge"]["judge_calls"] == 1
    assert scores["exact"]["score"] == 1.0 and scores["exact"]["model"] == "gpt-4o-mini"


async def test_poison_goes_to_the_dlq_and_does_not_block(project: Project, running) -> None:
    marker = secrets.token_hex(8)
    good_judgement = judgement(project.id)
    missing = judgement(project.id).model_dump(mode="json")
    del missing["criterion_version"]
    missing["explanation"] = marker
    await publish(
        running,
        JUDGEMENTS_TOPIC,
        [b"not json " + marker.encode(), orjson.dumps(missing), good_judgement],
        project.id,
    )
    eval_id = f"eval-{marker}"
    wrong_type = {**eval_row_event(project.id, eval_id, "x").model_dump(mode="json"), "type": marker}
    await publish(
        running,
        EVAL_EVENTS_TOPIC,
        [orjson.dumps(wrong_type), eval_row_event(project.id, eval_id, "entry-2")],
        eval_id,
    )

    await wait_until(lambda: _has(running, "judgements", project.id, 1), timeout=15, what="judgement")
    await wait_until(lambda: _has(running, "eval_results", project.id, 4), timeout=15, what="results")

    async def parked(topic: str, model: str) -> list[DeadLetter]:
        letters = [
            DeadLetter.model_validate_json(v) for v in await read_topic(running.settings.kafka_url, topic)
        ]
        return [d for d in letters if marker in d.payload and d.reason.startswith(f"invalid {model}")]

    async def all_parked() -> bool:
        return (
            len(await parked(dlq_topic(JUDGEMENTS_TOPIC), "JudgementEvent")) == 2
            and len(await parked(dlq_topic(EVAL_EVENTS_TOPIC), "EvalEvent")) == 1
        )

    await wait_until(all_parked, timeout=15, what="dead letters")
    reasons = sorted(d.reason for d in await parked(dlq_topic(JUDGEMENTS_TOPIC), "JudgementEvent"))
    assert any("criterion_version" in r for r in reasons), reasons
    (letter,) = await parked(dlq_topic(EVAL_EVENTS_TOPIC), "EvalEvent")
    assert letter.topic == EVAL_EVENTS_TOPIC and "type" in letter.reason and letter.key == eval_id


async def _has(running, table: str, project_id: str, n: int) -> bool:
    return len(await stored(running, table, project_id)) >= n


def test_batches_of_the_same_events_insert_the_same_rows_under_the_same_token() -> None:
    """However a re-delivered stream is cut into batches, a batch of events already written (in any
    order, repeated) yields the rows and token of the first, so ClickHouse drops it; the time of
    the try (the last column) does not count."""
    a, b, c = ["p", "a", 1, 100], ["p", "b", 2, 200], ["p", "c", 3, 300]
    first_rows, first_token = distinct_rows([a, b], 3)
    again_rows, again_token = distinct_rows([[*b[:3], 999], a, [*a[:3], 7], b], 3)
    assert again_token == first_token and [r[:3] for r in again_rows] == [r[:3] for r in first_rows]
    assert len(again_rows) == 2
    assert distinct_rows([a, b, c], 3)[1] != first_token
    assert distinct_rows([a], 3)[1] != first_token
