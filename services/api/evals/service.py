"""Evals: define a run, fan its rows out on ``eval.requests.v1``, apply ``eval.events.v1``, and
read the results (sorted table, rows, head-to-head matrix, exports, a chart).

The api owns the catalog, so the eval worker gets everything in the request (each row's input,
the dataset's output, and the outputs already generated for the same model, input and settings)
and reports back by event. Applying an event is idempotent (``eval_applied_events``).
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
from collections import defaultdict
from datetime import datetime
from typing import Any

import orjson
from faststream.kafka import KafkaBroker
from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.api.datasets.models import DatasetEntry
from services.api.datasets.rows import estimate_tokens
from services.api.datasets.service import get_dataset
from services.api.evals.models import Eval, EvalAppliedEvent, EvalOutputRecord, EvalResult, EvalRowOutput
from services.api.evals.schemas import (
    ORIGINAL,
    TERMINAL,
    CodeEvaluator,
    CriterionEvaluator,
    EvalCreate,
    EvalOut,
    GraderEvaluator,
    HeadToHeadEvaluator,
    Progress,
    evaluator_name,
)
from services.api.providers.models import Deployment, ExternalModel, ExternalProvider
from services.common.clock import iso_z, now
from services.common.db import lock_row
from services.common.errors import APIError, bad_request, not_found
from services.common.events import (
    CATALOG_TOPIC,
    EVAL_KIND,
    EVAL_REQUESTS_TOPIC,
    CatalogRecord,
    EvalEvaluator,
    EvalEvent,
    EvalRequest,
    EvalRow,
)
from services.common.ids import new_id
from services.eval.graders import validate_grader

BATCH_SIZE = 100  # rows per eval.requests.v1 message: the unit of redelivery after a crash
MODEL_GRADERS = ("score_model", "label_model")


def eval_out(record: Eval) -> EvalOut:
    return EvalOut(
        id=record.id,
        name=record.name,
        datasetId=record.dataset_id,
        split=record.split,
        sample=record.sample,
        models=record.models,
        evaluators=record.evaluators,
        status=record.status,  # type: ignore[arg-type]
        progress=Progress(done=record.progress_done, total=record.progress_total),
        estimatedCost=record.estimated_cost,
        error=record.error,
        created=iso_z(record.created_at) or "",
        updated=iso_z(record.updated_at) or "",
        finishedAt=iso_z(record.finished_at),
    )


# --- defining a run -------------------------------------------------------------------------------


def _check_evaluators(body: EvalCreate) -> None:
    import ast

    for index, evaluator in enumerate(body.evaluators):
        param = f"evaluators.{index}"
        if isinstance(evaluator, CodeEvaluator):
            try:
                tree = ast.parse(evaluator.source)
            except SyntaxError as exc:
                raise bad_request(
                    f"source is not valid Python: {exc.msg} (line {exc.lineno})", param=f"{param}.source"
                ) from None
            if not any(isinstance(n, ast.FunctionDef) and n.name == "grader" for n in tree.body):
                raise bad_request(
                    "source must define "
                    "grader(messages, tools, tool_choice, generated_output, dataset_output).",
                    param=f"{param}.source",
                )
        elif isinstance(evaluator, GraderEvaluator):
            validate_grader(evaluator.grader, f"{param}.grader")


def _wire_evaluator(evaluator: Any) -> EvalEvaluator:
    name = evaluator_name(evaluator)
    if isinstance(evaluator, CodeEvaluator):
        return EvalEvaluator(type="code", name=name, source=evaluator.source)
    if isinstance(evaluator, CriterionEvaluator):
        return EvalEvaluator(type="criterion", name=name, criterion=evaluator.criterion)
    if isinstance(evaluator, HeadToHeadEvaluator):
        return EvalEvaluator(
            type="head_to_head",
            name=name,
            judge_model=evaluator.judge_model,
            instructions=evaluator.instructions,
        )
    return EvalEvaluator(
        type="grader", name=name, grader=evaluator.grader.model_dump(mode="json", exclude_none=True)
    )


def entry_input(entry: DatasetEntry) -> dict[str, Any]:
    request: dict[str, Any] = {"messages": entry.messages}
    for key in ("tools", "tool_choice", "response_format"):
        if getattr(entry, key) is not None:
            request[key] = getattr(entry, key)
    return request


def output_key(model: str, request: dict[str, Any], generation: dict[str, Any]) -> str:
    """Outputs are generated once per (model, input, generation settings) and reused."""
    canonical = orjson.dumps(
        {"model": model, "input": request, "generation": generation}, option=orjson.OPT_SORT_KEYS
    )
    return hashlib.sha256(canonical).hexdigest()


async def _chosen_entries(
    session: AsyncSession, dataset_id: str, split: str, sample: int | None, seed: str
) -> list[DatasetEntry]:
    entries = list(
        await session.scalars(
            select(DatasetEntry)
            .where(DatasetEntry.dataset_id == dataset_id, DatasetEntry.split == split)
            .order_by(DatasetEntry.created_at, DatasetEntry.id)
        )
    )
    if sample is not None and sample < len(entries):
        chosen = {e.id for e in random.Random(seed).sample(entries, sample)}
        entries = [e for e in entries if e.id in chosen]
    return entries


async def _known_outputs(session: AsyncSession, project_id: str, keys: list[str]) -> dict[str, dict]:
    known: dict[str, dict] = {}
    for start in range(0, len(keys), 500):
        rows = await session.execute(
            select(EvalOutputRecord.output_key, EvalOutputRecord.output).where(
                EvalOutputRecord.project_id == project_id,
                EvalOutputRecord.output_key.in_(keys[start : start + 500]),
            )
        )
        known.update(dict(rows.all()))
    return known


JUDGE_PROMPT_TOKENS = 150  # instructions around the row in a judge's prompt
JUDGE_ANSWER_TOKENS = 60


def _model_graders(evaluator: GraderEvaluator) -> list[Any]:
    graders = [evaluator.grader, *getattr(evaluator.grader, "graders", {}).values()]
    return [g for g in graders if g.type in MODEL_GRADERS]


def _called_models(body: EvalCreate) -> set[str]:
    called = {m for m in body.models if m != ORIGINAL}
    for evaluator in body.evaluators:
        if isinstance(evaluator, HeadToHeadEvaluator):
            called.add(evaluator.judge_model)
        elif isinstance(evaluator, GraderEvaluator):
            called |= {g.model for g in _model_graders(evaluator)}
    return called


async def _prices(session: AsyncSession, project_id: str, models: set[str]) -> dict[str, tuple[float, float]]:
    """USD per million input/output tokens of the models whose price the project configured
    (external providers' models and fine-tuned deployments); others are unknown here."""
    prices: dict[str, tuple[float, float]] = {}
    for model in models:
        prefix, _, name = model.partition(":")
        if prefix != "openpipe" or not name:
            continue
        provider, slash, external = name.partition("/")
        if slash:
            query = (
                select(ExternalModel.input_price_per_million, ExternalModel.output_price_per_million)
                .join(ExternalProvider, ExternalProvider.id == ExternalModel.provider_id)
                .where(
                    ExternalProvider.project_id == project_id,
                    ExternalProvider.slug == provider,
                    ExternalModel.slug == external,
                )
            )
        else:
            query = select(Deployment.input_price_per_million, Deployment.output_price_per_million).where(
                Deployment.project_id == project_id, Deployment.slug == name
            )
        row = (await session.execute(query)).first()
        if row is not None and row[0] is not None and row[1] is not None:
            prices[model] = (row[0], row[1])
    return prices


def _usd(body: EvalCreate, rows: list[EvalRow], prices: dict[str, tuple[float, float]]) -> tuple[float, bool]:
    """The priced part of the run (tokens estimated at ~4 characters each) and whether every
    model call in it has a known price."""
    total, complete = 0.0, True

    def add(model: str, tokens_in: int, tokens_out: int, calls: int = 1) -> None:
        nonlocal total, complete
        if model not in prices:
            complete = False
            return
        price_in, price_out = prices[model]
        total += calls * (tokens_in * price_in + tokens_out * price_out) / 1_000_000

    pairs = math.comb(len(body.models), 2)
    for row in rows:
        tokens_in, tokens_out = estimate_tokens(row.input), estimate_tokens(row.expected)
        for model in body.models:
            if model != ORIGINAL and model not in row.known_outputs:
                add(model, tokens_in, tokens_out)
        judged_in = tokens_in + tokens_out + JUDGE_PROMPT_TOKENS
        for evaluator in body.evaluators:
            if isinstance(evaluator, HeadToHeadEvaluator):
                add(evaluator.judge_model, judged_in + tokens_out, JUDGE_ANSWER_TOKENS, pairs)
            elif isinstance(evaluator, CriterionEvaluator):
                complete = False  # the criterion's judge model and prompt live with the judge
            elif isinstance(evaluator, GraderEvaluator):
                for grader in _model_graders(evaluator):
                    add(grader.model, judged_in, JUDGE_ANSWER_TOKENS, len(body.models))
    return total, complete


def _estimate(body: EvalCreate, rows: list[EvalRow]) -> dict[str, Any]:
    generated = [m for m in body.models if m != ORIGINAL]
    generation_calls = sum(1 for r in rows for m in generated if m not in r.known_outputs)
    pairs = math.comb(len(body.models), 2)
    judge_calls = 0
    embedding_calls = 0
    for evaluator in body.evaluators:
        if isinstance(evaluator, CriterionEvaluator):
            judge_calls += len(rows) * len(body.models)
        elif isinstance(evaluator, HeadToHeadEvaluator):
            judge_calls += len(rows) * pairs
        elif isinstance(evaluator, GraderEvaluator):
            dumped = orjson.dumps(evaluator.grader.model_dump(mode="json")).decode()
            judge_calls += len(rows) * len(body.models) * sum(dumped.count(f'"{t}"') for t in MODEL_GRADERS)
            embedding_calls += len(rows) * len(body.models) * dumped.count('"cosine"')
    return {
        "entries": len(rows),
        "generationCalls": generation_calls,
        "reusedOutputs": sum(1 for r in rows for m in generated if m in r.known_outputs),
        "judgeCalls": judge_calls,
        "headToHeadComparisons": len(rows) * pairs
        if any(isinstance(e, HeadToHeadEvaluator) for e in body.evaluators)
        else 0,
        "embeddingCalls": embedding_calls,
        "usd": None,
    }


async def plan_eval(
    *, session: AsyncSession, project_id: str, body: EvalCreate, eval_id: str
) -> tuple[list[EvalRow], dict[str, Any]]:
    """The rows of the run (with outputs that already exist) and its estimated cost."""
    _check_evaluators(body)
    dataset = await get_dataset(session=session, project_id=project_id, dataset_id=body.dataset_id)
    entries = await _chosen_entries(session, dataset.id, body.split, body.sample, eval_id)
    if not entries:
        raise bad_request(f"The dataset has no {body.split} entries to evaluate.", param="split")
    generation = body.generation.model_dump(exclude_none=True)
    rows = []
    for entry in entries:
        request = entry_input(entry)
        keys = {m: output_key(m, request, generation) for m in body.models if m != ORIGINAL}
        rows.append(
            EvalRow(
                entry_id=entry.id,
                input=request,
                expected=entry.output,
                metadata=entry.entry_metadata or {},
                output_keys=keys,
            )
        )
    known = await _known_outputs(
        session, project_id, sorted({k for r in rows for k in r.output_keys.values()})
    )
    for row in rows:
        row.known_outputs = {m: known[k] for m, k in row.output_keys.items() if k in known}
    estimate = _estimate(body, rows)
    prices = await _prices(session, project_id, _called_models(body))
    usd, complete = _usd(body, rows, prices)
    estimate["usd"] = round(usd, 6) if prices else None
    estimate["usdCoversEveryCall"] = complete and bool(prices)
    return rows, estimate


async def create_eval(
    *, session: AsyncSession, broker: KafkaBroker, project_id: str, body: EvalCreate
) -> Eval:
    eval_id = new_id("eval")
    rows, estimate = await plan_eval(session=session, project_id=project_id, body=body, eval_id=eval_id)
    moment = now()
    record = Eval(
        id=eval_id,
        project_id=project_id,
        dataset_id=body.dataset_id,
        name=body.name,
        split=body.split,
        sample=body.sample,
        models=body.models,
        evaluators=[e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in body.evaluators],
        status="queued",
        progress_done=0,
        progress_total=len(rows),
        estimated_cost=estimate,
        created_at=moment,
        updated_at=moment,
    )
    session.add(record)
    await session.flush()
    evaluators = [_wire_evaluator(e) for e in body.evaluators]
    generation = body.generation.model_dump(exclude_none=True)
    # Published before the commit: if Kafka refuses, the eval is rolled back and the client retries.
    for number, start in enumerate(range(0, len(rows), BATCH_SIZE)):
        request = EvalRequest(
            request_id=f"{eval_id}:{number}",
            eval_id=eval_id,
            project_id=project_id,
            models=body.models,
            evaluators=evaluators,
            rows=rows[start : start + BATCH_SIZE],
            generation=generation,
        )
        await broker.publish(request.model_dump(mode="json"), EVAL_REQUESTS_TOPIC, key=eval_id.encode())
    return record


async def get_eval(*, session: AsyncSession, project_id: str, eval_id: str, lock: bool = False) -> Eval:
    record = await lock_row(session, Eval, eval_id) if lock else await session.get(Eval, eval_id)
    if record is None or record.project_id != project_id:
        raise not_found(f"No eval with id {eval_id!r} in this project.", param="eval_id")
    return record


async def list_evals(*, session: AsyncSession, project_id: str) -> list[Eval]:
    return list(
        await session.scalars(
            select(Eval).where(Eval.project_id == project_id).order_by(Eval.created_at.desc(), Eval.id)
        )
    )


async def publish_stop(broker: KafkaBroker, record: Eval, *, deleted: bool) -> None:
    """Tell eval workers (through catalog.v1) to drop the rest of this eval's work."""
    stop = CatalogRecord(kind=EVAL_KIND, id=record.id, deleted=deleted, data={"status": "cancelled"})
    await broker.publish(stop.model_dump(mode="json"), CATALOG_TOPIC, key=stop.key.encode())


async def cancel_eval(*, session: AsyncSession, broker: KafkaBroker, project_id: str, eval_id: str) -> Eval:
    record = await get_eval(session=session, project_id=project_id, eval_id=eval_id, lock=True)
    if record.status in TERMINAL:
        raise APIError(409, f"The eval is already {record.status}.", code="eval_finished", param="eval_id")
    await publish_stop(broker, record, deleted=False)
    record.status = "cancelled"
    record.updated_at = record.finished_at = now()
    return record


async def delete_eval(*, session: AsyncSession, broker: KafkaBroker, project_id: str, eval_id: str) -> None:
    record = await get_eval(session=session, project_id=project_id, eval_id=eval_id, lock=True)
    if record.status not in TERMINAL:
        await publish_stop(broker, record, deleted=True)
    for table in (EvalAppliedEvent, EvalResult, EvalRowOutput):
        await session.execute(delete(table).where(table.eval_id == record.id))
    await session.delete(record)


# --- applying results -----------------------------------------------------------------------------


def _insert(session: AsyncSession) -> Any:
    return pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert


async def apply_events(*, session: AsyncSession, events: list[EvalEvent]) -> int:
    """Apply a batch of events in bulk; returns how many were new (re-deliveries and events of
    evals that are gone or stopped are skipped)."""
    applied = 0
    by_eval: dict[str, list[EvalEvent]] = defaultdict(list)
    for event in events:
        by_eval[event.eval_id].append(event)
    for eval_id, mine in by_eval.items():
        record = await lock_row(session, Eval, eval_id)  # a cancel waits, or is seen here
        if record is None or record.status in TERMINAL:
            continue
        fresh = await _first_time(session, record, [e for e in mine if e.project_id == record.project_id])
        applied += len(fresh)
        await _apply(session, record, fresh)
    return applied


async def _first_time(session: AsyncSession, record: Eval, events: list[EvalEvent]) -> list[EvalEvent]:
    unique = list({e.event_id: e for e in events}.values())
    if not unique:
        return []
    inserted = await session.execute(
        _insert(session)(EvalAppliedEvent)
        .values([{"event_id": e.event_id, "eval_id": record.id} for e in unique])
        .on_conflict_do_nothing()
        .returning(EvalAppliedEvent.event_id)
    )
    new = set(inserted.scalars())
    return [e for e in unique if e.event_id in new]


async def _apply(session: AsyncSession, record: Eval, events: list[EvalEvent]) -> None:
    moment = now()
    rows = [e for e in events if e.type == "row"]
    for event in events:
        if event.type == "status" and event.status == "failed":
            record.status, record.error, record.finished_at = "failed", event.message[:2000], moment
    if record.status == "failed":
        record.updated_at = moment
        return
    if events:
        record.status = "running"
        record.updated_at = moment
    if rows:
        await _store_rows(session, record, rows, moment)
        record.progress_done += len(rows)
        if record.progress_done >= record.progress_total:
            record.status, record.finished_at = "succeeded", moment


async def _bulk(session: AsyncSession, table: Any, values: list[dict[str, Any]], chunk: int = 500) -> None:
    for start in range(0, len(values), chunk):
        await session.execute(
            _insert(session)(table).values(values[start : start + chunk]).on_conflict_do_nothing()
        )


async def _store_rows(session: AsyncSession, record: Eval, events: list[EvalEvent], moment: datetime) -> None:
    shared = [
        dict(
            project_id=record.project_id,
            output_key=o.output_key,
            model=o.model,
            output=o.output,
            latency_ms=o.latency_ms,
            prompt_tokens=o.prompt_tokens,
            completion_tokens=o.completion_tokens,
            cost_usd=o.cost_usd,
            created_at=moment,
        )
        for e in events
        for o in e.outputs
        if o.output is not None and o.output_key and not o.reused
    ]
    per_row = [
        dict(
            eval_id=record.id,
            entry_id=e.entry_id,
            model=o.model,
            output_key=o.output_key,
            output=o.output,
            error=o.error,
            reused=o.reused,
            latency_ms=o.latency_ms,
            cost_usd=o.cost_usd,
        )
        for e in events
        for o in e.outputs
    ]
    scores = [
        dict(
            eval_id=record.id,
            entry_id=e.entry_id,
            evaluator=s.evaluator,
            model=s.model,
            opponent=s.opponent,
            score=s.score,
            winner=s.winner,
            explanation=s.explanation,
            error=s.error,
            judge_calls=s.judge_calls,
            cost_usd=s.cost_usd,
        )
        for e in events
        for s in e.scores
    ]
    await _bulk(session, EvalOutputRecord, shared)
    await _bulk(session, EvalRowOutput, per_row)
    await _bulk(session, EvalResult, scores)


# --- reading results ------------------------------------------------------------------------------


def _evaluator_types(record: Eval) -> dict[str, str]:
    from pydantic import TypeAdapter

    from services.api.evals.schemas import Evaluator

    adapter = TypeAdapter(Evaluator)
    return {evaluator_name(adapter.validate_python(e)): e["type"] for e in record.evaluators}


async def results_table(*, session: AsyncSession, record: Eval) -> list[dict[str, Any]]:
    """Per evaluator and model: mean score and pass rate, or win rate; cost and latency; sorted."""
    outputs = (
        await session.execute(
            select(
                EvalRowOutput.model,
                func.avg(EvalRowOutput.latency_ms),
                func.sum(EvalRowOutput.cost_usd),
                func.count(EvalRowOutput.error),
            )
            .where(EvalRowOutput.eval_id == record.id)
            .group_by(EvalRowOutput.model)
        )
    ).all()
    per_model = {m: (latency, cost, errors) for m, latency, cost, errors in outputs}
    results = list(await session.scalars(select(EvalResult).where(EvalResult.eval_id == record.id)))
    types = _evaluator_types(record)
    table = []
    for name, kind in types.items():
        mine = [r for r in results if r.evaluator == name]
        for model in record.models:
            table.append(_summary(name, kind, model, mine, per_model.get(model)))
    order = list(types)
    table.sort(
        key=lambda r: (
            order.index(r["evaluator"]),
            -(r["winRate"] if r["winRate"] is not None else r["score"] if r["score"] is not None else -1),
        )
    )
    return table


def _summary(
    name: str, kind: str, model: str, results: list[EvalResult], output: tuple | None
) -> dict[str, Any]:
    latency, cost, generation_errors = output or (None, None, 0)
    row: dict[str, Any] = {
        "evaluator": name,
        "evaluatorType": kind,
        "model": model,
        "score": None,
        "passRate": None,
        "winRate": None,
        "wins": None,
        "losses": None,
        "ties": None,
        "rows": 0,
        "errors": 0,
        "costUsd": cost,
        "latencyMs": round(latency) if latency is not None else None,
        "generationErrors": generation_errors or 0,
    }
    if kind == "head_to_head":
        pairs = [r for r in results if model in (r.model, r.opponent) and r.opponent]
        decided = [r for r in pairs if r.error is None]
        wins = sum(1 for r in decided if r.winner == model)
        ties = sum(1 for r in decided if r.winner == "tie")
        losses = len(decided) - wins - ties
        row.update(
            wins=wins,
            losses=losses,
            ties=ties,
            rows=len(pairs),
            errors=len(pairs) - len(decided),
            winRate=(wins + 0.5 * ties) / len(decided) if decided else None,
        )
        row["score"] = row["winRate"]
        return row
    mine = [r for r in results if r.model == model and not r.opponent]
    scored = [r.score for r in mine if r.error is None and r.score is not None]
    row.update(
        rows=len(mine),
        errors=len(mine) - len(scored),
        score=sum(scored) / len(scored) if scored else None,
        passRate=sum(1 for s in scored if s >= 0.5) / len(scored) if scored else None,
    )
    return row


async def matrix(*, session: AsyncSession, record: Eval, evaluator: str | None) -> dict[str, Any]:
    types = _evaluator_types(record)
    names = [n for n, kind in types.items() if kind == "head_to_head"]
    if not names:
        raise bad_request("This eval has no head_to_head evaluator.", param="evaluator")
    name = evaluator or names[0]
    if name not in names:
        raise bad_request(f"No head_to_head evaluator named {name!r}; use one of {names}.", param="evaluator")
    pairs = await session.scalars(
        select(EvalResult).where(
            EvalResult.eval_id == record.id, EvalResult.evaluator == name, EvalResult.opponent != ""
        )
    )
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])  # wins, losses, ties of a vs b
    for pair in pairs:
        if pair.error is not None:
            continue
        a, b = pair.model, pair.opponent
        if pair.winner == "tie":
            counts[(a, b)][2] += 1
            counts[(b, a)][2] += 1
        else:
            winner, loser = (a, b) if pair.winner == a else (b, a)
            counts[(winner, loser)][0] += 1
            counts[(loser, winner)][1] += 1
    models = record.models
    rates: dict[str, dict[str, float | None]] = {}
    for a in models:
        rates[a] = {}
        for b in models:
            wins, losses, ties = counts[(a, b)]
            total = wins + losses + ties
            rates[a][b] = None if a == b or not total else (wins + 0.5 * ties) / total
    return {
        "object": "eval.matrix",
        "evaluator": name,
        "models": models,
        "winRates": rates,
        "counts": {
            a: {
                b: dict(zip(("wins", "losses", "ties"), counts[(a, b)], strict=True))
                for b in models
                if b != a
            }
            for a in models
        },
    }


