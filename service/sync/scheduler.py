"""Periodic syncs through the same lock, so replicas never double-run.

The next run is due at the last success plus the interval, or shortly after start
when no run ever succeeded. Every replica runs this loop; the lock picks one. After
a failed attempt the loop waits a retry delay instead of hammering a broken source.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta

import structlog

from service import metrics
from service.errors import BackendUnavailable
from service.records import RunStatus, Trigger
from service.sync.job import SyncJob, SyncRunning

log = structlog.get_logger("synclock.scheduler")

FIRST_RUN_DELAY_S = 2.0
MAX_RETRY_DELAY_S = 300.0
MAX_JITTER_S = 300.0
MIN_GAP_S = 0.5


class Scheduler:
    def __init__(self, job: SyncJob, *, interval_s: float, enabled: bool) -> None:
        self.job = job
        self.interval_s = interval_s
        self.enabled = enabled
        metrics.SYNC_INTERVAL.set(interval_s)
        self._started = datetime.now(UTC)
        self._jitter_s = self._new_jitter_s()

    def _new_jitter_s(self) -> float:
        # Spreads replicas (and fleets) that would otherwise all fire at once.
        return random.uniform(0, min(self.interval_s * 0.1, MAX_JITTER_S))

    async def due_at(self) -> datetime:
        """When the next scheduled sync should start, read from the sync log."""
        last_success = await self.job.store.last_finished(self.job.lock_name, RunStatus.SUCCEEDED)
        last_attempt = await self.job.store.last_finished(self.job.lock_name)
        if last_success is None:
            due = self._started + timedelta(seconds=FIRST_RUN_DELAY_S)
        else:
            due = last_success + timedelta(seconds=self.interval_s + self._jitter_s)
        if last_attempt is not None and (last_success is None or last_attempt > last_success):
            retry_s = min(self.interval_s, MAX_RETRY_DELAY_S)
            due = max(due, last_attempt + timedelta(seconds=retry_s))
        return due

    async def run_forever(self) -> None:
        if not self.enabled:
            return
        while True:
            try:
                due = await self.due_at()
            except BackendUnavailable as exc:
                log.warning("scheduler_backend_unavailable", error=exc.detail)
                await asyncio.sleep(min(self.interval_s, 5.0))
                continue
            wait_s = (due - datetime.now(UTC)).total_seconds()
            if wait_s > 0:
                # Re-read the log at least every minute: another replica may have
                # synced meanwhile, which moves the due time.
                await asyncio.sleep(min(wait_s, 60.0))
                continue
            try:
                await self._fire()
            except BackendUnavailable as exc:
                log.warning("scheduler_backend_unavailable", error=exc.detail)
                await asyncio.sleep(min(self.interval_s, 5.0))
            except Exception:
                log.exception("scheduler_error")
                await asyncio.sleep(min(self.interval_s, 5.0))
            # Never spin: whatever the log says next, leave the loop a breath.
            await asyncio.sleep(MIN_GAP_S)

    async def _fire(self) -> None:
        began = time.monotonic()
        self._jitter_s = self._new_jitter_s()
        try:
            started = await self.job.trigger(Trigger.SCHEDULED, "scheduler")
        except SyncRunning as exc:
            metrics.TRIGGERS_REJECTED.labels(trigger="scheduled").inc()
            log.debug("scheduled_sync_skipped", holder=exc.holder.owner)
            await asyncio.sleep(max(1.0, exc.holder.remaining_ms / 1000))
            return
        except BackendUnavailable as exc:
            log.warning("scheduled_sync_unavailable", error=exc.detail)
            await asyncio.sleep(min(self.interval_s, 5.0))
            return
        log.info("scheduled_sync_started", run_id=started.run_id, fence=started.fence)
        await self.job.wait(started.run_id, timeout_s=max(self.interval_s, 60.0))
        log.debug("scheduled_sync_done", elapsed_s=round(time.monotonic() - began, 3))
