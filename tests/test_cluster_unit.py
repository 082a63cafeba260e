"""The cluster's logic with two instances in one process on an in-memory Redis
(tests/fakehub.py): real Cluster, links, owners and room actors; no redis-server, no
sockets. The race cases here are the ones the cluster's history fixed; tests/test_cluster.py
runs the same code against a real Redis and real processes."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import trio

from signaling_trio._actors import Message, Register, RoomSupervisor
from signaling_trio._metrics import Metrics
from signaling_trio.cluster import Cluster, wire
from signaling_trio.cluster.link import RemoteConn, RoomLink
from signaling_trio.cluster.node import TAKEOVER_AFTER
from signaling_trio.config import Settings

from fakehub import FakeHub

_ids = itertools.count(1)


class FakeConn:
    """A local connection: records what the room sends it."""

    def __init__(self, name: str) -> None:
        self.id = next(_ids)
        self.name = name
        self.frames: list[dict[str, Any]] = []
        self.closed: tuple[int, str] | None = None
        self.lost: list[Any] = []
        self.arrived = trio.Event()

    def deliver(self, text: str) -> None:  # as a LocalConn (cluster/link.py)
        self.frames.append(json.loads(text))
        self.arrived.set()

    queue = deliver  # as a PeerConnection, in a room of this instance (_actors.py)

    def flush(self) -> None:
        pass

    def request_close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def room_lost(self, room: Any) -> None:
        self.lost.append(room)

    async def next(self, type_: str) -> dict[str, Any]:
        with trio.fail_after(10):
            while True:
                for i, frame in enumerate(self.frames):
                    if frame["type"] == type_:
                        return self.frames.pop(i)
                self.arrived = trio.Event()
                await self.arrived.wait()


class Instance:
    def __init__(self, hub: FakeHub) -> None:
        self.metrics = Metrics()
        self.supervisor = RoomSupervisor(Settings(store="memory"), self.metrics)
        self.cluster = Cluster(hub.transport(), self.supervisor, self.metrics)
        self.scope = trio.CancelScope()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await self.cluster.run(task_status=task_status)
            await trio.sleep_forever()

    def kill(self) -> None:
        """As SIGKILL: nothing said to anyone."""
        self.scope.cancel()


@pytest.fixture
async def hub():
    return FakeHub()


@pytest.fixture
async def pair(hub, nursery):
    a, b = Instance(hub), Instance(hub)
    await nursery.start(a.run)
    await nursery.start(b.run)
    return a, b


async def register(inst: Instance, conn: FakeConn, room: str = "r", role: str = "peer") -> tuple[RoomLink, str | None]:
    link = await inst.cluster.open(room)
    send, recv = trio.open_memory_channel[Any](1)
    await link.send(Register(conn, conn.name, f"user-{conn.name}", role, {}, "tok", send))
    with trio.fail_after(10):
        return link, await recv.receive()


async def say(link: RoomLink, conn: FakeConn, msg: dict[str, Any]) -> None:
    await link.send(Message(conn, msg, json.dumps(msg)))


def test_every_item_kind_survives_its_encoding():
    samples = [
        wire.Join("r", 1, 2, "p", "s", "worker", {"tags": ["a"]}, "tok", False),
        wire.Send("r", 1, "{}", 7), wire.Send("r", 1, "{}"), wire.Part("r", 1), wire.Present("r", [1, 2]),
        wire.Ask("r", 3, "count", []), wire.Deliver("r", 1, "x"), wire.Close("r", 1, 4000, "replaced"),
        wire.Joined("r", 1, 2, None), wire.NotOwner("r", 1, 2, "i"), wire.Unknown("r", [1]),
        wire.Answer("r", 1, 7, ["a", "b"]), wire.Bounce("r", 1, 7), wire.LetGo("r"), wire.Result(3, {"n": 1}),
    ]
    assert {type(s) for s in samples} == set(wire.TAGS)
    batch = wire.decode_batch(wire.encode_batch("me", 5, [wire.encode_item(s) for s in samples]))
    assert (batch.source, batch.number) == ("me", 5)
    assert [wire.decode_item(raw) for raw in batch.items] == samples
    for bad in ([], ["nope"], ["part", "r"], ["part", "r", 1, 2], "part"):
        with pytest.raises(wire.Unreadable):
            wire.decode_item(bad)
    with pytest.raises(wire.Unreadable):
        wire.decode_batch(b"{")


async def test_a_register_answered_before_the_link_records_its_member(pair):
    a, _ = pair
    # a's own room: the actor may run (and answer) inside link.send's checkpoint, before
    # the send returns (trio orders the two tasks either way); the link must already
    # know the member then, or it forgets that the peer is in the room
    for n in range(24):
        conn = FakeConn(f"w{n}")
        link, bound = await register(a, conn)
        assert bound == conn.name and link.actor is not None
        member = link.members[conn.id]
        assert member.confirmed and member.peer_id == conn.name
        assert (await conn.next("registered_auth"))["peer_id"] == conn.name


async def test_a_register_through_another_instance_is_confirmed(pair):
    a, b = pair
    await a.cluster.open("r")  # a takes the lease: the room lives there
    conn = FakeConn("c")
    link, bound = await register(b, conn)
    assert bound == "c" and link.actor is None and link.owner == a.cluster.id
    assert link.members[conn.id].confirmed and not link.pending
    [rc] = a.supervisor.rooms["r"].state.by_conn
    assert isinstance(rc, RemoteConn) and rc.cid == conn.id and rc.instance == b.cluster.id
    assert (await conn.next("registered_auth"))["peer_id"] == "c"


async def test_a_link_made_by_another_connection_during_a_lease_look_up(pair, hub):
    _, b = pair
    hub.pause_leases()
    links: list[RoomLink] = []

    async def open_room() -> None:
        links.append(await b.cluster.open("r"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_room)
        nursery.start_soon(open_room)
        while hub.lease_calls < 2:
            await trio.sleep(0.01)  # both wait on the lease
        hub.resume_leases()
    assert links[0] is links[1] is b.cluster.links["r"]
    assert list(b.supervisor.rooms) == ["r"]


async def test_replies_go_to_the_connection_that_asked(pair):
    a, b = pair
    await a.cluster.open("r")
    p1, p2 = FakeConn("p1"), FakeConn("p2")
    link, _ = await register(b, p1, role="client")
    await register(b, p2, role="worker")
    await say(link, p1, {"type": "discover_peers", "filters": {"role": "worker"}})
    answer = await p1.next("peer_list")
    assert [p["peer_id"] for p in answer["peers"]] == ["p2"]
    await say(link, p2, {"type": "peer_message", "to_peer_id": "p1", "payload": {"n": 1}})
    assert (await p1.next("peer_message"))["payload"] == {"n": 1}
    assert not [f for f in p2.frames if f["type"] in ("peer_list", "peer_message")]
    assert not link.awaiting  # the answered request is no longer kept for a resend
    # an HTTP question asked on b is answered by the owner, to that caller
    assert await b.cluster.call("r", "count") == 2
    assert sorted(await b.cluster.call("r", "subjects")) == ["user-p1", "user-p2"]


async def test_a_room_moves_with_its_reservations_and_subscriptions(pair, hub):
    a, b = pair
    await a.cluster.open("r")
    c, w1, w2 = FakeConn("c"), FakeConn("w1"), FakeConn("w2")
    link, _ = await register(b, c, role="client")
    await register(b, w1, role="worker")
    await register(b, w2, role="worker")
    await say(link, c, {"type": "subscribe", "filters": {"role": "worker"}})
    assert [p["peer_id"] for p in (await c.next("subscribed"))["peers"]] == ["w1", "w2"]
    await say(link, c, {"type": "reserve_peer", "to_peer_id": "w1", "duration_sec": 60})
    until = (await c.next("reservation_granted"))["reserved_until"]
    with trio.fail_after(5):
        while "r" not in hub.handovers:  # the owner saves what it would hand over
            await trio.sleep(0.05)

    a.kill()  # the owner dies; its lease lapses
    hub.drop_lease("r")
    with trio.fail_after(TAKEOVER_AFTER + 10):
        while "r" not in b.supervisor.rooms or len(b.supervisor.rooms["r"].state.peers) < 3:
            await trio.sleep(0.05)
    state = b.supervisor.rooms["r"].state
    with trio.fail_after(5):
        while state.pending is None and "c" not in state.subscribers:
            await trio.sleep(0.05)
    assert state.peers["w1"].reserved_by == "c" and state.peers["w1"].reserved_until == until
    assert "c" in state.subscribers and state.subscribers["c"].known == {"w1", "w2"}
    assert link.actor is not None and link.owner == b.cluster.id
    # restored peers are not told again that they registered
    assert [[f["type"] for f in conn.frames].count("registered_auth") for conn in (c, w1, w2)] == [1, 1, 1]
    # the reservation still holds: another client cannot take w1
    x = FakeConn("x")
    await register(b, x, role="client")
    await say(link, x, {"type": "reserve_peer", "to_peer_id": "w1", "duration_sec": 10})
    assert (await x.next("error"))["code"] == "PEER_RESERVED"


async def test_a_request_the_old_owner_never_answered_is_answered_by_the_new_one(pair, hub):
    a, b = pair
    await a.cluster.open("r")
    c = FakeConn("c")
    link, _ = await register(b, c, role="client")
    hub.down = True  # the request cannot reach the owner
    await say(link, c, {"type": "discover_peers", "filters": {}})
    await trio.sleep(0.5)
    assert len(link.awaiting[c.id]) == 1
    a.kill()
    hub.drop_lease("r")
    hub.down = False
    answer = await c.next("peer_list")  # resent to b, the new owner, and answered once
    assert answer["peers"] == [] and not link.awaiting
    await trio.sleep(1)
    assert [f["type"] for f in c.frames].count("peer_list") == 0


async def _moves_to(inst: Instance, link: RoomLink, hub: FakeHub) -> None:
    """The room's lease passes to `inst` (its old owner stalled), and `inst` follows it."""
    hub.leases["r"] = (inst.cluster.id, trio.current_time() + 60)
    with trio.fail_after(TAKEOVER_AFTER + 10):
        while link.actor is None:
            await trio.sleep(0.05)


