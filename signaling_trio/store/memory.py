"""A store in a dict: for tests and throw-away servers. Nothing survives a restart."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from .base import ClosingStore, RoomRecord


class MemoryStore(ClosingStore):
    def __init__(self) -> None:
        self._rooms: dict[str, RoomRecord] = {}
        self._docs: dict[str, bytes] = {}  # encoded: a caller never shares a live dict

    async def get_doc(self, key: str) -> dict[str, Any] | None:
        raw = self._docs.get(key)
        return None if raw is None else orjson.loads(raw)

    async def put_doc(self, key: str, doc: dict[str, Any]) -> None:
        self._docs[key] = orjson.dumps(doc)

    async def delete_doc(self, key: str) -> bool:
        return self._docs.pop(key, None) is not None

    async def create_room(self, room: RoomRecord) -> None:
        self._rooms[room.room_id] = room

    async def get_room(self, room_id: str, fresh: bool = False) -> RoomRecord | None:
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
