"""Beyond v2 over real sockets: reservations raced by many clients, presence pushes."""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio
import trio.testing

from conftest import race_to_reserve, register, ws_peer


async def test_fifty_clients_race_for_one_worker(server, room):
    async with AsyncExitStack() as stack:
        worker = await stack.enter_async_context(ws_peer(server.ws_url))
        await register(worker, room, "worker", role="worker", metadata={"properties": {"status": "available"}})
        clients = [await stack.enter_async_context(ws_peer(server.ws_url)) for _ in range(50)]
        for i, c in enumerate(clients):
            await register(c, room, f"client-{i}", role="client")
        # every client saw the worker available...
        for c in clients:
            assert (await c.request({"type": "discover_peers", "filters": {"role": "worker", "unreserved": True}}))[
                "count"
            ] == 1
        winners, losers = await race_to_reserve(clients, "worker")
        assert len(winners) == 1
        assert len(losers) == 49 and {r["code"] for r in losers} <= {"PEER_RESERVED", "PRECONDITION_FAILED"}
        told = await worker.recv()
        assert told["type"] == "peer_reserved" and told["by"] == f"client-{winners[0]}"
        # discovery shows the holder
        (w,) = (await clients[0].request({"type": "discover_peers", "filters": {"role": "worker"}}))["peers"]
        assert w["reserved_by"] == f"client-{winners[0]}"


async def test_release_by_holder_and_by_disconnect(server, room):
    async with ws_peer(server.ws_url) as w, ws_peer(server.ws_url) as c1:
        await register(w, room, "w")
        await register(c1, room, "c1")
        async with ws_peer(server.ws_url) as c2:
            await register(c2, room, "c2")
            assert (await c2.request({"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 100}))[
                "type"
            ] == "reservation_granted"
            assert (await w.recv())["type"] == "peer_reserved"
            err = await c1.request({"type": "release_peer", "to_peer_id": "w"})
            assert err["code"] == "PRECONDITION_FAILED"
        assert await w.recv() == {"type": "peer_released", "by": "c2", "reason": "holder_left"}
        assert (await c1.request({"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 100}))[
            "type"
        ] == "reservation_granted"
        await w.recv()
        assert await c1.request({"type": "release_peer", "to_peer_id": "w"}) == {
            "type": "reservation_released",
            "peer_id": "w",
        }
        assert await w.recv() == {"type": "peer_released", "by": "c1", "reason": "released"}


async def test_subscription_order_under_concurrent_changes(server, room):
    async with ws_peer(server.ws_url) as watcher:
        await register(watcher, room, "watcher", role="client")
        reply = await watcher.request(
            {"type": "subscribe", "filters": {"role": "worker", "properties": {"status": "available"}}}
        )
        assert reply["type"] == "subscribed" and reply["peers"] == []

        async def worker_life(i: int) -> None:
            async with ws_peer(server.ws_url) as w:
                await register(w, room, f"w{i}", role="worker", metadata={"properties": {"status": "available"}})
                for status in ("busy", "available", "available"):
                    await w.request({"type": "update_metadata", "metadata": {"properties": {"status": status}}})

        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(worker_life, i)

        # Per worker, the events must be exactly its life story, in order, each once.
        per_peer: dict[str, list[str]] = {}
        while sum(len(v) for v in per_peer.values()) < 10 * 5:
            msg = await watcher.recv()
            per_peer.setdefault(msg["peer"]["peer_id"], []).append(msg["type"])
        assert len(per_peer) == 10
        for events in per_peer.values():
            assert events == ["peer_joined", "peer_left", "peer_joined", "peer_updated", "peer_left"]
        assert await watcher.nothing_pending()
        assert await watcher.request({"type": "unsubscribe"}) == {"type": "unsubscribed"}


async def test_v2_client_never_sees_new_types(server, room):
    async with ws_peer(server.ws_url) as v2, ws_peer(server.ws_url) as v3:
        await register(v2, room, "v2")
        await register(v3, room, "v3")
        await v3.request({"type": "subscribe", "filters": {}})
        await v3.request({"type": "update_metadata", "metadata": {"x": 1}})
        async with ws_peer(server.ws_url) as other:
            await register(other, room, "other")
        assert await v2.nothing_pending()  # ping is the only new type it sees, and it asked
