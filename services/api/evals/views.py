"""``/evals``: define, watch, read, export, chart, cancel and delete evaluation runs."""

from __future__ import annotations

import asyncio
import csv
import io

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from services.api.evals import service
from services.api.evals.charts import render_chart
from services.api.evals.schemas import EvalCreate, EvalDeleted, EvalList, EvalOut
from services.api.evals.service import eval_out
from services.common.auth import require_project
from services.common.errors import bad_request

router = APIRouter(tags=["evals"])

EXPORT_COLUMNS = ("entryId", "evaluator", "model", "opponent", "score", "winner", "explanation", "error")


@router.post("/evals", status_code=202, response_model=EvalOut)
async def create_eval(
    body: EvalCreate, request: Request, project_id: str = Depends(require_project)
) -> JSONResponse:
    """Start an eval; its cost estimate is in ``estimatedCost`` (``POST /evals/estimate`` first to see it)."""
    async with request.app.state.sessions.begin() as session:
        record = await service.create_eval(
            session=session, broker=request.app.state.broker, project_id=project_id, body=body
        )
        out = eval_out(record)
    return JSONResponse(out.model_dump(mode="json"), status_code=202)


@router.post("/evals/estimate")
async def estimate_eval(
    body: EvalCreate, request: Request, project_id: str = Depends(require_project)
) -> dict:
    """What ``POST /evals`` with this body would cost, before anything runs."""
    async with request.app.state.sessions() as session:
        _, estimate = await service.plan_eval(
            session=session, project_id=project_id, body=body, eval_id="estimate"
        )
    return {"object": "eval.estimate", "estimatedCost": estimate}


@router.get("/evals", response_model=EvalList)
async def list_evals(request: Request, project_id: str = Depends(require_project)) -> EvalList:
    async with request.app.state.sessions() as session:
        records = await service.list_evals(session=session, project_id=project_id)
    return EvalList(data=[eval_out(r) for r in records])


@router.get("/evals/{eval_id}", response_model=EvalOut)
async def get_eval(eval_id: str, request: Request, project_id: str = Depends(require_project)) -> EvalOut:
    async with request.app.state.sessions() as session:
        return eval_out(await service.get_eval(session=session, project_id=project_id, eval_id=eval_id))


@router.get("/evals/{eval_id}/results")
async def eval_results(eval_id: str, request: Request, project_id: str = Depends(require_project)) -> dict:
    async with request.app.state.sessions() as session:
        record = await service.get_eval(session=session, project_id=project_id, eval_id=eval_id)
        table = await service.results_table(session=session, record=record)
    return {"object": "list", "eval": eval_out(record).model_dump(mode="json"), "data": table}


@router.get("/evals/{eval_id}/rows")
async def eval_rows(
    eval_id: str,
    request: Request,
    model: str | None = None,
    evaluator: str | None = None,
    errors: bool = False,
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = None,
    project_id: str = Depends(require_project),
) -> dict:
    async with request.app.state.sessions() as session:
        record = await service.get_eval(session=session, project_id=project_id, eval_id=eval_id)
        rows, next_cursor = await service.list_rows(
            session=session,
            record=record,
            model=model,
            evaluator=evaluator,
            errors_only=errors,
            limit=limit,
            cursor=cursor,
        )
    return {"object": "list", "data": rows, "hasMore": next_cursor is not None, "nextCursor": next_cursor}


@router.get("/evals/{eval_id}/matrix")
async def eval_matrix(
    eval_id: str, request: Request, evaluator: str | None = None, project_id: str = Depends(require_project)
) -> dict:
    async with request.app.state.sessions() as session:
        record = await service.get_eval(session=session, project_id=project_id, eval_id=eval_id)
        return await service.matrix(session=session, record=record, evaluator=evaluator)


@router.get("/evals/{eval_id}/export")
async def export_eval(
    eval_id: str, request: Request, format: str = "jsonl", project_id: str = Depends(require_project)
) -> Response:
    if format not in ("csv", "jsonl"):
        raise bad_request("format must be csv or jsonl.", param="format")
    async with request.app.state.sessions() as session:
        record = await service.get_eval(session=session, project_id=project_id, eval_id=eval_id)
        rows = await service.all_rows(session=session, record=record)
    disposition = {"content-disposition": f'attachment; filename="{record.id}.{format}"'}
    if format == "jsonl":
        body = b"".join(orjson.dumps(row) + b"\n" for row in rows)
        return Response(body, media_type="application/x-ndjson", headers=disposition)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*EXPORT_COLUMNS, "output"], extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "output": orjson.dumps(row["output"]).decode() if row["output"] else ""})
    return Response(buffer.getvalue(), media_type="text/csv", headers=disposition)


@router.get("/evals/{eval_id}/chart.png", response_class=Response)
async def eval_chart(eval_id: str, request: Request, project_id: str = Depends(require_project)) -> Response:
    async with request.app.state.sessions() as session:
        record = await service.get_eval(session=session, project_id=project_id, eval_id=eval_id)
        table = await service.results_table(session=session, record=record)
        matrices = [
            await service.matrix(session=session, record=record, evaluator=row["evaluator"])
            for row in {r["evaluator"]: r for r in table if r["evaluatorType"] == "head_to_head"}.values()
        ]
    png = await asyncio.to_thread(render_chart, record.name, table, matrices)
    return Response(png, media_type="image/png")


@router.post("/evals/{eval_id}/cancel", response_model=EvalOut)
async def cancel_eval(eval_id: str, request: Request, project_id: str = Depends(require_project)) -> EvalOut:
    async with request.app.state.sessions.begin() as session:
        record = await service.cancel_eval(
            session=session, broker=request.app.state.broker, project_id=project_id, eval_id=eval_id
        )
        return eval_out(record)


@router.delete("/evals/{eval_id}", response_model=EvalDeleted)
async def delete_eval(
    eval_id: str, request: Request, project_id: str = Depends(require_project)
) -> EvalDeleted:
    async with request.app.state.sessions.begin() as session:
        await service.delete_eval(
            session=session, broker=request.app.state.broker, project_id=project_id, eval_id=eval_id
        )
    return EvalDeleted(id=eval_id)
