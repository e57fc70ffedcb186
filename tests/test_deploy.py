"""Deployment files, checked for real: the Helm chart rendered and linted by Helm itself (the Helm v4
SDK embedded in ``helm-python-sdk``, offline), every rendered manifest validated against the
Kubernetes schemas (``kubernetes-validate``), ``docker-compose.yml`` validated against the Compose
specification schema (vendored in deploy/schemas/), and the one routing table
(helm/distillery/files/routes.yaml) served the same way by the Ingress and the compose gateway.
"""

from __future__ import annotations

import copy
import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import Chart
from helm_python import chart as helm_chart

from tests.helpers import CHART_DIR, KUBERNETES_VERSION

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT / "deploy" / "schemas" / "compose-spec.json"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
NGINX_CONF = ROOT / "deploy" / "gateway" / "nginx.conf"
DASHBOARD = ROOT / "deploy" / "grafana" / "distillery.json"
PRODUCTION_VALUES = CHART_DIR / "ci" / "production-values.yaml"
ROUTES = CHART_DIR / "files" / "routes.yaml"

INFRA = {"kafka", "clickhouse", "minio", "postgres", "redis"}
# Services that must be deployed whether or not their package exists yet.
REQUIRED_SERVICES = {"api", "ingest", "router"}
# Settings every Distillery container needs (services/common/settings.py, prefix DISTILLERY_).
REQUIRED_ENV = (
    "DISTILLERY_KAFKA_URL",
    "DISTILLERY_CLICKHOUSE_URL",
    "DISTILLERY_DATABASE_URL",
    "DISTILLERY_BLOB_URL",
)
# The trainer is a launcher Deployment plus GPU Jobs, configured under the top-level `trainer:`.
TRAINER = "trainer"
STATELESS_FRONT_DOORS = ("api", "ingest", "router")
# Services that are plain servers, not the platform (no /readyz or /metrics): vLLM-style /health.
PLAIN_SERVERS = {"serving"}
# Custom resources kubernetes-validate has no schema for; checked field by field instead.
CUSTOM_KINDS = {"ServiceMonitor"}


def discovered_services() -> set[str]:
    """Names of service packages runnable with ``python -m services.<name>``."""
    return {
        main.parent.name for main in (ROOT / "services").glob("*/__main__.py") if main.parent.name != "common"
    }


def expected_services() -> set[str]:
    return discovered_services() | REQUIRED_SERVICES


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def load_routes() -> list[dict[str, str]]:
    return yaml.safe_load(ROUTES.read_text())


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


def test_runs_module_parses_list_and_string_commands():
    assert runs_module(["python", "-m", "services.api"]) == "services.api"
    assert runs_module("python -m services.ingest") == "services.ingest"
    assert runs_module(["/opt/venv/bin/python3", "-m", "services.x"]) == "services.x"
    assert runs_module(["uvicorn", "services.api:app"]) is None
    assert runs_module(None) is None


# ---------------------------------------------------------------- docker-compose.yml


def compose_validator() -> jsonschema.Draft201909Validator:
    return jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text()))


def test_compose_file_follows_the_compose_specification():
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in compose_validator().iter_errors(load_compose())
    ]
    assert not errors, errors


def test_compose_schema_check_catches_mistakes():
    """The schema check is real: typical mistakes in a service are rejected."""
    validator = compose_validator()
    for mistake in (
        {"image": 5},
        {"ports": "8080:8080"},
        {"depends_on": {"kafka": {"condition": "when_ready"}}},
        {"healtcheck": {"test": ["CMD", "true"]}},
    ):
        broken = copy.deepcopy(load_compose())
        broken["services"]["api"].update(mistake)
        assert list(validator.iter_errors(broken)), f"accepted {mistake}"


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
        assert runs_module(compose["services"][name].get("command")) == f"services.{name}"


