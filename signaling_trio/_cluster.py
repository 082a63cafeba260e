"""Many instances, one logical server: rooms shared through Redis (`--store redis://`).

Owns: this instance's id and Redis channel, room ownership leases, the links that carry
a room's commands to the instance that owns it and the room's output back, failover.
Never touches: a room's state (its actor owns it), sockets, the room records (the store).

The design, in short (docs/SCALING.md has the long form and every failure case):

- A live room has exactly one owner, the instance holding `signaling:lease:{<room>}`
  (taken with one Lua step, SET if absent, and renewed every RENEW s while the room
  lives). Only the owner runs the room's actor, so every room operation, a reservation
  above all, stays one actor's atomic step, exactly as on one instance.
- Each instance subscribes to its own channel. A connection whose room is owned
  elsewhere sends its commands (Register, Message, Leave) to the owner's channel; the
  owner holds a `RemoteConn` for it whose `deliver()`/`request_close()` publish to the
  connection's instance. One publisher task per destination instance keeps order,
  batches, and is bounded (a full queue drops, like a full outbox).
- Every HEARTBEAT s each instance tells each room's owner which of its connections are in
  that room. The owner forgets remote connections that are not listed, or whose instance
  went silent for SILENT_AFTER s (a SIGKILLed instance, a Redis outage: no ghosts), and
  names the ones it does not know, which their instance restores.
- A lease seen missing for TAKEOVER_AFTER s (its owner died, or Redis lost it) is taken by
  the next instance with connections in the room, which restores them there (Register
  with announce=False: no second `registered_auth`).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Callable

import coredis
import coredis.exceptions
import orjson
import trio
from coredis.retry import NoRetryPolicy

from ._log import event
from ._rooms import Call, Leave, Message, Register, RoomActor
from .protocol import errors as E
from .protocol import metadata as md
from .protocol.messages import ANSWERED_TYPES, decode, dumps
from .store import StoreUnavailable

if TYPE_CHECKING:
    from .server import SignalingServer

PREFIX = "signaling"
LEASE_MS = 2500  # a lease lives this long unless renewed
RENEW = 1.0  # owners renew their leases this often
RENEW_RETRY = 0.2  # and this often while Redis does not answer
HEARTBEAT = 1.0  # instances tell owners who is in their rooms this often
SILENT_AFTER = 4.0  # an instance not heard from this long has lost its connections
TAKEOVER_AFTER = 0.9  # a lease seen missing on two heartbeats in a row is taken
REPLY_TIMEOUT = 5.0  # longest wait for another instance's answer
LINK_QUEUE = 20000  # items queued for one destination instance before drops
PUBLISH_BATCH = 512
OUTLINK_IDLE = 60.0  # a publisher task with nothing to send for this long ends
STATS_EVERY = 2.0
REDIS_TIMEOUT = 2.0
PUBLISH_RETRY_FOR = 10.0  # a batch that cannot be published (Redis away) is retried this long
PUBLISH_RETRY_EVERY = 0.25
REQUEST_DEADLINE = 15.0  # a request unanswered this long through a room's move gets ROOM_UNAVAILABLE
CARRY_WINDOW = 10.0  # after a room moved, how long its old subscriptions/reservations wait for their peers
MAX_FACTS_BYTES = 256 * 1024  # beyond this a room's saved facts leave out who-knows-whom lists

# The owner of a room's lease, taking it when nobody has it; renewing it when we do.
ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return v
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(room_id: str) -> str:
    return f"{PREFIX}:lease:{{{room_id}}}"  # same hash slot as the room's record


def facts_key(room_id: str) -> str:
    return f"{PREFIX}:facts:{{{room_id}}}"


def channel_of(instance: str) -> str:
    return f"{PREFIX}:instance:{instance}"


class Outlink:
    """Everything this instance sends to one other instance: ordered, batched, bounded."""

    def __init__(self, cluster: "Cluster", target: str) -> None:
        self.cluster = cluster
        self.target = target
        self.channel = channel_of(target)
        self._send, self._recv = trio.open_memory_channel[list[Any]](LINK_QUEUE)
        self.last_put = trio.current_time()

    def put(self, item: list[Any]) -> None:
        self.last_put = trio.current_time()
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self.cluster.metrics.cluster_drops += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def queued(self) -> int:
        return self._recv.statistics().current_buffer_used

    def close(self) -> None:
        """Idle: end the publisher task (a later put() goes through a new Outlink)."""
        self._send.close()

    async def run(self) -> None:
        cluster = self.cluster
        recv = self._recv
        async with recv:
            async for item in recv:
                batch = [item]
                while len(batch) < PUBLISH_BATCH:
                    try:
                        batch.append(recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                # "n": this instance's batch number, increasing: a batch published twice (a
                # retry after a publish that did go through) is taken once
                await self._publish(orjson.dumps({"f": cluster.id, "n": next(cluster.batches), "i": batch}),
                                    len(batch))

    async def _publish(self, payload: bytes, count: int) -> None:
        """Publish one batch. While Redis is away, or nobody receives it (the target is
        resubscribing after a Redis restart, or is gone), retry it, in order (nothing
        behind it overtakes), for up to PUBLISH_RETRY_FOR; then count it dropped."""
        cluster = self.cluster
        give_up = trio.current_time() + PUBLISH_RETRY_FOR
        failed = False
        while True:
            try:
                with trio.fail_after(REDIS_TIMEOUT):
                    if await cluster.redis.publish(self.channel, payload):
                        cluster.metrics.cluster_sent += count
                        return
                error = "no receiver"
            except (coredis.exceptions.RedisError, trio.TooSlowError, OSError) as exc:
                error = type(exc).__name__
            if not failed:
                event(logging.WARNING, "cluster publish failed", to=self.target, items=count, error=error)
                failed = True
            if trio.current_time() >= give_up:
                cluster.metrics.cluster_drops += count
                return
            await trio.sleep(PUBLISH_RETRY_EVERY)


class RemoteConn:
    """On a room's owner: a connection that lives on another instance."""

    __slots__ = ("id", "instance", "cid", "room_id", "cluster", "last_seq", "held")

    def __init__(self, cluster: "Cluster", instance: str, cid: int, room_id: str) -> None:
        self.last_seq = 0  # the newest request taken from this connection (a resent one is not taken twice)
        self.held: list[str] | None = None  # what the room says to it while answering a request
        self.id = f"{instance[:6]}/{cid}"
        self.cluster = cluster
        self.instance = instance
        self.cid = cid
        self.room_id = room_id

    def __repr__(self) -> str:
        return f"<RemoteConn {self.id} room={self.room_id}>"

    def deliver(self, text: str) -> None:
        if self.held is not None:
            self.held.append(text)
        else:
            self.cluster.outlink(self.instance).put(["o", self.room_id, self.cid, text])

    def request_close(self, code: int, reason: str) -> None:
        self.cluster.outlink(self.instance).put(["x", self.room_id, self.cid, code, reason])


