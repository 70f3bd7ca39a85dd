"""End to end: a real Prometheus scrapes two ``synclock serve`` replicas.

The replicas go through triggers, a 429 and a fenced-out run (an operator releases
a stalled lease, the newer holder succeeds, the old holder's write is refused).
Every dashboard expression then has data, some panels show the expected values,
every rule is healthy and every recording rule has data. The production rules plus
copies with a shortened ``for:`` show the stale-sync and fence-rejection alerts
firing (the copies) while the production ones are still pending.

Prometheus and the replicas listen on free loopback ports and are stopped by PID.
Needs prometheus (Debian package ``prometheus``), Redis and Postgres.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service import __version__
from service.records import NewRun, PriceCounts, RunOutcome, RunStatus, Trigger
from service.store import Store
from tests.observability_helpers import (
    AUTH,
    LOCK,
    RULE_FILES,
    TRIGGER,
    alert_rules,
    panel_targets,
    tool,
)
from tests.replicas import GatedUpstream, Replica
from tests.servers import free_port


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
