"""Redis or Postgres down: fast, explicit 503s, no lock left behind, recovery
without a restart. Each test runs its own throwaway server on a free port."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from service import metrics
from tests.proxy import FlakyProxy
from tests.servers import ThrowawayPostgres, ThrowawayRedis

TRIGGER = "/admin/pricing/scheduler/trigger"


@pytest.fixture
def own_redis() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_postgres() -> Iterator[ThrowawayPostgres]:
    server = ThrowawayPostgres()
    server.start()
    yield server
    server.remove()


async def timed(call: Any) -> tuple[float, Any]:
    started = time.monotonic()
    response = await call
    return time.monotonic() - started, response


async def test_redis_down_gives_fast_503_then_recovers_without_restart(
    own_redis: ThrowawayRedis, make_client: Any, auth: dict[str, str]
) -> None:
    client = await make_client(SYNCLOCK_REDIS_URL=own_redis.url)
    assert (await client.post(f"{TRIGGER}?wait=30", headers=auth)).status == 200

    own_redis.stop(signal.SIGKILL)
    elapsed, refused = await timed(client.post(TRIGGER, headers=auth))
    ready = await client.get("/readyz")
    status = await client.get("/admin/pricing/scheduler/status", headers=auth)

    assert refused.status == 503 and elapsed < 1.0
    assert refused.content_type == "application/problem+json"
    assert refused.headers["Retry-After"] == "1"
    assert (await refused.json())["backend"] == "redis"
    assert ready.status == 503
    assert (await ready.json())["checks"]["postgres"] == "ok"
    assert status.status == 503

    reloads = metrics.REDIS_SCRIPT_RELOADS._value.get()
    own_redis.start()  # empty: no keys, no script cache
    again = await client.post(f"{TRIGGER}?wait=30", headers=auth)
    body = await again.json()
    assert again.status == 200 and body["status"] == "succeeded"
    assert body["fence"] == 2  # the floor from Postgres, not Redis's fresh counter
    assert metrics.REDIS_SCRIPT_RELOADS._value.get() > reloads
    assert (await client.get("/readyz")).status == 200


async def test_postgres_down_gives_fast_503_and_leaves_no_lock(
    own_postgres: ThrowawayPostgres,
    make_client: Any,
    auth: dict[str, str],
    real_redis: Any,
    prefix: str,
) -> None:
    client = await make_client(
        SYNCLOCK_DATABASE_URL=own_postgres.url, SYNCLOCK_DATABASE_TIMEOUT="1s"
    )
    assert (await client.post(f"{TRIGGER}?wait=30", headers=auth)).status == 200

    own_postgres.stop()
    elapsed, refused = await timed(client.post(TRIGGER, headers=auth))
    runs = await client.get("/admin/pricing/sync/runs", headers=auth)
    ready = await client.get("/readyz")

    assert refused.status == 503 and elapsed < 2.0
    assert (await refused.json())["backend"] == "postgres"
    assert runs.status == 503
    assert ready.status == 503 and (await ready.json())["checks"]["redis"] == "ok"
    lock_keys = [k async for k in real_redis.scan_iter(match=f"{prefix}lock:*")]
    assert lock_keys == []  # the grant was given back, not left to expire

    own_postgres.start()
    again = await client.post(f"{TRIGGER}?wait=30", headers=auth)
    assert again.status == 200
    assert (await again.json())["status"] == "succeeded"


async def test_stalled_redis_gives_503_within_its_timeout_and_leaves_no_orphan(
    own_redis: ThrowawayRedis, make_client: Any, auth: dict[str, str]
) -> None:
    client = await make_client(SYNCLOCK_REDIS_URL=own_redis.url, SYNCLOCK_REDIS_TIMEOUT="300ms")
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)  # Redis hangs: no replies, no errors
    try:
        elapsed, refused = await timed(client.post(TRIGGER, headers=auth))
    finally:
        own_redis.process.send_signal(signal.SIGCONT)

    # The queued acquire runs when Redis resumes; the background release follows it.
    assert refused.status == 503 and elapsed < 0.6
    for _ in range(40):
        status = await client.get("/admin/pricing/scheduler/status", headers=auth)
        if status.status == 200 and not (await status.json())["lock"]["held"]:
            break
        await asyncio.sleep(0.1)
    assert (await status.json())["lock"]["held"] is False
    again = await client.post(f"{TRIGGER}?wait=30", headers=auth)
    assert again.status == 200


async def test_flaky_network_to_redis_gives_503_never_a_hang(
    make_client: Any, auth: dict[str, str], redis_url: str
) -> None:
    proxy = await FlakyProxy(redis_url).start()
    try:
        client = await make_client(SYNCLOCK_REDIS_URL=proxy.url, SYNCLOCK_REDIS_TIMEOUT="300ms")
        status_path = "/admin/pricing/scheduler/status"
        seen: dict[str, tuple[int, float]] = {}

        proxy.mode, proxy.delay_s = "slow", 0.05  # latency under the timeout: still served
        elapsed, slow = await timed(client.get(status_path, headers=auth))
        seen["slow"] = (slow.status, elapsed)
        for mode in ("blackhole", "reset"):
            proxy.mode = mode
            elapsed, answer = await timed(client.post(TRIGGER, headers=auth))
            seen[mode] = (answer.status, elapsed)
            proxy.cut_all()

        proxy.mode = "pass"
        for _ in range(40):  # the unanswered grant is released in the background
            state = await client.get(status_path, headers=auth)
            if state.status == 200 and not (await state.json())["lock"]["held"]:
                break
            await asyncio.sleep(0.1)
        healed = await client.post(f"{TRIGGER}?wait=30", headers=auth)
    finally:
        await proxy.close()

    assert seen["slow"][0] == 200
    assert seen["blackhole"][0] == 503 and seen["blackhole"][1] < 1.0
    assert seen["reset"][0] == 503 and seen["reset"][1] < 1.0
    assert healed.status == 200
