"""The deployment files against their tools' schemas, offline and strict.

An unknown field fails: docker-compose.yml against the Compose specification's
JSON schema as vendored by ``check-jsonschema``; deploy/k8s/ against Kubernetes'
own schemas as bundled by ``kubernetes-validate``. The Prometheus Operator's
ServiceMonitor and PrometheusRule have no schema in any package here: they get a
structural schema of our own, and the rules promtool.

Without a validator package (or promtool) these tests skip, unless
SYNCLOCK_REQUIRE_BACKENDS=1 turns the skip into a failure.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests import deployfiles as df
from tests.deploy_helpers import compose_values, need, need_binary
from tests.deploy_schemas import CUSTOM_RESOURCE_SCHEMAS, compose_schema

MIN_KUBERNETES = "1.29.0"


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
