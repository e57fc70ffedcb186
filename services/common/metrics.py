"""Prometheus metrics: every service serves ``GET /metrics`` (the platform mounts it).

``HttpMetrics`` wraps the whole ASGI app (the framework-free fast routes included) and counts
requests, errors and latency by route template, so label values stay bounded: a path that
matches no route is counted as ``<unmatched>``, never by its literal text.

The other series are module-level objects that services import and update with one line where
the event happens (``metrics.ROUTER_RETRIES.labels(provider="openai").inc()``). Label values are
always small closed sets or model names, never ids of requests, logs or projects.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from aiokafka import TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Request latencies span fast reports (~1 ms) to long streamed completions (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class BatchHistogram:
    """A histogram observed a batch at a time, for per-message values on a consumer's hot path.

    ``Histogram.observe`` takes a lock and walks the buckets in Python, ~4 µs a value: a tenth of
    the log writer's CPU per log. Here each value costs one bisect and the lock is taken once per
    batch. Exposed exactly as a ``Histogram`` of the same name (``_bucket``, ``_count``, ``_sum``).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        *,
        buckets: Iterable[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = [float(b) for b in buckets]
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts, total = self._bounds, [0] * len(self._counts), 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value
            total += value
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        family = HistogramMetricFamily(self._name, self._documentation)
        cumulative, buckets = 0, []
        for bound, count in zip([*map(floatToGoString, self._bounds), "+Inf"], counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric([], buckets, sum_value=total)
        yield family


# ---------------------------------------------------------------- HTTP (every service)
HTTP_REQUESTS = Counter(
    "distillery_http_requests",
    "HTTP requests answered, by route template and status",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "distillery_http_request_duration_seconds",
    "Time from request to the end of the response body, by route template",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)

# ---------------------------------------------------------------- router
ROUTER_UPSTREAM_LATENCY = Histogram(
    "distillery_router_upstream_duration_seconds",
    "Provider call latency (until response headers), by provider and outcome",
    ["provider", "outcome"],
    buckets=LATENCY_BUCKETS,
)
ROUTER_RETRIES = Counter("distillery_router_upstream_retries", "Provider calls retried", ["provider"])
ROUTER_FALLBACKS = Counter(
    "distillery_router_fallbacks", "Completions answered by the fallback model", ["model", "fallback_model"]
)
ROUTER_CACHE = Counter(
    "distillery_router_cache_lookups", "Response cache lookups by result (hit, miss)", ["result"]
)
ROUTER_TOKENS = Counter(
    "distillery_router_tokens",
    "Tokens through the router, by model and kind (prompt, completion)",
    ["model", "kind"],
)
ROUTER_COST = Counter("distillery_router_cost_usd", "Estimated provider cost in USD, by model", ["model"])

# ---------------------------------------------------------------- ingest
INGEST_ACCEPTED = Counter(
    "distillery_ingest_logs_accepted", "Logs acknowledged to clients, by route", ["route"]
)
INGEST_WRITTEN = Counter("distillery_ingest_logs_written", "Log rows inserted into ClickHouse")
INGEST_DLQ = Counter(
    "distillery_ingest_logs_dead_lettered", "Log events sent to a dead-letter topic", ["topic"]
)
CONSUMER_LAG = Gauge(
    "distillery_kafka_consumer_lag",
    "Messages behind the partition end, by topic and group",
    ["topic", "group"],
)
END_TO_END_LAG = BatchHistogram(
    "distillery_ingest_end_to_end_lag_seconds",
    "From the Kafka timestamp of a log event to its ClickHouse insert",
    buckets=LAG_BUCKETS,
)

# ---------------------------------------------------------------- training, eval, judge
TRAINING_JOBS = Counter("distillery_training_jobs", "Training jobs reaching a status", ["status"])
TRAINING_TOKENS_PER_SECOND = Gauge(
    "distillery_training_tokens_per_second",
    "Training throughput of the latest step, by job",
    ["job"],
)
TRAINING_LOSS = Gauge("distillery_training_loss", "Training loss of the latest step, by job", ["job"])
EVAL_ROWS = Counter("distillery_eval_rows", "Evaluation rows completed, by outcome", ["outcome"])
JUDGE_JUDGEMENTS = Counter("distillery_judge_judgements", "Judgements made, by outcome", ["outcome"])

UNMATCHED = "<unmatched>"


def route_template(scope: Scope) -> str | None:
    """The route template a request matched, API prefix included, or None.

    FastAPI 0.16x keeps an included router's routes unprefixed and records the full template in its
    effective route context; older versions put the prefixed route in ``scope["route"]``.
    """
    context = (scope.get("fastapi") or {}).get("effective_route_context")
    template = getattr(context, "path_format", None) or getattr(scope.get("route"), "path", None)
    return scope.get("root_path", "") + template if template else None


def route_label(scope: Scope) -> str:
    """The matched route template, else the fast route's exact path, else ``<unmatched>``."""
    return route_template(scope) or scope.get("metrics_route") or UNMATCHED


class HttpMetrics:
    """ASGI middleware: request rate, errors and latency by route. ``fast_paths`` are served without
    FastAPI routing, so their exact paths are the templates."""

    def __init__(self, app: ASGIApp, fast_paths: Iterable[tuple[str, str]] = ()) -> None:
        self.app = app
        self.fast_paths = fast_paths
        # Label children by label values: ``labels()`` costs more than the update itself.
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (scope["method"], scope["path"]) in self.fast_paths:
            scope["metrics_route"] = scope["path"]
        status = 500
        started = time.perf_counter()

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            self._observe(scope["method"], route_label(scope), status, time.perf_counter() - started)

    def _observe(self, method: str, route: str, status: int, seconds: float) -> None:
        counter = self._requests.get((method, route, status))
        if counter is None:
            counter = self._requests[(method, route, status)] = HTTP_REQUESTS.labels(
                method, route, str(status)
            )
        counter.inc()
        latency = self._latency.get((method, route))
        if latency is None:
            latency = self._latency[(method, route)] = HTTP_LATENCY.labels(method, route)
        latency.observe(seconds)


async def metrics_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """``GET /metrics`` in the Prometheus text format."""
    body = generate_latest(REGISTRY)
    headers = [(b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def observe_consumer_lag(consumer: object, after: dict[TopicPartition, int], group: str) -> None:
    """Set the lag gauge after handling a batch: per partition, its end offset (as the aiokafka
    consumer last saw it) minus ``after``, the offset after the batch's last record there."""
    behind: dict[str, int] = {}
    for tp, position in after.items():
        end = consumer.highwater(tp)  # type: ignore[attr-defined]
        if end is not None:
            behind[tp.topic] = behind.get(tp.topic, 0) + max(0, end - position)
    for topic, lag in behind.items():
        CONSUMER_LAG.labels(topic, group).set(lag)


def observe_end_to_end_lag(kafka_timestamps_ms: Iterable[int]) -> None:
    now_ms = time.time() * 1000
    END_TO_END_LAG.observe_many(
        max(0.0, (now_ms - stamp) / 1000) for stamp in kafka_timestamps_ms if stamp and stamp > 0
    )


def model_label(model: object) -> str:
    """A model name as a label value: as given, bounded in length."""
    return str(model or "unknown")[:100]


def observe_upstream(provider: str, status: int, seconds: float) -> None:
    ROUTER_UPSTREAM_LATENCY.labels(provider, f"{status // 100}xx").observe(seconds)


def observe_completion(
    model: object, completion: dict | None, route: object | None, *, cache_hit: bool | None
) -> None:
    """Tokens, cost and the cache lookup of one finished completion (``cache_hit`` None: not looked up).
    Cost uses the route's per-million prices when it has them."""
    if cache_hit is not None:
        ROUTER_CACHE.labels("hit" if cache_hit else "miss").inc()
    if not completion or cache_hit:
        return
    usage = completion.get("usage") or {}
    label = model_label(model)
    prompt, answer = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt:
        ROUTER_TOKENS.labels(label, "prompt").inc(prompt)
    if answer:
        ROUTER_TOKENS.labels(label, "completion").inc(answer)
    price_in = getattr(route, "input_price_per_million", None)
    price_out = getattr(route, "output_price_per_million", None)
    if price_in is not None and price_out is not None:
        ROUTER_COST.labels(label).inc((prompt * price_in + answer * price_out) / 1_000_000)


def _count(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def observe_training_event(event: object) -> None:
    """Jobs by status, tokens/s and loss from one applied ``training.events.v1`` event (the api applies
    them all, from local runs and Kubernetes pods alike)."""
    kind, job = getattr(event, "type", None), str(getattr(event, "job_id", ""))[:100]
    status = getattr(event, "status", None)
    if kind == "status" and status is not None:
        TRAINING_JOBS.labels(str(status)).inc()
    data = getattr(event, "data", None) or {}
    if kind == "metrics" and isinstance(data, dict):
        speed, loss = data.get("tokens_per_second"), data.get("train_loss")
        if isinstance(speed, int | float) and not isinstance(speed, bool):
            TRAINING_TOKENS_PER_SECOND.labels(job).set(speed)
        if isinstance(loss, int | float) and not isinstance(loss, bool):
            TRAINING_LOSS.labels(job).set(loss)
