"""Benchmark synclock against bare baselines measured in the same run.

    python scripts/bench.py [--duration 10] [--repeats 5] [--json PATH]

1. The contended trigger path (HTTP 429) under wrk, against a bare aiohttp JSON handler.
2. Lease acquire+release cycles through LeaseLock, against raw EVALSHA calls.
3. A full genai-prices sync and an unchanged re-run, against one asyncpg COPY.
4. The server's resident memory idle and during a sync, against the bare app's.

Needs wrk, Redis and PostgreSQL on 127.0.0.1 (SYNCLOCK_BENCH_REDIS_URL and
SYNCLOCK_BENCH_DATABASE_URL override the defaults). Everything started here binds
127.0.0.1 and is stopped by PID before exit; the run's Redis keys and schemas are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, astuple, dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from service import logs
from service.config import Settings
from service.lock import ACQUIRE_LUA, RELEASE_LUA, Lease, LeaseLock
from service.records import RunStatus, Trigger
from service.runtime import connect_redis, open_runtime
from service.sync.sources.genai import read_catalog

LOCK_NAME = "pricing-sync"
TRIGGER_PATH = "/admin/pricing/scheduler/trigger"
WARMUP_S = 2
LOCK_TASKS = 50
LOCK_ROUNDS = 3
LOCK_ROUND_S = 3.0
LOCK_TTL_MS = 30_000
STOP_TIMEOUT_S = 10.0

# argv: port, path, and optionally a Redis URL plus three lock keys: then every
# request makes one EVALSHA of the acquire script through synclock's own pool.
BARE_APP = """
import sys
from aiohttp import web

state = {}

async def handle(request):
    if not state:
        return web.json_response({"status": "ok"})
    reply = await state["redis"].evalsha(state["sha"], 3, *sys.argv[4:7], "t", 30000, 0, "b", "")
    return web.json_response({"held": reply[0] == 0}, status=429 if reply[0] == 0 else 200)

async def ready(request):
    return web.json_response({"status": "ok"})

async def with_redis(app):
    from service.lock import ACQUIRE_LUA
    from service.runtime import connect_redis
    state["redis"] = connect_redis(sys.argv[3], 2.0)
    state["sha"] = await state["redis"].script_load(ACQUIRE_LUA)
    yield
    await state["redis"].aclose()

app = web.Application()
if len(sys.argv) > 3:
    app.cleanup_ctx.append(with_redis)
app.router.add_post(sys.argv[2], handle)
app.router.add_get("/readyz", ready)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""
WRK_LUA = 'wrk.method = "POST"\nwrk.headers["Authorization"] = "Bearer {token}"\n'
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
Process = asyncio.subprocess.Process
_BESIDE = Path(sys.executable).with_name("synclock")  # the venv's console script
SYNCLOCK_BIN = str(_BESIDE) if _BESIDE.exists() else "synclock"


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    unit: str
    value: float
    baseline: float
    target: tuple[str, float] | None = None  # (">=" or "<=", limit on the ratio)

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else float("nan")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, limit = self.target
        return self.ratio >= limit if op == ">=" else self.ratio <= limit

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int


