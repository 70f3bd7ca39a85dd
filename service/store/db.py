"""The Postgres pool, error mapping and versioned migrations."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

import asyncpg

from service import metrics
from service.errors import BackendUnavailable

# Errors that mean "Postgres is not answering", as opposed to a bug in our SQL.
_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.QueryCanceledError,
)

# A constant key for pg_advisory_xact_lock so concurrent replicas migrate one at a time.
_MIGRATION_LOCK_KEY = 0x5359_4E43


def outage(exc: BaseException) -> BackendUnavailable:
    metrics.BACKEND_ERRORS.labels(backend="postgres").inc()
    return BackendUnavailable("postgres", f"{type(exc).__name__}: {exc}")


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class Database:
    """A pool bound to one schema; every call fails fast with BackendUnavailable."""

    def __init__(self, pool: asyncpg.Pool, schema: str, timeout_s: float) -> None:
        self.pool = pool
        self.schema = schema
        self.timeout_s = timeout_s

    @classmethod
    async def connect(
        cls, url: str, *, schema: str, timeout_s: float, max_size: int = 10
    ) -> Database:
        try:
            pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    url,
                    min_size=0,
                    max_size=max_size,
                    timeout=timeout_s,
                    command_timeout=timeout_s,
                    server_settings={
                        "search_path": schema,
                        "application_name": "synclock",
                    },
                    init=_init_connection,
                ),
                timeout_s,
            )
        except _OUTAGE_ERRORS as exc:
            raise outage(exc) from exc
        return cls(pool, schema, timeout_s)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.pool.close(), self.timeout_s)
        except _OUTAGE_ERRORS:
            self.pool.terminate()

    @asynccontextmanager
    async def connection(self, budget_s: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; outages surface as BackendUnavailable.

        Everything done with it, from waiting for a connection to handing it back,
        must finish within ``budget_s`` (the configured timeout by default): a
        stalled Postgres costs a caller one timeout, not one per step.
        """
        try:
            async with asyncio.timeout(self.timeout_s if budget_s is None else budget_s):
                async with self.pool.acquire(timeout=self.timeout_s) as conn:
                    yield conn
        except _OUTAGE_ERRORS as exc:
            raise outage(exc) from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.connection() as conn, conn.transaction():
            yield conn

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")

    async def migrate(self) -> list[str]:
        """Apply pending migrations in order; returns the names applied now."""
        applied: list[str] = []
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{self.schema}".schema_migrations ('
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                row["version"]
                for row in await conn.fetch(
                    f'SELECT version FROM "{self.schema}".schema_migrations'
                )
            }
            for version, name, sql in _migrations():
                if version in done:
                    continue
                await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
                await conn.execute(sql)
                await conn.execute(
                    f'INSERT INTO "{self.schema}".schema_migrations (version, name)'
                    " VALUES ($1, $2)",
                    version,
                    name,
                )
                applied.append(name)
        return applied


def _migrations() -> list[tuple[int, str, str]]:
    found: list[tuple[int, str, str]] = []
    folder = resources.files("service.store") / "migrations"
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)
