"""Limits and close paths over real sockets (SPEC "Limits")."""

from __future__ import annotations

import json

import trio

from conftest import register, ws_peer
from rawws import frame, raw_connect, read_until_closed
from signaling_trio.protocol.limits import TokenBucket
from signaling_trio.testing import open_test_server


async def test_frame_limit_error_then_1009():
    async with open_test_server(max_frame_bytes=1000) as srv:
        room = await srv.new_room()
        async with ws_peer(srv.ws_url) as p:
            await register(p, room, "p")
            err = await p.request({"type": "peer_message", "to_peer_id": "p", "payload": "x" * 2000})
            assert err["code"] == "MESSAGE_TOO_LARGE"
            # multi-byte characters are counted in bytes
            err = await p.request({"type": "peer_message", "to_peer_id": "p", "payload": "ü" * 600})
            assert err["code"] == "MESSAGE_TOO_LARGE"
            assert (await p.request({"type": "ping"}))["type"] == "pong"
            await p.send("x" * (1024 * 1024 + 10))
            assert await p.closed() == 1009
        # the room is fine
        async with ws_peer(srv.ws_url) as q:
            assert (await register(q, room, "q"))["type"] == "registered_auth"


async def test_metadata_limit_flag():
    async with open_test_server(max_metadata_bytes=200) as srv:
        room = await srv.new_room()
        async with ws_peer(srv.ws_url) as p:
            err = await register(p, room, "p", metadata={"blob": "x" * 300})
            assert err["code"] == "METADATA_TOO_LARGE" and err["reason"]
            assert (await register(p, room, "p", metadata={"a": 1}))["type"] == "registered_auth"
            err = await p.request({"type": "update_metadata", "metadata": {"properties": {"b": "y" * 250}}})
            assert err["code"] == "METADATA_TOO_LARGE"
            assert (await p.request({"type": "update_metadata", "metadata": {"c": 2}}))["metadata"] == {"a": 1, "c": 2}


async def test_room_full_flag():
    async with open_test_server(max_room_peers=2) as srv:
        room = await srv.new_room()
        async with ws_peer(srv.ws_url) as a, ws_peer(srv.ws_url) as b, ws_peer(srv.ws_url) as c:
            await register(a, room, "a")
            await register(b, room, "b")
            err = await register(c, room, "c")
            assert err["code"] == "ROOM_FULL" and err["reason"]
            assert (await a.request({"type": "discover_peers"}))["count"] == 1