class Bench:
    """What one run owns: temp files, subprocesses by PID, schemas and a key prefix."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.redis_url = _local_url("SYNCLOCK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
        self.database_url = _local_url(
            "SYNCLOCK_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
        )
        self.tag = uuid.uuid4().hex[:10]
        self.token = secrets.token_hex(16)  # 32 characters
        self.lua = tmp / "trigger.lua"
        self.lua.write_text(WRK_LUA.format(token=self.token))
        self.schemas: list[str] = []
        self.procs: dict[int, Process] = {}
        self.files: list[TextIO] = []
        self.sections: dict[str, list[Row]] = {}
        self.notes: dict[str, Any] = {}

    def prefix(self, part: str) -> str:
        return f"synclock-bench:{self.tag}:{part}:"

    def env(self, part: str, **extra: str) -> dict[str, str]:
        """Environment for one server or runtime: its own key prefix and schema."""
        self.schemas.append(f"bench_{self.tag}_{part}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCLOCK_")}
        env |= {
            "SYNCLOCK_REDIS_URL": self.redis_url,
            "SYNCLOCK_DATABASE_URL": self.database_url,
            "SYNCLOCK_REDIS_PREFIX": self.prefix(part),
            "SYNCLOCK_DATABASE_SCHEMA": self.schemas[-1],
            "SYNCLOCK_ADMIN_TOKENS": self.token,
            "SYNCLOCK_SCHEDULER": "off",
            "SYNCLOCK_LOG_LEVEL": "info",
            "SYNCLOCK_LOG_FORMAT": "json",
            "SYNCLOCK_SHUTDOWN_TIMEOUT": "5s",
            "SYNCLOCK_DATA_DIR": str(self.tmp / "data"),
        }
        return env | extra

    def log_file(self, name: str) -> TextIO:
        handle = (self.tmp / f"{name}.log").open("w")
        self.files.append(handle)
        return handle

    async def spawn(self, argv: list[str], *, log: str = "", env: Any = None) -> Process:
        """Start a process; its output goes to a temp log file, or a pipe without one."""
        out: Any = self.log_file(log) if log else asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
        )
        self.procs[proc.pid] = proc
        return proc

    async def stop(self, proc: Process) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S: always bounded."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.wait_for(proc.wait(), 5)
        self.procs.pop(proc.pid, None)

    async def cleanup(self) -> None:
        for proc in reversed(list(self.procs.values())):
            await self.stop(proc)
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            for schema in self.schemas:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
        client = connect_redis(self.redis_url, 5.0)
        try:
            keys = [k async for k in client.scan_iter(match=f"synclock-bench:{self.tag}:*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
        for handle in self.files:
            handle.close()


def _local_url(variable: str, default: str) -> str:
    url = os.environ.get(variable) or default
    if urlsplit(url).hostname not in ("127.0.0.1", None):
        raise SystemExit(f"bench: {variable} must point at 127.0.0.1, not {url!r}")
    return url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (peak resident so far) of a process, in MiB."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = round(int(rest.split()[0]) / 1024, 1)
    return found


async def request(port: int, path: str, token: str = "", timeout_s: float = 5) -> tuple[int, Any]:
    """POST with the admin token, or GET without one; returns (status, JSON body)."""
    method, headers = ("POST", {"Authorization": f"Bearer {token}"}) if token else ("GET", {})
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
        session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def wait_ready(proc: Process, port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"pid {proc.pid} exited ({proc.returncode}) before /readyz")
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
            if (await request(port, "/readyz", timeout_s=2))[0] == 200:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"pid {proc.pid} not ready on port {port} after {timeout_s:g} s")


def parse_wrk(text: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"wrk output lacks {pattern!r}:\n{text}")
        return match

    def latency_ms(percent: str) -> float:
        match = find(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s|m)\s*$")
        return float(match.group(1)) * _UNIT_MS[match.group(2)]

    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    return WrkResult(
        requests=int(find(r"^\s*(\d+) requests in").group(1)),
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=latency_ms("50"),
        p99_ms=latency_ms("99"),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(map(int, re.findall(r"\d+", errors.group(1)))) if errors else 0,
    )


async def run_wrk(b: Bench, port: int, seconds: float) -> WrkResult:
    argv = ["wrk", f"-t{b.args.threads}", f"-c{b.args.connections}", f"-d{seconds:g}s"]
    argv += ["--latency", "-s", str(b.lua), f"http://127.0.0.1:{port}{TRIGGER_PATH}"]
    proc = await b.spawn(argv)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
    finally:
        await b.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {err.decode()[-500:]}")
    return parse_wrk(out.decode())


async def load(b: Bench, port: int, expect: int) -> tuple[WrkResult, int]:
    """Warm up, then measure; every answer must be 2xx (expect 200) or not (429).
    Returns the measured run and the number of requests wrk counted in both."""
    warm = await run_wrk(b, port, WARMUP_S)
    result = await run_wrk(b, port, b.args.duration)
    for run in (warm, result):
        wrong = run.non_2xx if expect < 300 else run.requests - run.non_2xx
        if wrong or run.socket_errors:
            raise RuntimeError(f"expected only {expect}s, got {wrong} others: {run}")
    return result, warm.requests + result.requests


async def measure_bare(b: Bench, *redis_args: str) -> WrkResult:
    """The bare app under the same load; with redis_args, one EVALSHA per request."""
    port = free_port()
    argv = [sys.executable, "-c", BARE_APP, str(port), TRIGGER_PATH, *redis_args]
    bare = await b.spawn(argv, log="bare-redis" if redis_args else "bare")
    try:
        await wait_ready(bare, port)
        idle = memory_mib(bare.pid)
        result, _ = await load(b, port, 429 if redis_args else 200)
        name = "ref" if redis_args else "bare"
        b.notes[f"http_{name}_non_2xx_of_requests"] = f"{result.non_2xx}/{result.requests}"
        if not redis_args:
            b.notes["http_bare_memory_mib"] = {"idle": idle, "after_load": memory_mib(bare.pid)}
        return result
    finally:
        await b.stop(bare)


class SlowUpstream:
    """An OpenRouter-style models endpoint that answers only once released."""

    def __init__(self) -> None:
        self.called = asyncio.Event()
        self.released = asyncio.Event()
        self.runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/api/v1/models", self.models)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}/api/v1/models"

    async def models(self, request: web.Request) -> web.Response:
        self.called.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.released.wait(), 600)
        return web.json_response({"data": []})

    async def stop(self) -> None:
        self.released.set()
        if self.runner is not None:
            await self.runner.cleanup()


async def serve(b: Bench, part: str, **env: str) -> tuple[Process, int]:
    """``synclock serve`` on a free port of 127.0.0.1, once /readyz answers 200."""
    port = free_port()
    argv = [SYNCLOCK_BIN, "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = await b.spawn(argv, log=part, env=b.env(part, **env))
    await wait_ready(server, port)
    return server, port


async def evalsha_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def contended(b: Bench, port: int, client: aioredis.Redis, variant: str) -> WrkResult:
    """Load the trigger; note the 429s wrk saw and the EVALSHA calls Redis ran per request."""
    calls = await evalsha_calls(client)
    result, sent = await load(b, port, 429)
    # wrk stops with up to -c requests still queued in the server; let it answer them
    # before the lock changes hands, or one of them would start a sync.
    await asyncio.sleep(1)
    b.notes[f"http_{variant}_non_2xx_of_requests"] = f"{result.non_2xx}/{result.requests}"
    b.notes[f"http_{variant}_evalsha_per_request"] = round(
        (await evalsha_calls(client) - calls) / sent, 3
    )
    return result


def http_rows(name: str, run: WrkResult, base: WrkResult, target: float | None) -> list[Row]:
    return [
        Row(f"{name}: req/s", "req/s", run.rps, base.rps, (">=", target) if target else None),
        Row(f"{name}: p50 latency", "ms", run.p50_ms, base.p50_ms),
        Row(f"{name}: p99 latency", "ms", run.p99_ms, base.p99_ms),
    ]


async def http_section(b: Bench) -> list[Row]:
    base = await measure_bare(b)
    client = connect_redis(b.redis_url, 2.0)
    lock = LeaseLock(client, prefix=b.prefix("http"), max_ttl_ms=600_000)
    upstream = SlowUpstream()
    timeout_s = min(300, WARMUP_S + b.args.duration + 60)
    server: Process | None = None
    try:
        lease = await lock.try_acquire(LOCK_NAME, 300_000, owner="bench-other", run_id="other")
        if not isinstance(lease, Lease):
            raise RuntimeError(f"the benchmark could not take the lock: {lease}")
        ref = await measure_bare(b, b.redis_url, *lock.keys(LOCK_NAME))
        server, port = await serve(
            b,
            "http",
            SYNCLOCK_SOURCES=f"slow={await upstream.start()}",
            SYNCLOCK_SOURCE_TIMEOUT=f"{timeout_s:g}s",
            SYNCLOCK_SOURCE_RETRIES="0",
        )
        status, body = await request(port, TRIGGER_PATH, b.token)
        if status != 429 or body["holder"]["owner"] != "bench-other":
            raise RuntimeError(f"expected 429 held by bench-other, got {status} {body}")
        other = await contended(b, port, client, "a")
        await lock.release(lease)

        status, body = await request(port, TRIGGER_PATH, b.token)
        if status != 202:
            raise RuntimeError(f"expected 202 starting the slow sync, got {status} {body}")
        await asyncio.wait_for(upstream.called.wait(), 10)
        status, answer = await request(port, TRIGGER_PATH, b.token)
        if status != 429 or answer.get("running_run_id") != body["run_id"]:
            raise RuntimeError(f"expected 429 for our own run, got {status} {answer}")
        local = await contended(b, port, client, "b")
    finally:
        await upstream.stop()
        if server is not None:
            await b.stop(server)
        await client.aclose()
    b.notes["http_server_logged"] = logged_statuses(b.tmp / "http.log")
    return (
        http_rows("(a) held by another replica", other, base, 0.25)
        + http_rows("(b) held by this instance", local, base, 0.25)
        + http_rows("(ref) bare app + 1 EVALSHA", ref, base, None)
    )


def logged_statuses(path: Path) -> dict[str, int]:
    """The server's own 'request' log lines, counted by route and status."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "request":
                key = f"{event.get('route')} {event.get('status')}"
                counts[key] = counts.get(key, 0) + 1
    return counts


