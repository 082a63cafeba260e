"""A bare WebSocket client on a raw trio socket, for misbehaving on purpose: never
answering pings, sending invalid UTF-8, oversize handshakes."""

from __future__ import annotations

import os
import struct

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request


async def raw_connect(port: int, *, extra_headers: list[tuple[bytes, bytes]] | None = None,
                      rcvbuf: int | None = None) -> trio.SocketStream:
    """Connected and upgraded; `rcvbuf` fixes the socket's receive buffer (no autotuning),
    for a reader whose pace, not the kernel's buffers, should decide the server's writes."""
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target="/", extra_headers=extra_headers or [])))
    with trio.fail_after(5):
        while True:
            data = await stream.receive_some(65536)
            assert data, "server closed during handshake"
            ws.receive_data(data)
            if any(isinstance(e, AcceptConnection) for e in ws.events()):
                return stream


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One masked client frame (FIN set unless `fin` is False: a message's first frames)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_until_closed(stream: trio.SocketStream, timeout: float = 5) -> tuple[bytes, int | None]:
    """Read everything until EOF; return the bytes and the close code of a close frame in them."""
    buf = b""
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not data:
                break
            buf += data
    codes = [struct.unpack("!H", payload[:2])[0]
             for op, payload in server_frames(buf) if op == 0x8 and len(payload) >= 2]
    return buf, codes[-1] if codes else None


def server_frames(buf: bytes) -> list[tuple[int, bytes]]:
    """The (opcode, payload) of the server's (unmasked) frames in `buf`, as far as complete."""
    frames, i = [], 0
    while i + 2 <= len(buf):
        op, n, j = buf[i] & 0x0F, buf[i + 1] & 0x7F, i + 2
        if n == 126:
            n, j = struct.unpack("!H", buf[j:j + 2])[0], j + 2
        elif n == 127:
            n, j = struct.unpack("!Q", buf[j:j + 8])[0], j + 8
        if j + n > len(buf):
            break
        frames.append((op, buf[j:j + n]))
        i = j + n
    return frames


async def read_frames(stream: trio.SocketStream, count: int, timeout: float = 5) -> list[tuple[int, bytes]]:
    """Read until the server has sent `count` whole frames; return those read."""
    buf = b""
    with trio.fail_after(timeout):
        while len(server_frames(buf)) < count:
            data = await stream.receive_some(65536)
            assert data, "closed early"
            buf += data
    return server_frames(buf)
