"""Write deploy/k8s/prometheusrule.yaml from the rule files in deploy/prometheus/rules/.

    python scripts/render_prometheusrule.py

The Prometheus Operator's PrometheusRule carries the same groups as the plain rule
files that docker-compose.yml mounts; this keeps the two from drifting apart.
tests/test_deploy_schemas.py fails when they differ and names this command.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
TARGET = ROOT / "deploy" / "k8s" / "prometheusrule.yaml"

HEADER = """\
# Generated from deploy/prometheus/rules/ by scripts/render_prometheusrule.py; do
# not edit by hand. Needs the Prometheus Operator's CRDs. The alerts select
# job="synclock": the ServiceMonitor's job label is the Service's name, synclock.
"""


def rule_groups() -> list[dict[str, Any]]:
    """Every group of every rule file, files in name order."""
    groups: list[dict[str, Any]] = []
    for path in sorted(RULES_DIR.glob("*.y*ml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


def manifest() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "synclock", "labels": {"app.kubernetes.io/name": "synclock"}},
        "spec": {"groups": rule_groups()},
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (long PromQL) as literal blocks and long prose folded, the
    way the rule files write them."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = None
    if "\n" in value:
        style = "|"
    elif len(value) > 72:
        style = ">"
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _text)


def render() -> str:
    body = yaml.dump(manifest(), Dumper=_BlockDumper, sort_keys=False, width=100)
    return HEADER + body


def main() -> int:
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