class _Answer:
    """The answer to one request from another instance: everything the room says to the
    asker while handling it, sent back as one item tagged with the request's seq. The
    asker's instance delivers the first answer to each seq and drops any other (the
    request may have been sent to two owners around a move)."""

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
        rc.cluster.outlink(rc.instance).put(["A", rc.room_id, rc.cid, self.seq, texts])


class _LocalAnswer:
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


class _Reply:
    """A reply that crosses instances: `send_nowait(value)` publishes `head + [value]`."""

    __slots__ = ("cluster", "instance", "head", "on_none")

    def __init__(self, cluster: "Cluster", instance: str, head: list[Any], on_none: Any = None) -> None:
        self.cluster = cluster
        self.instance = instance
        self.head = head
        self.on_none = on_none

    def send_nowait(self, value: Any) -> None:
        if value is None and self.on_none is not None:
            self.on_none()
        self.cluster.outlink(self.instance).put([*self.head, value])


class Member:
    """A local connection in a room, as its link remembers it for a restore elsewhere."""

    __slots__ = ("conn", "peer_id", "sub", "role", "metadata", "token", "req", "confirmed")

    def __init__(self, cmd: Register, req: int) -> None:
        self.conn = cmd.conn
        self.peer_id = cmd.peer_id
        self.sub = cmd.sub
        self.role = cmd.role
        self.metadata = cmd.metadata
        self.token = cmd.token
        self.req = req
        self.confirmed = False

    def register(self, reply: Any, announce: bool) -> Register:
        return Register(self.conn, self.peer_id, self.sub, self.role, self.metadata, self.token, reply, announce)


class _Confirm:
    """Wraps a Register's reply: records the outcome on the member, then passes it on."""

    __slots__ = ("link", "cid", "req", "reply")

    def __init__(self, link: "RoomLink", cid: int, req: int, reply: Any) -> None:
        self.link, self.cid, self.req, self.reply = link, cid, req, reply

    def send_nowait(self, value: Any) -> None:
        self.link.confirmed(self.cid, self.req, value)
        if self.reply is not None:
            try:
                self.reply.send_nowait(value)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # the connection stopped waiting


def _unwrap(reply: Any) -> Any:
    return reply.reply if isinstance(reply, _Confirm) else reply


