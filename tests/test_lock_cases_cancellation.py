"""Cancellation cases 8, 9 and 10 of ../shared/cases/lock-cases.md.

A lease release, a Redis command or an HTTP request is cancelled at a random
point: before it is sent, while it waits for the reply, or after the reply came.
Each test asserts what a caller can observe: who holds a lease, which answer a
request got, and whether the Redis pool is whole again once the storm is over.
Random choices use fixed seeds; every loop and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from service.http.keys import RUNTIME
from service.lock import Holder, Lease, LeaseLock, LockState
from service.runtime import Runtime
from tests.conftest import MAX_TTL_MS
from tests.lock_case_helpers import STATUS, TRIGGER, eventually

SERVICE_LOCK = "pricing-sync"  # the service's default SYNCLOCK_LOCK_NAME


# -- helpers --------------------------------------------------------------------


async def cancel_point(rng: random.Random) -> None:
    """Let a just-started task run for 0 to 11 event-loop turns. On loopback that
    spans: never started, sent but not answered, answered but not yet returned."""
    for _ in range(rng.randrange(0, 12)):
        await asyncio.sleep(0)


def redis_in_use(client: aioredis.Redis) -> int:
    """Connections the redis-py pool has handed out and not yet taken back."""
    return len(client.connection_pool._in_use_connections)


async def drained(lock: LeaseLock, timeout_s: float) -> bool:
    """Wait for the background releases of unanswered acquires to end."""

    async def done() -> bool:
        return not lock._cleanups

    return await eventually(done, timeout_s)


# -- case 8: release cancelled mid-call ---------------------------------------------

RELEASE_ROUNDS = 500


async def test_case8_cancelled_release_leaves_lease_whole_and_retry_works(
    real_redis: aioredis.Redis, prefix: str
) -> None:
    lock = LeaseLock(real_redis, prefix=prefix, max_ttl_ms=MAX_TTL_MS)
    lock_key, _, holder_key = lock.keys("sync")
    rng = random.Random(8)
    seen: Counter[str] = Counter()
    previous_fence = 0

    for _ in range(RELEASE_ROUNDS):
        lease = await lock.try_acquire("sync", 10_000, owner="a", run_id="r")
        assert isinstance(lease, Lease), lease  # the previous round left nothing behind
        assert lease.fence == previous_fence + 1
        previous_fence = lease.fence

        release = asyncio.create_task(lock.release(lease))
        await cancel_point(rng)
        release.cancel()
        await asyncio.wait({release})

        token = await real_redis.get(lock_key)
        state = await lock.state("sync")
        if token is None:
            assert state.held is False
            assert await real_redis.exists(holder_key) == 0
        else:
            assert token == lease.token.encode()
            assert state.holder is not None
            assert (state.holder.owner, state.holder.fence) == ("a", lease.fence)
        retried = await lock.release(lease)
        assert await real_redis.exists(lock_key, holder_key) == 0
        if token is None:
            assert retried is False
        outcome = "cancelled" if release.cancelled() else "finished"
        seen[f"{outcome}, {'held' if token else 'gone'}"] += 1

    # The cancellations landed both before and after Redis ran the script.
    assert seen["cancelled, held"] > 0 and seen["cancelled, gone"] > 0, seen

    async def pool_idle() -> bool:
        return redis_in_use(real_redis) == 0

    assert await eventually(pool_idle, 2.0)


# -- case 9: commands cancelled between send and reply ------------------------------

WORKERS = 40
OPS_PER_WORKER = 60
CANCEL_SHARE = 0.3
SMALL_POOL = 4


@pytest.fixture
async def small_pool_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client on a 4-connection pool, so every connection serves many callers."""
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url, max_connections=SMALL_POOL, timeout=5.0
    )
    client = aioredis.Redis.from_pool(pool)
    yield client
    await client.aclose()


