"""Redis Cluster and Sentinel, started here on free loopback ports.

A three-primary Cluster runs the lock scripts (hash tags keep each lock's keys in
one slot). A Sentinel pair fails over to a replica that lost the lock and the
fence counter; the fence still rises past every accepted one and the old holder's
writes are refused.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.errors import FencedOut
from service.lock import Holder, Lease, LeaseLock
from service.redis_urls import parse
from service.runtime import close_redis, connect_redis
from service.store import Store
from tests.servers import missing, redis_argv

# Several real server processes on a two-core machine: one rerun absorbs an OS
# scheduling stall. A rerun is printed ("R", "1 rerun"), and a second failure fails.
pytestmark = pytest.mark.flaky(reruns=1)

REDIS = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


@pytest.fixture(autouse=True)
def _binaries() -> None:
    if REDIS is None or REDIS_CLI is None:
        missing("redis-server and redis-cli are needed")


def port_pair() -> int:
    """A free port whose cluster-bus twin (port + 10000) is free too."""
    for _ in range(100):
        port = random.randint(20000, 30000)
        if all(_free(p) for p in (port, port + 10000)):
            return port
    raise RuntimeError("no free port pair")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cli(port: int, *args: str) -> str:
    done = subprocess.run(
        [str(REDIS_CLI), "-p", str(port), *args], capture_output=True, text=True, timeout=30
    )
    return done.stdout


def wait_for(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Processes:
    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="synclock-ha-"))
        self.running: dict[int, subprocess.Popen[bytes]] = {}

    def redis(self, port: int, *extra: str) -> None:
        self.running[port] = subprocess.Popen(
            [
                *redis_argv(str(REDIS), port),
                "--dir",
                str(self.folder),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: cli(port, "PING").strip() == "PONG", 10, f"redis on {port}")

    def sentinel(self, port: int, primary: int) -> None:
        config = self.folder / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\n"
            f"sentinel monitor main 127.0.0.1 {primary} 1\n"
            "sentinel down-after-milliseconds main 500\n"
            "sentinel failover-timeout main 5000\n"
        )
        self.running[port] = subprocess.Popen(
            [str(REDIS), str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: cli(port, "PING").strip() == "PONG", 10, f"sentinel on {port}")

    def kill(self, port: int) -> None:
        process = self.running.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def close(self) -> None:
        for port in list(self.running):
            self.kill(port)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def processes() -> Iterator[Processes]:
    made = Processes()
    yield made
    made.close()


@pytest.fixture
def cluster_url(processes: Processes) -> str:
    ports = [port_pair() for _ in range(3)]
    for port in ports:
        processes.redis(
            port, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"
        )
    cli(
        ports[0],
        "--cluster",
        "create",
        *(f"127.0.0.1:{p}" for p in ports),
        "--cluster-replicas",
        "0",
        "--cluster-yes",
    )
    # Every node must agree, or the first command may land on one that says CLUSTERDOWN.
    wait_for(
        lambda: all("cluster_state:ok" in cli(p, "CLUSTER", "INFO") for p in ports),
        20,
        "cluster ok on every node",
    )
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)


def test_ha_urls_parse() -> None:
    sentinel = parse("redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/main/2")
    cluster = parse("redis+cluster://h1:7000,h2:7001")
    assert (sentinel.kind, sentinel.service, sentinel.db, sentinel.password) == (
        "sentinel",
        "main",
        2,
        "pw",
    )
    assert cluster.nodes == (("h1", 7000), ("h2", 7001))
    for bad in (
        "redis+cluster://",
        "redis+sentinel://h:1",
        "redis+cluster://h:x",
        "redis+cluster://h:1:2",
        "redis+cluster://h:1 h:2",
        "redis+cluster://h:1/garbage",
        "redis+cluster://%00:1",
        "redis+sentinel://[::1/svc",
        "redis+sentinel://h:1/s/99999999999999999999999",
    ):
        with pytest.raises(ValueError):
            parse(bad)


async def test_lock_scripts_run_on_a_three_primary_cluster(cluster_url: str) -> None:
    client = connect_redis(cluster_url, 2.0)
    lock = LeaseLock(client, prefix="ha:", max_ttl_ms=60_000)
    alphabet = string.ascii_letters + "{}%/ :ü🔒"
    names = ["a{b}c", "{x}", "}{", "ünï-cödé 🔒"] + [
        "".join(random.choices(alphabet, k=random.randint(1, 24))) for _ in range(1000)
    ]
    try:
        for name in names:
            lease = await lock.try_acquire(name, 5_000, owner="t")
            assert isinstance(lease, Lease), name
            refused = await lock.try_acquire(name, 5_000, owner="u")
            assert isinstance(refused, Holder) and refused.owner == "t", name
            lease = await lock.extend(lease, 4_000)
            assert await lock.release(lease), name
        await client.script_flush()
        lease = await lock.try_acquire("after-flush", 5_000, owner="t")
        assert isinstance(lease, Lease) and await lock.release(lease)
    finally:
        await close_redis(client)


async def test_service_syncs_through_a_cluster(
    cluster_url: str, make_client: Any, auth: dict[str, str]
) -> None:
    client = await make_client(SYNCLOCK_REDIS_URL=cluster_url)
    first = await (
        await client.post("/admin/pricing/scheduler/trigger?wait=30", headers=auth)
    ).json()
    status = await client.get("/admin/pricing/scheduler/status", headers=auth)
    assert first["status"] == "succeeded"
    assert status.status == 200 and (await status.json())["lock"]["last_fence"] == first["fence"]


async def test_sentinel_failover_that_lost_the_fence_never_reuses_one(
    processes: Processes, store: Store
) -> None:
    primary, replica, s1, s2 = (port_pair() for _ in range(4))
    processes.redis(primary)
    processes.redis(replica, "--replicaof", "127.0.0.1", str(primary), "--replica-read-only", "no")
    processes.sentinel(s1, primary)
    processes.sentinel(s2, primary)
    url = f"redis+sentinel://127.0.0.1:{s1},127.0.0.1:{s2}/main/0"
    client = connect_redis(url, 1.0)
    lock = LeaseLock(client, prefix="ha:", max_ttl_ms=60_000)
    from service.records import NewRun, Trigger

    try:
        old = await lock.try_acquire("sync", 30_000, owner="old", run_id="r-old")
        assert isinstance(old, Lease)
        await store.begin_run(
            NewRun(
                "00000000-0000-4000-8000-00000000a001",
                "sync",
                Trigger.MANUAL,
                "t",
                old.fence,
                "old",
            )
        )
        wait_for(
            lambda: cli(replica, "GET", "ha:fence:{sync}").strip() == str(old.fence),
            10,
            "replication",
        )
        cli(replica, "FLUSHALL")  # the replica loses the lock and the counter
        processes.kill(primary)
        wait_for(
            lambda: f"{replica}" in cli(s1, "SENTINEL", "get-master-addr-by-name", "main"),
            20,
            "failover",
        )

        floor = await store.fence_floor("sync")
        new = None
        for _ in range(50):  # the client finds the new primary once Sentinel says so
            try:
                new = await lock.try_acquire("sync", 30_000, owner="new", fence_floor=floor)
                break
            except Exception:
                await asyncio.sleep(0.2)
        assert isinstance(new, Lease)
        assert new.fence > old.fence  # a fresh counter would have said 1
        await store.begin_run(
            NewRun(
                "00000000-0000-4000-8000-00000000a002",
                "sync",
                Trigger.MANUAL,
                "t",
                new.fence,
                "new",
            )
        )
        with pytest.raises(FencedOut):
            await store.apply_prices(
                lock_name="sync",
                fence_token=old.fence,
                run_id="00000000-0000-4000-8000-00000000a001",
                source="s",
                records=[],
            )
    finally:
        await close_redis(client)
