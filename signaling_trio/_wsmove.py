"""Moving an open WebSocket to another process: stop reading at a frame boundary, take
what was read but not yet handled, and rebuild the connection on the other side.

Owns: `Freeze` (installed on a connection that may move: its reader's receives can be
interrupted without losing a byte), `freeze` (stop, collect the queued messages and the
bytes wsproto holds unparsed), `thaw` (not movable after all: read on, nothing lost),
`adopt` (a WebSocketConnection in the OPEN state around a received socket) and
`serve_adopted` (its reader task and handler, as `_wsfix.handle_connection` runs them).
Never touches: descriptors between processes (`_handoff`), what the messages mean.

What moves: nothing but bytes. trio-websocket negotiates no extension (no compression
state), a server's frames need no masking state, and between frames wsproto holds only
unparsed input. A connection in the middle of a fragmented message, or with events not
yet handled, is not at a boundary: it is thawed and served where it is.
Read against trio-websocket 0.12 and wsproto 1.2/1.3, like `_wsfix` (`MOVABLE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
import trio_websocket
from trio_websocket import WebSocketConnection
from wsproto.connection import ConnectionState

from . import _nowait as nowait
from ._wsfix import _READER_FOR, _reader_task, open_connection

MOVABLE = trio_websocket.__version__ in _READER_FOR
FREEZE_TIMEOUT = 2.0


class Freeze:
    """Installed as `ws._st_freeze` (read by `_wsfix._receive`) while a move may come."""

    __slots__ = ("requested", "stopped", "scope", "moved")

    def __init__(self) -> None:
        self.requested = False
        self.stopped = False
        self.scope: trio.CancelScope | None = None
        self.moved = False  # the other process has it: close nothing here

    async def receive(self, ws: WebSocketConnection) -> bytes | None:
        """The next bytes, or None once a freeze is requested (no byte is lost: a receive
        cancelled while it waits has taken nothing)."""
        if not self.requested:
            with trio.CancelScope() as self.scope:
                data: bytes = await ws._stream.receive_some(ws._receive_buffer_size)
                return data
            self.scope = None
        self.stopped = True
        return None


@dataclass(frozen=True, slots=True)
class Frozen:
    queued: list[str | bytes]  # messages read and assembled, not yet handled, in order
    leftover: bytes | None  # bytes received, not yet parsed; None: not between frames (thaw it)


def install(ws: WebSocketConnection) -> None:
    if MOVABLE:
        ws._st_freeze = Freeze()  # type: ignore[attr-defined]


def uninstall(ws: WebSocketConnection) -> None:
    """No move will come: the reader goes back to plain receives."""
    ws.__dict__.pop("_st_freeze", None)


async def freeze(ws: WebSocketConnection) -> Frozen | None:
    """Stop the reader and take its state; None when the connection is closing (or the
    reader did not stop within FREEZE_TIMEOUT): serve it here, as it ends."""
    fz = ws.__dict__.get("_st_freeze")
    if fz is None:
        return None
    fz.requested = True
    if fz.scope is not None:
        fz.scope.cancel()
    queued: list[str | bytes] = []
    with nowait.within(FREEZE_TIMEOUT):
        try:
            while True:  # (draining lets a reader blocked on a full queue reach its stop)
                queued.append(await ws._recv_channel.receive())
        except (trio.EndOfChannel, trio.ClosedResourceError):
            pass
    if not fz.stopped or ws._close_reason is not None or ws._wsproto.state != ConnectionState.OPEN:
        return None
    return Frozen(queued, _at_boundary(ws))


def _at_boundary(ws: WebSocketConnection) -> bytes | None:
    """The unparsed bytes if the frozen connection is between frames and messages."""
    conn = ws._wsproto.connection
    if conn is None or conn._events or ws._message_parts:
        return None
    proto = conn._proto
    decoder = proto._frame_decoder
    if decoder.header is not None or proto._message_decoder.opcode is not None:
        return None
    return bytes(decoder.buffer.buffer[decoder.buffer.bytes_used:])


def thaw(ws: WebSocketConnection, frozen: Frozen, nursery: trio.Nursery) -> None:
    """Serve it here after all: a new queue (as long as the old one, and room for what
    was taken) with what was taken, and a new reader."""
    uninstall(ws)
    size = max(ws._recv_channel.statistics().max_buffer_size, len(frozen.queued))
    send, recv = trio.open_memory_channel[str | bytes](size)
    for message in frozen.queued:
        send.send_nowait(message)
    ws._send_channel, ws._recv_channel = send, recv
    nursery.start_soon(_reader_task, ws)


def adopt(stream: trio.SocketStream, leftover: bytes, *, message_queue_size: int,
          max_message_size: int) -> WebSocketConnection:
    """A connection another process accepted: OPEN, no extensions, `leftover` unparsed."""
    ws = open_connection(stream, leftover, message_queue_size=message_queue_size,
                         max_message_size=max_message_size)
    ws._open_handshake.set()
    return ws


async def serve_adopted(ws: WebSocketConnection, handler, disconnect_timeout: float = 2.0) -> None:  # noqa: ANN001
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_reader_task, ws)
        try:
            await handler(ws)
        finally:
            with nowait.within(disconnect_timeout):
                await ws.aclose()
            nursery.cancel_scope.cancel()
