"""A store in a dict: for tests and throw-away servers. Nothing survives a restart."""

from __future__ import annotations

from .base import ClosingStore, RoomRecord
import dataclasses


class MemoryStore(ClosingStore):
    def __init__(self) -> None:
        self._rooms: dict[str, RoomRecord] = {}

    async def create_room(self, room: RoomRecord) -> None:
        self._rooms[room.room_id] = room

    async def get_room(self, room_id: str) -> RoomRecord | None:
        return self._rooms.get(room_id)

    async def set_expiry(self, room_id: str, expires_at: float) -> bool:
        room = self._rooms.get(room_id)
        if room is None:
            return False
        self._rooms[room_id] = dataclasses.replace(room, expires_at=expires_at)
        return True

    async def delete_room(self, room_id: str) -> bool:
        return self._rooms.pop(room_id, None) is not None

    async def purge_expired(self, before: float) -> int:
        old = [r for r, rec in self._rooms.items() if rec.expires_at < before]
        for r in old:
            del self._rooms[r]
        return len(old)

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
