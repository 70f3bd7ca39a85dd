"""The aiohttp application factory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from aiohttp import web

from service.config import Settings
from service.errors import BackendUnavailable
from service.http.auth import AdminTokens, load_tokens
from service.http.keys import BACKGROUND, RUNTIME, TOKENS
from service.http.middleware import observe
from service.http.routes import routes
from service.runtime import open_runtime

log = structlog.get_logger("synclock.app")

MAX_BODY_BYTES = 64 * 1024


def create_app(settings: Settings, tokens: AdminTokens | None = None) -> web.Application:
    app = web.Application(middlewares=[observe], client_max_size=MAX_BODY_BYTES)
    app[TOKENS] = tokens if tokens is not None else load_tokens(settings)[0]
    app.add_routes(routes)
    app.cleanup_ctx.append(_runtime_ctx(settings))
    app.cleanup_ctx.append(_background_ctx)
    app.on_shutdown.append(_drain)
    return app


def _runtime_ctx(settings: Settings):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with open_runtime(settings) as runtime:
            await runtime.job.start()
            app[RUNTIME] = runtime
            log.info(
                "started",
                instance=settings.instance,
                lock=settings.lock_name,
                lease_ttl_ms=settings.lock_ttl_ms,
                scheduler=settings.scheduler,
                sources=[s.name for s in settings.sources],
            )
            yield
        log.info("stopped", instance=settings.instance)

    return ctx


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    tasks = [
        asyncio.create_task(runtime.scheduler.run_forever(), name="scheduler"),
        asyncio.create_task(_reap_forever(app), name="reaper"),
    ]
    app[BACKGROUND] = tasks
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _reap_forever(app: web.Application) -> None:
    """Close runs whose holder died, and write run records Postgres missed."""
    runtime = app[RUNTIME]
    period_s = max(1.0, runtime.settings.lock_ttl_s)
    while True:
        await asyncio.sleep(period_s)
        try:
            await runtime.readiness()  # keeps synclock_backend_up current without probes
            await runtime.job.reap()
        except BackendUnavailable as exc:
            log.debug("reaper_waiting", backend=exc.backend)
        except Exception:
            log.exception("reaper_error")  # the loop itself must survive


async def _drain(app: web.Application) -> None:
    """On shutdown: fail readiness, stop the scheduler, let the running sync end
    within the grace period (else it is recorded as interrupted)."""
    runtime = app[RUNTIME]
    runtime.ready = False
    log.info(
        "shutting_down",
        running_run_id=runtime.job.running_locally(),
        grace_s=runtime.settings.shutdown_timeout_s,
    )
    for task in app.get(BACKGROUND, []):
        task.cancel()
    await runtime.job.close(runtime.settings.shutdown_timeout_s)
