"""Dashboards, alerts and runbooks, checked against what synclock really exports.

* promtool checks the Prometheus config and rules and runs the rules' unit tests;
  every alert must have tests that show it firing, silent before its ``for:``, and
  silent on a healthy service.
* Every metric a panel or a rule reads, and every metric, route and log event a
  runbook names, exists in the service's own ``/metrics`` and code.
* End to end: a real Prometheus scrapes two ``synclock serve`` replicas through
  triggers, a 429 and a fenced-out run; every dashboard expression then has data,
  and rules with a shortened ``for:`` show the stale-sync and fence alerts firing.

promtool and prometheus come from the Debian package ``prometheus``. Without them
these tests skip, unless ``SYNCLOCK_REQUIRE_BACKENDS=1`` turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service import __version__, logs, metrics
from service.http.keys import RUNTIME
from service.http.routes import routes
from service.records import NewRun, PriceCounts, RunOutcome, RunStatus, Trigger
from service.store import Store
from tests.conftest import ADMIN_TOKEN
from tests.replicas import GatedUpstream, Replica
from tests.servers import free_port, missing

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RUNBOOKS = sorted((ROOT / "docs" / "runbooks").glob("*.md"))
OPERATOR_DOCS = [*RUNBOOKS, ROOT / "docs" / "operating-section.md", ROOT / "README.md"]
ROWS = ["Sync health", "Lock", "HTTP", "Dependencies", "Process"]
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRIGGER = "/admin/pricing/scheduler/trigger"
LOCK = "pricing-sync"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
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


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", text))


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


# -- promtool ------------------------------------------------------------------------


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


# -- logs -------------------------------------------------------------------------------

ROUTES = {
    "runs": ("GET", "/admin/pricing/sync/runs"),
    "status": ("GET", "/admin/pricing/scheduler/status"),
    "trigger": ("POST", TRIGGER),
    "release": ("DELETE", "/admin/pricing/sync/lock"),
    "bad": ("GET", "/admin/pricing/sync/runs/{run_id}"),
}
RUN_EVENTS = {"sync_started", "sync_finished", "lease_lost", "sync_fenced_out", "source_failed"}


async def test_concurrent_requests_never_mix_their_log_context(
    make_client: Callable[..., Any],
) -> None:
    stream = io.StringIO()
    previous = logs.redirect(stream)
    try:
        client = await make_client()

        async def send(kind: str, n: int) -> tuple[str, str, int, Any]:
            method, path = ROUTES[kind]
            # Every fifth request brings no id of its own and gets a generated one.
            headers = {**AUTH, **({"X-Request-ID": f"{kind}-{n}"} if n % 5 else {})}
            body = {"reason": f"reason {kind} {n}"} if kind == "release" else None
            url = path.replace("{run_id}", f"not-a-uuid-{n}")
            if kind == "trigger" and n % 2:
                url += "?wait=5"  # the request outlives the run it started
            async with client.request(method, url, headers=headers, json=body) as response:
                rid = response.headers["X-Request-ID"]
                if body is not None:
                    reasons[rid] = body["reason"]
                return kind, rid, response.status, await response.json(content_type=None)

        reasons: dict[str, str] = {}
        kinds = ["runs", "status", "trigger", "release", "bad"]
        answers = await asyncio.gather(*(send(kind, n) for n in range(30) for kind in kinds))
        started = {
            body.get("run_id") or body["id"]: body["fence"]
            for kind, _, status, body in answers
            if kind == "trigger" and status in (200, 202)
        }
        for run_id in started:
            assert await client.app[RUNTIME].job.wait(run_id, 30) is not None
    finally:
        logs.redirect(previous)

    sent = {rid: (kind, status) for kind, rid, status, _ in answers}
    assert len(sent) == len(answers), "request ids are unique"
    assert started, "at least one trigger started a run"
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    requests = Counter()
    for line in lines:
        event, rid = line["event"], line.get("request_id")
        if event == "request":
            kind, status = sent[rid]
            assert (line["method"], line["route"], line["status"]) == (*ROUTES[kind], status)
            requests[rid] += 1
        elif event == "lock_force_released":
            assert line["reason"] == reasons[rid], line
        if event in RUN_EVENTS:
            assert rid is None, f"a run event carries a request id: {line}"
            assert line["lock"] == LOCK and started[line["run_id"]] == line["fence"], line
        elif rid is not None:
            assert rid in sent, line
    assert requests == dict.fromkeys(sent, 1)
    finished = Counter(line["run_id"] for line in lines if line["event"] == "sync_finished")
    assert finished == dict.fromkeys(started, 1)


# -- end to end: a real Prometheus scraping two replicas ----------------------------------


class Prometheus:
    """A Prometheus server on a free loopback port, stopped by PID."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.binary = tool("prometheus")
        self.folder = folder
        self.port = free_port()
        self.config = folder / "prometheus.yml"
        self.config.write_text(json.dumps(config))  # JSON is YAML
        self.log = folder / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=sink,
                stderr=sink,
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


