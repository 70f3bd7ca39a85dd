"""Shared fixtures.

Integration tests use the Redis and Postgres named by ``SYNCLOCK_TEST_REDIS_URL`` and
``SYNCLOCK_TEST_DATABASE_URL``. Each test gets its own Redis key prefix and its own
Postgres schema, and removes them afterwards. Without those variables the
integration tests skip, unless ``SYNCLOCK_REQUIRE_BACKENDS=1`` (set by CI), which
turns the skip into a failure.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import fakeredis
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from service import logs
from service.config import Settings
from service.http.app import create_app
from service.lock import LeaseLock
from service.runtime import connect_redis
from service.store import Store

pytest_plugins = ["tests.upstream"]

REDIS_URL = os.environ.get("SYNCLOCK_TEST_REDIS_URL", "")
DATABASE_URL = os.environ.get("SYNCLOCK_TEST_DATABASE_URL", "")
REQUIRE = os.environ.get("SYNCLOCK_REQUIRE_BACKENDS", "") == "1"
ADMIN_TOKEN = "test-admin-token-0123456789"
MAX_TTL_MS = 600_000

logs.configure("info", "json")


def need(url: str, variable: str) -> str:
    if url:
        return url
    message = f"{variable} is not set: integration test needs a real server"
    if REQUIRE:
        pytest.fail(message + " (SYNCLOCK_REQUIRE_BACKENDS=1)")
    pytest.skip(message)


@pytest.fixture
def redis_url() -> str:
    return need(REDIS_URL, "SYNCLOCK_TEST_REDIS_URL")


@pytest.fixture
def database_url() -> str:
    return need(DATABASE_URL, "SYNCLOCK_TEST_DATABASE_URL")


@pytest.fixture
def prefix() -> str:
    return f"synclock-test:{uuid.uuid4().hex[:12]}:"


async def _drop_prefix(client: aioredis.Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
    if keys:
        await client.delete(*keys)


@pytest.fixture
async def real_redis(redis_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(redis_url, 2.0)
    yield client
    await _drop_prefix(client, prefix)
    await client.aclose()


@pytest.fixture(params=["fakeredis", "redis"])
async def any_redis(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[aioredis.Redis]:
    """The lock contract runs on both: fakeredis (fast) and a real server."""
    if request.param == "fakeredis":
        client: aioredis.Redis = fakeredis.FakeAsyncRedis()
    else:
        client = connect_redis(need(REDIS_URL, "SYNCLOCK_TEST_REDIS_URL"), 2.0)
    yield client
    await _drop_prefix(client, prefix)
    await client.aclose()


@pytest.fixture
def lock(any_redis: aioredis.Redis, prefix: str) -> LeaseLock:
    return LeaseLock(any_redis, prefix=prefix, max_ttl_ms=MAX_TTL_MS)


@pytest.fixture
async def schema(database_url: str) -> AsyncIterator[str]:
    name = f"synclock_test_{uuid.uuid4().hex[:12]}"
    yield name
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def store(database_url: str, schema: str) -> AsyncIterator[Store]:
    connected = await Store.connect(database_url, schema=schema, timeout_s=5.0)
    await connected.migrate()
    yield connected
    await connected.close()


@pytest.fixture
def env(redis_url: str, database_url: str, prefix: str, schema: str) -> dict[str, str]:
    """Environment for a service instance on the test's own prefix and schema."""
    return {
        "SYNCLOCK_REDIS_URL": redis_url,
        "SYNCLOCK_DATABASE_URL": database_url,
        "SYNCLOCK_REDIS_PREFIX": prefix,
        "SYNCLOCK_DATABASE_SCHEMA": schema,
        "SYNCLOCK_ADMIN_TOKENS": ADMIN_TOKEN,
        "SYNCLOCK_SCHEDULER": "off",
        "SYNCLOCK_INSTANCE": "test-a",
    }


@pytest.fixture
def make_settings(env: dict[str, str]) -> Callable[..., Settings]:
    def make(**overrides: str) -> Settings:
        return Settings.from_env({**env, **overrides})

    return make


@pytest.fixture
async def make_client(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    """Start synclock apps (replicas) on loopback; all are closed at the end."""
    clients: list[TestClient[Any, Any]] = []

    async def make(settings: Settings | None = None, **overrides: str) -> TestClient[Any, Any]:
        app = create_app(settings or make_settings(**overrides))
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        await client.close()
    if REDIS_URL:  # the replicas' keys (fence counters have no TTL) go too
        cleaner = connect_redis(REDIS_URL, 2.0)
        await _drop_prefix(cleaner, make_settings().redis_prefix)
        await cleaner.aclose()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Everything the service logs during the test, as JSON lines."""
    stream = io.StringIO()
    previous = logs.redirect(stream)
    yield stream
    logs.redirect(previous)


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
