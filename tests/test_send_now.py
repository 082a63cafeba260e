"""Frames for a peer are written at once by the task that queued them (a room, after a
batch of commands; a connection, for its own answers) when the peer's socket has room and
nobody else is writing (`Connection.flush`, `_wsfix.send_now`); the writer task runs only
for what the socket could not take. Over real sockets: nothing is reordered or cut when a
write goes out in part, and frames that fit start no writer."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

import trio

from conftest import register, ws_peer
from rawws import frame, raw_connect, read_frames, read_until_closed, server_frames
from signaling_trio import _ws
from signaling_trio.testing import open_test_server

BLOB = "y" * 60_000


def _payload(i: int) -> str:
    return f"{i:04d}{BLOB}"


async def _raw_peer(srv, room, peer_id: str, *, rcvbuf: int | None = None) -> trio.SocketStream:
    """A registered peer on a raw socket, which reads only when the test says so."""
    stream = await raw_connect(srv.server.info.ws_port, rcvbuf=rcvbuf)
    await stream.send_all(frame(0x1, json.dumps({
        "type": "register", "peer_id": peer_id, "room_id": room["room_id"], "token": room["token"],
        "id_token": room["id_token"]}).encode()))
    assert json.loads((await read_frames(stream, 1))[0][1])["type"] == "registered_auth"
    return stream


async def _flood(sender, to: str, n: int) -> None:
    """`n` messages of 60 kB to `to`, every one handled by the server when this returns."""
    for i in range(n):
        await sender.send({"type": "peer_message", "to_peer_id": to, "payload": _payload(i)})
    assert (await sender.request({"type": "ping"}))["type"] == "pong"


def _relayed(frames: list[tuple[int, bytes]]) -> list[str]:
    msgs = [json.loads(p) for op, p in frames if op == 0x1]
    return [m["payload"] for m in msgs if m["type"] == "peer_message"]


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
        slow = await _raw_peer(srv, room, "slow")
        n = 120
        async with ws_peer(srv.ws_url) as sender:
            await register(sender, room, "sender")
            await _flood(sender, "slow", n)
            assert partial, "no write went out in part: the test did not fill the socket"
            buf = b""
            with trio.fail_after(20):
                while len([f for f in server_frames(buf) if b'"peer_message"' in f[1]]) < n:
                    buf += await slow.receive_some(1 << 20)
        got = [json.loads(p) for op, p in server_frames(buf) if op == 0x1]
        payloads = [m["payload"] for m in got if m["type"] == "peer_message"]
        assert payloads == [_payload(i) for i in range(n)]
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


@asynccontextmanager
async def _cut_off_with_a_frame_half_written():
    """A peer that stopped reading with a frame half written to it, once the stall timer
    has closed it: it has left its room (a connection leaves, then closes). Yields the
    server and the peer's raw socket, unread."""
    async with open_test_server(rate_limit=0, stalled_reader_timeout=1.0) as srv:
        room = await srv.new_room()
        slow = await _raw_peer(srv, room, "slow", rcvbuf=65536)
        async with ws_peer(srv.ws_url) as sender:
            await register(sender, room, "sender")
            await _flood(sender, "slow", 120)
            with trio.fail_after(10):
                while "slow" in [p["peer_id"] for p in (await sender.request({"type": "discover_peers"}))["peers"]]:
                    pass
            yield srv, slow


async def test_a_close_is_written_after_the_rest_of_a_frame_begun():
    """The peer reads again while the server closes it: the rest of the frame begun comes
    first, then the close frame (1008), nothing after. A close frame after part of a frame
    would be read as that frame's payload."""
    async with _cut_off_with_a_frame_half_written() as (srv, slow):
        buf, code = await read_until_closed(slow, timeout=10)
    frames = server_frames(buf)
    assert code == 1008 and frames[-1][0] == 0x8
    assert buf.endswith(frames[-1][1]), "bytes after the close frame"
    got = _relayed(frames)
    assert 0 < len(got) < 120 and got == [_payload(i) for i in range(len(got))]
    assert srv.server.metrics.stalled_readers == 1


async def test_a_peer_that_never_reads_again_is_cut_without_a_close_frame():
    """The peer never reads again: the rest of its frame cannot be written, so no close
    frame follows it; the server cuts the stream (DISCONNECT_TIMEOUT later). What reaches
    the peer is whole frames, in order, then at most the start of one."""
    async with _cut_off_with_a_frame_half_written() as (srv, slow):
        with trio.fail_after(10):
            while len(srv.server.connections) > 1:
                await trio.sleep(0.05)  # (nothing to wait on from outside: it sends nothing)
        buf, code = await read_until_closed(slow, timeout=10)
    frames = server_frames(buf)
    assert code is None and 0x8 not in [op for op, _ in frames]
    got = _relayed(frames)
    assert got == [_payload(i) for i in range(len(got))]
    assert srv.server.metrics.closes_by_code[1008] == 1


async def _paced_reader(srv, n: int, chunk: int, pause: float) -> bytes:
    """`n` frames of 60 kB sent at once to a raw peer that reads `chunk` bytes every `pause`
    seconds, with the server's send buffer for it fixed at 64 kB, as on a slow link (the
    kernel then takes a little at a time). What the peer read: all `n` frames, or what it
    got before the server closed it."""
    room = await srv.new_room()
    slow = await _raw_peer(srv, room, "slow", rcvbuf=65536)
    [conn] = [c for c in srv.server.connections if c.peer_id == "slow"]
    conn.ws._stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, 65536)
    buf = b""
    async with ws_peer(srv.ws_url) as sender:
        await register(sender, room, "sender")
        await _flood(sender, "slow", n)
        with trio.fail_after(30):
            while sum(op == 0x1 for op, _ in server_frames(buf)) < n:
                data = await slow.receive_some(chunk)
                if not data:
                    break
                buf += data
                await trio.sleep(pause)  # the reader's pace
    await slow.aclose()
    return buf


async def test_a_slow_reader_that_keeps_reading_is_not_cut_off():
    """A peer reading about 2.6 MB/s is sent 9 MB at once: a single batch write takes
    longer than stalled_reader_timeout, but each PROGRESS_BYTES of it goes out well within
    it. The stall timer counts from the last progress, so the peer gets everything."""
    async with open_test_server(rate_limit=0, stalled_reader_timeout=1.0) as srv:
        buf = await _paced_reader(srv, 150, 131072, 0.05)
        assert _relayed(server_frames(buf)) == [_payload(i) for i in range(150)]
        assert srv.server.metrics.stalled_readers == 0


async def test_a_peer_that_reads_a_little_at_a_time_is_cut_off():
    """A peer reading about 330 kB/s makes progress, but takes less than PROGRESS_BYTES
    (1 MiB) per stalled_reader_timeout (1 s here): it is cut off as stalled, whole frames
    first, rather than keeping its backlog alive as long as it likes by reading a little."""
    async with open_test_server(rate_limit=0, stalled_reader_timeout=1.0) as srv:
        buf = await _paced_reader(srv, 60, 32768, 0.1)
        got = _relayed(server_frames(buf))
        assert 0 < len(got) < 60 and got == [_payload(i) for i in range(len(got))]
        assert srv.server.metrics.stalled_readers == 1