def test_token_bucket():
    b = TokenBucket(rate=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert b.take(0.05) is False  # half a token
    assert b.take(0.1) is True
    assert [b.take(10.0) for _ in range(4)] == [True, True, True, False]  # capped at burst
    assert all(TokenBucket(0, 1, 0.0).take(0.0) for _ in range(1000))


async def test_rate_limit_drops_with_one_error_and_keeps_connection():
    async with open_test_server(rate_limit=0.5, rate_burst=5) as srv:
        async with ws_peer(srv.ws_url) as p:
            for _ in range(30):
                await p.send({"type": "ping"})
            frames = []
            with trio.move_on_after(1.0):
                while True:
                    frames.append(await p.recv())
            pongs = [f for f in frames if f["type"] == "pong"]
            errors = [f for f in frames if f["type"] == "error"]
            assert 5 <= len(pongs) <= 6
            assert len(errors) == 1 and errors[0]["code"] == "RATE_LIMITED"
            assert srv.server.metrics.rate_limited_drops >= 24
            # still connected: the bucket refills
            await trio.sleep(2.1)
            assert (await p.request({"type": "ping"}))["type"] == "pong"


async def test_rate_limit_off():
    async with open_test_server(rate_limit=0) as srv:
        async with ws_peer(srv.ws_url) as p:
            for _ in range(500):
                await p.send({"type": "ping"})
            for _ in range(500):
                assert (await p.recv())["type"] == "pong"


async def test_unregistered_connection_closed_after_timeout():
    async with open_test_server(register_timeout=0.3) as srv:
        room = await srv.new_room()
        async with ws_peer(srv.ws_url) as idle, ws_peer(srv.ws_url) as good:
            await register(good, room, "good")
            assert await idle.closed() == 1008
            assert idle.ws.closed.reason == "register timeout"
            assert (await good.request({"type": "ping"}))["type"] == "pong"


async def test_silent_peer_pinged_then_closed():
    async with open_test_server(idle_ping_interval=0.2, idle_ping_timeout=0.3, register_timeout=60) as srv:
        stream = await raw_connect(srv.server.info.ws_port)
        # never read, never answer the ping: the server gives up and closes (1008)
        await trio.sleep(0.8)
        data, code = await read_until_closed(stream)
        assert code == 1008
        assert srv.server.metrics.closes_by_code[1008] == 1
    # a peer that answers pings is kept
    async with open_test_server(idle_ping_interval=0.1, idle_ping_timeout=1) as srv:
        room = await srv.new_room()
        async with ws_peer(srv.ws_url) as p:
            await register(p, room, "p")
            await trio.sleep(0.5)  # several idle pings, answered by the client library
            assert (await p.request({"type": "ping"}))["type"] == "pong"


async def test_invalid_utf8_closes_1007(server):
    stream = await raw_connect(server.server.info.ws_port)
    await stream.send_all(frame(0x1, b'{"type": "ping", "x": "\xff\xfe"}'))
    _, code = await read_until_closed(stream)
    assert code == 1007
    status, _ = await server.http("GET", "/health")
    assert status == 200


async def test_oversize_handshake_headers_refused(server):
    stream = await trio.open_tcp_stream("127.0.0.1", server.server.info.ws_port)
    request = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    try:
        await stream.send_all(request)
    except trio.BrokenResourceError:
        pass
    data, _ = await read_until_closed(stream)
    assert b"101 Switching Protocols" not in data
    status, _ = await server.http("GET", "/health")
    assert status == 200
    async with ws_peer(server.ws_url) as p:
        assert (await p.request({"type": "ping"}))["type"] == "pong"


async def test_stalled_reader_is_cut_off_others_unaffected():
    async with open_test_server(stalled_reader_timeout=1.0, rate_limit=0, outbox_size=16) as srv:
        room = await srv.new_room()
        async with ws_peer(srv.ws_url) as a, ws_peer(srv.ws_url) as b, ws_peer(srv.ws_url) as flooder:
            await register(a, room, "a")
            await register(b, room, "b")
            await register(flooder, room, "flooder")
            stalled = await raw_connect(srv.server.info.ws_port)
            await stalled.send_all(frame(0x1, json.dumps({
                "type": "register", "peer_id": "stalled", "room_id": room["room_id"],
                "token": room["token"], "id_token": room["id_token"]}).encode()))
            # the flooder cannot know when it is registered without reading; a's view tells
            with trio.fail_after(5):
                while (await a.request({"type": "discover_peers"}))["count"] < 3:
                    pass
            blob = "z" * 60_000
            done = trio.Event()
            sent = 0
            round_trips = 0

            async def flood():
                nonlocal sent
                # towards a peer that never reads, until the server gives up on it
                while not done.is_set() and sent < 5000:
                    await flooder.send({"type": "peer_message", "to_peer_id": "stalled", "payload": blob})
                    sent += 1

            async with trio.open_nursery() as n:
                n.start_soon(flood)
                # meanwhile another pair keeps talking; each round trip is answered
                with trio.fail_after(60):
                    while True:
                        with trio.fail_after(2):
                            await a.send({"type": "peer_message", "to_peer_id": "b", "payload": round_trips})
                            assert (await b.recv())["payload"] == round_trips
                        round_trips += 1
                        if (await a.request({"type": "discover_peers"}))["count"] == 2:
                            break  # the stalled peer is gone
                done.set()
            assert srv.server.metrics.closes_by_code[1008] == 1
            assert srv.server.metrics.outbox_overflows > 0
            # its socket is closed: it reads what was buffered, then EOF
            await read_until_closed(stalled, timeout=10)
            # the flooder was never blocked: it is answered as soon as its queue drains
            with trio.fail_after(10):
                while (await flooder.request({"type": "ping"}))["type"] != "pong":
                    pass


async def test_room_crash_closes_its_peers_with_1011_only(server, monkeypatch, caplog):
    r1, r2 = await server.new_room(), await server.new_room()
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, r1, "a")
        await register(b, r2, "b")
        actor = server.server.supervisor.rooms[r1["room_id"]]

        def bug(*args, **kwargs):
            raise ZeroDivisionError("a bug in the room logic")

        monkeypatch.setattr(actor.state, "handle", bug)
        await a.send({"type": "discover_peers"})
        assert await a.closed() == 1011
        assert (await b.request({"type": "discover_peers"}))["type"] == "peer_list"
        assert server.server.metrics.room_crashes == 1
        assert any(r.exc_info and "room crashed" in r.getMessage() for r in caplog.records)
        # the room itself is usable again
        async with ws_peer(server.ws_url) as c:
            assert (await register(c, r1, "c"))["type"] == "registered_auth"
        status, _ = await server.http("GET", "/health")
        assert status == 200


