"""A Redis lease lock with fencing tokens.

A lease is a key ``lock:{name}`` holding a random token, set with ``NX PX ttl`` so it
always expires. Each grant also increments ``fence:{name}`` and returns the new value:
the fencing token. All of a lock's keys share the ``{name}`` hash tag so every script
touches a single Redis Cluster slot.

How a lease is lost, and why that is survivable:

* The holder stops renewing (paused process, partition, slow event loop) and the key
  expires; another caller is granted the lock with a higher fence. The old holder does
  not know yet. Only the fence protects the data: the store refuses writes whose fence
  is below the highest one it has accepted.
* Redis loses its data (restart without persistence, failover). The fence counter is
  gone too, so callers pass ``fence_floor``, the highest fence the store has seen, and
  a grant never returns a token at or below it.
* An operator force-releases the lock. The holder's next renewal fails and it stops.

Tokens are compared only inside Lua, so results are identical whether the client
decodes responses or returns raw bytes. TTLs are validated before any Redis call:
a TTL of zero or below would delete the key, a huge one would make it immortal.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from service import metrics
from service.errors import BackendUnavailable, LeaseLost, SynclockError

ACQUIRE_LUA = """
local ttl_ms = tonumber(ARGV[2])
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ttl_ms) then
  local fence = redis.call('INCR', KEYS[2])
  local floor = tonumber(ARGV[3])
  if fence <= floor then
    fence = floor + 1
    redis.call('SET', KEYS[2], fence)
  end
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'owner', ARGV[4], 'run_id', ARGV[5], 'fence', fence)
  redis.call('PEXPIRE', KEYS[3], ttl_ms)
  return {1, fence, redis.call('PTTL', KEYS[1])}
end
local h = redis.call('HMGET', KEYS[3], 'owner', 'run_id', 'fence')
return {0, h[1] or '', h[2] or '', h[3] or '0', redis.call('PTTL', KEYS[1])}
"""

RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""

# Sets the remaining time to exactly ttl_ms: an extend never adds to what is left.
EXTEND_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return redis.call('PTTL', KEYS[1])
end
return -2
"""

STATUS_LUA = """
local pttl = redis.call('PTTL', KEYS[1])
local fence = redis.call('GET', KEYS[3]) or '0'
if pttl == -2 then
  return {0, '', '', '0', 0, fence}
end
local h = redis.call('HMGET', KEYS[2], 'owner', 'run_id', 'fence')
return {1, h[1] or '', h[2] or '', h[3] or '0', pttl, fence}
"""

FORCE_RELEASE_LUA = """
local h = redis.call('HMGET', KEYS[2], 'owner', 'run_id', 'fence')
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
return {existed, h[1] or '', h[2] or '', h[3] or '0'}
"""


class InvalidTTL(SynclockError, ValueError):
    """A lease TTL that is not a whole number of milliseconds within the bounds."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted lease. ``remaining_ms`` is what Redis reported after the SET."""

    name: str
    token: str
    fence: int
    ttl_ms: int
    remaining_ms: int
    # Monotonic time before the request was sent plus remaining_ms: never later
    # than the real expiry, so a process may trust it to answer without Redis.
    expires_monotonic: float


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lock right now, as read from Redis."""

    owner: str
    run_id: str
    fence: int
    remaining_ms: int


@dataclass(frozen=True, slots=True)
class LockState:
    held: bool
    holder: Holder | None
    last_fence: int


class _Script:
    """One Lua script: EVALSHA, reloaded transparently after SCRIPT FLUSH or restart."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(
        self, client: aioredis.Redis, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            metrics.REDIS_SCRIPT_RELOADS.inc()
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


_ACQUIRE = _Script(ACQUIRE_LUA)
_RELEASE = _Script(RELEASE_LUA)
_EXTEND = _Script(EXTEND_LUA)
_STATUS = _Script(STATUS_LUA)
_FORCE_RELEASE = _Script(FORCE_RELEASE_LUA)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def hash_tag(name: str) -> str:
    """The cluster hash tag for a lock name; braces are escaped so the tag is exact."""
    escaped = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return "{" + escaped + "}"


def check_ttl_ms(ttl_ms: object, max_ttl_ms: int) -> int:
    """Accept only an int in 1..max_ttl_ms; anything else raises before Redis is used."""
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int):
        raise InvalidTTL(f"lease TTL ({ttl_ms!r}) must be a whole number of ms")
    if ttl_ms <= 0:
        raise InvalidTTL(f"lease TTL ({ttl_ms} ms) must be positive")
    if ttl_ms > max_ttl_ms:
        raise InvalidTTL(f"lease TTL ({ttl_ms} ms) cannot exceed {max_ttl_ms} ms")
    return ttl_ms


