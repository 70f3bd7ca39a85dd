"""The deployment files agree with the service they deploy.

Every SYNCLOCK_* variable set anywhere is one that service/config.py reads, and
the values parse; health checks name real routes; the image runs ``synclock
serve``; grace periods outlast the shutdown timeout; ports, secrets, Prometheus
targets and Grafana mounts line up with the compose services. These tests read
the files and start no server.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from urllib.parse import urlsplit

import yaml

from service.cli import CONNECTION_DRAIN_S
from service.config import Settings, parse_duration_s
from tests import deployfiles as df
from tests.deploy_helpers import REPLICAS, compose_values, final_stage, replica_environment

IMAGE_COMMAND = ["synclock", "serve", "--host", "0.0.0.0", "--port", "8080"]
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "AUTH")


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
        # The sync's grace period, then open requests' drain budget.
        assert grace_s > settings.shutdown_timeout_s + CONNECTION_DRAIN_S, name
    migrate = Settings.from_env(replica_environment("migrate", compose_values()))
    assert migrate.database_url == settings.database_url

    settings = Settings.from_env(k8s_environment())
    assert not settings.embedded and settings.admin_tokens
    pod = df.k8s_by_kind()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    pause_s = float(pre_stop[1]) if pre_stop[0] == "sleep" else 0.0
    stop_s = pause_s + settings.shutdown_timeout_s + CONNECTION_DRAIN_S
    assert pod["terminationGracePeriodSeconds"] > stop_s
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
