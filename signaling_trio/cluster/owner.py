"""A room's owner, serving connections that live on other instances.

Owns: the `RemoteConn`s of the rooms this instance runs (by room and home instance),
when each home was last heard of, and what the owner does with each item a home sends
it: `Join`, `Send`, `Part`, `Present`, `Ask`.
Never touches: leases (it asks `own` whether a room runs here), links, Redis.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import trio

from .._actors import Leave, Message, Register, RoomActor, RoomSupervisor
from .._log import event
from ..protocol import errors as E
from ..protocol.messages import decode, dumps
from . import wire
from .link import LinkHost, RemoteAnswer, RemoteConn, RemoteReply, to_actor

SILENT_AFTER = 4.0  # an instance not heard from this long has lost its connections
REPLY_TIMEOUT = 5.0  # longest an HTTP call from another instance waits for the room


class OwnerSide:
    def __init__(self, host: LinkHost, supervisor: RoomSupervisor,
                 own: Callable[[str], Awaitable[str | None]]) -> None:
        self.host = host
        self.supervisor = supervisor
        self.own = own  # makes sure a room whose lease is ours runs here; the owner's id
        # remote connections by (room, home instance), and when each home was heard of
        self.remote: dict[tuple[str, str], dict[int, RemoteConn]] = {}
        self.heard: dict[tuple[str, str], float] = {}

    def handlers(self) -> dict[type, Callable[[str, Any], Awaitable[None]]]:
        return {wire.Send: self.on_send, wire.Join: self.on_join, wire.Part: self.on_part,
                wire.Present: self.on_present, wire.Ask: self.on_ask}

    def _conn(self, room_id: str, src: str, cid: int) -> RemoteConn | None:
        return self.remote.get((room_id, src), {}).get(cid)

    async def on_send(self, src: str, item: wire.Send) -> None:
        rc = self._conn(item.room_id, src, item.cid)
        actor = self.supervisor.rooms.get(item.room_id)
        out = self.host.outlink(src)
        if rc is None or actor is None:
            # not (or no longer) the room's owner, or the peer is not known here yet: a
            # request goes back to be sent again; anything else is counted as lost
            if item.seq is not None:
                out.put(wire.Bounce(item.room_id, item.cid, item.seq))
            else:
                self.host.metrics.cluster_drops += 1
            return
        hold = None
        if item.seq is not None:
            if item.seq <= rc.last_seq:  # sent again, but already taken here: its answer is on its way
                return
            rc.last_seq = item.seq
            hold = RemoteAnswer(rc, item.seq)
        try:
            msg = decode(item.raw)
        except E.ProtocolError as exc:  # (its instance decoded it already: not expected)
            self.host.metrics.errors_by_code[exc.code] += 1
            text = dumps(exc.to_message())
            out.put(wire.Answer(item.room_id, item.cid, item.seq, [text]) if item.seq is not None
                    else wire.Deliver(item.room_id, item.cid, text))
            return
        if not await to_actor(actor, Message(rc, msg, item.raw, hold)) and item.seq is not None:
            out.put(wire.Bounce(item.room_id, item.cid, item.seq))  # the room ended here: again, elsewhere

    async def on_join(self, src: str, item: wire.Join) -> None:
        room_id, cid = item.room_id, item.cid
        owner = await self.own(room_id)
        actor = self.supervisor.rooms.get(room_id) if owner == self.host.id else None
        if actor is None:
            self.host.outlink(src).put(wire.NotOwner(room_id, cid, item.req, owner))
            return
        conns = self.remote.setdefault((room_id, src), {})
        rc = conns.get(cid)
        if rc is None:
            rc = conns[cid] = RemoteConn(self.host, src, cid, room_id)
        self.heard[(room_id, src)] = trio.current_time()

        def refused() -> None:
            if rc not in actor.state.by_conn:
                conns.pop(cid, None)

        reply = RemoteReply(rc, item.req, on_refused=refused)
        await to_actor(actor, Register(rc, item.peer_id, item.subject, item.role, item.metadata, item.token,
                                       reply, announce=bool(item.announce), is_admin=bool(item.is_admin),
                                       welcome=item.welcome, restored=bool(item.restored), answer=reply))

    async def on_part(self, src: str, item: wire.Part) -> None:
        rc = self.remote.get((item.room_id, src), {}).pop(item.cid, None)
        actor = self.supervisor.rooms.get(item.room_id)
        if rc is not None and actor is not None:
            await to_actor(actor, Leave(rc))

    async def on_present(self, src: str, item: wire.Present) -> None:
        """A home's heartbeat: forget its connections it no longer lists; ask it to
        restore the ones it lists and we do not know."""
        actor = self.supervisor.rooms.get(item.room_id)
        if actor is None:
            return
        self.heard[(item.room_id, src)] = trio.current_time()
        conns = self.remote.setdefault((item.room_id, src), {})
        listed = set(item.cids)
        for cid in [c for c in conns if c not in listed]:
            await to_actor(actor, Leave(conns.pop(cid)))
        unknown = [c for c in item.cids if c not in conns]
        if unknown:
            self.host.outlink(src).put(wire.Unknown(item.room_id, unknown))

    async def on_ask(self, src: str, item: wire.Ask) -> None:
        self.host.spawn(self._answer, src, item)

    async def _answer(self, src: str, item: wire.Ask) -> None:
        try:
            value = await self.supervisor.call(item.room_id, item.op, tuple(item.args), timeout=REPLY_TIMEOUT)
        except trio.TooSlowError:
            return  # the asker times out too
        self.host.outlink(src).put(wire.Result(item.req, value))

    # ------------------------------------------------------------ upkeep
    def drop_room(self, room_id: str) -> list[str]:
        """The room no longer runs here: forget its remote connections; the homes they
        lived on."""
        homes = []
        for key in [k for k in self.remote if k[0] == room_id]:
            del self.remote[key]
            self.heard.pop(key, None)
            homes.append(key[1])
        return homes

    async def forget_silent(self, now: float) -> None:
        """Homes not heard of for SILENT_AFTER (SIGKILLed, or cut off from Redis): their
        connections leave (no ghosts)."""
        for key, last in list(self.heard.items()):
            if now - last < SILENT_AFTER:
                continue
            del self.heard[key]
            conns = self.remote.pop(key, {})
            actor: RoomActor | None = self.supervisor.rooms.get(key[0])
            if conns:
                event(logging.WARNING, "instance silent", instance=key[1], room_id=key[0], peers=len(conns))
            for rc in conns.values():
                if actor is not None:
                    await to_actor(actor, Leave(rc))

    def homes(self, room_id: str) -> list[str]:
        return [instance for r, instance in self.remote if r == room_id]

