"""Additions to trio-websocket: a change applied on import (idempotent), a batched send,
the server side of a connection's handshake, and reading in the handler's own task.
Read against trio-websocket 0.12 and wsproto 1.2/1.3 (`_READ_AGAINST`: on any other
trio-websocket version, `handle_connection` is trio-websocket's own, reader task and all).

`handle_connection(server, stream)`: what `WebSocketServer` does with an accepted stream
(trio-websocket 0.12's `_handle_connection`), except that:
- a client that closes before its handshake request is complete releases the descriptor
  at once: in trio-websocket it is held until `connect_timeout`, so a burst of abandoned
  handshakes kept the process out of descriptors for that long
  (`tests/test_http_attacks.py::test_abandoned_ws_handshakes_release_at_once`);
- the usual request is answered by `_wshandshake`; anything else by wsproto, read in the
  same task (`_read_request`), which refuses what it refuses as before;
- no reader task and no message queue: the handler reads with `read_message`.

`read_message(ws)`: frames read, fed to wsproto and handled in the handler's task, with
trio-websocket's own event handlers for pings, pongs and closes (and its 1009 past the
size limit); `close(ws)` sends the close frame and reads on until the peer answers, as
the reader task did. trio-websocket's reader task and queue cost a task switch per
message (reader, then handler) and a task per connection; a relay of small messages in
one room ran 2.1x faster without them (docs/PERFORMANCE.md). And nothing reads while
the handler handles a frame: a connection's bytes after its register wait unparsed,
which is what lets `_wsmove` hand it to another process without stopping anything.
An idle peer holds no frame: `read_message` returns from its loop with the message and
keeps no chunk or event bound while it waits (trio-websocket's reader kept an idle peer's
register frame, id_token and all, twice: bytes and text;
`tests/test_limits.py::test_idle_connection_keeps_no_frame` fails if that comes back).

`send_now(ws, text)`: a frame written at once from whichever task delivers it, when the
socket has room and nobody else is writing. `send_front(ws, outbox, n)`: frames that wait
in a peer's outbox together go out in one write (one syscall) instead of one each, under
the stream lock taken without a schedule point when it is free (`_nowait`), the rest of
a write kept first in the outbox so that a close never follows part of a frame. Both
use the connection's wsproto state, stream and stream lock as trio-websocket's own
`_send` does; where those internals are missing (another trio-websocket version) the
writer falls back to `send_message` and `send_now` does not try.

When wsproto fails a connection itself (invalid UTF-8 in a text frame: 1007; a
malformed frame: 1002), trio-websocket 0.12 drops the TCP connection without sending the
close frame, so the peer never learns why. RFC 6455 allows that, but our SPEC promises
the code: send the close frame first, then let trio-websocket finish as before.
`tests/test_limits.py::test_invalid_utf8_closes_1007` fails if this stops working.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio_websocket
import wsproto.utilities
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketRequest, WebSocketServer

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from . import _nowait as nowait
from ._wshandshake import MAX_HEAD, accept_response, fast_key

DISCONNECT_TIMEOUT = 2.0  # seconds a closing connection waits for the peer's close frame
# A write counts as progress (the stalled-reader timer starts again) once the socket has
# taken this much of it: a peer reading a little at a time would otherwise keep a full
# outbox (256 frames of up to --max-frame-bytes) alive as long as it liked. At the
# default timeout (10 s) a peer must read 100 kB/s while more than this waits for it.
PROGRESS_BYTES = 1 << 20

_original = WebSocketConnection._handle_close_connection_event


async def _handle_close_connection_event(self: WebSocketConnection, event: CloseConnection) -> None:
    if self._wsproto.state == ConnectionState.OPEN:  # failed locally, not closed by the peer
        try:
            await self._send(CloseConnection(code=event.code, reason=(event.reason or "")[:120]))
        except (ConnectionClosed, OSError, Exception):  # the peer may be gone already
            pass
    await _original(self, event)


_READ_AGAINST = {"0.12.0", "0.12.1", "0.12.2"}  # the trio-websocket versions this module was read against
# what an open connection's events call (messages are put together by `_assemble`)
_HANDLERS = {
    CloseConnection: "_handle_close_connection_event",
    Ping: "_handle_ping_event",
    Pong: "_handle_pong_event",
}


async def _receive(ws: WebSocketConnection) -> bool:
    """Feed wsproto the next bytes; False when the stream has ended (or wsproto refused
    the bytes and it was closed)."""
    try:
        data = await ws._stream.receive_some(ws._receive_buffer_size)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await ws._abort_web_socket()
        return False
    if len(data) == 0:  # TCP closed (before the WebSocket, if not CLOSED: abnormal)
        if ws._wsproto.state != ConnectionState.CLOSED:
            await ws._abort_web_socket()
        return False
    if ws._wsproto.state != ConnectionState.CLOSED:
        return await _feed(ws, data)
    return True


async def _feed(ws: WebSocketConnection, data: bytes) -> bool:
    """`data` to wsproto; False when it refused them (its answer sent, if it has one, and
    the stream closed), as trio-websocket's reader does."""
    try:
        ws._wsproto.receive_data(data)
    except wsproto.utilities.RemoteProtocolError as err:
        if err.event_hint:
            await ws._send(err.event_hint)
        await ws._close_stream()
        return False
    return True


