"""The compose services as native processes, for a machine without a container engine.

Each service runs the command compose would give its container, with the
environment compose would give it. Only what a container makes different is
changed: service hosts in URLs become the loopback port of the stand-in server,
``--host 0.0.0.0`` becomes 127.0.0.1, container port 8080 becomes a free port, and
a named volume becomes a folder. Every process is stopped by PID by its caller.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests import deployfiles as df
from tests.replicas import GatedUpstream, Replica
from tests.servers import ThrowawayPostgres, free_port

TRIGGER = "/admin/pricing/scheduler/trigger"
CONTAINER_PORT = "8080"


def rewrite_hosts(env: dict[str, str], endpoints: dict[str, int]) -> dict[str, str]:
    """Point ``@service:port`` in URLs at the loopback server standing in for it."""
    rewritten = {}
    for key, value in env.items():
        for service, port in endpoints.items():
            split = urlsplit(value)
            if split.hostname == service:
                value = value.replace(f"@{service}:{split.port}", f"@127.0.0.1:{port}", 1)
        rewritten[key] = value
    return rewritten


def data_dir(name: str, service: dict[str, Any], root: Path) -> Path:
    """The folder standing in for the service's first named volume (or its own)."""
    volumes = [v.split(":")[0] for v in service.get("volumes", [])]
    return root / (volumes[0] if volumes else f"{name}-anonymous")


def native_argv(argv: list[str]) -> list[str]:
    """The image's ``synclock`` is the venv's; ``--host 0.0.0.0`` becomes loopback."""
    program = Path(sys.executable).with_name("synclock")
    assert argv[0] == "synclock" and program.exists(), program
    return [str(program), *("127.0.0.1" if arg == "0.0.0.0" else arg for arg in argv[1:])]


class ComposeReplica(Replica):
    """A replica started with the image's command line instead of ``python -m``."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        assert env["SYNCLOCK_INSTANCE"] == name  # Replica sets it to the name as well
        super().__init__(name, env, log_dir)
        self.argv = [str(self.port) if arg == CONTAINER_PORT else arg for arg in argv]

    def start(self) -> ComposeReplica:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=sink, stderr=sink)
        return self


def start_redis(
    service: dict[str, Any], binary: str, folder: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """The compose command itself; later arguments win, so port and bind are ours."""
    command = service["command"]
    assert command[0] == "redis-server", command
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, port


def wait_redis_healthy(service: dict[str, Any], port: int, timeout_s: float = 10) -> None:
    """The compose health check (REDISCLI_AUTH from its environment), on our port."""
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and "redis-cli" in test[1], test
    shell = test[1].replace("redis-cli", f"redis-cli -p {port}", 1)
    env = {**os.environ, **df.environment(service)}
    deadline = time.monotonic() + timeout_s
    while subprocess.run(["sh", "-c", shell], env=env, timeout=10).returncode != 0:
        assert time.monotonic() < deadline, "redis never passed its health check"
        time.sleep(0.1)


def start_postgres(service: dict[str, Any]) -> ThrowawayPostgres:
    """A throwaway server set up the way the postgres image's entrypoint does it
    from POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB; then its health check."""
    env = df.environment(service)
    user, password, database = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
    postgres = ThrowawayPostgres()
    try:
        postgres.start()
        psql = [str(postgres.bin / "psql"), "-h", "127.0.0.1", "-p", str(postgres.port)]
        for sql in (
            f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{password}'",
            f"CREATE DATABASE {database} OWNER {user}",
        ):
            subprocess.run(
                [*psql, "-U", "postgres", "-d", "postgres", "-c", sql],
                check=True,
                capture_output=True,
                timeout=30,
            )
        test = service["healthcheck"]["test"]
        assert test[:2] == ["CMD", "pg_isready"], test
        ready = [str(postgres.bin / "pg_isready"), *test[2:], "-p", str(postgres.port)]
        assert subprocess.run(ready, capture_output=True, timeout=15).returncode == 0
    except BaseException:
        postgres.remove()
        raise
    return postgres


def run_healthcheck(test: list[str], port: int) -> int:
    """A replica's compose/image health check, with its port rewritten."""
    assert test[:2] == ["CMD", "python"], test
    argv = [sys.executable, *(a.replace(f":{CONTAINER_PORT}/", f":{port}/") for a in test[2:])]
    return subprocess.run(argv, capture_output=True, timeout=15).returncode


def request(
    method: str, url: str, token: str | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    call = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(call, timeout=10) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def grant(first: Replica, upstream: GatedUpstream, token: str) -> dict[str, Any]:
    """Trigger on ``first`` until it is granted. A replica's scheduler fires 2 s after
    start; if it won the lease, its run is let through and the trigger repeated."""
    for _ in range(3):
        status, _, body = request("POST", first.url + TRIGGER, token)
        if status == 202:
            return body
        assert status == 429, body
        upstream.gate.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            _, _, state = request("GET", first.url + "/admin/pricing/scheduler/status", token)
            if not state["lock"]["held"]:
                break
            time.sleep(0.1)
        upstream.gate.clear()
    raise AssertionError("no trigger was granted in 3 attempts")
