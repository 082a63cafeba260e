"""One room as this instance reaches it, wherever the room lives.

Owns: `RoomLink` (a connection's room handle with a cluster: to the local actor when
this instance owns the room, else to the owner over the cluster channel), what the link
remembers of its members to restore them after a move, and the requests it has sent
and not yet seen answered. On the owner's side: `RemoteConn`, a connection of another
instance as the room sees it, and the holds that gather a request's answer.

Never touches: Redis (it puts wire items on `LinkHost.outlink`), a room's state.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Protocol

import trio

from .._actors import Command, Leave, Message, Register, Reply, RoomActor
from .._log import event
from .._metrics import Metrics
from ..protocol import errors as E
from ..protocol import metadata as md
from ..protocol.messages import ANSWERED_TYPES, decode, dumps
from . import wire

REQUEST_DEADLINE = 15.0  # a request unanswered this long through a room's move gets ROOM_UNAVAILABLE


class Outbound(Protocol):
    def put(self, item: wire.Item) -> None: ...


class LinkHost(Protocol):
    """What links need of their cluster (`node.Cluster`)."""

    id: str
    metrics: Metrics
    reqs: itertools.count[int]

    def outlink(self, instance: str) -> Outbound: ...
    def spawn(self, fn: Callable[..., Any], *args: Any) -> None: ...


class LocalConn(Protocol):
    """A connection of this instance, as its link sees it."""

    id: int

    def deliver(self, text: str) -> None: ...
    def request_close(self, code: int, reason: str) -> None: ...
    def room_lost(self, room: Any) -> None: ...  # the room no longer has it (a restore refused)


async def to_actor(actor: RoomActor, *cmds: Command) -> bool:
    """Hand `cmds` to a room's actor, in order; False if the room retired meanwhile."""
    try:
        for cmd in cmds:
            try:
                actor.inbox.send_nowait(cmd)
            except trio.WouldBlock:
                await actor.inbox.send(cmd)
        return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False


# ---------------------------------------------------------------- on the owner
class RemoteConn:
    """On a room's owner: a connection that lives on another instance."""

    __slots__ = ("id", "instance", "cid", "room_id", "host", "last_seq", "held")

    def __init__(self, host: LinkHost, instance: str, cid: int, room_id: str) -> None:
        self.id = f"{instance[:6]}/{cid}"
        self.host = host
        self.instance = instance
        self.cid = cid
        self.room_id = room_id
        self.last_seq = 0  # the newest request taken from this connection (a resent one is not taken twice)
        self.held: list[str] | None = None  # what the room says to it while answering a request

    def __repr__(self) -> str:
        return f"<RemoteConn {self.id} room={self.room_id}>"

    def deliver(self, text: str) -> None:
        if self.held is not None:
            self.held.append(text)
        else:
            self.host.outlink(self.instance).put(wire.Deliver(self.room_id, self.cid, text))

    def request_close(self, code: int, reason: str) -> None:
        self.host.outlink(self.instance).put(wire.Close(self.room_id, self.cid, code, reason))


class RemoteAnswer:
    """The answer to one request from another instance: everything the room says to the
    asker while handling it, sent back as one `Answer` tagged with the request's seq."""

    __slots__ = ("rc", "seq")

    def __init__(self, rc: RemoteConn, seq: int) -> None:
        self.rc = rc
        self.seq = seq

    def begin(self) -> bool:
        self.rc.held = []
        return True

    def end(self) -> None:
        rc = self.rc
        texts, rc.held = rc.held or [], None
        rc.host.outlink(rc.instance).put(wire.Answer(rc.room_id, rc.cid, self.seq, texts))


class RemoteReply:
    """The answer to a `Join` from another instance, sent back as `Joined`."""

    __slots__ = ("host", "instance", "room_id", "cid", "req", "on_refused")

    def __init__(self, host: LinkHost, instance: str, join: wire.Join, on_refused: Callable[[], None]) -> None:
        self.host, self.instance = host, instance
        self.room_id, self.cid, self.req = join.room_id, join.cid, join.req
        self.on_refused = on_refused

    def send_nowait(self, value: str | None) -> None:
        if value is None:
            self.on_refused()
        self.host.outlink(self.instance).put(wire.Joined(self.room_id, self.cid, self.req, value))


