"""``/metrics`` after real traffic: the named series exist with plausible values; ``/readyz``."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from services.common import health
from services.common.blobstore import FileBlobStore
from services.common.kafka import free_port
from tests.conftest import Project, RunningPlatform, wait_for_count, wait_until
from tests.fake_judge import FakeJudge, create_criterion, fake_judge, use_fake_judge  # noqa: F401
from tests.fake_upstream import OPENAI_KEY

MESSAGES = [{"role": "user", "content": "metrics please"}]


def report(i: int) -> dict:
    now = int(time.time() * 1000)
    return {
        "requestedAt": now - 10,
        "receivedAt": now,
        "reqPayload": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hi {i}"}]},
        "respPayload": {"choices": [{"message": {"role": "assistant", "content": "hello"}}]},
        "statusCode": 200,
    }


def origin(running: RunningPlatform) -> str:
    return running.base_url.removesuffix("/api/v1")


async def scrape(running: RunningPlatform) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{origin(running)}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of ``name`` over samples whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


async def test_http_and_ingest_series_after_reports(running: RunningPlatform, project: Project) -> None:
    before = await scrape(running)
    async with project.client() as client:
        for i in range(5):
            assert (await client.post("/report", json=report(i))).status_code == 200
        assert (await client.post("/report", content=b"{not json")).status_code == 400
        assert (await client.get("/logs/no-such-log")).status_code == 404
        assert (await client.get("/no/such/route/for/metrics")).status_code == 404
        await wait_for_count(client, 5)
    after = await scrape(running)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    route = "/api/v1/report"
    assert grew("distillery_http_requests_total", route=route, status="200") == 5
    assert grew("distillery_http_requests_total", route=route, status="400") == 1
    assert grew("distillery_http_request_duration_seconds_count", route=route) == 6
    # Templated routes are labelled by template, unknown paths never by their text.
    assert grew("distillery_http_requests_total", route="/api/v1/logs/{log_id}", status="404") == 1
    assert grew("distillery_http_requests_total", route="<unmatched>", status="404") >= 1
    assert not any("no/such/route" in str(labels) for _, labels in after)
    assert grew("distillery_ingest_logs_accepted_total", route="/report") == 5
    assert grew("distillery_ingest_logs_written_total") >= 5
    assert grew("distillery_ingest_end_to_end_lag_seconds_count") >= 5
    lag_sum = grew("distillery_ingest_end_to_end_lag_seconds_sum")
    assert 0 <= lag_sum < 5 * 60, "end-to-end lag is in seconds and plausible"
    assert any(name == "distillery_kafka_consumer_lag" for name, _ in after)
    assert total(after, "distillery_kafka_consumer_lag", topic="logs.v1") >= 0


async def test_router_series_after_completions(running: RunningPlatform, project: Project) -> None:
    async with project.client() as http:
        assert (await http.put("/provider-keys", json={"openai": OPENAI_KEY})).status_code == 200
    client = openai.AsyncOpenAI(api_key=project.key, base_url=project.base_url, max_retries=0)

    async def router_ready() -> bool:
        try:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        except (openai.BadRequestError, openai.NotFoundError):
            return False
        return True

    await wait_until(router_ready, what="router knows the provider key")
    before = await scrape(running)
    cache = {"op-cache": "readWrite"}
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=cache)
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, extra_headers=cache)
    await client.chat.completions.create(model="metrics-gpt-4o-429-once", messages=MESSAGES)
    await client.chat.completions.create(
        model="metrics-gpt-4o-500",
        messages=MESSAGES,
        extra_body={"openpipe": {"fallback": {"model": "gpt-4o-mini"}}},
    )
    after = await scrape(running)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("distillery_router_cache_lookups_total", result="miss") == 1
    assert grew("distillery_router_cache_lookups_total", result="hit") == 1
    assert grew("distillery_router_tokens_total", model="gpt-4o-mini", kind="prompt") > 0
    assert grew("distillery_router_tokens_total", model="gpt-4o-mini", kind="completion") > 0
    assert grew("distillery_router_upstream_retries_total", provider="openai") >= 3  # 1 + 2 on the 500s
    assert grew("distillery_router_upstream_duration_seconds_count", provider="openai", outcome="2xx") >= 3
    assert grew("distillery_router_upstream_duration_seconds_count", provider="openai", outcome="5xx") >= 3
    assert (
        grew("distillery_router_fallbacks_total", model="metrics-gpt-4o-500", fallback_model="gpt-4o-mini")
        == 1
    )
    assert grew("distillery_http_requests_total", route="/api/v1/chat/completions", status="200") == 4


async def test_readyz_checks_the_services_own_dependencies(running: RunningPlatform) -> None:
    async with httpx.AsyncClient() as client:
        ready = await client.get(f"{origin(running)}/readyz")
        live = await client.get(f"{origin(running)}/healthz")
    assert live.status_code == 200
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks == {"kafka": "ok", "blob_store": "ok", "clickhouse": "ok", "database": "ok"}


async def test_readyz_is_503_naming_the_dependency_that_is_down(tmp_path) -> None:
    down = f"127.0.0.1:{free_port()}"
    platform = SimpleNamespace(
        settings=SimpleNamespace(kafka_url=down, redis_url=""),
        blobs=FileBlobStore(tmp_path),
        state={},
        services=("relabel",),
    )
    response = await health.readiness(platform)  # type: ignore[arg-type]
    assert response.status_code == 503
    body = response.body.decode()
    assert '"kafka":"ConnectionError"' in body and '"blob_store":"ok"' in body
    assert down not in body  # answers never echo URLs (they may carry credentials)


async def test_training_series_from_applied_events(running: RunningPlatform) -> None:
    """The api applies every training.events.v1 event (local runs and Kubernetes pods alike); each
    applied one updates jobs by status, tokens/s and loss."""
    from services.common.events import TrainingEvent
    from services.common.metrics import observe_training_event

    before = await scrape(running)
    job = "ftjob-metrics-test"
    base = {"job_id": job, "project_id": "proj-x", "created_at": int(time.time())}
    observe_training_event(TrainingEvent(event_id="e1", seq=1, type="status", status="running", **base))
    observe_training_event(
        TrainingEvent(
            event_id="e2",
            seq=2,
            type="metrics",
            data={"step": 3, "train_loss": 1.25, "tokens_per_second": 812.5},
            **base,
        )
    )
    observe_training_event(
        TrainingEvent(event_id="e3", seq=3, type="metrics", data={"train_loss": "nan?"}, **base)
    )
    observe_training_event(TrainingEvent(event_id="e4", seq=4, type="status", status="succeeded", **base))
    after = await scrape(running)
    for status in ("running", "succeeded"):
        assert (
            total(after, "distillery_training_jobs_total", status=status)
            - total(before, "distillery_training_jobs_total", status=status)
            == 1
        )
    assert total(after, "distillery_training_loss", job=job) == 1.25  # a malformed value is ignored
    assert total(after, "distillery_training_tokens_per_second", job=job) == 812.5


async def test_judge_series_after_judgements(
    running: RunningPlatform,
    project: Project,
    fake_judge: FakeJudge,  # noqa: F811
) -> None:
    row = {"messages": [{"role": "user", "content": "What is the capital of Sweden?"}]}
    async with project.client() as client:
        await use_fake_judge(client, fake_judge)
        await create_criterion(client, "capitals-metrics")
        before = await scrape(running)
        for answer in ("Stockholm", "Beijing [bad]"):
            output = {"role": "assistant", "content": answer}
            response = await client.post(
                "/criteria/judge", json={"criterion_id": "capitals-metrics", "input": row, "output": output}
            )
            assert response.status_code == 200, response.text
    after = await scrape(running)
    for outcome in ("PASS", "FAIL"):
        grew = total(after, "distillery_judge_judgements_total", outcome=outcome) - total(
            before, "distillery_judge_judgements_total", outcome=outcome
        )
        assert grew == 1, outcome
    route = "/api/v1/criteria/judge"
    assert (
        total(after, "distillery_http_requests_total", route=route, status="200")
        - total(before, "distillery_http_requests_total", route=route, status="200")
        == 2
    )


def test_a_batch_histogram_exposes_what_a_histogram_of_the_same_values_does() -> None:
    """Bucket edges included (a value equal to a bound counts in that bound's bucket), and above
    the last bound; observed over several batches."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from services.common.metrics import BatchHistogram

    bounds = (0.01, 0.5, 1, 10)
    values = [0.0, 0.01, 0.010001, 0.3, 0.5, 1.0, 7.5, 10, 11, 900.25]
    theirs_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    theirs = Histogram("lag_seconds", "doc", buckets=bounds, registry=theirs_registry)
    ours = BatchHistogram("lag_seconds", "doc", buckets=bounds, registry=ours_registry)
    for value in values:
        theirs.observe(value)
    ours.observe_many(values[:4])
    ours.observe_many([])
    ours.observe_many(iter(values[4:]))

    def samples(registry: CollectorRegistry) -> dict:
        text = generate_latest(registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(ours_registry) == samples(theirs_registry)
    assert samples(ours_registry)[("lag_seconds_bucket", (("le", "0.01"),))] == 2
