"""Frames for a peer are written at once by the task that queued them (a room, after a
batch of commands; a connection, for its own answers) when the peer's socket has room and
nobody else is writing (`Connection.flush`, `_wsfix.send_now`); the writer task runs only
for what the socket could not take. Over real sockets: nothing is reordered or cut when a
write goes out in part, and frames that fit start no writer."""

from __future__ import annotations

import json

import trio

from conftest import register, ws_peer
from rawws import frame, raw_connect, read_frames, server_frames
from signaling_trio import _ws
from signaling_trio.testing import open_test_server


async def test_frames_to_a_slow_reader_arrive_whole_and_in_order(monkeypatch):
    """120 frames of 60 kB to a peer that reads nothing until all are sent: the kernel takes
    the first ones, one write goes out in part (its rest queued first, as bytes), the rest
    wait in the outbox. Read at last, every frame is there, whole, in order."""
    partial = []
    real_send_now = _ws.send_now

    def watched(ws, texts):  # the real send_now; only records whether a write went out in part
        left = real_send_now(ws, texts)
        if left and len(left) < sum(map(len, texts)):
            partial.append(len(left))
        return left

    monkeypatch.setattr(_ws, "send_now", watched)
    async with open_test_server(rate_limit=0) as srv:
        room = await srv.new_room()
        slow = await raw_connect(srv.server.info.ws_port)
        await slow.send_all(frame(0x1, json.dumps({
            "type": "register", "peer_id": "slow", "room_id": room["room_id"], "token": room["token"],
            "id_token": room["id_token"]}).encode()))
        assert json.loads((await read_frames(slow, 1))[0][1])["type"] == "registered_auth"
        n, blob = 120, "y" * 60_000
        async with ws_peer(srv.ws_url) as sender:
            await register(sender, room, "sender")
            for i in range(n):
                await sender.send({"type": "peer_message", "to_peer_id": "slow", "payload": f"{i:04d}{blob}"})
            assert (await sender.request({"type": "ping"}))["type"] == "pong"  # all handled
            assert partial, "no write went out in part: the test did not fill the socket"
            buf = b""
            with trio.fail_after(20):
                while len([f for f in server_frames(buf) if b'"peer_message"' in f[1]]) < n:
                    buf += await slow.receive_some(1 << 20)
        got = [json.loads(p) for op, p in server_frames(buf) if op == 0x1]
        payloads = [m["payload"] for m in got if m["type"] == "peer_message"]
        assert payloads == [f"{i:04d}{blob}" for i in range(n)]
        assert srv.server.metrics.outbox_overflows == 0
        await slow.aclose()


async def test_a_frame_that_fits_starts_no_writer(server, room):
    """A relayed message and a pong go out from the task that delivers them: once they
    have arrived, neither connection has a writer task (one would linger WRITER_LINGER)."""
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "a")
        await register(b, room, "b")
        for i in range(20):
            await a.send({"type": "peer_message", "to_peer_id": "b", "payload": i})
            assert (await b.recv(timeout=2))["payload"] == i
            assert (await a.request({"type": "ping"}))["type"] == "pong"
            assert [conn._writer_token for conn in server.server.connections] == [None, None]
