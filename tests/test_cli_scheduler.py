"""The ``synclock sync`` / ``migrate`` commands and the built-in scheduler."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

from service.lock import LeaseLock
from service.records import RunStatus
from service.store import Store

AUTH_HEADER = "Authorization"


def synclock(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**os.environ, **env, "SYNCLOCK_LOG_LEVEL": "warning"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_is_idempotent(env: dict[str, str]) -> None:
    first = synclock(env, "migrate")
    second = synclock(env, "migrate")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "applied: 0001_init.sql"
    assert second.stdout.strip() == "database is up to date"


def test_sync_command_prints_a_summary(env: dict[str, str]) -> None:
    done = synclock(env, "sync")
    again = synclock(env, "sync")
    assert done.returncode == 0, done.stderr
    assert "status=succeeded" in done.stdout and "fence=1" in done.stdout
    assert "genai-prices: seen=" in done.stdout
    assert again.returncode == 0
    assert "added=0 changed=0" in again.stdout


async def test_sync_command_exits_3_while_another_holds_the_lock(
    env: dict[str, str], real_redis: Any, prefix: str
) -> None:
    lock = LeaseLock(real_redis, prefix=prefix, max_ttl_ms=600_000)
    await lock.try_acquire("pricing-sync", 60_000, owner="other-replica", run_id="r-1")
    done = await asyncio.to_thread(synclock, env, "sync")
    assert done.returncode == 3
    assert "already running: run r-1 on other-replica" in done.stdout


async def test_scheduler_runs_periodically_and_replicas_never_overlap(
    make_client: Any, store: Store
) -> None:
    replicas = [
        await make_client(
            SYNCLOCK_SCHEDULER="on", SYNCLOCK_SYNC_INTERVAL="1s", SYNCLOCK_INSTANCE=name
        )
        for name in ("a", "b", "c")
    ]
    for _ in range(150):
        runs = await store.recent_runs(limit=50)
        if sum(r.status is RunStatus.SUCCEEDED for r in runs) >= 3:
            break
        await asyncio.sleep(0.1)
    for replica in replicas:
        await replica.close()

    runs = sorted(await store.recent_runs(limit=50), key=lambda r: r.started_at)
    finished = [r for r in runs if r.finished_at is not None]
    assert sum(r.status is RunStatus.SUCCEEDED for r in runs) >= 3
    assert {r.trigger for r in runs} == {"scheduled"}
    for earlier, later in itertools.pairwise(finished):
        assert earlier.finished_at is not None
        assert later.started_at >= earlier.finished_at  # never two at once
        # the next one waits for the interval after the last success
        assert later.started_at - earlier.finished_at >= timedelta(seconds=0.9)