class RoomLink:
    """This instance's way into one room, wherever the room lives. Connections hold the
    link (as `Connection.actor`) and use `link.inbox` like an actor's inbox; the link
    sends to the local actor when this instance owns the room, else to the owner."""

    def __init__(self, cluster: "Cluster", room_id: str) -> None:
        self.cluster = cluster
        self.room_id = room_id
        self.owner: str | None = None
        self.actor: RoomActor | None = None
        self.members: dict[int, Member] = {}
        self.pending: dict[int, tuple[int, Any]] = {}  # cid -> (req, reply), remote only
        # requests sent to a remote owner and not yet answered: cid -> {seq: (raw, sent_at)};
        # sent again to the next owner if the room moves before they are answered
        self.awaiting: dict[int, dict[int, tuple[str, float]]] = {}
        self.missing_since: float | None = None

    @property
    def inbox(self) -> "RoomLink":
        return self

    # -------------------------------------------------- the inbox interface
    def send_nowait(self, cmd: Any) -> None:
        actor = self.actor
        if actor is not None:
            cmd = self._confirming(cmd)
            undo = self._track(cmd)  # before the send: the actor may answer before we resume
            try:
                actor.inbox.send_nowait(cmd)
            except BaseException:
                undo()
                raise
        else:
            self._remote(cmd)

    async def send(self, cmd: Any) -> None:
        actor = self.actor
        if actor is not None:
            cmd = self._confirming(cmd)
            undo = self._track(cmd)
            try:
                await actor.inbox.send(cmd)
            except BaseException:
                undo()
                raise
        else:
            self._remote(cmd)

    def forget_register(self, cid: int) -> None:
        """The connection stopped waiting for its Register's answer."""
        self.pending.pop(cid, None)
        member = self.members.get(cid)
        if member is not None and not member.confirmed:
            del self.members[cid]

    # ------------------------------------------------------------ internals
    def _confirming(self, cmd: Any) -> Any:
        """A Register whose answer also records the outcome on its member."""
        if type(cmd) is Register and not isinstance(cmd.reply, _Confirm):
            req = next(self.cluster.reqs)
            cmd.reply = _Confirm(self, cmd.conn.id, req, cmd.reply)
        return cmd

    def _track(self, cmd: Any) -> Callable[[], None]:
        """Remember what a restore elsewhere would need; returns how to forget it again
        (the send failed)."""
        cid = cmd.conn.id
        old = self.members.get(cid)
        kind = type(cmd)
        if kind is Message:
            if cmd.msg["type"] == "update_metadata" and old is not None:
                before = old.metadata
                self._note_metadata(cid, cmd.msg)
                return lambda: setattr(old, "metadata", before)
        elif kind is Register:
            member = Member(cmd, cmd.reply.req)
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

    def _remote(self, cmd: Any) -> None:
        owner = self.owner
        cid = cmd.conn.id
        kind = type(cmd)
        if owner is None:  # the room ended here (emptied by a kick, or crashed)
            self._forget(cid)
            if kind is not Leave:
                raise trio.BrokenResourceError("the room is gone")  # the connection says NOT_IN_ROOM
            return
        if kind not in (Message, Register, Leave):
            raise TypeError(f"a room link does not carry {kind.__name__}")
        cmd = self._confirming(cmd)
        self._track(cmd)  # nothing to undo: publishing does not fail here
        if kind is Register:
            self.restore(self.members[cid], _unwrap(cmd.reply), cmd.announce)
        elif kind is Leave:
            self.cluster.outlink(owner).put(["L", self.room_id, cid])
        elif cmd.msg["type"] in ANSWERED_TYPES:
            seq = next(self.cluster.reqs)
            self.awaiting.setdefault(cid, {})[seq] = (cmd.raw, trio.current_time())
            self.cluster.outlink(owner).put(["M", self.room_id, cid, cmd.raw, seq])
        else:
            self.cluster.outlink(owner).put(["M", self.room_id, cid, cmd.raw])

    # ------------------------------------------------ requests through a move
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
                local.append(Message(member.conn, decode(raw), raw, _LocalAnswer(self, cid, seq)))
            elif self.owner is not None:
                self.cluster.outlink(self.owner).put(["M", self.room_id, cid, raw, seq])
        if local:
            self.cluster.spawn(_to_actor, self.actor, *local)

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
                    self.cluster.metrics.errors_by_code[E.ROOM_UNAVAILABLE] += 1
                    member.conn.deliver(dumps(E.ProtocolError(
                        E.ROOM_UNAVAILABLE, "the room is moving between servers and did not answer in time; "
                        "send the request again").to_message()))
            if not waiting:
                del self.awaiting[cid]

    def confirmed(self, cid: int, req: int, value: Any) -> None:
        member = self.members.get(cid)
        if member is None or member.req != req:
            return
        if value is None:
            del self.members[cid]
            conn = member.conn
            if getattr(conn, "actor", None) is self and getattr(conn, "room_id", None) == self.room_id:
                conn._lost_room()
        else:
            member.confirmed = True
            member.peer_id = value

    def restore_all(self) -> None:
        """Send every member (and every unanswered Register and request) to the room's
        new home."""
        pending = self.pending
        self.pending = {}
        for cid, member in list(self.members.items()):
            waiting = pending.get(cid)
            if member.confirmed:
                self.restore(member, None, False)
            else:  # its connection still waits for the answer
                self.restore(member, _unwrap(waiting[1]) if waiting else None, True)
            self.resend_requests(cid)

    def resend(self, cid: int) -> None:
        """One Register the owner bounced ("not mine"), sent again to the current owner."""
        waiting = self.pending.pop(cid, None)
        member = self.members.get(cid)
        if waiting is None or member is None:
            return
        self.restore(member, _unwrap(waiting[1]), not member.confirmed)

    def restore(self, member: Member, reply: Any, announce: bool) -> None:
        """Send `member`'s Register (again) to wherever the room is now; the answer is
        recorded on the member, then handed to `reply` (if any)."""
        cid = member.conn.id
        req = member.req = next(self.cluster.reqs)
        if self.actor is not None:
            cmd = member.register(_Confirm(self, cid, req, reply), announce)
            try:
                self.actor.inbox.send_nowait(cmd)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self.cluster.spawn(_to_actor, self.actor, cmd)
        else:
            assert self.owner is not None
            self.pending[cid] = (req, _Confirm(self, cid, req, reply))
            self.cluster.outlink(self.owner).put([
                "R", self.room_id, cid, req, member.peer_id, member.sub, member.role,
                member.metadata, member.token, announce,
            ])