async def cycles_per_s(cycle: Callable[[int], Awaitable[None]], seconds: float) -> float:
    """LOCK_TASKS tasks each call ``cycle(their index)`` until the deadline."""
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> int:
        done = 0
        while time.monotonic() < deadline:
            await cycle(index)
            done += 1
        return done

    began = time.perf_counter()
    counts = await asyncio.gather(*(worker(i) for i in range(LOCK_TASKS)))
    return sum(counts) / (time.perf_counter() - began)


async def lock_section(b: Bench) -> list[Row]:
    layer_client = connect_redis(b.redis_url, 2.0)
    raw = connect_redis(b.redis_url, 2.0)
    lock = LeaseLock(layer_client, prefix=b.prefix("lock"), max_ttl_ms=600_000)
    names = [f"bench-{i}" for i in range(LOCK_TASKS)]
    keys = [lock.keys(name) for name in names]
    rates: dict[str, list[float]] = {"layer": [], "raw": []}
    try:
        acquire_sha = await raw.script_load(ACQUIRE_LUA)
        release_sha = await raw.script_load(RELEASE_LUA)

        async def through_layer(i: int) -> None:
            lease = await lock.try_acquire(names[i], LOCK_TTL_MS, owner="bench")
            if not isinstance(lease, Lease):
                raise RuntimeError(f"lock {names[i]} unexpectedly held: {lease}")
            await lock.release(lease)

        async def raw_calls(i: int) -> None:
            lock_key, fence_key, holder_key = keys[i]
            token = secrets.token_hex(16)
            args = (token, LOCK_TTL_MS, 0, "bench", "")
            reply = await raw.evalsha(acquire_sha, 3, lock_key, fence_key, holder_key, *args)
            if int(reply[0]) != 1:
                raise RuntimeError(f"lock {lock_key} unexpectedly held: {reply}")
            await raw.evalsha(release_sha, 2, lock_key, holder_key, token)

        await cycles_per_s(through_layer, 0.5)  # warm-up: connections, scripts
        await cycles_per_s(raw_calls, 0.5)
        for _ in range(LOCK_ROUNDS):
            rates["layer"].append(await cycles_per_s(through_layer, LOCK_ROUND_S))
            rates["raw"].append(await cycles_per_s(raw_calls, LOCK_ROUND_S))
    finally:
        await layer_client.aclose()
        await raw.aclose()
    b.notes["lock_rounds_cycles_per_s"] = {k: [round(r) for r in v] for k, v in rates.items()}
    layer, raw_rate = statistics.median(rates["layer"]), statistics.median(rates["raw"])
    return [Row("acquire+release cycles, median", "cycles/s", layer, raw_rate, (">=", 0.8))]


