"""Everything the cluster asks of Redis: key names, the lease scripts, pub/sub.

Owns: every Redis key and channel the cluster uses, and the Lua that takes and renews a
room's lease in one step. Every call goes through `store.redis.redis_call` (bounded;
any failure is StoreUnavailable), except the subscription, whose errors end it (the
caller subscribes again).

`Transport` is what the rest of the cluster sees; `RedisTransport` is the real one and
`tests/fakehub.py` an in-memory one for unit tests that run without a redis-server.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Protocol

import orjson
from coredis.retry import NoRetryPolicy

from ..store.redis import PREFIX, redis_call

TIMEOUT = 2.0  # one call to Redis, at most
HANDOVER_TTL = 86400  # a room's saved handover state outlives its owner by this much
PEER_ROOM_TTL = 86400

# Who owns the room: take the lease when nobody has it, renew it when we do.
ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""
# A new room's first owner, chosen by the caller (--workers: rooms dealt out in turn
# among one machine's processes); an owned room keeps its owner (its lease untouched).
PLACE = """
local v = redis.call('GET', KEYS[1])
if v then return {v, 0} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {ARGV[1], 1}
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def lease_key(room_id: str) -> str:
    return f"{PREFIX}:lease:{{{room_id}}}"  # same hash slot as the room's record


def handover_key(room_id: str) -> str:
    return f"{PREFIX}:handover:{{{room_id}}}"


def channel_of(instance: str) -> str:
    return f"{PREFIX}:instance:{instance}"


def peer_room_key(peer_id: str) -> str:
    return f"{PREFIX}:peer-room:{peer_id}"


INSTANCES_KEY = f"{PREFIX}:instances"


def stats_key(instance: str) -> str:
    return f"{PREFIX}:stats:{instance}"


class Transport(Protocol):
    """The cluster's view of Redis. Every method but `subscribe` raises StoreUnavailable
    when it cannot do its job within TIMEOUT."""

    async def acquire(self, room_id: str, instance: str, lease_ms: int) -> str: ...
    async def place(self, room_id: str, instance: str, lease_ms: int) -> tuple[str, bool]: ...
    async def renew(self, room_ids: list[str], instance: str, lease_ms: int) -> list[str]: ...
    async def owner(self, room_id: str) -> str | None: ...
    async def owners(self, room_ids: list[str]) -> list[str | None]: ...
    async def release(self, room_id: str, instance: str) -> None: ...
    async def publish(self, instance: str, payload: bytes) -> int: ...
    def subscribe(self, instance: str) -> Any: ...  # async context manager: async iterator of payloads
    async def load_handover(self, room_id: str) -> bytes | None: ...
    async def save_handover(self, room_id: str, data: bytes | None) -> None: ...
    async def set_peer_room(self, peer_id: str, room_id: str) -> None: ...
    async def peer_room(self, peer_id: str) -> str | None: ...
    async def share_stats(self, instance: str, stats: dict[str, Any], every: float) -> list[dict[str, Any]]: ...
    async def leave(self, instance: str) -> None: ...


