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

from .. import _nowait as nowait
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
            await nowait.send(actor.inbox, cmd)
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

    def queue(self, text: str) -> None:
        if self.held is not None:
            self.held.append(text)
        else:
            self.host.outlink(self.instance).put(wire.Deliver(self.room_id, self.cid, text))

    def flush(self) -> None:
        """Nothing: the outlink batches what goes to the connection's instance."""

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
    """The answer to a `Join` from another instance: the peer id bound (the reply) and
    what the room said to the peer meanwhile (the hold), sent back as one `Joined`."""

    __slots__ = ("rc", "req", "on_refused", "value")

    def __init__(self, rc: RemoteConn, req: int, on_refused: Callable[[], None]) -> None:
        self.rc, self.req, self.on_refused = rc, req, on_refused
        self.value: str | None = None

    def begin(self) -> bool:
        self.rc.held = []
        return True

    def send_nowait(self, value: str | None) -> None:
        self.value = value
        if value is None:
            self.on_refused()

    def end(self) -> None:
        rc = self.rc
        texts, rc.held = rc.held or [], None
        rc.host.outlink(rc.instance).put(wire.Joined(rc.room_id, rc.cid, self.req, self.value, texts))


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
    """A local connection in a room, as its link remembers it for a restore elsewhere.

    `req` numbers the newest attempt at registering it (its Register, or a restore after
    a move): only that attempt is handled and answered (`Confirm`), so a peer hears one
    `registered_auth` per Register however often its room moves meanwhile. `waiting` is
    the connection's reply while its Register is unanswered: it goes with each attempt."""

    __slots__ = ("conn", "peer_id", "subject", "role", "metadata", "token", "is_admin", "welcome", "req",
                 "confirmed", "waiting")

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
        self.waiting: Reply | None = cmd.reply

    def register(self, confirm: "Confirm", announce: bool) -> Register:
        return Register(self.conn, self.peer_id, self.subject, self.role, self.metadata, self.token, confirm,
                        announce=announce, is_admin=self.is_admin, welcome=self.welcome, restored=self.confirmed,
                        answer=confirm)

    def join(self, room_id: str, announce: bool) -> wire.Join:
        return wire.Join(room_id, self.conn.id, self.req, self.peer_id, self.subject, self.role,
                         self.metadata, self.token, announce, self.is_admin, self.welcome, self.confirmed)


