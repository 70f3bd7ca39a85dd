"""Replicas under test for the fault suite: a cluster of ``synclock serve``
processes on one throwaway Redis and Postgres, and the HTTP calls made to them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from service.runtime import connect_redis
from tests.conftest import ADMIN_TOKEN
from tests.replicas import Replica
from tests.servers import ThrowawayPostgres, ThrowawayRedis

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TTL_S = 1.0  # leases are short, so a lapse takes a second, not the production 30


class Cluster:
    """Replicas sharing one Redis prefix and one Postgres schema."""

    def __init__(self, redis: ThrowawayRedis, pg: ThrowawayPostgres, log_dir: Path) -> None:
        self.redis, self.pg, self.log_dir = redis, pg, log_dir
        tag = uuid.uuid4().hex[:10]
        self.prefix = f"faults-{tag}:"
        self.schema = f"faults_{tag}"
        self.replicas: list[Replica] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "SYNCLOCK_REDIS_URL": self.redis.url,
            "SYNCLOCK_DATABASE_URL": self.pg.url,
            "SYNCLOCK_REDIS_PREFIX": self.prefix,
            "SYNCLOCK_DATABASE_SCHEMA": self.schema,
            "SYNCLOCK_ADMIN_TOKENS": ADMIN_TOKEN,
            "SYNCLOCK_SCHEDULER": "off",
            "SYNCLOCK_LOCK_TTL": f"{TTL_S}s",
            "SYNCLOCK_REDIS_TIMEOUT": "300ms",
            "SYNCLOCK_DATABASE_TIMEOUT": "1s",
            "SYNCLOCK_SOURCE_TIMEOUT": "30s",
            "SYNCLOCK_SOURCE_RETRIES": "0",
            "SYNCLOCK_SHUTDOWN_TIMEOUT": "2s",
            **extra,
        }

    def start(self, *names: str, **extra: str) -> list[Replica]:
        started = [Replica(n, self.env(**extra), self.log_dir).start() for n in names]
        for replica in started:
            replica.wait_ready()
        self.replicas.extend(started)
        return started

    async def rows(self, sql: str, *args: Any) -> list[Any]:
        conn = await asyncpg.connect(self.pg.url, server_settings={"search_path": self.schema})
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def run(self, run_id: str) -> Any:
        rows = await self.rows("SELECT * FROM sync_runs WHERE id = $1", uuid.UUID(run_id))
        return rows[0] if rows else None

    async def settled(
        self, run_id: str, timeout_s: float = 20, pending: tuple[str, ...] = ("running",)
    ) -> Any:
        """The run once its status leaves ``pending``. A run a newer holder closed
        as "abandoned" gets its own ending later if its process is still alive."""
        # Counted polls, not a clock deadline: if the whole machine is paused for a
        # while (a busy CI host), the pause costs one poll, not the whole wait.
        for _ in range(round(timeout_s / 0.1)):
            run = await self.run(run_id)
            if run is not None and run["status"] not in pending:
                return run
            await asyncio.sleep(0.1)
        raise AssertionError(f"run {run_id} still {pending} after {timeout_s}s\n{self.story()}")

    def story(self, lines: int = 40) -> str:
        """Each replica's last events other than request lines: what a failure needs."""
        parts = []
        for replica in self.replicas:
            kept = [ln for ln in replica.output().splitlines() if '"event": "request"' not in ln]
            parts.append(f"--- {replica.name}\n" + "\n".join(kept[-lines:]))
        return "\n".join(parts)

    async def lock_keys(self) -> list[bytes]:
        client = connect_redis(self.redis.url, 1.0)
        try:
            return [k async for k in client.scan_iter(match=f"{self.prefix}lock:*")]
        finally:
            await client.aclose()


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, dict[str, str], Any]:
    async with http.request(method, url, headers=AUTH, **kw) as response:
        body = await response.json(content_type=None)
        return response.status, dict(response.headers), body


async def until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    for _ in range(round(timeout_s / 0.05)):  # counted polls, as in Cluster.settled
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
