"""Soak synclock under mixed faults and print what was injected and what was seen.

    python scripts/soak.py [--duration 600] [--seed 1] [--json PATH]

Three ``synclock serve`` replicas share a Redis and a Postgres that this script
starts on free loopback ports. For the whole duration it fires bursts of triggers
and forced releases, and injects faults: it kills (SIGKILL) and restarts
replicas, pauses them (SIGSTOP) past their lease, restarts Redis (no
persistence), and stops Postgres for a moment. At the end it lets every run
settle and checks the promises:

- at most one run was ``running`` at any time;
- every run got its own fence, and Postgres's accepted fence is the newest;
- no price row carries a fence newer than the runs;
- no run was left ``running``: lost records = 0;
- no answer was a 500.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.replicas import GatedUpstream, Replica, priced
from tests.servers import ThrowawayPostgres, ThrowawayRedis

TOKEN = "soak-admin-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TRIGGER = "/admin/pricing/scheduler/trigger"
SCHEMA = "soak"
TTL_S = 1.0
FAULTS = {"burst": 6, "release": 1, "kill": 1, "pause": 1, "redis": 1, "postgres": 1}


class Soak:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.rng = random.Random(args.seed)
        self.folder = folder
        self.redis = ThrowawayRedis()
        self.pg = ThrowawayPostgres()
        self.upstream = GatedUpstream()
        self.replicas: list[Replica] = []
        self.injected: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()
        self.max_running = 0
        self.stale_price_rows = -1
        self.fence_accepted = -1

    def env(self) -> dict[str, str]:
        return {
            "SYNCLOCK_REDIS_URL": self.redis.url,
            "SYNCLOCK_DATABASE_URL": self.pg.url,
            "SYNCLOCK_DATABASE_SCHEMA": SCHEMA,
            "SYNCLOCK_ADMIN_TOKENS": TOKEN,
            "SYNCLOCK_LOCK_TTL": f"{TTL_S}s",
            "SYNCLOCK_SYNC_INTERVAL": "5s",
            "SYNCLOCK_REDIS_TIMEOUT": "300ms",
            "SYNCLOCK_DATABASE_TIMEOUT": "1s",
            "SYNCLOCK_SOURCE_RETRIES": "0",
            "SYNCLOCK_SHUTDOWN_TIMEOUT": "2s",
            "SYNCLOCK_LOG_LEVEL": "warning",
            "SYNCLOCK_SOURCES": f"genai-prices,soak={self.upstream.url}",
        }

    def start(self) -> None:
        self.redis.start()
        self.pg.start()
        for name in ("r1", "r2", "r3"):
            self.replicas.append(Replica(name, self.env(), self.folder).start())
        for replica in self.replicas:
            replica.wait_ready(60)

    def stop(self) -> None:
        for replica in self.replicas:
            replica.stop(signal.SIGTERM, timeout_s=15)
        self.upstream.close()
        self.redis.stop()
        self.pg.remove()

    async def burst(self, http: aiohttp.ClientSession) -> None:
        # A slow upstream keeps runs in flight, so the faults land mid-run.
        self.upstream.delay_s = self.rng.uniform(0.0, 1.5)
        self.upstream.payload = priced(f"0.00000{self.rng.randint(1, 9)}", "a/1", "b/2", "c/3")
        calls = [self.rng.choice(self.replicas).url + TRIGGER for _ in range(50)]
        for answer in await asyncio.gather(*(self._post(http, u) for u in calls)):
            self.answers[answer] += 1

    async def _post(self, http: aiohttp.ClientSession, url: str) -> str:
        try:
            async with http.post(url, headers=AUTH) as response:
                return str(response.status)
        except aiohttp.ClientConnectionError:
            return "refused (replica down)"

    async def release(self, http: aiohttp.ClientSession) -> None:
        url = self.rng.choice(self.replicas).url + "/admin/pricing/sync/lock"
        try:
            async with http.delete(url, headers=AUTH, json={"reason": "soak"}) as response:
                self.answers[f"release {response.status}"] += 1
        except aiohttp.ClientConnectionError:
            self.answers["release refused (replica down)"] += 1

    async def kill(self) -> None:
        victim = self.rng.choice(self.replicas)
        victim.stop(signal.SIGKILL)
        await asyncio.sleep(0.3)
        victim.start()
        await asyncio.to_thread(victim.wait_ready, 60)

    async def pause(self) -> None:
        victim = self.rng.choice(self.replicas)
        victim.send(signal.SIGSTOP)
        await asyncio.sleep(TTL_S + 0.5)
        victim.send(signal.SIGCONT)

    async def restart_redis(self) -> None:
        self.redis.stop(signal.SIGKILL)
        await asyncio.sleep(0.3)
        self.redis.start()

    async def restart_postgres(self) -> None:
        self.pg.stop()
        await asyncio.sleep(1.0)
        self.pg.start()

    async def running_now(self) -> int:
        try:
            conn = await asyncpg.connect(self.pg.url, timeout=2)
        except (OSError, asyncpg.PostgresError):
            return 0  # Postgres is the fault right now
        try:
            return int(
                await conn.fetchval(
                    f"SELECT count(*) FROM {SCHEMA}.sync_runs WHERE status = 'running'"
                )
            )
        finally:
            await conn.close()

    async def run(self, duration_s: float) -> None:
        actions = {
            "burst": self.burst,
            "release": self.release,
            "kill": lambda _: self.kill(),
            "pause": lambda _: self.pause(),
            "redis": lambda _: self.restart_redis(),
            "postgres": lambda _: self.restart_postgres(),
        }
        deadline = time.monotonic() + duration_s
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while time.monotonic() < deadline:
                name = self.rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
                self.injected[name] += 1
                if name not in ("burst", "release"):
                    await self.burst(http)  # a run in flight for the fault to hit
                    fault = asyncio.create_task(actions[name](http))
                    await asyncio.sleep(0.1)
                    await self.burst(http)  # callers during the fault
                    await fault
                else:
                    await actions[name](http)
                self.max_running = max(self.max_running, await self.running_now())
                await asyncio.sleep(0.2)

    async def settle(self, timeout_s: float = 30) -> list[Any]:
        """Wait until no run is running (the reaper closes those of the dead)."""
        deadline = time.monotonic() + timeout_s
        conn = await asyncpg.connect(self.pg.url)
        try:
            while True:
                runs = await conn.fetch(
                    f"SELECT status, fence, started_at FROM {SCHEMA}.sync_runs ORDER BY started_at"
                )
                if not any(r["status"] == "running" for r in runs) or time.monotonic() > deadline:
                    self.fence_accepted = int(
                        await conn.fetchval(f"SELECT max(fence) FROM {SCHEMA}.lock_fences")
                    )
                    self.stale_price_rows = int(
                        await conn.fetchval(
                            f"SELECT count(*) FROM {SCHEMA}.model_prices"
                            f" WHERE fence > (SELECT max(fence) FROM {SCHEMA}.sync_runs)"
                        )
                    )
                    return list(runs)
                await asyncio.sleep(0.5)
        finally:
            await conn.close()


def report(soak: Soak, runs: list[Any], duration_s: float) -> dict[str, Any]:
    fences = [r["fence"] for r in runs]
    outcomes = Counter(r["status"] for r in runs)
    figures = {
        "duration_s": round(duration_s, 1),
        "injected": dict(soak.injected),
        "answers": dict(sorted(soak.answers.items())),
        "runs": dict(outcomes),
        "max_running_at_once": soak.max_running,
        # Each run got its own fence, and Postgres's accepted fence is the newest.
        "fences_unique": len(set(fences)) == len(fences),
        "accepted_fence_is_newest": soak.fence_accepted == max(fences, default=-1),
        "price_rows_with_unknown_fence": soak.stale_price_rows,
        "lost_records": outcomes.get("running", 0),
        "http_500": soak.answers.get("500", 0),
    }
    print(f"synclock soak: {figures['duration_s']} s, 3 replicas, lease {TTL_S:g} s")
    print(f"{'injected':<28}{'times':>8}")
    for name, times in sorted(soak.injected.items()):
        print(f"{name:<28}{times:>8}")
    print(f"\n{'answer':<28}{'count':>8}")
    for name, count in figures["answers"].items():
        print(f"{name:<28}{count:>8}")
    print(f"\n{'run outcome':<28}{'runs':>8}")
    for name, count in sorted(outcomes.items()):
        print(f"{name:<28}{count:>8}")
    print()
    for key in (
        "max_running_at_once",
        "fences_unique",
        "accepted_fence_is_newest",
        "price_rows_with_unknown_fence",
        "lost_records",
        "http_500",
    ):
        print(f"{key:<32}{figures[key]}")
    return figures


def verdict(figures: dict[str, Any]) -> bool:
    return (
        figures["max_running_at_once"] <= 1
        and figures["fences_unique"]
        and figures["accepted_fence_is_newest"]
        and figures["price_rows_with_unknown_fence"] == 0
        and figures["lost_records"] == 0
        and figures["http_500"] == 0
    )


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="synclock-soak-") as folder:
        runner = Soak(args, Path(folder))
        began = time.monotonic()
        try:
            runner.start()
            await runner.run(args.duration)
            runs = await runner.settle()
        finally:
            runner.stop()
        return report(runner, runs, time.monotonic() - began)


def main(args: argparse.Namespace) -> int:
    figures = asyncio.run(soak(args))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    ok = verdict(figures)
    print("\nverdict:", "all promises held" if ok else "A PROMISE WAS BROKEN")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the figures here")
    sys.exit(main(parser.parse_args()))