def test_compose_dependencies_are_declared():
    services = load_compose()["services"]
    for name, service in services.items():
        for target in service.get("depends_on") or {}:
            assert target in services, f"{name} depends on undeclared service {target!r}"


def test_compose_python_services_wait_for_healthy_infrastructure():
    compose = load_compose()
    services = compose["services"]
    for name, service in python_services(compose).items():
        depends_on = service.get("depends_on")
        assert isinstance(depends_on, dict), f"{name}: depends_on must use conditions"
        for infra in sorted(INFRA):
            assert depends_on[infra].get("condition") == "service_healthy", (
                f"{name} does not wait for {infra}"
            )
            assert "healthcheck" in services[infra], f"{infra} has no healthcheck"
        probe = " ".join(command_words(service["healthcheck"]["test"]))
        assert ("/health" if name in PLAIN_SERVERS else "/readyz") in probe, name


def test_compose_builds_from_the_shared_dockerfile():
    python = python_services(load_compose())
    assert python, "no Python service in docker-compose.yml"
    for name, service in python.items():
        build = service.get("build")
        assert isinstance(build, dict), f"{name}: build must name context and dockerfile"
        context = (ROOT / build.get("context", ".")).resolve()
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE.resolve()


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


def test_compose_gateway_is_the_only_published_port():
    services = load_compose()["services"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"gateway"}
    gateway = services["gateway"]
    assert re.fullmatch(r"nginx:[\w.-]+", gateway["image"]), "the gateway is the official nginx image"
    assert "./deploy/gateway/nginx.conf:/etc/nginx/nginx.conf:ro" in gateway["volumes"]
    for owner in {route["service"] for route in load_routes()}:
        assert gateway["depends_on"][owner]["condition"] == "service_healthy"


def nginx_locations() -> list[tuple[str, str]]:
    text = NGINX_CONF.read_text()
    table = text.split("# routes: begin", 1)[1].split("# routes: end", 1)[0]
    return re.findall(r"location\s+(/\S*)\s*\{\s*proxy_pass\s+http://(\w+);\s*\}", table)


def test_gateway_routes_are_the_routing_table():
    assert nginx_locations() == [(route["prefix"], route["service"]) for route in load_routes()]
    text = NGINX_CONF.read_text()
    compose = load_compose()["services"]
    for _, upstream in nginx_locations():
        assert re.search(rf"upstream {upstream} \{{\s*server {upstream}:8080;", text), upstream
        assert upstream in compose


def test_gateway_streams_unbuffered_and_passes_the_body_limit():
    text = NGINX_CONF.read_text()
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;", "proxy_http_version 1.1;"):
        assert directive in text
    limit = re.search(r"client_max_body_size (\d+)([kmg]?);", text)
    assert limit, "client_max_body_size not set"
    size = int(limit.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[limit.group(2)]
    values = load_values()
    assert size >= max(values["maxBodyBytes"], values["maxUploadBytes"])
    assert int(re.search(r"proxy_read_timeout (\d+)s;", text).group(1)) >= 300  # long streams


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
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", ".distillery"):
        assert entry in ignored


def test_grafana_dashboard_covers_the_named_series():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["panels"]
    expressions = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )
    for series in (
        "distillery_http_requests_total",
        "distillery_http_request_duration_seconds_bucket",
        "distillery_router_upstream_duration_seconds_bucket",
        "distillery_router_upstream_retries_total",
        "distillery_router_fallbacks_total",
        "distillery_router_cache_lookups_total",
        "distillery_router_tokens_total",
        "distillery_router_cost_usd_total",
        "distillery_ingest_logs_accepted_total",
        "distillery_ingest_logs_written_total",
        "distillery_ingest_logs_dead_lettered_total",
        "distillery_kafka_consumer_lag",
        "distillery_ingest_end_to_end_lag_seconds_bucket",
        "distillery_training_jobs_total",
        "distillery_training_tokens_per_second",
        "distillery_training_loss",
        "distillery_eval_rows_total",
        "distillery_judge_judgements_total",
    ):
        assert series in expressions, f"no dashboard panel shows {series}"


