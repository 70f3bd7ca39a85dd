"""The compose process graph, run natively (no container engine here).

The same commands and environment as docker-compose.yml, with hosts rewritten to
loopback Redis and Postgres servers started for the test: migrate once, two
replicas, one sync, a 429 from the other replica, a failing health check once
Redis is gone, and a clean exit on SIGTERM within compose's stop_grace_period.

Without redis-server, redis-cli or pgserver this test skips, unless
SYNCLOCK_REQUIRE_BACKENDS=1 turns the skip into a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from service.config import parse_duration_s
from tests import deployfiles as df
from tests import native_compose as nc
from tests.deploy_helpers import (
    REPLICAS,
    compose_values,
    final_stage,
    need,
    need_binary,
    replica_environment,
)
from tests.replicas import GatedUpstream, priced
from tests.servers import ThrowawayPostgres


def test_compose_process_graph_runs_natively(tmp_path: Path) -> None:
    need("pgserver", "pgserver")
    redis_server = need_binary("redis-server")
    need_binary("redis-cli")
    upstream = GatedUpstream()
    upstream.default = "gate"  # the sync holds its lease until the test opens the gate
    upstream.payload = priced("0.000002", "acme/model-a", "acme/model-b")
    values = compose_values(SYNCLOCK_SOURCES=f"genai-prices,gate={upstream.url}")
    services = df.load_compose(values)["services"]
    stage = final_stage()
    order = [n for n in df.start_order(services) if n in ("redis", "postgres", "migrate")]
    assert order.index("postgres") < order.index("migrate")

    redis: subprocess.Popen[bytes] | None = None
    postgres: ThrowawayPostgres | None = None
    replicas: list[nc.ComposeReplica] = []
    try:
        redis, redis_port = nc.start_redis(services["redis"], redis_server, tmp_path / "redis")
        postgres = nc.start_postgres(services["postgres"])
        nc.wait_redis_healthy(services["redis"], redis_port)
        endpoints = {"redis": redis_port, "postgres": postgres.port}

        def process_env(name: str) -> dict[str, str]:
            env = nc.rewrite_hosts(replica_environment(name, values), endpoints)
            env["SYNCLOCK_DATA_DIR"] = str(nc.data_dir(name, services[name], tmp_path))
            for key, value in env.items():
                host = urlsplit(value).hostname if "://" in value else None
                assert host in (None, "127.0.0.1"), f"{name}: {key} still points at {host}"
            return env

        # The one-shot migrate, before any replica.
        entrypoint, default_cmd = stage.exec_form("ENTRYPOINT"), stage.exec_form("CMD")
        migrated = subprocess.run(
            nc.native_argv(entrypoint + services["migrate"]["command"]),
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("SYNCLOCK_")},
                **process_env("migrate"),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert migrated.stdout.startswith("applied: "), migrated.stdout

        for name in REPLICAS:
            argv = nc.native_argv(entrypoint + services[name].get("command", default_cmd))
            replicas.append(nc.ComposeReplica(name, argv, process_env(name), tmp_path).start())
        for replica in replicas:
            replica.wait_ready(timeout_s=30)
            test = services[replica.name]["healthcheck"]["test"]
            assert nc.run_healthcheck(test, replica.port) == 0, replica.output()

        # One trigger is granted; the other replica answers 429 naming the holder.
        token = values["SYNCLOCK_ADMIN_TOKENS"].split(",")[0]
        first, second = replicas
        started = nc.grant(first, upstream, token)
        status, headers, body = nc.request("POST", second.url + nc.TRIGGER, token)
        assert status == 429, body
        assert int(headers["Retry-After"]) >= 1
        assert body["holder"]["owner"] == first.name
        assert body["running_run_id"] == started["run_id"]

        upstream.gate.set()
        deadline = time.monotonic() + 30
        run_url = f"{second.url}/admin/pricing/sync/runs/{started['run_id']}"
        while (run := nc.request("GET", run_url, token)[2])["status"] == "running":
            assert time.monotonic() < deadline, run
            time.sleep(0.1)
        assert run["status"] == "succeeded", run
        assert run["fence"] == started["fence"]
        assert {s["source"] for s in run["sources"]} == {"genai-prices", "gate"}

        # With Redis gone the image's health check fails, as it should.
        redis.kill()
        redis.wait(timeout=10)
        test = services[first.name]["healthcheck"]["test"]
        assert nc.run_healthcheck(test, first.port) != 0

        # SIGTERM: each replica exits 0 within compose's stop_grace_period.
        for replica in replicas:
            period = services[replica.name]["stop_grace_period"]
            grace_s = parse_duration_s("stop_grace_period", period, low_s=0, high_s=600)
            replica.send(signal.SIGTERM)
            assert replica.wait_exit(timeout_s=grace_s) == 0, replica.output()
    finally:
        for replica in replicas:
            replica.stop(signal.SIGKILL, timeout_s=10)
        if redis is not None and redis.poll() is None:
            redis.kill()
            redis.wait(timeout=10)
        if postgres is not None:
            postgres.remove()
        upstream.close()
