"""Relabeling a dataset end to end: api → relabel.requests.v1 → worker → gRPC Inference → router →
fake upstream → relabel.results.v1 → api applies revisions."""

from __future__ import annotations

import pytest

from tests.conftest import Project, wait_until


def entry(question: str, answer: str, **extra: object) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
        **extra,
    }


async def make_dataset(http, entries: list[dict]) -> tuple[str, list[dict]]:
    dataset = (await http.post("/datasets", json={"name": "relabel me"})).json()
    created = await http.post(f"/datasets/{dataset['id']}/entries", json={"entries": entries})
    assert created.json()["entries_created"] == len(entries), created.text
    listed = (await http.get(f"/datasets/{dataset['id']}/entries", params={"limit": 1000})).json()["data"]
    return dataset["id"], listed


async def wait_for_job(http, dataset_id: str, job_id: str) -> dict:
    job: dict = {}

    async def finished() -> bool:
        nonlocal job
        job = (await http.get(f"/datasets/{dataset_id}/jobs/{job_id}")).json()
        return job["status"] in ("succeeded", "partial", "failed")

    await wait_until(finished, timeout=60, what=f"relabel job {job_id}")
    return job


async def test_relabel_with_a_stronger_model_keeps_rejected_outputs(ready: Project) -> None:  # noqa: F811
    async with ready.client() as http:
        dataset_id, entries = await make_dataset(
            http, [entry(f"What is {i}+{i}?", f"maybe {i}") for i in range(12)]
        )
        started = await http.post(
            f"/datasets/{dataset_id}/relabel", json={"model": "gpt-4o", "filters": {}, "trackRejected": True}
        )
        assert started.status_code == 202, started.text
        job = await wait_for_job(http, dataset_id, started.json()["id"])
        assert job["status"] == "succeeded" and job["progress"] == {"done": 12, "total": 12}
        assert job["result"]["relabeled"] == 12
        one = (await http.get(f"/datasets/{dataset_id}/entries/{entries[0]['id']}")).json()
        stats = (await http.get(f"/datasets/{dataset_id}")).json()
    question = one["messages"][-2]["content"]
    assert one["output"] == {"role": "assistant", "content": f"Answer to: {question}"}
    assert one["provenance"] == "relabeled_by_model" and one["relabel_model"] == "gpt-4o"
    assert one["rejected_message"]["content"].startswith("maybe")  # the old output: now a DPO pair
    assert one["revision"] == 2 and one["revisions"][0]["output"]["content"].startswith("maybe")
    assert stats["preference_entry_count"] == 12


async def test_relabel_only_the_filtered_entries(ready: Project) -> None:  # noqa: F811
    async with ready.client() as http:
        rows = [
            entry(f"q{i}", f"a{i}", metadata={"needs_relabel": "yes" if i % 2 else "no"}) for i in range(8)
        ]
        dataset_id, _ = await make_dataset(http, rows)
        started = await http.post(
            f"/datasets/{dataset_id}/relabel",
            json={"model": "gpt-4o-mini", "filters": {"metadata": {"needs_relabel": "yes"}}},
        )
        job = await wait_for_job(http, dataset_id, started.json()["id"])
        assert job["progress"]["total"] == 4 and job["status"] == "succeeded"
        relabeled = (
            await http.get(f"/datasets/{dataset_id}/entries", params={"provenance": "relabeled_by_model"})
        ).json()["data"]
        untouched = (
            await http.get(f"/datasets/{dataset_id}/entries", params={"metadata.needs_relabel": "no"})
        ).json()["data"]
    assert len(relabeled) == 4 and all(e["rejected_message"] is None for e in relabeled)  # not tracked
    assert all(e["provenance"] == "api" and e["output"]["content"].startswith("a") for e in untouched)


async def test_upstream_failing_mid_run_leaves_failed_entries_as_they_were(ready: Project) -> None:  # noqa: F811
    async with ready.client() as http:
        rows = [entry(f"question {i}" + (" [fail]" if i in (2, 5) else ""), f"old {i}") for i in range(7)]
        dataset_id, entries = await make_dataset(http, rows)
        started = await http.post(f"/datasets/{dataset_id}/relabel", json={"model": "gpt-4o"})
        job = await wait_for_job(http, dataset_id, started.json()["id"])
        assert job["status"] == "partial" and job["progress"]["done"] == 7
        assert job["result"] == {"relabeled": 5, "failed": 2, "skipped": 0}
        assert job["error_count"] == 2 and all("UNAVAILABLE" in e["message"] for e in job["errors"])
        failed_ids = {e["entry_id"] for e in job["errors"]}
        for listed in entries:
            got = (await http.get(f"/datasets/{dataset_id}/entries/{listed['id']}")).json()
            if listed["id"] in failed_ids:
                assert got["output"] == listed["output"] and got["revision"] == 1
            else:
                assert got["provenance"] == "relabeled_by_model"
    assert len(failed_ids) == 2


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({}, 400, "model"),
        ({"model": "gpt-4o", "filters": {"split": "BOTH"}}, 400, "split"),
        ({"model": "gpt-4o", "filters": {"metadata": {"x": "none-match"}}}, 400, "nothing to relabel"),
        ({"model": "gpt-4o", "colour": "red"}, 400, "colour"),
    ],
)
async def test_bad_relabel_requests(ready: Project, body: dict, status: int, fragment: str) -> None:  # noqa: F811
    async with ready.client() as http:
        dataset_id, _ = await make_dataset(http, [entry("q", "a")])
        response = await http.post(f"/datasets/{dataset_id}/relabel", json=body)
    assert response.status_code == status and fragment in response.json()["message"], response.text


async def test_another_projects_dataset_is_404(ready: Project, make_project) -> None:  # noqa: F811
    other = await make_project()
    async with ready.client() as http:
        dataset_id, _ = await make_dataset(http, [entry("q", "a")])
    async with other.client() as http:
        response = await http.post(f"/datasets/{dataset_id}/relabel", json={"model": "gpt-4o"})
    assert response.status_code == 404


async def test_internal_callers_need_the_install_token(ready: Project, running) -> None:  # noqa: F811
    """The worker calls Inference with the internal token; a wrong one is refused and not retried."""
    from services.common.events import RelabelItem, RelabelRequest
    from services.common.inference_client import InferenceClient
    from services.common.secrets import internal_token
    from services.relabel.service import relabel_item

    target = running.settings.resolved_router_grpc_url()
    batch = RelabelRequest(
        request_id="r:0",
        job_id="job_x",
        project_id=ready.id,
        dataset_id="ds_x",
        model="gpt-4o-mini",
        items=[],
    )
    item = RelabelItem(
        entry_id="dse_x", base_revision=1, request={"messages": [{"role": "user", "content": "hello"}]}
    )
    good, bad = (
        InferenceClient(target, internal_token(running.settings)),
        InferenceClient(target, "wrong-token"),
    )
    try:
        assert (await relabel_item(good, batch, item)).output == {
            "role": "assistant",
            "content": "Answer to: hello",
        }
        refused = await relabel_item(bad, batch, item)
        assert refused.output is None and refused.error.startswith("UNAUTHENTICATED")
        assert "wrong-token" not in refused.error
    finally:
        await good.close()
        await bad.close()
