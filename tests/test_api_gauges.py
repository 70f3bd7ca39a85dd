"""Gauges an operator reads while a sync holds the lease, against real Redis and Postgres."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.test_api import TRIGGER, slow_client
from tests.upstream import Upstream


async def test_metrics_export_the_configured_sync_interval(make_client: Any) -> None:
    client = await make_client(SYNCLOCK_SYNC_INTERVAL="90m")
    exposition = await (await client.get("/metrics")).text()
    assert "\nsynclock_sync_interval_seconds 5400.0\n" in exposition


def gauge(exposition: str, name: str) -> float:
    line = next(ln for ln in exposition.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])


async def test_metrics_show_since_when_this_replica_holds_the_lease(
    make_client: Any, upstream: tuple[Upstream, str], auth: dict[str, str]
) -> None:
    client = await slow_client(make_client, upstream)
    before = time.time()
    started = await (await client.post(TRIGGER, headers=auth)).json()
    during = await (await client.get("/metrics")).text()
    upstream[0].gate.set()
    run_url = f"/admin/pricing/sync/runs/{started['run_id']}"
    for _ in range(100):  # the run ends within milliseconds of the gate opening
        if (await (await client.get(run_url, headers=auth)).json())["status"] != "running":
            break
        await asyncio.sleep(0.05)
    after = await (await client.get("/metrics")).text()

    assert gauge(during, "synclock_lock_held") == 1
    assert before <= gauge(during, "synclock_lock_held_since_timestamp_seconds") <= time.time()
    assert gauge(after, "synclock_lock_held") == 0
    assert gauge(after, "synclock_lock_held_since_timestamp_seconds") == 0