def _read_inline(ws: WebSocketConnection) -> None:
    ws._st_inline = True  # type: ignore[attr-defined]


def reads_inline(ws: WebSocketConnection) -> bool:
    """True for a connection read with `read_message` (no reader task, no queue): every
    server connection `handle_connection` serves."""
    return ws.__dict__.get("_st_inline", False)


def let_go(ws: WebSocketConnection) -> None:
    """Another process has this connection's socket now: close nothing of it here."""
    ws._st_moved = True  # type: ignore[attr-defined]
    ws._reader_running = False  # (read_message parses no frame more here: they are the sibling's)


def moved_away(ws: WebSocketConnection) -> bool:
    """True once `let_go`: the connection is another process's."""
    return ws.__dict__.get("_st_moved", False)


async def read_message(ws: WebSocketConnection) -> str | bytes:
    """The next message, read in the caller's own task: what trio-websocket's reader task
    and `get_message` do together, without the task switch between them per message.
    Ping, pong and close frames are handled as the reader task handles them.
    Raises ConnectionClosed once the connection has ended."""
    message = await _next_message(ws)
    if message is None:
        raise ConnectionClosed(ws._close_reason)
    return message


async def _next_message(ws: WebSocketConnection) -> str | bytes | None:
    """Events handled until a whole message (returned) or the connection's end (None)."""
    while ws._reader_running:
        for event in ws._wsproto.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                message = await _assemble(ws, event)  # type: ignore[arg-type]
                if message is not None:
                    return message
            elif (name := _HANDLERS.get(kind)) is not None:
                try:
                    await getattr(ws, name)(event)
                except ConnectionClosed:
                    return None
            if not ws._reader_running:
                return None
        if not await _receive(ws):
            return None
    return None


async def _assemble(ws: WebSocketConnection, event: TextMessage | BytesMessage) -> str | bytes | None:
    """A message's frames put together (None until its last), within max_message_size;
    past it, trio-websocket's own handler closes the connection with 1009."""
    data = event.data
    size = ws._message_size + len(data)
    if size > ws._max_message_size:
        await ws._handle_message_event(event)  # (stops reading: _reader_running is False)
        return None
    if not event.message_finished:
        ws._message_size = size
        ws._message_parts.append(data)
        return None
    if not ws._message_parts:
        return data
    parts, ws._message_parts, ws._message_size = ws._message_parts, [], 0
    parts.append(data)
    return b"".join(parts) if isinstance(data, (bytes, bytearray)) else "".join(parts)


async def close(ws: WebSocketConnection, code: int = 1000, reason: str | None = None,
                unsent: list[str | bytes] | None = None) -> None:
    """`aclose`, also for a connection read inline: the close frame, then the peer's
    messages read (and dropped) until its close answers ours, as a reader task would;
    the stream closed in any case.

    `unsent` is the connection's outbox. When it begins with the rest of a write begun
    (bytes: `send_front`), that rest goes out first, since a close frame after part of a
    frame would be read as that frame's payload. When the rest cannot be written (the
    stream broke, or the caller's deadline passed: a peer that stopped reading), there
    is no close frame: the stream is cut, as a network fault would cut it (1006)."""
    try:
        if unsent and type(unsent[0]) is bytes:
            try:
                await send_front(ws, unsent, 1)
            finally:
                if unsent and type(unsent[0]) is bytes:
                    await ws._abort_web_socket()  # (marks it closed; the stream closes below)
        if not reads_inline(ws):
            await ws.aclose(code, reason)
        elif ws._close_reason is None and ws._wsproto.state == ConnectionState.OPEN:
            ws._close_reason = CloseReason(1000, None)
            await ws._send(CloseConnection(code=code, reason=reason))
            while not ws._close_handshake.is_set() and await _next_message(ws) is not None:
                pass
    except ConnectionClosed:
        pass
    finally:
        await ws._close_stream()


