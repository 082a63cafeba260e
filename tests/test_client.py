"""signaling_trio.client against the real server, through the pytest plugin's fixtures
exactly as a user's test suite would use them."""

from __future__ import annotations

import pytest
import trio

from signaling_trio.client import HttpApi, SignalingClosed, SignalingError, open_signaling_client


async def test_discover_and_message(signaling_client_factory):
    worker = await signaling_client_factory(role="worker", metadata={"tags": ["gpu"], "properties": {"mem": 24}})
    client = await signaling_client_factory(role="client")
    peers = await client.discover({"role": "worker", "properties": {"mem": {"$gte": 16}}})
    assert [p["peer_id"] for p in peers] == [worker.peer_id]
    await client.send_peer_message(worker.peer_id, {"job": 1})
    msg = await worker.receive()
    assert msg == {
        "type": "peer_message",
        "from_peer_id": client.peer_id,
        "to_peer_id": worker.peer_id,
        "payload": {"job": 1},
    }
    merged = await worker.update_metadata({"properties": {"status": "busy"}})
    assert merged == {"tags": ["gpu"], "properties": {"mem": 24, "status": "busy"}}


async def test_signalling_roundtrip(signaling_client_factory):
    a = await signaling_client_factory()
    b = await signaling_client_factory()
    await a.send_offer(b.peer_id, "v=0 offer")
    assert await b.receive() == {
        "type": "offer",
        "target": b.peer_id,
        "sdp": "v=0 offer",
        "sender": a.peer_id,
        "role": "peer",
    }
    await b.send_answer(a.peer_id, "v=0 answer")
    await b.send_candidate(a.peer_id, {"candidate": "c1", "sdpMid": "0"})
    assert (await a.receive())["type"] == "answer"
    assert (await a.receive())["candidate"]["candidate"] == "c1"


async def test_errors_are_typed(signaling_client_factory):
    a = await signaling_client_factory()
    with pytest.raises(SignalingError) as info:
        await a.discover({"properties": {"x": {"$regex": "."}}})
    assert info.value.code == "INVALID_MESSAGE"
    with pytest.raises(SignalingError) as info:
        await a.reserve("nobody", 10)
    assert info.value.code == "PEER_NOT_FOUND"
    # the connection goes on
    assert await a.discover() == []


async def test_fire_and_forget_errors_never_confused_with_requests(signaling_client_factory):
    a = await signaling_client_factory()
    b = await signaling_client_factory()
    await a.send_peer_message("nobody", 1)  # fails: PEER_NOT_IN_ROOM, answered by an error
    peers = await a.discover()  # must not see that error as its own
    assert [p["peer_id"] for p in peers] == [b.peer_id]
    err = a.errors().receive_nowait()
    assert err.code == "PEER_NOT_IN_ROOM"


async def test_subscription_iterator(signaling_client_factory):
    watcher = await signaling_client_factory(role="client")
    sub = await watcher.subscribe({"role": "worker"})
    assert sub.peers == []
    w = await signaling_client_factory(role="worker")
    assert (await sub.next_event())["type"] == "peer_joined"
    await w.update_metadata({"x": 1})
    event = await sub.next_event()
    assert event["type"] == "peer_updated" and event["peer"]["metadata"] == {"x": 1}
    await w.aclose()
    assert (await sub.next_event())["type"] == "peer_left"
    await watcher.unsubscribe()
    with pytest.raises(trio.EndOfChannel):
        await sub.next_event()


async def test_reserve_release_and_target_notices(signaling_client_factory):
    w = await signaling_client_factory(role="worker")
    c = await signaling_client_factory(role="client")
    until = await c.reserve(w.peer_id, 30, filters={"unreserved": True})
    assert (await w.receive()) == {"type": "peer_reserved", "by": c.peer_id, "reserved_until": until}
    other = await signaling_client_factory(role="client")
    with pytest.raises(SignalingError) as info:
        await other.reserve(w.peer_id, 30)
    assert info.value.code == "PEER_RESERVED"
    await c.release(w.peer_id)
    assert (await w.receive())["reason"] == "released"


async def test_takeover_surfaces_as_closed(signaling_server, signaling_client_factory):
    api = HttpApi(signaling_server.http_url)
    me = await api.anonymous_signin()
    room = await api.create_room(me.id_token)
    old = await signaling_client_factory(register=False)
    new = await signaling_client_factory(register=False)
    await old.register("w", room.room_id, room.token, me.id_token)
    await new.register("w", room.room_id, room.token, me.id_token)
    with pytest.raises(SignalingClosed) as info:
        with trio.fail_after(5):
            while True:
                await old.ping()
    assert info.value.close_code == 4000


async def test_cancelled_request_leaves_client_usable(signaling_client_factory):
    a = await signaling_client_factory()
    b = await signaling_client_factory()
    # cancel a request right after it went out: its answer (an error) comes later
    real_send = a._send
    with trio.CancelScope() as scope:
        async def send_then_cancel(frame):
            await real_send(frame)
            scope.cancel()
        a._send = send_then_cancel
        await a.reserve("nobody", 10)
    a._send = real_send
    assert scope.cancelled_caught
    # the late error must not be taken for the next request's answer
    assert [p["peer_id"] for p in await a.discover()] == [b.peer_id]
    assert a.errors().receive_nowait().code == "PEER_NOT_FOUND"
    assert (await a.update_metadata({"k": 1})) == {"k": 1}


async def test_open_signaling_client_context(signaling_server):
    api = HttpApi(signaling_server.http_url)
    me = await api.anonymous_signin()
    room = await api.create_room(me.id_token)
    assert room.expires_at > 0
    async with open_signaling_client(signaling_server.ws_url) as peer:
        reply = await peer.register("p", room.room_id, room.token, me.id_token)
        assert reply["peer_id"] == "p"
        assert await api.extend_room(me.id_token, room.room_id, 60) > 0
    # the context closed the socket; the peer is gone, so a v1-style delete succeeds
    with trio.fail_after(5):
        while signaling_server.server.supervisor.rooms:
            await trio.sleep(0.01)
    status = await api.delete_peers_and_room("p")
    assert "deleted" in status
    with pytest.raises(SignalingError) as info:
        await api.create_room("garbage")
    assert info.value.code == "INVALID_ID_TOKEN"


@pytest.mark.signaling_server(max_room_peers=1)
async def test_marker_configures_server(signaling_client_factory):
    await signaling_client_factory()
    with pytest.raises(SignalingError) as info:
        await signaling_client_factory()
    assert info.value.code == "ROOM_FULL"