async def test_a_register_answer_held_up_while_the_room_moves_is_given_once(pair, hub):
    a, b = pair
    await a.cluster.open("r")
    c = FakeConn("c")
    hub.deaf.add(b.cluster.id)  # a's answer to b (registered_auth, Joined) waits in a's outlink
    async with trio.open_nursery() as nursery:
        bound: list[str | None] = []

        async def join() -> None:
            bound.append((await register(b, c))[1])

        nursery.start_soon(join)
        with trio.fail_after(5):
            while not a.supervisor.rooms.get("r") or not a.supervisor.rooms["r"].state.peers:
                await trio.sleep(0.01)  # a has answered
        await _moves_to(b, b.cluster.links["r"], hub)  # b restores c in its own actor
        hub.deaf.discard(b.cluster.id)  # a's held answer arrives now, after the move
    assert bound == ["c"]
    await trio.sleep(1)
    assert [f["type"] for f in c.frames].count("registered_auth") == 1


@pytest.mark.parametrize("queued", [True, False], ids=["queued", "handed-to-the-waiting-actor"])
@pytest.mark.parametrize("first", [True, False], ids=["register", "re-register"])
async def test_a_register_sent_to_a_room_given_up_is_answered_once_by_the_next_owner(pair, hub, first, queued):
    a, b = pair
    c, w = FakeConn("c"), FakeConn("w")
    link, _ = await register(a, w)  # the room lives on a, with w's connection (and c's)
    if not first:
        await register(a, c)
        await c.next("registered_auth")
    await trio.sleep(0.1)  # a's actor waits for its next command
    send, recv = trio.open_memory_channel[Any](1)
    if queued:  # it is handed this one; c's Register stays in its inbox
        raw = json.dumps({"type": "discover_peers", "filters": {}})
        link.send_nowait(Message(w, json.loads(raw), raw))
    link.send_nowait(Register(c, "c", "user-c", "peer", {}, "tok", send))
    hub.leases["r"] = (b.cluster.id, trio.current_time() + 60)
    a.cluster._adopt(link, b.cluster.id)  # a learns that b took the room, before its actor runs again
    with trio.fail_after(5):
        assert await recv.receive() == "c"  # answered by b, not after REPLY_TIMEOUT
    await trio.sleep(1)
    assert [f["type"] for f in c.frames].count("registered_auth") == 1
    assert link.members[c.id].confirmed and "c" in b.supervisor.rooms["r"].state.peers


