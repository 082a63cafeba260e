"""Room records kept in front of the store (signaling_trio/store/cache.py): registers
stop reading the store, refusals are always the store's, writes through it are seen at
once, and it stays bounded."""

from __future__ import annotations

import time

import pytest

from conftest import register, ws_peer
from signaling_trio.store import RoomRecord
from signaling_trio.store.cache import RoomCache
from signaling_trio.store.memory import MemoryStore
from signaling_trio.testing import open_test_server


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get_room(self, room_id: str, fresh: bool = False) -> RoomRecord | None:
        self.reads += 1
        return await super().get_room(room_id)


def record(room_id: str, expires_at: float = 1e12) -> RoomRecord:
    return RoomRecord(room_id, "h", "c", 0.0, expires_at)


async def test_kept_records_spare_the_store_and_fresh_reads_do_not():
    store = CountingStore()
    cache = RoomCache(store)
    await cache.create_room(record("r1"))
    for _ in range(5):
        assert (await cache.get_room("r1")).room_id == "r1"
    assert store.reads == 0 and cache.hits == 5
    await cache.get_room("r1", fresh=True)
    assert store.reads == 1
    assert await cache.get_room("nope") is None and await cache.get_room("nope") is None
    assert store.reads == 3  # unknown ids are never kept


async def test_writes_through_it_are_seen_and_it_stays_bounded():
    cache = RoomCache(MemoryStore(), max_rooms=3)
    for i in range(5):
        await cache.create_room(record(f"r{i}"))
    assert len(cache._rooms) == 3 and "r0" not in cache._rooms
    await cache.set_expiry("r4", 5.0)
    assert (await cache.get_room("r4")).expires_at == 5.0
    await cache.delete_room("r3")
    assert await cache.get_room("r3") is None
    assert await cache.purge_expired(10.0) == 1 and await cache.get_room("r4") is None
    nothing = RoomCache(MemoryStore(), ttl=0)
    await nothing.create_room(record("x"))
    assert nothing._rooms == {}


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_refusal_is_the_stores_to_say(store, tmp_path):
    """A kept record that would refuse is read again: a room extended behind the kept
    copy's back (the store written directly) admits at once; one deleted through the API
    is gone at once."""
    async with open_test_server(store=store, data_dir=str(tmp_path)) as srv:
        room = await srv.new_room()
        await srv.server.rooms.set_expiry(room["room_id"], time.time() - 1)  # (as the server writes)
        async with ws_peer(srv.ws_url) as p:
            assert (await register(p, room, "p"))["code"] == "ROOM_EXPIRED"  # now kept: expired
        await srv.server.store.set_expiry(room["room_id"], time.time() + 3600)  # behind its back
        async with ws_peer(srv.ws_url) as p:
            assert (await register(p, room, "p"))["type"] == "registered_auth"
        status, _ = await srv.http("POST", "/delete-peers-and-room", {"room_id": room["room_id"]},
                                   token=room["id_token"])
        assert status == 200
        async with ws_peer(srv.ws_url) as p:
            assert (await register(p, room, "q"))["code"] == "ROOM_NOT_FOUND"
