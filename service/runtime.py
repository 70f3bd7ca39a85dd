"""Opening and closing the backends and the job, shared by the server and the CLI.

With no ``SYNCLOCK_REDIS_URL`` the service uses an in-process Redis (fakeredis);
with no ``SYNCLOCK_DATABASE_URL`` it starts an embedded PostgreSQL (pgserver)
under the data folder. That is the single-instance default: fine on a laptop,
useless for more than one replica, and logged as such.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from service import metrics, redis_urls
from service.config import Settings, redact_url
from service.errors import BackendUnavailable, ConfigError
from service.lock import LeaseLock
from service.store import Store
from service.sync.job import SyncJob
from service.sync.scheduler import Scheduler
from service.sync.sources import build_sources

log = structlog.get_logger("synclock.runtime")

REDIS_MAX_CONNECTIONS = 64


@dataclass(slots=True)
class Runtime:
    settings: Settings
    redis: aioredis.Redis
    store: Store
    lock: LeaseLock
    job: SyncJob
    scheduler: Scheduler
    ready: bool = True
    _up: dict[str, bool | None] | None = None

    async def readiness(self) -> dict[str, str]:
        """Ping both backends within their timeouts; log only changes of state."""
        checks: dict[str, str] = {}
        results = await asyncio.gather(
            self._check("redis", self._ping_redis()),
            self._check("postgres", self.store.ping()),
        )
        for name, error in results:
            checks[name] = "ok" if error is None else error
        return checks

    async def _ping_redis(self) -> None:
        try:
            await self.redis.ping()
        except Exception as exc:
            metrics.BACKEND_ERRORS.labels(backend="redis").inc()
            raise BackendUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc

    async def _check(self, name: str, call: Any) -> tuple[str, str | None]:
        if self._up is None:
            self._up = {"redis": None, "postgres": None}
        timeout_s = (
            self.settings.redis_timeout_s if name == "redis" else self.settings.database_timeout_s
        )
        error: str | None = None
        try:
            await asyncio.wait_for(call, timeout_s)
        except (BackendUnavailable, TimeoutError) as exc:
            error = getattr(exc, "detail", None) or "timed out"
        up = error is None
        metrics.BACKEND_UP.labels(backend=name).set(1 if up else 0)
        if self._up.get(name) is not up:
            (log.info if up else log.warning)("backend_state", backend=name, up=up)
            self._up[name] = up
        return name, error


async def close_redis(client: aioredis.Redis) -> None:
    """Close a client, and for Sentinel also the connections to the Sentinels."""
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    await client.aclose()
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def connect_redis(url: str, timeout_s: float) -> aioredis.Redis:
    """A client for one server, a Sentinel-managed primary or a Cluster, with every
    timeout set and no silent retries (an outage must surface as a fast 503)."""
    topology = redis_urls.parse(url)
    if topology.kind == "cluster":
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in topology.nodes],
            password=topology.password,
            max_connections=REDIS_MAX_CONNECTIONS,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        return cast(aioredis.Redis, cluster)  # the commands the lock uses are shared
    if topology.kind == "sentinel":
        sentinel = Sentinel(
            list(topology.nodes),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        client: aioredis.Redis = sentinel.master_for(
            topology.service,
            password=topology.password,
            db=topology.db,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        return client
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_MAX_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes the pool


@asynccontextmanager
async def open_runtime(settings: Settings, *, migrate: bool = True) -> AsyncIterator[Runtime]:
    async with AsyncExitStack() as stack:
        redis_url, database_url = settings.redis_url, settings.database_url
        if settings.embedded:
            log.warning(
                "embedded_default",
                note="single-instance default: in-process Redis and/or embedded "
                "PostgreSQL; set SYNCLOCK_REDIS_URL and SYNCLOCK_DATABASE_URL for "
                "more than one replica",
                data_dir=str(settings.data_dir),
            )
        if database_url is None:
            database_url = await _embedded_postgres(settings, stack)
        if redis_url is None:
            client = _embedded_redis()
        else:
            client = connect_redis(redis_url, settings.redis_timeout_s)
        stack.push_async_callback(close_redis, client)
        log.info(
            "backends",
            redis=redact_url(redis_url) if redis_url else "in-process (fakeredis)",
            postgres=redact_url(database_url),
            schema=settings.database_schema,
        )

        store = await Store.connect(
            database_url,
            schema=settings.database_schema,
            timeout_s=settings.database_timeout_s,
        )
        stack.push_async_callback(store.close)
        if migrate:
            applied = await store.migrate()
            if applied:
                log.info("migrations_applied", migrations=applied)

        lock = LeaseLock(
            client,
            prefix=settings.redis_prefix,
            max_ttl_ms=round(settings.max_lock_ttl_s * 1000),
        )
        stack.push_async_callback(lock.aclose)
        job = SyncJob(
            lock=lock,
            store=store,
            sources=build_sources(settings),
            lock_name=settings.lock_name,
            lease_ttl_ms=settings.lock_ttl_ms,
            instance=settings.instance,
        )
        scheduler = Scheduler(job, interval_s=settings.sync_interval_s, enabled=settings.scheduler)
        yield Runtime(settings, client, store, lock, job, scheduler)


def _embedded_redis() -> aioredis.Redis:
    try:
        import fakeredis
    except ImportError as exc:
        raise ConfigError(
            "SYNCLOCK_REDIS_URL",
            "",
            "not set, and the embedded default needs the 'embedded' extra "
            "(pip install 'synclock[embedded]')",
        ) from exc
    client: aioredis.Redis = fakeredis.FakeAsyncRedis()
    return client


async def _embedded_postgres(settings: Settings, stack: AsyncExitStack) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs' XDG_RUNTIME_DIR notice
            import pgserver
    except ImportError as exc:
        raise ConfigError(
            "SYNCLOCK_DATABASE_URL",
            "",
            "not set, and the embedded default needs the 'embedded' extra "
            "(pip install 'synclock[embedded]')",
        ) from exc
    folder = (settings.data_dir / "postgres").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    log.info("embedded_postgres_starting", data_dir=str(folder))
    server = await asyncio.to_thread(
        pgserver.get_server,  # type: ignore[attr-defined]
        str(folder),
        cleanup_mode="stop",
    )

    async def stop() -> None:
        await asyncio.to_thread(server.cleanup)

    stack.push_async_callback(stop)
    uri: str = server.get_uri()
    return uri
