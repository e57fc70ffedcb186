"""Running the OpenAI graders on one (sample, item): the reward, the error flags, token usage.

Metrics come from the reference libraries: ``rapidfuzz`` (fuzzy_match: ``fuzz.ratio``/100),
``sacrebleu`` (bleu: sentence BLEU/100), ``nltk`` (gleu: ``sentence_gleu``; meteor: needs the
WordNet corpus), ``rouge-score`` (rouge_1..5, rouge_l: F-measure). ``cosine`` embeds both texts
through the router; ``score_model`` and ``label_model`` ask a model through the router.
Python graders run in the sandbox (``services.eval.sandbox``).
"""

from __future__ import annotations

import ast
import math
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import orjson

from services.common.errors import APIError, bad_request
from services.eval.grader_schemas import (
    GraderMessage,
    LabelModelGrader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
)
from services.eval.sandbox import Limits, Sandbox, SandboxUnavailable

TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
NAMESPACES = ("item", "sample")
DEFAULT_EMBEDDING_MODEL = "text-embedding-3-large"
ERROR_FLAGS = (
    "formula_parse_error",
    "invalid_variable_error",
    "model_grader_parse_error",
    "model_grader_refusal_error",
    "model_grader_server_error",
    "other_error",
    "python_grader_runtime_error",
    "python_grader_server_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
)
FORMULA_FUNCTIONS = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}
FORMULA_OPERATORS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: lambda a, b: a**b,
    ast.Mod: lambda a, b: a % b,
}


class ModelClient(Protocol):
    """The router, as graders need it (chat completions and embeddings for a project)."""

    async def complete(self, project_id: str, request: dict[str, Any]) -> dict[str, Any]: ...

    async def embed(self, project_id: str, request: dict[str, Any]) -> dict[str, Any]: ...


class GraderFailure(Exception):
    """A row-level failure: the reward is 0 and ``flag`` is set in the metadata's errors."""

    def __init__(self, flag: str, details: str) -> None:
        super().__init__(details)
        self.flag = flag
        self.details = details


@dataclass
class GraderContext:
    project_id: str
    models: ModelClient | None = None
    embedding_model: str = DEFAULT_EMBEDDING_MODEL
    sandbox_limits: Limits = field(default_factory=Limits)
    sandbox_network: str = "namespace"
    sandbox_root: Any = None
    # Python graders already running for this context (an eval reuses one per grader).
    sandboxes: dict[str, Sandbox] = field(default_factory=dict)

    async def close(self) -> None:
        for sandbox in self.sandboxes.values():
            await sandbox.close()
        self.sandboxes.clear()


@dataclass
class GraderResult:
    name: str
    type: str
    reward: float = 0.0
    errors: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(ERROR_FLAGS, False))
    scores: dict[str, float] = field(default_factory=dict)
    token_usage: dict[str, dict[str, int]] = field(default_factory=dict)
    explanation: str | None = None
    execution_time: float = 0.0

    @property
    def failed(self) -> bool:
        return any(v is True for v in self.errors.values())

    def error_message(self) -> str | None:
        details = [str(v) for k, v in self.errors.items() if k.endswith(("_details", "_type")) and v] or [
            k for k, v in self.errors.items() if v is True
        ]
        return "; ".join(details) or None

    def fail(self, failure: GraderFailure) -> None:
        self.reward = 0.0
        self.errors[failure.flag] = True
        detail_key = {
            "python_grader_runtime_error": "python_grader_runtime_error_details",
            "python_grader_server_error": "python_grader_server_error_type",
            "model_grader_server_error": "model_grader_server_error_details",
        }.get(failure.flag, "other_error_details")
        self.errors[detail_key] = failure.details

    def add_usage(self, model: str, usage: dict[str, Any] | None) -> None:
        total = self.token_usage.setdefault(
            model, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0}
        )
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            total[key] += int((usage or {}).get(key) or 0)

    def response(self) -> dict[str, Any]:
        """The ``POST /fine_tuning/alpha/graders/run`` answer."""
        errors = {k: v for k, v in self.errors.items() if k != "other_error_details"}
        for key in (
            "python_grader_runtime_error_details",
            "python_grader_server_error_type",
            "model_grader_server_error_details",
        ):
            errors.setdefault(key, None)
        tokens = sum(u["total_tokens"] for u in self.token_usage.values())
        return {
            "reward": self.reward,
            "metadata": {
                "name": self.name,
                "type": self.type,
                "errors": errors,
                "execution_time": self.execution_time,
                "scores": self.scores,
                "token_usage": tokens if self.token_usage else None,
                "sampled_model_name": None,
            },
            "sub_rewards": self.scores if self.type == "multi" else {},
            "model_grader_token_usage_per_model": self.token_usage,
        }


