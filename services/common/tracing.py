"""Traces and logs: OpenTelemetry configured by the standard ``OTEL_*`` variables, context carried
across HTTP, Kafka headers and gRPC metadata, and structured JSON logs that never carry secrets.

Tracing is on when an exporter is configured (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_TRACES_EXPORTER``) and ``OTEL_SDK_DISABLED`` is
not ``true``; otherwise the OpenTelemetry API stays a no-op and costs next to nothing: no context
is injected, so Kafka messages carry no trace headers. ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and the exporter's own variables are read by
the SDK itself.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.metrics import route_template

TRACER_NAME = "distillery"
REQUEST_ID_HEADER = "x-request-id"
# Bounded per batch: a 10k-row insert does not become 10k spans.
MAX_LINKED_MESSAGES = 64

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


# ---------------------------------------------------------------- set-up


def tracing_requested(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "")
    if exporter.lower() == "none":
        return False
    return bool(
        exporter or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup_tracing(service: str) -> bool:
    """Install the SDK's tracer provider when the environment asks for tracing; True if it did."""
    if not tracing_requested():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    os.environ.setdefault("OTEL_SERVICE_NAME", f"distillery-{service}")
    provider = TracerProvider(resource=Resource.create({}))
    exporters = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")
    for name in (e.strip() for e in exporters):
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


# ---------------------------------------------------------------- Kafka headers


def kafka_headers() -> list[tuple[str, bytes]] | None:
    """The current trace context as Kafka record headers (librdkafka and aiokafka take the same
    list), or None when there is none to carry."""
    if not active():
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(key, value.encode()) for key, value in carrier.items()] or None


def context_from_kafka(headers: Iterable[tuple[str, bytes]] | None) -> otel_context.Context | None:
    """The trace context a record carries, or None when it carries none."""
    carrier = {key: value.decode(errors="replace") for key, value in headers or () if value is not None}
    if "traceparent" not in carrier:
        return None
    return propagate.extract(carrier)


@contextmanager
def consumed_batch(name: str, records: Sequence[Any], **attributes: Any) -> Iterator[trace.Span]:
    """A span for handling a batch of Kafka records, continuing the traces they carry.

    The batch span links every carried context; and each trace (up to ``MAX_LINKED_MESSAGES``)
    also gets a child span covering the same work, so a trace started by an HTTP request shows
    the write of its own message.
    """
    contexts = []
    for record in records:
        ctx = context_from_kafka(getattr(record, "headers", None))
        if ctx is not None:
            contexts.append(ctx)
            if len(contexts) >= MAX_LINKED_MESSAGES:
                break
    if not contexts:
        with tracer().start_as_current_span(name, kind=SpanKind.CONSUMER, attributes=attributes) as span:
            yield span
        return
    started = time.time_ns()
    links = [Link(trace.get_current_span(ctx).get_span_context()) for ctx in contexts]
    failure: BaseException | None = None
    try:
        with tracer().start_as_current_span(
            name, kind=SpanKind.CONSUMER, links=links, attributes=attributes
        ) as span:
            yield span
    except BaseException as exc:
        failure = exc
        raise
    finally:
        ended = time.time_ns()
        for ctx in contexts:
            child = tracer().start_span(
                name, context=ctx, kind=SpanKind.CONSUMER, attributes=attributes, start_time=started
            )
            if failure is not None:
                child.set_status(Status(StatusCode.ERROR, type(failure).__name__))
            child.end(end_time=ended)


# ---------------------------------------------------------------- gRPC metadata


def grpc_metadata(extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Outgoing gRPC call metadata carrying the current trace context (plus ``extra``)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*extra, *carrier.items()]