# ---------------------------------------------------------------- Helm chart


def load_values() -> dict:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def production_values() -> dict:
    return yaml.safe_load(PRODUCTION_VALUES.read_text())


@cache
def chart() -> Chart:
    return Chart.load(CHART_DIR)


def render(values: dict | None = None) -> list[dict[str, Any]]:
    """Every manifest Helm renders for an install of release ``distillery``."""
    manifests = chart().render(values=values, name="distillery", namespace="distillery", is_install=True)
    documents = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        documents += [doc for doc in yaml.safe_load_all(text) if doc]
    return documents


@cache
def rendered_default() -> tuple[dict, ...]:
    return tuple(render())


@cache
def rendered_production() -> tuple[dict, ...]:
    return tuple(render(production_values()))


def by_kind(documents: tuple[dict, ...], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


def test_chart_metadata_parses():
    meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "distillery" and meta["version"]
    values = load_values()
    assert values["trainer"]["enabled"] is False
    for store in ("kafka", "clickhouse", "postgres", "minio", "redis"):
        assert "url" in values[store], f"values.yaml lacks {store}.url"


def test_chart_deploys_every_python_service():
    values = load_values()
    for name in sorted(expected_services()):
        if name == TRAINER:
            assert TRAINER in values
        else:
            assert name in values["services"], f"values.yaml `services:` lacks {name}"


@pytest.mark.parametrize("values_file", [None, PRODUCTION_VALUES], ids=["default", "production"])
def test_helm_lint_passes(values_file: Path | None) -> None:
    values = yaml.safe_load(values_file.read_text()) if values_file else None
    report = helm_chart.lint(CHART_DIR, values, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2 and "icon" not in m["error"]]
    assert not report["errors"] and not problems, report


def test_values_schema_accepts_the_shipped_values_and_rejects_mistakes():
    chart().validate_schema(None)
    chart().validate_schema(production_values())
    for mistake, where in (
        ({"services": {"api": {"replicas": "two"}}}, "replicas"),
        ({"kafka": {"url": "http://kafka"}}, "kafka"),
        ({"ingres": {"enabled": True}}, "ingres"),
        ({"secretKey": "too-short"}, "secretKey"),
        ({"trainer": {"job": {"modelStore": {"mountPath": "relative/path"}}}}, "mountPath"),
    ):
        with pytest.raises(Exception, match=where):
            chart().validate_schema(mistake)
        with pytest.raises(Exception, match=where):
            render(mistake)  # an install with such values fails before anything is applied


@pytest.mark.parametrize("rendered", [rendered_default, rendered_production], ids=["default", "production"])
def test_every_manifest_is_valid_kubernetes(rendered) -> None:
    documents = rendered()
    assert documents
    for doc in documents:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_schema_validation_is_real() -> None:
    deployment = copy.deepcopy(by_kind(rendered_default(), "Deployment")["distillery-api"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8080]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_default_render_deploys_every_service_with_probes_and_a_locked_down_pod() -> None:
    documents = rendered_default()
    deployments, services = by_kind(documents, "Deployment"), by_kind(documents, "Service")
    enabled = {name for name, svc in load_values()["services"].items() if svc.get("enabled", True)}
    assert {f"distillery-{name}" for name in enabled} == set(deployments)
    assert set(services) == set(deployments)
    assert ("Secret", "distillery-secrets") in {(d["kind"], d["metadata"]["name"]) for d in documents}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        component = name.removeprefix("distillery-")
        assert container["command"] == ["python", "-m", f"services.{component}"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
        assert not security["allowPrivilegeEscalation"] and security["capabilities"]["drop"] == ["ALL"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        sources = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
        assert sources == {"distillery-config", "distillery-secrets"}
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/var/lib/distillery"}
    pdbs = by_kind(documents, "PodDisruptionBudget")
    assert set(pdbs) == {f"distillery-{name}" for name in STATELESS_FRONT_DOORS}
    assert not by_kind(documents, "HorizontalPodAutoscaler")  # optional, off by default
    assert not by_kind(documents, "ServiceMonitor") and not by_kind(documents, "Role")


def test_default_secret_key_is_generated_and_valid() -> None:
    secret = by_kind(rendered_default(), "Secret")["distillery-secrets"]
    key = secret["stringData"]["DISTILLERY_SECRET_KEY"]
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", key)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_ingress_routes_every_path_to_its_owner() -> None:
    (ingress,) = by_kind(rendered_production(), "Ingress").values()
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "distillery.example.com"
    paths = [(p["path"], p["backend"]["service"]["name"]) for p in rule["http"]["paths"]]
    assert paths == [(r["prefix"], f"distillery-{r['service']}") for r in load_routes()]
    assert all(p["pathType"] == "Prefix" for p in rule["http"]["paths"])
    services = by_kind(rendered_production(), "Service")
    assert {name for _, name in paths} <= set(services)
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert annotations["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) >= load_values()["maxUploadBytes"]
    assert ingress["spec"]["tls"][0]["secretName"] == "distillery-tls"


def test_ingress_skips_routes_of_disabled_services() -> None:
    documents = render({"services": {"judge": {"enabled": False}}})
    (ingress,) = by_kind(tuple(documents), "Ingress").values()
    backends = {p["backend"]["service"]["name"] for p in ingress["spec"]["rules"][0]["http"]["paths"]}
    assert "distillery-judge" not in backends and "distillery-api" in backends


def test_migrations_run_as_a_pre_install_and_pre_upgrade_hook() -> None:
    for documents, secret in ((rendered_default(), "distillery-migrations"), (rendered_production(), None)):
        job = by_kind(documents, "Job")["distillery-migrations"]
        assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", "services.api.migrations"]
        reference = container["env"][0]["valueFrom"]["secretKeyRef"]
        assert reference["key"] == "DISTILLERY_DATABASE_URL"
        assert reference["name"] == (secret or "distillery-secrets")
        if secret:  # the chart's own Secret does not exist yet when pre-install hooks run
            hook_secret = by_kind(documents, "Secret")[secret]
            assert hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"] == "-10"


def test_production_values_use_the_operators_secret_autoscale_and_monitor() -> None:
    documents = rendered_production()
    assert "distillery-secrets" not in by_kind(documents, "Secret")  # existingSecret: not rendered
    hpas = by_kind(documents, "HorizontalPodAutoscaler")
    assert set(hpas) == {f"distillery-{name}" for name in STATELESS_FRONT_DOORS}
    deployments = by_kind(documents, "Deployment")
    for name in hpas:
        assert "replicas" not in deployments[name]["spec"], "the HPA owns the replica count"
    (monitor,) = by_kind(documents, "ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    config = by_kind(documents, "ConfigMap")["distillery-config"]["data"]
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://otel-collector")
    assert config["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    for deployment in deployments.values():
        assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [
            {"name": "registry-credentials"}
        ]
    assert not any("password" in json.dumps(doc).lower() for doc in by_kind(documents, "ConfigMap").values())


def test_trainer_launcher_may_only_manage_jobs_and_read_logs() -> None:
    documents = rendered_production()
    (role,) = by_kind(documents, "Role").values()
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("batch",), ("jobs",)): {"create", "get", "list", "watch", "delete"},
        (("batch",), ("jobs/status",)): {"get"},
        (("",), ("pods/log",)): {"get"},
    }
    (binding,) = by_kind(documents, "RoleBinding").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    launcher = by_kind(documents, "Deployment")["distillery-trainer"]["spec"]["template"]["spec"]
    assert launcher["serviceAccountName"] == binding["subjects"][0]["name"] == "distillery-trainer"
    assert binding["subjects"][0]["namespace"] == "distillery"
    assert "nvidia.com/gpu" not in json.dumps(launcher["containers"][0]["resources"])
    # Off by default: no launcher, no RBAC.
    assert "distillery-trainer" not in by_kind(rendered_default(), "Deployment")


def launcher_settings(documents: tuple[dict, ...], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The trainer launcher's Settings, read from the environment the rendered pod would have."""
    from services.common.settings import Settings

    (container,) = by_kind(documents, "Deployment")["distillery-trainer"]["spec"]["template"]["spec"][
        "containers"
    ]
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = "distillery"
    config = by_kind(documents, "ConfigMap")["distillery-config"]["data"]
    for name in [k for k in os.environ if k.startswith("DISTILLERY_")]:
        monkeypatch.delenv(name)
    for name, value in {**config, **env}.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_trainer_jobs_built_from_the_chart_values_are_valid_gpu_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's own code (services/trainer/k8s.py) builds a Job from the rendered settings;
    that Job is valid Kubernetes, on a GPU node, with the model-store claim and the chart's Secret."""
    k8s_jobs = pytest.importorskip("services.trainer.k8s")
    from kubernetes.client import ApiClient

    from services.common.events import TrainingRequest

    settings = launcher_settings(rendered_production(), monkeypatch)
    assert settings.trainer_backend == "kubernetes" and settings.trainer_k8s_namespace == "distillery"
    request = TrainingRequest(
        request_id="ftjob-1:0",
        job_id="ftjob-1",
        project_id="proj-1",
        model_slug="my-model",
        base_model="distillery/tiny-chat",
    )
    job = ApiClient().sanitize_for_serialization(k8s_jobs.job_manifest(settings, request, 1))
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/distillery-cuda:0.1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["memory"] == "96Gi"
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-store"]["persistentVolumeClaim"]["claimName"] == "distillery-model-store"
    assert container["envFrom"] == [{"secretRef": {"name": "distillery-secrets"}}]


def test_local_model_server_behind_a_flag() -> None:
    """services.serving is a plain model server: its own health path, no /metrics to scrape."""
    documents = tuple(render({"services": {"serving": {"enabled": True}}, **scraped()}))
    for doc in documents:
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    (container,) = by_kind(documents, "Deployment")["distillery-serving"]["spec"]["template"]["spec"][
        "containers"
    ]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    config = by_kind(documents, "ConfigMap")["distillery-config"]["data"]
    assert config["DISTILLERY_MODEL_SERVER_URL"] == "http://distillery-serving:8080"
    (monitor,) = by_kind(documents, "ServiceMonitor").values()
    selected = monitor["spec"]["selector"]["matchLabels"]
    services = by_kind(documents, "Service")
    scraped_services = {n for n, s in services.items() if selected.items() <= s["metadata"]["labels"].items()}
    assert "distillery-serving" not in scraped_services and "distillery-api" in scraped_services
    assert (
        "DISTILLERY_MODEL_SERVER_URL"
        not in by_kind(rendered_default(), "ConfigMap")["distillery-config"]["data"]
    )


def scraped() -> dict:
    return {"metrics": {"serviceMonitor": {"enabled": True}}}


def test_production_values_serve_fine_tuned_models_with_vllm() -> None:
    documents = rendered_production()
    deployments = by_kind(documents, "Deployment")
    vllm = [
        d for d in deployments.values() if d["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"
    ]
    assert len(vllm) == 1
    server = vllm[0]["spec"]["template"]["spec"]["containers"][0]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    servers = json.loads(
        by_kind(documents, "ConfigMap")["distillery-config"]["data"]["DISTILLERY_VLLM_SERVERS"]
    )
    assert set(servers) == {"meta-llama/Meta-Llama-3.1-8B-Instruct"}
    assert not any(
        d["metadata"]["labels"].get("app.kubernetes.io/component") == "vllm" for d in rendered_default()
    )
