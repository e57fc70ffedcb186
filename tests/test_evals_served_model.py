"""An eval over a model the platform itself serves: the base tiny model answers for real through
the router and the local model server (no fake), beside the dataset's own outputs."""

from __future__ import annotations

from tests.conftest import Project
from tests.helpers_eval import EXACT_MATCH, make_dataset, wait_for_eval

BASE = "openpipe:base/distillery/tiny-chat"


async def test_an_eval_scores_a_model_the_platform_serves(project: Project) -> None:
    async with project.client() as http:
        dataset_id = await make_dataset(http, count=3)
        body = {
            "name": "tiny base vs original",
            "datasetId": dataset_id,
            "models": ["original", BASE],
            "evaluators": [{"type": "code", "name": "exact", "source": EXACT_MATCH}],
        }
        created = await http.post("/evals", json=body)
        assert created.status_code == 202, created.text
        eval_id = created.json()["id"]
        done = await wait_for_eval(http, eval_id)
        results = (await http.get(f"/evals/{eval_id}/results")).json()
        rows = (await http.get(f"/evals/{eval_id}/rows", params={"model": BASE})).json()
    assert done["status"] == "succeeded" and done["progress"] == {"done": 3, "total": 3}
    scores = {r["model"]: r for r in results["data"]}
    assert scores["original"]["score"] == 1.0  # the dataset's own outputs match themselves
    served = scores[BASE]
    assert served["rows"] == 3 and served["errors"] == 0 and served["generationErrors"] == 0
    assert served["score"] == 0.0 and served["latencyMs"] > 0  # an untrained base: generated, not copied
    assert len(rows["data"]) == 3
    assert all(r["output"]["role"] == "assistant" and r["output"]["content"] for r in rows["data"])
