"""Additions to trio-websocket: two changes applied on import (idempotent), a batched
send, the server side of a connection's handshake, and reading in the handler's task.

`handle_connection(server, stream)`: what `WebSocketServer` does with an accepted stream
(trio-websocket 0.12's `_handle_connection`, same steps), except that a client that
closes before its handshake request is complete releases the descriptor at once: in
trio-websocket it is held until `connect_timeout`, so a burst of abandoned handshakes
kept the process out of descriptors for that long.
`tests/test_http_attacks.py::test_abandoned_ws_handshakes_release_at_once` fails if this stops working.

`read_message(ws)`: a connection answered by `_wshandshake` (every usual client) has no
reader task: its handler reads frames itself, with trio-websocket's own event handlers
for pings, pongs and closes, and `close(ws)` reads on until the peer answers a close.
trio-websocket's reader task and queue cost a task switch per message (reader, then
handler) and a task per connection; a relay of small messages in one room ran 2.1x
faster without them (docs/PERFORMANCE.md). It also means nothing reads while the handler handles a
frame: a connection's bytes after its register wait unparsed, which is what lets
`_wsmove` hand it to another process without stopping anything. Requests that wsproto
answers (`fast_key` refused them) keep trio-websocket's reader and `get_message`.

`send_many(ws, texts)`: frames that wait in a peer's outbox together go out in one
`send_all` (one syscall) instead of one each, under the stream lock taken without a
schedule point when it is free (`_nowait`). It uses the connection's wsproto state,
stream and stream lock exactly as trio-websocket's own `_send` does; where those
internals are missing (another trio-websocket version) it falls back to `send_message`.

When wsproto fails a connection itself (invalid UTF-8 in a text frame: 1007; a
malformed frame: 1002), trio-websocket 0.12 drops the TCP connection without sending the
close frame, so the peer never learns why. RFC 6455 allows that, but our SPEC promises
the code: send the close frame first, then let trio-websocket finish as before.
`tests/test_limits.py::test_invalid_utf8_closes_1007` fails if this stops working.

The reader task (trio-websocket 0.12's `_reader_task`, same steps in the same order)
with two memory fixes, since an idle registered peer is what a server holds most of:
- trio-websocket's loop keeps its last event and last received chunk bound while it
  waits for the next one: an idle peer's register frame (with its id_token, a kilobyte or
  more, twice: the bytes and the decoded text) stayed alive as long as the peer stayed
  quiet. Ours lets go of both before it waits.
- trio-websocket builds a dict of nine bound methods per connection to dispatch events;
  ours looks the handler up by name on a shared table.
`read_message` shares its handler table and `_receive`, and returns from its loop with
the message, so it holds nothing either. Only installed, and only read inline, on the
trio-websocket versions it was read against (`_READER_FOR`);
`tests/test_limits.py::test_idle_connection_keeps_no_frame` fails if it stops working.
"""

from __future__ import annotations

from collections.abc import Awaitable

import trio
import trio_websocket
import wsproto.utilities
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, WebSocketServer

from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from . import _nowait as nowait
from ._wshandshake import MAX_HEAD, accept_response, fast_key

# frames read ahead per connection: a few mean fewer task switches between
# trio-websocket's reader and ours under load (every connection, moved ones too)
MESSAGE_QUEUE_SIZE = 8
DISCONNECT_TIMEOUT = 2.0  # seconds a closing connection waits for the peer's close frame

_original = WebSocketConnection._handle_close_connection_event


async def _handle_close_connection_event(self: WebSocketConnection, event: CloseConnection) -> None:
    if self._wsproto.state == ConnectionState.OPEN:  # failed locally, not closed by the peer
        try:
            await self._send(CloseConnection(code=event.code, reason=(event.reason or "")[:120]))
        except (ConnectionClosed, OSError, Exception):  # the peer may be gone already
            pass
    await _original(self, event)


_READER_FOR = {"0.12.0", "0.12.1", "0.12.2"}
_HANDLERS = {
    AcceptConnection: "_handle_accept_connection_event",
    BytesMessage: "_handle_message_event",
    CloseConnection: "_handle_close_connection_event",
    Ping: "_handle_ping_event",
    Pong: "_handle_pong_event",
    RejectConnection: "_handle_reject_connection_event",
    RejectData: "_handle_reject_data_event",
    Request: "_handle_request_event",
    TextMessage: "_handle_message_event",
}


async def _reader_task(self: WebSocketConnection) -> None:
    """trio-websocket's reader task, holding nothing between frames (see above)."""
    if self._initial_request:  # clients initiate the opening handshake
        try:
            await self._send(self._initial_request)
        except ConnectionClosed:
            self._reader_running = False
    async with self._send_channel:
        while self._reader_running:
            await _handle_events(self)
            if not await _receive(self):
                break


