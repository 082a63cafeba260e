"""This instance as a member of the cluster: the `RoomRouter` with a Redis store.

Owns: this instance's id and channel, its room links, which rooms it owns (leases:
taken, renewed, lost, let go), following a room that moves, the heartbeat to each room's
owner, and what a connection's home does with each item an owner sends it.
Never touches: a room's state (its actor owns it), sockets, Redis directly (transport.py).

The design in short (docs/SCALING.md has the long form and every failure case):
- A live room has exactly one owner, the instance holding its lease (taken with one Lua
  step, renewed every RENEW s while the room lives). Only the owner runs the room's
  actor, so every room operation, a reservation above all, stays one actor's atomic step.
- A connection whose room is owned elsewhere sends its commands to the owner's channel
  (link.py); the owner holds a `RemoteConn` for it (owner.py). One publisher per
  destination instance keeps order, batches, and is bounded (outlink.py).
- Every HEARTBEAT s each instance tells each room's owner which of its connections are
  in the room; the owner forgets the others, and the ones of instances gone silent.
- A lease seen missing for TAKEOVER_AFTER s is taken by the next instance with
  connections in the room, which restores them there; the room's handover (saver.py)
  carries subscriptions and reservations across.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from typing import Any, Awaitable, Callable, Iterator, Sequence

import trio

from .._actors import Message, RoomActor, RoomSupervisor
from .._log import event
from .._metrics import Metrics
from .._router import Series
from ..protocol.messages import ANSWERED_TYPES
from ..store import StoreUnavailable
from . import wire
from .dealer import Dealer
from .link import RemoteConn, RoomLink
from .outlink import Outlink
from .owner import OwnerSide
from .saver import HandoverSaver
from .transport import Transport
from .upkeep import Upkeep

LEASE_MS = 2500  # a lease lives this long unless renewed
RENEW = 1.0  # owners renew their leases this often
RENEW_RETRY = 0.2  # and this often while Redis does not answer
RENEW_BATCH = 500  # leases renewed (or owners looked up) per Redis round trip
HEARTBEAT = 1.0  # instances tell owners who is in their rooms this often
TAKEOVER_AFTER = 0.9  # a lease seen missing on two heartbeats in a row is taken
OUTLINK_IDLE = 60.0  # a publisher task with nothing to send for this long ends


def _chunks(items: list[Any]) -> Iterator[list[Any]]:
    """`items`, RENEW_BATCH at a time (one Redis round trip each)."""
    for start in range(0, len(items), RENEW_BATCH):
        yield items[start:start + RENEW_BATCH]


class Cluster:
    def __init__(self, transport: Transport, supervisor: RoomSupervisor, metrics: Metrics) -> None:
        self.transport = transport
        self.supervisor = supervisor
        self.metrics = metrics
        self.id = secrets.token_hex(8)
        self.reqs = itertools.count(1)
        self.batches = itertools.count(1)  # numbers every batch this instance publishes
        self.last_batch: dict[str, int] = {}  # the newest batch number taken from each instance
        self.dealer = Dealer(self.id)  # --workers: which of the machine's processes gets a new room
        self.links: dict[str, RoomLink] = {}  # rooms with local connections, or owned here
        self.outlinks: dict[str, Outlink] = {}
        self.calls: dict[int, trio.MemorySendChannel[Any]] = {}
        self.owner_side = OwnerSide(self, supervisor, self._own)
        self.saver = HandoverSaver(transport, supervisor)
        self.upkeep = Upkeep(transport, supervisor, self.id)
        self._handlers: dict[type, Callable[[str, Any], Awaitable[None]]] = {
            **self.owner_side.handlers(),
            wire.Deliver: self._on_deliver, wire.Close: self._on_close, wire.Joined: self._on_joined,
            wire.NotOwner: self._on_not_owner, wire.Unknown: self._on_unknown, wire.Answer: self._on_answer,
            wire.Bounce: self._on_bounce, wire.LetGo: self._on_let_go, wire.Result: self._on_result,
        }
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------ tasks
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.supervisor.run)
            self.supervisor.on_retired = self.room_retired
            await nursery.start(self._subscriber)
            nursery.start_soon(self._tend_loop)
            nursery.start_soon(self._renew_loop)
            nursery.start_soon(self.upkeep.run)
            nursery.start_soon(self.saver.run)
            event(logging.INFO, "cluster joined", instance=self.id)
            task_status.started()

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def outlink(self, instance: str) -> Outlink:
        out = self.outlinks.get(instance)
        if out is None:
            out = self.outlinks[instance] = Outlink(self.transport, self.metrics, self.id, self.batches, instance)
            self.spawn(out.run)
        return out

    async def _subscriber(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Our channel, re-subscribed after every Redis outage (what was published
        meanwhile is lost; heartbeats and restores repair the rooms)."""
        started = False
        while True:
            try:
                async with self.transport.subscribe(self.id) as payloads:
                    if not started:
                        task_status.started()
                        started = True
                    else:
                        event(logging.INFO, "cluster channel back")
                    async for payload in payloads:
                        await self.receive(payload)
                await trio.sleep(0.5)  # the subscription ended by itself: start a new one
            except Exception as exc:  # noqa: BLE001 - coredis raises groups of connection errors
                if not started:
                    raise StoreUnavailable(f"cannot subscribe to the cluster channel ({type(exc).__name__})") from None
                event(logging.WARNING, "cluster channel lost", error=type(exc).__name__)
                await trio.sleep(0.5)

    async def receive(self, payload: bytes | str) -> None:
        """One batch from another instance: each item to its handler, in order."""
        try:
            batch = wire.decode_batch(payload)
        except wire.Unreadable:
            event(logging.WARNING, "cluster message unreadable")
            return
        if batch.number <= self.last_batch.get(batch.source, -1):
            self.metrics.cluster_duplicates += len(batch.items)
            return
        self.last_batch[batch.source] = batch.number
        for raw in batch.items:
            try:
                item = wire.decode_item(raw)
                await self._handlers[type(item)](batch.source, item)
            except (wire.Unreadable, IndexError, KeyError, TypeError, ValueError) as exc:
                event(logging.WARNING, "cluster item unreadable", kind=str(raw[:1]) if isinstance(raw, list) else "?",
                      error=type(exc).__name__)
        self.metrics.cluster_received += len(batch.items)

    # ------------------------------------------- items to a connection's home
    def _member_conn(self, room_id: str, cid: int) -> Any:
        link = self.links.get(room_id)
        member = link.members.get(cid) if link is not None else None
        return member.conn if member is not None else None

    async def _on_deliver(self, src: str, item: wire.Deliver) -> None:
        conn = self._member_conn(item.room_id, item.cid)
        if conn is not None:
            conn.deliver(item.text)

    async def _on_close(self, src: str, item: wire.Close) -> None:
        conn = self._member_conn(item.room_id, item.cid)
        if conn is not None:
            conn.request_close(item.code, item.reason)

    async def _on_joined(self, src: str, item: wire.Joined) -> None:
        link = self.links.get(item.room_id)
        if link is not None:
            link.joined(item)

    async def _on_not_owner(self, src: str, item: wire.NotOwner) -> None:
        """The room moved (or its owner could not tell): find it, send the Register again."""
        link = self.links.get(item.room_id)
        if link is not None and link.actor is None:
            if link.pending.get(item.cid) == item.req:
                self.spawn(self._relocate, link, item.cid)

    async def _on_unknown(self, src: str, item: wire.Unknown) -> None:
        """The owner does not know these connections: restore them."""
        link = self.links.get(item.room_id)
        if link is not None and link.actor is None:
            for cid in item.cids:
                member = link.members.get(cid)
                if member is not None and member.confirmed and cid not in link.pending:
                    link.restore(member)

    async def _on_answer(self, src: str, item: wire.Answer) -> None:
        link = self.links.get(item.room_id)
        member = link.members.get(item.cid) if link is not None else None
        if link is not None and member is not None and link.answered(item.cid, item.seq):
            for text in item.texts:
                member.conn.deliver(text)
        else:
            self.metrics.cluster_duplicates += 1

    async def _on_bounce(self, src: str, item: wire.Bounce) -> None:
        link = self.links.get(item.room_id)
        if link is not None and link.actor is None:
            self.spawn(self._resend_bounced, link, item.cid, item.seq)

    async def _on_let_go(self, src: str, item: wire.LetGo) -> None:
        link = self.links.get(item.room_id)
        if link is not None and link.actor is None:
            self.spawn(self._relocate, link)

    async def _on_result(self, src: str, item: wire.Result) -> None:
        waiting = self.calls.pop(item.req, None)
        if waiting is not None:
            waiting.send_nowait(item.value)

    # ------------------------------------------------------- ownership
    async def _lease(self, room_id: str) -> str:
        """Who owns the room now, taking it if nobody does. StoreUnavailable if unsure."""
        return await self.transport.acquire(room_id, self.id, LEASE_MS)

    async def _own(self, room_id: str) -> str | None:
        """For a Register arriving from another instance: make sure the room is live here
        if this instance owns it (starting it if needed); the owner's id, None if unsure."""
        if room_id in self.supervisor.rooms:
            return self.id
        try:
            owner = await self._lease(room_id)
        except StoreUnavailable:
            return None
        if owner == self.id:
            self._adopt(self._link(room_id), owner)
        return owner

    def _link(self, room_id: str) -> RoomLink:
        link = self.links.get(room_id)
        if link is None:
            link = self.links[room_id] = RoomLink(self, room_id)
        return link

    async def open(self, room_id: str, candidates: Sequence[str] = ()) -> RoomLink:
        """The way into a room for a local connection that registers (StoreUnavailable
        when Redis cannot say who owns it). A room nobody owns is taken here, or, given
        `candidates`, by the one this instance has given fewest new rooms."""
        link = self.links.get(room_id)
        if link is not None and (link.actor is not None or link.owner not in (None, self.id)):
            return link
        owner = await (self._place(room_id, candidates) if len(candidates) > 1 else self._lease(room_id))
        link = self._link(room_id)  # (another connection may have made it meanwhile)
        if owner == self.id:
            if link.actor is None:
                self._adopt(link, owner)
        elif link.owner != owner or link.actor is not None:
            self._adopt(link, owner)
        return link

    async def _place(self, room_id: str, candidates: Sequence[str]) -> str:
        """Who owns the room, a new one given to the next of `candidates` (`Dealer`)."""
        pick = self.dealer.pick(candidates)
        made = False
        try:
            owner, made = await self.transport.place(room_id, pick, LEASE_MS)
        finally:
            if not made:
                self.dealer.give_back(pick)
        return owner

    def _adopt(self, link: RoomLink, owner: str) -> None:
        """Point the link at the room's (new) owner and move its members there."""
        if owner == self.id:
            if link.actor is None:
                actor = self.supervisor.rooms.get(link.room_id)
                if actor is None:
                    actor = self.supervisor.room(link.room_id)
                    self.saver.watch(actor)
                    self.spawn(self.saver.load, actor)
                link.actor = actor
                link.owner = owner
                link.restore_all()
            return
        moved = link.owner is not None and link.owner != owner
        if link.actor is not None:  # we lost the room: it lives on elsewhere
            actor, link.actor = link.actor, None
            self._keep_queued_requests(link, actor)
            self.supervisor.give_up(actor)
            self.owner_side.drop_room(link.room_id)
            moved = True
            event(logging.WARNING, "room lease lost", room_id=link.room_id, owner=owner)
        link.owner = owner
        link.missing_since = None
        if moved:
            link.restore_all()

    def _keep_queued_requests(self, link: RoomLink, actor: RoomActor) -> None:
        """Our local peers' requests still queued for an actor we give up go to the new
        owner with the rest (other instances' peers resend their own). A queued Register
        needs nothing: its member's restore carries it, and its connection's reply."""
        now = trio.current_time()
        for cmd in actor.take_queued():
            # (a request sent again from `awaiting` is still there: it goes with the rest)
            if (type(cmd) is Message and cmd.answer is None and cmd.msg["type"] in ANSWERED_TYPES
                    and not isinstance(cmd.conn, RemoteConn)):
                link.awaiting.setdefault(cmd.conn.id, {})[next(self.reqs)] = (cmd.raw, now)

    def room_retired(self, actor: RoomActor) -> None:
        """The owner's actor ended (room empty, or crashed): forget what pointed at it.
        The lease lapses by itself; a Register before then restarts the room here."""
        room_id = actor.room_id
        link = self.links.get(room_id)
        if link is not None and link.actor is actor:
            link.actor = None
            link.owner = None
            if not link.members:
                del self.links[room_id]
        self.owner_side.drop_room(room_id)
        if actor.on_handover_change is not None:
            self.saver.ended(room_id)

    async def _relocate(self, link: RoomLink, bounced: int | None = None) -> None:
        """Follow the room to its owner now (taking it if nobody has it). `bounced`: a
        connection whose Register the old owner sent back; it goes again either way."""
        try:
            owner = await self._lease(link.room_id)
        except StoreUnavailable:
            return  # the tend loop tries again; a bounced Register's connection times out
        if self.links.get(link.room_id) is not link or link.actor is not None:
            return
        moved = link.owner != owner
        self._adopt(link, owner)
        if bounced is not None and not (moved or owner == self.id):
            link.resend(bounced)  # same owner as before: nothing else was re-sent

    async def _resend_bounced(self, link: RoomLink, cid: int, seq: int) -> None:
        """Find the room's owner again; make sure it knows the peer; send the request."""
        while True:
            try:
                owner = await self._lease(link.room_id)
                break
            except StoreUnavailable:  # Redis is away: the request waits for it (or expires)
                await trio.sleep(0.5)
                if seq not in link.awaiting.get(cid, {}):
                    return
        if self.links.get(link.room_id) is not link:
            return
        if link.actor is None and link.owner != owner:
            self._adopt(link, owner)  # a move: restores everyone, sends every request again
            return
        member = link.members.get(cid)
        if link.actor is None and member is not None and member.confirmed and cid not in link.pending:
            link.restore(member)
        link.resend_requests(cid, since=seq)

    async def _tend_loop(self) -> None:
        """Each HEARTBEAT: tell owners who is here; follow rooms whose owner changed or
        vanished; end idle publishers; forget remote connections of silent instances."""
        while True:
            await trio.sleep(HEARTBEAT)
            now = trio.current_time()
            await self._tend_links(now)
            for instance, out in list(self.outlinks.items()):
                if now - out.last_put > OUTLINK_IDLE and not out.queued():
                    del self.outlinks[instance]  # e.g. an instance that is gone
                    out.close()
            await self.owner_side.forget_silent(now)

    async def _tend_links(self, now: float) -> None:
        """The rooms our connections are in and another instance owns: their owners,
        looked up RENEW_BATCH to a Redis round trip."""
        remote = []
        for room_id, link in list(self.links.items()):
            if link.actor is not None:
                continue
            link.expire_requests(now)
            if not link.members and not link.pending:
                if self.links.get(room_id) is link:
                    del self.links[room_id]
                continue
            remote.append(link)
        for batch in _chunks(remote):
            try:
                owners = await self.transport.owners([link.room_id for link in batch])
            except StoreUnavailable:
                for other in self.links.values():  # a lease counts as missing only while Redis is here
                    other.missing_since = None
                return  # Redis is away: try again next round
            for link, owner in zip(batch, owners):
                await self._tend_link(link, owner, now)

    async def _tend_link(self, link: RoomLink, owner: str | None, now: float) -> None:
        if self.links.get(link.room_id) is not link or link.actor is not None:
            return
        if owner is None:
            if link.missing_since is None:
                link.missing_since = now
            if now - link.missing_since >= TAKEOVER_AFTER:
                await self._relocate(link)
        elif owner != link.owner:
            self._adopt(link, owner)
        else:
            link.missing_since = None
            self.outlink(owner).put(wire.Present(link.room_id, list(link.members)))

    async def _renew_loop(self) -> None:
        """Every RENEW s, renew the leases of the rooms that run here, RENEW_BATCH to a
        Redis round trip (one each cost ~0.4 ms of CPU: 1,000 idle rooms kept 40 % of a
        core busy)."""
        pause = RENEW
        while True:
            await trio.sleep(pause)
            pause = RENEW
            for batch in _chunks(list(self.supervisor.rooms)):
                try:
                    owners = await self.transport.renew(batch, self.id, LEASE_MS)
                except StoreUnavailable:
                    # keep serving, and try again soon: when Redis is back, the owner takes
                    # its leases again before any other instance may (TAKEOVER_AFTER)
                    pause = RENEW_RETRY
                    break
                for room_id, owner in zip(batch, owners):
                    if owner != self.id and room_id in self.supervisor.rooms:
                        self._adopt(self._link(room_id), owner)

    # ------------------------------------------------------ the router
    async def call(self, room_id: str, op: str, *args: Any, timeout: float = 5.0) -> Any:
        if room_id in self.supervisor.rooms:
            return await self.supervisor.call(room_id, op, args, timeout=timeout)
        owner = await self.transport.owner(room_id)
        if owner is None:
            return None
        if owner == self.id:
            return await self.supervisor.call(room_id, op, args, timeout=timeout)
        req = next(self.reqs)
        send, recv = trio.open_memory_channel[Any](1)
        self.calls[req] = send
        try:
            self.outlink(owner).put(wire.Ask(room_id, req, op, list(args)))
            with trio.fail_after(timeout):
                return await recv.receive()
        finally:
            self.calls.pop(req, None)

    def note_peer(self, peer_id: str, room_id: str) -> None:
        self.supervisor.note_peer(peer_id, room_id)
        self.upkeep.note_peer(peer_id, room_id)

    async def find_room(self, peer_id: str) -> str | None:
        return self.supervisor.last_room.get(peer_id) or await self.upkeep.find_room(peer_id)

    def owner_elsewhere(self, room_id: str) -> str | None:
        """Another instance, if it owns this room (as far as the link opened for it knows)."""
        link = self.links.get(room_id)
        if link is None or link.actor is not None or link.owner in (None, self.id):
            return None
        return link.owner

    def json_fields(self) -> dict[str, Any]:
        return {"instance": self.id, "cluster": dict(self.upkeep.view)} | {s.name: s.value for s in self.series()
                                                                           if s.kind == "counter"}

    def series(self) -> list[Series]:
        view, m = self.upkeep.view, self.metrics
        return [
            Series("cluster_instances", "signaling_cluster_instances", "Live instances on this Redis", "gauge",
                   view["instances"]),
            Series("cluster_rooms", "signaling_cluster_rooms", "Live rooms, all instances", "gauge",
                   view["active_rooms"]),
            Series("cluster_peers", "signaling_cluster_peers", "Registered peers, all instances", "gauge",
                   view["active_connections"]),
            Series("cluster_items_sent", "signaling_cluster_items_sent", "Items published to other instances",
                   "counter", m.cluster_sent),
            Series("cluster_items_received", "signaling_cluster_items_received",
                   "Items received from other instances", "counter", m.cluster_received),
            Series("cluster_items_dropped", "signaling_cluster_items_dropped",
                   "Items to other instances dropped (queue full, Redis away over 10 s, nobody receiving)",
                   "counter", m.cluster_drops),
            Series("cluster_items_duplicate", "signaling_cluster_items_duplicate",
                   "Items received twice (a batch published again, a request answered by two owners "
                   "around a move), not delivered", "counter", m.cluster_duplicates),
        ]

    # --------------------------------------------------------- shutdown
    async def _flushed(self) -> None:
        """Wait until every outlink has published what is queued (the caller bounds it)."""
        while any(out.queued() for out in self.outlinks.values()):
            await trio.sleep(0.02)

    async def stop(self) -> None:
        """Graceful shutdown: flush what is queued for other instances, and let go of our
        leases so that another instance takes our rooms without waiting for them to lapse."""
        with trio.move_on_after(1.5):
            await self._flushed()
            for room_id in list(self.supervisor.rooms):
                with trio.move_on_after(0.5):
                    try:
                        await self.transport.release(room_id, self.id)
                    except StoreUnavailable:
                        break
                for instance in self.owner_side.homes(room_id):
                    self.outlink(instance).put(wire.LetGo(room_id))  # their peers move at once
            await self._flushed()
            try:
                await self.transport.leave(self.id)
            except StoreUnavailable:
                pass

