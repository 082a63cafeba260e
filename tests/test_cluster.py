"""One logical server on many instances: three signaling_trio instances on one real
redis-server, peers of one room spread over them (docs/SCALING.md).

Every case here crosses instances: the room's owner (the instance of its first peer) is
never the only instance involved."""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio
import trio.testing

from conftest import register, ws_peer
from redisproc import RedisServer
from signaling_trio.testing import TestServer, open_test_server


@pytest.fixture
def redis():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@asynccontextmanager
async def instances(url: str, n: int = 3, **options: Any) -> AsyncIterator[list[TestServer]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_test_server(store=url, **options)) for _ in range(n)]


async def eventually(check: Any, timeout: float = 10.0, every: float = 0.1) -> Any:
    """Poll `check()` (async) until it returns something truthy; fail after `timeout`."""
    with trio.fail_after(timeout):
        while True:
            value = await check()
            if value:
                return value
            await trio.sleep(every)


async def test_discovery_messages_and_signals_cross_instances(redis):
    async with instances(redis.url) as (a, b, c):
        room = await a.new_room()
        async with ws_peer(a.ws_url) as owner, ws_peer(b.ws_url) as worker, ws_peer(c.ws_url) as client:
            assert (await register(owner, room, "owner", role="watcher"))["type"] == "registered_auth"
            assert (await owner.request({"type": "subscribe", "filters": {"role": "worker"}}))["type"] == "subscribed"
            reg = await register(worker, room, "w1", role="worker",
                                 metadata={"tags": ["gpu"], "properties": {"gpu_memory_mb": 24000, "status": "available"}})
            assert reg == {"type": "registered_auth", "room_id": room["room_id"], "token": room["token"], "peer_id": "w1"}
            joined = await owner.recv_type("peer_joined")
            assert joined["peer"]["peer_id"] == "w1"
            assert (await register(client, room, "c1", role="client"))["type"] == "registered_auth"

            # discovery from C sees the worker on B, by role, tag and property
            found = await client.request({"type": "discover_peers", "filters": {
                "role": "worker", "tags": ["gpu"], "properties": {"gpu_memory_mb": {"$gte": 16000}}}})
            assert found["type"] == "peer_list" and [p["peer_id"] for p in found["peers"]] == ["w1"]

            # metadata updated on B is seen from C and pushed to the subscriber on A
            upd = await worker.request({"type": "update_metadata", "metadata": {"properties": {"status": "busy"}}})
            assert upd["type"] == "metadata_updated" and upd["metadata"]["properties"]["status"] == "busy"
            assert (await owner.recv_type("peer_updated"))["peer"]["metadata"]["properties"]["status"] == "busy"
            found = await client.request({"type": "discover_peers", "filters": {"properties": {"status": "busy"}}})
            assert [p["peer_id"] for p in found["peers"]] == ["w1"]

            # application messages and WebRTC signals both ways, payload untouched
            await client.send({"type": "peer_message", "from_peer_id": "c1", "to_peer_id": "w1",
                               "payload": {"job": [1, 2, {"x": "é"}]}})
            got = await worker.recv_type("peer_message")
            assert got["from_peer_id"] == "c1" and got["payload"] == {"job": [1, 2, {"x": "é"}]}
            await worker.send({"type": "offer", "sender": "w1", "target": "c1", "sdp": "v=0 offer"})
            offer = await client.recv_type("offer")
            assert offer["sdp"] == "v=0 offer" and offer["sender"] == "w1"
            await client.send({"type": "answer", "sender": "c1", "target": "w1", "sdp": "v=0 answer"})
            assert (await worker.recv_type("answer"))["sdp"] == "v=0 answer"
            await client.send({"type": "candidate", "sender": "c1", "target": "w1", "candidate": {"candidate": "c"}})
            assert (await worker.recv_type("candidate"))["candidate"] == {"candidate": "c"}

            # identity stays bound to the connection across instances
            err = await client.request({"type": "peer_message", "from_peer_id": "w1", "to_peer_id": "owner", "payload": 1})
            assert err["type"] == "error" and err["code"] == "SENDER_MISMATCH"

        # everyone left (on three instances): a newcomer finds nobody (discovery never
        # lists the asker itself)
        async with ws_peer(b.ws_url) as again:
            assert (await register(again, room, "probe"))["type"] == "registered_auth"
            left = await again.request({"type": "discover_peers", "filters": {}})
        assert left["peers"] == []


