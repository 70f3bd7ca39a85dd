"""Fault injection on real processes: storms, kills, pauses, restarts, shutdown.

Replicas are ``synclock serve`` subprocesses on a Redis and a Postgres that this
module starts on free loopback ports; the tests kill, pause and restart them.
Leases are short (1 s) so a lapse takes a second, not the production 30.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from service.lock import LeaseLock
from service.runtime import connect_redis
from tests.fault_cluster import TTL_S, Cluster, call, until
from tests.replicas import GatedUpstream, priced, utc_now
from tests.servers import ThrowawayPostgres, ThrowawayRedis

# Several real server processes on a two-core machine: one rerun absorbs an OS
# scheduling stall. A rerun is printed ("R", "1 rerun"), and a second failure fails.
pytestmark = pytest.mark.flaky(reruns=1)

TRIGGER = "/admin/pricing/scheduler/trigger"
LOCK = "pricing-sync"


@pytest.fixture(scope="module")
def fault_redis() -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fault_pg() -> Iterator[ThrowawayPostgres]:
    server = ThrowawayPostgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def upstream_t() -> Iterator[GatedUpstream]:
    server = GatedUpstream()
    yield server
    server.close()


@pytest.fixture
def cluster(
    fault_redis: ThrowawayRedis, fault_pg: ThrowawayPostgres, tmp_path: Path
) -> Iterator[Cluster]:
    made = Cluster(fault_redis, fault_pg, tmp_path)
    yield made
    for replica in made.replicas:
        replica.stop(signal.SIGKILL, timeout_s=10)
    for server in (fault_redis, fault_pg):  # a test that stopped one leaves it up again
        if server.process is None:
            server.start()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        yield session


async def test_storm_1000_triggers_over_3_replicas_one_run(
    cluster: Cluster, upstream_t: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    upstream_t.default = "gate"
    replicas = cluster.start("r1", "r2", "r3", SYNCLOCK_SOURCES=f"slow={upstream_t.url}")

    answers = await asyncio.gather(
        *(call(http, "POST", replicas[i % 3].url + TRIGGER) for i in range(1000)),
        return_exceptions=True,
    )
    upstream_t.gate.set()
    opened = utc_now()

    errors = [a for a in answers if isinstance(a, BaseException)]
    assert errors == []
    statuses = Counter(status for status, _, _ in answers)  # type: ignore[misc]
    assert statuses == {202: 1, 429: 999}
    started = [body for status, _, body in answers if status == 202]  # type: ignore[misc]
    run_id = started[0]["run_id"]
    for status, headers, body in answers:  # type: ignore[misc]
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
            assert body["running_run_id"] == run_id
    try:
        run = await cluster.settled(run_id)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ngate opened {opened}; {upstream_t.history}") from None
    assert run["status"] == "succeeded"
    assert len(await cluster.rows("SELECT id FROM sync_runs")) == 1


async def test_holder_killed_mid_sync_is_abandoned_and_writes_stay_whole(
    cluster: Cluster, upstream_t: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    upstream_t.modes = ["gate"]  # the first sync stalls on its second source
    a, b = cluster.start("a", "b", SYNCLOCK_SOURCES=f"genai-prices,slow={upstream_t.url}")
    _, _, started = await call(http, "POST", a.url + TRIGGER)
    await asyncio.to_thread(upstream_t.arrived.wait, 10)  # genai-prices is written

    a.stop(signal.SIGKILL)
    await asyncio.sleep(TTL_S + 0.3)  # its lease lapses on the server
    status, _, second = await call(http, "POST", b.url + TRIGGER + "?wait=20")

    assert status == 200 and second["status"] == "succeeded"
    dead = await cluster.run(started["run_id"])
    assert dead["status"] == "abandoned"
    assert second["fence"] > started["fence"]
    by_source = {
        r["source"]: r["n"]
        for r in await cluster.rows("SELECT source, count(*) AS n FROM model_prices GROUP BY 1")
    }
    genai_seen = next(s["seen"] for s in second["sources"] if s["source"] == "genai-prices")
    assert by_source == {"genai-prices": genai_seen, "slow": 3}


@pytest.mark.parametrize("pause_at", ["before_first_write", "after_first_source"])
async def test_paused_holder_is_fenced_out_after_a_newer_sync(
    cluster: Cluster, upstream_t: GatedUpstream, http: aiohttp.ClientSession, pause_at: str
) -> None:
    sources = f"slow={upstream_t.url}"
    if pause_at == "after_first_source":
        sources = f"genai-prices,{sources}"
    upstream_t.modes = ["gate", "ok"]
    upstream_t.payloads = [priced("0.000001", "m1", "m2"), priced("0.000002", "m1", "m2")]
    a, b = cluster.start("a", "b", SYNCLOCK_SOURCES=sources)
    _, _, old = await call(http, "POST", a.url + TRIGGER)
    await asyncio.to_thread(upstream_t.arrived.wait, 10)

    a.send(signal.SIGSTOP)  # paused between its grant (or first write) and the next
    try:
        await asyncio.sleep(TTL_S + 0.3)
        status, _, newer = await call(http, "POST", b.url + TRIGGER + "?wait=20")
        upstream_t.gate.set()  # the old holder's answer is waiting for it
    finally:
        a.send(signal.SIGCONT)
    stale = await cluster.settled(old["run_id"], pending=("running", "abandoned"))

    assert status == 200 and newer["status"] == "succeeded"
    assert newer["fence"] > old["fence"]
    # Whether its renewal or its write notices first, the old run never writes.
    assert stale["status"] in ("fenced_out", "lost_lease")
    rows = await cluster.rows(
        "SELECT fence, input_usd_per_mtok FROM model_prices WHERE source = 'slow'"
    )
    assert {r["fence"] for r in rows} == {newer["fence"]}
    assert {str(r["input_usd_per_mtok"]) for r in rows} == {"2"}


async def test_redis_restart_between_and_during_runs(
    cluster: Cluster, upstream_t: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    (a,) = cluster.start("a", SYNCLOCK_SOURCES=f"slow={upstream_t.url}")
    _, _, first = await call(http, "POST", a.url + TRIGGER + "?wait=20")

    cluster.redis.stop(signal.SIGKILL)
    began = time.monotonic()
    status, headers, body = await call(http, "POST", a.url + TRIGGER)
    refused_in = time.monotonic() - began
    ready, _, _ = await call(http, "GET", a.url + "/readyz")
    cluster.redis.start()  # empty: no keys, no fence counter, no scripts
    _, _, second = await call(http, "POST", a.url + TRIGGER + "?wait=20")

    assert first["status"] == "succeeded"
    assert status == 503 and refused_in < 1.0 and headers["Retry-After"] == "1"
    assert body["type"].endswith("backend-unavailable") and ready == 503
    assert second["status"] == "succeeded" and second["fence"] > first["fence"]

    upstream_t.modes = ["gate"]
    _, _, during = await call(http, "POST", a.url + TRIGGER)
    await asyncio.to_thread(upstream_t.arrived.wait, 10)
    cluster.redis.stop(signal.SIGKILL)
    cluster.redis.start()  # the lease is gone with the data
    lost = await cluster.settled(during["run_id"])
    upstream_t.gate.set()
    _, _, third = await call(http, "POST", a.url + TRIGGER + "?wait=20")

    assert lost["status"] == "lost_lease"
    assert third["status"] == "succeeded" and third["fence"] > during["fence"]


async def test_postgres_stopped_between_and_during_runs(
    cluster: Cluster, upstream_t: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    (a,) = cluster.start("a", SYNCLOCK_SOURCES=f"slow={upstream_t.url}")

    cluster.pg.stop()
    began = time.monotonic()
    status, _, body = await call(http, "POST", a.url + TRIGGER)
    refused_in = time.monotonic() - began
    lock_keys = await cluster.lock_keys()
    cluster.pg.start()

    assert status == 503 and refused_in < 2.0 and body["backend"] == "postgres"
    assert lock_keys == []  # the grant was given back

    upstream_t.modes = ["gate"]
    _, _, during = await call(http, "POST", a.url + TRIGGER)
    await asyncio.to_thread(upstream_t.arrived.wait, 10)
    cluster.pg.stop()
    upstream_t.gate.set()  # the write and the final record both fail now
    await asyncio.sleep(1.5)
    cluster.pg.start()
    closed = await cluster.settled(during["run_id"], timeout_s=20)  # the reaper writes it

    assert closed["status"] == "failed"
    assert closed["finished_at"] is not None
    assert a.events("run_record_deferred")
    assert await cluster.lock_keys() == []


async def test_sigterm_interrupts_a_long_sync_and_releases_its_lease(
    cluster: Cluster, upstream_t: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    upstream_t.default = "gate"
    (a,) = cluster.start("a", SYNCLOCK_SOURCES=f"slow={upstream_t.url}")
    _, _, running = await call(http, "POST", a.url + TRIGGER)
    await asyncio.to_thread(upstream_t.arrived.wait, 10)

    began = time.monotonic()
    a.send(signal.SIGTERM)
    await asyncio.sleep(0.2)
    try:  # readiness fails first: the listener is closed while the sync drains
        ready: Any = (await call(http, "GET", a.url + "/readyz"))[0]
    except aiohttp.ClientConnectionError as refused:
        ready = type(refused).__name__
    still_draining = a.process is not None and a.process.poll() is None
    code = await asyncio.to_thread(a.wait_exit, 20)
    took = time.monotonic() - began
    record = await cluster.run(running["run_id"])

    assert ready in (503, "ClientConnectorError")
    assert still_draining
    assert code == 0
    assert took < 2.0 + 3.0  # the grace period, plus start-up of the cleanup
    assert record["status"] == "interrupted"
    assert await cluster.lock_keys() == []
    [stopping] = a.events("shutting_down")
    assert stopping["running_run_id"] == str(record["id"]) and len(a.events("stopped")) == 1


async def test_client_gone_during_wait_keeps_the_run(
    cluster: Cluster, upstream_t: GatedUpstream, http: aiohttp.ClientSession
) -> None:
    upstream_t.modes = ["gate"]
    (a,) = cluster.start("a", SYNCLOCK_SOURCES=f"slow={upstream_t.url}")
    waiting = asyncio.create_task(call(http, "POST", a.url + TRIGGER + "?wait=20"))
    await asyncio.to_thread(upstream_t.arrived.wait, 10)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    upstream_t.gate.set()
    runs = await until(
        lambda: cluster.rows("SELECT status FROM sync_runs WHERE status <> 'running'"),
        20,
        "the run to finish",
    )
    assert [r["status"] for r in runs] == ["succeeded"]


async def test_case25_simultaneous_schedulers_one_run_per_round(cluster: Cluster) -> None:
    """Many rounds of two replicas' schedulers firing in the same instant."""
    from service.records import RunStatus, Trigger
    from service.store import Store
    from service.sync.job import SyncJob, SyncRunning

    store = await Store.connect(cluster.pg.url, schema=cluster.schema, timeout_s=5)
    await store.migrate()
    client = connect_redis(cluster.redis.url, 2.0)
    jobs = [
        SyncJob(
            lock=LeaseLock(client, prefix=cluster.prefix, max_ttl_ms=60_000),
            store=store,
            sources=[],
            lock_name=LOCK,
            lease_ttl_ms=5_000,
            instance=name,
        )
        for name in ("x", "y")
    ]
    try:
        for job in jobs:
            await job.start()
        for _ in range(1000):
            outcomes = await asyncio.gather(
                *(job.trigger(Trigger.SCHEDULED, "scheduler") for job in jobs),
                return_exceptions=True,
            )
            started = [o for o in outcomes if not isinstance(o, BaseException)]
            assert len(started) == 1
            assert all(isinstance(o, SyncRunning) for o in outcomes if o not in started)
            finished = await jobs[0].wait(started[0].run_id, 10)
            assert finished is not None and finished.status is RunStatus.SUCCEEDED
        fences = await store.db.pool.fetch("SELECT fence FROM sync_runs")
        assert len(fences) == 1000
        assert len({r["fence"] for r in fences}) == 1000
    finally:
        for job in jobs:
            await job.close(5)
        await client.aclose()
        await store.close()
