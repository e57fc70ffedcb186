"""The eval worker: for one batch of rows, the models' outputs (generated once, reused), then every
evaluator's verdicts, one ``eval.events.v1`` event per row.

- outputs: ``original`` is the dataset's; a stored output for the same (model, input, settings)
  arrives in the request and is reused; the rest are generated through the router (gRPC
  ``Inference``, response cache on, so a re-delivered batch does not call the model again);
- ``code``: the eval's grader in its sandbox, all rows of the batch in one round trip;
- ``grader``: an OpenAI grader object (``services.eval.graders``);
- ``criterion``: the judge service's gRPC ``Judge``;
- ``head_to_head``: every pair of models per row; identical outputs tie without a judge call;
  otherwise the judge model sees the two outputs in a random order (seeded per eval, row and
  pair, so a re-run asks the same question and hits the router's cache).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import orjson

from services.common.errors import APIError
from services.common.events import (
    EVAL_KIND,
    CatalogRecord,
    EvalEvaluator,
    EvalEvent,
    EvalOutput,
    EvalRequest,
    EvalRow,
    EvalScore,
)
from services.common.settings import Settings
from services.eval.clients import RouterClient
from services.eval.grader_schemas import GraderHolder
from services.eval.graders import GraderContext, make_sample, run_grader
from services.eval.sandbox import Limits, Sandbox, SandboxUnavailable

log = logging.getLogger(__name__)

ORIGINAL = "original"
MAX_SANDBOXES = 8
HEAD_TO_HEAD_SYSTEM = (
    "You compare two responses to the same conversation and decide which is better. {instructions}\n"
    'Answer with JSON only: {{"explanation": "<one or two sentences>", "winner": "A" | "B" | "TIE"}}.'
)
DEFAULT_INSTRUCTIONS = "Judge helpfulness, correctness and how well each follows the instructions."
HEAD_TO_HEAD_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "head_to_head",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "explanation": {"type": "string"},
                "winner": {"type": "string", "enum": ["A", "B", "TIE"]},
            },
            "required": ["explanation", "winner"],
            "additionalProperties": False,
        },
    },
}

Publish = Callable[[EvalEvent], Awaitable[None]]


def _message(completion: dict[str, Any]) -> dict[str, Any]:
    message = ((completion.get("choices") or [{}])[0] or {}).get("message") or {}
    if not message:
        raise ValueError("the model returned no message")
    output: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        output["tool_calls"] = message["tool_calls"]
    return output


def grader_message(output: dict[str, Any]) -> dict[str, Any]:
    """An output as the code graders see it: content, refusal and tool_calls always present."""
    return {
        "role": "assistant",
        "content": output.get("content"),
        "refusal": output.get("refusal"),
        "tool_calls": output.get("tool_calls") or None,
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def canonical(o: dict[str, Any]) -> bytes:
        calls = [c.get("function") for c in o.get("tool_calls") or []]
        return orjson.dumps(
            {"content": (o.get("content") or "").strip(), "calls": calls}, option=orjson.OPT_SORT_KEYS
        )

    return canonical(a) == canonical(b)


def _text(output: dict[str, Any]) -> str:
    text = output.get("content") or ""
    for call in output.get("tool_calls") or []:
        function = call.get("function") or {}
        text += f"\n[tool call {function.get('name')}({function.get('arguments')})]"
    return text.strip()


def grader_item(row: EvalRow) -> dict[str, Any]:
    """The ``item`` namespace of OpenAI graders in an eval: the entry's input and its own output."""
    return {
        "input": row.input,
        "messages": row.input.get("messages") or [],
        "output": row.expected,
        "output_text": row.expected.get("content") or "",
        "metadata": row.metadata,
    }


