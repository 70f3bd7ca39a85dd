"""The fence: the highest fencing token Postgres has accepted for each lock.

A holder's token is accepted once, when its run begins, and only if it is strictly
higher than every token accepted before. Each write transaction then takes a share
lock on the fence row and checks that its token is still the accepted one, so:

* a paused or partitioned old holder that wakes up after a newer holder began is
  refused, whatever Redis said about its lease;
* a newer holder's acceptance waits for an old holder's write already in flight to
  commit, so the two never interleave.
"""

from __future__ import annotations

import asyncpg

from service import metrics
from service.errors import FencedOut


async def floor(conn: asyncpg.Connection, lock_name: str) -> int:
    """The highest accepted fence, 0 if none."""
    value = await conn.fetchval("SELECT fence FROM lock_fences WHERE lock_name = $1", lock_name)
    return int(value or 0)


async def accept(conn: asyncpg.Connection, lock_name: str, fence: int) -> None:
    """Record ``fence`` as the newest; FencedOut unless it beats every earlier one."""
    accepted = await conn.fetchval(
        "INSERT INTO lock_fences (lock_name, fence) VALUES ($1, $2)"
        " ON CONFLICT (lock_name) DO UPDATE"
        " SET fence = EXCLUDED.fence, accepted_at = now()"
        " WHERE lock_fences.fence < EXCLUDED.fence"
        " RETURNING fence",
        lock_name,
        fence,
    )
    if accepted is None:
        metrics.FENCE_REJECTIONS.inc()
        raise FencedOut(lock_name, fence, await floor(conn, lock_name))


async def check(conn: asyncpg.Connection, lock_name: str, fence: int) -> None:
    """Inside a write transaction: FencedOut if a newer fence was accepted."""
    current = await conn.fetchval(
        "SELECT fence FROM lock_fences WHERE lock_name = $1 FOR SHARE", lock_name
    )
    if current is None or int(current) != fence:
        metrics.FENCE_REJECTIONS.inc()
        raise FencedOut(lock_name, fence, int(current or 0))
