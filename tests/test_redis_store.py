"""The Redis store against a real redis-server on a free port: rooms and tokens shared by
two instances, and Redis going away and coming back. (CI installs redis-server; a
missing one fails there, and is a skip with the reason elsewhere.)"""

from __future__ import annotations

import time

import pytest
import trio

from conftest import register, ws_peer
from redisproc import free_port
from signaling_trio.testing import open_test_server


async def test_two_instances_share_rooms_and_tokens(redis):
    async with open_test_server(store=redis.url) as a, open_test_server(store=redis.url) as b:
        room = await a.new_room()  # id_token signed by a, room stored by a
        async with ws_peer(b.ws_url) as p:
            assert (await register(p, room, "on-b"))["type"] == "registered_auth"
        status, body = await b.http(
            "POST", "/extend-room", {"room_id": room["room_id"], "ttl_sec": 60}, token=room["id_token"]
        )
        assert status == 200
        rec = await a.server.store.get_room(room["room_id"])
        assert abs(rec.expires_at - body["expires_at"]) < 1
        status, _ = await a.http(
            "POST", "/delete-peers-and-room", {"peer_id": "x", "room_id": room["room_id"]}, token=room["id_token"]
        )
        assert status == 200
        async with ws_peer(b.ws_url) as p:
            assert (await register(p, room, "late"))["code"] == "ROOM_NOT_FOUND"


async def test_expired_room_in_redis(redis):
    async with open_test_server(store=redis.url) as srv:
        room = await srv.new_room()
        await srv.server.store.set_expiry(room["room_id"], time.time() - 5)
        async with ws_peer(srv.ws_url) as p:
            assert (await register(p, room, "p"))["code"] == "ROOM_EXPIRED"


async def test_redis_down_then_back(redis):
    async with open_test_server(store=redis.url) as srv:
        room = await srv.new_room()
        async with ws_peer(srv.ws_url) as a, ws_peer(srv.ws_url) as b:
            await register(a, room, "a")
            await register(b, room, "b")
            redis.stop()
            status, health = await srv.http("GET", "/health")
            assert status == 503 and health["checks"]["store"] != "ok"
            async with ws_peer(srv.ws_url) as c:
                err = await register(c, room, "c")
                assert err["code"] == "STORE_UNAVAILABLE" and err["reason"]
            status, body = await srv.http("POST", "/create-room", token=room["id_token"])
            assert status == 503 and body["error"] == "STORE_UNAVAILABLE"
            # connected peers keep talking
            await a.send({"type": "peer_message", "to_peer_id": "b", "payload": "still here"})
            assert (await b.recv())["payload"] == "still here"
            redis.start()  # an empty Redis: same port, nothing persisted
            with trio.fail_after(10):
                while (await srv.http("GET", "/health"))[0] != 200:
                    await trio.sleep(0.1)
            room2 = {
                **(await srv.http("POST", "/create-room", token=room["id_token"]))[1],
                "id_token": room["id_token"],
            }
            async with ws_peer(srv.ws_url) as c:
                assert (await register(c, room2, "c"))["type"] == "registered_auth"


async def test_unreachable_redis_at_start_fails_clearly():
    from signaling_trio import ConfigError

    with pytest.raises(ConfigError, match="cannot be reached"):
        async with open_test_server(store=f"redis://127.0.0.1:{free_port()}/0"):
            pass


async def test_leases_renewed_and_looked_up_many_to_a_round_trip(redis):
    """The cluster's batched lease calls on a real redis-server: each room's step is the
    one-room script's (take a free lease, renew ours, leave another's alone)."""
    from signaling_trio.cluster.transport import RedisTransport
    from signaling_trio.store.redis import RedisStore

    async with RedisStore(redis.url) as store:
        t = RedisTransport(store.client)
        assert await t.acquire("theirs", "other", 60_000) == "other"
        assert await t.acquire("ours", "me", 300) == "me"
        rooms = ["free", "ours", "theirs"] + [f"r{i}" for i in range(600)]
        assert await t.renew(rooms, "me", 60_000) == ["me", "me", "other"] + ["me"] * 600
        await trio.sleep(0.5)  # past the first lease of "ours": it was renewed
        assert await t.owners(["ours", "free", "theirs", "nobody's"]) == ["me", "me", "other", None]
        assert await t.renew([], "me", 60_000) == [] and await t.owners([]) == []
        assert await t.place("theirs", "me", 60_000) == ("other", False)
        assert await t.place("new", "other", 60_000) == ("other", True)