COPY_COLUMNS = (
    *("provider", "model_id", "name", "input_usd_per_mtok", "output_usd_per_mtok"),
    *("cached_input_usd_per_mtok", "context_window", "source", "fence", "run_id"),
)


async def copy_ms(conn: asyncpg.Connection, schema: str, rows: list[tuple[Any, ...]]) -> float:
    """Time one COPY of ``rows`` into a new, empty table shaped like model_prices."""
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE; CREATE SCHEMA "{schema}"')
    await conn.execute(
        f'CREATE TABLE "{schema}".model_prices (provider text NOT NULL, model_id text NOT NULL,'
        " name text, input_usd_per_mtok numeric, output_usd_per_mtok numeric,"
        " cached_input_usd_per_mtok numeric, context_window integer, source text NOT NULL,"
        " fence bigint NOT NULL, run_id uuid NOT NULL, active boolean NOT NULL DEFAULT true,"
        " missing_runs integer NOT NULL DEFAULT 0,"
        " first_seen timestamptz NOT NULL DEFAULT now(),"
        " last_changed timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (provider, model_id));"
        f' CREATE INDEX ON "{schema}".model_prices (source, active)'
    )
    began = time.perf_counter()
    await conn.copy_records_to_table(
        "model_prices", schema_name=schema, records=rows, columns=COPY_COLUMNS
    )
    return (time.perf_counter() - began) * 1000


