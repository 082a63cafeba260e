"""Every v2 WebSocket message type over real sockets against the real server."""

from __future__ import annotations

import pytest
import trio

from conftest import register, ws_peer


async def test_register_answers_registered_auth(server, room):
    async with ws_peer(server.ws_url) as w:
        reply = await register(w, room, "Worker-1", role="worker", metadata={"tags": ["gpu"]})
        assert reply == {
            "type": "registered_auth",
            "room_id": room["room_id"],
            "token": room["token"],
            "peer_id": "Worker-1",
        }


async def test_register_defaults_role_and_metadata(server, room):
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "a")
        await register(b, room, "b")
        reply = await b.request({"type": "discover_peers", "filters": {}})
        assert reply["type"] == "peer_list"
        assert reply["to_peer_id"] == "b"
        assert reply["count"] == 1
        (peer,) = reply["peers"]
        assert peer["peer_id"] == "a" and peer["role"] == "peer" and peer["metadata"] == {}
        assert isinstance(peer["connected_at"], float)


async def test_discover_v2_filters(server, room):
    async with ws_peer(server.ws_url) as w1, ws_peer(server.ws_url) as w2, ws_peer(server.ws_url) as c:
        await register(
            w1,
            room,
            "w1",
            role="worker",
            metadata={"tags": ["gpu", "training"], "properties": {"gpu_memory_mb": 16384, "status": "available"}},
        )
        await register(
            w2,
            room,
            "w2",
            role="worker",
            metadata={"tags": ["inference"], "properties": {"gpu_memory_mb": 8192, "status": "busy"}},
        )
        await register(c, room, "c", role="client")

        async def ids(filters):
            reply = await c.request({"type": "discover_peers", "from_peer_id": "c", "filters": filters})
            assert reply["count"] == len(reply["peers"])
            return sorted(p["peer_id"] for p in reply["peers"])

        assert await ids({"role": "worker"}) == ["w1", "w2"]
        assert await ids({"role": "client"}) == []  # the asker is never listed
        assert await ids({"tags": ["training", "nothing"]}) == ["w1"]
        assert await ids({"properties": {"status": "available"}}) == ["w1"]
        assert await ids({"properties": {"gpu_memory_mb": {"$gte": 10000}}}) == ["w1"]
        assert await ids({"properties": {"gpu_memory_mb": {"$lte": 10000}}}) == ["w2"]
        assert await ids({"properties": {"gpu_memory_mb": {"$eq": 8192}}}) == ["w2"]
        assert await ids({"properties": {"status": {"$in": ["busy", "x"]}}}) == ["w2"]
        assert await ids({"role": "worker", "tags": ["gpu"], "properties": {"gpu_memory_mb": {"$gte": 8192}}}) == ["w1"]


async def test_update_metadata_merges(server, room):
    async with ws_peer(server.ws_url) as w:
        await register(
            w,
            room,
            "w",
            role="worker",
            metadata={"tags": ["a", "b"], "properties": {"status": "available", "gpu": 1}, "name": "x"},
        )
        reply = await w.request(
            {
                "type": "update_metadata",
                "peer_id": "w",
                "metadata": {"tags": ["c", "a"], "properties": {"status": "busy", "gpu": None, "job": "j1"}},
            }
        )
        assert reply == {
            "type": "metadata_updated", "peer_id": "w",
            "metadata": {"tags": ["a", "b", "c"], "properties": {"status": "busy", "job": "j1"}, "name": "x"},
        }
        # without peer_id, the server fills it in
        reply = await w.request({"type": "update_metadata", "metadata": {"name": "y"}})
        assert reply["metadata"]["name"] == "y" and reply["metadata"]["tags"] == ["a", "b", "c"]


async def test_peer_message_routed_untouched(server, room):
    payload = {"app_message_type": "job_request", "nested": {"list": [1, 2.5, "x", None, True]}, "unicode": "ü🐭"}
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "a")
        await register(b, room, "b")
        await a.send({"type": "peer_message", "from_peer_id": "a", "to_peer_id": "b", "payload": payload})
        got = await b.recv()
        assert got == {"type": "peer_message", "from_peer_id": "a", "to_peer_id": "b", "payload": payload}
        # from_peer_id absent: filled in
        await a.send({"type": "peer_message", "to_peer_id": "b", "payload": 7})
        assert (await b.recv())["from_peer_id"] == "a"