# ----------------------------------------------------------------- at home
class LocalAnswer:
    """A request of one of our connections, sent again to the room after the room came
    here: handled only if no other owner's answer to it arrived first (and then any
    such answer arriving later is dropped)."""

    __slots__ = ("link", "cid", "seq")

    def __init__(self, link: "RoomLink", cid: int, seq: int) -> None:
        self.link = link
        self.cid = cid
        self.seq = seq

    def begin(self) -> bool:
        return self.link.answered(self.cid, self.seq)

    def end(self) -> None:
        pass


class Member:
    """A local connection in a room, as its link remembers it for a restore elsewhere."""

    __slots__ = ("conn", "peer_id", "subject", "role", "metadata", "token", "is_admin", "welcome", "req",
                 "confirmed")

    def __init__(self, cmd: Register, req: int) -> None:
        self.conn: LocalConn = cmd.conn  # type: ignore[assignment]
        self.peer_id = cmd.peer_id
        self.subject = cmd.subject
        self.role = cmd.role
        self.metadata = cmd.metadata
        self.token = cmd.token
        self.is_admin = cmd.is_admin
        self.welcome = cmd.welcome
        self.req = req
        self.confirmed = False

    def register(self, reply: Reply, announce: bool) -> Register:
        return Register(self.conn, self.peer_id, self.subject, self.role, self.metadata, self.token, reply, announce,
                        self.is_admin, self.welcome)

    def join(self, room_id: str, announce: bool) -> wire.Join:
        return wire.Join(room_id, self.conn.id, self.req, self.peer_id, self.subject, self.role,
                         self.metadata, self.token, announce, self.is_admin, self.welcome)


class Confirm:
    """Wraps a Register's reply: records the outcome on the member, then passes it on."""

    __slots__ = ("link", "cid", "req", "reply")

    def __init__(self, link: "RoomLink", cid: int, req: int, reply: Reply | None) -> None:
        self.link, self.cid, self.req, self.reply = link, cid, req, reply

    def send_nowait(self, value: str | None) -> None:
        self.link.confirmed(self.cid, self.req, value)
        if self.reply is not None:
            try:
                self.reply.send_nowait(value)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the connection stopped waiting


def _unwrap(reply: Any) -> Reply | None:
    return reply.reply if isinstance(reply, Confirm) else reply