async def sync_section(b: Bench) -> list[Row]:
    read_catalog(datetime.now(UTC))  # the first call also imports the catalog
    began = time.perf_counter()
    catalog = read_catalog(datetime.now(UTC))
    read_ms = (time.perf_counter() - began) * 1000
    run_uuid = uuid.uuid4()
    rows = [(*astuple(r), "genai-prices", 1, run_uuid) for r in catalog.records]
    times: dict[str, list[float]] = {"first": [], "rerun": [], "first_own": [], "rerun_own": []}
    copies: list[float] = []
    b.schemas.append(copy_schema := f"bench_{b.tag}_copy")
    conn = await asyncpg.connect(b.database_url, timeout=10)
    try:
        for i in range(b.args.repeats):
            settings = Settings.from_env(b.env(f"sync{i}", SYNCLOCK_SOURCES="genai-prices"))
            async with open_runtime(settings) as runtime:
                await runtime.job.start()
                for kind, added in (("first", len(rows)), ("rerun", 0)):
                    began = time.perf_counter()
                    started = await runtime.job.trigger(Trigger.MANUAL, "bench")
                    record = await runtime.job.wait(started.run_id, 60)
                    times[kind].append((time.perf_counter() - began) * 1000)
                    if record is None or record.status is not RunStatus.SUCCEEDED:
                        raise RuntimeError(f"{kind} sync did not succeed: {record}")
                    if (record.counts.added, record.counts.changed) != (added, 0):
                        raise RuntimeError(f"{kind} sync counted {record.counts}")
                    times[f"{kind}_own"].append((record.duration_s or 0) * 1000)
            copies.append(await copy_ms(conn, copy_schema, rows))
    finally:
        await conn.close()
    copy = statistics.median(copies)
    b.notes["sync_models"] = len(rows)
    b.notes["sync_samples_ms"] = {k: [round(t, 1) for t in v] for k, v in times.items()}
    b.notes["sync_samples_ms"]["copy"] = [round(t, 1) for t in copies]
    med = {kind: statistics.median(values) for kind, values in times.items()}
    return [
        Row("first sync: trigger to finished record", "ms", med["first"], copy, ("<=", 5)),
        Row("first sync: the run's own duration_s", "ms", med["first_own"], copy, ("<=", 5)),
        Row("unchanged re-run: trigger to record", "ms", med["rerun"], copy, ("<=", 3)),
        Row("unchanged re-run: the run's duration_s", "ms", med["rerun_own"], copy, ("<=", 3)),
        Row("(info) read_catalog alone, in-process", "ms", read_ms, copy),
    ]


async def rss_section(b: Bench) -> list[Row]:
    server, port = await serve(b, "rss", SYNCLOCK_SOURCES="genai-prices")
    peak_rss = 0.0
    try:
        await asyncio.sleep(1)
        idle = memory_mib(server.pid)
        sync = asyncio.create_task(request(port, f"{TRIGGER_PATH}?wait=30", b.token, 40))
        while not sync.done():
            peak_rss = max(peak_rss, memory_mib(server.pid)["VmRSS"])
            await asyncio.sleep(0.005)
        status, body = sync.result()
        after = memory_mib(server.pid)
    finally:
        await b.stop(server)
    if status != 200 or body.get("status") != "succeeded":
        raise RuntimeError(f"the sync for the memory sample did not succeed: {status} {body}")
    b.notes["rss_sync"] = {"duration_s": body["duration_s"], "counts": body["counts"]}
    bare = b.notes["http_bare_memory_mib"]
    idle_bare, loaded_bare = bare["idle"], bare["after_load"]
    return [
        Row("idle VmRSS (bare: idle)", "MiB", idle["VmRSS"], idle_bare["VmRSS"]),
        Row("idle VmHWM (bare: idle)", "MiB", idle["VmHWM"], idle_bare["VmHWM"]),
        Row("peak VmRSS during sync (bare: after wrk)", "MiB", peak_rss, loaded_bare["VmRSS"]),
        Row("VmHWM after sync (bare: after wrk)", "MiB", after["VmHWM"], loaded_bare["VmHWM"]),
    ]


