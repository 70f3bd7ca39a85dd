"""Cancellation and outage cases 8, 9, 10, 20 and 23 of ../shared/cases/lock-cases.md.

Each test asserts what a caller can observe: who holds a lease, which answer a
request got, which status a run record ends with, and whether the Redis and
Postgres pools are whole again once the storm is over. Random choices use fixed
seeds; every loop and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from service import metrics
from service.errors import BackendUnavailable
from service.http.keys import RUNTIME
from service.lock import Holder, Lease, LeaseLock, LockState
from service.runtime import Runtime
from tests.conftest import MAX_TTL_MS
from tests.servers import ThrowawayRedis, missing
from tests.upstream import Upstream

TRIGGER = "/admin/pricing/scheduler/trigger"
STATUS = "/admin/pricing/scheduler/status"
RUNS = "/admin/pricing/sync/runs"
LOCK = "/admin/pricing/sync/lock"
PROBLEM = "application/problem+json"
SERVICE_LOCK = "pricing-sync"  # the service's default SYNCLOCK_LOCK_NAME


# -- helpers --------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    """Poll ``check`` every 20 ms until it is true or ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    for _ in range(max(1, round(timeout_s / 0.02))):
        if await check():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return await check()


async def cancel_point(rng: random.Random) -> None:
    """Let a just-started task run for 0 to 11 event-loop turns. On loopback that
    spans: never started, sent but not answered, answered but not yet returned."""
    for _ in range(rng.randrange(0, 12)):
        await asyncio.sleep(0)


def redis_in_use(client: aioredis.Redis) -> int:
    """Connections the redis-py pool has handed out and not yet taken back."""
    return len(client.connection_pool._in_use_connections)


def postgres_in_use(runtime: Runtime) -> tuple[int, int]:
    """(connections checked out, holders missing from the free queue) of asyncpg."""
    pool = runtime.store.db.pool
    checked_out = pool.get_size() - pool.get_idle_size()
    # A holder that is never given back is missing from the queue even when its
    # connection is closed, which get_size() alone would not show.
    missing = len(pool._holders) - pool._queue.qsize()
    return checked_out, missing


async def drained(lock: LeaseLock, timeout_s: float) -> bool:
    """Wait for the background releases of unanswered acquires to end."""

    async def done() -> bool:
        return not lock._cleanups

    return await eventually(done, timeout_s)


class LoopbackProxy:
    """A TCP proxy on 127.0.0.1 in front of a local server.

    ``delay_s`` holds back every chunk the server sends: a slow server. ``cut()``
    drops every connection and refuses new ones until ``restore()``: a partition,
    in which the server keeps its data but no command reaches it.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self.port = 0
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for transport in list(self._transports):
            transport.abort()
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        await self.start()  # the same port again

    async def close(self) -> None:
        await self.cut()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.target_port
            )
        except OSError:
            writer.close()
            return
        sides = {writer.transport, server_writer.transport}
        pumps = {
            asyncio.create_task(self._pump(reader, server_writer, delayed=False)),
            asyncio.create_task(self._pump(server_reader, writer, delayed=True)),
        }
        self._transports |= sides
        self._pumps |= pumps
        self.open_connections += 1
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            writer.close()
            server_writer.close()
            self._transports -= sides
            self._pumps -= pumps
            self.open_connections -= 1

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        # Ends at end of stream, on a socket error, or when close() cancels it.
        try:
            while chunk := await reader.read(65_536):
                if delayed and self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass


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
