"""The dashboard, the rules and the runbooks, checked against what synclock exports.

Static checks, with no Prometheus server: every metric a panel or a rule reads, and
every label value it selects, is on a running app's own ``/metrics`` page; every
metric, route and log event a runbook or the operator docs name exists in the
service's ``/metrics`` and code. The exposition passes ``promtool check metrics``,
every panel expression parses, every HTTP route has pre-created series, and the
dashboard can be provisioned as a file with its data source and variables.

Needs promtool (Debian package ``prometheus``); see tests/observability_helpers.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.http.routes import routes
from tests.observability_helpers import (
    DASHBOARDS,
    ROOT,
    RUNBOOKS,
    alert_rules,
    panel_targets,
    panels,
    recorded,
    rules,
    run_tool,
    tool,
)

OPERATOR_DOCS = [*RUNBOOKS, ROOT / "docs" / "operating-section.md", ROOT / "README.md"]
ROWS = ["Sync health", "Lock", "HTTP", "Dependencies", "Process"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


# -- reading PromQL and the /metrics page ---------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"by", "without", "on", "ignoring", "bool", "and", "or", "unless", "offset"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: what is left once strings, label
    matchers, ranges, grouping clauses, function calls and keywords are gone."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _NAME.findall(text) if name.lower() not in _KEYWORDS}


def every_expression() -> list[tuple[str, str]]:
    found = [(f"panel {title!r} {ref}", expr) for title, ref, expr in panel_targets()]
    for rule in rules():
        found.append((f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return found


def exported(exposition: str) -> dict[str, dict[str, set[str]]]:
    """Sample name -> label -> values seen, from a /metrics page."""
    samples: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
        if family.type == "histogram":
            samples.setdefault(family.name, {})
    return samples


@pytest.fixture
async def exposition(make_client: Callable[..., Any]) -> str:
    """The /metrics page of a running app that has answered a request."""
    client = await make_client()
    assert (await client.get("/healthz")).status == 200
    response = await client.get("/metrics")
    assert response.status == 200
    return str(await response.text())


# -- metric names against /metrics ------------------------------------------------------


def test_metric_names_are_read_from_expressions() -> None:
    expr = (
        'sum by (le) (rate(a_bucket{x="y", z=~"b|c"}[5m])) / on (i) group_left'
        " max_over_time(b:c[1h:]) or vector(1e3) * up offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b:c", "up"}


async def test_every_metric_in_panels_and_rules_is_exported(exposition: str) -> None:
    samples = exported(exposition)
    defined = set(samples) | recorded() | {"up"}  # up: written by Prometheus itself
    used: dict[str, str] = {}
    for where, expr in every_expression():
        for name in metric_names(expr):
            used.setdefault(name, where)
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            for name in re.findall(r"label_values\((\w+)", variable.get("definition", "")):
                used.setdefault(name, f"variable {variable['name']}")

    assert {n: w for n, w in used.items() if n not in defined} == {}
    assert {"synclock_sync_runs_total", "process_cpu_seconds_total", "up"} <= set(used)

    # Label values named in selectors exist too (outcome="lost_lease", not "lost-lease"):
    # every labelled series that a panel or rule selects is created at zero.
    wrong = []
    for where, expr in every_expression():
        for name, matchers in _SELECTOR.findall(expr):
            for label, op, value in _MATCHER.findall(matchers):
                if ":" in name or label in ("job", "instance") or op not in ("=", "=~"):
                    continue
                seen = samples.get(name, {}).get(label, set())
                # Each alternative of a regex must match a series (simple regexes only).
                wanted = [value] if op == "=" else value.split("|")
                pattern = re.escape if op == "=" else str
                missing = [w for w in wanted if not any(re.fullmatch(pattern(w), v) for v in seen)]
                wrong += [f"{where}: {name}{{{label}{op}{v!r}}}" for v in missing]
    assert wrong == []


def test_precreated_http_series_cover_every_route() -> None:
    registered = {(route.method, route.path) for route in routes}  # type: ignore[attr-defined]
    assert {(method, path) for path, method in metrics.HTTP_ROUTES} == registered


async def test_promtool_check_metrics_is_clean_on_the_exposition(exposition: str) -> None:
    out = run_tool(tool("promtool"), "check", "metrics", stdin=exposition)
    assert out.strip() == ""


def test_every_panel_expression_parses(tmp_path: Path) -> None:
    promtool = tool("promtool")
    targets = panel_targets()
    as_rules = [
        {"record": f"panel_expression_{i}", "expr": expr} for i, (_, _, expr) in enumerate(targets)
    ]
    path = tmp_path / "panels.yml"
    path.write_text(json.dumps({"groups": [{"name": "panels", "rules": as_rules}]}))

    out = run_tool(promtool, "check", "rules", str(path))
    assert f"{len(targets)} rules found" in out


# -- the dashboard and the docs -----------------------------------------------------------


def test_dashboard_is_provisionable_and_uses_its_variables() -> None:
    assert DASHBOARDS
    for path in DASHBOARDS:
        raw = path.read_text()
        dashboard = json.loads(raw)
        assert "__inputs" not in dashboard and "${DS_" not in raw
        assert dashboard.get("id") is None
        assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for name in ("job", "instance"):
            assert variables[name]["type"] == "query"
            assert variables[name]["datasource"] == DATASOURCE
        rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
        assert rows == ROWS

        ids, cells = [], set()
        for panel in panels(dashboard):
            ids.append(panel["id"])
            box = panel["gridPos"]
            assert box["x"] + box["w"] <= 24, panel["title"]
            for x in range(box["x"], box["x"] + box["w"]):
                for y in range(box["y"], box["y"] + box["h"]):
                    assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                    cells.add((x, y))
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == DATASOURCE and panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE
                for _, matchers in _SELECTOR.findall(target["expr"]):
                    assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers
                for window in re.findall(r"\[([^\]]*)\]", target["expr"]):
                    assert window == "$__rate_interval" or ":" in window, panel["title"]
        assert len(ids) == len(set(ids))

    datasources = yaml.safe_load(
        next((ROOT / "grafana/provisioning/datasources").glob("*.yml")).read_text()
    )
    assert datasources["apiVersion"] == 1
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load(
        next((ROOT / "grafana/provisioning/dashboards").glob("*.yml")).read_text()
    )
    assert providers["apiVersion"] == 1
    assert all(p["type"] == "file" and p["options"]["path"] for p in providers["providers"])


async def test_runbooks_name_only_real_routes_metrics_and_log_events(exposition: str) -> None:
    paths: list[str] = [route.path for route in routes]  # type: ignore[attr-defined]
    registered = {re.sub(r"\{[^}]*\}", "{}", path) for path in paths}
    names = set(exported(exposition)) | recorded()
    code = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    wrong = []
    for doc in filter(Path.exists, OPERATOR_DOCS):
        text = doc.read_text()
        for path in re.findall(
            r"(?<![\w/.-])(/(?:admin|healthz|readyz|metrics)[\w/{}-]*)(?![\w/{}*-])", text
        ):
            if re.sub(r"\{[^}]*\}", "{}", path.rstrip("/")) not in registered:
                wrong.append(f"{doc.name}: route {path}")
        for name in re.findall(r"(?<![\w:/.-])synclock[_:][a-z0-9_:]*[a-z0-9]", text):
            if name not in names:
                wrong.append(f"{doc.name}: metric {name}")
        for event in re.findall(r'"event": ?"(\w+)"|\bevent=(\w+)', text):
            if f'"{event[0] or event[1]}"' not in code:
                wrong.append(f"{doc.name}: log event {event[0] or event[1]}")
    assert wrong == []
    assert len(RUNBOOKS) == len({a["annotations"]["runbook_url"] for a in alert_rules()})