class RedisTransport:
    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._acquire = redis.register_script(ACQUIRE)
        self._place = redis.register_script(PLACE)
        self._release = redis.register_script(RELEASE)

    async def _call(self, what: str, fn: Any) -> Any:
        return await redis_call(fn, what, timeout=TIMEOUT)

    async def _pipelined(self, what: str, fill: Callable[[Any], None]) -> tuple[Any, ...]:
        """The commands `fill` queues on a pipeline, in one round trip (not a transaction:
        each command is atomic on its own, and keys may live on different Redis Cluster
        slots): their results, in order."""
        async def run() -> tuple[Any, ...]:
            async with self.redis.pipeline(transaction=False) as pipe:
                fill(pipe)
            return pipe.results or ()

        return await self._call(what, run)

    async def acquire(self, room_id: str, instance: str, lease_ms: int) -> str:
        """Who owns the room now, taking it for `instance` if nobody does."""
        owner = await self._call(f"room lease for {room_id}",
                                 lambda: self._acquire(keys=[lease_key(room_id)], args=[instance, lease_ms]))
        return _text(owner)

    async def renew(self, room_ids: list[str], instance: str, lease_ms: int) -> list[str]:
        """`acquire` for many rooms in one round trip: each room's owner now, in order."""
        def fill(pipe: Any) -> None:
            for room_id in room_ids:
                self._acquire(keys=[lease_key(room_id)], args=[instance, lease_ms], client=pipe)

        return [_text(o) for o in await self._pipelined(f"room leases ({len(room_ids)})", fill)]

    async def place(self, room_id: str, instance: str, lease_ms: int) -> tuple[str, bool]:
        """Who owns the room now, and whether the lease was just made for `instance`
        (nobody had it)."""
        owner, made = await self._call(f"room lease for {room_id}",
                                       lambda: self._place(keys=[lease_key(room_id)], args=[instance, lease_ms]))
        return _text(owner), bool(made)

    async def owner(self, room_id: str) -> str | None:
        value = await self._call("room lease", lambda: self.redis.get(lease_key(room_id)))
        return None if value is None else str(value)

    async def owners(self, room_ids: list[str]) -> list[str | None]:
        """`owner` for many rooms in one round trip (GETs: an MGET would span Redis
        Cluster slots)."""
        def fill(pipe: Any) -> None:
            for room_id in room_ids:
                pipe.get(lease_key(room_id))

        values = await self._pipelined(f"room leases ({len(room_ids)})", fill)
        return [None if v is None else str(v) for v in values]

    async def release(self, room_id: str, instance: str) -> None:
        await self._call("room lease", lambda: self._release(keys=[lease_key(room_id)], args=[instance]))

    async def publish(self, instance: str, payload: bytes) -> int:
        """How many subscribers received it (0: nobody is listening on that channel now)."""
        return int(await self._call("cluster channel", lambda: self.redis.publish(channel_of(instance), payload)))

    @asynccontextmanager
    async def subscribe(self, instance: str) -> AsyncIterator[AsyncIterator[Any]]:
        """Our channel's payloads. Errors (coredis raises groups of connection errors)
        end the subscription; no retry inside, so the caller notices an outage."""
        async with self.redis.pubsub(channels=[channel_of(instance)], ignore_subscribe_messages=True,
                                     retry_policy=NoRetryPolicy(), max_idle_seconds=2) as ps:
            yield _payloads(ps)

    async def load_handover(self, room_id: str) -> bytes | None:
        raw = await self._call("room handover", lambda: self.redis.get(handover_key(room_id)))
        return None if raw is None else (raw.encode() if isinstance(raw, str) else raw)

    async def save_handover(self, room_id: str, data: bytes | None) -> None:
        key = handover_key(room_id)
        if data is None:
            await self._call("room handover", lambda: self.redis.delete([key]))
        else:
            await self._call("room handover", lambda: self.redis.set(key, data.decode(), ex=HANDOVER_TTL))

    async def set_peer_room(self, peer_id: str, room_id: str) -> None:
        await self._call("peer room", lambda: self.redis.set(peer_room_key(peer_id), room_id, ex=PEER_ROOM_TTL))

    async def peer_room(self, peer_id: str) -> str | None:
        value = await self._call("peer room", lambda: self.redis.get(peer_room_key(peer_id)))
        return None if value is None else str(value)

    async def share_stats(self, instance: str, stats: dict[str, Any], every: float) -> list[dict[str, Any]]:
        """Publish this instance's counts (they lapse after 3 `every`s); every live
        instance's counts, ours included."""
        async def go() -> list[dict[str, Any]]:
            now = time.time()
            await self.redis.set(stats_key(instance), orjson.dumps(stats).decode(), px=int(every * 3000))
            await self.redis.zadd(INSTANCES_KEY, {instance: now})
            await self.redis.zremrangebyscore(INSTANCES_KEY, "-inf", now - every * 3)
            found = []
            for other in await self.redis.zrange(INSTANCES_KEY, 0, -1):
                raw = await self.redis.get(stats_key(other))
                if raw is not None:
                    found.append(orjson.loads(raw))
            return found

        return await self._call("cluster stats", go)

    async def leave(self, instance: str) -> None:
        await self._call("cluster stats", lambda: self.redis.zrem(INSTANCES_KEY, [instance]))


async def _payloads(ps: Any) -> AsyncIterator[Any]:
    async for message in ps:
        if message["type"] == "message":
            yield message["data"]
