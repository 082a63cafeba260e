"""Chaos over real sockets: clients killed mid-message, reconnecting, flooding, taking
over each other's peer ids. Afterwards every invariant must hold: no ghost peers in
discovery, metrics consistent, /health 200, no error logged with a traceback."""

from __future__ import annotations

import json
import logging
import random

import trio
from trio_websocket import ConnectionClosed

from conftest import register, ws_peer
from rawws import frame, raw_connect
from signaling_trio.testing import open_test_server


async def test_chaos_leaves_no_ghosts(caplog):
    caplog.set_level(logging.INFO, logger="signaling_trio")
    rng = random.Random(1234)
    async with open_test_server(rate_limit=50, rate_burst=40, register_timeout=5) as srv:
        room = await srv.new_room()
        async with ws_peer(srv.ws_url) as observer:
            await register(observer, room, "observer", role="client")

            async def polite(i: int) -> None:
                # peer ids repeat under one identity: later ones take over (close 4000)
                async with ws_peer(srv.ws_url) as p:
                    try:
                        pid = f"p{rng.randrange(8)}"
                        reply = await register(p, room, pid, role="worker", metadata={"properties": {"i": i}})
                        if reply["type"] != "registered_auth":
                            return
                        for k in range(rng.randrange(1, 6)):
                            await p.send({"type": "peer_message", "to_peer_id": "observer", "payload": k})
                            await p.send({"type": "update_metadata", "metadata": {"properties": {"k": k}}})
                            await p.send(
                                {"type": "reserve_peer", "to_peer_id": f"p{rng.randrange(8)}", "duration_sec": 5}
                            )
                        await p.send({"type": "discover_peers"})
                    except ConnectionClosed as exc:
                        assert exc.reason.code == 4000

            async def killer(i: int) -> None:
                stream = await raw_connect(srv.server.info.ws_port)
                reg = json.dumps({"type": "register", "peer_id": f"k{i}", "room_id": room["room_id"],
                                  "token": room["token"], "id_token": room["id_token"]}).encode()
                await stream.send_all(frame(0x1, reg))
                whole = frame(
                    0x1, json.dumps({"type": "peer_message", "to_peer_id": "observer", "payload": "x" * 3000}).encode()
                )
                await stream.send_all(whole[: len(whole) // 2])  # then die mid-frame
                await stream.aclose()

            async def flooder(i: int) -> None:
                async with ws_peer(srv.ws_url) as p:
                    await register(p, room, f"f{i}")
                    try:
                        for _ in range(300):
                            await p.send({"type": "peer_message", "to_peer_id": "observer", "payload": "flood"})
                    except ConnectionClosed:
                        pass

            async def garbage(i: int) -> None:
                async with ws_peer(srv.ws_url) as p:
                    for raw in (
                        "{",
                        "[]",
                        '{"type": 1}',
                        '{"type":"register"}',
                        "\u0000",
                        '{"type":"subscribe","filters":{"properties":{"a":{"$x":1}}}}',
                    ):
                        await p.send(raw)

            async with trio.open_nursery() as n:
                for i in range(60):
                    n.start_soon([polite, killer, flooder, garbage][i % 4], i)
                    if i % 10 == 0:
                        await trio.sleep(0)

            # everyone but the observer is gone; the room must converge to just it. The
            # observer read nothing during the flood: its outbox may be full, and a reply
            # that finds it full is dropped (a slow reader's frames are, by design): ask again
            with trio.fail_after(10):
                while True:
                    await observer.send({"type": "discover_peers"})
                    reply: dict = {}
                    with trio.move_on_after(1):
                        reply = await observer.recv()
                        while reply["type"] != "peer_list":  # skip routed messages still arriving
                            reply = await observer.recv()
                    if reply.get("count") == 0:
                        break
                    await trio.sleep(0.05)
            with trio.fail_after(10):
                while srv.server.metrics.active_connections != 1:
                    await trio.sleep(0.05)
            m = srv.server.metrics_json()
            assert m["active_rooms"] == 1 and m["active_connections"] == 1
            assert m["peers_by_role"] == {"client": 1}
            assert m["open_websockets"] == 1
            actor = srv.server.supervisor.rooms[room["room_id"]]
            assert list(actor.state.peers) == ["observer"]
            assert actor.state.deadlines == {} and actor.state.subscribers == {}
            assert m["errors_by_code"].get("RATE_LIMITED", 0) >= 1
            status, health = await srv.http("GET", "/health")
            assert status == 200 and health["status"] == "healthy"
        with trio.fail_after(10):
            while srv.server.supervisor.rooms:
                await trio.sleep(0.05)
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == [], [r.getMessage() for r in bad]


async def test_clients_that_reset_right_after_the_handshake(server, room, caplog):
    """A client that sends TCP RST the moment the handshake is done: the server's first
    look at the connection (its peer address, for the log) fails with ENOTCONN. Once,
    that killed the whole server; it must only end that connection."""
    caplog.set_level(logging.INFO, logger="signaling_trio")  # the connect event reads the address
    import socket
    import struct

    port = int(server.ws_url.rsplit(":", 1)[1].strip("/"))

    async def reset_one() -> None:
        stream = await raw_connect(port)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # RST, not FIN

    for _ in range(10):
        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(reset_one)
    status, _ = await server.http("GET", "/health")
    assert status == 200
    async with ws_peer(server.ws_url) as p:
        assert (await register(p, room, "after"))["type"] == "registered_auth"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