async def test_case9_cancelled_commands_never_answer_another_request(
    small_pool_redis: aioredis.Redis, real_redis: aioredis.Redis, prefix: str
) -> None:
    client = small_pool_redis
    lock = LeaseLock(client, prefix=prefix, max_ttl_ms=MAX_TTL_MS)
    rng = random.Random(9)
    answered: Counter[str] = Counter()
    cancelled: Counter[str] = Counter()
    for index in range(WORKERS):
        await real_redis.set(f"{prefix}own:{index}", f"value-{index}")

    async def worker(index: int) -> None:
        """One caller on its own lock name; every answer it gets must be its own."""
        name, owner = f"w{index}", f"owner-{index}"
        granted: list[Lease] = []
        highest_fence = 0
        for step in range(OPS_PER_WORKER):
            op = rng.choice(("acquire", "state", "release", "echo", "get"))
            if op == "release" and not granted:
                op = "echo"
            payload = f"{owner}/{step}"
            call: Awaitable[Any]
            if op == "acquire":
                call = lock.try_acquire(name, 1_000, owner=owner, run_id=payload)
            elif op == "state":
                call = lock.state(name)
            elif op == "release":
                call = lock.release(granted[-1])
            elif op == "echo":
                call = client.echo(payload)
            else:
                call = client.get(f"{prefix}own:{index}")
            task = asyncio.ensure_future(call)
            if rng.random() < CANCEL_SHARE:
                await cancel_point(rng)
                task.cancel()
            await asyncio.wait({task})
            if task.cancelled():
                cancelled[op] += 1
                continue

            answer = task.result()
            answered[op] += 1
            if isinstance(answer, Lease):
                assert answer.fence > highest_fence, (index, answer)
                assert 0 < answer.remaining_ms <= 1_000
                highest_fence = answer.fence
                granted.append(answer)
            elif isinstance(answer, Holder):  # our own lease, possibly a cancelled grant's
                assert answer.owner == owner and answer.run_id.startswith(f"{owner}/"), answer
                assert answer.fence >= highest_fence
            elif isinstance(answer, LockState):
                assert answer.last_fence >= highest_fence, (index, answer)
                if answer.holder is not None:
                    assert answer.holder.owner == owner, (index, answer)
                    assert answer.holder.run_id.startswith(f"{owner}/")
            elif op == "release":
                assert isinstance(answer, bool)
            elif op == "echo":
                assert answer == payload.encode()
            else:
                assert answer == f"value-{index}".encode()

    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(worker(index) for index in range(WORKERS)))
        assert await drained(lock, 3.0)  # each background release stops within 1 s
    finally:
        await lock.aclose()

    assert sum(cancelled.values()) > 0 and set(answered) == {
        "acquire",
        "state",
        "release",
        "echo",
        "get",
    }, (answered, cancelled)

    async def pool_idle() -> bool:
        return redis_in_use(client) == 0

    assert await eventually(pool_idle, 2.0)
    lock_keys = [key async for key in real_redis.scan_iter(match=f"{prefix}lock:*")]
    for key in lock_keys:
        assert await real_redis.pttl(key) != -1  # no lease without a TTL (-2: just expired)


# -- case 10: a storm of cancelled HTTP requests on a small Redis pool --------------

LIVE_REQUESTS = 200
CANCELLED_REQUESTS = 1_000
CLIENT_CONNECTIONS = 200


def acceptable(status: int) -> bool:
    return 200 <= status < 300 or 400 <= status < 500 or status == 503


async def test_case10_cancelled_requests_give_no_5xx_and_leave_the_redis_pool_empty(
    make_client: Any,
    auth: dict[str, str],
    real_redis: aioredis.Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("service.runtime.REDIS_MAX_CONNECTIONS", SMALL_POOL)
    client = await make_client(SYNCLOCK_LOCK_TTL="1s")
    runtime: Runtime = client.app[RUNTIME]
    assert runtime.redis.connection_pool.max_connections == SMALL_POOL
    # Another replica holds the lock, so every trigger asks Redis and gets a 429.
    other = LeaseLock(real_redis, prefix=prefix, max_ttl_ms=MAX_TTL_MS)
    held = await other.try_acquire(SERVICE_LOCK, 60_000, owner="other-replica", run_id="")
    assert isinstance(held, Lease)
    rng = random.Random(10)
    plan = [True] * CANCELLED_REQUESTS + [False] * LIVE_REQUESTS
    rng.shuffle(plan)
    routes = [("GET", STATUS), ("GET", "/readyz"), ("POST", TRIGGER)]

    connector = aiohttp.TCPConnector(limit=CLIENT_CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(method: str, path: str) -> tuple[str, int, str | None]:
            url = client.make_url(path)
            async with session.request(method, url, headers=auth) as response:
                await response.read()
                return path, response.status, response.headers.get("Retry-After")

        loop = asyncio.get_running_loop()
        tasks: list[tuple[bool, asyncio.Task[tuple[str, int, str | None]]]] = []
        for to_cancel in plan:
            task = asyncio.create_task(call(*rng.choice(routes)))
            if to_cancel:
                loop.call_later(rng.uniform(0, 0.05), task.cancel)
            tasks.append((to_cancel, task))
        _, pending = await asyncio.wait([task for _, task in tasks], timeout=30)
        assert not pending

    answers = [task.result() for _, task in tasks if not task.cancelled()]
    live = [task.result() for to_cancel, task in tasks if not to_cancel]
    cut_off = sum(task.cancelled() for _, task in tasks)
    assert len(live) == LIVE_REQUESTS
    assert cut_off > CANCELLED_REQUESTS // 2  # most were cut off in flight, not after
    assert all(acceptable(status) for _, status, _ in answers), Counter(answers)
    # The problem documents say when to come back (a failed /readyz is a probe answer).
    assert all(
        retry for path, status, retry in answers if status in (429, 503) and path != "/readyz"
    ), Counter(answers)

    assert await drained(runtime.lock, 3.0)

    async def pool_idle() -> bool:
        return redis_in_use(runtime.redis) == 0

    assert await eventually(pool_idle, 3.0), redis_in_use(runtime.redis)
    lock_key = other.keys(SERVICE_LOCK)[0]
    assert await real_redis.get(lock_key) == held.token.encode()  # holder undisturbed
    status = await client.get(STATUS, headers=auth)
    assert status.status == 200
    assert (await status.json())["lock"]["holder"]["owner"] == "other-replica"
