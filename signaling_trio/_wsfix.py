"""Additions to trio-websocket: two changes applied on import (idempotent), a batched
send, and the server side of a connection's handshake.

`handle_connection(server, stream)`: what `WebSocketServer` does with an accepted stream
(trio-websocket 0.12's `_handle_connection`, same steps), except that a client that
closes before its handshake request is complete releases the descriptor at once: in
trio-websocket it is held until `connect_timeout`, so a burst of abandoned handshakes
kept the process out of descriptors for that long.
`tests/test_http_attacks.py::test_abandoned_ws_handshakes_release_at_once` fails if this stops working.

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
Only installed on the trio-websocket versions it was read against (`_READER_FOR`);
`tests/test_limits.py::test_idle_connection_keeps_no_frame` fails if it stops working.
"""

from __future__ import annotations

import trio
import trio_websocket
import wsproto.utilities
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketServer

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
    """Feed wsproto the next bytes; False when the stream has ended (or the reader was
    stopped to move the connection to another process: `_wsmove`)."""
    freeze = self.__dict__.get("_st_freeze")
    try:
        if freeze is None:
            data = await self._stream.receive_some(self._receive_buffer_size)
        else:
            data = await freeze.receive(self)
            if data is None:
                return False
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
    async with trio.open_nursery() as nursery:
        if key is not None:  # the usual request: answered here (_wshandshake)
            connection = open_connection(stream, head[end:], message_queue_size=server._message_queue_size,
                                         max_message_size=server._max_message_size)
            request: object = _Accepted(connection, accept_response(key), nursery)
        else:  # anything else: wsproto reads it (from the bytes already read) and decides
            connection = WebSocketConnection(
                stream, WSConnection(ConnectionType.SERVER), message_queue_size=server._message_queue_size,
                max_message_size=server._max_message_size, receive_buffer_size=server._receive_buffer_size)
            connection._wsproto.receive_data(head)
            nursery.start_soon(_read_then_give_up, connection)
            request = None
            with nowait.within(server._connect_timeout):
                request = await connection._get_request()
            if request is None or request is _ABANDONED:
                nursery.cancel_scope.cancel()
                await stream.aclose()
                return
        try:
            await server._handler(request)
        finally:
            freeze = connection.__dict__.get("_st_freeze")
            if freeze is None or not freeze.moved:  # (a moved connection is another process's now)
                with nowait.within(server._disconnect_timeout):
                    await connection.aclose()
            else:
                nursery.cancel_scope.cancel()


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
    request answered by _wshandshake: accept sends the 101, then starts the reader."""

    def __init__(self, ws: WebSocketConnection, response: bytes, nursery: trio.Nursery) -> None:
        self.ws, self.response, self.nursery = ws, response, nursery

    async def accept(self) -> WebSocketConnection:
        ws = self.ws
        await send_raw(ws, self.response)
        ws._open_handshake.set()
        self.nursery.start_soon(_reader_task, ws)
        return ws


def open_connection(stream: trio.SocketStream, leftover: bytes, *, message_queue_size: int,
                    max_message_size: int) -> WebSocketConnection:
    """A server connection past its handshake: OPEN, no extensions (trio-websocket
    negotiates none), `leftover` received and not yet parsed. Its reader is not started."""
    wsc = WSConnection(ConnectionType.SERVER)
    wsc.connection = WsprotoConnection(ConnectionType.SERVER, extensions=[], trailing_data=leftover)
    ws = WebSocketConnection(stream, wsc, path="/", message_queue_size=message_queue_size,
                             max_message_size=max_message_size)
    ws._connection_proposal = None
    return ws


async def _read_then_give_up(connection: WebSocketConnection) -> None:
    await connection._reader_task()
    proposal = connection._connection_proposal
    if proposal is not None and not proposal._value_event.is_set():
        proposal.set_value(_ABANDONED)  # type: ignore[arg-type]
