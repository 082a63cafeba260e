"""Room records kept in memory in front of the store, for the register path.

Owns: a bounded map room id -> (record, when it was read). A register reads its room's
record; without this, every register of every peer is a store round trip (a thread hop
for sqlite, a network one for Redis) for a record that changes rarely.
Never touches: documents (passed through), the store's own lifecycle.

The store stays the source of truth. A kept record is trusted only to say yes: when it
would refuse (unknown token, expired), the caller asks again with `fresh=True`, which
reads the store. Writes made through this object update it at once. So it is used where
every write goes through this process (memory, sqlite: `ttl` unbounded); with Redis,
whose rooms other instances change, the server keeps nothing (`ttl` 0) and every
register reads Redis (a network round trip, not a thread hop).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from .base import RoomRecord, Store

TTL = math.inf  # seconds a record read from the store is used for
MAX_ROOMS = 100_000  # records kept; the oldest read is dropped first


class RoomCache:
    def __init__(self, store: Store, *, ttl: float = TTL, max_rooms: int = MAX_ROOMS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.ttl = ttl
        self.max_rooms = max_rooms
        self.clock = clock
        self._rooms: dict[str, tuple[RoomRecord, float]] = {}
        self.hits = self.misses = 0

    def _keep(self, record: RoomRecord) -> None:
        if self.ttl <= 0:
            return
        rooms = self._rooms
        rooms.pop(record.room_id, None)
        if len(rooms) >= self.max_rooms:
            del rooms[next(iter(rooms))]
        rooms[record.room_id] = (record, self.clock())

    async def get_room(self, room_id: str, fresh: bool = False) -> RoomRecord | None:
        if not fresh:
            kept = self._rooms.get(room_id)
            if kept is not None and self.clock() - kept[1] < self.ttl:
                self.hits += 1
                return kept[0]
        self.misses += 1
        record = await self.store.get_room(room_id)
        if record is None:
            self._rooms.pop(room_id, None)  # (unknown rooms are not kept: ids are the caller's to make up)
        else:
            self._keep(record)
        return record

    async def create_room(self, room: RoomRecord) -> None:
        await self.store.create_room(room)
        self._keep(room)

    async def set_expiry(self, room_id: str, expires_at: float) -> bool:
        self._rooms.pop(room_id, None)
        return await self.store.set_expiry(room_id, expires_at)

    async def delete_room(self, room_id: str) -> bool:
        self._rooms.pop(room_id, None)
        return await self.store.delete_room(room_id)

    async def purge_expired(self, before: float) -> int:
        for room_id in [r for r, (rec, _) in self._rooms.items() if rec.expires_at < before]:
            del self._rooms[room_id]
        return await self.store.purge_expired(before)

    # ---------------------------------------------------------- passed through
    async def check(self) -> None:
        await self.store.check()

    async def get_doc(self, key: str) -> dict[str, Any] | None:
        return await self.store.get_doc(key)

    async def put_doc(self, key: str, doc: dict[str, Any]) -> None:
        await self.store.put_doc(key, doc)

    async def delete_doc(self, key: str) -> bool:
        return await self.store.delete_doc(key)

    async def __aenter__(self) -> "RoomCache":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None  # (the store is closed by its owner, the server)

    async def aclose(self) -> None:
        return None