class LeaseLock:
    """Leases on named locks in one Redis, under a key prefix."""

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = "synclock:", max_ttl_ms: int
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"key prefix ({prefix!r}) cannot contain braces")
        self.client = client
        self.prefix = prefix
        self.max_ttl_ms = max_ttl_ms
        self._cleanups: set[asyncio.Task[None]] = set()

    def keys(self, name: str) -> tuple[str, str, str]:
        """(lock key, fence key, holder key) for ``name``, all in one hash slot."""
        tag = hash_tag(name)
        p = self.prefix
        return f"{p}lock:{tag}", f"{p}fence:{tag}", f"{p}holder:{tag}"

    async def try_acquire(
        self,
        name: str,
        ttl_ms: int,
        *,
        owner: str,
        run_id: str = "",
        fence_floor: int = 0,
    ) -> Lease | Holder:
        """One round trip: a Lease if granted, else the current Holder."""
        check_ttl_ms(ttl_ms, self.max_ttl_ms)
        lock_key, fence_key, holder_key = self.keys(name)
        token = secrets.token_hex(16)
        sent = time.monotonic()
        try:
            reply = await _ACQUIRE(
                self.client,
                (lock_key, fence_key, holder_key),
                (token, ttl_ms, fence_floor, owner, run_id),
            )
        except (RedisError, OSError) as exc:
            metrics.LOCK_ACQUISITIONS.labels(outcome="error").inc()
            self._forget_later(name, token, ttl_ms)
            raise _unavailable(exc) from exc
        except asyncio.CancelledError:
            self._forget_later(name, token, ttl_ms)
            raise

        if int(reply[0]) == 1:
            metrics.LOCK_ACQUISITIONS.labels(outcome="acquired").inc()
            remaining_ms = int(reply[2])
            return Lease(
                name=name,
                token=token,
                fence=int(reply[1]),
                ttl_ms=ttl_ms,
                remaining_ms=remaining_ms,
                expires_monotonic=sent + remaining_ms / 1000,
            )
        metrics.LOCK_ACQUISITIONS.labels(outcome="contended").inc()
        return Holder(
            owner=_text(reply[1]),
            run_id=_text(reply[2]),
            fence=int(reply[3]),
            remaining_ms=int(reply[4]),
        )

    async def release(self, lease: Lease) -> bool:
        """Delete the lease if it still carries our token. False if it was gone."""
        lock_key, _, holder_key = self.keys(lease.name)
        try:
            reply = await _RELEASE(self.client, (lock_key, holder_key), (lease.token,))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return int(reply) == 1

    async def extend(self, lease: Lease, ttl_ms: int) -> Lease:
        """Set the remaining time to ``ttl_ms``; raises LeaseLost if not ours."""
        check_ttl_ms(ttl_ms, self.max_ttl_ms)
        lock_key, _, holder_key = self.keys(lease.name)
        sent = time.monotonic()
        try:
            reply = await _EXTEND(self.client, (lock_key, holder_key), (lease.token, ttl_ms))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        remaining_ms = int(reply)
        if remaining_ms < 0:
            raise LeaseLost(lease.name, lease.fence)
        return Lease(
            name=lease.name,
            token=lease.token,
            fence=lease.fence,
            ttl_ms=ttl_ms,
            remaining_ms=remaining_ms,
            expires_monotonic=sent + remaining_ms / 1000,
        )

    async def state(self, name: str) -> LockState:
        """The lock as Redis sees it now; nothing is cached."""
        lock_key, fence_key, holder_key = self.keys(name)
        try:
            reply = await _STATUS(self.client, (lock_key, holder_key, fence_key), ())
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        last_fence = int(_text(reply[5]) or 0)
        if int(reply[0]) == 0:
            return LockState(held=False, holder=None, last_fence=last_fence)
        holder = Holder(
            owner=_text(reply[1]),
            run_id=_text(reply[2]),
            fence=int(reply[3]),
            remaining_ms=int(reply[4]),
        )
        return LockState(held=True, holder=holder, last_fence=last_fence)

    async def force_release(self, name: str) -> Holder | None:
        """Delete the lease whoever holds it; returns who held it, if anyone."""
        lock_key, _, holder_key = self.keys(name)
        try:
            reply = await _FORCE_RELEASE(self.client, (lock_key, holder_key), ())
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        if int(reply[0]) == 0:
            return None
        return Holder(
            owner=_text(reply[1]),
            run_id=_text(reply[2]),
            fence=int(reply[3]),
            remaining_ms=0,
        )

    def release_later(self, lease: Lease) -> None:
        """Keep trying to release ``lease`` in the background (Redis is away now)."""
        self._forget_later(lease.name, lease.token, lease.ttl_ms)

    def _forget_later(self, name: str, token: str, ttl_ms: int) -> None:
        """An acquire whose reply never came may still be granted: a stalled Redis
        runs the queued script when it resumes, possibly after a first release.
        Keep releasing our token (only ever ours) in the background until the
        lease would have expired anyway. The caller is not kept waiting."""
        task = asyncio.create_task(self._forget(name, token, ttl_ms))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _forget(self, name: str, token: str, ttl_ms: int) -> None:
        lock_key, _, holder_key = self.keys(name)
        deadline = time.monotonic() + ttl_ms / 1000
        delay_s = 0.05
        while time.monotonic() < deadline:
            try:
                if await _RELEASE(self.client, (lock_key, holder_key), (token,)):
                    return
            except (RedisError, OSError):
                pass  # Redis still away; try again
            await asyncio.sleep(min(delay_s, max(0.0, deadline - time.monotonic())))
            delay_s = min(delay_s * 2, 2.0)

    async def aclose(self) -> None:
        """Stop background releases (their leases end at their TTL anyway)."""
        for task in list(self._cleanups):
            task.cancel()
        await asyncio.gather(*self._cleanups, return_exceptions=True)


def _unavailable(exc: BaseException) -> BackendUnavailable:
    metrics.BACKEND_ERRORS.labels(backend="redis").inc()
    return BackendUnavailable("redis", f"{type(exc).__name__}: {exc}")
