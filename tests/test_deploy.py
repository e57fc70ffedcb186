"""Deployment files stay in step with the services that exist.

Every Python service package (``services/<name>/__main__.py``) must be runnable from
docker-compose.yml and deployable by the Helm chart; the compose file must be
self-consistent (declared dependencies, the shared Dockerfile, the DISTILLERY_* URLs).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
CHART_DIR = ROOT / "helm" / "distillery"

INFRA = {"kafka", "clickhouse", "minio", "postgres", "redis"}
# Services that must be deployed whether or not their package exists yet.
REQUIRED_SERVICES = {"api", "ingest"}
# Settings every Distillery container needs (services/common/settings.py, prefix DISTILLERY_).
REQUIRED_ENV = (
    "DISTILLERY_KAFKA_URL",
    "DISTILLERY_CLICKHOUSE_URL",
    "DISTILLERY_DATABASE_URL",
    "DISTILLERY_BLOB_URL",
)
# Services that the chart runs as Jobs (a top-level values key) rather than Deployments.
JOB_SERVICES = {"trainer"}


def discovered_services() -> set[str]:
    """Names of service packages runnable with ``python -m services.<name>``."""
    return {
        main.parent.name for main in (ROOT / "services").glob("*/__main__.py") if main.parent.name != "common"
    }


def expected_services() -> set[str]:
    return discovered_services() | REQUIRED_SERVICES


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def command_words(command: object) -> list[str]:
    if isinstance(command, str):
        return command.split()
    if isinstance(command, list):
        return [str(word) for word in command]
    return []


def runs_module(command: object) -> str | None:
    """The module a compose ``command`` runs with ``python -m``, if any."""
    words = command_words(command)
    for i, word in enumerate(words[:-2]):
        if Path(word).name.startswith("python") and words[i + 1] == "-m":
            return words[i + 2]
    return None


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}
    return {key: "" if value is None else str(value) for key, value in env.items()}


def python_services(compose: dict) -> dict[str, dict]:
    """Compose services that run a ``services.<name>`` module."""
    result = {}
    for name, service in compose["services"].items():
        module = runs_module(service.get("command"))
        if module and module.startswith("services."):
            result[name] = service
    return result


# ---------------------------------------------------------------- helpers themselves


def test_runs_module_parses_list_and_string_commands():
    assert runs_module(["python", "-m", "services.api"]) == "services.api"
    assert runs_module("python -m services.ingest") == "services.ingest"
    assert runs_module(["/opt/venv/bin/python3", "-m", "services.x"]) == "services.x"
    assert runs_module(["uvicorn", "services.api:app"]) is None
    assert runs_module(None) is None


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_declares_infrastructure():
    services = load_compose()["services"]
    missing = INFRA - set(services)
    assert not missing, f"docker-compose.yml lacks infrastructure services: {sorted(missing)}"


def test_compose_runs_every_python_service():
    compose = load_compose()
    modules = {runs_module(service.get("command")): name for name, service in compose["services"].items()}
    for name in sorted(expected_services()):
        assert f"services.{name}" in modules, (
            f"no docker-compose.yml service runs `python -m services.{name}`"
        )
    for name in REQUIRED_SERVICES:
        assert name in compose["services"], f"docker-compose.yml has no `{name}` service"
        assert runs_module(compose["services"][name].get("command")) == f"services.{name}"


def test_compose_dependencies_are_declared():
    services = load_compose()["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        targets = list(depends_on) if isinstance(depends_on, (dict, list)) else []
        for target in targets:
            assert target in services, f"{name} depends on undeclared service {target!r}"


def test_compose_python_services_wait_for_healthy_infrastructure():
    compose = load_compose()
    services = compose["services"]
    for name, service in python_services(compose).items():
        depends_on = service.get("depends_on")
        assert isinstance(depends_on, dict), f"{name}: depends_on must use conditions"
        for infra in sorted(INFRA):
            assert infra in depends_on, f"{name} does not depend on {infra}"
            assert depends_on[infra].get("condition") == "service_healthy", (
                f"{name} does not wait for {infra} to be healthy"
            )
            assert "healthcheck" in services[infra], f"{infra} has no healthcheck"


def test_compose_builds_from_the_shared_dockerfile():
    assert DOCKERFILE.is_file()
    python = python_services(load_compose())
    assert python, "no Python service in docker-compose.yml"
    for name, service in python.items():
        build = service.get("build")
        assert isinstance(build, dict), f"{name}: build must name context and dockerfile"
        context = (ROOT / build.get("context", ".")).resolve()
        dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()
        assert dockerfile == DOCKERFILE.resolve(), f"{name} builds from {dockerfile}"
        assert dockerfile.is_file()


def test_compose_python_services_get_store_urls():
    for name, service in python_services(load_compose()).items():
        env = environment(service)
        for key in REQUIRED_ENV:
            assert env.get(key), f"{name} lacks {key}"
        assert env.get("DISTILLERY_HTTP_HOST") == "0.0.0.0", f"{name} binds to loopback only"


def test_compose_named_volumes_are_declared():
    compose = load_compose()
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name} mounts undeclared volume {source!r}"


def test_dockerfile_is_non_root_and_runs_a_service():
    text = DOCKERFILE.read_text()
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, re.M))
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), base)
        for base in re.findall(r"^FROM\s+(\S+)", text, re.M)
    ]
    assert bases and bases[-1] == "python:3.11-slim", bases
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert 'CMD ["python", "-m", "services.ingest"]' in text
    assert (ROOT / ".dockerignore").is_file()
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", ".distillery"):
        assert entry in ignored


# ---------------------------------------------------------------- Helm chart


def load_values() -> dict:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def test_chart_metadata_parses():
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "distillery"
    assert chart["version"]
    values = load_values()
    assert isinstance(values["services"], dict)
    assert values["trainer"]["enabled"] is False
    for store in ("kafka", "clickhouse", "postgres", "minio", "redis"):
        assert "url" in values[store], f"values.yaml lacks {store}.url"


def test_chart_deploys_every_python_service():
    values = load_values()
    for name in sorted(expected_services()):
        if name in JOB_SERVICES:
            assert name in values, f"values.yaml has no `{name}` section"
        else:
            assert name in values["services"], f"values.yaml `services:` lacks {name}"


def test_chart_templates_are_balanced():
    """A cheap structural check of the Go templates for machines without helm."""
    opener = re.compile(r"^(if|range|with|define|block)\b")
    for path in sorted((CHART_DIR / "templates").iterdir()):
        text = path.read_text()
        assert text.count("{{") == text.count("}}"), f"{path.name}: unbalanced braces"
        depth = 0
        for action in re.findall(r"\{\{-?\s*(.*?)\s*-?\}\}", text, re.S):
            if action.startswith("/*"):
                continue
            if opener.match(action):
                depth += 1
            elif re.match(r"^end\b", action):
                depth -= 1
                assert depth >= 0, f"{path.name}: `end` without an opening block"
        assert depth == 0, f"{path.name}: {depth} block(s) not closed"


def helm_binary() -> str:
    binary = shutil.which("helm")
    if binary is None:
        pytest.skip("helm is not installed; the chart is checked structurally only")
    return binary


def test_helm_lint():
    helm = helm_binary()
    result = subprocess.run(
        [helm, "lint", str(CHART_DIR), "--set", "trainer.enabled=true"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_helm_template_renders_every_service():
    helm = helm_binary()
    result = subprocess.run(
        [helm, "template", "distillery", str(CHART_DIR), "--set", "trainer.enabled=true"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in documents}
    for name in sorted(expected_services() - JOB_SERVICES):
        assert ("Deployment", f"distillery-{name}") in kinds
        assert ("Service", f"distillery-{name}") in kinds
    assert any(kind == "Job" for kind, _ in kinds)
    assert ("Secret", "distillery-secrets") in kinds
    assert ("ConfigMap", "distillery-config") in kinds
