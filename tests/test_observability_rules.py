"""The Prometheus config, recording rules and alerts, checked by promtool.

promtool checks the config and the rules and runs the rules' unit tests
(deploy/prometheus/tests/). Every alert and severity must be complete (summary,
description, a runbook under docs/runbooks/) and have unit tests that show it
firing, silent before its ``for:`` has passed, and silent on a healthy service.
Every runbook belongs to an alert.

Needs promtool (Debian package ``prometheus``); see tests/observability_helpers.py.
"""

from __future__ import annotations

import re
from collections import Counter

import yaml

from tests.observability_helpers import (
    PROMETHEUS_DIR,
    ROOT,
    RULE_FILES,
    RUNBOOKS,
    alert_rules,
    run_tool,
    tool,
)

RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", text))


def test_promtool_checks_the_config_and_the_rules() -> None:
    promtool = tool("promtool")
    out = run_tool(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert f"{len(RULE_FILES)} rule files found" in out
    run_tool(promtool, "check", "rules", *map(str, RULE_FILES))


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    out = run_tool(tool("promtool"), "test", "rules", *map(str, RULE_TESTS))
    assert out.count("SUCCESS") == len(RULE_TESTS)


def test_every_alert_is_complete_and_unit_tested_three_ways() -> None:
    """Each alert (name and severity) has a runbook, and a promtool test where it
    fires, a check in the same test that it was silent within ``for:`` before, and a
    check that it stays silent in a healthy test group."""
    firing: dict[tuple[str, str], list[tuple[str, float]]] = {}  # (alert, severity)
    silent: dict[tuple[str, str, str], list[float]] = {}  # (group, alert, severity)
    healthy: dict[str, list[float]] = {}
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            for check in group.get("alert_rule_test", []):
                name, at = check["alertname"], duration_s(check["eval_time"])
                severities = {a["exp_labels"]["severity"] for a in check["exp_alerts"]}
                if group["name"].startswith("healthy") and not severities:
                    healthy.setdefault(name, []).append(at)
                for severity in ("warning", "critical"):
                    if severity in severities:
                        firing.setdefault((name, severity), []).append((group["name"], at))
                    else:
                        silent.setdefault((group["name"], name, severity), []).append(at)

    alerts = alert_rules()
    assert alerts
    tiers = Counter((a["alert"], a["labels"]["severity"]) for a in alerts)
    assert all(n == 1 for n in tiers.values()), tiers
    runbooks_used = set()
    for alert in alerts:
        name, severity = alert["alert"], alert["labels"]["severity"]
        for_s = duration_s(alert.get("for", "0s"))
        assert severity in ("warning", "critical"), name
        assert {"summary", "description", "runbook_url"} <= alert["annotations"].keys(), name
        runbook = ROOT / alert["annotations"]["runbook_url"]
        assert runbook.is_file() and runbook.parent.name == "runbooks", name
        runbooks_used.add(runbook)
        assert for_s > 0, f"{name}: without for: no test can show it silent before it"

        fired = firing.get((name, severity), [])
        assert fired, f"no promtool test shows {name} ({severity}) firing"
        # Firing at T means the condition held since T - for; silent at S in
        # [T - for, T) means it was pending there, not yet firing.
        assert any(
            at - for_s <= quiet < at
            for group, at in fired
            for quiet in silent.get((group, name, severity), [])
        ), f"no promtool test shows {name} ({severity}) silent within its for:"
        assert any(at >= for_s for at in healthy.get(name, [])), (
            f"no healthy promtool group checks that {name} stays silent"
        )
    assert runbooks_used == set(RUNBOOKS), "every runbook belongs to an alert"
