"""Case 20 of ../shared/cases/lock-cases.md: Redis unreachable during a release.

A throwaway Redis behind a loopback proxy is refused (killed), stalled (stopped)
or partitioned while a forced release or a run's own final release is under way.
Each test asserts what a caller can observe: which answer a request got, who
holds the lease afterwards, and which status a run record ends with, written
once. Every wait is bounded.
"""

from __future__ import annotations

import io
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service import metrics
from service.http.keys import RUNTIME
from service.runtime import Runtime
from tests.lock_case_helpers import LOCK, RUNS, STATUS, TRIGGER, LoopbackProxy, eventually
from tests.servers import ThrowawayRedis
from tests.upstream import Upstream

PROBLEM = "application/problem+json"


# -- case 20: Redis unreachable during a release ------------------------------------

REASON = {"reason": "stuck after deploy"}


class RedisOutage:
    """A throwaway Redis reached through a LoopbackProxy, and three ways to lose it:

    * ``refused``: the server is killed; it comes back empty (no persistence);
    * ``stalled``: the server is stopped; sent commands wait and run when it resumes;
    * ``partition``: the proxy drops and refuses connections; Redis keeps its data
      and sees no command until the path is restored.
    """

    def __init__(self, server: ThrowawayRedis, proxy: LoopbackProxy) -> None:
        self.server = server
        self.proxy = proxy

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.proxy.port}/0"

    async def begin(self, kind: str) -> None:
        if kind == "refused":
            self.server.stop(signal.SIGKILL)
        elif kind == "stalled":
            assert self.server.process is not None
            self.server.process.send_signal(signal.SIGSTOP)
        else:
            await self.proxy.cut()

    async def end(self, kind: str) -> None:
        if kind == "refused":
            self.server.start()
        elif kind == "stalled":
            if self.server.process is not None:
                self.server.process.send_signal(signal.SIGCONT)
        else:
            await self.proxy.restore()


@pytest.fixture
async def redis_outage() -> AsyncIterator[RedisOutage]:
    server = ThrowawayRedis()
    server.start()
    proxy = LoopbackProxy(server.port)
    await proxy.start()
    yield RedisOutage(server, proxy)
    await proxy.close()
    if server.process is not None:
        server.process.send_signal(signal.SIGCONT)  # a stopped server still dies below
    server.stop()


async def gated_client(
    make_client: Any, upstream: tuple[Upstream, str], redis_url: str, **env: str
) -> Any:
    """A replica whose runs hold the lease until the test opens the upstream's gate."""
    fake, url = upstream
    fake.default = "gate"
    return await make_client(SYNCLOCK_REDIS_URL=redis_url, SYNCLOCK_SOURCES=f"slow={url}", **env)


async def start_run(client: Any, auth: dict[str, str]) -> str:
    started = await client.post(TRIGGER, headers=auth)
    assert started.status == 202, await started.text()
    run_id: str = (await started.json())["run_id"]
    return run_id


async def finished_run(client: Any, auth: dict[str, str], run_id: str) -> dict[str, Any]:
    """The run record once it is no longer ``running`` (or as it is after 10 s)."""
    record: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal record
        response = await client.get(f"{RUNS}/{run_id}", headers=auth)
        record = await response.json()
        return response.status == 200 and bool(record["status"] != "running")

    await eventually(done, 10.0)
    return record


