"""The lease lock's contract, on fakeredis and on a real Redis, decoded and raw.

Numbers in the test names refer to ../shared/cases/lock-cases.md.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from service import metrics
from service.errors import BackendUnavailable, LeaseLost
from service.lock import Holder, InvalidTTL, Lease, LeaseLock, check_ttl_ms


async def grant(lock: LeaseLock, name: str = "sync", ttl_ms: int = 5_000, **kw: Any) -> Lease:
    got = await lock.try_acquire(name, ttl_ms, owner=kw.pop("owner", "a"), **kw)
    assert isinstance(got, Lease), got
    return got


async def test_acquire_returns_fence_and_remaining_from_redis(lock: LeaseLock) -> None:
    lease = await grant(lock, ttl_ms=5_000, run_id="r1")

    assert lease.fence == 1
    assert 4_900 <= lease.remaining_ms <= 5_000
    lock_key, fence_key, _ = lock.keys("sync")
    assert 4_800 <= await lock.client.pttl(lock_key) <= 5_000
    assert int(await lock.client.get(fence_key)) == 1


async def test_second_acquire_is_refused_with_holder(lock: LeaseLock) -> None:
    first = await grant(lock, owner="replica-a", run_id="run-1")

    refused = await lock.try_acquire("sync", 5_000, owner="replica-b", run_id="run-2")

    assert isinstance(refused, Holder)
    assert refused.owner == "replica-a"
    assert refused.run_id == "run-1"
    assert refused.fence == first.fence
    assert 0 < refused.remaining_ms <= 5_000


async def test_fences_rise_across_grants(lock: LeaseLock) -> None:
    fences = []
    for _ in range(5):
        lease = await grant(lock)
        fences.append(lease.fence)
        assert await lock.release(lease)
    assert fences == [1, 2, 3, 4, 5]


async def test_fence_floor_is_never_undercut(lock: LeaseLock) -> None:
    lease = await grant(lock, fence_floor=41)
    assert lease.fence == 42
    await lock.release(lease)
    assert (await grant(lock, fence_floor=10)).fence == 43


async def test_case1_stale_release_is_refused_new_holder_keeps_ttl(lock: LeaseLock) -> None:
    old = await grant(lock, ttl_ms=100, owner="a")
    await asyncio.sleep(0.2)
    new = await grant(lock, ttl_ms=5_000, owner="b")

    assert await lock.release(old) is False

    state = await lock.state("sync")
    assert state.holder is not None
    assert state.holder.owner == "b"
    assert state.holder.fence == new.fence
    assert state.holder.remaining_ms > 4_000


async def test_release_by_owner_only(lock: LeaseLock) -> None:
    lease = await grant(lock)
    impostor = Lease("sync", "0" * 32, lease.fence, 5_000, 5_000, time.monotonic() + 5)

    assert await lock.release(impostor) is False
    assert (await lock.state("sync")).held
    assert await lock.release(lease) is True
    assert not (await lock.state("sync")).held


@pytest.mark.parametrize("taken_over", [False, True])
async def test_case2_extend_after_lapse_is_refused(lock: LeaseLock, taken_over: bool) -> None:
    old = await grant(lock, ttl_ms=100, owner="a")
    await asyncio.sleep(0.2)
    if taken_over:
        new = await grant(lock, ttl_ms=3_000, owner="b")

    with pytest.raises(LeaseLost):
        await lock.extend(old, 5_000)

    lock_key = lock.keys("sync")[0]
    if taken_over:
        state = await lock.state("sync")
        assert state.holder is not None and state.holder.fence == new.fence
        assert await lock.client.pttl(lock_key) <= 3_000
    else:
        assert await lock.client.exists(lock_key) == 0  # never re-created


class _Untouchable:
    """A client that fails the test if any command reaches it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis was called ({name}) for an invalid TTL")


@pytest.mark.parametrize("ttl", [0, -5, "0", 0.4, None, "10s", 1e30, 2**63, 600_001, True])
async def test_cases_3_4_bad_ttls_refused_before_redis(ttl: Any) -> None:
    lock = LeaseLock(_Untouchable(), prefix="t:", max_ttl_ms=600_000)  # type: ignore[arg-type]
    lease = Lease("sync", "f" * 32, 1, 1_000, 1_000, time.monotonic() + 1)

    with pytest.raises(InvalidTTL):
        await lock.try_acquire("sync", ttl, owner="a")
    with pytest.raises(InvalidTTL):
        await lock.extend(lease, ttl)


async def test_case3_bad_extend_leaves_ttl_and_holder(lock: LeaseLock) -> None:
    lease = await grant(lock, ttl_ms=5_000)
    for ttl in (0, -5, "0", 0.4):
        with pytest.raises(InvalidTTL):
            await lock.extend(lease, ttl)  # type: ignore[arg-type]
    state = await lock.state("sync")
    assert state.holder is not None and state.holder.fence == lease.fence
    assert state.holder.remaining_ms > 4_000


