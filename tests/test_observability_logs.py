"""Request log context under concurrency: no request's fields leak into another's.

Many admin requests of five kinds run at once against one app, some triggering sync
runs that outlive them. Every ``request`` log line carries its own request id
(sent or generated), method, route and status, exactly once per request; a forced
release logs its own reason; run events carry the run's lock and fence and no
request id; every started run finishes once.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from service import logs
from service.http.keys import RUNTIME
from tests.observability_helpers import AUTH, LOCK, TRIGGER

ROUTES = {
    "runs": ("GET", "/admin/pricing/sync/runs"),
    "status": ("GET", "/admin/pricing/scheduler/status"),
    "trigger": ("POST", TRIGGER),
    "release": ("DELETE", "/admin/pricing/sync/lock"),
    "bad": ("GET", "/admin/pricing/sync/runs/{run_id}"),
}
RUN_EVENTS = {"sync_started", "sync_finished", "lease_lost", "sync_fenced_out", "source_failed"}


async def test_concurrent_requests_never_mix_their_log_context(
    make_client: Callable[..., Any],
) -> None:
    stream = io.StringIO()
    previous = logs.redirect(stream)
    try:
        client = await make_client()

        async def send(kind: str, n: int) -> tuple[str, str, int, Any]:
            method, path = ROUTES[kind]
            # Every fifth request brings no id of its own and gets a generated one.
            headers = {**AUTH, **({"X-Request-ID": f"{kind}-{n}"} if n % 5 else {})}
            body = {"reason": f"reason {kind} {n}"} if kind == "release" else None
            url = path.replace("{run_id}", f"not-a-uuid-{n}")
            if kind == "trigger" and n % 2:
                url += "?wait=5"  # the request outlives the run it started
            async with client.request(method, url, headers=headers, json=body) as response:
                rid = response.headers["X-Request-ID"]
                if body is not None:
                    reasons[rid] = body["reason"]
                return kind, rid, response.status, await response.json(content_type=None)

        reasons: dict[str, str] = {}
        kinds = ["runs", "status", "trigger", "release", "bad"]
        answers = await asyncio.gather(*(send(kind, n) for n in range(30) for kind in kinds))
        started = {
            body.get("run_id") or body["id"]: body["fence"]
            for kind, _, status, body in answers
            if kind == "trigger" and status in (200, 202)
        }
        for run_id in started:
            assert await client.app[RUNTIME].job.wait(run_id, 30) is not None
    finally:
        logs.redirect(previous)

    sent = {rid: (kind, status) for kind, rid, status, _ in answers}
    assert len(sent) == len(answers), "request ids are unique"
    assert started, "at least one trigger started a run"
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    requests = Counter()
    for line in lines:
        event, rid = line["event"], line.get("request_id")
        if event == "request":
            kind, status = sent[rid]
            assert (line["method"], line["route"], line["status"]) == (*ROUTES[kind], status)
            requests[rid] += 1
        elif event == "lock_force_released":
            assert line["reason"] == reasons[rid], line
        if event in RUN_EVENTS:
            assert rid is None, f"a run event carries a request id: {line}"
            assert line["lock"] == LOCK and started[line["run_id"]] == line["fence"], line
        elif rid is not None:
            assert rid in sent, line
    assert requests == dict.fromkeys(sent, 1)
    finished = Counter(line["run_id"] for line in lines if line["event"] == "sync_finished")
    assert finished == dict.fromkeys(started, 1)