def runs_counted() -> float:
    """Run endings counted by synclock_sync_runs_total, all outcomes together."""
    return sum(
        sample.value
        for family in metrics.SYNC_RUNS.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


@pytest.mark.parametrize("outage", ["refused", "partition"])
async def test_case20_forced_release_during_redis_outage_is_503_then_succeeds(
    redis_outage: RedisOutage,
    make_client: Any,
    upstream: tuple[Upstream, str],
    auth: dict[str, str],
    outage: str,
) -> None:
    client = await gated_client(make_client, upstream, redis_outage.url)
    run_id = await start_run(client, auth)

    await redis_outage.begin(outage)
    try:
        refused = await client.delete(LOCK, headers=auth, json=REASON)
        body = await refused.json()
        during = await (await client.get(f"{RUNS}/{run_id}", headers=auth)).json()
    finally:
        await redis_outage.end(outage)
    again = await client.delete(LOCK, headers=auth, json=REASON)
    answer = await again.json()
    upstream[0].gate.set()

    assert refused.status == 503
    assert refused.content_type == PROBLEM
    assert int(refused.headers["Retry-After"]) >= 1
    assert body["backend"] == "redis"
    assert during["status"] == "running"  # nothing was released, nothing closed
    assert again.status == 200
    if outage == "partition":  # Redis kept the lease: the retry releases that very lease
        assert answer["released"] is True and answer["holder"]["run_id"] == run_id
    else:  # Redis came back empty: there is nothing left to release
        assert answer["released"] is False
    assert (await finished_run(client, auth, run_id))["status"] == "lost_lease"


@pytest.mark.parametrize("outage", ["refused", "stalled", "partition"])
async def test_case20_run_whose_final_release_fails_is_closed_once(
    redis_outage: RedisOutage,
    make_client: Any,
    upstream: tuple[Upstream, str],
    auth: dict[str, str],
    captured_logs: io.StringIO,
    outage: str,
) -> None:
    client = await gated_client(make_client, upstream, redis_outage.url)
    runtime: Runtime = client.app[RUNTIME]
    run_id = await start_run(client, auth)
    counted = runs_counted()
    logged_before = len(captured_logs.getvalue())

    # Redis goes away while the run works; the run ends long before its lease
    # would be given up for lost (a 30 s TTL), so it tries to release at the end.
    await redis_outage.begin(outage)
    try:
        upstream[0].gate.set()
        first = await finished_run(client, auth, run_id)
    finally:
        await redis_outage.end(outage)

    assert await runtime.job.reap() == 0  # what the reaper does each TTL
    # The finished run's lease may outlive the outage for a moment (the next test);
    # a forced release finds it gone or still the run's own, never anyone else's.
    forced = await client.delete(LOCK, headers=auth, json=REASON)
    assert forced.status == 200
    holder = (await forced.json())["holder"]
    assert holder is None or holder["run_id"] == run_id
    upstream[0].gate.clear()
    next_id = await start_run(client, auth)  # a new holder closes runs left running
    upstream[0].gate.set()
    await finished_run(client, auth, next_id)
    later = await (await client.get(f"{RUNS}/{run_id}", headers=auth)).json()
    listed = await (await client.get(RUNS, headers=auth)).json()

    assert first["status"] == "succeeded"  # the prices were written under a held lease
    assert first["finished_at"] is not None
    assert (later["status"], later["finished_at"]) == (first["status"], first["finished_at"])
    assert [run["id"] for run in listed["runs"]] == [next_id, run_id]
    assert runs_counted() - counted == 2  # one ending each
    logged = captured_logs.getvalue()[logged_before:]
    events = [json.loads(line) for line in logged.splitlines() if line]
    of_run = Counter(e["event"] for e in events if e.get("run_id") == run_id)
    assert of_run["lease_release_failed"] == 1  # the release really met the outage
    assert of_run["sync_finished"] == 1


async def test_case20_finished_runs_lease_is_released_once_redis_answers_again(
    redis_outage: RedisOutage,
    make_client: Any,
    upstream: tuple[Upstream, str],
    auth: dict[str, str],
) -> None:
    """A release that failed in a partition is not left to the TTL: once Redis
    answers, the finished run no longer blocks triggers (a 429 naming it)."""
    client = await gated_client(make_client, upstream, redis_outage.url)
    run_id = await start_run(client, auth)

    await redis_outage.begin("partition")
    try:
        upstream[0].gate.set()
        assert (await finished_run(client, auth, run_id))["status"] == "succeeded"
    finally:
        await redis_outage.end("partition")

    async def lock_free() -> bool:
        status = await client.get(STATUS, headers=auth)
        return status.status == 200 and not (await status.json())["lock"]["held"]

    freed = await eventually(lock_free, 3.0)  # a tenth of the lease's 30 s
    trigger = await client.post(TRIGGER, headers=auth)
    body = await trigger.json()

    assert freed, body
    assert trigger.status == 202, body
    assert (await finished_run(client, auth, body["run_id"]))["status"] == "succeeded"


async def test_case20_shutdown_while_final_release_waits_on_redis_still_closes_the_run(
    redis_outage: RedisOutage,
    make_client: Any,
    upstream: tuple[Upstream, str],
    auth: dict[str, str],
    database_url: str,
    schema: str,
) -> None:
    """A shutdown that cancels the run while its final release waits on a stalled
    Redis still writes the run's real ending, Postgres being up."""
    client = await gated_client(
        make_client,
        upstream,
        redis_outage.url,
        SYNCLOCK_REDIS_TIMEOUT="2s",  # the final release waits this long on a stalled Redis
        SYNCLOCK_SHUTDOWN_TIMEOUT="200ms",
    )
    runtime: Runtime = client.app[RUNTIME]
    run_id = await start_run(client, auth)

    await redis_outage.begin("stalled")
    try:
        upstream[0].gate.set()

        async def releasing() -> bool:  # the work is done; the run waits on its release
            return runtime.job.running_locally() is None

        assert await eventually(releasing, 5.0)
        await client.close()  # graceful shutdown: 200 ms of grace, then cancel
    finally:
        await redis_outage.end("stalled")

    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            f'SELECT status, finished_at FROM "{schema}".sync_runs WHERE id = $1::uuid', run_id
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["status"] == "succeeded" and row["finished_at"] is not None, dict(row)
