"""Case 23 of ../shared/cases/lock-cases.md: a slow Postgres under a request storm.

300 concurrent requests (half start runs, each writing the run log when it wins
the lease; half read the run log) meet a Postgres whose every reply comes late,
with a 200 ms pool timeout. The test asserts fast answers (no hang; 429s and
503s that say when to retry), no run left ``running``, and an asyncpg pool that
is whole again once the storm is over. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from service.errors import BackendUnavailable
from service.http.keys import RUNTIME
from service.runtime import Runtime
from tests.lock_case_helpers import RUNS, TRIGGER, LoopbackProxy, eventually
from tests.servers import missing
from tests.upstream import Upstream


def postgres_in_use(runtime: Runtime) -> tuple[int, int]:
    """(connections checked out, holders missing from the free queue) of asyncpg."""
    pool = runtime.store.db.pool
    checked_out = pool.get_size() - pool.get_idle_size()
    # A holder that is never given back is missing from the queue even when its
    # connection is closed, which get_size() alone would not show.
    missing = len(pool._holders) - pool._queue.qsize()
    return checked_out, missing


# -- case 23: slow Postgres, 300 concurrent log writes, 200 ms pool timeout ---------

STORM_REQUESTS = 300
STORM_BOUND_S = 15.0


@pytest.fixture
async def slow_postgres(database_url: str) -> AsyncIterator[tuple[LoopbackProxy, str]]:
    """The test Postgres behind a LoopbackProxy, and the URL that goes through it."""
    parts = urlsplit(database_url)
    if parts.hostname != "127.0.0.1":
        missing("the slow-Postgres proxy only forwards to 127.0.0.1")
    proxy = LoopbackProxy(parts.port or 5432)
    await proxy.start()
    user = parts.netloc.rpartition("@")[0]
    netloc = f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}"
    yield proxy, parts._replace(netloc=netloc).geturl()
    await proxy.close()


@pytest.mark.parametrize(
    "reply_delay_s",
    [0.02, 0.15],
    ids=["slow", "slower-than-the-timeout"],  # 0.15 s: not even a connection opens in time
)
async def test_case23_slow_postgres_storm_gets_fast_answers_and_pool_recovers(
    slow_postgres: tuple[LoopbackProxy, str],
    make_client: Any,
    upstream: tuple[Upstream, str],
    auth: dict[str, str],
    reply_delay_s: float,
) -> None:
    proxy, url = slow_postgres
    client = await make_client(
        SYNCLOCK_DATABASE_URL=url,
        SYNCLOCK_DATABASE_TIMEOUT="200ms",
        SYNCLOCK_SOURCES=f"small={upstream[1]}",
    )
    runtime: Runtime = client.app[RUNTIME]
    pool_size: int = runtime.store.db.pool.get_max_size()
    assert postgres_in_use(runtime) == (0, 0)

    # Half the callers start runs (a run-log insert each time one wins the lease),
    # half read the run log; every reply from Postgres comes late.
    proxy.delay_s = reply_delay_s
    connector = aiohttp.TCPConnector(limit=STORM_REQUESTS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(index: int) -> tuple[int, str | None]:
            method, path = ("POST", TRIGGER) if index % 2 else ("GET", RUNS)
            async with session.request(method, client.make_url(path), headers=auth) as response:
                await response.read()
                return response.status, response.headers.get("Retry-After")

        started = time.monotonic()
        async with asyncio.timeout(STORM_BOUND_S):  # a hang fails here
            answers = await asyncio.gather(*(call(i) for i in range(STORM_REQUESTS)))
        storm_s = time.monotonic() - started
    proxy.delay_s = 0.0

    statuses = Counter(status for status, _ in answers)
    assert set(statuses) <= {200, 202, 429, 503}, statuses
    assert statuses[503] > 0, statuses  # the short timeout was met, not waited out
    assert all(retry for status, retry in answers if status in (429, 503))

    async def idle() -> bool:
        return runtime.job.running_locally() is None and postgres_in_use(runtime) == (0, 0)

    assert await eventually(idle, 10.0), postgres_in_use(runtime)

    async def reaped() -> bool:  # writes run records Postgres could not take in the storm
        try:
            await runtime.job.reap()
        except BackendUnavailable:  # 200 ms is tight for a new connection on a busy host
            return False
        return True

    async def none_left_running() -> bool:
        response = await client.get(f"{RUNS}?status=running", headers=auth)
        return response.status == 200 and not (await response.json())["runs"]

    assert await eventually(reaped, 5.0)
    assert await eventually(none_left_running, 5.0)

    async def connections_back() -> bool:
        return proxy.open_connections <= pool_size

    assert await eventually(connections_back, 5.0), proxy.open_connections
    assert storm_s < STORM_BOUND_S
