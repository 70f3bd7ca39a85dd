"""The sync log: one row per run, from ``running`` to its final status."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from service.records import NewRun, PriceCounts, RunOutcome, RunRecord, RunStatus

_COLUMNS = (
    "id, lock_name, trigger, requested_by, fence, instance, status, started_at,"
    " finished_at, duration_s, seen, added, changed, unchanged, deactivated,"
    " rejected, error, sources"
)


async def insert(conn: asyncpg.Connection, run: NewRun) -> None:
    """Close runs left running on this lock (their lease is gone: we hold it now),
    then record the new one."""
    await conn.execute(
        "UPDATE sync_runs SET status = 'abandoned', finished_at = now(),"
        " error = 'lease taken over by run ' || $2::text"
        " WHERE lock_name = $1 AND status = 'running'",
        run.lock_name,
        run.id,
    )
    await conn.execute(
        "INSERT INTO sync_runs (id, lock_name, trigger, requested_by, fence,"
        " instance, status) VALUES ($1, $2, $3, $4, $5, $6, 'running')",
        uuid.UUID(run.id),
        run.lock_name,
        run.trigger.value,
        run.requested_by,
        run.fence,
        run.instance,
    )


async def finish(conn: asyncpg.Connection, run_id: str, outcome: RunOutcome) -> bool:
    """Write the final status. A run closed as abandoned by a newer holder is still
    given its real ending; a run already finished is left alone."""
    c = outcome.counts
    done = await conn.fetchval(
        "UPDATE sync_runs SET status = $2, finished_at = coalesce($11, now()),"
        " duration_s = coalesce($12, extract(epoch FROM now() - started_at)),"
        " seen = $3, added = $4, changed = $5, unchanged = $6, deactivated = $7,"
        " rejected = $8, error = $9, sources = $10"
        " WHERE id = $1 AND status IN ('running', 'abandoned') RETURNING true",
        uuid.UUID(run_id),
        outcome.status.value,
        c.seen,
        c.added,
        c.changed,
        c.unchanged,
        c.deactivated,
        c.rejected,
        outcome.error,
        outcome.sources,
        outcome.finished_at,
        outcome.duration_s,
    )
    return bool(done)


async def abandon(conn: asyncpg.Connection, run_id: str, reason: str) -> bool:
    done = await conn.fetchval(
        "UPDATE sync_runs SET status = 'abandoned', finished_at = now(), error = $2"
        " WHERE id = $1 AND status = 'running' RETURNING true",
        uuid.UUID(run_id),
        reason,
    )
    return bool(done)


async def get(conn: asyncpg.Connection, run_id: str) -> RunRecord | None:
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM sync_runs WHERE id = $1", uuid.UUID(run_id))
    return _record(row) if row else None


async def recent(
    conn: asyncpg.Connection, *, limit: int, status: RunStatus | None
) -> list[RunRecord]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM sync_runs"
        " WHERE ($2::text IS NULL OR status = $2)"
        " ORDER BY started_at DESC, id LIMIT $1",
        limit,
        status.value if status else None,
    )
    return [_record(row) for row in rows]


async def running(conn: asyncpg.Connection, lock_name: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT id FROM sync_runs WHERE lock_name = $1 AND status = 'running'",
        lock_name,
    )
    return [str(row["id"]) for row in rows]


async def typical_duration(conn: asyncpg.Connection, lock_name: str, recent: int) -> float | None:
    """The median duration of the ``recent`` newest succeeded runs, if any."""
    value = await conn.fetchval(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_s) FROM ("
        " SELECT duration_s FROM sync_runs WHERE lock_name = $1 AND status = 'succeeded'"
        " AND duration_s IS NOT NULL ORDER BY started_at DESC LIMIT $2) AS newest",
        lock_name,
        recent,
    )
    return float(value) if value is not None else None


async def last_finished(
    conn: asyncpg.Connection, lock_name: str, *, status: RunStatus | None
) -> datetime | None:
    value = await conn.fetchval(
        "SELECT max(finished_at) FROM sync_runs WHERE lock_name = $1"
        " AND status <> 'running' AND ($2::text IS NULL OR status = $2)",
        lock_name,
        status.value if status else None,
    )
    return value if isinstance(value, datetime) else None


def _record(row: Any) -> RunRecord:
    return RunRecord(
        id=str(row["id"]),
        lock_name=row["lock_name"],
        trigger=row["trigger"],
        requested_by=row["requested_by"],
        fence=int(row["fence"]),
        instance=row["instance"],
        status=RunStatus(row["status"]),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        duration_s=row["duration_s"],
        counts=PriceCounts(
            seen=row["seen"],
            added=row["added"],
            changed=row["changed"],
            unchanged=row["unchanged"],
            deactivated=row["deactivated"],
            rejected=row["rejected"],
        ),
        error=row["error"],
        sources=list(row["sources"] or []),
    )
