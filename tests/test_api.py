"""The HTTP API against real Redis and Postgres, as an internal caller sees it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from service import metrics
from service.http.app import create_app
from tests.conftest import ADMIN_TOKEN
from tests.upstream import Upstream

TRIGGER = "/admin/pricing/scheduler/trigger"
PROBLEM = "application/problem+json"


def admin_routes() -> list[tuple[str, str]]:
    """Every admin route the app registers, so a new one cannot skip auth."""
    from service.config import Settings

    app = create_app(Settings.from_env({"SYNCLOCK_ADMIN_TOKENS": ADMIN_TOKEN}))
    found = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith("/admin") and route.method != "HEAD":
            found.append((route.method, path.replace("{run_id}", "7f1e9a4c-0000-4000-8000-1")))
    return sorted(found)


async def slow_client(make_client: Any, upstream: tuple[Upstream, str], **env: str) -> Any:
    """A replica whose sync blocks on the upstream until the test opens the gate."""
    fake, url = upstream
    fake.default = "gate"
    return await make_client(SYNCLOCK_SOURCES=f"slow={url}", **env)


def test_every_admin_route_is_enumerated() -> None:
    methods_paths = admin_routes()
    assert ("POST", TRIGGER) in methods_paths
    assert ("DELETE", "/admin/pricing/sync/lock") in methods_paths
    assert len(methods_paths) == 5


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
    ],
)
async def test_admin_routes_refuse_missing_or_wrong_token(
    make_client: Any, headers: dict[str, str]
) -> None:
    client = await make_client()
    for method, path in admin_routes():
        response = await client.request(method, path, headers=headers)
        assert response.status == 401, (method, path)
        assert response.content_type == PROBLEM
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        body = await response.json()
        assert ADMIN_TOKEN not in str(body)


async def test_token_in_query_string_is_not_accepted(make_client: Any) -> None:
    client = await make_client()
    response = await client.post(f"{TRIGGER}?token={ADMIN_TOKEN}&access_token={ADMIN_TOKEN}")
    assert response.status == 401


async def test_rotated_tokens_both_work(make_client: Any) -> None:
    other = "second-admin-token-abcdefgh"
    client = await make_client(SYNCLOCK_ADMIN_TOKENS=f"{ADMIN_TOKEN},{other}")
    for token in (ADMIN_TOKEN, other):
        response = await client.get(
            "/admin/pricing/sync/runs", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status == 200


async def test_200_concurrent_triggers_one_202_rest_429(
    make_client: Any, upstream: tuple[Upstream, str], auth: dict[str, str]
) -> None:
    replica_a = await slow_client(make_client, upstream, SYNCLOCK_INSTANCE="a")
    replica_b = await slow_client(make_client, upstream, SYNCLOCK_INSTANCE="b")
    before = metrics.TRIGGERS_REJECTED.labels(trigger="manual")._value.get()

    async def fire(index: int) -> Any:
        client = replica_a if index % 2 else replica_b
        response = await client.post(TRIGGER, headers=auth)
        return response.status, dict(response.headers), await response.json()

    answers = await asyncio.gather(*(fire(i) for i in range(200)))
    upstream[0].gate.set()

    statuses = Counter(status for status, _, _ in answers)
    assert statuses == {202: 1, 429: 199}
    started = next(body for status, _, body in answers if status == 202)
    for status, headers, body in answers:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1
            assert headers["Content-Type"].startswith(PROBLEM)
            assert body["running_run_id"] == started["run_id"]
            assert body["holder"]["fence"] == started["fence"]
            assert body["holder"]["lease_remaining_ms"] > 0
    after = metrics.TRIGGERS_REJECTED.labels(trigger="manual")._value.get()
    assert after - before == 199


async def test_trigger_then_poll_location(make_client: Any, auth: dict[str, str]) -> None:
    client = await make_client()

    response = await client.post(TRIGGER, headers=auth)
    started = await response.json()
    assert response.status == 202
    assert response.headers["Location"] == f"/admin/pricing/sync/runs/{started['run_id']}"
    assert started["status"] == "running" and started["fence"] >= 1

    deadline = time.monotonic() + 30
    while True:
        run = await (await client.get(response.headers["Location"], headers=auth)).json()
        if run["status"] != "running" or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert run["status"] == "succeeded"
    assert run["counts"]["added"] > 2_000
    assert run["requested_by"] == "token-1"


async def test_wait_answers_200_with_finished_run(make_client: Any, auth: dict[str, str]) -> None:
    client = await make_client()
    response = await client.post(
        f"{TRIGGER}?wait=30", headers={**auth, "X-Requested-By": "gateway-admin"}
    )
    body = await response.json()
    assert response.status == 200
    assert body["status"] == "succeeded"
    assert body["requested_by"] == "gateway-admin (token-1)"


async def test_case13_bounded_wait_answers_202_within_bound(
    make_client: Any, upstream: tuple[Upstream, str], auth: dict[str, str]
) -> None:
    client = await slow_client(make_client, upstream)
    started = time.monotonic()
    response = await client.post(f"{TRIGGER}?wait=0.2", headers=auth)
    elapsed = time.monotonic() - started
    upstream[0].gate.set()
    assert response.status == 202
    assert 0.2 <= elapsed < 0.2 + 0.25


async def test_case11_disconnect_during_wait_keeps_the_sync(
    make_client: Any, upstream: tuple[Upstream, str], auth: dict[str, str]
) -> None:
    client = await slow_client(make_client, upstream)
    waiting = asyncio.create_task(client.post(f"{TRIGGER}?wait=30", headers=auth))
    await asyncio.sleep(0.3)
    waiting.cancel()  # the caller goes away mid-wait
    with pytest.raises(asyncio.CancelledError):
        await waiting

    status = await (await client.get("/admin/pricing/scheduler/status", headers=auth)).json()
    assert status["lock"]["held"] is True
    run_id = status["running_run"]["id"]
    upstream[0].gate.set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        run = await (await client.get(f"/admin/pricing/sync/runs/{run_id}", headers=auth)).json()
        if run["status"] != "running":
            break
        await asyncio.sleep(0.05)
    assert run["status"] == "succeeded"
    after = await (await client.get("/admin/pricing/scheduler/status", headers=auth)).json()
    assert after["lock"]["held"] is False


@pytest.mark.parametrize("wait", ["abc", "-1", "nan", "inf", "61", "1e400"])
async def test_bad_wait_is_400_and_starts_nothing(
    make_client: Any, auth: dict[str, str], wait: str
) -> None:
    client = await make_client()
    response = await client.post(f"{TRIGGER}?wait={wait}", headers=auth)
    body = await response.json()
    assert response.status == 400
    assert response.content_type == PROBLEM
    assert body["parameter"] == "wait"
    status = await (await client.get("/admin/pricing/scheduler/status", headers=auth)).json()
    assert status["lock"]["held"] is False


async def test_status_during_and_after_a_run(
    make_client: Any, upstream: tuple[Upstream, str], auth: dict[str, str]
) -> None:
    client = await slow_client(make_client, upstream)
    started = await (await client.post(TRIGGER, headers=auth)).json()

    during = await (await client.get("/admin/pricing/scheduler/status", headers=auth)).json()
    upstream[0].gate.set()
    await client.get(f"/admin/pricing/sync/runs/{started['run_id']}", headers=auth)
    for _ in range(100):
        after = await (await client.get("/admin/pricing/scheduler/status", headers=auth)).json()
        if after["last_success_at"]:
            break
        await asyncio.sleep(0.05)

    assert during["lock"]["held"] is True
    assert during["lock"]["holder"]["run_id"] == started["run_id"]
    assert during["lock"]["holder"]["owner"] == "test-a"
    assert 0 < during["lock"]["holder"]["lease_remaining_ms"] <= 30_000
    assert during["running_run"]["id"] == started["run_id"]
    assert after["lock"]["held"] is False and after["running_run"] is None
    assert after["last_success_at"] is not None
    assert after["lock"]["last_fence"] == started["fence"]


async def test_runs_listing_newest_first_with_filters(
    make_client: Any, auth: dict[str, str]
) -> None:
    client = await make_client()
    ids = []
    for _ in range(3):
        ids.append((await (await client.post(f"{TRIGGER}?wait=30", headers=auth)).json())["id"])

    runs = await (await client.get("/admin/pricing/sync/runs?limit=2", headers=auth)).json()
    failed = await (await client.get("/admin/pricing/sync/runs?status=failed", headers=auth)).json()

    assert [r["id"] for r in runs["runs"]] == [ids[2], ids[1]]
    assert failed["runs"] == []


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("limit=-1", "limit"),
        ("status=nope", "status"),
    ],
)
async def test_runs_listing_rejects_bad_parameters(
    make_client: Any, auth: dict[str, str], query: str, parameter: str
) -> None:
    client = await make_client()
    response = await client.get(f"/admin/pricing/sync/runs?{query}", headers=auth)
    assert response.status == 400
    assert (await response.json())["parameter"] == parameter


async def test_run_lookup_404_and_400(make_client: Any, auth: dict[str, str]) -> None:
    client = await make_client()
    missing = await client.get(
        "/admin/pricing/sync/runs/7f1e9a4c-0000-4000-8000-000000000001", headers=auth
    )
    malformed = await client.get("/admin/pricing/sync/runs/not-a-uuid", headers=auth)
    assert missing.status == 404 and missing.content_type == PROBLEM
    assert malformed.status == 400 and (await malformed.json())["parameter"] == "run_id"


@pytest.mark.parametrize("from_other_replica", [False, True])
async def test_forced_release_needs_a_reason_and_is_counted(
    make_client: Any,
    upstream: tuple[Upstream, str],
    auth: dict[str, str],
    from_other_replica: bool,
) -> None:
    runner = await slow_client(make_client, upstream)
    client = await make_client(SYNCLOCK_INSTANCE="b") if from_other_replica else runner
    started = await (await client.post(TRIGGER, headers=auth)).json()
    before = metrics.FORCED_RELEASES._value.get()
    path = "/admin/pricing/sync/lock"

    no_body = await client.delete(path, headers=auth)
    wrong_type = await client.delete(path, headers=auth, data="reason")
    bad_json = await client.delete(
        path, headers={**auth, "Content-Type": "application/json"}, data="{"
    )
    empty = await client.delete(path, headers=auth, json={"reason": " "})
    released = await client.delete(path, headers=auth, json={"reason": "stuck after deploy"})
    again = await client.delete(path, headers=auth, json={"reason": "again"})

    assert [no_body.status, wrong_type.status, bad_json.status, empty.status] == [
        422,
        415,
        400,
        422,
    ]
    body = await released.json()
    assert released.status == 200 and body["released"] is True
    assert body["holder"]["run_id"] == started["run_id"]
    assert (await again.json())["released"] is False
    assert metrics.FORCED_RELEASES._value.get() - before == 1  # "again" deleted nothing
    upstream[0].gate.set()
    for _ in range(100):
        run = await (
            await client.get(f"/admin/pricing/sync/runs/{started['run_id']}", headers=auth)
        ).json()
        if run["status"] != "running":
            break
        await asyncio.sleep(0.05)
    assert run["status"] == "lost_lease"


async def test_oversized_body_is_413_problem(make_client: Any, auth: dict[str, str]) -> None:
    client = await make_client()
    response = await client.delete(
        "/admin/pricing/sync/lock", headers=auth, json={"reason": "x" * 100_000}
    )
    assert response.status == 413
    assert response.content_type == PROBLEM


async def test_unknown_route_and_method_are_problems(make_client: Any) -> None:
    client = await make_client()
    missing = await client.get("/nope")
    wrong = await client.put(TRIGGER)
    assert missing.status == 404 and missing.content_type == PROBLEM
    assert wrong.status == 405 and wrong.content_type == PROBLEM
    assert "POST" in wrong.headers["Allow"]


async def test_request_id_is_echoed_or_replaced(make_client: Any) -> None:
    client = await make_client()
    kept = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    replaced = await client.get("/healthz", headers={"X-Request-ID": "bad id\u00e9" * 30})
    assert kept.headers["X-Request-ID"] == "abc-123"
    assert len(replaced.headers["X-Request-ID"]) == 32


async def test_health_readiness_and_metrics(make_client: Any, auth: dict[str, str]) -> None:
    client: TestClient[Any, Any] = await make_client()
    await client.post(f"{TRIGGER}?wait=30", headers=auth)

    health = await client.get("/healthz")
    ready = await client.get("/readyz")
    exposition = await (await client.get("/metrics")).text()

    assert health.status == 200
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"redis": "ok", "postgres": "ok"}
    for name in (
        "synclock_lock_acquisitions_total",
        "synclock_trigger_rejected_total",
        "synclock_lease_renewals_total",
        "synclock_fence_rejections_total",
        "synclock_lock_forced_releases_total",
        "synclock_lock_hold_seconds_bucket",
        "synclock_sync_duration_seconds_bucket",
        "synclock_sync_runs_total",
        "synclock_models_changed_total",
        "synclock_last_success_timestamp_seconds",
        "synclock_http_requests_total",
        "synclock_http_request_duration_seconds_bucket",
        "synclock_backend_errors_total",
        "synclock_build_info",
    ):
        assert f"\n{name}" in exposition, name
    assert (
        'synclock_http_requests_total{method="POST",route="/admin/pricing/scheduler/trigger"'
        in exposition
    )
    assert 'synclock_sync_runs_total{outcome="succeeded"}' in exposition


async def test_last_success_is_restored_from_postgres_at_start(
    make_client: Any, auth: dict[str, str]
) -> None:
    first = await make_client()
    run = await (await first.post(f"{TRIGGER}?wait=30", headers=auth)).json()
    metrics.LAST_SUCCESS.set(0)  # as in a freshly started process

    await make_client(SYNCLOCK_INSTANCE="restarted")

    from datetime import datetime

    finished = datetime.fromisoformat(run["finished_at"]).timestamp()
    assert metrics.LAST_SUCCESS._value.get() == pytest.approx(finished, abs=0.001)
