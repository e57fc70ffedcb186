"""Property-based API test: schemathesis over the platform's own OpenAPI document, every operation.

Checks: no 5xx for any generated input (valid or not) and every documented response matches its
schema. Two profiles:

- quick (default, part of ``make test``): the fuzzing phase, 5 examples per operation, fixed seed
  (about 20 s here); tests/test_bad_input.py covers the boundary cases by hand;
- long: ``DISTILLERY_SCHEMATHESIS=long .venv/bin/pytest tests/test_schemathesis.py`` — every phase
  (coverage's boundary values and stateful links included), 200 examples per operation, a fresh
  seed each run (5-6 min at 25 examples on a busy 2-core box; budget up to an hour at 200).

The CLI runs as a child process against the session platform served over real HTTP, so this test
only awaits it (the platform keeps serving on the test's event loop meanwhile).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.conftest import Project
from tests.fake_upstream import OPENAI_KEY

# The long profile runs one worker: hypothesis describing strategies from two threads at once can
# hit CPython 3.11's "AST constructor recursion depth mismatch" (a flaky error of the tool).
PROFILES: dict[str, list[str]] = {
    "quick": ["--max-examples", "5", "--phases", "fuzzing", "--seed", "20261129", "--workers", "2"],
    "long": ["--max-examples", "200", "--phases", "examples,coverage,fuzzing,stateful", "--workers", "1"],
}
PROFILE = os.environ.get("DISTILLERY_SCHEMATHESIS", "quick")
TIME_LIMIT = {"quick": 150, "long": 3600}
ROOT = Path(__file__).resolve().parent.parent
ENTRY = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}


async def _seed(project: Project) -> dict[str, str]:
    """Real resources for path parameters, so that operations get past their 404s."""
    async with project.client() as client:
        keys = await client.put("/provider-keys", json={"openai": OPENAI_KEY})
        assert keys.status_code == 200, keys.text
        dataset = (await client.post("/datasets", json={"name": "fuzzed"})).json()["id"]
        added = await client.post(f"/datasets/{dataset}/entries", json={"entries": [ENTRY, ENTRY]})
        assert added.status_code == 200, added.text
        entries = (await client.get(f"/datasets/{dataset}/entries")).json()["data"]
        rule = await client.post(f"/datasets/{dataset}/pruning-rules", json={"text": "You are terse."})
        assert rule.status_code in (200, 201), rule.text
        provider = await client.post(
            "/external-providers",
            json={"slug": "fuzz-provider", "type": "openai", "baseUrl": "http://127.0.0.1:9/v1"},
        )
        assert provider.status_code in (200, 201), provider.text
        deployment = await client.put(
            "/deployments/fuzz-model", json={"baseUrl": "http://127.0.0.1:9/v1", "model": "m"}
        )
        assert deployment.status_code in (200, 201), deployment.text
    return {
        "dataset_id": dataset,
        "entry_id": entries[0]["id"],
        "rule_id": rule.json()["id"],
        "provider_id": provider.json()["id"],
        "slug": "fuzz-model",
    }


def _config(parameters: dict[str, str]) -> str:
    lines = ["[parameters]", *(f'{name} = "{value}"' for name, value in parameters.items())]
    return "\n".join(lines) + "\n"


async def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(
    project: Project, tmp_path: Path
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(_config(await _seed(project)))
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(config),
        "run",
        f"{project.base_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {project.key}",
        "--checks",
        "not_a_server_error,response_schema_conformance",
        "--request-timeout",
        "30",
        "--generation-database",
        "none",
        "--no-color",
        *PROFILES[PROFILE],
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks", "PYTHONPATH": str(ROOT)},
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), TIME_LIMIT[PROFILE])
    except TimeoutError:
        process.kill()
        raise
    text = output.decode(errors="replace")
    (tmp_path / "schemathesis.log").write_text(text)
    sections = [i for i in (text.find("= ERRORS ="), text.find("= FAILURES =")) if i >= 0]
    assert process.returncode == 0, text[min(sections, default=0) :][:15000]
    assert "Tested:" in text, text[-2000:]
