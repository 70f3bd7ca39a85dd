"""The sync job on real Redis and Postgres: real catalog, fence, lease loss,
deactivation rules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.errors import FencedOut
from service.lock import LeaseLock
from service.records import NewRun, PriceRecord, RunStatus, Trigger
from service.store import Store
from service.sync.job import SyncJob, SyncRunning
from service.sync.sources import Catalog, Source
from service.sync.sources.genai import GenaiPricesSource

LOCK = "pricing-sync"


def record(model: str, price: str = "1", provider: str = "acme") -> PriceRecord:
    return PriceRecord(
        provider=provider,
        model_id=model,
        name=model.upper(),
        input_usd_per_mtok=Decimal(price),
        output_usd_per_mtok=Decimal(price) * 2,
        cached_input_usd_per_mtok=None,
        context_window=8192,
    )


class ListSource:
    """Upstream stand-in: returns what the test sets, optionally after a gate opens."""

    def __init__(self, name: str = "acme", records: list[PriceRecord] | None = None) -> None:
        self.name = name
        self.records = records or []
        self.gate: asyncio.Event | None = None
        self.fetching = asyncio.Event()

    async def fetch(self) -> Catalog:
        self.fetching.set()
        if self.gate is not None:
            await self.gate.wait()
        return Catalog(records=tuple(self.records), rejected=0)


@pytest.fixture
async def make_job(
    real_redis: aioredis.Redis, prefix: str, store: Store
) -> AsyncIterator[Callable[..., Any]]:
    jobs: list[SyncJob] = []

    async def make(
        sources: list[Source], *, ttl_ms: int = 5_000, instance: str = "a", lock: Any = None
    ) -> SyncJob:
        job = SyncJob(
            lock=lock or LeaseLock(real_redis, prefix=prefix, max_ttl_ms=600_000),
            store=store,
            sources=sources,
            lock_name=LOCK,
            lease_ttl_ms=ttl_ms,
            instance=instance,
        )
        await job.start()
        jobs.append(job)
        return job

    yield make
    for job in jobs:
        await job.close(5)


async def run(job: SyncJob) -> Any:
    started = await job.trigger(Trigger.MANUAL, "test")
    finished = await job.wait(started.run_id, 60)
    assert finished is not None
    return finished


async def test_genai_catalog_syncs_then_rerun_changes_nothing(make_job: Any, store: Store) -> None:
    job = await make_job([GenaiPricesSource()])

    first = await run(job)
    second = await run(job)

    assert first.status is RunStatus.SUCCEEDED
    assert first.counts.seen > 2_000
    assert first.counts.added == first.counts.seen
    assert second.status is RunStatus.SUCCEEDED
    assert (second.counts.added, second.counts.changed, second.counts.deactivated) == (0, 0, 0)
    assert second.counts.unchanged == first.counts.seen
    async with store.db.connection() as conn:
        claude = await conn.fetchrow(
            "SELECT * FROM model_prices WHERE provider = 'anthropic' AND model_id = 'claude-2'"
        )
        changes = await conn.fetchval("SELECT count(*) FROM model_price_changes")
        providers = await conn.fetchval("SELECT count(DISTINCT provider) FROM model_prices")
    assert claude["input_usd_per_mtok"] == Decimal("8")
    assert claude["output_usd_per_mtok"] == Decimal("24")
    assert claude["fence"] == first.fence
    assert changes == first.counts.seen  # first-seen prices are changes too
    assert providers >= 40


async def test_second_trigger_while_running_is_refused(make_job: Any) -> None:
    source = ListSource(records=[record("m1")])
    source.gate = asyncio.Event()
    job = await make_job([source])
    other = await make_job([source], instance="b")

    started = await job.trigger(Trigger.MANUAL, "test")
    with pytest.raises(SyncRunning) as local:
        await job.trigger(Trigger.MANUAL, "test")
    with pytest.raises(SyncRunning) as remote:
        await other.trigger(Trigger.MANUAL, "test")
    source.gate.set()
    finished = await job.wait(started.run_id, 10)

    assert local.value.holder.run_id == started.run_id
    assert remote.value.holder.run_id == started.run_id
    assert remote.value.holder.owner == "a"
    assert finished is not None and finished.status is RunStatus.SUCCEEDED


async def test_fence_keeps_rising_after_redis_loses_its_keys(
    make_job: Any, real_redis: aioredis.Redis, prefix: str
) -> None:
    job = await make_job([ListSource(records=[record("m1")])])
    fences = [(await run(job)).fence for _ in range(3)]
    keys = [k async for k in real_redis.scan_iter(match=f"{prefix}*")]
    await real_redis.delete(*keys)  # as after a restart without persistence

    restarted = await make_job([ListSource(records=[record("m1")])], instance="b")
    after = await run(restarted)

    assert fences == [1, 2, 3]
    assert after.fence == 4
    assert after.status is RunStatus.SUCCEEDED


async def test_fence_floor_survives_even_a_stale_cached_floor(
    make_job: Any, real_redis: aioredis.Redis, prefix: str
) -> None:
    stale = await make_job([ListSource(records=[record("m1")])], instance="stale")
    fresh = await make_job([ListSource(records=[record("m1")])], instance="fresh")
    for _ in range(3):
        await run(fresh)
    keys = [k async for k in real_redis.scan_iter(match=f"{prefix}*")]
    await real_redis.delete(*keys)

    # "stale" cached floor 0 at start; Redis now hands out 1; Postgres says 3.
    after = await run(stale)

    assert after.fence == 4
    assert after.status is RunStatus.SUCCEEDED


async def test_stale_holder_write_is_rejected_and_writes_nothing(store: Store) -> None:
    await store.begin_run(
        NewRun("00000000-0000-4000-8000-000000000001", LOCK, Trigger.MANUAL, "t", 7, "a")
    )
    await store.begin_run(
        NewRun("00000000-0000-4000-8000-000000000002", LOCK, Trigger.MANUAL, "t", 8, "b")
    )

    with pytest.raises(FencedOut) as refused:
        await store.apply_prices(
            lock_name=LOCK,
            fence_token=7,
            run_id="00000000-0000-4000-8000-000000000001",
            source="acme",
            records=[record("m1")],
        )
    with pytest.raises(FencedOut):
        await store.begin_run(
            NewRun("00000000-0000-4000-8000-000000000003", LOCK, Trigger.MANUAL, "t", 8, "c")
        )

    assert refused.value.accepted == 8
    async with store.db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM model_prices") == 0
        assert await conn.fetchval("SELECT count(*) FROM model_price_changes") == 0
        first = await conn.fetchval("SELECT status FROM sync_runs WHERE fence = 7")
    assert first == "abandoned"  # closed when the newer holder began


class _StuckRenewals(LeaseLock):
    """A lock whose renewals never come back: a holder paused or cut off from Redis."""

    async def extend(self, lease: Any, ttl_ms: int) -> Any:
        await asyncio.Event().wait()


async def test_case15_lease_lapses_mid_sync_newer_holder_fences_old_out(
    make_job: Any, real_redis: aioredis.Redis, prefix: str, store: Store
) -> None:
    slow = ListSource(records=[record("m1", "1")])
    slow.gate = asyncio.Event()
    stuck = _StuckRenewals(real_redis, prefix=prefix, max_ttl_ms=600_000)
    old_job = await make_job([slow], ttl_ms=300, instance="old", lock=stuck)
    new_job = await make_job([ListSource(records=[record("m1", "2")])], instance="new")

    old = await old_job.trigger(Trigger.MANUAL, "test")
    await slow.fetching.wait()  # the old holder sits between its grant and first write
    await asyncio.sleep(0.4)  # its lease lapses on the server
    newer = await run(new_job)
    slow.gate.set()  # the old holder wakes up and tries to write
    old_run = await old_job.wait(old.run_id, 10)

    assert newer.status is RunStatus.SUCCEEDED and newer.fence > old.fence
    assert old_run is not None and old_run.status is RunStatus.FENCED_OUT
    async with store.db.connection() as conn:
        row = await conn.fetchrow("SELECT * FROM model_prices WHERE model_id = 'm1'")
    assert row["input_usd_per_mtok"] == Decimal("2")
    assert row["fence"] == newer.fence


async def test_forced_release_mid_sync_ends_run_lost_lease(make_job: Any, store: Store) -> None:
    slow = ListSource(records=[record("m1")])
    slow.gate = asyncio.Event()
    job = await make_job([slow], ttl_ms=300)

    started = await job.trigger(Trigger.MANUAL, "test")
    await slow.fetching.wait()
    holder = await job.force_release("test: stuck", "tester")
    finished = await job.wait(started.run_id, 5)

    assert holder is not None and holder.run_id == started.run_id
    assert finished is not None and finished.status is RunStatus.LOST_LEASE
    async with store.db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM model_prices") == 0


async def test_model_deactivated_after_three_complete_runs_without_it(
    make_job: Any, store: Store
) -> None:
    source = ListSource(records=[record(f"m{i}") for i in range(10)])
    job = await make_job([source])
    await run(job)
    source.records = source.records[:9]  # m9 disappears upstream

    counts = [(await run(job)).counts.deactivated for _ in range(3)]
    source.records = [record(f"m{i}") for i in range(10)]
    back = await run(job)

    assert counts == [0, 0, 1]
    assert back.counts.changed == 1  # reactivated
    async with store.db.connection() as conn:
        kinds = [
            r["change"]
            for r in await conn.fetch(
                "SELECT change FROM model_price_changes WHERE model_id = 'm9' ORDER BY id"
            )
        ]
    assert kinds == ["added", "deactivated", "reactivated"]


async def test_source_returning_under_half_never_deactivates(make_job: Any, store: Store) -> None:
    source = ListSource(records=[record(f"m{i}") for i in range(10)])
    job = await make_job([source])
    await run(job)
    source.records = source.records[:4]  # a truncated upstream answer

    results = [await run(job) for _ in range(4)]

    assert [r.counts.deactivated for r in results] == [0, 0, 0, 0]
    async with store.db.connection() as conn:
        active = await conn.fetchval("SELECT count(*) FROM model_prices WHERE active")
    assert active == 10


async def test_changed_price_is_recorded_with_before_and_after(make_job: Any, store: Store) -> None:
    source = ListSource(records=[record("m1", "1.50")])
    job = await make_job([source])
    await run(job)
    source.records = [record("m1", "1.25")]

    changed = await run(job)

    assert (changed.counts.changed, changed.counts.unchanged) == (1, 0)
    async with store.db.connection() as conn:
        last = await conn.fetchrow(
            "SELECT before, after FROM model_price_changes ORDER BY id DESC LIMIT 1"
        )
    assert Decimal(str(last["before"]["input_usd_per_mtok"])) == Decimal("1.5")
    assert Decimal(str(last["after"]["input_usd_per_mtok"])) == Decimal("1.25")


async def test_every_source_failing_is_failed_not_success(make_job: Any) -> None:
    class Broken:
        name = "broken"

        async def fetch(self) -> Catalog:
            from service.sync.sources import SourceError

            raise SourceError("broken: HTTP 500")

    result = await run(await make_job([Broken()]))

    assert result.status is RunStatus.FAILED
    assert "HTTP 500" in (result.error or "")


async def test_dead_holders_run_is_abandoned_once_its_lease_is_gone(
    make_job: Any, store: Store
) -> None:
    await store.begin_run(
        NewRun(
            "00000000-0000-4000-8000-0000000000aa",
            LOCK,
            Trigger.SCHEDULED,
            "scheduler",
            1,
            "crashed",
        )
    )
    job = await make_job([ListSource()])  # start() reaps

    record_ = await store.get_run("00000000-0000-4000-8000-0000000000aa")

    assert record_ is not None and record_.status is RunStatus.ABANDONED
    assert job.running_locally() is None


class _CountingLock(LeaseLock):
    calls = 0

    async def try_acquire(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await super().try_acquire(*args, **kwargs)


async def test_concurrent_contended_triggers_share_one_redis_answer(
    make_job: Any, real_redis: aioredis.Redis, prefix: str
) -> None:
    other = LeaseLock(real_redis, prefix=prefix, max_ttl_ms=600_000)
    await other.try_acquire(LOCK, 10_000, owner="replica-z", run_id="run-z")
    counting = _CountingLock(real_redis, prefix=prefix, max_ttl_ms=600_000)
    job = await make_job([ListSource()], lock=counting)

    answers = await asyncio.gather(
        *(job.trigger(Trigger.MANUAL, "t") for _ in range(100)), return_exceptions=True
    )

    assert all(isinstance(a, SyncRunning) for a in answers)
    assert {a.holder.owner for a in answers if isinstance(a, SyncRunning)} == {"replica-z"}
    assert counting.calls < 20  # one call per round trip, not one per caller


async def test_shared_attempt_passes_its_failure_to_every_waiter(
    make_job: Any, real_redis: aioredis.Redis, prefix: str
) -> None:
    from service.errors import BackendUnavailable
    from service.runtime import connect_redis

    dead = connect_redis("redis://127.0.0.1:1/0", 0.2)
    job = await make_job([ListSource()], lock=LeaseLock(dead, prefix=prefix, max_ttl_ms=60_000))

    answers = await asyncio.gather(
        *(job.trigger(Trigger.MANUAL, "t") for _ in range(20)), return_exceptions=True
    )

    assert all(isinstance(a, BackendUnavailable) for a in answers)
    await dead.aclose()
