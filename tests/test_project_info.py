"""How a producer learns what it must put in a ``logs.v1`` event: the project id and the broker."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from typer.testing import CliRunner

from services.cli import app
from tests.conftest import Project


async def test_project_route_names_the_keys_project(project: Project, make_project) -> None:
    other = await make_project()
    for owner in (project, other):
        async with owner.client() as client:
            body = (await client.get("/project")).json()
        assert body["object"] == "project" and body["id"] == owner.id and body["name"]
    async with httpx.AsyncClient(base_url=project.base_url) as client:
        response = await client.get("/project", headers={"Authorization": "Bearer opk_not_a_key"})
    assert response.status_code == 401 and "opk_not_a_key" not in response.text


def test_info_prints_the_running_platforms_addresses_and_project_ids(tmp_path: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--project", "team-a", "--data-dir", str(tmp_path)])
    project_id = re.search(r"\((proj_\w+)\)", created.output).group(1)

    stopped = runner.invoke(app, ["info", "--data-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert stopped.exit_code == 0, stopped.output
    assert "no platform is running" in stopped.output and f"team-a: {project_id}" in stopped.output

    run = {"kafka_url": "127.0.0.1:19092", "http_port": 18080, "grpc_port": 15051, "pid": 1}
    (tmp_path / "run.json").write_text(json.dumps(run))
    running = runner.invoke(app, ["info", "--data-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert running.exit_code == 0, running.output
    assert "Kafka  127.0.0.1:19092" in running.output and ":15051 (plaintext)" in running.output
    assert ":18080/api/v1" in running.output and project_id in running.output
