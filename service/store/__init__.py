"""Postgres: migrations, the fence, the sync log and the model prices."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from service.records import (
    NewRun,
    PriceCounts,
    PriceRecord,
    RunOutcome,
    RunRecord,
    RunStatus,
)
from service.store import fence, prices, runs
from service.store.db import Database

WRITE_BUDGET_FACTOR = 6


class Store:
    """The only door to Postgres. Every method raises BackendUnavailable when
    Postgres does not answer within the configured timeout."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    async def connect(cls, url: str, *, schema: str, timeout_s: float) -> Store:
        return cls(await Database.connect(url, schema=schema, timeout_s=timeout_s))

    async def close(self) -> None:
        await self.db.close()

    async def migrate(self) -> list[str]:
        return await self.db.migrate()

    async def ping(self) -> None:
        await self.db.ping()

    async def fence_floor(self, lock_name: str) -> int:
        async with self.db.connection() as conn:
            return await fence.floor(conn, lock_name)

    async def begin_run(self, run: NewRun) -> None:
        """Accept the run's fence and log it as running, in one transaction.
        FencedOut if the fence is not above every fence accepted before."""
        async with self.db.transaction() as conn:
            await fence.accept(conn, run.lock_name, run.fence)
            await runs.insert(conn, run)

    async def finish_run(self, run_id: str, outcome: RunOutcome) -> bool:
        async with self.db.connection() as conn:
            return await runs.finish(conn, run_id, outcome)

    async def abandon_run(self, run_id: str, reason: str) -> bool:
        async with self.db.connection() as conn:
            return await runs.abandon(conn, run_id, reason)

    async def get_run(self, run_id: str) -> RunRecord | None:
        async with self.db.connection() as conn:
            return await runs.get(conn, run_id)

    async def recent_runs(self, *, limit: int, status: RunStatus | None = None) -> list[RunRecord]:
        async with self.db.connection() as conn:
            return await runs.recent(conn, limit=limit, status=status)

    async def running_runs(self, lock_name: str) -> list[str]:
        async with self.db.connection() as conn:
            return await runs.running(conn, lock_name)

    async def typical_duration(self, lock_name: str, recent: int = 20) -> float | None:
        async with self.db.connection() as conn:
            return await runs.typical_duration(conn, lock_name, recent)

    async def last_finished(
        self, lock_name: str, status: RunStatus | None = None
    ) -> datetime | None:
        async with self.db.connection() as conn:
            return await runs.last_finished(conn, lock_name, status=status)

    async def apply_prices(
        self,
        *,
        lock_name: str,
        fence_token: int,
        run_id: str,
        source: str,
        records: Sequence[PriceRecord],
        rejected: int = 0,
        outranked_by: Sequence[str] = (),
    ) -> PriceCounts:
        # A whole catalog merge may take several round trips' worth of time.
        async with self.db.connection(budget_s=self.db.timeout_s * WRITE_BUDGET_FACTOR) as conn:
            return await prices.apply(
                conn,
                lock_name=lock_name,
                fence_token=fence_token,
                run_id=run_id,
                source=source,
                records=records,
                rejected=rejected,
                outranked_by=outranked_by,
            )


__all__ = ["Database", "Store"]