async def test_no_frame_waits_for_a_writer_that_lingered_out(monkeypatch, server, room):
    """The writer task ends after WRITER_LINGER idle and deliver() starts a new one; frames
    sent around that moment, in bursts and singly, all arrive, and promptly."""
    import random

    from signaling_trio import _ws

    monkeypatch.setattr(_ws, "WRITER_LINGER", 0.02)
    rng = random.Random(3)
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "a")
        await register(b, room, "b")
        n = 0
        for _ in range(60):
            burst = rng.choice([1, 1, 2, 5])
            for _ in range(burst):
                await a.send({"type": "peer_message", "to_peer_id": "b", "payload": n})
                n += 1
            for expected in range(n - burst, n):
                got = await b.recv(timeout=2)
                assert got["payload"] == expected
            await trio.sleep(rng.choice([0.0, 0.01, 0.019, 0.02, 0.021, 0.03]))
        await trio.sleep(0.2)
        # idle now: no connection holds a writer task; the next frame starts one
        assert all(conn._writer_token is None for conn in server.server.connections)
        await a.send({"type": "peer_message", "to_peer_id": "b", "payload": "last"})
        assert (await b.recv(timeout=2))["payload"] == "last"


async def test_idle_connection_keeps_no_frame(server, room):
    """Once handled, a frame is not kept alive by a connection that goes quiet (trio-websocket's
    reader task kept its last chunk and event until the next one arrived; our connections
    are read by `_wsfix.read_message`, which binds neither while it waits). 32 peers each send one 3.5 kB frame
    (under trio-websocket's 4 KiB read size, like a register with its id_token) and stay
    idle: each copy kept is 112 kB still allocated."""
    import gc
    import tracemalloc
    from contextlib import AsyncExitStack

    pad = "x" * 3500
    async with AsyncExitStack() as stack:
        peers = [await stack.enter_async_context(ws_peer(server.ws_url)) for _ in range(32)]
        for i, p in enumerate(peers):
            await register(p, room, f"p{i}")
        tracemalloc.start()
        try:
            # a round of small frames first, so that what every waiting connection holds
            # anyway (its tasks' wait frames) is traced on both sides of the measure
            for p in peers:
                assert (await p.request({"type": "ping"}))["type"] == "pong"
            await trio.sleep(0.1)
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for p in peers:
                assert (await p.request({"type": "ping", "pad": pad}))["type"] == "pong"
            await trio.sleep(0.1)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held < 50_000, f"{held} bytes still allocated after 32 x 3.5 kB frames"
