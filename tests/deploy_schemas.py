"""Schemas the deployment tests validate against, and where each comes from.

* The Compose specification's JSON schema: vendored by the PyPI package
  ``check-jsonschema`` (Apache-2.0) from the compose-spec project (Apache-2.0), at
  ``check_jsonschema/builtin_schemas/vendor/compose-spec.json``; read from the
  installed package, not copied here.
* Kubernetes' built-in kinds: the schemas bundled by ``kubernetes-validate``,
  used through its ``validate`` function in the tests.
* The Prometheus Operator's ServiceMonitor and PrometheusRule: no package here
  ships their CRD schemas, so ``CUSTOM_RESOURCE_SCHEMAS`` below is ours, written
  from the operator's API reference for the fields we use: structure and types
  only, not the operator's full CRD schema.
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Any


def compose_schema() -> dict[str, Any]:
    """Raises ImportError without check-jsonschema."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}, "labels": _STRINGS},
}
_SELECTOR = {
    "type": "object",
    "required": ["matchLabels"],
    "properties": {"matchLabels": _STRINGS},
    "additionalProperties": False,
}
# Ours (see the module docstring):
CUSTOM_RESOURCE_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": _SELECTOR,
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "oneOf": [
                                            {"required": ["record"]},
                                            {"required": ["alert"]},
                                        ],
                                        "additionalProperties": False,
                                        "properties": {
                                            "record": {"type": "string"},
                                            "alert": {"type": "string"},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _STRINGS,
                                            "annotations": _STRINGS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}
