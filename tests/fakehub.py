"""An in-memory stand-in for Redis as the cluster uses it (cluster/transport.Transport),
for cluster unit tests that run without a redis-server: leases that lapse on trio's
clock, one channel per instance, saved handovers. `down` makes every call fail as an
unreachable Redis does; `pause_leases` holds lease calls until released; an instance in
`deaf` receives nothing (publishes to it find no subscriber, as while it resubscribes
after a Redis restart)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from signaling_trio.store import StoreUnavailable


class FakeHub:
    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}
        self.channels: dict[str, trio.MemorySendChannel[bytes]] = {}
        self.handovers: dict[str, bytes] = {}
        self.peer_rooms: dict[str, str] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.down = False
        self.deaf: set[str] = set()
        self.lease_gate: trio.Event | None = None
        self.lease_calls = 0

    def transport(self) -> "FakeTransport":
        return FakeTransport(self)

    def pause_leases(self) -> None:
        self.lease_gate = trio.Event()

    def resume_leases(self) -> None:
        assert self.lease_gate is not None
        self.lease_gate.set()
        self.lease_gate = None

    def drop_lease(self, room_id: str) -> None:
        self.leases.pop(room_id, None)

    def owner(self, room_id: str) -> str | None:
        entry = self.leases.get(room_id)
        if entry is None or entry[1] <= trio.current_time():
            return None
        return entry[0]


class FakeTransport:
    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub

    async def _reach(self) -> None:
        await trio.lowlevel.checkpoint()  # a round trip: other tasks run meanwhile
        if self.hub.down:
            raise StoreUnavailable("fake redis cannot be reached")

    async def _lease_call(self) -> None:
        self.hub.lease_calls += 1
        if self.hub.lease_gate is not None:
            await self.hub.lease_gate.wait()
        await self._reach()

    def _take(self, room_id: str, instance: str, lease_ms: int, *, renew: bool = True) -> str:
        """The lease script's step: a free lease is taken, ours renewed (`renew`)."""
        owner = self.hub.owner(room_id)
        if owner is None or (renew and owner == instance):
            self.hub.leases[room_id] = (instance, trio.current_time() + lease_ms / 1000)
            return instance
        return owner

    async def acquire(self, room_id: str, instance: str, lease_ms: int) -> str:
        await self._lease_call()
        return self._take(room_id, instance, lease_ms)

    async def renew(self, room_ids: list[str], instance: str, lease_ms: int) -> list[str]:
        await self._lease_call()
        return [self._take(room_id, instance, lease_ms) for room_id in room_ids]

    async def place(self, room_id: str, instance: str, lease_ms: int) -> tuple[str, bool]:
        await self._reach()
        made = self.hub.owner(room_id) is None
        return self._take(room_id, instance, lease_ms, renew=False), made

    async def owner(self, room_id: str) -> str | None:
        await self._reach()
        return self.hub.owner(room_id)

    async def owners(self, room_ids: list[str]) -> list[str | None]:
        await self._reach()
        return [self.hub.owner(room_id) for room_id in room_ids]

    async def release(self, room_id: str, instance: str) -> None:
        await self._reach()
        if self.hub.owner(room_id) == instance:
            del self.hub.leases[room_id]

    async def publish(self, instance: str, payload: bytes) -> int:
        await self._reach()
        channel = self.hub.channels.get(instance)
        if channel is None or instance in self.hub.deaf:
            return 0
        channel.send_nowait(payload)
        return 1

    @asynccontextmanager
    async def subscribe(self, instance: str) -> AsyncIterator[AsyncIterator[bytes]]:
        await self._reach()
        send, recv = trio.open_memory_channel[bytes](100000)
        self.hub.channels[instance] = send
        try:
            yield recv
        finally:
            if self.hub.channels.get(instance) is send:
                del self.hub.channels[instance]

    async def load_handover(self, room_id: str) -> bytes | None:
        await self._reach()
        return self.hub.handovers.get(room_id)

    async def save_handover(self, room_id: str, data: bytes | None) -> None:
        await self._reach()
        if data is None:
            self.hub.handovers.pop(room_id, None)
        else:
            self.hub.handovers[room_id] = data

    async def set_peer_room(self, peer_id: str, room_id: str) -> None:
        await self._reach()
        self.hub.peer_rooms[peer_id] = room_id

    async def peer_room(self, peer_id: str) -> str | None:
        await self._reach()
        return self.hub.peer_rooms.get(peer_id)

    async def share_stats(self, instance: str, stats: dict[str, Any], every: float) -> list[dict[str, Any]]:
        await self._reach()
        self.hub.stats[instance] = stats
        return list(self.hub.stats.values())

    async def leave(self, instance: str) -> None:
        await self._reach()
        self.hub.stats.pop(instance, None)