class RoomLink:
    """This instance's way into one room (the `RoomHandle` connections hold with a
    cluster): sends to the local actor when this instance owns the room, else to the
    owner."""

    def __init__(self, host: LinkHost, room_id: str) -> None:
        self.host = host
        self.room_id = room_id
        self.owner: str | None = None
        self.actor: RoomActor | None = None
        self.members: dict[int, Member] = {}
        self.pending: dict[int, Confirm] = {}  # cid -> the Register sent to a remote owner, unanswered
        # requests sent to a remote owner and not yet answered: cid -> {seq: (raw, sent_at)};
        # sent again to the next owner if the room moves before they are answered
        self.awaiting: dict[int, dict[int, tuple[str, float]]] = {}
        self.missing_since: float | None = None

    def __repr__(self) -> str:
        return f"<RoomLink {self.room_id} owner={self.owner} local={self.actor is not None}>"

    # ------------------------------------------------------ the RoomHandle interface
    def send_nowait(self, cmd: Command) -> None:
        actor = self.actor
        if actor is None:
            self._remote(cmd)
            return
        cmd = self._confirming(cmd)
        undo = self._track(cmd)  # before the send: the actor may answer before we resume
        try:
            actor.inbox.send_nowait(cmd)
        except BaseException:
            undo()
            raise

    async def send(self, cmd: Command) -> None:
        actor = self.actor
        if actor is None:
            self._remote(cmd)
            return
        cmd = self._confirming(cmd)
        undo = self._track(cmd)
        try:
            await actor.inbox.send(cmd)
        except BaseException:
            undo()
            raise

    def register_abandoned(self, conn_id: Any) -> None:
        """The connection stopped waiting for its Register's answer."""
        self.pending.pop(conn_id, None)
        member = self.members.get(conn_id)
        if member is not None and not member.confirmed:
            del self.members[conn_id]

    # ------------------------------------------------------------- internals
    def _confirming(self, cmd: Command) -> Command:
        """A Register whose answer also records the outcome on its member."""
        if type(cmd) is Register and not isinstance(cmd.reply, Confirm):
            cmd.reply = Confirm(self, cmd.conn.id, next(self.host.reqs), cmd.reply)
        return cmd

    def _track(self, cmd: Command) -> Callable[[], None]:
        """Remember what a restore elsewhere would need; returns how to forget it again
        (the send failed)."""
        cid = cmd.conn.id  # type: ignore[union-attr]
        old = self.members.get(cid)
        kind = type(cmd)
        if kind is Message:
            if cmd.msg["type"] == "update_metadata" and old is not None:  # type: ignore[union-attr]
                before = old.metadata
                self._note_metadata(cid, cmd.msg)  # type: ignore[union-attr]
                return lambda: setattr(old, "metadata", before)
        elif kind is Register:
            member = Member(cmd, cmd.reply.req)  # type: ignore[arg-type, union-attr]
            member.confirmed = old is not None and old.confirmed  # a re-register: in the room either way
            self.members[cid] = member
        elif kind is Leave:  # gone from this room whether or not the Leave arrives
            self._forget(cid)
            return lambda: None

        def undo() -> None:
            if old is None:
                self.members.pop(cid, None)
            else:
                self.members[cid] = old

        return undo

    def _forget(self, cid: int) -> None:
        self.members.pop(cid, None)
        self.pending.pop(cid, None)
        self.awaiting.pop(cid, None)

    def _note_metadata(self, cid: int, msg: dict[str, Any]) -> None:
        member = self.members.get(cid)
        if member is None:
            return
        try:
            member.metadata = md.merge(member.metadata, md.validate(msg.get("metadata")))
        except E.ProtocolError:
            pass  # the owner answers the error; the peer keeps its metadata

    def _remote(self, cmd: Command) -> None:
        owner = self.owner
        kind = type(cmd)
        if kind not in (Message, Register, Leave):
            raise TypeError(f"a room link does not carry {kind.__name__}")
        cid = cmd.conn.id  # type: ignore[union-attr]
        if owner is None:  # the room ended here (emptied by a kick, or crashed)
            self._forget(cid)
            if kind is not Leave:
                raise trio.BrokenResourceError("the room is gone")  # the connection says NOT_IN_ROOM
            return
        cmd = self._confirming(cmd)
        self._track(cmd)  # nothing to undo: publishing does not fail here
        out = self.host.outlink(owner)
        if kind is Register:
            self.restore(self.members[cid], _unwrap(cmd.reply), cmd.announce)  # type: ignore[union-attr]
        elif kind is Leave:
            out.put(wire.Part(self.room_id, cid))
        elif cmd.msg["type"] in ANSWERED_TYPES:  # type: ignore[union-attr]
            seq = next(self.host.reqs)
            self.awaiting.setdefault(cid, {})[seq] = (cmd.raw, trio.current_time())  # type: ignore[union-attr]
            out.put(wire.Send(self.room_id, cid, cmd.raw, seq))  # type: ignore[union-attr]
        else:
            out.put(wire.Send(self.room_id, cid, cmd.raw))  # type: ignore[union-attr]

    # ------------------------------------------------- requests through a move
    def answered(self, cid: int, seq: int) -> bool:
        """True the first time a request's answer arrives (deliver it), False after."""
        waiting = self.awaiting.get(cid)
        if waiting is None or waiting.pop(seq, None) is None:
            return False
        if not waiting:
            del self.awaiting[cid]
        return True

    def resend_requests(self, cid: int, since: int = 0) -> None:
        """Send `cid`'s unanswered requests (from seq `since` on) to where the room is now,
        in the order they were made; after its Register, so the owner knows the peer. The
        owner takes each seq once, so sending one again is harmless."""
        waiting = self.awaiting.get(cid)
        member = self.members.get(cid)
        if not waiting or member is None:
            return
        local = []
        for seq, (raw, _) in list(waiting.items()):
            if seq < since:
                continue
            if self.actor is not None:  # the room came here
                local.append(Message(member.conn, decode(raw), raw, LocalAnswer(self, cid, seq)))
            elif self.owner is not None:
                self.host.outlink(self.owner).put(wire.Send(self.room_id, cid, raw, seq))
        if local:
            self.host.spawn(to_actor, self.actor, *local)

    def expire_requests(self, now: float) -> None:
        """Requests that waited through a move for longer than REQUEST_DEADLINE get
        ROOM_UNAVAILABLE: never silence."""
        for cid, waiting in list(self.awaiting.items()):
            member = self.members.get(cid)
            for seq, (_, sent_at) in list(waiting.items()):
                if now - sent_at < REQUEST_DEADLINE:
                    break  # the rest are younger
                del waiting[seq]
                event(logging.WARNING, "request expired", room_id=self.room_id, conn=cid, owner=self.owner,
                      member=member is not None, restoring=cid in self.pending)
                if member is not None:
                    self.host.metrics.errors_by_code[E.ROOM_UNAVAILABLE] += 1
                    member.conn.deliver(dumps(E.ProtocolError(
                        E.ROOM_UNAVAILABLE, "the room is moving between servers and did not answer in time; "
                        "send the request again").to_message()))
            if not waiting:
                del self.awaiting[cid]

    # ------------------------------------------------------------- restores
    def confirmed(self, cid: int, req: int, value: str | None) -> None:
        member = self.members.get(cid)
        if member is None or member.req != req:
            return
        if value is None:  # refused (a restore into a room now full, say): not in the room
            del self.members[cid]
            member.conn.room_lost(self)
        else:
            member.confirmed = True
            member.peer_id = value

    def joined(self, answer: wire.Joined) -> None:
        """The owner's answer to a Register we sent it."""
        waiting = self.pending.get(answer.cid)
        if waiting is not None and waiting.req == answer.req:
            del self.pending[answer.cid]
            waiting.send_nowait(answer.peer_id)  # records, then answers

    def restore_all(self) -> None:
        """Send every member (and every unanswered Register and request) to the room's
        new home."""
        pending, self.pending = self.pending, {}
        for cid, member in list(self.members.items()):
            if member.confirmed:
                self.restore(member, None, False)
            else:  # its connection still waits for the answer
                waiting = pending.get(cid)
                self.restore(member, _unwrap(waiting) if waiting else None, True)
            self.resend_requests(cid)

    def resend(self, cid: int) -> None:
        """One Register the owner bounced ("not mine"), sent again to the current owner."""
        waiting = self.pending.pop(cid, None)
        member = self.members.get(cid)
        if waiting is None or member is None:
            return
        self.restore(member, _unwrap(waiting), not member.confirmed)

    def restore(self, member: Member, reply: Reply | None, announce: bool) -> None:
        """Send `member`'s Register (again) to wherever the room is now; the answer is
        recorded on the member, then handed to `reply` (if any)."""
        cid = member.conn.id
        req = member.req = next(self.host.reqs)
        confirm = Confirm(self, cid, req, reply)
        if self.actor is not None:
            cmd = member.register(confirm, announce)
            try:
                self.actor.inbox.send_nowait(cmd)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.host.spawn(to_actor, self.actor, cmd)
        else:
            assert self.owner is not None
            self.pending[cid] = confirm
            self.host.outlink(self.owner).put(member.join(self.room_id, announce))
