"""The ``synclock sync`` / ``migrate`` commands and the built-in scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
from datetime import datetime, timedelta
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


class _FlakyJob:
    """Stands in for SyncJob: every call the scheduler makes fails once."""

    lock_name = "pricing-sync"

    def __init__(self) -> None:
        self.triggers = 0
        self.waits = 0
        self.store = self

    async def last_finished(self, *_: Any) -> None:
        return None

    async def trigger(self, *_: Any) -> Any:
        from service.errors import BackendUnavailable
        from service.sync.job import Started

        self.triggers += 1
        if self.triggers == 1:
            raise BackendUnavailable("redis", "down")
        return Started(f"00000000-0000-4000-8000-00000000000{self.triggers}", 1, 1000)

    async def wait(self, *_: Any, **__: Any) -> None:
        from service.errors import BackendUnavailable

        self.waits += 1
        if self.waits == 1:
            raise BackendUnavailable("postgres", "down while the run ended")


async def test_scheduler_keeps_going_after_backend_errors(monkeypatch: Any) -> None:
    from service.sync import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "FIRST_RUN_DELAY_S", 0.0)
    job = _FlakyJob()
    stand_in: Any = job
    scheduler = scheduler_module.Scheduler(stand_in, interval_s=1, enabled=True)
    loop = asyncio.create_task(scheduler.run_forever())
    for _ in range(100):
        if job.triggers >= 3:
            break
        await asyncio.sleep(0.05)
    loop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop
    assert job.triggers >= 3  # a failed trigger and a failed wait did not end the loop
    assert job.waits >= 2


async def test_status_shows_the_next_run_moved_by_a_manual_success(
    make_client: Any, auth: dict[str, str]
) -> None:
    client = await make_client(SYNCLOCK_SCHEDULER="on", SYNCLOCK_SYNC_INTERVAL="1h")
    run = await (await client.post("/admin/pricing/scheduler/trigger?wait=30", headers=auth)).json()
    status = await (await client.get("/admin/pricing/scheduler/status", headers=auth)).json()

    finished = datetime.fromisoformat(run["finished_at"])
    next_run = datetime.fromisoformat(status["scheduler"]["next_run_at"])
    # One interval after this success, plus up to 10 % jitter (at most 5 minutes).
    assert timedelta(hours=1) <= next_run - finished <= timedelta(hours=1, minutes=5)