async def test_a_re_register_in_flight_when_the_room_moves_is_answered(pair, hub, nursery):
    a, b = pair
    d = Instance(hub)  # the room's next owner, with a peer of its own
    await nursery.start(d.run)
    await a.cluster.open("r")
    c, w = FakeConn("c"), FakeConn("w")
    await register(d, w)
    link, _ = await register(b, c)
    await c.next("registered_auth")
    await say(link, c, {"type": "subscribe", "filters": {}})
    await c.next("subscribed")
    with trio.fail_after(5):
        while "r" not in hub.handovers:  # the owner saves what it would hand over
            await trio.sleep(0.05)
    hub.deaf.add(a.cluster.id)  # b's Join for the re-register does not reach a
    send, recv = trio.open_memory_channel[Any](1)
    await link.send(Register(c, "c", "user-c", "peer", {"n": 1}, "tok", send))
    hub.leases["r"] = (d.cluster.id, trio.current_time() + 60)
    await d.cluster.open("r")  # d takes the room up (and its handover) before c's Join arrives
    with trio.fail_after(TAKEOVER_AFTER + 10):
        while link.owner != d.cluster.id:
            await trio.sleep(0.05)
    hub.deaf.discard(a.cluster.id)
    with trio.fail_after(5):
        assert await recv.receive() == "c"
    await trio.sleep(1)
    assert [f["type"] for f in c.frames].count("registered_auth") == 1
    # still the peer it was: its subscription came with the room
    assert "c" in d.supervisor.rooms["r"].state.subscribers