def print_table(title: str, rows: list[Row]) -> None:
    def num(value: float) -> str:
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"

    head = f"{'metric':<50} {'synclock':>9} {'baseline':>9} {'ratio':>7}  {'target':<8} met"
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for row in rows:
        target = f"{row.target[0]}{row.target[1]:g}x" if row.target else "-"
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        label = f"{row.label} [{row.unit}]"
        print(
            f"{label:<50} {num(row.value):>9} {num(row.baseline):>9}"
            f" {row.ratio:>6.2f}x  {target:<8} {met}"
        )


async def header(b: Bench) -> str:
    client = connect_redis(b.redis_url, 5.0)
    try:
        redis_version = (await client.info("server"))["redis_version"]
    finally:
        await client.aclose()
    conn = await asyncpg.connect(b.database_url, timeout=10)
    try:
        pg_version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    proc = await b.spawn(["wrk", "-v"])
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    await b.stop(proc)
    packages = ("synclock", "aiohttp", "redis", "asyncpg", "structlog", "genai-prices")
    b.notes["versions"] = {p: version(p) for p in packages} | {
        "python": sys.version.split()[0],
        "redis-server": redis_version,
        "postgres": pg_version.split()[0],
        "wrk": out.decode().split()[1] if out else "?",
    }
    versions = ", ".join(f"{k} {v}" for k, v in b.notes["versions"].items())
    now = f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC}"
    return f"synclock bench, {now}, {os.cpu_count()} CPUs; {versions}"


SECTIONS: list[tuple[str, str, Callable[[Bench], Awaitable[list[Row]]]]] = [
    ("http", "1. Contended trigger, HTTP 429 (baseline: bare aiohttp JSON handler)", http_section),
    ("lock", "2. Lock layer, 50 tasks (baseline: raw redis-py EVALSHA)", lock_section),
    ("sync", "3. genai-prices sync, medians (baseline: asyncpg COPY, same rows)", sync_section),
    ("rss", "4. Server memory (baseline: the bare aiohttp app of section 1)", rss_section),
]


async def run_sections(b: Bench) -> bool:
    """Every section in turn; a failed one is reported and the next still runs."""
    ok = True
    print(await header(b))
    print(
        f"wrk -t{b.args.threads} -c{b.args.connections} -d{b.args.duration:g}s after a"
        f" {WARMUP_S}s warm-up; syncs repeated {b.args.repeats}x; logging at info",
        flush=True,
    )
    for key, title, section in SECTIONS:
        try:
            b.sections[key] = await section(b)
        except Exception as exc:
            ok = False
            b.notes[f"{key}_error"] = repr(exc)
            print(f"\n{title}\n  FAILED: {exc!r}", flush=True)
            continue
        print_table(title, b.sections[key])
        for name, value in b.notes.items():
            if name.startswith(key):
                print(f"  {name}: {json.dumps(value)}")
        sys.stdout.flush()
    return ok


async def main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # cancel, so that cleanup still runs
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    with tempfile.TemporaryDirectory(prefix="synclock-bench-") as tmp:
        b = Bench(args, Path(tmp))
        logs.configure("info", "json", stream=b.log_file("in-process"))  # section 3 logs
        try:
            ok = await run_sections(b)
        except asyncio.CancelledError:
            task.uncancel()
            print("\nbench: interrupted; stopping what it started", file=sys.stderr)
            return 130
        finally:
            await b.cleanup()
    if args.json:
        sections = {key: [row.to_json() for row in rows] for key, rows in b.sections.items()}
        text = json.dumps({"sections": sections, "notes": b.notes}, indent=2)
        await asyncio.to_thread(Path(args.json).write_text, text)
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds of each wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="measurements per sync kind")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    sys.exit(asyncio.run(main(parser.parse_args())))
