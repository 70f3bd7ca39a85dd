"""Model prices: one set-based transaction per source, behind the fence.

A source's whole catalog is copied into a temporary table and merged with a few
statements, so the cost does not grow with round trips per model. Only rows whose
values really differ are written, so re-running an unchanged catalog writes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import asyncpg

from service.records import PriceCounts, PriceRecord
from service.store import fence

# A model missing from this many consecutive complete runs of its source is retired.
MISSING_RUNS_TO_DEACTIVATE = 3
# A source that returns fewer than this share of its known models is not trusted
# to say which models are gone.
COMPLETE_SHARE = 0.5

_COLUMNS = (
    "provider",
    "model_id",
    "name",
    "input_usd_per_mtok",
    "output_usd_per_mtok",
    "cached_input_usd_per_mtok",
    "context_window",
)

_SNAPSHOT = """jsonb_build_object(
    'name', {t}.name,
    'input_usd_per_mtok', {t}.input_usd_per_mtok,
    'output_usd_per_mtok', {t}.output_usd_per_mtok,
    'cached_input_usd_per_mtok', {t}.cached_input_usd_per_mtok,
    'context_window', {t}.context_window)"""

_MERGE = f"""
WITH diff AS (
    SELECT i.*,
           CASE WHEN p.provider IS NULL THEN 'added'
                WHEN NOT p.active THEN 'reactivated'
                ELSE 'changed' END AS change,
           CASE WHEN p.provider IS NULL THEN NULL
                ELSE {_SNAPSHOT.format(t="p")} END AS before
    FROM incoming i
    LEFT JOIN model_prices p USING (provider, model_id)
    WHERE (p.source IS NULL OR NOT p.source = ANY($4::text[]))
      AND (p.provider IS NULL OR NOT p.active
       OR (p.name, p.input_usd_per_mtok, p.output_usd_per_mtok,
           p.cached_input_usd_per_mtok, p.context_window, p.source)
          IS DISTINCT FROM
          (i.name, i.input_usd_per_mtok, i.output_usd_per_mtok,
           i.cached_input_usd_per_mtok, i.context_window, $1::text))
), written AS (
    INSERT INTO model_prices AS m (provider, model_id, name, source,
        input_usd_per_mtok, output_usd_per_mtok, cached_input_usd_per_mtok,
        context_window, active, missing_runs, fence, run_id)
    SELECT provider, model_id, name, $1, input_usd_per_mtok, output_usd_per_mtok,
           cached_input_usd_per_mtok, context_window, true, 0, $2, $3
    FROM diff
    ON CONFLICT (provider, model_id) DO UPDATE SET
        name = EXCLUDED.name,
        source = EXCLUDED.source,
        input_usd_per_mtok = EXCLUDED.input_usd_per_mtok,
        output_usd_per_mtok = EXCLUDED.output_usd_per_mtok,
        cached_input_usd_per_mtok = EXCLUDED.cached_input_usd_per_mtok,
        context_window = EXCLUDED.context_window,
        active = true,
        missing_runs = 0,
        last_changed = now(),
        fence = EXCLUDED.fence,
        run_id = EXCLUDED.run_id
), logged AS (
    INSERT INTO model_price_changes
        (run_id, fence, provider, model_id, source, change, before, after)
    SELECT $3, $2, provider, model_id, $1, change, before,
           {_SNAPSHOT.format(t="diff")}
    FROM diff
)
SELECT count(*) FILTER (WHERE change = 'added') AS added,
       count(*) FILTER (WHERE change <> 'added') AS changed
FROM diff
"""

_SEEN_AGAIN = """
UPDATE model_prices m SET missing_runs = 0
FROM incoming i
WHERE m.provider = i.provider AND m.model_id = i.model_id AND m.missing_runs > 0
  AND m.source = $1
"""

_COUNT_MISSING = """
UPDATE model_prices m SET missing_runs = m.missing_runs + 1
WHERE m.source = $1 AND m.active
  AND NOT EXISTS (SELECT 1 FROM incoming i
                  WHERE i.provider = m.provider AND i.model_id = m.model_id)
"""

_DEACTIVATE = f"""
WITH gone AS (
    UPDATE model_prices m
    SET active = false, last_changed = now(), fence = $2, run_id = $3
    WHERE m.source = $1 AND m.active AND m.missing_runs >= $4
    RETURNING m.*
), logged AS (
    INSERT INTO model_price_changes
        (run_id, fence, provider, model_id, source, change, before, after)
    SELECT $3, $2, provider, model_id, $1, 'deactivated',
           {_SNAPSHOT.format(t="gone")} || '{{"active": true}}'::jsonb,
           {_SNAPSHOT.format(t="gone")} || '{{"active": false}}'::jsonb
    FROM gone
)
SELECT count(*) FROM gone
"""


async def apply(
    conn: asyncpg.Connection,
    *,
    lock_name: str,
    fence_token: int,
    run_id: str,
    source: str,
    records: Sequence[PriceRecord],
    rejected: int = 0,
    outranked_by: Sequence[str] = (),
) -> PriceCounts:
    """Merge one source's full catalog in one transaction, behind the fence.

    When two sources price the same (provider, model id), the row belongs to the one
    listed in ``outranked_by`` (sources configured after this one): this source
    leaves it alone, and counts it unchanged. Only a source's own rows can be
    deactivated by it.

    Raises FencedOut (and writes nothing) if a newer holder's fence was accepted.
    """
    run_uuid = uuid.UUID(run_id)
    async with conn.transaction():
        await fence.check(conn, lock_name, fence_token)
        known = await conn.fetchval(
            "SELECT count(*) FROM model_prices WHERE source = $1 AND active", source
        )
        await conn.execute(
            "CREATE TEMP TABLE incoming ("
            " provider text, model_id text, name text, input_usd_per_mtok numeric,"
            " output_usd_per_mtok numeric, cached_input_usd_per_mtok numeric,"
            " context_window integer, PRIMARY KEY (provider, model_id))"
            " ON COMMIT DROP"
        )
        await conn.copy_records_to_table(
            "incoming",
            records=[
                (
                    r.provider,
                    r.model_id,
                    r.name,
                    r.input_usd_per_mtok,
                    r.output_usd_per_mtok,
                    r.cached_input_usd_per_mtok,
                    r.context_window,
                )
                for r in records
            ],
            columns=_COLUMNS,
        )
        merged = await conn.fetchrow(_MERGE, source, fence_token, run_uuid, list(outranked_by))
        await conn.execute(_SEEN_AGAIN, source)
        deactivated = 0
        if len(records) >= COMPLETE_SHARE * int(known):
            await conn.execute(_COUNT_MISSING, source)
            deactivated = int(
                await conn.fetchval(
                    _DEACTIVATE,
                    source,
                    fence_token,
                    run_uuid,
                    MISSING_RUNS_TO_DEACTIVATE,
                )
            )

    added, changed = int(merged["added"]), int(merged["changed"])
    return PriceCounts(
        seen=len(records),
        added=added,
        changed=changed,
        unchanged=len(records) - added - changed,
        deactivated=deactivated,
        rejected=rejected,
    )
