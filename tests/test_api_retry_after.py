"""What a refused trigger's Retry-After tells the caller, against real Redis and Postgres."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from tests.upstream import Upstream

TRIGGER = "/admin/pricing/scheduler/trigger"


async def refused(client: Any, auth: dict[str, str]) -> tuple[int, dict[str, Any]]:
    response = await client.post(TRIGGER, headers=auth)
    assert response.status == 429
    return int(response.headers["Retry-After"]), await response.json()


async def settle(client: Any, auth: dict[str, str], run_id: str) -> str:
    for _ in range(200):
        run = await (await client.get(f"/admin/pricing/sync/runs/{run_id}", headers=auth)).json()
        if run["status"] != "running":
            return str(run["status"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} still running")


async def test_retry_after_is_one_typical_run_not_the_whole_lease(
    make_client: Any, upstream: tuple[Upstream, str], auth: dict[str, str]
) -> None:
    fake, url = upstream
    fake.default = "gate"
    first = await make_client(SYNCLOCK_SOURCES=f"slow={url}", SYNCLOCK_INSTANCE="first")

    # No run has succeeded yet: the lease's remaining time is all there is to go by.
    started = await (await first.post(TRIGGER, headers=auth)).json()
    no_history, body = await refused(first, auth)
    fake.gate.set()
    assert await settle(first, auth, started["run_id"]) == "succeeded"

    # A replica that starts now knows that runs take milliseconds (the median of
    # the recent successes) and says so, though the lease has most of 30 s left.
    fake.gate.clear()
    second = await make_client(SYNCLOCK_SOURCES=f"slow={url}", SYNCLOCK_INSTANCE="second")
    held = await (await second.post(TRIGGER, headers=auth)).json()
    with_history, later = await refused(second, auth)
    fake.gate.set()
    assert await settle(second, auth, held["run_id"]) == "succeeded"

    assert no_history == math.ceil(body["holder"]["lease_remaining_ms"] / 1000) > 20
    assert later["holder"]["lease_remaining_ms"] > 20_000
    assert with_history == later["retry_after_s"] == 1
