"""One fix to trio-websocket, applied on import (idempotent).

When wsproto fails a connection itself (invalid UTF-8 in a text frame: 1007; a
malformed frame: 1002), trio-websocket 0.12 drops the TCP connection without sending the
close frame, so the peer never learns why. RFC 6455 allows that, but our SPEC promises
the code: send the close frame first, then let trio-websocket finish as before.
`tests/test_limits.py::test_invalid_utf8_closes_1007` fails if this stops working.
"""

from __future__ import annotations

from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection

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
