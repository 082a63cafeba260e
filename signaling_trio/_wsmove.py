"""Moving an open WebSocket to another process: take what was received but not yet
parsed, and rebuild the connection on the other side.

Owns: `take` (the unparsed bytes of a connection at a frame boundary) and `adopt` (a
WebSocketConnection in the OPEN state around a received socket, read inline).
Never touches: descriptors between processes (`_handoff`), what the messages mean.

What moves: nothing but bytes. trio-websocket negotiates no extension (no compression
state), a server's frames need no masking state, and between frames wsproto holds only
unparsed input. Only a connection read inline (`_wsfix.read_message`) moves: while its
own task handles the register, nothing reads it, and the frames after the register wait
in wsproto's buffer (or the socket's) unparsed, so there is no reader to stop and no
queue to carry. A connection in any other state (closing, or in the middle of a
fragmented message) is served where it is.
Read against trio-websocket 0.12 and wsproto 1.2/1.3, like `_wsfix` (a connection is read
inline only on the versions `_wsfix` was read against).
"""

from __future__ import annotations

import trio
from trio_websocket import WebSocketConnection
from wsproto.connection import ConnectionState

from ._wsfix import open_connection, reads_inline


def take(ws: WebSocketConnection) -> bytes | None:
    """The bytes received and not yet parsed, if `ws` can move now (read inline, open,
    between frames and messages); else None: serve it here."""
    if not reads_inline(ws) or ws._close_reason is not None:
        return None
    conn = ws._wsproto.connection
    if ws._wsproto.state != ConnectionState.OPEN or conn is None or conn._events or ws._message_parts:
        return None
    proto = conn._proto
    decoder = proto._frame_decoder
    if decoder.header is not None or proto._message_decoder.opcode is not None:
        return None
    return bytes(decoder.buffer.buffer[decoder.buffer.bytes_used:])


def adopt(stream: trio.SocketStream, leftover: bytes, *, max_message_size: int) -> WebSocketConnection:
    """A connection another process accepted: OPEN, no extensions, `leftover` unparsed,
    read inline."""
    ws = open_connection(stream, leftover, max_message_size=max_message_size)
    ws._open_handshake.set()
    return ws