# --- the sample and template strings ----------------------------------------------------------


def make_sample(output_text: str, *, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``sample`` namespace: ``output_text``, ``output_json`` (when it parses), ``output_tools``."""
    try:
        output_json = orjson.loads(output_text) if output_text else None
    except orjson.JSONDecodeError:
        output_json = None
    return {
        "output_text": output_text,
        "output_json": output_json,
        "output_tools": tool_calls or [],
        "choices": [],
    }


def template_variables(text: str) -> list[str]:
    return [match.group(1) for match in TEMPLATE.finditer(text)]


def _lookup(path: str, namespaces: dict[str, Any]) -> Any:
    head, *rest = path.split(".")
    if head not in namespaces:
        raise GraderFailure(
            "invalid_variable_error", f"unknown template namespace {head!r} in {{{{{path}}}}}"
        )
    value = namespaces[head]
    for part in rest:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise GraderFailure("invalid_variable_error", f"{{{{{path}}}}} is not in the {head}")
    return value


def render(text: str, *, sample: dict[str, Any], item: Any) -> str:
    """Replace ``{{item.x}}`` / ``{{sample.output_text}}`` ...; non-strings become JSON."""
    namespaces = {"item": item if item is not None else {}, "sample": sample}

    def value(match: re.Match[str]) -> str:
        found = _lookup(match.group(1), namespaces)
        return found if isinstance(found, str) else orjson.dumps(found).decode()

    return TEMPLATE.sub(value, text)


# --- string_check and text_similarity ------------------------------------------------------------


def string_check(operation: str, text: str, reference: str) -> float:
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    return float(reference.lower() in text.lower())  # ilike


@lru_cache(maxsize=8)
def _rouge(kind: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=False)


def meteor_available() -> bool:
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        return False
    return True


METEOR_MISSING = (
    "evaluation_metric 'meteor' needs the NLTK 'wordnet' corpus, which is not installed on this "
    "server (it cannot be downloaded offline); install it with nltk.download('wordnet') into the "
    "NLTK data path, or use another metric"
)


def text_similarity(metric: str, text: str, reference: str) -> float:
    """A similarity in [0, 1] from the metric's reference library (cosine is async: see below)."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return fuzz.ratio(text, reference) / 100
    if metric == "bleu":
        import sacrebleu

        return min(1.0, sacrebleu.sentence_bleu(text, [reference]).score / 100)
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference.split()], text.split()))
    if metric == "meteor":
        if not meteor_available():
            raise bad_request(METEOR_MISSING, param="grader.evaluation_metric", code="metric_unavailable")
        from nltk.translate.meteor_score import meteor_score

        return float(meteor_score([reference.split()], text.split()))
    if metric.startswith("rouge_"):
        kind = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
        return float(_rouge(kind).score(reference, text)[kind].fmeasure)
    raise bad_request(f"Unknown evaluation_metric {metric!r}.", param="grader.evaluation_metric")


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


# --- multi: the formula ---------------------------------------------------------------------------