class EvalWorker:
    def __init__(self, models: RouterClient, settings: Settings, judge: Any = None) -> None:
        self.models = models
        self.judge = judge
        self.settings = settings
        self.slots = asyncio.Semaphore(settings.eval_concurrency)
        self.stopped: set[str] = set()
        self._sandboxes: OrderedDict[str, Sandbox] = OrderedDict()
        self._contexts: OrderedDict[str, GraderContext] = OrderedDict()

    # --- state -----------------------------------------------------------------------------------

    def apply_catalog(self, record: CatalogRecord) -> None:
        """A cancelled or deleted eval's remaining batches are dropped (learned from catalog.v1)."""
        if record.kind == EVAL_KIND:
            self.stopped.add(record.id)

    async def close(self) -> None:
        for sandbox in self._sandboxes.values():
            await sandbox.close()
        for context in self._contexts.values():
            await context.close()
        self._sandboxes.clear()
        self._contexts.clear()

    async def _sandbox(self, request: EvalRequest, evaluator: EvalEvaluator) -> Sandbox:
        key = f"{request.eval_id}:{evaluator.name}"
        sandbox = self._sandboxes.get(key)
        if sandbox is None:
            sandbox = Sandbox(
                evaluator.source or "",
                entry="grader",
                owner=key.replace(":", "-").replace("/", "-")[:60],
                limits=Limits(row_timeout=self.settings.eval_row_timeout_seconds),
                network=self.settings.eval_sandbox_network,  # type: ignore[arg-type]
                root=self.settings.data_dir / "sandbox",
            )
            await sandbox.start()
            self._sandboxes[key] = sandbox
            while len(self._sandboxes) > MAX_SANDBOXES:
                await self._sandboxes.popitem(last=False)[1].close()
        self._sandboxes.move_to_end(key)
        return sandbox

    def _context(self, request: EvalRequest) -> GraderContext:
        context = self._contexts.get(request.eval_id)
        if context is None:
            context = GraderContext(
                project_id=request.project_id,
                models=self.models,
                embedding_model=self.settings.eval_embedding_model,
                sandbox_limits=Limits(row_timeout=self.settings.eval_row_timeout_seconds),
                sandbox_network=self.settings.eval_sandbox_network,
                sandbox_root=self.settings.data_dir / "sandbox",
            )
            self._contexts[request.eval_id] = context
            while len(self._contexts) > MAX_SANDBOXES:
                _, old = self._contexts.popitem(last=False)
                asyncio.ensure_future(old.close())
        return context

    # --- one batch -------------------------------------------------------------------------------

    async def handle(self, request: EvalRequest, publish: Publish) -> None:
        if request.eval_id in self.stopped:
            log.info("eval %s was stopped; dropped batch %s", request.eval_id, request.request_id)
            return
        if request.request_id.endswith(":0"):
            await publish(
                EvalEvent(
                    event_id=f"{request.eval_id}:running",
                    eval_id=request.eval_id,
                    project_id=request.project_id,
                    type="status",
                    status="running",
                    created_at=int(time.time() * 1000),
                )
            )

        async def finish(row: EvalRow, outputs: dict[str, EvalOutput], scores: list[EvalScore]) -> None:
            if request.eval_id in self.stopped:
                return
            scores = scores + await self._other_scores(request, row, outputs)
            await publish(
                EvalEvent(
                    event_id=f"{request.eval_id}:{row.entry_id}",
                    eval_id=request.eval_id,
                    project_id=request.project_id,
                    type="row",
                    entry_id=row.entry_id,
                    outputs=list(outputs.values()),
                    scores=scores,
                    created_at=int(time.time() * 1000),
                )
            )

        if any(e.type == "code" for e in request.evaluators):
            # Code graders take the whole batch in one sandbox round trip, once every output is in.
            outputs = await asyncio.gather(*(self._outputs(request, row) for row in request.rows))
            code_scores = await self._code_scores(request, outputs)
            await asyncio.gather(
                *(finish(row, outputs[i], code_scores[i]) for i, row in enumerate(request.rows))
            )
            return

        async def pipeline(row: EvalRow) -> None:  # a row is judged as soon as its outputs are in
            await finish(row, await self._outputs(request, row), [])

        await asyncio.gather(*(pipeline(row) for row in request.rows))

    async def _outputs(self, request: EvalRequest, row: EvalRow) -> dict[str, EvalOutput]:
        async def one(model: str) -> EvalOutput:
            if model == ORIGINAL:
                return EvalOutput(model=model, output=row.expected, reused=True)
            key = row.output_keys.get(model, "")
            if model in row.known_outputs:
                return EvalOutput(model=model, output_key=key, output=row.known_outputs[model], reused=True)
            return await self._generate(request, row, model, key)

        outputs = await asyncio.gather(*(one(m) for m in request.models))
        return {o.model: o for o in outputs}

    async def _generate(self, request: EvalRequest, row: EvalRow, model: str, key: str) -> EvalOutput:
        body = {**row.input, **request.generation, "model": model}
        started = time.perf_counter()
        try:
            async with self.slots:
                completion = await self.models.complete(request.project_id, body, cache="readWrite")
            output = _message(completion)
        except (APIError, ValueError) as exc:
            return EvalOutput(model=model, output_key=key, error=getattr(exc, "message", str(exc)))
        usage = completion.get("usage") or {}
        return EvalOutput(
            model=model,
            output_key=key,
            output=output,
            latency_ms=int((time.perf_counter() - started) * 1000),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )

    async def _code_scores(
        self, request: EvalRequest, outputs: list[dict[str, EvalOutput]]
    ) -> list[list[EvalScore]]:
        scores: list[list[EvalScore]] = [[] for _ in request.rows]
        for evaluator in (e for e in request.evaluators if e.type == "code"):
            cells = [
                (i, model, out) for i, row_outputs in enumerate(outputs) for model, out in row_outputs.items()
            ]
            ready = [(i, m, o) for i, m, o in cells if o.output is not None]
            for i, model, out in cells:
                if out.output is None:
                    scores[i].append(
                        EvalScore(evaluator=evaluator.name, model=model, error=f"no output: {out.error}")
                    )
            if not ready:
                continue
            arguments = []
            for i, _, out in ready:
                row = request.rows[i]
                arguments.append(
                    [
                        row.input.get("messages") or [],
                        row.input.get("tools"),
                        row.input.get("tool_choice"),
                        grader_message(out.output or {}),
                        grader_message(row.expected),
                    ]
                )
            try:
                results = await (await self._sandbox(request, evaluator)).grade(arguments)
            except SandboxUnavailable as exc:
                results = [type("R", (), {"score": None, "error": str(exc)})() for _ in ready]
            for (i, model, _), result in zip(ready, results, strict=True):
                scores[i].append(
                    EvalScore(evaluator=evaluator.name, model=model, score=result.score, error=result.error)
                )
        return scores

    async def _other_scores(
        self, request: EvalRequest, row: EvalRow, outputs: dict[str, EvalOutput]
    ) -> list[EvalScore]:
        jobs = []
        for evaluator in request.evaluators:
            if evaluator.type == "head_to_head":
                for a, b in itertools.combinations(request.models, 2):
                    jobs.append(self._head_to_head(request, row, evaluator, outputs[a], outputs[b]))
            elif evaluator.type in ("grader", "criterion"):
                for out in outputs.values():
                    jobs.append(self._single(request, row, evaluator, out))
        return list(await asyncio.gather(*jobs))

    async def _single(
        self, request: EvalRequest, row: EvalRow, evaluator: EvalEvaluator, out: EvalOutput
    ) -> EvalScore:
        score = EvalScore(evaluator=evaluator.name, model=out.model)
        if out.output is None:
            score.error = f"no output: {out.error}"
            return score
        async with self.slots:
            if evaluator.type == "grader":
                return await self._grade(request, row, evaluator, out, score)
            return await self._criterion(request, row, evaluator, out, score)

    async def _grade(
        self, request: EvalRequest, row: EvalRow, evaluator: EvalEvaluator, out: EvalOutput, score: EvalScore
    ) -> EvalScore:
        grader = GraderHolder.model_validate({"grader": evaluator.grader}).grader
        output = out.output or {}
        sample = make_sample(output.get("content") or "", tool_calls=output.get("tool_calls"))
        try:
            result = await run_grader(
                grader, sample=sample, item=grader_item(row), context=self._context(request)
            )
        except APIError as exc:
            score.error = exc.message
            return score
        score.score = None if result.failed else result.reward
        score.error = result.error_message() if result.failed else None
        score.explanation = result.explanation
        score.judge_calls = len(result.token_usage)
        return score

    async def _criterion(
        self, request: EvalRequest, row: EvalRow, evaluator: EvalEvaluator, out: EvalOutput, score: EvalScore
    ) -> EvalScore:
        if self.judge is None:
            score.error = "criterion evals need the judge service, which this deployment does not run"
            return score
        try:
            verdict = await self.judge.judge(
                request.project_id, evaluator.criterion or "", row.input, out.output or {}, "eval"
            )
        except grpc.aio.AioRpcError as exc:
            score.error = f"judge: {exc.code().name}: {exc.details()}"
            return score
        score.judge_calls = 1
        if verdict.status != "success":
            score.error = f"{verdict.error_code}: {verdict.error_message}"
            return score
        score.score = verdict.score
        score.explanation = verdict.explanation
        if verdict.usage.HasField("cost_usd"):
            score.cost_usd = verdict.usage.cost_usd
        return score

    async def _head_to_head(
        self, request: EvalRequest, row: EvalRow, evaluator: EvalEvaluator, a: EvalOutput, b: EvalOutput
    ) -> EvalScore:
        score = EvalScore(evaluator=evaluator.name, model=a.model, opponent=b.model)
        if a.output is None or b.output is None:
            score.error = f"no output: {a.error or b.error}"
            return score
        if _same(a.output, b.output):
            score.winner, score.score, score.explanation = "tie", 0.5, "identical outputs (no judge call)"
            return score
        swap = random.Random(f"{request.eval_id}:{row.entry_id}:{a.model}:{b.model}").random() < 0.5
        first, second = (b, a) if swap else (a, b)
        instructions = evaluator.instructions or DEFAULT_INSTRUCTIONS
        conversation = orjson.dumps(row.input.get("messages") or []).decode()
        body = {
            "model": evaluator.judge_model,
            "messages": [
                {"role": "system", "content": HEAD_TO_HEAD_SYSTEM.format(instructions=instructions)},
                {
                    "role": "user",
                    "content": f"<conversation>{conversation}</conversation>\n"
                    f"<output_a>{_text(first.output or {})}</output_a>\n"
                    f"<output_b>{_text(second.output or {})}</output_b>",
                },
            ],
            "response_format": HEAD_TO_HEAD_FORMAT,
            "temperature": 0,
        }
        try:
            async with self.slots:
                completion = await self.models.complete(request.project_id, body, cache="readWrite")
            verdict = orjson.loads(_message(completion).get("content") or "")
            letter = str(verdict["winner"]).upper()
            if letter not in ("A", "B", "TIE"):
                raise ValueError(f"winner {letter!r}")
        except APIError as exc:
            score.error = f"judge: {exc.message}"
            return score
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            score.error = f"the judge's verdict could not be read: {exc}"
            return score
        score.judge_calls = 1
        score.explanation = str(verdict.get("explanation") or "")
        winner = {"A": first.model, "B": second.model, "TIE": "tie"}[letter]
        score.winner = winner
        score.score = 0.5 if winner == "tie" else float(winner == a.model)
        return score