class Confirm:
    """Reply and hold of attempt `req` at registering a local connection in a room that
    runs here: handled only while it is the member's newest attempt (one still queued
    for a room given up, say, is skipped); its outcome is recorded on the member."""

    __slots__ = ("link", "cid", "req")

    def __init__(self, link: "RoomLink", cid: int, req: int) -> None:
        self.link, self.cid, self.req = link, cid, req

    def begin(self) -> bool:
        return self.link.attempt(self.cid, self.req) is not None

    def end(self) -> None:
        pass

    def send_nowait(self, value: str | None) -> None:
        self.link.confirmed(self.cid, self.req, value)


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
        self.pending: dict[int, int] = {}  # cid -> req of the Join sent to a remote owner, unanswered
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
        cmd, undo = self._track(cmd)  # before the send: the actor may answer before we resume
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
        cmd, undo = self._track(cmd)
        try:
            await actor.inbox.send(cmd)
        except BaseException:
            undo()
            raise

    def register_abandoned(self, conn_id: Any) -> None:
        """The connection stopped waiting for its Register's answer (and said so): no
        answer to that Register may reach it now."""
        self.pending.pop(conn_id, None)
        member = self.members.get(conn_id)
        if member is None:
            return
        if not member.confirmed:
            del self.members[conn_id]
        else:  # in the room from before: it stays, and the late attempt is void
            member.waiting = None
            member.req = next(self.host.reqs)

    # ------------------------------------------------------------- internals
    def _track(self, cmd: Command) -> tuple[Command, Callable[[], None]]:
        """Remember what a restore elsewhere would need; returns the command to send (a
        Register: one answered through its member) and how to forget it again (the
        send failed)."""
        cid = cmd.conn.id  # type: ignore[union-attr]
        old = self.members.get(cid)
        kind = type(cmd)
        if kind is Message:
            if cmd.msg["type"] == "update_metadata" and old is not None:  # type: ignore[union-attr]
                before = old.metadata
                self._note_metadata(cid, cmd.msg)  # type: ignore[union-attr]
                return cmd, lambda: setattr(old, "metadata", before)
        elif kind is Register:
            member = Member(cmd, next(self.host.reqs))  # type: ignore[arg-type]
            member.confirmed = old is not None and old.confirmed  # a re-register: in the room either way
            self.members[cid] = member
            cmd = member.register(Confirm(self, cid, member.req), cmd.announce)  # type: ignore[union-attr]
        elif kind is Leave:  # gone from this room whether or not the Leave arrives
            self._forget(cid)
            return cmd, lambda: None

        def undo() -> None:
            if old is None:
                self.members.pop(cid, None)
            else:
                self.members[cid] = old

        return cmd, undo

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
        self._track(cmd)  # nothing to undo: publishing does not fail here
        out = self.host.outlink(owner)
        if kind is Register:
            self.restore(self.members[cid])
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
    def attempt(self, cid: int, req: int) -> Member | None:
        """`cid`'s member, if `req` is its newest attempt at registering (the only one
        that may be handled and answered)."""
        member = self.members.get(cid)
        return member if member is not None and member.req == req else None

    def confirmed(self, cid: int, req: int, value: str | None) -> None:
        """Attempt `req` at registering `cid` was answered: the peer id bound, or None
        (refused; a restore into a room now full, say: not in the room). Only the
        member's newest attempt counts; its connection, if it waits, gets the answer."""
        member = self.attempt(cid, req)
        if member is None:
            return
        waiting, member.waiting = member.waiting, None
        if value is None:
            del self.members[cid]
            member.conn.room_lost(self)
        else:
            member.confirmed = True
            member.peer_id = value
        if waiting is not None:
            try:
                waiting.send_nowait(value)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the connection stopped waiting

    def joined(self, answer: wire.Joined) -> None:
        """The owner's answer to a Join we sent it: given to the peer only if it is the
        answer to the newest (an older one crossed a move of the room)."""
        if self.pending.get(answer.cid) != answer.req:
            self.host.metrics.cluster_duplicates += 1
            return
        del self.pending[answer.cid]
        member = self.attempt(answer.cid, answer.req)
        if member is not None:
            for text in answer.texts or ():
                member.conn.deliver(text)
        self.confirmed(answer.cid, answer.req, answer.peer_id)

    def restore_all(self) -> None:
        """Send every member (and every unanswered Register and request) to the room's
        new home."""
        self.pending = {}
        for cid, member in list(self.members.items()):
            self.restore(member)
            self.resend_requests(cid)

    def resend(self, cid: int) -> None:
        """One Register the owner bounced ("not mine"), sent again to the current owner."""
        member = self.members.get(cid)
        if self.pending.pop(cid, None) is None or member is None:
            return
        self.restore(member)

    def restore(self, member: Member) -> None:
        """Send `member`'s Register (again) to wherever the room is now, as its newest
        attempt. A peer whose connection waits for the answer, or that was never
        confirmed, gets `registered_auth` from it; a peer already told does not."""
        cid = member.conn.id
        req = member.req = next(self.host.reqs)
        announce = member.waiting is not None or not member.confirmed
        if self.actor is not None:
            cmd = member.register(Confirm(self, cid, req), announce)
            try:
                self.actor.inbox.send_nowait(cmd)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.host.spawn(to_actor, self.actor, cmd)
        else:
            assert self.owner is not None
            self.pending[cid] = req
            self.host.outlink(self.owner).put(member.join(self.room_id, announce))