if not getattr(WebSocketConnection, "_signaling_trio_fix", False):
    WebSocketConnection._handle_close_connection_event = _handle_close_connection_event  # type: ignore[method-assign]
    WebSocketConnection._signaling_trio_fix = True  # type: ignore[attr-defined]


_CAN_BATCH = all(hasattr(WebSocketConnection, a) for a in ("_send", "_abort_web_socket"))


def _frames(ws: WebSocketConnection, texts: list[str | bytes]) -> bytes:
    """`texts` framed as text messages, one after another; a bytes item is the rest of a
    write `send_now` began, and goes out as it is."""
    to_frame = ws._wsproto.send
    return b"".join([t if type(t) is bytes else to_frame(TextMessage(data=t)) for t in texts])


async def send_front(ws: WebSocketConnection, outbox: list[str | bytes], batch: int,
                     progressed: Callable[[], None] | None = None) -> None:
    """The writer's next write: `outbox[0]` when it is the bytes rest of a write begun,
    else up to `batch` frames (`_frames`) in one; written under the stream lock as the
    socket takes it, waiting for the socket as long as it takes. Until all of it is out,
    `outbox[0]` is exactly what is not yet written, so a writer cancelled in the middle
    leaves the rest where `close` finds it. `progressed()` runs each time another
    PROGRESS_BYTES went out (the stalled-reader timer counts from the last progress, not
    from the first try).
    A broken stream aborts the connection: ConnectionClosed."""
    stream = ws._stream
    if not _CAN_BATCH or type(stream) is not trio.SocketStream:
        texts = outbox[:batch]  # (send_now never leaves bytes here: it did not try)
        del outbox[:batch]
        for text in texts:
            await ws.send_message(text)
        return
    if moved_away(ws) or ws._close_reason and type(outbox[0]) is not bytes:
        raise ConnectionClosed(ws._close_reason)
    await trio.lowlevel.checkpoint_if_cancelled()  # (a writer cancelled begins no write)
    lock = ws._stream_lock
    await nowait.acquire(lock)
    try:
        if type(outbox[0]) is not bytes:
            texts = outbox[:batch]
            outbox[:len(texts)] = [_frames(ws, texts)]
        sock = stream.socket
        taken = 0
        while True:
            data = outbox[0]
            try:
                sent = sock._sock.send(data)  # type: ignore[attr-defined]
            except BlockingIOError:
                sent = 0
            except OSError:
                await ws._abort_web_socket()
                raise ConnectionClosed(ws._close_reason) from None
            if sent == len(data):
                del outbox[0]
                break
            if sent:
                outbox[0] = data[sent:]
                taken += sent
                if taken >= PROGRESS_BYTES and progressed is not None:
                    taken = 0
                    progressed()
            try:
                await sock.wait_writable()
            except trio.ClosedResourceError:
                await ws._abort_web_socket()
                raise ConnectionClosed(ws._close_reason) from None
    finally:
        lock.release()
    await trio.lowlevel.cancel_shielded_checkpoint()  # (with the one above, a checkpoint)


def send_now(ws: WebSocketConnection, texts: list[str | bytes]) -> bytes | None:
    """`texts` (`_frames`) in one write at once, without waiting, when nobody else is
    writing (the stream lock is free) and the connection is open. Returns the bytes the
    socket did not take (b"" when it took all; the caller sends the rest before anything
    else), or None when it did not try (the caller sends `texts` as usual).

    Why: frames for a peer whose socket has room (nearly always) then cost no task
    switch; the writer task runs only when the socket is full or others are writing.
    It writes what trio-websocket's `_send` would, under the same exclusion: every other
    write takes the stream lock, which is free here, and nothing awaits between the
    check and the write."""
    stream = ws._stream
    if (not _CAN_BATCH or type(stream) is not trio.SocketStream or ws._close_reason or ws._stream_lock.locked()
            or moved_away(ws) or ws._wsproto.state is not ConnectionState.OPEN):
        return None
    data = _frames(ws, texts)
    try:
        sent = stream.socket._sock.send(data)  # trio sockets are non-blocking  # type: ignore[attr-defined]
    except OSError:  # full (BlockingIOError), or broken: the writer's send_all finds out which
        sent = 0
    return data[sent:]