def test_invalid_ttl_messages_name_the_value() -> None:
    with pytest.raises(InvalidTTL, match=r"\(700000 ms\) cannot exceed 600000 ms"):
        check_ttl_ms(700_000, 600_000)


async def test_case5_extend_sets_never_adds(lock: LeaseLock) -> None:
    lease = await grant(lock, ttl_ms=1_000)
    lock_key = lock.keys("sync")[0]
    highest = 0
    for _ in range(100):
        lease = await lock.extend(lease, 1_000)
        highest = max(highest, await lock.client.pttl(lock_key))
    assert highest <= 1_000
    assert lease.remaining_ms <= 1_000


async def test_case7_state_reads_redis_after_lapse(lock: LeaseLock) -> None:
    await grant(lock, ttl_ms=100)
    assert (await lock.state("sync")).held
    await asyncio.sleep(0.2)
    state = await lock.state("sync")
    assert state.held is False
    assert state.holder is None
    assert state.last_fence == 1


async def test_case14_remaining_is_from_the_successful_set(lock: LeaseLock) -> None:
    await grant(lock, ttl_ms=300, owner="a")
    started = time.monotonic()
    while True:  # a caller that waited a long time for the lock
        got = await lock.try_acquire("sync", 2_000, owner="b")
        if isinstance(got, Lease):
            break
        await asyncio.sleep(0.05)
    assert time.monotonic() - started >= 0.2
    assert got.remaining_ms > 1_900
    assert got.expires_monotonic > time.monotonic() + 1.8


async def test_case16_scripts_reload_after_flush(lock: LeaseLock) -> None:
    lease = await grant(lock, ttl_ms=5_000)
    before = metrics.REDIS_SCRIPT_RELOADS._value.get()

    await lock.client.script_flush()
    lease = await lock.extend(lease, 4_000)
    await lock.client.script_flush()
    released = await lock.release(lease)

    assert released is True
    assert lease.remaining_ms <= 4_000
    assert metrics.REDIS_SCRIPT_RELOADS._value.get() - before == 2


async def test_force_release_reports_the_holder(lock: LeaseLock) -> None:
    lease = await grant(lock, owner="replica-a", run_id="r-9")
    holder = await lock.force_release("sync")
    assert holder is not None
    assert (holder.owner, holder.run_id, holder.fence) == ("replica-a", "r-9", lease.fence)
    assert await lock.force_release("sync") is None
    with pytest.raises(LeaseLost):
        await lock.extend(lease, 5_000)


@pytest.mark.parametrize("name", ["plain", "a{b}c", "{x}", "}{", "ünï-cödé 🔒", "%7B"])
def test_case17_keys_share_one_slot(name: str) -> None:
    lock = LeaseLock(None, prefix="p:", max_ttl_ms=1_000)  # type: ignore[arg-type]
    slots = {key_slot(key.encode()) for key in lock.keys(name)}
    assert len(slots) == 1


def test_distinct_names_never_share_keys() -> None:
    lock = LeaseLock(None, prefix="p:", max_ttl_ms=1_000)  # type: ignore[arg-type]
    assert lock.keys("a{b}") != lock.keys("a%7Bb}")


@pytest.mark.parametrize("decode", [False, True])
async def test_case6_decoded_and_raw_clients_agree(decode: bool) -> None:
    client = fakeredis.FakeAsyncRedis(decode_responses=decode)
    lock = LeaseLock(client, prefix="d:", max_ttl_ms=10_000)
    lease = await grant(lock, owner="öwner", run_id="r-1")
    refused = await lock.try_acquire("sync", 1_000, owner="b")
    state = await lock.state("sync")

    assert isinstance(refused, Holder) and refused.owner == "öwner"
    assert state.holder is not None and state.holder.run_id == "r-1"
    assert state.last_fence == lease.fence
    assert await lock.release(lease) is True
    await client.aclose()


async def test_case6_real_redis_decoded_mode(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    lock = LeaseLock(client, prefix=prefix, max_ttl_ms=10_000)
    try:
        lease = await grant(lock, owner="b", run_id="r-2")
        state = await lock.state("sync")
        assert state.holder is not None and state.holder.owner == "b"
        assert await lock.release(lease) is True
    finally:
        await client.delete(*lock.keys("sync"))
        await client.aclose()


async def test_unreachable_redis_is_backend_unavailable_fast() -> None:
    from service.runtime import connect_redis

    client = connect_redis("redis://127.0.0.1:1/0", 0.5)
    lock = LeaseLock(client, prefix="x:", max_ttl_ms=10_000)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await lock.try_acquire("sync", 1_000, owner="a")
    assert time.monotonic() - started < 1.0
    await client.aclose()
