"""Two additions to trio-websocket: a fix applied on import (idempotent), and a batched
send.

`send_many(ws, texts)`: frames that wait in a peer's outbox together go out in one
`send_all` (one syscall) instead of one each. It uses the connection's wsproto state,
stream and stream lock exactly as trio-websocket's own `_send` does; where those
internals are missing (another trio-websocket version) it falls back to `send_message`.

When wsproto fails a connection itself (invalid UTF-8 in a text frame: 1007; a
malformed frame: 1002), trio-websocket 0.12 drops the TCP connection without sending the
close frame, so the peer never learns why. RFC 6455 allows that, but our SPEC promises
the code: send the close frame first, then let trio-websocket finish as before.
`tests/test_limits.py::test_invalid_utf8_closes_1007` fails if this stops working.
"""

from __future__ import annotations

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, TextMessage

_original = WebSocketConnection._handle_close_connection_event


async def _handle_close_connection_event(self: WebSocketConnection, event: CloseConnection) -> None:
    if self._wsproto.state == ConnectionState.OPEN:  # failed locally, not closed by the peer
        try:
            await self._send(CloseConnection(code=event.code, reason=(event.reason or "")[:120]))
        except (ConnectionClosed, OSError, Exception):  # the peer may be gone already
            pass
    await _original(self, event)


if not getattr(WebSocketConnection, "_signaling_trio_fix", False):
    WebSocketConnection._handle_close_connection_event = _handle_close_connection_event  # type: ignore[method-assign]
    WebSocketConnection._signaling_trio_fix = True  # type: ignore[attr-defined]


_CAN_BATCH = all(hasattr(WebSocketConnection, a) for a in ("_send", "_abort_web_socket"))


async def send_many(ws: WebSocketConnection, texts: list[str]) -> None:
    if len(texts) == 1 or not _CAN_BATCH or not hasattr(ws, "_wsproto"):
        for text in texts:
            await ws.send_message(text)
        return
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    data = b"".join([ws._wsproto.send(TextMessage(data=text)) for text in texts])
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws._close_reason) from None
