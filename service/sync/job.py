"""The sync job: one pricing sync at a time, under a renewed, fenced lease.

A trigger either wins the lease and gets a run id in milliseconds, or is told who
holds it. The run itself belongs to this object, not to the request that started
it: a caller that disconnects cancels nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from service import metrics
from service.errors import BackendUnavailable, FencedOut, LeaseLost, SynclockError
from service.lock import Holder, Lease, LeaseLock, LockState
from service.records import (
    NewRun,
    PriceCounts,
    RunOutcome,
    RunRecord,
    RunStatus,
    SourceResultJSON,
    Trigger,
)
from service.store import Store
from service.sync.sources import Source

log = structlog.get_logger("synclock.job")

# How many times a grant is retried when Redis handed out a fence Postgres has
# already seen (Redis lost its data); each retry raises the floor.
_FENCE_RETRIES = 3
# The local "we hold it" shortcut is not trusted this close to the lease's end.
_LOCAL_MARGIN_S = 0.25


class SyncRunning(SynclockError):
    """A sync already holds the lock. Carries the holder for the 429 answer."""

    def __init__(self, name: str, holder: Holder) -> None:
        super().__init__(f"lock {name!r} is held by {holder.owner} (run {holder.run_id})")
        self.holder = holder


@dataclass(frozen=True, slots=True)
class Started:
    run_id: str
    fence: int
    lease_remaining_ms: int


@dataclass(slots=True)
class _Active:
    run: NewRun
    lease: Lease
    task: asyncio.Task[RunOutcome]
    lost: asyncio.Event
    started: float
    work: asyncio.Task[RunOutcome] | None = None

    def lose(self) -> None:
        """The lease is gone: stop writing now."""
        self.lost.set()
        if self.work is not None:
            self.work.cancel()


class SyncJob:
    def __init__(
        self,
        *,
        lock: LeaseLock,
        store: Store,
        sources: Sequence[Source],
        lock_name: str,
        lease_ttl_ms: int,
        instance: str,
    ) -> None:
        self.lock = lock
        self.store = store
        self.sources = list(sources)
        self.lock_name = lock_name
        self.lease_ttl_ms = lease_ttl_ms
        self.instance = instance
        self._floor = 0
        self._active: _Active | None = None
        self._tasks: dict[str, asyncio.Task[RunOutcome]] = {}
        self._unrecorded: dict[str, RunOutcome] = {}
        self._closing = False
        self._attempt: asyncio.Future[Started | Holder] | None = None
        self._typical_s: float | None = None  # median of recent successes' durations

    async def start(self) -> None:
        """Load the fence floor and the last success; close runs whose lease is gone."""
        self._floor = await self.store.fence_floor(self.lock_name)
        last = await self.store.last_finished(self.lock_name, RunStatus.SUCCEEDED)
        if last is not None:
            metrics.LAST_SUCCESS.set(last.timestamp())
        await self.reap()

    # -- triggering --------------------------------------------------------------

    async def trigger(self, trigger: Trigger, requested_by: str) -> Started:
        """Win the lease and start a run, or raise SyncRunning with the holder.

        Triggers that arrive while another trigger's attempt is in flight on this
        instance share that attempt's answer instead of asking Redis again: under a
        storm, Redis sees about one call per round trip, not one per caller. The
        shared answer is at most one round trip old.
        """
        if self._closing:
            raise BackendUnavailable("synclock", "instance is shutting down")
        local = self._local_holder()
        if local is not None:
            metrics.LOCK_ACQUISITIONS.labels(outcome="contended").inc()
            raise SyncRunning(self.lock_name, local)

        pending = self._attempt
        if pending is not None:
            outcome = await asyncio.shield(pending)  # raises what the attempt raised
            metrics.LOCK_ACQUISITIONS.labels(outcome="contended").inc()
            raise SyncRunning(self.lock_name, _holder_of(outcome, self.instance))

        attempt: asyncio.Future[Started | Holder] = asyncio.get_running_loop().create_future()
        self._attempt = attempt
        try:
            outcome = await self._attempt_start(trigger, requested_by)
        except BaseException as exc:
            shared = (
                exc
                if isinstance(exc, Exception)
                else BackendUnavailable("synclock", "trigger attempt was cancelled")
            )
            attempt.set_exception(shared)
            attempt.exception()  # retrieved: no "never retrieved" noise without followers
            raise
        else:
            attempt.set_result(outcome)
        finally:
            self._attempt = None
        if isinstance(outcome, Holder):
            raise SyncRunning(self.lock_name, outcome)
        return outcome

    async def _attempt_start(self, trigger: Trigger, requested_by: str) -> Started | Holder:
        for _ in range(_FENCE_RETRIES):
            run_id = str(uuid.uuid4())
            granted = await self.lock.try_acquire(
                self.lock_name,
                self.lease_ttl_ms,
                owner=self.instance,
                run_id=run_id,
                fence_floor=self._floor,
            )
            if isinstance(granted, Holder):
                return granted
            run = NewRun(
                id=run_id,
                lock_name=self.lock_name,
                trigger=trigger,
                requested_by=requested_by,
                fence=granted.fence,
                instance=self.instance,
            )
            try:
                await self.store.begin_run(run)
            except FencedOut as exc:
                log.warning("fence_behind_store", fence=exc.fence, accepted=exc.accepted)
                self._floor = max(self._floor, exc.accepted)
                await self._release_quietly(granted)
                continue
            except BaseException:
                # Postgres is down (or we were cancelled): no run, so no lease.
                await self._release_quietly(granted)
                raise
            self._floor = max(self._floor, granted.fence)
            self._launch(run, granted)
            return Started(run_id, granted.fence, granted.remaining_ms)
        raise BackendUnavailable("redis", "fencing token stays behind Postgres")

    def _local_holder(self) -> Holder | None:
        """While our own run's lease is surely alive, answer without Redis."""
        active = self._active
        if active is None or active.lost.is_set():
            return None
        left_s = active.lease.expires_monotonic - time.monotonic()
        if left_s < _LOCAL_MARGIN_S:
            return None
        return Holder(
            owner=self.instance,
            run_id=active.run.id,
            fence=active.lease.fence,
            remaining_ms=int(left_s * 1000),
        )

    def _launch(self, run: NewRun, lease: Lease) -> None:
        metrics.LOCK_HELD.set(1)
        metrics.LOCK_HELD_SINCE.set(time.time())
        metrics.FENCE_TOKEN.set(lease.fence)
        lost = asyncio.Event()
        # A fresh context: the run must not carry the triggering request's id
        # into events that outlive it, only its own lock, fence and run id.
        task = asyncio.create_task(self._run(run, lease, lost), name=f"sync-{run.id}")
        self._active = _Active(run, lease, task, lost, time.monotonic())
        self._tasks[run.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(run.id, None))

    # -- the run -----------------------------------------------------------------

    async def _run(self, run: NewRun, lease: Lease, lost: asyncio.Event) -> RunOutcome:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(lock=run.lock_name, fence=run.fence, run_id=run.id)
        log.info("sync_started", trigger=run.trigger.value, by=run.requested_by)
        started = time.monotonic()
        work = asyncio.create_task(self._sync_sources(run))
        if self._active is not None and self._active.run.id == run.id:
            self._active.work = work
        renewer = asyncio.create_task(self._renew(lease, lost, work))
        try:
            outcome = await asyncio.shield(work)
        except asyncio.CancelledError:
            this = asyncio.current_task()
            if this is not None and this.cancelling():
                this.uncancel()  # handled here: the run is still released and recorded
            if lost.is_set():
                outcome = RunOutcome(RunStatus.LOST_LEASE, PriceCounts(), "lease lost")
            else:
                # Cancelled from outside: shutdown past its grace period.
                work.cancel()
                outcome = RunOutcome(RunStatus.INTERRUPTED, PriceCounts(), "shut down")
            await asyncio.wait({work}, timeout=5)
        except Exception as exc:
            log.exception("sync_crashed")
            outcome = RunOutcome(RunStatus.FAILED, PriceCounts(), f"{type(exc).__name__}: {exc}")
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        if lost.is_set() and outcome.status is RunStatus.SUCCEEDED:
            outcome = RunOutcome(
                RunStatus.LOST_LEASE, outcome.counts, "lease lost", outcome.sources
            )
        # The tail (release, record) must run to its end even if a shutdown cancels
        # this task now: a run left "running" with Postgres up would be a lie. It
        # is bounded by the backends' timeouts.
        tail = asyncio.create_task(self._finish(run, lease, lost, outcome, started))
        while True:
            try:
                return await asyncio.shield(tail)
            except asyncio.CancelledError:
                this = asyncio.current_task()
                if this is not None and this.cancelling():
                    this.uncancel()
                if tail.done():
                    return tail.result()

    async def _finish(
        self, run: NewRun, lease: Lease, lost: asyncio.Event, outcome: RunOutcome, started: float
    ) -> RunOutcome:
        if self._active is not None and self._active.run.id == run.id:
            self._active = None
        if not lost.is_set():
            # The token never changes on renewal. A lease already gone here was
            # force-released or expired between renewals: the run lost it.
            released = await self._release_quietly(lease)
            if released is False and outcome.status is RunStatus.SUCCEEDED:
                outcome = RunOutcome(
                    RunStatus.LOST_LEASE,
                    outcome.counts,
                    "lease was gone when the run ended",
                    outcome.sources,
                )
        metrics.LOCK_HELD.set(0)
        metrics.LOCK_HELD_SINCE.set(0)
        metrics.LOCK_HOLD.observe(time.monotonic() - started)
        await self._record(run, outcome, time.monotonic() - started)
        return outcome

    async def _sync_sources(self, run: NewRun) -> RunOutcome:
        total = PriceCounts()
        results: list[SourceResultJSON] = []
        names = [source.name for source in self.sources]
        for position, source in enumerate(self.sources):
            began = time.monotonic()
            error: str | None = None
            counts = PriceCounts()
            try:
                catalog = await source.fetch()
                counts = await self.store.apply_prices(
                    lock_name=run.lock_name,
                    fence_token=run.fence,
                    run_id=run.id,
                    source=source.name,
                    records=catalog.records,
                    rejected=catalog.rejected,
                    outranked_by=names[position + 1 :],
                )
            except FencedOut as exc:
                log.warning("sync_fenced_out", source=source.name, accepted=exc.accepted)
                results.append(_result(source.name, counts, str(exc), began))
                return RunOutcome(RunStatus.FENCED_OUT, total, str(exc), results)
            except SynclockError as exc:
                error = str(exc)
                log.warning("source_failed", source=source.name, error=error)
            except Exception as exc:
                # Bad data a source let through, or a bug: this source fails, the
                # others still run, and the run is still recorded and released.
                error = f"{type(exc).__name__}: {exc}"[:500]
                log.exception("source_crashed", source=source.name)
            total += counts
            results.append(_result(source.name, counts, error, began))

        failed = [r for r in results if not r["ok"]]
        if failed and len(failed) == len(results):
            status = RunStatus.FAILED
        elif failed:
            status = RunStatus.PARTIAL
        else:
            status = RunStatus.SUCCEEDED
        errors = "; ".join(r["error"] or "" for r in failed) or None
        return RunOutcome(status, total, errors, results)

    async def _renew(
        self, lease: Lease, lost: asyncio.Event, work: asyncio.Task[RunOutcome]
    ) -> None:
        """Renew every third of the TTL. When the lease is gone, or can no longer
        be proven held before it would expire, stop the work."""
        interval_s = lease.ttl_ms / 3000
        current = lease
        while True:
            await asyncio.sleep(interval_s)
            try:
                current = await self.lock.extend(current, lease.ttl_ms)
            except LeaseLost:
                metrics.LEASE_RENEWALS.labels(outcome="lost").inc()
                log.warning("lease_lost")
                break
            except BackendUnavailable as exc:
                metrics.LEASE_RENEWALS.labels(outcome="error").inc()
                if time.monotonic() + interval_s / 3 < current.expires_monotonic:
                    log.warning("lease_renewal_failed", error=exc.detail)
                    interval_s = lease.ttl_ms / 9000
                    continue
                log.warning("lease_unprovable", error=exc.detail)
                break
            metrics.LEASE_RENEWALS.labels(outcome="renewed").inc()
            interval_s = lease.ttl_ms / 3000
            if self._active is not None and self._active.lease.token == lease.token:
                self._active.lease = current
        lost.set()
        work.cancel()

    async def _record(self, run: NewRun, outcome: RunOutcome, duration_s: float) -> None:
        outcome = dataclasses.replace(
            outcome, finished_at=datetime.now(UTC), duration_s=round(duration_s, 6)
        )
        status = outcome.status.value
        metrics.SYNC_RUNS.labels(outcome=status).inc()
        metrics.SYNC_DURATION.labels(outcome=status).observe(duration_s)
        metrics.MODELS_CHANGED.labels(kind="added").inc(outcome.counts.added)
        metrics.MODELS_CHANGED.labels(kind="changed").inc(outcome.counts.changed)
        metrics.MODELS_CHANGED.labels(kind="deactivated").inc(outcome.counts.deactivated)
        if outcome.status is RunStatus.SUCCEEDED:
            metrics.LAST_SUCCESS.set(time.time())
        log.info(
            "sync_finished",
            status=status,
            duration_s=round(duration_s, 3),
            seen=outcome.counts.seen,
            added=outcome.counts.added,
            changed=outcome.counts.changed,
            deactivated=outcome.counts.deactivated,
            error=outcome.error,
        )
        try:
            await self.store.finish_run(run.id, outcome)
        except BackendUnavailable as exc:
            log.warning("run_record_deferred", error=exc.detail)
            self._unrecorded[run.id] = outcome

    async def _release_quietly(self, lease: Lease) -> bool | None:
        """True if released, False if it was no longer ours, None if Redis failed:
        the release is then retried in the background until the lease would have
        expired, so a partition does not block every trigger for a whole TTL."""
        try:
            return await self.lock.release(lease)
        except BackendUnavailable as exc:
            log.warning("lease_release_failed", error=exc.detail)
            self.lock.release_later(lease)
            return None

    # -- reading -----------------------------------------------------------------

    async def wait(self, run_id: str, timeout_s: float) -> RunRecord | None:
        """The finished run, or None if it is still running after ``timeout_s``.
        Waiting never cancels the run."""
        deadline = time.monotonic() + timeout_s
        task = self._tasks.get(run_id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout_s)
            if not task.done():
                return None
        record = await self.store.get_run(run_id)
        while record is not None and not record.finished:
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            record = await self.store.get_run(run_id)
        return record

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self.store.get_run(run_id)

    async def recent_runs(self, limit: int, status: RunStatus | None) -> list[RunRecord]:
        return await self.store.recent_runs(limit=limit, status=status)

    async def last_success(self) -> datetime | None:
        return await self.store.last_finished(self.lock_name, RunStatus.SUCCEEDED)

    async def lock_state(self) -> LockState:
        return await self.lock.state(self.lock_name)

    def retry_after_s(self, holder: Holder) -> int:
        """How long a refused caller should wait: about one typical run (the median
        of the last 20 successes), never longer than the lease's remaining time
        (both rounded up to whole seconds), at least 1 s. A lease of 30 s says when
        the lock is free at the latest, not when it will be."""
        wait_s = math.ceil(holder.remaining_ms / 1000)
        if self._typical_s is not None:
            wait_s = min(wait_s, math.ceil(self._typical_s))
        return max(1, wait_s)

    def running_locally(self) -> str | None:
        return self._active.run.id if self._active else None

    # -- operations --------------------------------------------------------------

    async def force_release(self, reason: str, by: str) -> Holder | None:
        holder = await self.lock.force_release(self.lock_name)
        if holder is not None:  # a call that finds the lock free deletes nothing
            metrics.FORCED_RELEASES.inc()
        active = self._active
        if holder is not None and active is not None and holder.run_id == active.run.id:
            active.lose()  # our own run: stop it now rather than at its next renewal
        log.warning(
            "lock_force_released",
            reason=reason,
            by=by,
            holder=holder.owner if holder else None,
            holder_run_id=holder.run_id if holder else None,
            holder_fence=holder.fence if holder else None,
        )
        return holder

    async def reap(self) -> int:
        """Close runs left ``running`` whose lease no longer exists, and write run
        records that Postgres could not take when their run ended."""
        for run_id, outcome in list(self._unrecorded.items()):
            await self.store.finish_run(run_id, outcome)
            self._unrecorded.pop(run_id, None)
        self._typical_s = await self.store.typical_duration(self.lock_name)
        running = await self.store.running_runs(self.lock_name)
        if not running:
            return 0
        state = await self.lock.state(self.lock_name)
        holder_run = state.holder.run_id if state.holder else None
        closed = 0
        for run_id in running:
            if run_id == holder_run or run_id in self._tasks:
                continue
            if await self.store.abandon_run(run_id, "lease expired; holder gone"):
                log.warning("run_abandoned", run_id=run_id)
                closed += 1
        return closed

    async def close(self, grace_s: float) -> None:
        """Start no new run; give the running one ``grace_s`` to finish, then
        interrupt it (recorded as such, lease released)."""
        self._closing = True
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)


def _holder_of(outcome: Started | Holder, instance: str) -> Holder:
    if isinstance(outcome, Holder):
        return outcome
    return Holder(
        owner=instance,
        run_id=outcome.run_id,
        fence=outcome.fence,
        remaining_ms=outcome.lease_remaining_ms,
    )


def _result(name: str, counts: PriceCounts, error: str | None, began: float) -> SourceResultJSON:
    return {
        "source": name,
        "ok": error is None,
        "seen": counts.seen,
        "added": counts.added,
        "changed": counts.changed,
        "unchanged": counts.unchanged,
        "deactivated": counts.deactivated,
        "rejected": counts.rejected,
        "error": error,
        "duration_s": round(time.monotonic() - began, 3),
    }
