"""Docs match the product: the OpenAPI document describes every route, and the README every setting."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from fastapi.routing import APIRoute

from services.common.settings import Settings
from tests.conftest import RunningPlatform

README = Path(__file__).resolve().parent.parent / "README.md"
# POST routes whose request has no body by design (also every .../cancel, /pause and /resume action).
ACTIONS = ("/cancel", "/pause", "/resume")
BODYLESS = {
    ("POST", "/api/v1/keys"),
    ("POST", "/api/v1/datasets/{dataset_id}/export"),
    ("POST", "/api/v1/datasets/{dataset_id}/snapshots"),
}


async def openapi(running: RunningPlatform) -> dict:
    async with httpx.AsyncClient(base_url=running.base_url.removesuffix("/api/v1")) as client:
        served = await client.get("/api/v1/openapi.json")
        assert served.status_code == 200, served.text
        assert served.json() == (await client.get("/openapi.json")).json()
    return served.json()


async def test_openapi_is_served_under_the_api_prefix_and_lists_every_route(running: RunningPlatform) -> None:
    document = await openapi(running)
    documented = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    routes = {
        (method, route.path)
        for route in running.platform.app.routes
        if isinstance(route, APIRoute) and route.include_in_schema
        for method in route.methods
    }
    assert routes - {("HEAD", path) for _, path in routes} <= documented
    fast = {(method, path) for method, path in running.platform.fast_routes if path.startswith("/api/v1/")}
    assert fast <= documented, "a framework-free route needs a documenting FastAPI route"


async def test_every_body_and_query_parameter_is_described(running: RunningPlatform) -> None:
    paths = (await openapi(running))["paths"]
    bodiless = [
        f"{method.upper()} {path}"
        for path, item in paths.items()
        for method, operation in item.items()
        if method.upper() in ("POST", "PUT", "PATCH")
        and (method.upper(), path) not in BODYLESS
        and not path.endswith(ACTIONS)
        and not operation.get("requestBody", {}).get("content")
    ]
    assert not bodiless, f"no request body documented: {bodiless}"
    log_search = {p["name"] for p in paths["/api/v1/logs"]["get"]["parameters"]}
    assert {"model", "completionId", "status", "requestedAfter", "requestedBefore", "limit", "cursor"} <= (
        log_search
    )
    assert {p["name"] for p in paths["/api/v1/logs/count"]["get"]["parameters"]} >= {"model", "status"}
    chat = paths["/api/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages", "stream", "stream_options", "openpipe"} <= set(chat["properties"])
    assert "$ref" not in str(chat)  # inlined: the fast path's schema stands alone
    assert {"reqPayload", "respPayload"} <= set(
        paths["/api/v1/report"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    )
    entries = {p["name"] for p in paths["/api/v1/datasets/{dataset_id}/entries"]["get"]["parameters"]}
    assert {"split", "limit", "cursor"} <= entries


def test_the_readme_configuration_table_names_every_setting() -> None:
    text = README.read_text()
    section = text[text.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    named = set(re.findall(r"`([a-z0-9_]+)`", section))
    named |= {m.lower() for m in re.findall(r"`DISTILLERY_([A-Z0-9_]+)`", section)}
    missing = sorted(set(Settings.model_fields) - named)
    assert not missing, f"README ## Configuration does not mention: {missing}"
    assert "milliseconds" in text[text.index("openpipe.fallback") :][:400]