def context_from_grpc(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    carrier = {key: value if isinstance(value, str) else value.decode() for key, value in metadata or ()}
    return propagate.extract(carrier)


try:
    import grpc

    class ClientTracing(
        grpc.aio.UnaryUnaryClientInterceptor,
        grpc.aio.UnaryStreamClientInterceptor,
    ):
        """Adds the current trace context to every outgoing call's metadata
        (``grpc.aio.insecure_channel(target, interceptors=[ClientTracing()])``)."""

        @staticmethod
        def _with_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            if not carrier:
                return details
            metadata = grpc.aio.Metadata(*(details.metadata or ()), *carrier.items())
            return details._replace(metadata=metadata)  # type: ignore[attr-defined]

        async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
            return await continuation(self._with_context(client_call_details), request)

        async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
            return await continuation(self._with_context(client_call_details), request)

    class ServerTracing(grpc.aio.ServerInterceptor):
        """Runs each unary or server-streaming handler in a SERVER span continuing the caller's trace."""

        async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            method = handler_call_details.method
            parent = context_from_grpc(handler_call_details.invocation_metadata)
            if handler.unary_unary:
                inner = handler.unary_unary

                async def unary(request, context):  # type: ignore[no-untyped-def]
                    with tracer().start_as_current_span(method, context=parent, kind=SpanKind.SERVER):
                        return await inner(request, context)

                return handler._replace(unary_unary=unary)
            if handler.unary_stream:
                inner_stream = handler.unary_stream

                async def streaming(request, context):  # type: ignore[no-untyped-def]
                    with tracer().start_as_current_span(method, context=parent, kind=SpanKind.SERVER):
                        async for item in inner_stream(request, context):
                            yield item

                return handler._replace(unary_stream=streaming)
            return handler

except ImportError:  # pragma: no cover - grpc is a dependency of every service
    pass


# ---------------------------------------------------------------- HTTP


class TraceRequests:
    """ASGI middleware: a SERVER span per request continuing an incoming ``traceparent``, and a
    request id (the client's ``x-request-id`` or a new one) for the logs and the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope["headers"])
        token = request_id_var.set(request_id)
        try:
            if active():
                await self._traced(scope, receive, send, request_id)
            else:  # no exporter: skip the span machinery, keep the request id
                await self.app(scope, receive, _echo_request_id(send, request_id.encode()))
        finally:
            request_id_var.reset(token)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        method = scope["method"]
        attributes = {"http.request.method": method, "url.path": scope["path"], "request.id": request_id}
        with tracer().start_as_current_span(
            f"{method} {scope['path']}",
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            echo = _echo_request_id(send, request_id.encode())

            async def send_recording(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(Status(StatusCode.ERROR))
                await echo(message)

            await self.app(scope, receive, send_recording)
            route = route_template(scope)
            if route:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)


_active = False


def active() -> bool:
    """Whether spans go anywhere: a tracer provider was installed (``setup_tracing`` or a test).

    Checked on every request, so it reads the API's global directly: ``get_tracer_provider()``
    consults the environment on each call until a provider is set. Once set it never changes.
    """
    global _active
    if not _active:
        provider = getattr(trace, "_TRACER_PROVIDER", None)
        _active = provider is not None and not isinstance(provider, trace.NoOpTracerProvider)
    return _active


def _request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for key, value in headers:
        if key == b"x-request-id":
            return _clean_request_id(value.decode("latin-1")) or _new_request_id()
    return _new_request_id()


def _new_request_id() -> str:
    return f"{random.getrandbits(64):016x}"  # unique enough to correlate logs; not a secret


def _echo_request_id(send: Send, raw_id: bytes) -> Send:
    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (b"x-request-id", raw_id)]
        await send(message)

    return send_with_id


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _clean_request_id(value: str | None) -> str | None:
    return value if value and _REQUEST_ID.match(value) else None


# ---------------------------------------------------------------- logs

_SECRET_PATTERNS = (
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1[REDACTED]"),
    (re.compile(r"\b(opk|sk|sk-ant|sk-proj)[-_][A-Za-z0-9_\-]{6,}"), "[REDACTED]"),
    (re.compile(r"\bAIza[0-9A-Za-z_\-]{20,}"), "[REDACTED]"),
    # Credentials in URLs: scheme://user:password@host
    (re.compile(r"(://[^:/@\s]+:)[^@\s/]+@"), r"\1[REDACTED]@"),
    (
        re.compile(
            r"(?i)([\"']?(?:api[_-]?key|secret[_-]?key|password|token|authorization)[\"']?\s*[:=]\s*[\"']?)"
            r"[^\s\"',}]+"
        ),
        r"\1[REDACTED]",
    ),
)


def redact(text: str) -> str:
    """``text`` with API keys, bearer tokens, passwords and URL credentials replaced."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, service, request and trace ids."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
            "service": self.service,
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


JsonFormatter.converter = time.gmtime  # type: ignore[assignment]


def configure_logging(service: str, level: str | None = None) -> None:
    """Replace the root handlers with one writing JSON lines to stderr
    (level from ``DISTILLERY_LOG_LEVEL``, default INFO)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("DISTILLERY_LOG_LEVEL") or "INFO").upper())


def setup(service: str) -> None:
    """What a service process calls at start: JSON logs, and tracing when ``OTEL_*`` asks for it."""
    configure_logging(service)
    setup_tracing(service)
