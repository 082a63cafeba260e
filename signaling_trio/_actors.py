"""Room actors and their supervisor.

Owns: which rooms are live in this process, and for each one the task that holds its
`RoomState` (protocol/room.py). A connection never touches a room's state; it sends a
command into the room's bounded inbox. The room never waits on a connection: it puts
frames in each peer's outbox with `queue()` and, once a batch of commands is handled,
has each peer it queued for write them with `flush()` (both non-blocking: what a
socket does not take at once is its writer task's); it asks for closes with
`request_close()` (non-blocking).

Never touches: sockets, the store, HTTP, other instances.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import trio

from . import _log
from . import _nowait as nowait
from ._log import event
from ._metrics import Metrics
from .config import Settings
from .protocol import errors as E
from .protocol.room import Effects, RoomState


class PeerConnection(Protocol):
    """What a room may do to a connection: every call returns at once."""

    id: Any  # unique among the room's connections

    def queue(self, text: str) -> None: ...  # a frame to send, at the latest on flush()
    def flush(self) -> None: ...
    def request_close(self, code: int, reason: str) -> None: ...


class Reply(Protocol):
    """Where an answer goes: a `_nowait.Answer` (or a memory channel's send side), or a
    reply that crosses instances. Never blocks."""

    def send_nowait(self, value: Any) -> None: ...


@dataclass(slots=True)
class Register:
    conn: PeerConnection
    peer_id: str
    subject: str  # who the credential says the peer is (the JWT's `sub`)
    role: str
    metadata: dict[str, Any]
    token: str | None  # the room token it registered with (echoed in registered_auth)
    reply: Reply  # gets the peer id now bound, or None (the room sent the error itself)
    announce: bool = True  # False: a restore after the room moved (no registered_auth)
    is_admin: bool = False  # a sleap-rtc worker claiming the room's admin role
    # sleap-rtc registrations: what else registered_auth carries (ice_servers, ...);
    # None for v1/v2 (their registered_auth stays as it was)
    welcome: dict[str, Any] | None = None
    restored: bool = False  # the peer was in the room before it moved (its handover applies)
    # the cluster's hold on this attempt at registering: begin() before the room handles
    # it (False: a newer attempt superseded it; skip it), end() after
    answer: AnswerHold | None = None


class AnswerHold(Protocol):
    def begin(self) -> bool: ...  # False: this request was answered elsewhere meanwhile; skip it
    def end(self) -> None: ...


@dataclass(slots=True)
class Message:
    conn: PeerConnection
    msg: dict[str, Any]
    raw: str
    # the cluster's hold on a request from another instance: begin() before the room
    # handles it, end() after, so its answer travels back as one item
    answer: AnswerHold | None = None


@dataclass(slots=True)
class Leave:
    conn: PeerConnection


@dataclass(slots=True)
class Call:
    """Run the named operation inside the actor (HTTP's queries and kicks); its result
    (plain data, so it can cross instances) goes back on `reply`."""

    op: str
    args: tuple[Any, ...]
    reply: Reply


CALLS: dict[str, Callable[..., Any]] = {
    "subjects": lambda state: sorted(state.subjects()),
    "peer_subject": RoomState.peer_subject,
    "count": lambda state: len(state.peers),
    "kick": RoomState.kick,  # Effects: applied by the actor, the caller gets None
    "take_over": RoomState.take_over,  # (handover, now, window): the room moved here; Effects
}


Command = Register | Message | Leave | Call
BATCH = 64  # commands a room handles per wake-up before it yields to other tasks


class RoomActor:
    def __init__(self, room_id: str, supervisor: "RoomSupervisor") -> None:
        self.room_id = room_id
        self.supervisor = supervisor
        settings = supervisor.settings
        self.state = RoomState(
            room_id,
            max_peers=settings.max_room_peers,
            max_metadata_bytes=settings.max_metadata_bytes,
            wall_offset=time.time() - trio.current_time(),
        )
        self.inbox, self._receive = trio.open_memory_channel[Command](settings.room_inbox_size)
        # the RoomHandle interface (_router.py), bound once: no extra call per frame
        self.send_nowait = self.inbox.send_nowait
        self.send = self.inbox.send
        self.metrics = supervisor.metrics
        self._scope = trio.CancelScope()
        # with a cluster: told when subscriptions or reservations changed (to save them)
        self.on_handover_change: Callable[[RoomActor], None] | None = None
        self.handover_loaded = True
        self._handover_seen = 0
        self._queued: dict[PeerConnection, None] = {}  # peers with frames queued, to flush (in order)

    def register_abandoned(self, conn_id: Any) -> None:
        """The connection stopped waiting for its Register's answer: nothing to forget here."""

    def abandon(self) -> None:
        """Stop at once without telling anyone: the room now lives on another instance."""
        self._scope.cancel()

    def take_queued(self) -> list[Any]:
        """The commands still waiting in the inbox (for a room given up to another instance)."""
        taken = []
        while True:
            try:
                taken.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
                return taken

    def queue_depth(self) -> int:
        return self._receive.statistics().current_buffer_used

    async def run(self) -> None:
        try:
            with self._scope:
                async with self._receive:
                    await self._loop()
        except Exception:
            # A bug in one room must not take the server down: log it, tell that room's
            # peers with 1011, and let the supervisor forget the room.
            self.metrics.room_crashes += 1
            _log.logger.exception("room crashed", extra={"fields": {"room_id": self.room_id}})
            for conn in list(self.state.by_conn):
                conn.request_close(E.CLOSE_INTERNAL_ERROR, "internal error")  # type: ignore[attr-defined]
        finally:
            self.supervisor._forget(self)

    async def _loop(self) -> None:
        state = self.state
        receive = self._receive
        while True:
            deadline = state.next_deadline()
            cmd = None
            if deadline is None:  # (most rooms: no cancel scope to enter and leave, ~10 us)
                cmd = await receive.receive()
            else:
                with trio.move_on_at(deadline):
                    cmd = await receive.receive()
            now = trio.current_time()
            if cmd is not None:
                self._dispatch(cmd, now)
                # Under load, work through what is queued before yielding: one wake-up
                # per batch instead of one per command.
                for _ in range(BATCH):
                    try:
                        cmd = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    self._dispatch(cmd, now)
            if state.deadlines or state.handover_deadline is not None:
                self._apply(state.expire(now))
            self._flush()
            if self.on_handover_change is not None and state.handover_version != self._handover_seen:
                self._handover_seen = state.handover_version
                self.on_handover_change(self)
            if state.empty and receive.statistics().current_buffer_used == 0:
                return  # retire: an empty room's live state is dropped

    def _dispatch(self, cmd: Command, now: float) -> None:
        state = self.state
        if type(cmd) is Message:
            hold = cmd.answer
            if hold is None or hold.begin():
                self._apply(state.handle(cmd.conn, cmd.msg, cmd.raw, now))
                if hold is not None:
                    hold.end()
            self.metrics.messages_by_type[cmd.msg["type"]] += 1
        elif type(cmd) is Leave:
            self._apply(state.leave(cmd.conn))
        elif type(cmd) is Register:
            hold = cmd.answer
            if hold is None or hold.begin():
                self._register(cmd, now)
                if hold is not None:
                    hold.end()
        elif type(cmd) is Call:
            result = CALLS[cmd.op](state, *cmd.args)
            if isinstance(result, Effects):
                self._apply(result)
                result = None
            cmd.reply.send_nowait(result)

    def _register(self, cmd: Register, now: float) -> None:
        state = self.state
        fx = state.register(
            cmd.conn, peer_id=cmd.peer_id, subject=cmd.subject, role=cmd.role,
            metadata=cmd.metadata, token=cmd.token, now=now, announce=cmd.announce,
            is_admin=cmd.is_admin, welcome=cmd.welcome, restored=cmd.restored,
        )
        self._apply(fx)
        bound = state.by_conn.get(cmd.conn)
        cmd.reply.send_nowait(bound.peer_id if bound is not None else None)
        self.metrics.messages_by_type["register"] += 1

    def _flush(self) -> None:
        """Each peer queued for since the last flush writes what it has: one write for
        all a batch of commands said to it."""
        queued = self._queued
        if queued:
            for conn in queued:
                conn.flush()  # type: ignore[attr-defined]
            queued.clear()

    def _apply(self, fx: Effects) -> None:
        queued = self._queued
        for conn, text in fx.sends:
            conn.queue(text)  # type: ignore[attr-defined]
            queued[conn] = None
        for conn, code, reason in fx.closes:
            conn.request_close(code, reason)  # type: ignore[attr-defined]
        if fx.routed:
            self.metrics.total_messages += fx.routed
        if fx.dropped:
            self.metrics.dropped_signals += fx.dropped
        for conn, code in fx.errors:
            self.metrics.errors_by_code[code] += 1
            event(logging.INFO, "error", conn=conn.id, room_id=self.room_id, code=code)  # type: ignore[attr-defined]


class RoomSupervisor:
    """Starts a room's actor on first use and forgets it when it retires.

    `rooms` is only changed by `room()`, `give_up()` and `_forget()`, all synchronous: no
    task can observe it half-changed. `last_room` remembers where a peer id was last
    registered so /delete-peers-and-room (v1 sends only a peer_id, after its socket is
    closed) can find the room."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.rooms: dict[str, RoomActor] = {}
        self.last_room: OrderedDict[str, str] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        # told when an actor retired by itself (empty, or crashed), after it is forgotten
        self.on_retired: Callable[[RoomActor], None] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def room(self, room_id: str) -> RoomActor:
        actor = self.rooms.get(room_id)
        if actor is None:
            assert self._nursery is not None, "supervisor not running"
            actor = RoomActor(room_id, self)
            self.rooms[room_id] = actor
            self._nursery.start_soon(actor.run, name=f"room {room_id}")
            event(logging.DEBUG, "room live", room_id=room_id)
        return actor

    def give_up(self, actor: RoomActor) -> None:
        """Stop the actor at once, telling nobody: its room lives on another instance now."""
        if self.rooms.get(actor.room_id) is actor:
            del self.rooms[actor.room_id]
        actor.abandon()

    def _forget(self, actor: RoomActor) -> None:
        if self.rooms.get(actor.room_id) is actor:
            del self.rooms[actor.room_id]
            event(logging.DEBUG, "room idle", room_id=actor.room_id)
            if self.on_retired is not None:
                self.on_retired(actor)

    def note_peer(self, peer_id: str, room_id: str) -> None:
        self.last_room[peer_id] = room_id
        self.last_room.move_to_end(peer_id)
        while len(self.last_room) > 100_000:
            self.last_room.popitem(last=False)

    async def call(self, room_id: str, op: str, args: tuple[Any, ...], *, timeout: float = 5.0) -> Any:
        """Run the CALLS operation `op` in this process's actor of the room; None when the
        room has no live state here. trio.TooSlowError after `timeout`."""
        actor = self.rooms.get(room_id)
        if actor is None:
            return None
        answer = nowait.Answer[Any]()
        with trio.fail_after(timeout):
            try:
                await actor.inbox.send(Call(op, args, answer))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            return await answer.receive()

    def peers_by_role(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for actor in self.rooms.values():
            for role, n in actor.state.role_counts().items():
                total[role] = total.get(role, 0) + n
        return total

    def peer_count(self) -> int:
        return sum(len(a.state.peers) for a in self.rooms.values())