async def test_a_register_given_up_on_is_not_answered_later(pair, hub):
    a, b = pair
    await a.cluster.open("r")
    c = FakeConn("c")
    link, _ = await register(b, c)
    await c.next("registered_auth")
    hub.deaf.add(b.cluster.id)  # a's answer to the re-register is held up...
    send, recv = trio.open_memory_channel[Any](1)
    await link.send(Register(c, "c", "user-c", "peer", {"n": 1}, "tok", send))
    with trio.fail_after(5):
        while a.supervisor.rooms["r"].state.peers["c"].metadata != {"n": 1}:
            await trio.sleep(0.01)
    link.register_abandoned(c.id)  # ...past the connection's REPLY_TIMEOUT (it sent the error)
    hub.deaf.discard(b.cluster.id)
    await trio.sleep(1)
    assert [f["type"] for f in c.frames].count("registered_auth") == 0
    assert link.members[c.id].confirmed  # in the room from before, still


async def test_new_rooms_are_dealt_in_turn_and_an_owned_room_keeps_its_owner(pair, hub):
    a, b = pair
    ids = sorted([a.cluster.id, b.cluster.id])
    await b.cluster.open("owned")
    for room in ["owned", "n1", "n2", "n3", "n4"]:
        await a.cluster.open(room, ids)
    # a keeps its first new room, then takes turns; the owned room took no turn
    assert [hub.owner(r) for r in ["owned", "n1", "n2", "n3", "n4"]] == [b.cluster.id, a.cluster.id,
                                                                       b.cluster.id, a.cluster.id, b.cluster.id]
    # a process that joins the machine starts level with the others, not behind them;
    # ties go round the ring from a (so that each instance's turns start elsewhere)
    ring = sorted(ids + ["f" * 16])
    for room in ["m1", "m2", "m3"]:
        await a.cluster.open(room, ring)
    me = ring.index(a.cluster.id)
    assert [hub.owner(r) for r in ["m1", "m2", "m3"]] == [ring[(me + k) % 3] for k in range(3)]
