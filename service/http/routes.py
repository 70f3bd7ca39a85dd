"""Route handlers. They validate, authorize and call the job; nothing else."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.errors import BackendUnavailable
from service.http.keys import RUNTIME, TOKENS
from service.http.openapi import DOCUMENT
from service.http.problems import Problem, invalid
from service.lock import Holder
from service.records import RunStatus, Trigger
from service.sync.job import SyncRunning

routes = web.RouteTableDef()

MAX_LIST_LIMIT = 100
MAX_REASON_CHARS = 500
_SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")
_SMALL_INT = re.compile(r"[0-9]{1,6}")  # ASCII digits only: str.isdigit() accepts "²"


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


def _holder_json(holder: Holder) -> dict[str, Any]:
    return {
        "owner": holder.owner,
        "run_id": holder.run_id or None,
        "fence": holder.fence,
        "lease_remaining_ms": holder.remaining_ms,
    }


def _wait_s(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None or raw == "":
        return 0.0
    limit = request.app[RUNTIME].settings.max_wait_s
    if not _SECONDS.fullmatch(raw):
        # ASCII only: float() also takes Arabic-Indic digits, "1_0", "nan" and "inf".
        raise invalid(f"wait ({raw[:40]!r}) must be a number of seconds", parameter="wait")
    value = float(raw)
    if value > limit:
        raise invalid(f"wait ({value:g}) cannot exceed {limit:g} s", parameter="wait")
    return value


@routes.post("/admin/pricing/scheduler/trigger")
async def trigger(request: web.Request) -> web.Response:
    caller = request.app[TOKENS].caller(request)
    wait_s = _wait_s(request)
    job = request.app[RUNTIME].job
    try:
        started = await job.trigger(Trigger.MANUAL, caller)
    except SyncRunning as exc:
        metrics.TRIGGERS_REJECTED.labels(trigger="manual").inc()
        holder = exc.holder
        retry_after_s = job.retry_after_s(holder)
        raise Problem(
            429,
            "sync-running",
            "A pricing sync is already running",
            f"run {holder.run_id} on {holder.owner} holds the lock",
            headers={"Retry-After": str(retry_after_s)},
            running_run_id=holder.run_id or None,
            holder=_holder_json(holder),
            retry_after_s=retry_after_s,
        ) from None

    location = f"/admin/pricing/sync/runs/{started.run_id}"
    headers = {"Location": location}
    if wait_s > 0:
        try:
            record = await job.wait(started.run_id, wait_s)
        except BackendUnavailable:
            record = None  # the run started: say so, rather than hide its id in a 503
        if record is not None:
            return _json(record.to_json(), 200, headers)
    body = {
        "run_id": started.run_id,
        "status": RunStatus.RUNNING.value,
        "fence": started.fence,
        "lease_remaining_ms": started.lease_remaining_ms,
        "location": location,
    }
    return _json(body, 202, headers)


@routes.get("/admin/pricing/sync/runs/{run_id}")
async def get_run(request: web.Request) -> web.Response:
    request.app[TOKENS].caller(request)
    raw = request.match_info["run_id"]
    try:
        run_id = str(uuid.UUID(raw))
    except ValueError:
        raise invalid(f"run id ({raw[:60]!r}) is not a UUID", parameter="run_id") from None
    record = await request.app[RUNTIME].job.get_run(run_id)
    if record is None:
        raise Problem(404, "run-not-found", "No such run", f"no sync run {run_id}")
    return _json(record.to_json())


@routes.get("/admin/pricing/sync/runs")
async def list_runs(request: web.Request) -> web.Response:
    request.app[TOKENS].caller(request)
    raw_limit = request.query.get("limit") or "20"  # empty means absent, like status=
    if not _SMALL_INT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= MAX_LIST_LIMIT:
        raise invalid(
            f"limit ({raw_limit[:20]!r}) must be a whole number from 1 to {MAX_LIST_LIMIT}",
            parameter="limit",
        )
    raw_status = request.query.get("status")
    status: RunStatus | None = None
    if raw_status:
        try:
            status = RunStatus(raw_status)
        except ValueError:
            choices = ", ".join(s.value for s in RunStatus)
            raise invalid(
                f"status ({raw_status[:30]!r}) must be one of {choices}",
                parameter="status",
            ) from None
    records = await request.app[RUNTIME].job.recent_runs(int(raw_limit), status)
    return _json({"runs": [r.to_json() for r in records]})


@routes.get("/admin/pricing/scheduler/status")
async def scheduler_status(request: web.Request) -> web.Response:
    request.app[TOKENS].caller(request)
    runtime = request.app[RUNTIME]
    job, scheduler = runtime.job, runtime.scheduler
    state = await job.lock_state()
    running = None
    if state.holder is not None and state.holder.run_id:
        record = await job.get_run(state.holder.run_id)
        running = record.to_json() if record else None
    last_success = await job.last_success()
    next_at = await scheduler.due_at() if scheduler.enabled else None  # live: moves at once
    return _json(
        {
            "instance": runtime.settings.instance,
            "lock": {
                "name": job.lock_name,
                "held": state.held,
                "holder": _holder_json(state.holder) if state.holder else None,
                "last_fence": state.last_fence,
                "lease_ttl_ms": job.lease_ttl_ms,
            },
            "running_run": running,
            "last_success_at": last_success.isoformat() if last_success else None,
            "scheduler": {
                "enabled": scheduler.enabled,
                "interval_s": scheduler.interval_s,
                "next_run_at": next_at.isoformat() if next_at else None,
            },
            "now": datetime.now(UTC).isoformat(),
        }
    )


@routes.delete("/admin/pricing/sync/lock")
async def release_lock(request: web.Request) -> web.Response:
    caller = request.app[TOKENS].caller(request)
    reason = await _reason(request)
    holder = await request.app[RUNTIME].job.force_release(reason, caller)
    return _json(
        {
            "released": holder is not None,
            "holder": _holder_json(holder) if holder else None,
            "reason": reason,
        }
    )


async def _reason(request: web.Request) -> str:
    if not request.can_read_body:
        raise Problem(
            422,
            "reason-required",
            "A reason is required",
            'send a JSON body such as {"reason": "stuck after deploy"}',
        )
    if request.content_type != "application/json":
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            f"expected application/json, got {request.content_type[:60]!r}",
        )
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError):
        raise Problem(
            400, "malformed-json", "Malformed JSON", "the body is not valid JSON"
        ) from None
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        raise Problem(
            422,
            "reason-required",
            "A reason is required",
            "'reason' must be a non-empty string",
        )
    if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
        raise Problem(
            422,
            "invalid-reason",
            "Invalid reason",
            f"'reason' must be printable text of at most {MAX_REASON_CHARS} characters",
        )
    return reason.strip()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if not runtime.ready:
        return _json({"status": "shutting down"}, 503)
    checks = await runtime.readiness()
    ok = all(value == "ok" for value in checks.values())
    # Unauthenticated: say which backend is down, not its address (that is logged).
    shown = {name: "ok" if value == "ok" else "unavailable" for name, value in checks.items()}
    return _json({"status": "ok" if ok else "unavailable", "checks": shown}, 200 if ok else 503)


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return _json(DOCUMENT)


@routes.get("/metrics")
async def metrics_page(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
