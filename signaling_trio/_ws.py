"""The WebSocket side: one task tree per connection.

Owns: reading frames (size, rate, UTF-8, JSON shape), the connection's bounded outbox
and its writer, the register deadline, the stalled-reader cut-off and the idle
heartbeat; which connections are live (`LiveConnections`).
Never touches: a room's state (it sends commands to its room handle), credentials and
room records (registration is `_register.Registrar`'s).

Timers: a connection keeps timestamps, not cancel scopes. One server task,
`_wsserve.sweep_connections`, checks every connection's register deadline, stalled send, idle
silence and lingering writer a few times a second (`Connection.check_timers`): a cancel
scope per frame or per connection costs time and memory that this avoids
(docs/PERFORMANCE.md has the figures).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from . import _log
from . import _nowait as nowait
from ._actors import Leave, Message
from ._log import event
from ._metrics import Metrics
from ._register import Identity, MoveTo, Registrar, Registration
from ._wsfix import DISCONNECT_TIMEOUT, close, let_go, moved_away, read_message, reads_inline, send_front, send_now
from .config import Settings
from .protocol import errors as E
from .protocol.limits import TokenBucket
from .protocol.messages import ROOM_TYPES, decode, dumps
from .protocol.registration import parse_register


class LiveConnections:
    """The server's open connections (for the sweeper, and for shutdown to close them)."""

    def __init__(self) -> None:
        self.all: set[Connection] = set()
        self.drained = trio.Event()  # set when the last one ends

    def add(self, conn: "Connection") -> None:
        self.all.add(conn)

    def discard(self, conn: "Connection") -> None:
        self.all.discard(conn)
        if not self.all:
            self.drained.set()

    async def close_all(self, code: int, reason: str) -> None:
        """Ask every connection to close; return when all have ended."""
        if self.all:
            self.drained = trio.Event()
            for conn in list(self.all):
                conn.request_close(code, reason)
            await self.drained.wait()

    def __len__(self) -> int:
        return len(self.all)


@dataclass(frozen=True, slots=True)
class WsContext:
    """What every connection needs of the server."""

    settings: Settings
    metrics: Metrics
    registrar: Registrar
    live: LiveConnections
    observe_register: Callable[[float], None]  # seconds from a register frame to its answer
    # --workers: hand the connection to the sibling process that owns its room (_handoff);
    # True when the other process has it
    mover: Callable[["Connection", MoveTo, str], Awaitable[bool]] | None = None


_ids = itertools.count(1)

PONG = '{"type":"pong"}'
APP_PING = '{"type":"ping"}'
WRITE_BATCH = 64
WRITER_LINGER = 2.0  # seconds an idle writer task waits for more frames before it ends


