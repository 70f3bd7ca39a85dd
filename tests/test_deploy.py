"""The deployment files: valid for their tools, true to the service, and runnable.

* Schemas, offline and strict (an unknown field fails): docker-compose.yml against
  the Compose specification's JSON schema as vendored by ``check-jsonschema``;
  deploy/k8s/ against Kubernetes' own schemas as bundled by ``kubernetes-validate``.
  The Prometheus Operator's ServiceMonitor and PrometheusRule have no schema in any
  package here: they get a structural schema of our own, and the rules promtool.
* Agreement: every SYNCLOCK_* variable set anywhere is one that service/config.py
  reads, and the values parse; health checks name real routes; the image runs
  ``synclock serve``; grace periods outlast the shutdown timeout; ports, secrets,
  Prometheus targets and Grafana mounts line up with the compose services.
* The compose process graph, natively (no container engine here): the same
  commands and environment, hosts rewritten to loopback servers started for the
  test, migrate once, two replicas, one sync, a 429 from the other replica.

Without a validator package (or, for the process graph, redis-server or pgserver)
these tests skip, unless SYNCLOCK_REQUIRE_BACKENDS=1 turns the skip into a failure.
"""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.config import Settings, parse_duration_s
from tests import deployfiles as df
from tests import native_compose as nc
from tests.deploy_schemas import CUSTOM_RESOURCE_SCHEMAS, compose_schema
from tests.replicas import GatedUpstream, priced
from tests.servers import ThrowawayPostgres, missing

MIN_KUBERNETES = "1.29.0"
IMAGE_COMMAND = ["synclock", "serve", "--host", "0.0.0.0", "--port", "8080"]
REPLICAS = ("synclock-1", "synclock-2")
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "AUTH")