async def send_raw(ws: WebSocketConnection, data: bytes) -> None:
    """Bytes onto the connection's stream, as trio-websocket's own `_send` writes them
    (its stream lock; a broken stream aborts the connection: ConnectionClosed)."""
    lock = ws._stream_lock
    await nowait.acquire(lock)
    try:
        await ws._stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await ws._abort_web_socket()
        raise ConnectionClosed(ws._close_reason) from None
    finally:
        lock.release()



async def handle_connection(server: WebSocketServer, stream: trio.SocketStream) -> None:
    if trio_websocket.__version__ not in _READ_AGAINST:
        await server._handle_connection(stream)
        return
    head = b""
    with nowait.within(server._connect_timeout):
        head = await _read_head(stream)
    if not head:
        return  # closed, or nothing in time: the caller closes the stream
    end = head.find(b"\r\n\r\n") + 4
    key = fast_key(head[:end]) if end >= 4 else None
    if key is not None:  # the usual request: answered here (_wshandshake), read inline
        connection = open_connection(stream, head[end:], max_message_size=server._max_message_size)
        await serve_then_close(connection, server._handler(_Accepted(connection, accept_response(key))),
                               server._disconnect_timeout)
        return
    # anything else: wsproto reads it and decides (and the connection is read inline too)
    connection = WebSocketConnection(stream, WSConnection(ConnectionType.SERVER),
                                     max_message_size=server._max_message_size,
                                     receive_buffer_size=server._receive_buffer_size)
    _read_inline(connection)
    request = None
    with nowait.within(server._connect_timeout):
        request = await _read_request(connection, head)
    if request is None:
        return  # refused (wsproto's answer sent), closed, or not complete in time
    await serve_then_close(connection, server._handler(request), server._disconnect_timeout)


async def _read_request(ws: WebSocketConnection, head: bytes) -> WebSocketRequest | None:
    """The handshake request as wsproto reads it (from `head`, and more bytes if it needs
    them): the proposal the handler accepts, or None when wsproto refused it or the
    client left. Bytes after the request stay in wsproto for the open connection."""
    try:
        if await _feed(ws, head):
            while True:
                for event in ws._wsproto.events():
                    if isinstance(event, Request):
                        return WebSocketRequest(ws, event)
                if not await _receive(ws):
                    break
    except ConnectionClosed:  # (its refusal could not be sent)
        pass
    return None


async def serve_then_close(ws: WebSocketConnection, handler: Awaitable[None], timeout: float) -> None:
    """The connection's handler, then its close (the peer's answer awaited for `timeout`
    at most), unless it moved to another process (`let_go`)."""
    try:
        await handler
    finally:
        if not moved_away(ws):
            with nowait.within(timeout):
                await close(ws)


async def _read_head(stream: trio.SocketStream) -> bytes:
    """Bytes up to the end of the request's head (and whatever came with it), or all
    that came before the client closed or MAX_HEAD was passed."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
        try:
            data = await stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""
        if not data:
            return b""  # closed before its request was complete
        head += data
    return head


class _Accepted:
    """What `WebSocketRequest` is to the handler (`accept()` is all it calls), for a
    request answered by _wshandshake: accept sends the 101; no reader task is started,
    the handler reads with `read_message`."""

    def __init__(self, ws: WebSocketConnection, response: bytes) -> None:
        self.ws, self.response = ws, response

    async def accept(self) -> WebSocketConnection:
        ws = self.ws
        await send_raw(ws, self.response)
        ws._open_handshake.set()
        return ws


def open_connection(stream: trio.SocketStream, leftover: bytes, *, max_message_size: int) -> WebSocketConnection:
    """A server connection past its handshake: OPEN, no extensions (trio-websocket
    negotiates none), `leftover` received and not yet parsed; read inline (`read_message`)."""
    wsc = WSConnection(ConnectionType.SERVER)
    wsc.connection = WsprotoConnection(ConnectionType.SERVER, extensions=[], trailing_data=leftover)
    ws = WebSocketConnection(stream, wsc, path="/", max_message_size=max_message_size)
    ws._connection_proposal = None
    _read_inline(ws)
    return ws