class Api:
    """Prometheus's HTTP API and the replicas' admin API through one session."""

    def __init__(self, http: aiohttp.ClientSession, prometheus: Prometheus) -> None:
        self.http, self.prometheus = http, prometheus

    async def get(self, path: str, **params: str) -> Any:
        async with self.http.get(self.prometheus.url + path, params=params) as response:
            body = await response.json(content_type=None)
            assert body["status"] == "success", body
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]

    async def alerts(self, name: str, variant: str | None = None) -> dict[str, Any]:
        """Severity -> the active (pending or firing) alert called ``name``."""
        return {
            alert["labels"]["severity"]: alert
            for alert in (await self.get("/api/v1/alerts"))["alerts"]
            if alert["labels"]["alertname"] == name and alert["labels"].get("variant") == variant
        }

    async def states(self, name: str, variant: str | None = None) -> dict[str, str]:
        return {tier: alert["state"] for tier, alert in (await self.alerts(name, variant)).items()}

    async def call(self, method: str, url: str, **kw: Any) -> tuple[int, Any]:
        async with self.http.request(method, url, headers=AUTH, **kw) as response:
            return response.status, await response.json(content_type=None)


async def until(check: Callable[[], Any], what: str, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def shortened_rules(*names: str) -> dict[str, Any]:
    """The production alerts called ``names`` with ``for: 1s``, told apart by a label."""
    chosen = [
        {**rule, "for": "1s", "labels": {**rule["labels"], "variant": "short-for"}}
        for rule in alert_rules()
        if rule["alert"] in names
    ]
    return {"groups": [{"name": "synclock-short-for", "rules": chosen}]}


async def seed_old_success(database_url: str, schema: str, age: timedelta) -> None:
    """A run that succeeded ``age`` ago, as replicas restore it from Postgres."""
    store = await Store.connect(database_url, schema=schema, timeout_s=5)
    try:
        await store.migrate()
        run_id = str(uuid.uuid4())
        await store.begin_run(NewRun(run_id, LOCK, Trigger.SCHEDULED, "scheduler", 1, "old"))
        ended = datetime.now(UTC) - age
        outcome = RunOutcome(RunStatus.SUCCEEDED, PriceCounts(), None, [], ended, 1.0)
        assert await store.finish_run(run_id, outcome)
    finally:
        await store.close()


@pytest.fixture
def upstream_gated() -> Iterator[GatedUpstream]:
    server = GatedUpstream()
    yield server
    server.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def values(result: list[dict[str, Any]], label: str | None = None) -> dict[str, float]:
    return {
        (r.get("metric", {}).get(label, "") if label else str(i)): float(r["value"][1])
        for i, r in enumerate(result)
    }


def panel_expr(title: str) -> str:
    return next(expr for t, ref, expr in panel_targets() if t == title and ref == "A")


# What some panels must show after the scenario, beyond "has data".
PANEL_CHECKS: dict[str, Callable[[list[dict[str, Any]]], bool]] = {
    "Time since last success": lambda r: values(r)["0"] < 120,
    "Runs by outcome": lambda r: (
        values(r, "outcome")["fenced_out"] > 0 and values(r, "outcome")["succeeded"] > 0
    ),
    "Triggers answered 429": lambda r: values(r, "trigger")["manual"] > 0,
    "Lease holder": lambda r: len(r) == 2,
    "Current lease held for": lambda r: values(r) == {"0": 0.0, "1": 0.0},
    "Fencing token": lambda r: max(values(r).values()) >= 3,
    "Fence rejections": lambda r: sum(values(r).values()) >= 1,
    "Forced releases": lambda r: sum(values(r).values()) >= 1,
    "429s by route": lambda r: values(r, "route")[TRIGGER] > 0,
    "Redis and Postgres up (last readiness check)": lambda r: set(values(r).values()) == {1.0},
    "Up": lambda r: values(r) == {"0": 1.0, "1": 1.0},
    "Version": lambda r: {x["metric"]["version"] for x in r} == {__version__},
}


async def test_prometheus_scrapes_two_replicas_and_every_panel_has_data(
    env: dict[str, str],
    real_redis: Any,
    database_url: str,
    schema: str,
    upstream_gated: GatedUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    replica_env = {
        **env,
        "SYNCLOCK_SOURCES": f"slow={upstream_gated.url}",
        "SYNCLOCK_SOURCE_RETRIES": "0",
        "SYNCLOCK_SOURCE_TIMEOUT": "30s",
        "SYNCLOCK_SHUTDOWN_TIMEOUT": "2s",
    }
    a, b = (Replica(name, replica_env, tmp_path) for name in ("a", "b"))
    short = tmp_path / "short-for.rules.yml"
    short.write_text(json.dumps(shortened_rules("SynclockSyncStale", "SynclockFenceRejections")))
    prometheus = Prometheus(
        tmp_path,
        {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [*map(str, RULE_FILES), str(short)],
            "scrape_configs": [
                {
                    "job_name": "synclock",
                    "static_configs": [{"targets": [f"127.0.0.1:{r.port}" for r in (a, b)]}],
                }
            ],
        },
    )
    await seed_old_success(database_url, schema, timedelta(hours=13))
    api = Api(http, prometheus)
    try:
        for replica in (a, b):
            replica.start()
        prometheus.start()
        for replica in (a, b):
            replica.wait_ready()
        await until(lambda: api.query('sum(up{job="synclock"}) == 2'), "both targets up")

        # The success restored from Postgres is 13 h old: both tiers fire once their
        # (shortened) for: has passed; the production rules are still pending.
        stale = await until(
            lambda: _firing(api.alerts("SynclockSyncStale", "short-for"), 2),
            "the stale-sync alerts",
        )
        assert stale.keys() == {"warning", "critical"}
        summary = stale["critical"]["annotations"]["summary"]
        assert summary.startswith("No successful pricing sync for 13h"), summary
        assert stale["critical"]["annotations"]["runbook_url"] == "docs/runbooks/sync-stale.md"
        assert await api.states("SynclockSyncStale") == {
            "warning": "pending",
            "critical": "pending",
        }

        # a holds the lease, stalled on its upstream; b is refused (429).
        upstream_gated.modes = ["gate"]
        status, old = await api.call("POST", a.url + TRIGGER)
        assert status == 202
        await asyncio.to_thread(upstream_gated.arrived.wait, 10)
        status, refused = await api.call("POST", b.url + TRIGGER)
        assert status == 429 and refused["holder"]["owner"] == "a"
        await until(lambda: api.query("synclock_lock_held == 1"), "Prometheus to see the lease")
        held = values(await api.query(panel_expr("Current lease held for")), "instance")
        assert held[f"127.0.0.1:{a.port}"] > 0 and held[f"127.0.0.1:{b.port}"] == 0

        # An operator releases the lock through b; b's run wins a newer fence and
        # succeeds; a's stalled write is then refused by Postgres: fenced_out.
        status, released = await api.call(
            "DELETE", b.url + "/admin/pricing/sync/lock", json={"reason": "test: a is stuck"}
        )
        assert status == 200 and released["holder"]["run_id"] == old["run_id"]
        status, newer = await api.call("POST", b.url + TRIGGER + "?wait=20")
        assert status == 200 and newer["status"] == "succeeded"
        upstream_gated.gate.set()
        run_url = f"{a.url}/admin/pricing/sync/runs/{old['run_id']}"
        fenced = await until(
            lambda: _finished(api.call("GET", run_url)), "a's run to end", timeout_s=20
        )
        assert fenced["status"] == "fenced_out" and newer["fence"] > old["fence"]
        status, last = await api.call("POST", a.url + TRIGGER + "?wait=20")
        assert status == 200 and last["status"] == "succeeded"

        await until(
            lambda: api.query(
                'sum(synclock_sync_runs_total{outcome="succeeded"}) >= 2'
                " and on () sum(synclock_fence_rejections_total) >= 1"
            ),
            "Prometheus to scrape the runs",
        )
        fence = await until(
            lambda: _firing(api.alerts("SynclockFenceRejections", "short-for"), 1),
            "the fence-rejection alert",
        )
        assert fence.keys() == {"warning"}  # one rejection: not the critical tier
        assert await api.states("SynclockFenceRejections") == {"warning": "pending"}
        await until(
            lambda: _none(api.alerts("SynclockSyncStale", "short-for")), "stale alerts to clear"
        )

        missing, wrong = [], []
        for title, ref, expr in panel_targets():
            result = await api.query(expr)
            if not result:
                missing.append(f"{title} {ref}: {expr}")
            elif ref == "A" and title in PANEL_CHECKS and not PANEL_CHECKS[title](result):
                wrong.append(f"{title}: {result}")
        assert missing == [] and wrong == []
        assert {t for t, _, _ in panel_targets()} >= PANEL_CHECKS.keys()

        for group in (await api.get("/api/v1/rules"))["groups"]:
            for rule in group["rules"]:
                assert rule["health"] == "ok", rule
                if rule["type"] == "recording":
                    assert await api.query(rule["name"]), f"{rule['name']} has no data"
    finally:
        prometheus.stop()
        for replica in (a, b):
            replica.stop(timeout_s=15)


async def _firing(alerts: Any, count: int) -> dict[str, Any] | None:
    found: dict[str, Any] = await alerts
    firing = len(found) == count and all(a["state"] == "firing" for a in found.values())
    return found if firing else None


async def _finished(call: Any) -> Any:
    """The run once it has its own ending: the newer holder marks it "abandoned"
    when it begins, and the old holder writes its real status afterwards."""
    status, body = await call
    return body if status == 200 and body["status"] not in ("running", "abandoned") else None


async def _none(alerts: Any) -> bool:
    return not await alerts