def parse_formula(formula: str, variables: set[str]) -> ast.Expression:
    """Parse ``calculate_output``; only arithmetic, numbers, sub-grader names and a few functions."""
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"calculate_output is not a valid formula: {exc.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in variables and node.id not in FORMULA_FUNCTIONS:
            raise ValueError(f"calculate_output uses {node.id!r}, which is not one of the graders")
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in FORMULA_FUNCTIONS and not node.keywords
        ):
            raise ValueError("calculate_output may only call " + ", ".join(FORMULA_FUNCTIONS))
        allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Call, ast.Load)
        if not isinstance(node, allowed + tuple(FORMULA_OPERATORS) + (ast.USub, ast.UAdd)):
            raise ValueError(f"calculate_output may not use {type(node).__name__}")
        if isinstance(node, ast.Constant) and (
            isinstance(node.value, bool) or not isinstance(node.value, int | float)
        ):
            raise ValueError("calculate_output may only use numbers")
    return tree


def evaluate_formula(tree: ast.Expression, values: dict[str, float]) -> float:
    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.UnaryOp):
            return -walk(node.operand) if isinstance(node.op, ast.USub) else walk(node.operand)
        if isinstance(node, ast.BinOp):
            return FORMULA_OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Call):
            return float(FORMULA_FUNCTIONS[node.func.id](*(walk(a) for a in node.args)))  # type: ignore[attr-defined]
        raise ValueError(f"unsupported {type(node).__name__}")

    return float(walk(tree))


# --- validation ---------------------------------------------------------------------------------


def _check_templates(texts: list[str], param: str) -> None:
    for text in texts:
        for variable in template_variables(text):
            if variable.split(".")[0] not in NAMESPACES:
                raise bad_request(
                    f"Template {{{{{variable}}}}} must start with item. or sample.", param=param
                )


def _message_texts(messages: list[GraderMessage]) -> list[str]:
    texts: list[str] = []
    for message in messages:
        parts = message.content if isinstance(message.content, list) else [message.content]
        for part in parts:
            texts.append(part if isinstance(part, str) else (part.text or part.image_url or ""))
    return texts


def validate_grader(grader: Any, param: str = "grader") -> None:
    """The checks beyond the shape; a problem is a 400 naming the field."""
    if isinstance(grader, StringCheckGrader | TextSimilarityGrader):
        _check_templates([grader.input, grader.reference], f"{param}.input")
        meteor = isinstance(grader, TextSimilarityGrader) and grader.evaluation_metric == "meteor"
        if meteor and not meteor_available():
            raise bad_request(METEOR_MISSING, param=f"{param}.evaluation_metric", code="metric_unavailable")
    elif isinstance(grader, ScoreModelGrader | LabelModelGrader):
        _check_templates(_message_texts(grader.input), f"{param}.input")
    elif isinstance(grader, PythonGrader):
        try:
            tree = ast.parse(grader.source)
        except SyntaxError as exc:
            raise bad_request(
                f"source is not valid Python: {exc.msg} (line {exc.lineno})", param=f"{param}.source"
            ) from None
        if not any(isinstance(n, ast.FunctionDef) and n.name == "grade" for n in tree.body):
            raise bad_request("source must define grade(sample, item).", param=f"{param}.source")
    elif isinstance(grader, MultiGrader):
        for key, sub in grader.graders.items():
            if not key.isidentifier():
                raise bad_request(f"Grader key {key!r} must be a valid identifier.", param=f"{param}.graders")
            validate_grader(sub, f"{param}.graders.{key}")
        try:
            parse_formula(grader.calculate_output, set(grader.graders))
        except ValueError as exc:
            raise bad_request(str(exc), param=f"{param}.calculate_output") from None


# --- running --------------------------------------------------------------------------------------


def _chat_messages(messages: list[GraderMessage], sample: dict[str, Any], item: Any) -> list[dict]:
    out = []
    for message in messages:
        if isinstance(message.content, str):
            content: Any = render(message.content, sample=sample, item=item)
        else:
            parts = message.content if isinstance(message.content, list) else [message.content]
            content = []
            for part in parts:
                if isinstance(part, str):
                    content.append({"type": "text", "text": render(part, sample=sample, item=item)})
                elif part.type in ("input_text", "output_text"):
                    content.append(
                        {"type": "text", "text": render(part.text or "", sample=sample, item=item)}
                    )
                elif part.type == "input_image":
                    url = render(part.image_url or "", sample=sample, item=item)
                    content.append(
                        {"type": "image_url", "image_url": {"url": url, "detail": part.detail or "auto"}}
                    )
        out.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return out


