"""Traces reach from an HTTP request through Kafka headers to the writer's ClickHouse insert, and
across gRPC metadata; logs are JSON lines with request and trace ids and never carry secrets."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import grpc
import openai
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common import tracing
from services.common.kafka import free_port
from tests.conftest import Project, RunningPlatform, wait_for_count, wait_until
from tests.fake_upstream import OPENAI_KEY

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter on the process's tracer provider (installed once per process; later
    tests still make spans, but the shut-down exporter no longer keeps them)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def in_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def report_body(content: str) -> dict:
    now = int(time.time() * 1000)
    return {
        "requestedAt": now - 5,
        "receivedAt": now,
        "reqPayload": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]},
        "respPayload": {"choices": [{"message": {"role": "assistant", "content": "ok"}}]},
        "statusCode": 200,
    }


async def test_report_trace_reaches_the_clickhouse_write(
    spans: InMemorySpanExporter, running: RunningPlatform, project: Project
) -> None:
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    async with project.client() as client:
        response = await client.post(
            "/report",
            json=report_body("traced"),
            headers={"traceparent": traceparent, "x-request-id": "req-trace-1"},
        )
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "req-trace-1"
        await wait_for_count(client, 1)
    trace_id = int(TRACE_ID, 16)

    def write_span() -> list[ReadableSpan]:
        return [s for s in in_trace(spans, trace_id) if s.kind == SpanKind.CONSUMER]

    await wait_until(write_span, what="the writer's span in the report's trace")
    server = [s for s in in_trace(spans, trace_id) if s.kind == SpanKind.SERVER]
    assert len(server) == 1 and server[0].name == "POST /api/v1/report"
    assert server[0].parent is not None and server[0].parent.span_id == int(PARENT_ID, 16)
    assert server[0].attributes["http.response.status_code"] == 200
    assert server[0].attributes["request.id"] == "req-trace-1"
    (write,) = write_span()
    assert write.name == "logs.v1 write" and write.attributes["db.system"] == "clickhouse"
    assert write.parent is not None and write.parent.span_id == server[0].context.span_id
    # The batch span itself links every trace whose message it wrote.
    batches = [
        s
        for s in spans.get_finished_spans()
        if s.name == "logs.v1 write" and any(link.context.trace_id == trace_id for link in s.links)
    ]
    assert batches


async def test_chat_completion_trace_reaches_the_clickhouse_write(
    spans: InMemorySpanExporter, running: RunningPlatform, project: Project
) -> None:
    async with project.client() as http:
        assert (await http.put("/provider-keys", json={"openai": OPENAI_KEY})).status_code == 200
    client = openai.AsyncOpenAI(api_key=project.key, base_url=project.base_url, max_retries=0)
    messages = [{"role": "user", "content": "trace me"}]

    async def router_ready() -> bool:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        except (openai.BadRequestError, openai.NotFoundError):
            return False
        return True

    await wait_until(router_ready, what="router knows the provider key")
    with trace.get_tracer("test").start_as_current_span("client call") as root:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, store=True, extra_headers=headers
        )
    trace_id = root.get_span_context().trace_id

    def kinds() -> set:
        return {s.kind for s in in_trace(spans, trace_id)}

    await wait_until(lambda: SpanKind.CONSUMER in kinds(), what="the log write in the completion's trace")
    names = {s.name for s in in_trace(spans, trace_id)}
    assert {"client call", "POST /api/v1/chat/completions", "logs.v1 write"} <= names


async def test_grpc_metadata_carries_the_trace(spans: InMemorySpanExporter) -> None:
    seen: dict[str, int] = {}

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen["trace_id"] = trace.get_current_span().get_span_context().trace_id
        return request

    server = grpc.aio.server(interceptors=[tracing.ServerTracing()])
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=[tracing.ClientTracing()]
        ) as channel:
            call = channel.unary_unary("/test.Echo/Echo")
            with trace.get_tracer("test").start_as_current_span("caller") as caller:
                assert await call(b"ping") == b"ping"
    finally:
        await server.stop(None)
    assert seen["trace_id"] == caller.get_span_context().trace_id
    served = [s for s in spans.get_finished_spans() if s.name == "/test.Echo/Echo"]
    assert served and served[-1].kind == SpanKind.SERVER
    assert served[-1].parent.span_id == caller.get_span_context().span_id


def test_json_logs_carry_ids_and_never_secrets(spans: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(tracing.JsonFormatter("ingest"))
    logger = logging.getLogger("test.tracing.json")
    logger.addHandler(handler)
    logger.propagate = False
    token = tracing.request_id_var.set("req-42")
    try:
        with trace.get_tracer("test").start_as_current_span("work") as span:
            logger.warning(
                "calling with key opk_abcDEF123456789 and Authorization: Bearer sk-proj-Zz9876543210 via "
                "postgresql+asyncpg://distillery:hunter2pw@db:5432/x and s3://minio:miniosecret@minio:9000/b "
                'and {"api_key": "AIzaSyA1234567890123456789012345"} password=topsecret'
            )
            try:
                raise ValueError("bad secret_key=s3cr3tvalue")
            except ValueError:
                logger.exception("failed")
    finally:
        tracing.request_id_var.reset(token)
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    first, second = lines
    assert first["level"] == "warning" and first["service"] == "ingest" and first["request_id"] == "req-42"
    assert first["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert first["span_id"] == format(span.get_span_context().span_id, "016x")
    text = stream.getvalue()
    for secret in (
        "abcDEF123456789",
        "Zz9876543210",
        "hunter2pw",
        "miniosecret",
        "AIzaSy",
        "topsecret",
        "s3cr3t",
    ):
        assert secret not in text, secret
    assert "postgresql+asyncpg://distillery:[REDACTED]@db:5432/x" in first["message"]
    assert "ValueError" in second["exception"]


def test_tracing_is_on_only_when_otel_variables_ask() -> None:
    assert not tracing.tracing_requested({})
    assert tracing.tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.tracing_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.tracing_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}
    )


async def test_log_import_trace_crosses_grpc_to_ingest(
    spans: InMemorySpanExporter, running: RunningPlatform, project: Project
) -> None:
    """POST /datasets/{id}/import-logs (api) reads the logs over ingest's gRPC LogQuery: the server
    span of that call belongs to the request's trace."""
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    async with project.client() as client:
        assert (await client.post("/report", json=report_body("to import"))).status_code == 200
        await wait_for_count(client, 1)
        dataset = (await client.post("/datasets", json={"name": "traced import"})).json()["id"]
        response = await client.post(
            f"/datasets/{dataset}/import-logs",
            json={"filters": {}},
            headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-01"},
        )
        assert response.status_code == 202, response.text

    def grpc_served() -> list[ReadableSpan]:
        return [
            s
            for s in in_trace(spans, int(trace_id, 16))
            if s.kind == SpanKind.SERVER and s.name.startswith("/distillery.v1.LogQuery/")
        ]

    await wait_until(grpc_served, what="ingest's LogQuery span in the import's trace")