def need(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{package} is not installed (pip install -e '.[dev]')"
        missing(message)


def need_binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed"
        missing(message)
    return found


def compose_values(**overrides: str) -> dict[str, str]:
    return {**df.read_env_file(), **overrides}


def schema_errors(schema: dict[str, Any], document: Any) -> list[str]:
    jsonschema = need("jsonschema", "jsonschema")
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


# -- schemas ----------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    need("check_jsonschema", "check-jsonschema")
    schema = compose_schema()
    assert schema_errors(schema, df.load_compose()) == []
    assert schema_errors(schema, df.load_compose(compose_values())) == []

    # The schema is strict where it matters: a misspelt key or condition fails.
    broken = df.load_compose(compose_values())
    broken["services"]["synclock-1"]["helthcheck"] = broken["services"]["synclock-1"].pop(
        "healthcheck"
    )
    broken["services"]["synclock-2"]["depends_on"]["migrate"]["condition"] = "completed"
    errors = schema_errors(schema, broken)
    assert any("helthcheck" in error for error in errors), errors
    assert any("depends_on" in error for error in errors), errors


def kubernetes_versions(utils: ModuleType) -> list[str]:
    return sorted({MIN_KUBERNETES, utils.latest_version()})


def test_k8s_manifests_are_valid_against_kubernetes_schemas() -> None:
    utils = need("kubernetes_validate.utils", "kubernetes-validate")
    validated = []
    for name, documents in df.k8s_documents().items():
        for document in documents:
            group = document["apiVersion"].split("/")[0]
            if group in ("monitoring.coreos.com", "kustomize.config.k8s.io"):
                continue  # no schema in the package; see the structural test
            for version in kubernetes_versions(utils):
                try:
                    utils.validate(document, version, strict=True)
                except utils.ValidationError as exc:
                    path = ".".join(map(str, exc.path))
                    pytest.fail(f"{name} ({document['kind']}) on {version}: {path}: {exc.message}")
            validated.append(document["kind"])
    assert sorted(validated) == [
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    ]

    # Strict means strict: a misspelt probe and an unquoted "on" both fail.
    deployment = copy.deepcopy(df.k8s_by_kind()["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    configmap = copy.deepcopy(df.k8s_by_kind()["ConfigMap"])
    configmap["data"]["SYNCLOCK_SCHEDULER"] = True
    for broken in (deployment, configmap):
        with pytest.raises(utils.ValidationError):
            utils.validate(broken, utils.latest_version(), strict=True)


def test_custom_resources_and_the_kustomization_are_well_formed() -> None:
    by_kind = df.k8s_by_kind()
    for kind, schema in CUSTOM_RESOURCE_SCHEMAS.items():
        assert schema_errors(schema, by_kind[kind]) == [], kind

    kustomization = by_kind["Kustomization"]
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    manifests = set(df.k8s_documents()) - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    images = {image["name"] for image in kustomization["images"]}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    assert {c["image"] for c in pod["containers"] + pod["initContainers"]} == images


def test_prometheusrule_embeds_the_rule_files() -> None:
    groups = []
    for path in sorted((df.PROMETHEUS / "rules").glob("*.y*ml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    assert groups, "deploy/prometheus/rules/ has no rule file"
    embedded = df.k8s_by_kind()["PrometheusRule"]["spec"]["groups"]
    assert embedded == groups, (
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/rules/: "
        "run python scripts/render_prometheusrule.py"
    )


def test_prometheusrule_passes_promtool(tmp_path: Path) -> None:
    promtool = need_binary("promtool")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(df.k8s_by_kind()["PrometheusRule"]["spec"]))
    checked = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- agreement with the service ---------------------------------------------------


def final_stage() -> df.Stage:
    stages = df.dockerfile_stages()
    assert len(stages) >= 2, "the Dockerfile should be multi-stage"
    return stages[-1]


def replica_environment(service: str, values: dict[str, str]) -> dict[str, str]:
    """What a compose replica's process sees: the image's ENV, then compose's."""
    compose = df.load_compose(values)
    return {**final_stage().env(), **df.environment(compose["services"][service])}


def k8s_environment() -> dict[str, str]:
    by_kind = df.k8s_by_kind()
    env = {**by_kind["ConfigMap"]["data"], **by_kind["Secret"]["stringData"]}
    container = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "pod-name-from-the-downward-api")
    return env


def test_every_synclock_variable_set_is_one_the_service_reads() -> None:
    read = df.config_variables()
    assert "SYNCLOCK_REDIS_URL" in read and "SYNCLOCK_SHUTDOWN_TIMEOUT" in read

    set_by: dict[str, set[str]] = {
        "Dockerfile": set(final_stage().env()),
        ".env.example": set(df.read_env_file()),
        "docker-compose.yml": set(),
        "deploy/k8s": set(k8s_environment()),
    }
    for service in df.load_compose()["services"].values():
        set_by["docker-compose.yml"] |= set(df.environment(service))
    pod = df.k8s_by_kind()["Deployment"]["spec"]["template"]["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        set_by["deploy/k8s"] |= {variable["name"] for variable in container.get("env", [])}
    for origin, names in set_by.items():
        unknown = {n for n in names if n.startswith("SYNCLOCK_")} - read
        assert not unknown, f"{origin} sets variables service/config.py never reads: {unknown}"

    # .env.example names every variable compose needs, and nothing it ignores.
    referenced = df.references(df.COMPOSE.read_text())
    example = df.read_env_file()
    missing = {name for name, has_default in referenced.items() if not has_default} - set(example)
    assert not missing, f".env.example lacks {missing}"
    assert set(example) <= set(referenced), set(example) - set(referenced)


def test_compose_and_k8s_settings_parse_and_outlast_the_shutdown_timeout() -> None:
    compose = df.load_compose(compose_values())
    for name in REPLICAS:
        settings = Settings.from_env(replica_environment(name, compose_values()))
        assert not settings.embedded and settings.admin_tokens
        assert settings.instance == name
        grace_s = parse_duration_s(
            "stop_grace_period", compose["services"][name]["stop_grace_period"], low_s=0, high_s=600
        )
        assert grace_s > settings.shutdown_timeout_s, name
    migrate = Settings.from_env(replica_environment("migrate", compose_values()))
    assert migrate.database_url == settings.database_url

    settings = Settings.from_env(k8s_environment())
    assert not settings.embedded and settings.admin_tokens
    pod = df.k8s_by_kind()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    pause_s = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    assert pod["terminationGracePeriodSeconds"] > pause_s + settings.shutdown_timeout_s
    assert df.k8s_by_kind()["Deployment"]["spec"]["replicas"] >= 2


def routes() -> set[tuple[str, str]]:
    from service.http.routes import routes as table

    return {(route.method, route.path) for route in table}  # type: ignore[attr-defined]


def test_health_checks_and_scrapes_use_routes_the_service_has() -> None:
    have = routes()
    assert ("GET", "/healthz") in have and ("GET", "/readyz") in have

    options, command = final_stage().healthcheck()
    assert command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:8080/readyz" in command[2]
    timing = {key.replace("-", "_"): value for key, value in options.items()}
    compose = df.load_compose()
    for name in REPLICAS:
        check = compose["services"][name]["healthcheck"]
        assert check["test"] == ["CMD", *command], name
        assert {key: str(check[key]) for key in timing} == timing, name

    container = df.k8s_by_kind()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Liveness must never depend on Redis or Postgres: /healthz does not touch them.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert port_names[container[probe]["httpGet"]["port"]] == 8080

    monitor = df.k8s_by_kind()["ServiceMonitor"]["spec"]["endpoints"][0]
    assert ("GET", monitor["path"]) in have
    service_ports = {p["name"] for p in df.k8s_by_kind()["Service"]["spec"]["ports"]}
    assert monitor["port"] in service_ports


def test_the_image_runs_synclock_serve_as_pid_1_without_root() -> None:
    stage = final_stage()
    assert stage.base.startswith("python:3.11-slim"), stage.base
    assert stage.exec_form("ENTRYPOINT") + stage.exec_form("CMD") == IMAGE_COMMAND
    scripts = tomllib.loads((df.ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["synclock"] == "service.cli:main"
    assert stage.last("EXPOSE") == "8080"
    uid, _, _gid = (stage.last("USER") or "").partition(":")
    assert uid.isdigit() and int(uid) > 0, "USER should be a numeric non-root uid"
    assert stage.env()["SYNCLOCK_DATA_DIR"] in (stage.last("VOLUME") or "")

    pod = df.k8s_by_kind()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert ["synclock", *pod["containers"][0]["args"]] == IMAGE_COMMAND
    compose = df.load_compose()
    assert pod["initContainers"][0]["args"] == compose["services"]["migrate"]["command"]
    for container in pod["containers"] + pod["initContainers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        assert stage.env()["SYNCLOCK_DATA_DIR"] in mounts, container["name"]

    # The subcommands exist in the CLI the image runs.
    answer = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, timeout=30
    )
    assert "serve" in answer.stdout and "migrate" in answer.stdout


def test_no_secret_is_committed_or_baked_in() -> None:
    for key, value in df.read_env_file().items():
        if any(word in key for word in SECRET_WORDS):
            assert value.startswith("change-me"), f".env.example {key} is not a placeholder"
    for name, service in df.load_compose()["services"].items():
        for key, value in df.environment(service).items():
            secretive = any(word in key for word in SECRET_WORDS)
            if secretive or urlsplit(value).password:
                assert "${" in value, f"{name}: {key} must come from .env"
    for key, value in df.k8s_by_kind()["Secret"]["stringData"].items():
        assert "REPLACE_WITH" in value, f"secret.example.yaml {key} is not a placeholder"

    for stage in df.dockerfile_stages():
        names = set(stage.env()) | {args.partition("=")[0] for args in stage.all("ARG")}
        baked = {name for name in names if any(word in name for word in SECRET_WORDS)}
        assert not baked, f"the Dockerfile bakes in {baked}"

    ignore = [
        line.strip()
        for line in df.DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore should allow-list the build context"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied: set[str] = set()
    for stage in df.dockerfile_stages():
        for args in stage.all("COPY"):
            if "--from" not in args:
                copied |= {source.rstrip("/") for source in args.split()[:-1]}
    assert copied <= allowed, copied - allowed
    assert ".env" in (df.ROOT / ".gitignore").read_text().split()


def test_compose_wiring_ports_and_the_monitoring_mounts() -> None:
    compose = df.load_compose(compose_values())
    services = compose["services"]
    order = df.start_order(services)
    for name in REPLICAS:
        assert df.depends_on(services[name]) == {
            "migrate": "service_completed_successfully",
            "redis": "service_healthy",
            "postgres": "service_healthy",
        }
        assert order.index("migrate") < order.index(name)
    for name, service in services.items():
        for dependency, condition in df.depends_on(service).items():
            if condition == "service_healthy":
                assert "test" in services[dependency].get("healthcheck", {}), dependency
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    instances = [df.environment(services[name])["SYNCLOCK_INSTANCE"] for name in REPLICAS]
    assert sorted(instances) == sorted(REPLICAS)

    # deploy/prometheus/prometheus.yml scrapes the replicas by service name.
    mounts = dict(v.split(":")[:2][::-1] for v in services["prometheus"]["volumes"])
    assert mounts["/etc/prometheus"] == "./deploy/prometheus"
    config = yaml.safe_load((df.PROMETHEUS / "prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert targets == {f"{name}:8080" for name in REPLICAS}, targets
    for rule_file in config.get("rule_files", []):
        assert list(df.PROMETHEUS.glob(rule_file)), rule_file

    # Grafana: the datasource reaches the prometheus service; the dashboard
    # provider's folder is where compose mounts grafana/dashboards.
    mounts = dict(v.split(":")[:2][::-1] for v in services["grafana"]["volumes"])
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provisioning = df.GRAFANA / "provisioning"
    for path in (provisioning / "datasources").glob("*.y*ml"):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            assert urlsplit(source["url"]).netloc == "prometheus:9090", source["url"]
    for path in (provisioning / "dashboards").glob("*.y*ml"):
        for provider in yaml.safe_load(path.read_text())["providers"]:
            assert mounts[provider["options"]["path"]] == "./grafana/dashboards"


# -- the process graph, natively --------------------------------------------------


def test_compose_process_graph_runs_natively(tmp_path: Path) -> None:
    need("pgserver", "pgserver")
    redis_server = need_binary("redis-server")
    need_binary("redis-cli")
    upstream = GatedUpstream()
    upstream.default = "gate"  # the sync holds its lease until the test opens the gate
    upstream.payload = priced("0.000002", "acme/model-a", "acme/model-b")
    values = compose_values(SYNCLOCK_SOURCES=f"genai-prices,gate={upstream.url}")
    services = df.load_compose(values)["services"]
    stage = final_stage()
    order = [n for n in df.start_order(services) if n in ("redis", "postgres", "migrate")]
    assert order.index("postgres") < order.index("migrate")

    redis: subprocess.Popen[bytes] | None = None
    postgres: ThrowawayPostgres | None = None
    replicas: list[nc.ComposeReplica] = []
    try:
        redis, redis_port = nc.start_redis(services["redis"], redis_server, tmp_path / "redis")
        postgres = nc.start_postgres(services["postgres"])
        nc.wait_redis_healthy(services["redis"], redis_port)
        endpoints = {"redis": redis_port, "postgres": postgres.port}

        def process_env(name: str) -> dict[str, str]:
            env = nc.rewrite_hosts(replica_environment(name, values), endpoints)
            env["SYNCLOCK_DATA_DIR"] = str(nc.data_dir(name, services[name], tmp_path))
            for key, value in env.items():
                host = urlsplit(value).hostname if "://" in value else None
                assert host in (None, "127.0.0.1"), f"{name}: {key} still points at {host}"
            return env

        # The one-shot migrate, before any replica.
        entrypoint, default_cmd = stage.exec_form("ENTRYPOINT"), stage.exec_form("CMD")
        migrated = subprocess.run(
            nc.native_argv(entrypoint + services["migrate"]["command"]),
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("SYNCLOCK_")},
                **process_env("migrate"),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert migrated.stdout.startswith("applied: "), migrated.stdout

        for name in REPLICAS:
            argv = nc.native_argv(entrypoint + services[name].get("command", default_cmd))
            replicas.append(nc.ComposeReplica(name, argv, process_env(name), tmp_path).start())
        for replica in replicas:
            replica.wait_ready(timeout_s=30)
            test = services[replica.name]["healthcheck"]["test"]
            assert nc.run_healthcheck(test, replica.port) == 0, replica.output()

        # One trigger is granted; the other replica answers 429 naming the holder.
        token = values["SYNCLOCK_ADMIN_TOKENS"].split(",")[0]
        first, second = replicas
        started = nc.grant(first, upstream, token)
        status, headers, body = nc.request("POST", second.url + nc.TRIGGER, token)
        assert status == 429, body
        assert int(headers["Retry-After"]) >= 1
        assert body["holder"]["owner"] == first.name
        assert body["running_run_id"] == started["run_id"]

        upstream.gate.set()
        deadline = time.monotonic() + 30
        run_url = f"{second.url}/admin/pricing/sync/runs/{started['run_id']}"
        while (run := nc.request("GET", run_url, token)[2])["status"] == "running":
            assert time.monotonic() < deadline, run
            time.sleep(0.1)
        assert run["status"] == "succeeded", run
        assert run["fence"] == started["fence"]
        assert {s["source"] for s in run["sources"]} == {"genai-prices", "gate"}

        # With Redis gone the image's health check fails, as it should.
        redis.kill()
        redis.wait(timeout=10)
        test = services[first.name]["healthcheck"]["test"]
        assert nc.run_healthcheck(test, first.port) != 0

        # SIGTERM: each replica exits 0 within compose's stop_grace_period.
        for replica in replicas:
            period = services[replica.name]["stop_grace_period"]
            grace_s = parse_duration_s("stop_grace_period", period, low_s=0, high_s=600)
            replica.send(signal.SIGTERM)
            assert replica.wait_exit(timeout_s=grace_s) == 0, replica.output()
    finally:
        for replica in replicas:
            replica.stop(signal.SIGKILL, timeout_s=10)
        if redis is not None and redis.poll() is None:
            redis.kill()
            redis.wait(timeout=10)
        if postgres is not None:
            postgres.remove()
        upstream.close()