async def _to_actor(actor: RoomActor, *cmds: Any) -> bool:
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


class Cluster:
    def __init__(self, server: "SignalingServer", redis: Any) -> None:
        self.server = server
        self.supervisor = server.supervisor
        self.metrics = server.metrics
        self.redis = redis
        self.id = secrets.token_hex(8)
        self.reqs = itertools.count(1)
        self.batches = itertools.count(1)  # numbers every batch this instance publishes
        self.last_batch: dict[str, int] = {}  # the newest batch number taken from each instance
        self.links: dict[str, RoomLink] = {}  # rooms with local connections, or owned here
        self.outlinks: dict[str, Outlink] = {}
        # on an owner: remote connections by (room, instance), and when each was heard of
        self.remote: dict[tuple[str, str], dict[int, RemoteConn]] = {}
        self.heard: dict[tuple[str, str], float] = {}
        self.calls: dict[int, Any] = {}
        self.view: dict[str, Any] = {"instances": 1, "active_rooms": 0, "active_connections": 0,
                                     "peers_by_role": {}}
        self._chores_send, self._chores_recv = trio.open_memory_channel[tuple[str, str]](10000)
        # rooms whose subscriptions/reservations changed (None: the room ended, forget them)
        self._dirty: dict[str, RoomActor | None] = {}
        self._dirty_event = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._acquire = redis.register_script(ACQUIRE)
        self._release = redis.register_script(RELEASE)

    # ------------------------------------------------------------ tasks
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.supervisor.cluster = self
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._subscriber)
                nursery.start_soon(self._tend_loop)
                nursery.start_soon(self._renew_loop)
                nursery.start_soon(self._stats_loop)
                nursery.start_soon(self._chores)
                nursery.start_soon(self._facts_writer)
                event(logging.INFO, "cluster joined", instance=self.id)
                task_status.started()
        finally:
            self.supervisor.cluster = None

    def spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    def outlink(self, instance: str) -> Outlink:
        out = self.outlinks.get(instance)
        if out is None:
            out = self.outlinks[instance] = Outlink(self, instance)
            self.spawn(out.run)
        return out

    async def _subscriber(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Our channel, re-subscribed after every Redis outage (what was published
        meanwhile is lost; heartbeats and restores repair the rooms)."""
        started = False
        while True:
            try:
                async with self.redis.pubsub(channels=[channel_of(self.id)], ignore_subscribe_messages=True,
                                             retry_policy=NoRetryPolicy(), max_idle_seconds=2) as ps:
                    if not started:
                        task_status.started()
                        started = True
                    else:
                        event(logging.INFO, "cluster channel back")
                    await self._consume(ps)
                await trio.sleep(0.5)  # the subscription ended by itself: start a new one
            except Exception as exc:  # noqa: BLE001 - coredis raises groups of connection errors
                if not started:
                    raise StoreUnavailable(f"cannot subscribe to the cluster channel ({type(exc).__name__})") from None
                event(logging.WARNING, "cluster channel lost", error=type(exc).__name__)
                await trio.sleep(0.5)

    async def _consume(self, ps: Any) -> None:
        async for message in ps:
            if message["type"] != "message":
                continue
            try:
                batch = orjson.loads(message["data"])
                src, number, items = batch["f"], batch["n"], batch["i"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                event(logging.WARNING, "cluster message unreadable")
                continue
            if number <= self.last_batch.get(src, -1):
                self.metrics.cluster_duplicates += len(items)
                continue
            self.last_batch[src] = number
            for item in items:
                try:
                    await self._handle(src, item)
                except (IndexError, KeyError, TypeError, ValueError) as exc:
                    event(logging.WARNING, "cluster item unreadable", kind=str(item[:1]),
                          error=type(exc).__name__)
            self.metrics.cluster_received += len(items)

    async def _handle(self, src: str, item: list[Any]) -> None:
        kind = item[0]
        # ---- to this instance as a room's owner
        if kind == "M":
            room_id, cid, raw = item[1:4]
            seq = item[4] if len(item) > 4 else None
            rc = self.remote.get((room_id, src), {}).get(cid)
            actor = self.supervisor.rooms.get(room_id)
            if rc is None or actor is None:
                # not (or no longer) the room's owner, or the peer is not known here yet: a
                # request goes back to be sent again; anything else is counted as lost
                if seq is not None:
                    self.outlink(src).put(["n", room_id, cid, seq])
                else:
                    self.metrics.cluster_drops += 1
                return
            hold = None
            if seq is not None:
                if seq <= rc.last_seq:  # sent again, but already taken here: its answer is on its way
                    return
                rc.last_seq = seq
                hold = _Answer(rc, seq)
            try:
                msg = decode(raw)
            except E.ProtocolError as exc:  # (its instance decoded it already: not expected)
                if seq is not None:
                    self.outlink(src).put(["A", room_id, cid, seq, [dumps(exc.to_message())]])
                else:
                    self._error_to(src, room_id, cid, exc)
                return
            if not await _to_actor(actor, Message(rc, msg, raw, hold)) and seq is not None:
                self.outlink(src).put(["n", room_id, cid, seq])  # the room ended here: again, elsewhere
        elif kind == "R":
            _, room_id, cid, req, peer_id, sub, role, metadata, token, announce = item
            owner = await self._own(room_id)
            actor = self.supervisor.rooms.get(room_id) if owner == self.id else None
            if actor is None:
                self.outlink(src).put(["m", room_id, cid, req, owner])
                return
            conns = self.remote.setdefault((room_id, src), {})
            rc = conns.get(cid)
            if rc is None:
                rc = conns[cid] = RemoteConn(self, src, cid, room_id)
            self.heard[(room_id, src)] = trio.current_time()

            def forget() -> None:
                if actor is not None and rc not in actor.state.by_conn:
                    conns.pop(cid, None)

            reply = _Reply(self, src, ["r", room_id, cid, req], on_none=forget)
            await _to_actor(actor, Register(rc, peer_id, sub, role, metadata, token, reply, bool(announce)))
        elif kind == "L":
            _, room_id, cid = item
            rc = self.remote.get((room_id, src), {}).pop(cid, None)
            actor = self.supervisor.rooms.get(room_id)
            if rc is not None and actor is not None:
                await _to_actor(actor, Leave(rc))
        elif kind == "H":
            _, room_id, cids = item
            actor = self.supervisor.rooms.get(room_id)
            if actor is None:
                return
            self.heard[(room_id, src)] = trio.current_time()
            conns = self.remote.setdefault((room_id, src), {})
            listed = set(cids)
            for cid in [c for c in conns if c not in listed]:
                await _to_actor(actor, Leave(conns.pop(cid)))
            unknown = [c for c in cids if c not in conns]
            if unknown:
                self.outlink(src).put(["u", room_id, unknown])
        elif kind == "C":
            _, room_id, req, op, args = item
            self.spawn(self._answer_call, src, room_id, req, op, tuple(args))
        # ---- to this instance as the home of connections
        elif kind == "o":
            _, room_id, cid, text = item
            member = self._member(room_id, cid)
            if member is not None:
                member.conn.deliver(text)
        elif kind == "x":
            _, room_id, cid, code, reason = item
            member = self._member(room_id, cid)
            if member is not None:
                member.conn.request_close(code, reason)
        elif kind == "r":
            _, room_id, cid, req, value = item
            link = self.links.get(room_id)
            if link is not None:
                waiting = link.pending.get(cid)
                if waiting is not None and waiting[0] == req:
                    del link.pending[cid]
                    waiting[1].send_nowait(value)  # a _Confirm: records, then answers
        elif kind == "m":  # "not mine": the room moved (or its owner could not tell)
            _, room_id, cid, req, owner = item
            link = self.links.get(room_id)
            if link is not None and link.actor is None:
                waiting = link.pending.get(cid)
                if waiting is not None and waiting[0] == req:
                    self.spawn(self._relocate, link, cid)
        elif kind == "u":  # the owner does not know these connections: restore them
            _, room_id, cids = item
            link = self.links.get(room_id)
            if link is not None and link.actor is None:
                for cid in cids:
                    member = link.members.get(cid)
                    if member is not None and member.confirmed and cid not in link.pending:
                        link.restore(member, None, False)
        elif kind == "A":  # the answer to one of our connections' requests
            _, room_id, cid, seq, texts = item
            link = self.links.get(room_id)
            member = link.members.get(cid) if link is not None else None
            if member is not None and link.answered(cid, seq):  # type: ignore[union-attr]
                for text in texts:
                    member.conn.deliver(text)
            else:
                self.metrics.cluster_duplicates += 1
        elif kind == "n":  # a request reached an instance that could not take it: again
            _, room_id, cid, seq = item
            link = self.links.get(room_id)
            if link is not None and link.actor is None:
                self.spawn(self._resend_bounced, link, cid, seq)
        elif kind == "g":  # the owner is stopping and has let the room go: follow it now
            _, room_id = item
            link = self.links.get(room_id)
            if link is not None and link.actor is None:
                self.spawn(self._relocate, link)
        elif kind == "c":
            _, req, value = item
            waiting = self.calls.pop(req, None)
            if waiting is not None:
                waiting.send_nowait(value)
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def _member(self, room_id: str, cid: int) -> Member | None:
        link = self.links.get(room_id)
        return link.members.get(cid) if link is not None else None

    def _error_to(self, instance: str, room_id: str, cid: int, exc: E.ProtocolError) -> None:
        self.metrics.errors_by_code[exc.code] += 1
        self.outlink(instance).put(["o", room_id, cid, dumps(exc.to_message())])

    async def _answer_call(self, src: str, room_id: str, req: int, op: str, args: tuple[Any, ...]) -> None:
        try:
            value = await self.supervisor.call_local(room_id, op, args, timeout=REPLY_TIMEOUT)
        except trio.TooSlowError:
            return  # the asker times out too
        self.outlink(src).put(["c", req, value])

    # ------------------------------------------------------- ownership
    async def _lease(self, room_id: str) -> str:
        """Who owns the room now, taking it if nobody does. StoreUnavailable if unsure."""
        try:
            with trio.fail_after(REDIS_TIMEOUT):
                owner = await self._acquire(keys=[lease_key(room_id)], args=[self.id, LEASE_MS])
        except (coredis.exceptions.RedisError, trio.TooSlowError, OSError) as exc:
            raise StoreUnavailable(f"room lease for {room_id} ({type(exc).__name__})") from None
        return owner.decode() if isinstance(owner, bytes) else str(owner)

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

    async def link(self, room_id: str) -> RoomLink:
        """The way into a room for a local connection that registers (StoreUnavailable
        when Redis cannot say who owns it)."""
        link = self.links.get(room_id)
        if link is not None and (link.actor is not None or link.owner not in (None, self.id)):
            return link
        owner = await self._lease(room_id)
        link = self._link(room_id)  # (another connection may have made it meanwhile)
        if owner == self.id:
            if link.actor is None:
                self._adopt(link, owner)
        elif link.owner != owner or link.actor is not None:
            self._adopt(link, owner)
        return link

    def _adopt(self, link: RoomLink, owner: str) -> None:
        """Point the link at the room's (new) owner and move its members there."""
        if owner == self.id:
            if link.actor is None:
                actor = self.supervisor.rooms.get(link.room_id)
                if actor is None:
                    actor = self.supervisor.room(link.room_id)
                    actor.on_facts = self._facts_changed
                    actor.facts_loaded = False
                    self.spawn(self._load_facts, actor)
                link.actor = actor
                link.owner = owner
                link.restore_all()
            return
        moved = link.owner is not None and link.owner != owner
        if link.actor is not None:  # we lost the room: it lives on elsewhere
            actor, link.actor = link.actor, None
            self.supervisor.rooms.pop(link.room_id, None)
            self._carry_queued_requests(link, actor)
            actor.abandon()
            for key in [k for k in self.remote if k[0] == link.room_id]:
                del self.remote[key]
            moved = True
            event(logging.WARNING, "room lease lost", room_id=link.room_id, owner=owner)
        link.owner = owner
        link.missing_since = None
        if moved:
            link.restore_all()

    def _carry_queued_requests(self, link: RoomLink, actor: RoomActor) -> None:
        """Our local peers' requests still queued for an actor we give up go to the new
        owner with the rest (other instances' peers resend their own)."""
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
        for key in [k for k in self.remote if k[0] == room_id]:
            del self.remote[key]
            self.heard.pop(key, None)
        if actor.on_facts is not None:
            self._dirty[room_id] = None  # the room ended here: its facts go too
            self._dirty_event.set()

    # ------------------------------------------------------ room facts
    # Subscriptions and reservations live in the owner's actor. Saved to Redis when they
    # change, they let the next owner carry them on if this instance dies.
    def _facts_changed(self, actor: RoomActor) -> None:
        self._dirty[actor.room_id] = actor
        self._dirty_event.set()

    async def _load_facts(self, actor: RoomActor) -> None:
        """A room starting here: if it lived elsewhere before (its owner died), take over
        what its peers cannot rebuild by registering again."""
        facts = None
        try:
            with trio.fail_after(REDIS_TIMEOUT):
                raw = await self.redis.get(facts_key(actor.room_id))
            facts = orjson.loads(raw) if raw else None
        except (coredis.exceptions.RedisError, trio.TooSlowError, OSError, orjson.JSONDecodeError):
            pass
        if facts:
            event(logging.INFO, "room facts carried", room_id=actor.room_id,
                  subscriptions=len(facts.get("subs") or {}), reservations=len(facts.get("res") or {}))
            reply, _ = trio.open_memory_channel[Any](1)
            await _to_actor(actor, Call("carry", (facts, trio.current_time(), CARRY_WINDOW), reply))
        actor.facts_loaded = True
        self._facts_changed(actor)  # what changed meanwhile is saved now

    async def _facts_writer(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event = trio.Event()
            dirty, self._dirty = self._dirty, {}
            failed = False
            for room_id, actor in dirty.items():
                if actor is not None and (not actor.facts_loaded or self.supervisor.rooms.get(room_id) is not actor):
                    continue  # not loaded yet (it marks itself again), or no longer ours
                try:
                    with trio.fail_after(REDIS_TIMEOUT):
                        if actor is None:
                            await self.redis.delete([facts_key(room_id)])
                            continue
                        facts = actor.state.facts()
                        if not facts["subs"] and not facts["res"]:
                            await self.redis.delete([facts_key(room_id)])
                            continue
                        data = orjson.dumps(facts)
                        if len(data) > MAX_FACTS_BYTES:
                            for sub in facts["subs"].values():
                                sub["m"] = []
                            data = orjson.dumps(facts)
                        await self.redis.set(facts_key(room_id), data.decode(), ex=86400)
                except (coredis.exceptions.RedisError, trio.TooSlowError, OSError):
                    self._dirty.setdefault(room_id, actor)
                    failed = True
            if failed:
                await trio.sleep(1.0)  # Redis is away: retry in a second
                self._dirty_event.set()

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
                if cid not in link.awaiting or seq not in link.awaiting[cid]:
                    return
        if self.links.get(link.room_id) is not link:
            return
        if link.actor is None and link.owner != owner:
            self._adopt(link, owner)  # a move: restores everyone, sends every request again
            return
        member = link.members.get(cid)
        if link.actor is None and member is not None and member.confirmed and cid not in link.pending:
            link.restore(member, None, False)
        link.resend_requests(cid, since=seq)

    async def _tend_loop(self) -> None:
        """Each HEARTBEAT: tell owners who is here; follow rooms whose owner changed or
        vanished; forget remote connections of instances gone silent."""
        while True:
            await trio.sleep(HEARTBEAT)
            now = trio.current_time()
            for room_id, link in list(self.links.items()):
                if link.actor is not None:
                    continue
                link.expire_requests(now)
                if not link.members and not link.pending:
                    if self.links.get(room_id) is link:
                        del self.links[room_id]
                    continue
                try:
                    with trio.fail_after(REDIS_TIMEOUT):
                        owner = await self.redis.get(lease_key(room_id))
                except (coredis.exceptions.RedisError, trio.TooSlowError, OSError):
                    for other in self.links.values():  # a lease counts as missing only while Redis is here
                        other.missing_since = None
                    break  # Redis is away: try again next round
                if self.links.get(room_id) is not link or link.actor is not None:
                    continue
                if owner is None:
                    if link.missing_since is None:
                        link.missing_since = now
                    if now - link.missing_since < TAKEOVER_AFTER:
                        continue
                    await self._relocate(link)
                elif owner != link.owner:
                    self._adopt(link, owner)
                else:
                    link.missing_since = None
                    self.outlink(owner).put(["H", room_id, list(link.members)])
            for instance, out in list(self.outlinks.items()):
                if now - out.last_put > OUTLINK_IDLE and not out.queued():
                    del self.outlinks[instance]  # e.g. an instance that is gone
                    out.close()
            for key, last in list(self.heard.items()):
                if now - last < SILENT_AFTER:
                    continue
                del self.heard[key]
                conns = self.remote.pop(key, {})
                actor = self.supervisor.rooms.get(key[0])
                if conns:
                    event(logging.WARNING, "instance silent", instance=key[1], room_id=key[0], peers=len(conns))
                for rc in conns.values():
                    if actor is not None:
                        await _to_actor(actor, Leave(rc))

    async def _renew_loop(self) -> None:
        pause = RENEW
        while True:
            await trio.sleep(pause)
            pause = RENEW
            for room_id in list(self.supervisor.rooms):
                try:
                    owner = await self._lease(room_id)
                except StoreUnavailable:
                    # keep serving, and try again soon: when Redis is back, the owner takes
                    # its leases again before any other instance may (TAKEOVER_AFTER)
                    pause = RENEW_RETRY
                    break
                if owner != self.id and room_id in self.supervisor.rooms:
                    self._adopt(self._link(room_id), owner)

    # ------------------------------------------------------------- HTTP
    async def call(self, room_id: str, op: str, args: tuple[Any, ...], *, timeout: float) -> Any:
        if room_id in self.supervisor.rooms:
            return await self.supervisor.call_local(room_id, op, args, timeout=timeout)
        try:
            with trio.fail_after(REDIS_TIMEOUT):
                owner = await self.redis.get(lease_key(room_id))
        except (coredis.exceptions.RedisError, trio.TooSlowError, OSError) as exc:
            raise StoreUnavailable(f"room lease ({type(exc).__name__})") from None
        if owner is None:
            return None
        if owner == self.id:
            return await self.supervisor.call_local(room_id, op, args, timeout=timeout)
        req = next(self.reqs)
        send, recv = trio.open_memory_channel[Any](1)
        self.calls[req] = send
        try:
            self.outlink(owner).put(["C", room_id, req, op, list(args)])
            with trio.fail_after(timeout):
                return await recv.receive()
        finally:
            self.calls.pop(req, None)

    def note_peer(self, peer_id: str, room_id: str) -> None:
        try:
            self._chores_send.send_nowait((peer_id, room_id))
        except trio.WouldBlock:
            pass

    async def find_room(self, peer_id: str) -> str | None:
        try:
            with trio.fail_after(REDIS_TIMEOUT):
                value = await self.redis.get(f"{PREFIX}:peer-room:{peer_id}")
        except (coredis.exceptions.RedisError, trio.TooSlowError, OSError):
            return None
        return None if value is None else str(value)

    async def _chores(self) -> None:
        """Where each peer id last registered, for v1's /delete-peers-and-room on any
        instance (written off the registration path)."""
        async for peer_id, room_id in self._chores_recv:
            try:
                with trio.fail_after(REDIS_TIMEOUT):
                    await self.redis.set(f"{PREFIX}:peer-room:{peer_id}", room_id, ex=86400)
            except (coredis.exceptions.RedisError, trio.TooSlowError, OSError):
                pass

    # ---------------------------------------------------------- metrics
    async def _stats_loop(self) -> None:
        """Publish this instance's counts; sum everyone's (for /metrics)."""
        key = f"{PREFIX}:instances"
        while True:
            sup = self.supervisor
            mine = {"rooms": len(sup.rooms), "peers": sup.peer_count(), "peers_by_role": sup.peers_by_role()}
            now = time.time()
            try:
                with trio.fail_after(REDIS_TIMEOUT):
                    await self.redis.set(f"{PREFIX}:stats:{self.id}", orjson.dumps(mine).decode(),
                                         px=int(STATS_EVERY * 3000))
                    await self.redis.zadd(key, {self.id: now})
                    await self.redis.zremrangebyscore(key, "-inf", now - STATS_EVERY * 3)
                    ids = await self.redis.zrange(key, 0, -1)
                    rooms = peers = alive = 0
                    roles: dict[str, int] = {}
                    for instance in ids:
                        raw = await self.redis.get(f"{PREFIX}:stats:{instance}")
                        if raw is None:
                            continue
                        stats = orjson.loads(raw)
                        alive += 1
                        rooms += stats["rooms"]
                        peers += stats["peers"]
                        for role, n in stats["peers_by_role"].items():
                            roles[role] = roles.get(role, 0) + n
                self.view = {"instances": alive, "active_rooms": rooms, "active_connections": peers,
                             "peers_by_role": roles}
            except (coredis.exceptions.RedisError, trio.TooSlowError, OSError):
                pass
            await trio.sleep(STATS_EVERY)

    # --------------------------------------------------------- shutdown
    async def _flushed(self) -> None:
        """Wait until every outlink has published what is queued (the caller bounds it)."""
        while any(out.queued() for out in self.outlinks.values()):
            await trio.sleep(0.02)

    async def leave_cluster(self) -> None:
        """Graceful shutdown: flush what is queued for other instances, and let go of our
        leases so that another instance takes our rooms without waiting for them to lapse."""
        with trio.move_on_after(1.5):
            await self._flushed()
            for room_id in list(self.supervisor.rooms):
                with trio.move_on_after(0.5):
                    try:
                        await self._release(keys=[lease_key(room_id)], args=[self.id])
                    except (coredis.exceptions.RedisError, OSError):
                        break
                for r, instance in [k for k in self.remote if k[0] == room_id]:
                    self.outlink(instance).put(["g", r])  # their peers move at once
            await self._flushed()
            try:
                await self.redis.zrem(f"{PREFIX}:instances", [self.id])
            except (coredis.exceptions.RedisError, OSError):
                pass