def _sampling(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    request: dict[str, Any] = {}
    for key in ("seed", "temperature", "top_p", "reasoning_effort"):
        if getattr(params, key) is not None:
            request[key] = getattr(params, key)
    if params.max_completions_tokens is not None:
        request["max_completion_tokens"] = params.max_completions_tokens
    return request


def _json_schema(name: str, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {
            "name": name,
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"steps": {"type": "array", "items": {"type": "string"}}, "result": result},
                "required": ["steps", "result"],
                "additionalProperties": False,
            },
        },
    }


async def _ask_model(
    grader: ScoreModelGrader | LabelModelGrader,
    result_schema: dict[str, Any],
    context: GraderContext,
    sample: dict[str, Any],
    item: Any,
    outcome: GraderResult,
) -> tuple[Any, str]:
    if context.models is None:
        raise GraderFailure("model_grader_server_error", "no model client is configured")
    request = {
        "model": grader.model,
        "messages": _chat_messages(grader.input, sample, item),
        "response_format": _json_schema(grader.type, result_schema),
        **_sampling(grader.sampling_params),
    }
    try:
        completion = await context.models.complete(context.project_id, request)
    except APIError as exc:
        raise GraderFailure("model_grader_server_error", exc.message) from None
    outcome.add_usage(grader.model, completion.get("usage"))
    message = ((completion.get("choices") or [{}])[0] or {}).get("message") or {}
    if message.get("refusal"):
        raise GraderFailure("model_grader_refusal_error", str(message["refusal"]))
    text = message.get("content") or ""
    try:
        parsed = orjson.loads(text)
        steps = parsed.get("steps") if isinstance(parsed, dict) else None
        explanation = " ".join(map(str, steps)) if isinstance(steps, list) else ""
        return parsed["result"], explanation
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise GraderFailure(
            "model_grader_parse_error", f"the grader model's reply is not a result: {text[:200]!r}"
        ) from None


async def _score_model(grader: ScoreModelGrader, context: GraderContext, sample, item, outcome) -> float:  # type: ignore[no-untyped-def]
    low, high = grader.range or [0.0, 1.0]
    result, outcome.explanation = await _ask_model(grader, {"type": "number"}, context, sample, item, outcome)
    if isinstance(result, bool) or not isinstance(result, int | float) or not low <= result <= high:
        raise GraderFailure(
            "model_grader_parse_error", f"the grader model's score {result!r} is not in [{low}, {high}]"
        )
    return float(result)


async def _label_model(grader: LabelModelGrader, context: GraderContext, sample, item, outcome) -> float:  # type: ignore[no-untyped-def]
    schema = {"type": "string", "enum": grader.labels}
    label, outcome.explanation = await _ask_model(grader, schema, context, sample, item, outcome)
    if label not in grader.labels:
        raise GraderFailure(
            "model_grader_parse_error", f"the grader model's label {label!r} is not one of the labels"
        )
    outcome.scores["label"] = label
    return float(label in grader.passing_labels)


async def _python(grader: PythonGrader, context: GraderContext, sample: dict, item: Any) -> float:
    key = grader.source
    sandbox = context.sandboxes.get(key)
    try:
        if sandbox is None:
            sandbox = Sandbox(
                grader.source,
                entry="grade",
                owner=f"{context.project_id[:16]}-{len(context.sandboxes)}",
                limits=context.sandbox_limits,
                score_range=(None, None),
                network=context.sandbox_network,  # type: ignore[arg-type]
                root=context.sandbox_root,
            )
            await sandbox.start()
            context.sandboxes[key] = sandbox
        (result,) = await sandbox.grade([[sample, item if item is not None else {}]])
    except SandboxUnavailable as exc:
        raise GraderFailure("python_grader_server_error", str(exc)) from None
    if result.error is not None:
        raise GraderFailure("python_grader_runtime_error", result.error)
    return float(result.score)  # type: ignore[arg-type]


