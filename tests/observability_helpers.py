"""What the observability tests (tests/test_observability_*.py) share.

Where the Prometheus config, rules, rule tests, dashboards and runbooks live; the
rules and dashboard panels read from those files, with the dashboard's variables
filled in as Grafana would; promtool and prometheus found on PATH; and the admin
routes, lock name and credentials the tests call the service with.

promtool and prometheus come from the Debian package ``prometheus``. Without them
the tests that need them skip, unless ``SYNCLOCK_REQUIRE_BACKENDS=1`` turns the skip
into a failure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ADMIN_TOKEN
from tests.servers import missing

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RUNBOOKS = sorted((ROOT / "docs" / "runbooks").glob("*.md"))
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRIGGER = "/admin/pricing/scheduler/trigger"
LOCK = "pricing-sync"
# What Grafana would put in place of the dashboard's variables.
PANEL_VARIABLES = {"$__rate_interval": "1m", "$job": "synclock", "$instance": ".+"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed (Debian package 'prometheus')"
    missing(message)


def run_tool(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


# -- reading the rules and the dashboards -------------------------------------------


def rules() -> list[dict[str, Any]]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            found.extend(group["rules"])
    return found


def alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def recorded() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside a collapsed row


def panel_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expression with the variables filled in) of every panel."""
    found = []
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text())):
            for target in panel.get("targets", []):
                found.append((panel["title"], target["refId"], concrete(target["expr"])))
    return found


def concrete(expr: str) -> str:
    for variable, value in PANEL_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr}"
    return expr
