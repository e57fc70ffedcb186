"""Criteria management: versioned CRUD on catalog.v1, alignment sets (JSONL and dataset import,
human labels, judge runs, stats against hand-computed confusion matrices, a re-run after a
prompt change), preference data from criteria. Judge models: tests/fake_judge.py."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import pytest

from services.api.criteria.service import alignment_stats
from tests.conftest import Project, RunningPlatform
from tests.fake_judge import FakeJudge, create_criterion, fake_judge, use_fake_judge  # noqa: F401


@pytest.fixture
async def judged(project: Project, fake_judge: FakeJudge) -> Project:  # noqa: F811
    async with project.client() as c:
        await use_fake_judge(c, fake_judge)
    return project


async def _poll(c: httpx.AsyncClient, path: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = (await c.get(path)).json()
        if job["status"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, job
        await _sleep(0.1)


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


# --- CRUD and versions --------------------------------------------------------------------------


async def test_criteria_crud_and_versions(project: Project, running: RunningPlatform) -> None:
    async with project.client() as c:
        created = await create_criterion(c, "tone", templatedVariables=["messages", "output"])
        assert created["id"] == "tone@v1" and created["version"] == 1 and created["latestVersion"] == 1
        assert created["templatedVariables"] == ["messages", "output"]
        assert [v["id"] for v in created["versions"]] == ["tone@v1"]

        unchanged = await c.patch("/criteria/tone", json={"prompt": created["prompt"]})
        assert unchanged.json()["id"] == "tone@v1"
        v2 = (await c.patch("/criteria/tone", json={"prompt": "Be kind."})).json()
        assert v2["id"] == "tone@v2" and v2["model"] == created["model"]
        v3 = (await c.patch("/criteria/tone", json={"model": "openai:gpt-4o-mini"})).json()
        assert v3["id"] == "tone@v3" and v3["prompt"] == "Be kind."

        latest = (await c.get("/criteria/tone")).json()
        assert latest["id"] == "tone@v3" and [v["version"] for v in latest["versions"]] == [1, 2, 3]
        pinned = (await c.get("/criteria/tone@v1")).json()
        assert (
            pinned["id"] == "tone@v1"
            and pinned["prompt"] == created["prompt"]
            and pinned["latestVersion"] == 3
        )
        listed = (await c.get("/criteria")).json()
        assert listed["object"] == "list" and [x["id"] for x in listed["data"]] == ["tone@v3"]

        # every version is on catalog.v1 (the judge resolves name and name@vN from memory)
        judge_catalog = running.platform.app.state.judge_service.catalog
        assert judge_catalog.find(project.id, "tone").id == "tone@v3"
        assert judge_catalog.find(project.id, "tone@v1").prompt == created["prompt"]

        deleted = await c.delete("/criteria/tone")
        assert deleted.json() == {"id": "tone", "object": "criterion", "deleted": True}
        assert (await c.get("/criteria/tone")).status_code == 404
        with pytest.raises(Exception, match="No criterion"):
            judge_catalog.find(project.id, "tone")
        again = await create_criterion(c, "tone")  # the name is free again
        assert again["id"] == "tone@v1"


async def test_criteria_errors(project: Project, make_project) -> None:  # type: ignore[no-untyped-def]
    async with project.client() as c:
        await create_criterion(c, "dup")
        duplicate = await c.post("/criteria", json={"name": "dup", "model": "m", "prompt": "p"})
        assert duplicate.status_code == 409 and duplicate.json()["error"]["param"] == "name"
        cases = [
            ({"name": "bad@name", "model": "m", "prompt": "p"}, "name"),
            ({"name": "ok", "model": "m", "prompt": ""}, "prompt"),
            ({"name": "ok", "prompt": "p"}, "model"),
            (
                {"name": "ok", "model": "m", "prompt": "p", "templatedVariables": ["messages"]},
                "templatedVariables",
            ),
            (
                {"name": "ok", "model": "m", "prompt": "p", "templatedVariables": ["input"]},
                "templatedVariables",
            ),
            ({"name": "ok", "model": "m", "prompt": "p", "extra": 1}, "extra"),
        ]
        for body, field in cases:
            response = await c.post("/criteria", json=body)
            assert response.status_code == 400, (body, response.text)
            assert field in response.json()["error"]["param"], response.json()
        assert (await c.patch("/criteria/dup", json={"prompt": 5})).status_code == 400
        for path in ("/criteria/nope", "/criteria/dup@v2", "/criteria/dup@vx"):
            missing = await c.get(path)
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "criterion_not_found", (
                path
            )
        assert (await c.patch("/criteria/nope", json={"prompt": "x"})).status_code == 404
        assert (await c.delete("/criteria/nope")).status_code == 404
    other = await make_project()
    async with other.client() as c:
        assert (await c.get("/criteria/dup")).status_code == 404
        assert (await c.get("/criteria")).json()["data"] == []
    async with httpx.AsyncClient(base_url=project.base_url) as anonymous:
        assert (await anonymous.get("/criteria")).status_code == 401


# --- alignment sets ----------------------------------------------------------------------------

# (output, human label given in the JSONL, label set later through the API)
ROWS = [
    ("Stockholm", "PASS", None),
    ("Oslo", "PASS", None),
    ("Beijing [bad]", "FAIL", None),
    ("Stockholm, I think [meh]", "FAIL", None),
    ("Stockholm, probably [meh]", None, "PASS"),
    ("Paris [bad]", None, "PASS"),
    ("Uppsala [meh]", None, "FAIL"),
    ("Sweden's capital", None, "SKIP"),
    ("Berlin [bad]", None, None),
]


def _jsonl() -> bytes:
    lines = []
    for output, label, _ in ROWS:
        row: dict[str, Any] = {
            "messages": [
                {"role": "user", "content": "What is the capital of Sweden?"},
                {"role": "assistant", "content": output},
            ]
        }
        if label:
            row["judgement"] = label
        lines.append(orjson.dumps(row))
    lines.append(b'{"messages": [{"role": "user", "content": "no answer"}]}')  # no assistant output
    lines.append(b'{"judgement": "MAYBE", "messages": []}')
    lines.append(b"{not json")
    return b"\n".join(lines)


async def test_alignment_set_stats_and_rerun(judged: Project) -> None:
    async with judged.client() as c:
        await create_criterion(c, "capital", prompt="Fail outputs with a marked mistake.")
        uploaded = await c.post("/criteria/capital/alignment-set/upload", content=_jsonl())
        assert uploaded.status_code == 201, uploaded.text
        result = uploaded.json()
        assert result["imported"] == len(ROWS)
        assert [e["line"] for e in result["errors"]] == [10, 11, 12]
        assert "assistant" in result["errors"][0]["message"] and "judgement" in result["errors"][1]["message"]

        rows = (await c.get("/criteria/capital/alignment-set")).json()["rows"]
        assert [r["output"]["content"] for r in rows] == [r[0] for r in ROWS]
        for row, (_, _, later) in zip(rows, ROWS, strict=True):
            if later:
                labelled = await c.put(
                    f"/criteria/capital/alignment-set/rows/{row['id']}", json={"judgement": later}
                )
                assert labelled.status_code == 200 and labelled.json()["humanJudgement"] == later
        first = rows[0]["id"]
        cleared = await c.put(f"/criteria/capital/alignment-set/rows/{first}", json={"judgement": None})
        assert cleared.json()["humanJudgement"] is None
        await c.put(f"/criteria/capital/alignment-set/rows/{first}", json={"judgement": "PASS"})
        bad_label = await c.put(f"/criteria/capital/alignment-set/rows/{first}", json={"judgement": "YES"})
        assert bad_label.status_code == 400
        assert (
            await c.put("/criteria/capital/alignment-set/rows/alr_nope", json={"judgement": "PASS"})
        ).status_code == 404

        run = await c.post("/criteria/capital/alignment-set/run", json={})
        assert run.status_code == 202, run.text
        job = await _poll(c, f"/criteria/capital/alignment-set/jobs/{run.json()['id']}")
        assert job["status"] == "succeeded" and job["progress"] == {"done": 9, "total": 9, "errors": 0}

        v1 = (await c.get("/criteria/capital/alignment-set")).json()
        # hand-computed: TP row 3; FP row 6; FN rows 4, 7; TN rows 1, 2, 5 (rows 8 SKIP, 9 unlabelled)
        expected_v1 = {
            "version": 1,
            "criterionId": "capital@v1",
            "rows": 9,
            "labelled": 7,
            "skipped": 1,
            "unlabelled": 1,
            "judged": 9,
            "judgeErrors": 0,
            "compared": 7,
            "truePositives": 1,
            "falsePositives": 1,
            "falseNegatives": 2,
            "trueNegatives": 3,
            "precision": 0.5,
            "recall": 0.3333,
            "f1": 0.4,
            "agreement": 0.5714,
        }
        assert {k: v1["stats"][k] for k in expected_v1} == expected_v1
        assert "at least 30" in v1["stats"]["warning"]
        assert [r["llmJudgement"]["judgement"] for r in v1["rows"]] == [
            "PASS", "PASS", "FAIL", "PASS", "PASS", "FAIL", "PASS", "PASS", "FAIL"
        ]  # fmt: skip

        # a stricter prompt (v2) also fails "[meh]": re-run, and both versions' stats are shown
        await c.patch("/criteria/capital", json={"prompt": "STRICT: fail any marked mistake, even [meh]."})
        rerun = await c.post("/criteria/capital/alignment-set/run")
        assert (await _poll(c, f"/criteria/capital/alignment-set/jobs/{rerun.json()['id']}"))[
            "status"
        ] == "succeeded"
        stats = (await c.get("/criteria/capital/alignment-set/stats")).json()
        assert stats["latestVersion"] == 2 and [s["version"] for s in stats["versions"]] == [2, 1]
        v2 = stats["versions"][0]
        # TP rows 3, 4, 7; FP rows 5, 6; FN none; TN rows 1, 2
        assert (v2["truePositives"], v2["falsePositives"], v2["falseNegatives"], v2["trueNegatives"]) == (
            3,
            2,
            0,
            2,
        )
        assert (v2["precision"], v2["recall"], v2["f1"], v2["agreement"]) == (0.6, 1.0, 0.75, 0.7143)
        assert stats["versions"][1]["f1"] == 0.4
        # the set shown for an older version keeps that version's verdicts
        old = (await c.get("/criteria/capital/alignment-set", params={"version": 1})).json()
        shown = old["rows"][3]["llmJudgement"]
        assert (shown["version"], shown["status"], shown["judgement"]) == (1, "success", "PASS")
        assert shown["explanation"] == "The output meets the criterion."

        assert (await c.post("/criteria/capital/alignment-set/run", json={"version": 9})).status_code == 404
        assert (await c.post("/criteria/capital/alignment-set/upload", content=b"{oops")).status_code == 400


async def test_alignment_run_records_judge_errors(judged: Project) -> None:
    async with judged.client() as c:
        await create_criterion(c, "broken", model="openpipe:fakejudge/judge-malformed")
        await c.post("/criteria/broken/alignment-set/upload", content=_jsonl())
        assert (await c.post("/criteria/nope/alignment-set/run")).status_code == 404
        run = await c.post("/criteria/broken/alignment-set/run")
        job = await _poll(c, f"/criteria/broken/alignment-set/jobs/{run.json()['id']}")
        assert job["status"] == "failed" and job["progress"]["errors"] == 9
        assert "not a valid verdict" in job["errors"][0]["message"]
        stats = (await c.get("/criteria/broken/alignment-set/stats")).json()["versions"][0]
        assert stats["judgeErrors"] == 9 and stats["judged"] == 0 and stats["precision"] is None


async def _dataset(c: httpx.AsyncClient, outputs: list[str]) -> str:
    dataset_id = (await c.post("/datasets", json={"name": "capitals"})).json()["id"]
    entries = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i}: what is the capital of Sweden?"},
                {"role": "assistant", "content": output},
            ]
        }
        for i, output in enumerate(outputs)
    ]
    created = await c.post(f"/datasets/{dataset_id}/entries", json={"entries": entries})
    assert created.json()["entries_created"] == len(outputs), created.text
    return dataset_id


async def test_alignment_import_from_dataset(judged: Project) -> None:
    async with judged.client() as c:
        await create_criterion(c, "sampled")
        dataset_id = await _dataset(c, [f"Stockholm {i}" for i in range(6)])
        copied = await c.post(
            "/criteria/sampled/alignment-set/import", json={"datasetId": dataset_id, "count": 4, "seed": 7}
        )
        assert copied.status_code == 201 and copied.json()["imported"] == 4, copied.text
        rows = (await c.get("/criteria/sampled/alignment-set")).json()["rows"]
        assert len({r["output"]["content"] for r in rows}) == 4
        assert all(r["output"]["content"].startswith("Stockholm") and r["source"] == "dataset" for r in rows)
        assert all(r["input"]["messages"][0]["role"] == "user" for r in rows)

        generated = await c.post(
            "/criteria/sampled/alignment-set/import",
            json={"datasetId": dataset_id, "count": 2, "outputModel": "openpipe:fakejudge/gen"},
        )
        assert generated.status_code == 202, generated.text
        job = await _poll(c, f"/criteria/sampled/alignment-set/jobs/{generated.json()['job']['id']}")
        assert job["status"] == "succeeded" and job["kind"] == "import"
        rows = (await c.get("/criteria/sampled/alignment-set")).json()["rows"]
        assert len(rows) == 6 and sum(r["output"]["content"].startswith("candidate") for r in rows) == 2

        missing = await c.post(
            "/criteria/sampled/alignment-set/import", json={"datasetId": "ds_nope", "count": 1}
        )
        assert missing.status_code == 404
        zero = await c.post(
            "/criteria/sampled/alignment-set/import", json={"datasetId": dataset_id, "count": 0}
        )
        assert zero.status_code == 400 and zero.json()["error"]["param"] == "count"


# --- preference data --------------------------------------------------------------------------


async def test_preference_data_from_criteria(judged: Project) -> None:
    async with judged.client() as c:
        await create_criterion(c, "pref")
        dataset_id = await _dataset(c, ["old answer 0", "old answer 1", "old answer 2"])
        started = await c.post(
            "/criteria/preference-data",
            json={
                "datasetId": dataset_id,
                "criteria": ["pref@v1"],
                "model": "openpipe:fakejudge/gen",
                "k": 4,
            },
        )
        assert started.status_code == 202, started.text
        job = await _poll(c, f"/datasets/{dataset_id}/jobs/{started.json()['id']}")
        assert job["status"] == "succeeded", job
        assert job["kind"] == "criteria_preference" and job["result"]["preference_pairs"] == 3
        entries = (await c.get(f"/datasets/{dataset_id}/entries")).json()["data"]
        for entry in entries:
            assert (
                entry["output"]["content"].startswith("candidate")
                and "[bad]" not in entry["output"]["content"]
            )
            assert "[bad]" in entry["rejected_message"]["content"]
            assert entry["provenance"] == "relabeled_by_model" and entry["revision"] == 2

        unknown = await c.post(
            "/criteria/preference-data",
            json={"datasetId": dataset_id, "criteria": ["ghost"], "model": "openpipe:fakejudge/gen"},
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "criterion_not_found"
        too_few = await c.post(
            "/criteria/preference-data",
            json={"datasetId": dataset_id, "criteria": ["pref"], "model": "m", "k": 1},
        )
        assert too_few.status_code == 400 and too_few.json()["error"]["param"] == "k"


# --- stats, by hand ----------------------------------------------------------------------------


def test_alignment_stats_hand_computed() -> None:
    ok, fail, err = ("success", "PASS"), ("success", "FAIL"), ("error", None)
    labels = ["FAIL", "FAIL", "FAIL", "PASS", "PASS", "PASS", "PASS", "SKIP", None, "FAIL"]
    verdicts = [fail, fail, ok, fail, ok, ok, ok, fail, fail, err]
    stats = alignment_stats("c", 3, labels, verdicts)
    # TP 2, FN 1, FP 1, TN 3; the error row is not compared
    assert (stats.truePositives, stats.falseNegatives, stats.falsePositives, stats.trueNegatives) == (
        2,
        1,
        1,
        3,
    )
    assert stats.precision == 0.6667 and stats.recall == 0.6667 and stats.f1 == 0.6667
    assert stats.agreement == 0.7143 and stats.compared == 7 and stats.judged == 9 and stats.judgeErrors == 1
    assert (stats.labelled, stats.skipped, stats.unlabelled, stats.rows) == (8, 1, 1, 10)
    assert stats.warning is not None

    # a judge that never says FAIL: precision undefined, recall 0
    never = alignment_stats("c", 1, ["FAIL", "PASS"], [ok, ok])
    assert never.precision is None and never.recall == 0.0 and never.f1 is None and never.agreement == 0.5
    many = alignment_stats("c", 1, ["PASS"] * 30, [ok] * 30)
    assert many.warning is None and many.agreement == 1.0 and many.precision is None


async def test_catalog_functions_on_sqlite_and_postgres(database_url: str) -> None:
    """Versions, judgement upserts and the judgements store on both catalog databases."""
    from services.api.criteria import service
    from services.api.criteria.schemas import CriterionCreate, CriterionUpdate
    from services.api.projects import service as projects
    from services.common.db import make_engine, make_sessionmaker, migrate
    from services.common.events import JudgementEvent

    await migrate(database_url)
    engine = make_engine(database_url)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions.begin() as session:
            project = await projects.create_project(session=session, name="crit")
            body = CriterionCreate(name="c", model="m", prompt="p")
            criterion, _ = await service.create_criterion(session=session, project_id=project.id, body=body)
            _, versions, changed = await service.update_criterion(
                session=session, project_id=project.id, name="c", body=CriterionUpdate(prompt="q")
            )
            assert changed and [v.version for v in versions] == [1, 2]
            service.add_jsonl_rows(session, criterion, _jsonl())
        async with sessions.begin() as session:
            rows = await service.alignment_rows(session=session, criterion=criterion)
            for verdict in ("PASS", "FAIL"):  # the second run of the same version replaces the first
                values = {"status": "success", "judgement": verdict, "explanation": "", "model": "m"}
                values |= {"error_code": None, "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": None}
                await service.store_row_judgement(
                    session=session, row_id=rows[0].id, version=2, values=values
                )
        event = JudgementEvent(
            judgement_id="jdg_x", project_id=project.id, criterion="c", criterion_version=2, model="m",
            status="success", score=1.0, created_at=int(time.time() * 1000),
        )  # fmt: skip
        async with sessions.begin() as session:
            assert await service.store_judgements(session=session, events=[event, event]) == 1
        async with sessions.begin() as session:
            assert await service.store_judgements(session=session, events=[event]) == 0
        async with sessions() as session:
            _, judgements, stats = await service.stats_by_version(session=session, criterion=criterion)
            assert judgements[(rows[0].id, 2)].judgement == "FAIL" and stats[2].falsePositives == 1
            assert (
                len(await service.list_judgements(session=session, project_id=project.id, name="c", limit=5))
                == 1
            )
            assert len(await service.catalog_records(session=session)) == 1
        # more verdicts than one statement's slice; those already stored are skipped in every slice
        many = [
            event.model_copy(update={"judgement_id": f"jdg_{i}"}) for i in range(service.STORE_SLICE * 2 + 5)
        ]
        async with sessions.begin() as session:
            assert await service.store_judgements(session=session, events=many[::3]) == len(many[::3])
        async with sessions.begin() as session:
            stored = await service.store_judgements(session=session, events=[*many, event])
            assert stored == len(many) - len(many[::3])
        async with sessions() as session:
            listed = await service.list_judgements(
                session=session, project_id=project.id, name="c", limit=100
            )
            assert len(listed) == len(many) + 1
    finally:
        await engine.dispose()