async def _handle_events(self: WebSocketConnection) -> None:
    for event in self._wsproto.events():
        name = _HANDLERS.get(type(event))
        if name is None:
            continue  # (trio-websocket logs a warning; wsproto has no other events)
        try:
            await getattr(self, name)(event)
        except ConnectionClosed:
            self._reader_running = False
            return


async def _receive(self: WebSocketConnection) -> bool:
    """Feed wsproto the next bytes; False when the stream has ended."""
    try:
        data = await self._stream.receive_some(self._receive_buffer_size)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await self._abort_web_socket()
        return False
    if len(data) == 0:  # TCP closed (before the WebSocket, if not CLOSED: abnormal)
        if self._wsproto.state != ConnectionState.CLOSED:
            await self._abort_web_socket()
        return False
    if self._wsproto.state != ConnectionState.CLOSED:
        try:
            self._wsproto.receive_data(data)
        except wsproto.utilities.RemoteProtocolError as err:
            if err.event_hint:
                await self._send(err.event_hint)
            await self._close_stream()
    return True


def reads_inline(ws: WebSocketConnection) -> bool:
    """True for a connection read with `read_message` (no reader task, no queue)."""
    return ws.__dict__.get("_st_inline", False)


def let_go(ws: WebSocketConnection) -> None:
    """Another process has this connection's socket now: close nothing of it here."""
    ws._st_moved = True  # type: ignore[attr-defined]


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


async def close(ws: WebSocketConnection, code: int = 1000, reason: str | None = None) -> None:
    """`aclose`, also for a connection read inline: the close frame, then the peer's
    messages read (and dropped) until its close answers ours, as a reader task would;
    the stream closed in any case."""
    if not reads_inline(ws):
        await ws.aclose(code, reason)
        return
    try:
        if ws._close_reason is None and ws._wsproto.state == ConnectionState.OPEN:
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
    if trio_websocket.__version__ in _READER_FOR:
        WebSocketConnection._reader_task = _reader_task  # type: ignore[method-assign]
    WebSocketConnection._signaling_trio_fix = True  # type: ignore[attr-defined]


_CAN_BATCH = all(hasattr(WebSocketConnection, a) for a in ("_send", "_abort_web_socket"))


async def send_many(ws: WebSocketConnection, texts: list[str]) -> None:
    if not _CAN_BATCH or not hasattr(ws, "_wsproto"):
        for text in texts:
            await ws.send_message(text)
        return
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    await send_raw(ws, b"".join([ws._wsproto.send(TextMessage(data=text)) for text in texts]))


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


_ABANDONED = object()  # the handshake "request" of a client that closed before sending one


async def handle_connection(server: WebSocketServer, stream: trio.SocketStream) -> None:
    if trio_websocket.__version__ not in _READER_FOR:
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
        connection = open_connection(stream, head[end:], message_queue_size=server._message_queue_size,
                                     max_message_size=server._max_message_size)
        await serve_then_close(connection, server._handler(_Accepted(connection, accept_response(key))),
                               server._disconnect_timeout)
        return
    async with trio.open_nursery() as nursery:  # anything else: wsproto reads it and decides
        connection = WebSocketConnection(
            stream, WSConnection(ConnectionType.SERVER), message_queue_size=server._message_queue_size,
            max_message_size=server._max_message_size, receive_buffer_size=server._receive_buffer_size)
        connection._wsproto.receive_data(head)
        nursery.start_soon(_read_then_give_up, connection)  # (trio-websocket's reader, from here on)
        request = None
        with nowait.within(server._connect_timeout):
            request = await connection._get_request()
        if request is None or request is _ABANDONED:
            nursery.cancel_scope.cancel()
            await stream.aclose()
            return
        await serve_then_close(connection, server._handler(request), server._disconnect_timeout)


async def serve_then_close(ws: WebSocketConnection, handler: Awaitable[None], timeout: float) -> None:
    """The connection's handler, then its close (the peer's answer awaited for `timeout`
    at most), unless it moved to another process (`let_go`)."""
    try:
        await handler
    finally:
        if not ws.__dict__.get("_st_moved"):
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


def open_connection(stream: trio.SocketStream, leftover: bytes, *, message_queue_size: int,
                    max_message_size: int) -> WebSocketConnection:
    """A server connection past its handshake: OPEN, no extensions (trio-websocket
    negotiates none), `leftover` received and not yet parsed; read inline (`read_message`)."""
    wsc = WSConnection(ConnectionType.SERVER)
    wsc.connection = WsprotoConnection(ConnectionType.SERVER, extensions=[], trailing_data=leftover)
    ws = WebSocketConnection(stream, wsc, path="/", message_queue_size=message_queue_size,
                             max_message_size=max_message_size)
    ws._connection_proposal = None
    ws._st_inline = True  # type: ignore[attr-defined]
    return ws


async def _read_then_give_up(connection: WebSocketConnection) -> None:
    await connection._reader_task()
    proposal = connection._connection_proposal
    if proposal is not None and not proposal._value_event.is_set():
        proposal.set_value(_ABANDONED)  # type: ignore[arg-type]