async def _cosine(
    grader: TextSimilarityGrader, text: str, reference: str, context: GraderContext, outcome
) -> float:  # type: ignore[no-untyped-def]
    if context.models is None:
        raise GraderFailure("model_grader_server_error", "no model client is configured")
    try:
        answer = await context.models.embed(
            context.project_id, {"model": context.embedding_model, "input": [text, reference]}
        )
    except APIError as exc:
        raise GraderFailure("model_grader_server_error", f"embeddings: {exc.message}") from None
    outcome.add_usage(context.embedding_model, answer.get("usage"))
    vectors = [d.get("embedding") for d in sorted(answer.get("data") or [], key=lambda d: d.get("index", 0))]
    if len(vectors) != 2 or not all(isinstance(v, list) and v for v in vectors):
        raise GraderFailure("model_grader_server_error", "embeddings: the model returned no vectors")
    return max(0.0, min(1.0, cosine(vectors[0], vectors[1])))


async def _reward(
    grader: Any, context: GraderContext, sample: dict, item: Any, outcome: GraderResult
) -> float:
    if isinstance(grader, StringCheckGrader):
        text = render(grader.input, sample=sample, item=item)
        return string_check(grader.operation, text, render(grader.reference, sample=sample, item=item))
    if isinstance(grader, TextSimilarityGrader):
        text = render(grader.input, sample=sample, item=item)
        reference = render(grader.reference, sample=sample, item=item)
        if grader.evaluation_metric == "cosine":
            return await _cosine(grader, text, reference, context, outcome)
        return text_similarity(grader.evaluation_metric, text, reference)
    if isinstance(grader, PythonGrader):
        return await _python(grader, context, sample, item)
    if isinstance(grader, ScoreModelGrader):
        return await _score_model(grader, context, sample, item, outcome)
    if isinstance(grader, LabelModelGrader):
        return await _label_model(grader, context, sample, item, outcome)
    return await _multi(grader, context, sample, item, outcome)


async def _multi(grader: MultiGrader, context: GraderContext, sample, item, outcome: GraderResult) -> float:  # type: ignore[no-untyped-def]
    try:
        tree = parse_formula(grader.calculate_output, set(grader.graders))
    except ValueError as exc:
        raise GraderFailure("formula_parse_error", str(exc)) from None
    values: dict[str, float] = {}
    for key, sub in grader.graders.items():
        result = await run_grader(sub, sample=sample, item=item, context=context)
        values[key] = result.reward
        outcome.scores[key] = result.reward
        for model, usage in result.token_usage.items():
            outcome.add_usage(model, usage)
        for flag, value in result.errors.items():
            if value is True or (value and not outcome.errors.get(flag)):
                outcome.errors[flag] = value
    try:
        return evaluate_formula(tree, values)
    except (ArithmeticError, ValueError) as exc:
        raise GraderFailure("formula_parse_error", f"calculate_output failed: {exc}") from None


async def run_grader(
    grader: Any, *, sample: dict[str, Any], item: Any, context: GraderContext
) -> GraderResult:
    """Grade one sample; row-level problems are flagged in ``errors`` (reward 0), never raised.

    A problem with the grader itself (say, a metric whose data is missing) raises ``APIError``.
    """
    outcome = GraderResult(name=grader.name, type=grader.type)
    started = time.perf_counter()
    try:
        outcome.reward = await _reward(grader, context, sample, item, outcome)
        if isinstance(outcome.reward, float) and (math.isnan(outcome.reward) or math.isinf(outcome.reward)):
            raise GraderFailure("other_error", f"the reward is {outcome.reward}")
    except GraderFailure as failure:
        outcome.fail(failure)
    outcome.execution_time = time.perf_counter() - started
    return outcome
