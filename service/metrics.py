"""Every Prometheus metric synclock exports, named here and nowhere else.

Labels are closed sets, and every labelled series is created at zero on import so
``rate()`` has a first sample from the very first scrape.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from service import __version__

LOCK_OUTCOMES = ("acquired", "contended", "error")
RENEWAL_OUTCOMES = ("renewed", "lost", "error")
RUN_OUTCOMES = (
    "succeeded",
    "partial",
    "failed",
    "fenced_out",
    "lost_lease",
    "interrupted",
)
CHANGE_KINDS = ("added", "changed", "deactivated")
BACKENDS = ("redis", "postgres")
# Route templates with their method, and the statuses that dashboards and alerts
# select (success, 429, 5xx), created at zero so the first 429 or 503 of a process
# shows in rate(). Other statuses appear on first use. A test keeps the routes equal
# to the ones the app registers.
_ADMIN_FAILURES = ("500", "503")
HTTP_ROUTES: dict[tuple[str, str], tuple[str, ...]] = {
    ("/admin/pricing/scheduler/trigger", "POST"): ("200", "202", "429", *_ADMIN_FAILURES),
    ("/admin/pricing/sync/runs/{run_id}", "GET"): ("200", *_ADMIN_FAILURES),
    ("/admin/pricing/sync/runs", "GET"): ("200", *_ADMIN_FAILURES),
    ("/admin/pricing/scheduler/status", "GET"): ("200", *_ADMIN_FAILURES),
    ("/admin/pricing/sync/lock", "DELETE"): ("200", *_ADMIN_FAILURES),
    ("/healthz", "GET"): ("200",),
    ("/readyz", "GET"): ("200", "503"),
    ("/openapi.json", "GET"): ("200",),
    ("/metrics", "GET"): ("200",),
}

LOCK_ACQUISITIONS = Counter(
    "synclock_lock_acquisitions_total",
    "Lease acquisition attempts by outcome.",
    ["outcome"],
)
TRIGGERS_REJECTED = Counter(
    "synclock_trigger_rejected_total",
    "Sync triggers refused because a sync already holds the lock (HTTP 429 when manual).",
    ["trigger"],
)
LEASE_RENEWALS = Counter(
    "synclock_lease_renewals_total",
    "Lease renewals made by running syncs, by outcome.",
    ["outcome"],
)
FENCE_REJECTIONS = Counter(
    "synclock_fence_rejections_total",
    "Writes refused by Postgres because a newer fencing token was accepted.",
)
FORCED_RELEASES = Counter(
    "synclock_lock_forced_releases_total",
    "Leases deleted through the admin API regardless of holder.",
)
REDIS_SCRIPT_RELOADS = Counter(
    "synclock_redis_script_reloads_total",
    "Lua scripts reloaded after Redis answered NOSCRIPT (flush or restart).",
)
LOCK_HOLD = Histogram(
    "synclock_lock_hold_seconds",
    "Time from lease grant to release or loss.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
LOCK_HELD = Gauge(
    "synclock_lock_held",
    "1 while this instance holds the sync lease.",
)
LOCK_HELD_SINCE = Gauge(
    "synclock_lock_held_since_timestamp_seconds",
    "Unix time this instance was granted the lease it holds now; 0 while it holds none.",
)
FENCE_TOKEN = Gauge(
    "synclock_fence_token",
    "Fencing token of the latest lease this instance was granted.",
)
SYNC_DURATION = Histogram(
    "synclock_sync_duration_seconds",
    "Wall time of finished sync runs, by outcome.",
    ["outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
SYNC_RUNS = Counter(
    "synclock_sync_runs_total",
    "Finished sync runs by outcome.",
    ["outcome"],
)
MODELS_CHANGED = Counter(
    "synclock_models_changed_total",
    "Model price rows written by syncs, by kind of change.",
    ["kind"],
)
LAST_SUCCESS = Gauge(
    "synclock_last_success_timestamp_seconds",
    "Unix time the last successful sync finished (restored from Postgres at start).",
)
SYNC_INTERVAL = Gauge(
    "synclock_sync_interval_seconds",
    "Configured time between scheduled syncs (SYNCLOCK_SYNC_INTERVAL); the stale-sync"
    " alerts are relative to it.",
)
HTTP_REQUESTS = Counter(
    "synclock_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "synclock_http_request_duration_seconds",
    "HTTP request latency by route template and method.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BACKEND_ERRORS = Counter(
    "synclock_backend_errors_total",
    "Failed calls to a backend (timeouts, refused or dropped connections).",
    ["backend"],
)
BACKEND_UP = Gauge(
    "synclock_backend_up",
    "1 if the backend answered the last readiness check.",
    ["backend"],
)
BUILD_INFO = Info("synclock_build", "Version of the running synclock.")

BUILD_INFO.info({"version": __version__})
for _outcome in LOCK_OUTCOMES:
    LOCK_ACQUISITIONS.labels(outcome=_outcome)
for _outcome in RENEWAL_OUTCOMES:
    LEASE_RENEWALS.labels(outcome=_outcome)
for _outcome in RUN_OUTCOMES:
    SYNC_RUNS.labels(outcome=_outcome)
    SYNC_DURATION.labels(outcome=_outcome)
for _kind in CHANGE_KINDS:
    MODELS_CHANGED.labels(kind=_kind)
for _backend in BACKENDS:
    BACKEND_ERRORS.labels(backend=_backend)
    BACKEND_UP.labels(backend=_backend)
for _trigger in ("manual", "scheduled"):
    TRIGGERS_REJECTED.labels(trigger=_trigger)
for (_route, _method), _statuses in HTTP_ROUTES.items():
    HTTP_DURATION.labels(route=_route, method=_method)
    for _status in _statuses:
        HTTP_REQUESTS.labels(route=_route, method=_method, status=_status)
