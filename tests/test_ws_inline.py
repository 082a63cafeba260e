"""A connection read in its handler's own task (`_wsfix.read_message`), over raw sockets:
what trio-websocket's reader task did for it still happens (fragments put together, pings
answered between them, size limit, both close handshakes), without that task."""

from __future__ import annotations

import json
import struct

import trio

from rawws import frame, raw_connect, read_frames, read_until_closed, server_frames
from signaling_trio.testing import open_test_server


async def test_a_fragmented_message_with_a_ping_between_its_frames(server):
    stream = await raw_connect(server.server.info.ws_port)
    await stream.send_all(frame(0x1, b'{"type"', fin=False) + frame(0x9, b"mid") + frame(0x0, b': "pi', fin=False)
                          + frame(0x0, b'ng"}'))
    got = await read_frames(stream, 2)
    assert got[0] == (0xA, b"mid")  # the pong comes first: the message is not complete before it
    assert got[1][0] == 0x1 and json.loads(got[1][1]) == {"type": "pong"}
    await stream.aclose()


async def test_a_fragmented_message_over_the_size_limit_closes_1009():
    async with open_test_server() as srv:
        stream = await raw_connect(srv.server.info.ws_port)
        chunk = b"x" * (512 * 1024)
        await stream.send_all(frame(0x1, chunk, fin=False) + frame(0x0, chunk, fin=False) + frame(0x0, b"xx"))
        _, code = await read_until_closed(stream)
        assert code == 1009
        assert (await srv.http("GET", "/health"))[0] == 200


async def test_a_close_from_the_server_ends_when_the_peer_answers():
    """The server closes (register timeout); the peer answers its close frame, and the
    server, reading that answer, closes the TCP connection then, not when its wait for
    the answer (2 s) runs out."""
    async with open_test_server(register_timeout=0.3) as srv:
        stream = await raw_connect(srv.server.info.ws_port)
        got = await read_frames(stream, 1)
        assert got[0][0] == 0x8 and struct.unpack("!H", got[0][1][:2])[0] == 1008
        await stream.send_all(frame(0x8, struct.pack("!H", 1000)))
        with trio.fail_after(1.5):  # (the 2 s wait would end it too, later)
            while await stream.receive_some(65536):
                pass
        assert srv.server.metrics.closes_by_code[1008] == 1


async def test_a_close_from_the_peer_is_answered(server):
    stream = await raw_connect(server.server.info.ws_port)
    await stream.send_all(frame(0x1, b'{"type": "ping"}'))
    assert json.loads((await read_frames(stream, 1))[0][1]) == {"type": "pong"}
    await stream.send_all(frame(0x8, struct.pack("!H", 4000) + b"bye"))
    data, code = await read_until_closed(stream)
    assert [op for op, _ in server_frames(data)] == [0x8] and code == 4000  # its code, echoed


async def test_handshakes_wsproto_refuses_are_answered_and_closed(server):
    """Requests the fast path leaves to wsproto and wsproto refuses: its answer (426 for a
    version it does not speak, 400 for a malformed request), then the close."""
    base = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
    for request, status in [(base + b"Sec-WebSocket-Version: 8\r\n\r\n", b"426"),
                            (b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n", b"400")]:
        stream = await trio.open_tcp_stream("127.0.0.1", server.server.info.ws_port)
        await stream.send_all(request)
        data, _ = await read_until_closed(stream)
        assert data.split(b"\r\n", 1)[0].split(b" ")[1] == status, data[:80]
    stream = await raw_connect(server.server.info.ws_port)
    await stream.send_all(frame(0x1, b'{"type": "ping"}'))
    assert json.loads((await read_frames(stream, 1))[0][1]) == {"type": "pong"}
