"""Serving WebSocket connections: a request accepted into a `Connection` and its
bookkeeping (the live set, the counters), and the one task that checks every live
connection's timers (`sweep_connections`). One connection's own handling is `_ws`'s.

Never touches: a room's state, credentials, the store.
"""

from __future__ import annotations

import contextlib

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest

from . import _log
from . import _nowait as nowait
from . import _ws
from ._ws import Connection, LiveConnections, WsContext
from .config import Settings

SWEEP_PERIOD = 1.0  # at most; shorter when a configured timeout is (see _sweep_period)
SWEEP_CHUNK = 512  # connections checked between checkpoints
SWEEP_WAKES = 32  # tasks woken (or started) between checkpoints


def _sweep_period(settings: Settings) -> float:
    return min(SWEEP_PERIOD, _ws.WRITER_LINGER / 2, settings.register_timeout / 4, settings.idle_ping_interval / 4,
               settings.stalled_reader_timeout / 4)


async def sweep_connections(live: LiveConnections, settings: Settings) -> None:
    """Every connection's timers (Connection.check_timers), a few times a second. It
    yields after every SWEEP_CHUNK connections checked and every SWEEP_WAKES tasks woken
    (20,000 writers lingering out together must not run as one scheduler batch: a probe's
    round trips would wait behind them)."""
    while True:
        await trio.sleep(_sweep_period(settings))
        checked = woken = 0
        now = trio.current_time()
        for conn in list(live.all):
            if conn.check_timers(now):
                woken += 1
            checked += 1
            if checked >= SWEEP_CHUNK or woken >= SWEEP_WAKES:
                await trio.lowlevel.checkpoint()
                checked = woken = 0
                now = trio.current_time()


async def handle_request(ctx: WsContext, request: WebSocketRequest) -> None:
    ws = None
    with nowait.within(10), contextlib.suppress(ConnectionClosed, OSError):
        ws = await request.accept()
    if ws is None:
        return  # gone, or the 101 was not taken in time
    conn = Connection(ctx, ws)
    await serve_connection(ctx, conn)


async def serve_connection(ctx: WsContext, conn: Connection) -> None:
    """A connection's life, with its bookkeeping (also for one moved to us: _handoff)."""
    metrics = ctx.metrics
    metrics.total_connections += 1
    metrics.active_connections += 1
    ctx.live.add(conn)
    try:
        await conn.run()
    except Exception:
        # A bug in one connection's handling must not reach the listener's nursery
        # (that would end the server): log it, and that connection alone is over.
        metrics.connection_crashes += 1
        _log.logger.exception("connection crashed", extra={"fields": {"conn": conn.id}})
    finally:
        ctx.live.discard(conn)
        metrics.active_connections -= 1