def _cursor(values: tuple[str, ...]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode()


def _decode_cursor(cursor: str) -> tuple[str, str, str, str]:
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        entry_id, evaluator, model, opponent = (str(v) for v in values)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise bad_request(
            "Unknown cursor: pass the nextCursor of the previous page.", param="cursor"
        ) from None
    return entry_id, evaluator, model, opponent


async def list_rows(
    *,
    session: AsyncSession,
    record: Eval,
    model: str | None = None,
    evaluator: str | None = None,
    errors_only: bool = False,
    limit: int = 100,
    cursor: str | None = None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Per-row drill-down: each verdict with its explanation and the outputs it judged."""
    query = select(EvalResult).where(EvalResult.eval_id == record.id)
    if model:
        query = query.where((EvalResult.model == model) | (EvalResult.opponent == model))
    if evaluator:
        query = query.where(EvalResult.evaluator == evaluator)
    if errors_only:
        query = query.where(EvalResult.error.is_not(None))
    order = (EvalResult.entry_id, EvalResult.evaluator, EvalResult.model, EvalResult.opponent)
    if cursor:
        query = query.where(tuple_(*order) > tuple_(*_decode_cursor(cursor)))
    results = list(await session.scalars(query.order_by(*order).limit(limit + 1)))
    more = len(results) > limit
    results = results[:limit]
    outputs = await _row_outputs(session, record.id, sorted({r.entry_id for r in results}))
    rows = [
        {
            "entryId": r.entry_id,
            "evaluator": r.evaluator,
            "model": r.model,
            "opponent": r.opponent or None,
            "score": r.score,
            "winner": r.winner,
            "explanation": r.explanation,
            "error": r.error,
            "judgeCalls": r.judge_calls,
            "output": outputs.get((r.entry_id, r.model)),
            "opponentOutput": outputs.get((r.entry_id, r.opponent)) if r.opponent else None,
        }
        for r in results
    ]
    last = results[-1] if results else None
    next_cursor = (
        _cursor((last.entry_id, last.evaluator, last.model, last.opponent)) if more and last else None
    )
    return rows, next_cursor


async def _row_outputs(
    session: AsyncSession, eval_id: str, entry_ids: list[str]
) -> dict[tuple[str, str], Any]:
    if not entry_ids:
        return {}
    found = await session.execute(
        select(EvalRowOutput.entry_id, EvalRowOutput.model, EvalRowOutput.output, EvalRowOutput.error).where(
            EvalRowOutput.eval_id == eval_id, EvalRowOutput.entry_id.in_(entry_ids)
        )
    )
    return {(e, m): output if output is not None else {"error": error} for e, m, output, error in found.all()}


async def all_rows(*, session: AsyncSession, record: Eval) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        page, cursor = await list_rows(session=session, record=record, limit=1000, cursor=cursor)
        rows += page
        if cursor is None:
            return rows