@pytest.mark.parametrize("mtype", ["offer", "answer", "candidate"])
async def test_signalling_relayed_as_sent(server, room, mtype):
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "a")
        await register(b, room, "b")
        raw = (
            '{"type": "%s", "sender": "a", "target": "b", "sdp": "v=0\\r\\no=- 1 2 IN IP4 127.0.0.1", '
            '"extra": {"k": 1}}'
            % mtype
        )
        await a.send(raw)
        # byte for byte when nothing changes; an offer also says the sender's role (SPEC 4)
        expected = raw[:-1] + ', "role":"peer"}'.replace(" ", "") if mtype == "offer" else raw
        assert await b.ws.get_message() == expected
        await a.send({"type": mtype, "target": "b", "candidate": {"candidate": "c", "sdpMid": "0"}})
        got = await b.recv()
        role = {"role": "peer"} if mtype == "offer" else {}
        assert got == {"type": mtype, "target": "b", "candidate": {"candidate": "c", "sdpMid": "0"}, "sender": "a",
                       **role}


async def test_signal_to_departed_peer_is_dropped_quietly(server, room):
    async with ws_peer(server.ws_url) as a:
        await register(a, room, "a")
        await a.send({"type": "candidate", "sender": "a", "target": "gone", "candidate": {}})
        assert await a.nothing_pending()  # no error: v2 clients shut down on any error


async def test_rooms_are_isolated(server):
    r1, r2 = await server.new_room(), await server.new_room()
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, r1, "a")
        await register(b, r2, "b")
        assert (await a.request({"type": "discover_peers", "filters": {}}))["count"] == 0
        err = await a.request({"type": "peer_message", "to_peer_id": "b", "payload": 1})
        assert err["code"] == "PEER_NOT_IN_ROOM"
        await a.send({"type": "offer", "target": "b", "sdp": "x"})
        assert await b.nothing_pending()


async def test_disconnect_leaves_room_at_once(server, room):
    async with ws_peer(server.ws_url) as c:
        await register(c, room, "c")
        async with ws_peer(server.ws_url) as w:
            await register(w, room, "w")
            assert (await c.request({"type": "discover_peers"}))["count"] == 1
            assert server.server.metrics_json()["active_connections"] == 2
        with trio.fail_after(5):
            while (await c.request({"type": "discover_peers"}))["count"]:
                await trio.sleep(0.01)
    with trio.fail_after(5):
        while server.server.supervisor.rooms:
            await trio.sleep(0.01)
    metrics = server.server.metrics_json()
    assert metrics["active_rooms"] == 0 and metrics["active_connections"] == 0 and metrics["peers_by_role"] == {}


async def test_connections_leave_no_garbage_cycles(server, room):
    """A connection's objects are freed by reference counting when it ends, however it
    ends (clean close, TCP reset, replaced by a re-register elsewhere): nothing of it
    waits for the cycle collector. `signaling-trio serve` relies on this to run the
    collector rarely (__main__.GC_THRESHOLDS)."""
    import gc
    import json
    import socket
    from collections import Counter

    from rawws import frame, raw_connect

    port = int(server.ws_url.rstrip("/").rsplit(":", 1)[1])

    async def reset_after_register(i: int) -> None:
        s = await raw_connect(port)
        msg = {"type": "register", "peer_id": f"rst{i}", "room_id": room["room_id"],
               "token": room["token"], "id_token": room["id_token"]}
        await s.send_all(frame(1, json.dumps(msg).encode()))
        await trio.sleep(0.02)
        s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        await s.aclose()

    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for i in range(10):
            async with ws_peer(server.ws_url) as p, ws_peer(server.ws_url) as q:
                await register(p, room, f"p{i}", role="worker", metadata={"tags": ["gpu"]})
                await register(q, room, f"q{i}")
                await q.request({"type": "subscribe", "filters": {"role": "worker"}})
                await q.request({"type": "reserve_peer", "peer_id": f"p{i}", "duration": 60})
                await p.send({"type": "peer_message", "to_peer_id": f"q{i}", "payload": i})
                assert (await q.recv())["payload"] == i
            await reset_after_register(i)
        await trio.sleep(0.3)
        assert len(server.server.connections) == 0
        gc.collect()
        ours = Counter(
            type(o).__module__ for o in gc.garbage
            # (h11 objects of a WebSocket handshake belong to a wsproto one; the HTTP side
            # of the test server, hypercorn, has cycles of its own and is not counted)
            if type(o).__module__.split(".")[0] in ("signaling_trio", "trio_websocket", "wsproto")
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not ours, f"left for the cycle collector: {dict(ours)}"
