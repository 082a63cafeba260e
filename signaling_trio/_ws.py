"""The WebSocket side: one task tree per connection.

Owns: reading frames (size, rate, UTF-8, JSON shape), registration (id_token and room
checks against auth and the store), the connection's bounded outbox and its writer,
the register deadline, the stalled-reader cut-off and the idle heartbeat.
Never touches: a room's state (it sends commands to the room's actor).

Timers: a connection keeps timestamps, not cancel scopes. One server task,
`sweep_connections`, checks every connection's register deadline, stalled send, idle
silence and lingering writer a few times a second (`Connection.check_timers`). The
reader used to wait under a deadline cancel scope per frame (~600 bytes while an idle
peer waits, ~14 us to enter and leave) and the writer moved two deadlines per batch;
docs/PERFORMANCE.md has what removing them measured.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from ._wsfix import send_many  # also: 1007/1002 close frames
from . import _log
from ._log import event
from ._rooms import Leave, Message, Register
from .auth import AuthError
from .protocol import errors as E
from .protocol import metadata as md
from .protocol.limits import TokenBucket
from .protocol.messages import ROOM_TYPES, decode, dumps
from .store import StoreUnavailable, bounded

if TYPE_CHECKING:
    from .server import SignalingServer

_ids = itertools.count(1)

PONG = '{"type":"pong"}'
WRITE_BATCH = 64
WRITER_LINGER = 2.0  # seconds an idle writer task waits for more frames before it ends
SWEEP_PERIOD = 1.0  # at most; shorter when a configured timeout is (see _sweep_period)
SWEEP_CHUNK = 512  # connections checked between checkpoints
SWEEP_WAKES = 32  # tasks woken (or started) between checkpoints
MAX_ID_LEN = 256
MAX_TOKEN_LEN = 16384
REGISTER_REPLY_TIMEOUT = 5.0  # a room (perhaps on another instance) answers a Register within this


class Connection:
    __slots__ = (
        "id", "server", "settings", "metrics", "ws", "_outbox", "_nursery", "_writer_token", "_parked",
        "_parked_at", "_send_since", "_pinging", "_register_by",
        "close_code", "close_reason", "peer_id", "room_id", "actor", "sub", "id_token_digest",
        "_bucket", "_rate_error_at", "_last_rx", "_overflowing",
    )

    def __init__(self, server: "SignalingServer", ws: WebSocketConnection) -> None:
        self.id = next(_ids)
        self.server = server
        self.settings = server.settings
        self.metrics = server.metrics
        self.ws = ws
        # The outbox: frames waiting for the writer task, which runs only while there is
        # something to write (an idle connection costs one task, not two).
        self._outbox: list[str] = []  # (an empty deque is 600 bytes; a list 56)
        self._nursery: trio.Nursery | None = None
        self._writer_token: object | None = None  # the running writer's, else None
        self._parked: Any = None  # the writer task while it waits for frames
        self._parked_at = 0.0  # since when
        self._send_since: float | None = None  # a send under way since (stalled-reader check)
        self._pinging = False
        self.close_code: int | None = None
        self.close_reason = ""
        # registration, owned by this connection's task
        self.peer_id: str | None = None
        self.room_id: str | None = None
        self.actor: Any = None  # the room's RoomActor, or with a cluster its RoomLink
        self.sub: str | None = None
        # a digest of the id_token this connection registered with (the token itself is
        # a kilobyte; only "same token again?" is ever asked of it)
        self.id_token_digest: bytes | None = None
        # rate limit: a token bucket on trio's clock
        self._bucket = TokenBucket(self.settings.rate_limit, self.settings.rate_burst, trio.current_time())
        self._rate_error_at = -math.inf
        self._last_rx = trio.current_time()
        self._register_by = self._last_rx + self.settings.register_timeout
        self._overflowing = False

    def __repr__(self) -> str:
        return f"<Connection {self.id} peer={self.peer_id}>"

    # ------------------------------------------------ called by rooms (no awaits)
    def deliver(self, text: str) -> None:
        nursery = self._nursery
        if nursery is None:
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
        if self._writer_token is None:
            self._writer_token = token = object()
            nursery.start_soon(self._writer, token)
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
                        await self._reader()
                    finally:
                        self._nursery = None
                        nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._leave_room()
                code = self.close_code or E.CLOSE_NORMAL
                self.metrics.closes_by_code[code] += 1
                with trio.move_on_after(2):
                    await self.ws.aclose(code, self.close_reason or None)
            event(
                logging.INFO, "disconnect", conn=self.id, peer_id=self.peer_id,
                room_id=self.room_id, code=self.ws.closed.code if self.ws.closed else code,
            )

    async def _reader(self) -> None:
        """Reads frames (the timers are check_timers', called by the sweeper)."""
        max_frame = self.settings.max_frame_bytes
        ws = self.ws
        while True:
            data = msg = None  # an idle connection keeps no frame alive (a register's id_token)
            try:
                data = await ws.get_message()
            except ConnectionClosed:
                return
            now = trio.current_time()
            self._last_rx = now
            if not self._take_token(now):
                continue
            if not isinstance(data, str):
                self._error(E.ProtocolError(E.INVALID_MESSAGE, "binary frames are not accepted; send JSON text"))
                continue
            if len(data) * 4 > max_frame and len(data.encode()) > max_frame:
                self._error(E.ProtocolError(
                    E.MESSAGE_TOO_LARGE, f"frame is larger than {max_frame} bytes"
                ))
                continue
            try:
                msg = decode(data)
            except E.ProtocolError as exc:
                self._error(exc)
                continue
            await self._dispatch(msg, data)

    def check_timers(self, now: float) -> bool:
        """The connection's deadlines, checked by the sweeper (no awaits). True when it
        woke or started a task (the sweeper lets those run before it wakes many more)."""
        nursery = self._nursery
        if nursery is None or self.close_code is not None:
            return False  # not running, or already closing
        settings = self.settings
        if self.id_token_digest is None and now >= self._register_by:
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
        if not self._pinging and now - self._last_rx >= settings.idle_ping_interval:
            self._pinging = True
            nursery.start_soon(self._ping)
            woke = True
        if self._parked is not None and now - self._parked_at >= WRITER_LINGER:
            # lingered out: the writer, woken without its token, ends; the next
            # deliver() starts a new one
            task, self._parked, self._writer_token = self._parked, None, None
            trio.lowlevel.reschedule(task)
            woke = True
        return woke

    async def _ping(self) -> None:
        """A WebSocket ping after silence; a close when no pong comes in time."""
        try:
            with trio.move_on_after(self.settings.idle_ping_timeout) as waited:
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
            started = trio.current_time()
            try:
                await self._register(msg)
                self.server.prometheus.register_seconds.observe(trio.current_time() - started)
            except E.ProtocolError as exc:
                exc.extra.setdefault("reason", exc.message)  # v1 clients read "reason"
                self._error(exc)
        elif self.actor is None:
            self._error(E.ProtocolError(E.NOT_IN_ROOM, "Peer not registered in any room"))
        elif mtype in ROOM_TYPES:
            inbox = self.actor.inbox
            cmd = Message(self, msg, raw)
            try:
                try:
                    inbox.send_nowait(cmd)
                except trio.WouldBlock:  # the room is busy: this connection waits, no other
                    await inbox.send(cmd)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._lost_room()
                self._error(E.ProtocolError(E.NOT_IN_ROOM, "Peer not registered in any room"))
        else:
            self._error(E.ProtocolError(E.UNKNOWN_MESSAGE_TYPE, f"Unknown message type: {mtype}"))

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

    # -------------------------------------------------------------- register
    async def _register(self, msg: dict[str, Any]) -> None:
        missing = [f for f in ("peer_id", "room_id", "token", "id_token") if msg.get(f) in (None, "")]
        if missing:
            raise E.ProtocolError(E.MISSING_FIELDS, "Missing required fields during registration: " + ", ".join(missing))
        for name, limit in (("peer_id", MAX_ID_LEN), ("room_id", MAX_ID_LEN), ("token", MAX_ID_LEN), ("id_token", MAX_TOKEN_LEN)):
            value = msg[name]
            if not isinstance(value, str) or len(value) > limit:
                raise E.ProtocolError(E.INVALID_MESSAGE, f"field '{name}' must be a string of at most {limit} characters")
        peer_id, room_id, token, id_token = msg["peer_id"], msg["room_id"], msg["token"], msg["id_token"]
        role = msg.get("role")
        if role is None:
            role = "peer"
        elif not isinstance(role, str) or not role or len(role) > MAX_ID_LEN:
            raise E.ProtocolError(E.INVALID_MESSAGE, "field 'role' must be a non-empty string")
        metadata = md.validate(msg.get("metadata"))

        # Identity. A token this connection already presented was verified then; a
        # long-running worker re-registering with it after it expired keeps working.
        digest = hashlib.blake2b(id_token.encode(), digest_size=16).digest()
        if digest == self.id_token_digest and self.sub is not None:
            sub = self.sub
        else:
            try:
                claims = await self.server.verifier.verify(id_token)
            except AuthError as exc:
                raise E.ProtocolError(E.INVALID_ID_TOKEN, str(exc)) from None
            sub = claims["sub"]

        already_here = self.actor is not None and self.room_id == room_id
        try:
            record = await bounded(self.server.store.get_room, room_id)
        except StoreUnavailable:
            raise E.ProtocolError(E.STORE_UNAVAILABLE, "the room store cannot be reached; try again") from None
        if record is None:
            raise E.ProtocolError(E.ROOM_NOT_FOUND, f"Room {room_id} not found")
        if not record.token_matches(token):
            raise E.ProtocolError(E.INVALID_ROOM_TOKEN, "Invalid room token")
        if record.expires_at <= time.time() and not already_here:
            raise E.ProtocolError(E.ROOM_EXPIRED, f"Room {room_id} expired")

        if self.actor is not None and self.room_id != room_id:
            await self._leave_room()

        reply_send, reply_recv = trio.open_memory_channel[str | None](1)
        cmd = Register(self, peer_id, sub, role, metadata, token, reply_send)
        cluster = self.server.supervisor.cluster
        for _attempt in range(3):
            try:
                if cluster is None:
                    actor: Any = self.server.supervisor.room(room_id)
                else:  # the room may live on another instance: its link carries the Register
                    actor = await cluster.link(room_id)
                await actor.inbox.send(cmd)
                break
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue  # the room retired between lookup and send; a new one starts
            except StoreUnavailable:
                raise E.ProtocolError(E.STORE_UNAVAILABLE, "the room store cannot be reached; try again") from None
        else:
            raise E.ProtocolError(E.STORE_UNAVAILABLE, "room unavailable; try again")
        bound = None
        with trio.move_on_after(REGISTER_REPLY_TIMEOUT) as waited:
            bound = await reply_recv.receive()
        if waited.cancelled_caught:
            if cluster is not None:
                actor.forget_register(self.id)
            raise E.ProtocolError(E.STORE_UNAVAILABLE, "the room did not answer in time; try again")
        if bound is None:
            if self.room_id == room_id:
                self._lost_room()
            return  # the room told the peer why
        self.peer_id, self.room_id, self.actor = bound, room_id, actor
        self.sub, self.id_token_digest = sub, digest
        self.server.supervisor.note_peer(bound, room_id)
        if cluster is not None:
            cluster.note_peer(bound, room_id)
        event(logging.INFO, "register", conn=self.id, peer_id=bound, room_id=room_id, role=role)

    def _lost_room(self) -> None:
        self.actor = None
        self.room_id = None
        self.peer_id = None

    async def _leave_room(self) -> None:
        actor = self.actor
        if actor is None:
            return
        self._lost_room()
        try:
            with trio.move_on_after(2):
                await actor.inbox.send(Leave(self))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # ---------------------------------------------------------- side tasks
    async def _writer(self, token: object) -> None:
        """Started by deliver() when frames wait; sends them in batches; waits a little
        (WRITER_LINGER, ended by the sweeper) for more, then ends, so an idle connection
        holds no writer. A send that makes no progress for stalled_reader_timeout is
        the sweeper's to cut off (`_send_since`)."""
        ws = self.ws
        outbox = self._outbox
        try:
            while True:
                if not outbox:
                    await self._park(token)
                    if self._writer_token is not token:
                        return  # lingered out (check_timers let go of it)
                    continue
                batch = outbox[:WRITE_BATCH]
                del outbox[:WRITE_BATCH]
                self._send_since = trio.current_time()
                try:
                    await send_many(ws, batch)
                except ConnectionClosed:
                    return
                finally:
                    self._send_since = None
        finally:
            if self._writer_token is token:
                self._writer_token = None
                self._parked = None

    async def _park(self, token: object) -> None:
        """Wait for deliver(), or for check_timers() to end the linger: the cheapest
        wake-up trio has, no channel, no event, no deadline."""
        self._parked = trio.lowlevel.current_task()
        self._parked_at = trio.current_time()

        def abort(_: Any) -> trio.lowlevel.Abort:
            # The connection ends: from now on deliver() starts a new writer (it finds
            # no nursery, so none), even before this one has finished unwinding.
            if self._writer_token is token:
                self._writer_token = None
                self._parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


def _sweep_period(settings: Any) -> float:
    return min(SWEEP_PERIOD, WRITER_LINGER / 2, settings.register_timeout / 4, settings.idle_ping_interval / 4,
               settings.stalled_reader_timeout / 4)


async def sweep_connections(server: "SignalingServer") -> None:
    """Every connection's timers (Connection.check_timers), a few times a second. It
    yields after every SWEEP_CHUNK connections checked and every SWEEP_WAKES tasks woken
    (20,000 writers lingering out together must not run as one scheduler batch: a probe's
    round trips would wait behind them)."""
    while True:
        await trio.sleep(_sweep_period(server.settings))
        checked = woken = 0
        now = trio.current_time()
        for conn in list(server.connections):
            if conn.check_timers(now):
                woken += 1
            checked += 1
            if checked >= SWEEP_CHUNK or woken >= SWEEP_WAKES:
                await trio.lowlevel.checkpoint()
                checked = woken = 0
                now = trio.current_time()


def _remote(ws: WebSocketConnection) -> str:
    """The peer's address for the log; a client already gone has none (ENOTCONN)."""
    try:
        return str(ws.remote)
    except OSError:
        return "gone"


async def handle_request(server: "SignalingServer", request: WebSocketRequest) -> None:
    try:
        with trio.fail_after(10):
            ws = await request.accept()
    except (ConnectionClosed, trio.TooSlowError, OSError):
        return
    conn = Connection(server, ws)
    server.metrics.total_connections += 1
    server.metrics.active_connections += 1
    server.connections.add(conn)
    try:
        await conn.run()
    except Exception:
        # A bug in one connection's handling must not reach the listener's nursery
        # (that would end the server): log it, and that connection alone is over.
        server.metrics.connection_crashes += 1
        _log.logger.exception("connection crashed", extra={"fields": {"conn": conn.id}})
    finally:
        server.connections.discard(conn)
        server.metrics.active_connections -= 1
        if not server.connections:
            server.connections_drained.set()