async def test_fifty_clients_on_three_instances_race_for_one_worker(redis):
    async with instances(redis.url) as servers, AsyncExitStack() as stack:
        room = await servers[0].new_room()
        worker = await stack.enter_async_context(ws_peer(servers[0].ws_url))
        await register(worker, room, "worker", role="worker")
        clients = []
        for i in range(50):
            c = await stack.enter_async_context(ws_peer(servers[i % 3].ws_url))
            assert (await register(c, room, f"client-{i}", role="client"))["type"] == "registered_auth"
            clients.append(c)
        results: dict[int, dict] = {}
        go = trio.Event()

        async def race(i: int, c: Any) -> None:
            await go.wait()
            results[i] = await c.request({"type": "reserve_peer", "to_peer_id": "worker", "duration_sec": 60,
                                          "filters": {"unreserved": True}})

        async with trio.open_nursery() as n:
            for i, c in enumerate(clients):
                n.start_soon(race, i, c)
            await trio.testing.wait_all_tasks_blocked()
            go.set()
        winners = [i for i, r in results.items() if r["type"] == "reservation_granted"]
        losers = [r for r in results.values() if r["type"] == "error"]
        assert len(winners) == 1, results
        assert len(losers) == 49 and {r["code"] for r in losers} <= {"PEER_RESERVED", "PRECONDITION_FAILED"}
        told = await worker.recv()
        assert told == {"type": "peer_reserved", "by": f"client-{winners[0]}", "duration_sec": 60} or (
            told["type"] == "peer_reserved" and told["by"] == f"client-{winners[0]}")
        # every instance sees the same holder
        for c in clients[:3]:
            (w,) = (await c.request({"type": "discover_peers", "filters": {"role": "worker"}}))["peers"]
            assert w["reserved_by"] == f"client-{winners[0]}"


async def test_peer_id_taken_and_takeover_across_instances(redis):
    async with instances(redis.url, n=2) as (a, b):
        room = await a.new_room()
        other = await b.signin()
        async with ws_peer(a.ws_url) as first, ws_peer(b.ws_url) as thief:
            assert (await register(first, room, "w"))["type"] == "registered_auth"
            err = await register(thief, room, "w", id_token=other["id_token"])
            assert err["type"] == "error" and err["code"] == "PEER_ID_TAKEN"
            # the same identity on another instance takes the peer over: the old socket gets 4000
            async with ws_peer(b.ws_url) as successor:
                assert (await register(successor, room, "w"))["type"] == "registered_auth"
                assert await first.closed() == 4000
                found = await thief.request({"type": "discover_peers", "filters": {}})
                # the thief is not in the room; the answer is an error, not a list
                assert found["code"] == "NOT_IN_ROOM"
                assert (await register(thief, room, "t", id_token=other["id_token"]))["type"] == "registered_auth"
                found = await thief.request({"type": "discover_peers", "filters": {}})
                assert [p["peer_id"] for p in found["peers"]] == ["w"]


async def test_http_and_cluster_metrics_cross_instances(redis):
    async with instances(redis.url) as (a, b, c):
        room = await a.new_room()
        joiner = await c.signin()
        async with ws_peer(a.ws_url) as p1, ws_peer(b.ws_url) as p2, ws_peer(c.ws_url) as p3:
            await register(p1, room, "p1", role="worker")
            await register(p2, room, "p2", role="worker")
            await register(p3, room, "p3", role="client", id_token=joiner["id_token"])

            async def summed() -> bool:
                views = [(await s.http("GET", "/metrics"))[1] for s in (a, b, c)]
                return all(v["cluster"]["active_connections"] == 3 and v["cluster"]["peers_by_role"] == {"worker": 2, "client": 1}
                           and v["cluster"]["instances"] == 3 and v["cluster"]["active_rooms"] == 1 for v in views) and views

            views = await eventually(summed)
            assert sum(v["active_rooms"] for v in views) == 1  # one owner
            assert len({v["instance"] for v in views}) == 3

            # a peer registered on C (not the creator) may extend the room, asked on B
            status, body = await b.http("POST", "/extend-room", {"room_id": room["room_id"], "ttl_sec": 600},
                                        token=joiner["id_token"])
            assert status == 200, body
            # delete-peers-and-room on C: the owner (A) disconnects everyone, wherever they are
            status, body = await c.http("POST", "/delete-peers-and-room", {"peer_id": "p2"}, token=room["id_token"])
            assert status == 200 and body["status"] == "room deleted; all peers disconnected"
            for p in (p1, p2, p3):
                assert await p.closed() == 1000


async def test_peers_of_a_closed_connection_leave_everywhere(redis):
    async with instances(redis.url, n=2) as (a, b):
        room = await a.new_room()
        async with ws_peer(a.ws_url) as watcher:
            await register(watcher, room, "watcher")
            await watcher.request({"type": "subscribe", "filters": {}})
            async with ws_peer(b.ws_url) as passer:
                await register(passer, room, "passer")
                assert (await watcher.recv_type("peer_joined"))["peer"]["peer_id"] == "passer"
            assert (await watcher.recv_type("peer_left"))["peer"]["peer_id"] == "passer"
            found = await watcher.request({"type": "discover_peers", "filters": {}})
            assert found["peers"] == []