class Connection:
    __slots__ = (
        "id", "ctx", "settings", "metrics", "ws", "_outbox", "_nursery", "_writer_token", "_parked",
        "_parked_at", "_send_since", "_pinging", "_register_by",
        "close_code", "close_reason", "registration", "identity",
        "_bucket", "_rate_error_at", "_last_rx", "_overflowing", "_next_app_ping", "arrival",
    )

    def __init__(self, ctx: WsContext, ws: WebSocketConnection) -> None:
        self.id = next(_ids)
        self.ctx = ctx
        self.settings = ctx.settings
        self.metrics = ctx.metrics
        self.ws = ws
        # frames for the writer task, which runs only while some wait (flush writes at once if it can)
        self._outbox: list[str | bytes] = []  # (an empty deque is 600 bytes; a list 56)
        self._nursery: trio.Nursery | None = None
        self._writer_token: object | None = None  # the running writer's, else None
        self._parked: Any = None  # the writer task while it waits for frames
        self._parked_at = 0.0  # since when
        self._send_since: float | None = None  # a send under way since (stalled-reader check)
        self._pinging = False
        self.close_code: int | None = None
        self.close_reason = ""
        # registration, owned by this connection's task
        self.registration: Registration | None = None  # the room it is in, and as whom
        self.identity: Identity | None = None  # the last credential it registered with
        # rate limit: a token bucket on trio's clock
        self._bucket = TokenBucket(self.settings.rate_limit, self.settings.rate_burst, trio.current_time())
        self._rate_error_at = -math.inf
        self._last_rx = trio.current_time()
        self._register_by = self._last_rx + self.settings.register_timeout
        self._next_app_ping = self._last_rx + self.settings.app_ping_interval
        self._overflowing = False
        self.arrival: Callable[[Connection], Awaitable[None]] | None = None  # handed to us: do this first

    def __repr__(self) -> str:
        return f"<Connection {self.id} peer={self.peer_id}>"

    @property
    def peer_id(self) -> str | None:
        return self.registration.peer_id if self.registration is not None else None

    @property
    def room_id(self) -> str | None:
        return self.registration.room_id if self.registration is not None else None

    # ------------------------------------------------ called by rooms (no awaits)
    def deliver(self, text: str) -> None:
        """A frame for this peer, written now if the socket takes it (`flush`)."""
        self.queue(text)
        self.flush()

    def queue(self, text: str) -> None:
        """A frame into the outbox, written at the next `flush` (a room queues what a batch
        of its commands says to each peer, then flushes each peer once: one write)."""
        if self._nursery is None:
            return  # not running (yet, or any more)
        outbox = self._outbox
        if len(outbox) >= self.settings.outbox_size:
            # Never wait on a slow reader: drop for it alone; the writer's stall timer
            # disconnects it if it stays stuck.
            self.metrics.outbox_overflows += 1
            if not self._overflowing:
                self._overflowing = True
                event(logging.WARNING, "outbox full", conn=self.id, peer_id=self.peer_id)
            return
        outbox.append(text)
        self._overflowing = False

    def flush(self) -> None:
        """What waits in the outbox: written at once when no writer is writing and the
        socket takes it (`_wsfix.send_now`); what it does not take is the writer's."""
        outbox, nursery = self._outbox, self._nursery
        if not outbox or nursery is None:
            return
        if self._writer_token is None or self._parked is not None:
            batch = outbox[:WRITE_BATCH]
            left = send_now(self.ws, batch)
            if left is not None:
                del outbox[:len(batch)]
                if left:
                    outbox.insert(0, left)  # the rest of a frame goes out first
                elif not outbox:
                    return
        if self._writer_token is None:
            self._start_writer(nursery)
        elif self._parked is not None:
            task, self._parked = self._parked, None
            trio.lowlevel.reschedule(task)

    def request_close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        nursery = self._nursery
        if nursery is not None:  # (before run() starts, it sees close_code and reads nothing)
            nursery.cancel_scope.cancel()

    def room_lost(self, room: Any) -> None:
        """The room no longer has this connection (a restore after a move was refused)."""
        if self.registration is not None and self.registration.room is room:
            self.registration = None

    # ------------------------------------------------------------- the task
    async def run(self) -> None:
        if _log.logger.isEnabledFor(logging.INFO):
            event(logging.INFO, "connect", conn=self.id, remote=_remote(self.ws))
        try:
            if self.close_code is None:
                # The nursery's cancel scope is also what request_close() cancels.
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    try:
                        if self.arrival is not None:
                            await self.arrival(self)
                        await self._reader()
                    finally:
                        self._nursery = None
                        nursery.cancel_scope.cancel()
        finally:
            if moved_away(self.ws):
                event(logging.INFO, "moved", conn=self.id)
            else:
                await self._closed()

    async def _closed(self) -> None:
        with trio.CancelScope(shield=True):
            await self.leave_room()
            code = self.close_code or E.CLOSE_NORMAL
            self.metrics.closes_by_code[code] += 1
            with nowait.within(DISCONNECT_TIMEOUT):
                await close(self.ws, code, self.close_reason or None, self._outbox)
        code = self.ws.closed.code if self.ws.closed else code
        event(logging.INFO, "disconnect", conn=self.id, peer_id=self.peer_id, room_id=self.room_id, code=code)

    async def _reader(self) -> None:
        """Reads frames, in this task (`_wsfix.read_message`; trio-websocket's own
        `get_message` on versions `_wsfix` was not read against). The timers are
        check_timers', called by the sweeper."""
        max_frame = self.settings.max_frame_bytes
        ws = self.ws
        read = read_message if reads_inline(ws) else type(ws).get_message  # (_wsfix)
        while True:
            data = None  # an idle connection keeps no frame alive (a register's id_token)
            try:
                data = await read(ws)
            except ConnectionClosed:
                return
            await self.handle_frame(data, max_frame)

    async def handle_frame(self, data: str | bytes, max_frame: int) -> None:
        """One frame read (or, for a moved connection, one read before the move)."""
        now = trio.current_time()
        self._last_rx = now
        if not self._take_token(now):
            return
        if not isinstance(data, str):
            self._error(E.ProtocolError(E.INVALID_MESSAGE, "binary frames are not accepted; send JSON text"))
            return
        if len(data) * 4 > max_frame and len(data.encode()) > max_frame:
            self._error(E.ProtocolError(E.MESSAGE_TOO_LARGE, f"frame is larger than {max_frame} bytes"))
            return
        try:
            msg = decode(data)
        except E.ProtocolError as exc:
            self._error(exc)
            return
        await self._dispatch(msg, data)

    def check_timers(self, now: float) -> bool:
        """The connection's deadlines, checked by the sweeper (no awaits). True when it
        woke or started a task (the sweeper lets those run before it wakes many more)."""
        nursery = self._nursery
        if nursery is None or self.close_code is not None:
            return False  # not running, or already closing
        settings = self.settings
        if self.identity is None and now >= self._register_by:
            event(logging.INFO, "register timeout", conn=self.id)
            self.metrics.register_timeouts += 1
            self.request_close(E.CLOSE_POLICY, "register timeout")
            return True
        if self._send_since is not None and now - self._send_since >= settings.stalled_reader_timeout:
            # a send made no progress for that long: the peer stopped reading
            event(logging.WARNING, "stalled reader", conn=self.id, peer_id=self.peer_id)
            self.metrics.stalled_readers += 1
            self.request_close(E.CLOSE_POLICY, "stalled reader")
            return True
        woke = False
        registration = self.registration
        if registration is not None and registration.sleap_rtc and now >= self._next_app_ping:
            # sleap-rtc workers reconnect after 90 s without a JSON ping (WebSocket pings
            # do not count for them); v1/v2 connections never get one
            self._next_app_ping = now + settings.app_ping_interval
            self.deliver(APP_PING)
            woke = True
        if not self._pinging and now - self._last_rx >= settings.idle_ping_interval:
            self._pinging = True
            nursery.start_soon(self._ping)
            woke = True
        if self._parked is not None and now - self._parked_at >= WRITER_LINGER:
            # lingered out: the writer, woken without its token, ends; the next
            # flush() starts a new one
            task, self._parked, self._writer_token = self._parked, None, None
            trio.lowlevel.reschedule(task)
            woke = True
        return woke

    async def _ping(self) -> None:
        """A WebSocket ping after silence; a close when no pong comes in time."""
        try:
            with nowait.within(self.settings.idle_ping_timeout) as waited:
                await self.ws.ping()
        except ConnectionClosed:
            return
        finally:
            self._pinging = False
        if waited.cancelled_caught:
            event(logging.INFO, "ping timeout", conn=self.id, peer_id=self.peer_id)
            self.metrics.ping_timeouts += 1
            self.request_close(E.CLOSE_POLICY, "ping timeout")
        else:
            self._last_rx = trio.current_time()

    async def _dispatch(self, msg: dict[str, Any], raw: str) -> None:
        mtype = msg["type"]
        if mtype == "ping":
            self.metrics.messages_by_type["ping"] += 1
            self.deliver(PONG)
        elif mtype == "register":
            await self._register(msg, raw)
        elif self.registration is None:
            self._error(E.ProtocolError(E.NOT_IN_ROOM, "Peer not registered in any room"))
        elif mtype in ROOM_TYPES:
            room = self.registration.room
            cmd = Message(self, msg, raw)
            try:
                await nowait.send(room, cmd)  # a busy room: this connection waits, no other
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.registration = None
                self._error(E.ProtocolError(E.NOT_IN_ROOM, "Peer not registered in any room"))
        else:
            self._error(E.ProtocolError(E.UNKNOWN_MESSAGE_TYPE, f"Unknown message type: {mtype}"))

    def _release_held(self, token: object) -> None:
        """The writer's place, held through a register, let go: what queued meanwhile is
        flushed (written at once if it can be, else a writer's)."""
        if self._writer_token is token:
            self._writer_token = None
            if not moved_away(self.ws):
                self.flush()

    def _start_writer(self, nursery: trio.Nursery) -> None:
        self._writer_token = token = object()
        nursery.start_soon(self._writer, token)

    async def _send_batch(self) -> None:
        """The rest of a write begun, or up to WRITE_BATCH queued frames, in one write
        (`_wsfix.send_front`); `_send_since` is when it last made progress (the stall
        check)."""
        self._send_since = trio.current_time()
        try:
            await send_front(self.ws, self._outbox, WRITE_BATCH, self._progressed)
        finally:
            self._send_since = None

    def _progressed(self) -> None:
        self._send_since = trio.current_time()

    async def _register(self, msg: dict[str, Any], raw: str) -> None:
        # A first register holds the writer's place: nothing is written until it is
        # answered (or moved: then nothing at all), and then this task flushes the answer,
        # no writer task for one frame (nothing else goes to a roomless peer)
        held = None
        if self.registration is None and self._writer_token is None:
            self._writer_token = held = object()
        started = trio.current_time()
        mover = self.ctx.mover
        try:
            req = parse_register(msg)
            movable = mover is not None and self.identity is None and reads_inline(self.ws)  # (_wsmove.take)
            got = await self.ctx.registrar.register(self, req, movable=movable)
            if isinstance(got, MoveTo):
                assert mover is not None and self._nursery is not None
                if await mover(self, got, raw):
                    let_go(self.ws)  # the sibling has it, and answers the register
                    self._nursery.cancel_scope.cancel()
                    return
                got = await self.ctx.registrar.enter(self, req, got.admission)
            self.registration = got
            self.ctx.observe_register(trio.current_time() - started)
        except E.ProtocolError as exc:
            exc.extra.setdefault("reason", exc.message)  # v1 clients read "reason"
            self._error(exc)
        finally:
            if held is not None:
                self._release_held(held)

    def _error(self, exc: E.ProtocolError) -> None:
        self.metrics.errors_by_code[exc.code] += 1
        event(logging.INFO, "error", conn=self.id, peer_id=self.peer_id, code=exc.code)
        self.deliver(dumps(exc.to_message()))

    def _take_token(self, now: float) -> bool:
        if self._bucket.take(now):
            return True
        self.metrics.rate_limited_drops += 1
        if now - self._rate_error_at >= 1.0:  # at most one RATE_LIMITED a second
            self._rate_error_at = now
            self._error(E.ProtocolError(
                E.RATE_LIMITED,
                f"more than {self.settings.rate_limit:g} messages/s; messages are being dropped",
            ))
        return False

    async def leave_room(self) -> None:
        registration, self.registration = self.registration, None
        if registration is None:
            return
        try:
            with nowait.within(2):
                await registration.room.send(Leave(self))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # ---------------------------------------------------------- side tasks
    async def _writer(self, token: object) -> None:
        """Started by flush() for frames the socket did not take at once (or that came
        while others were writing); sends them in batches; waits a little
        (WRITER_LINGER, ended by the sweeper) for more, then ends, so an idle connection
        holds no writer. A send that makes no progress for stalled_reader_timeout is
        the sweeper's to cut off (`_send_since`)."""
        outbox = self._outbox
        try:
            while True:
                if not outbox:
                    await self._park(token)
                    if self._writer_token is not token:
                        return  # lingered out (check_timers let go of it)
                    continue
                try:
                    await self._send_batch()
                except ConnectionClosed:
                    return
        finally:
            if self._writer_token is token:
                self._writer_token = None
                self._parked = None

    async def _park(self, token: object) -> None:
        """Wait for flush(), or for check_timers() to end the linger: the cheapest
        wake-up trio has, no channel, no event, no deadline."""
        self._parked = trio.lowlevel.current_task()
        self._parked_at = trio.current_time()

        def abort(_: Any) -> trio.lowlevel.Abort:
            # The connection ends: from now on flush() starts a new writer (it finds
            # no nursery, so none), even before this one has finished unwinding.
            if self._writer_token is token:
                self._writer_token = None
                self._parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


def _remote(ws: WebSocketConnection) -> str:
    """The peer's address for the log; a client already gone has none (ENOTCONN)."""
    try:
        return str(ws.remote)
    except OSError:
        return "gone"
