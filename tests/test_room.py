"""The room protocol tested directly: no sockets, no trio. Connections are plain keys."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling_trio.protocol import errors as E
from signaling_trio.protocol.filters import Filter
from signaling_trio.protocol.room import Effects, RoomState


class Room:
    """A RoomState plus a mailbox per connection, to read what each one was sent."""

    def __init__(self, **kw):
        self.state = RoomState("r1", wall_offset=1_000_000.0, **kw)
        self.now = 0.0
        self.inbox: dict[str, list[dict]] = {}
        self.closed: dict[str, tuple[int, str]] = {}

    def _take(self, fx: Effects) -> Effects:
        for conn, text in fx.sends:
            self.inbox.setdefault(conn, []).append(json.loads(text))
        for conn, code, reason in fx.closes:
            self.closed[conn] = (code, reason)
        return fx

    def reg(self, conn, peer_id=None, sub=None, role="peer", metadata=None, announce=True):
        return self._take(self.state.register(conn, peer_id=peer_id or conn, subject=sub or conn, role=role,
                                              metadata=metadata or {}, token="t", now=self.now, announce=announce))

    def send(self, conn, msg):
        return self._take(self.state.handle(conn, msg, json.dumps(msg), self.now))

    def leave(self, conn):
        return self._take(self.state.leave(conn))

    def tick(self, now):
        self.now = now
        return self._take(self.state.expire(now))

    def pop(self, conn) -> list[dict]:
        msgs = self.inbox.pop(conn, [])
        return msgs

    def last(self, conn) -> dict:
        msgs = self.pop(conn)
        assert msgs, f"{conn} got nothing"
        return msgs[-1]


@pytest.fixture
def room():
    return Room()


def test_register_and_discover(room):
    room.reg("w", role="worker", metadata={"tags": ["gpu"]})
    room.reg("c", role="client")
    assert room.last("w")["type"] == "registered_auth"
    room.pop("c")
    room.send("c", {"type": "discover_peers", "filters": {"role": "worker"}})
    reply = room.last("c")
    assert reply["type"] == "peer_list" and reply["count"] == 1 and reply["to_peer_id"] == "c"
    assert reply["peers"][0] == {
        "peer_id": "w",
        "role": "worker",
        "metadata": {"tags": ["gpu"]},
        "connected_at": 1_000_000.0,
    }


def test_not_in_room(room):
    room.send("x", {"type": "discover_peers"})
    assert room.last("x")["code"] == E.NOT_IN_ROOM


def test_room_full():
    room = Room(max_peers=2)
    room.reg("a")
    room.reg("b")
    room.reg("c")
    err = room.last("c")
    assert err["code"] == E.ROOM_FULL and err["reason"]
    # re-registering an existing member of a full room is fine
    room.reg("a", metadata={"x": 1})
    assert room.last("a")["type"] == "registered_auth"


def test_metadata_limits():
    room = Room(max_metadata_bytes=100)
    room.reg("a", metadata={"x": "y" * 200})
    assert room.last("a")["code"] == E.METADATA_TOO_LARGE
    room.reg("a", metadata={"x": "small"})
    room.pop("a")
    room.send("a", {"type": "update_metadata", "metadata": {"big": "z" * 100}})
    assert room.last("a")["code"] == E.METADATA_TOO_LARGE
    room.send("a", {"type": "discover_peers"})
    room.pop("a")
    assert room.state.peers["a"].metadata == {"x": "small"}  # nothing changed


def test_takeover_keeps_reservations(room):
    room.reg("w1", peer_id="w", sub="S")
    room.reg("c")
    room.send("c", {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 60})
    room.reg("w2", peer_id="w", sub="S")
    assert room.closed["w1"] == (E.CLOSE_REPLACED, "replaced")
    assert room.state.peers["w"].reserved_by == "c"
    room.pop("w2")
    room.send("c", {"type": "peer_message", "to_peer_id": "w", "payload": 1})
    assert room.last("w2")["payload"] == 1
    room.leave("w1")  # the old connection's late leave changes nothing
    assert "w" in room.state.peers


def test_peer_id_taken(room):
    room.reg("a1", peer_id="p", sub="alice")
    room.reg("b1", peer_id="p", sub="bob")
    assert room.last("b1")["code"] == E.PEER_ID_TAKEN
    assert room.state.peers["p"].conn == "a1"
    assert "b1" not in room.state.by_conn


def test_failed_reregister_keeps_old_registration(room):
    room.reg("a1", peer_id="p", sub="alice")
    room.reg("b1", peer_id="q", sub="bob")
    room.reg("b1", peer_id="p", sub="bob")  # b tries to become p: refused
    assert room.last("b1")["code"] == E.PEER_ID_TAKEN
    assert room.state.by_conn["b1"].peer_id == "q"  # still q


# ------------------------------------------------------------------ reservations
def test_reservation_lifecycle(room):
    room.reg("w", role="worker")
    room.reg("c1")
    room.reg("c2")
    for c in ("w", "c1", "c2"):
        room.pop(c)
    room.send("c1", {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 30})
    granted = room.last("c1")
    assert granted == {"type": "reservation_granted", "peer_id": "w", "reserved_until": 1_000_030.0}
    assert room.last("w") == {"type": "peer_reserved", "by": "c1", "reserved_until": 1_000_030.0}
    room.send("c2", {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 30})
    err = room.last("c2")
    assert err["code"] == E.PEER_RESERVED
    room.send("c2", {"type": "release_peer", "to_peer_id": "w"})
    assert room.last("c2")["code"] == E.PRECONDITION_FAILED
    room.send("c2", {"type": "discover_peers", "filters": {"unreserved": True}})
    assert room.last("c2")["count"] == 1  # only c1 is unreserved
    room.send("c2", {"type": "discover_peers", "filters": {"role": "worker"}})
    (w,) = room.last("c2")["peers"]
    assert w["reserved_by"] == "c1" and w["reserved_until"] == 1_000_030.0
    # renew by the holder
    room.now = 10
    room.send("c1", {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 30, "filters": {"unreserved": True}})
    assert room.last("c1")["reserved_until"] == 1_000_040.0
    assert room.last("w")["type"] == "peer_reserved"
    room.send("c1", {"type": "release_peer", "to_peer_id": "w"})
    assert room.last("c1") == {"type": "reservation_released", "peer_id": "w"}
    assert room.last("w") == {"type": "peer_released", "by": "c1", "reason": "released"}
    room.send("c2", {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 5})
    assert room.last("c2")["type"] == "reservation_granted"


def test_reservation_expiry_and_holder_left(room):
    room.reg("w")
    room.reg("w2")
    room.reg("c")
    room.send("c", {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 5})
    room.send("c", {"type": "reserve_peer", "to_peer_id": "w2", "duration_sec": 50})
    assert room.state.next_deadline() == 5
    for c in ("w", "w2", "c"):
        room.pop(c)
    room.tick(4.9)
    assert room.pop("w") == []
    room.tick(5.0)
    assert room.last("w") == {"type": "peer_released", "by": "c", "reason": "expired"}
    assert room.state.next_deadline() == 50
    room.leave("c")
    assert room.last("w2") == {"type": "peer_released", "by": "c", "reason": "holder_left"}
    assert room.state.next_deadline() is None


@pytest.mark.parametrize(
    "msg, code",
    [
        ({"to_peer_id": "w", "duration_sec": 0}, E.INVALID_MESSAGE),
        ({"to_peer_id": "w", "duration_sec": 3601}, E.INVALID_MESSAGE),
        ({"to_peer_id": "w", "duration_sec": True}, E.INVALID_MESSAGE),
        ({"to_peer_id": "w", "duration_sec": "10"}, E.INVALID_MESSAGE),
        ({"to_peer_id": "w"}, E.MISSING_FIELDS),
        ({"to_peer_id": "nobody", "duration_sec": 10}, E.PEER_NOT_FOUND),
        ({"to_peer_id": "c", "duration_sec": 10}, E.INVALID_MESSAGE),
        ({"to_peer_id": "w", "duration_sec": 10, "filters": {"role": "client"}}, E.PRECONDITION_FAILED),
        ({"to_peer_id": "w", "duration_sec": 10, "filters": {"properties": {"x": {"$bad": 1}}}}, E.INVALID_MESSAGE),
    ],
)
def test_reserve_errors(room, msg, code):
    room.reg("w", role="worker")
    room.reg("c")
    room.pop("c")
    room.send("c", {"type": "reserve_peer", **msg})
    assert room.last("c")["code"] == code
    assert room.state.peers["w"].reserved_by is None


def test_target_leaving_clears_holder_state(room):
    room.reg("w")
    room.reg("c")
    room.send("c", {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 10})
    room.leave("w")
    assert room.state.peers["c"].holding == set()
    assert room.state.next_deadline() is None


# ------------------------------------------------------------------ subscriptions
def test_subscription_events(room):
    room.reg("c", role="client")
    room.reg("w1", role="worker", metadata={"properties": {"status": "available"}})
    room.send("c", {"type": "subscribe", "filters": {"role": "worker", "properties": {"status": "available"}}})
    sub = room.last("c")
    assert sub["type"] == "subscribed" and [p["peer_id"] for p in sub["peers"]] == ["w1"]
    room.reg("w2", role="worker", metadata={"properties": {"status": "available"}})
    room.reg("w3", role="worker", metadata={"properties": {"status": "busy"}})  # not a match: nothing
    room.send("w1", {"type": "update_metadata", "metadata": {"properties": {"gpu": 1}}})
    room.send("w2", {"type": "update_metadata", "metadata": {"properties": {"status": "busy"}}})
    room.send("w3", {"type": "update_metadata", "metadata": {"properties": {"status": "available"}}})
    room.reg("x", role="client")
    room.send("x", {"type": "reserve_peer", "to_peer_id": "w1", "duration_sec": 10})
    room.leave("w3")
    events = [(m["type"], m["peer"]["peer_id"]) for m in room.pop("c")]
    assert events == [
        ("peer_joined", "w2"),
        ("peer_updated", "w1"),
        ("peer_left", "w2"),
        ("peer_joined", "w3"),
        ("peer_updated", "w1"),  # reserved
        ("peer_left", "w3"),
    ]
    room.send("c", {"type": "unsubscribe"})
    assert room.last("c") == {"type": "unsubscribed"}
    room.reg("w4", role="worker", metadata={"properties": {"status": "available"}})
    assert room.pop("c") == []


def test_subscription_unreserved_filter(room):
    room.reg("w", role="worker")
    room.reg("c")
    room.reg("d")
    room.send("c", {"type": "subscribe", "filters": {"role": "worker", "unreserved": True}})
    room.pop("c")
    room.send("d", {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 10})
    assert [m["type"] for m in room.pop("c")] == ["peer_left"]
    room.leave("d")
    assert [m["type"] for m in room.pop("c")] == ["peer_joined"]


def test_one_subscription_per_connection(room):
    room.reg("c")
    room.reg("a", role="a")
    room.send("c", {"type": "subscribe", "filters": {"role": "a"}})
    room.send("c", {"type": "subscribe", "filters": {"role": "b"}})
    room.pop("c")
    room.reg("b", role="b")
    room.reg("a", role="a", metadata={"v": 1})
    assert [(m["type"], m["peer"]["peer_id"]) for m in room.pop("c")] == [("peer_joined", "b")]


# --------------------------------------------------------- invariants under random ops
ops = st.lists(
    st.tuples(
        st.sampled_from(["reg", "leave", "meta", "reserve", "release", "sub", "tick", "msg"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(["a", "b", "c", "d"]),
        st.integers(min_value=1, max_value=20),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_invariants_hold_under_any_sequence(ops):
    room = Room()
    for op, conn, other, n in ops:
        if op == "reg":
            room.reg(conn, role=["worker", "client"][n % 2], metadata={"properties": {"n": n}})
        elif op == "leave":
            room.leave(conn)
        elif op == "meta":
            room.send(conn, {"type": "update_metadata", "metadata": {"properties": {"n": n}, "tags": [str(n)]}})
        elif op == "reserve":
            room.send(conn, {"type": "reserve_peer", "to_peer_id": other, "duration_sec": n})
        elif op == "release":
            room.send(conn, {"type": "release_peer", "to_peer_id": other})
        elif op == "sub":
            room.send(conn, {"type": "subscribe", "filters": {"properties": {"n": {"$gte": n}}}})
        elif op == "tick":
            room.tick(room.now + n)
        elif op == "msg":
            room.send(conn, {"type": "peer_message", "to_peer_id": other, "payload": n})
        s = room.state
        assert set(s.by_conn.values()) == set(s.peers.values())
        assert {p.peer_id for p in s.by_conn.values()} == set(s.peers)
        assert sum(s.role_counts().values()) == len(s.peers)
        for p in s.peers.values():
            if p.reserved_by is not None:
                assert p.reserved_by in s.peers and p.peer_id in s.peers[p.reserved_by].holding
                assert s.deadlines[p.peer_id] > room.now
            for t in p.holding:
                assert s.peers[t].reserved_by == p.peer_id
            if p.subscription is not None:
                assert s.subscribers[p.peer_id] is p
                truth = {q.peer_id for q in s.peers.values() if q is not p and p.subscription.matches(q)}
                assert p.known == truth
        assert set(s.deadlines) == {p.peer_id for p in s.peers.values() if p.reserved_by is not None}
        # indexes and cached answers always agree with a plain scan, in join order
        for role, members in s.index.by_role.items():
            assert set(members) == {q.peer_id for q in s.peers.values() if q.role == role}
        for f in QUERIES:
            flt, found = s.query(f)
            assert list(found) == [q.peer_id for q in s.peers.values() if Filter(f).matches(q)]


QUERIES = [
    {},
    {"role": "worker"},
    {"properties": {"n": 3}},
    {"role": "client", "properties": {"n": {"$eq": 5}}},
    {"properties": {"n": {"$gte": 10}}, "unreserved": True},
    {"tags": ["4", "7"]},
]


# ------------------------------------------------------- a room moving instances
def test_the_handover_carries_subscriptions_and_reservations_to_the_next_room():
    old = Room()
    old.reg("c", role="client")
    old.reg("w1", role="worker")
    old.reg("w2", role="worker")
    old.send("c", {"type": "subscribe", "filters": {"role": "worker"}})
    old.send("c", {"type": "reserve_peer", "to_peer_id": "w1", "duration_sec": 100})
    granted = [m for m in old.pop("c") if m["type"] == "reservation_granted"][0]
    facts = json.loads(json.dumps(old.state.handover()))  # plain JSON, as saved in Redis
    assert facts == {"subs": {"c": {"f": {"role": "worker"}, "m": ["w1", "w2"]}},
                     "res": {"w1": ["c", granted["reserved_until"]]}}

    # the next instance: w1 and c come back (restores), w2 died with the old instance
    new = Room()
    new.now = 10.0
    new._take(new.state.take_over(facts, new.now, window=5.0))
    new.reg("w1", role="worker", announce=False)
    new.reg("c", role="client", announce=False)
    # restored peers are told nothing (no registered_auth, no subscribed, no peer_reserved);
    # c's subscription sees w1's view change (reserved again) as an update of a peer it knew
    assert new.pop("w1") == []
    c_msgs = new.pop("c")
    assert [(m["type"], m["peer"]["peer_id"]) for m in c_msgs] == [("peer_updated", "w1")]
    new.reg("w3", role="worker")  # a newcomer, registered the normal way
    # the reservation holds, with its deadline: nobody else gets w1
    w1 = new.state.peers["w1"]
    assert (w1.reserved_by, w1.reserved_until) == ("c", granted["reserved_until"])
    new.reg("x", role="client")
    err = new.send("x", {"type": "reserve_peer", "to_peer_id": "w1", "duration_sec": 10})
    assert new.last("x")["code"] == "PEER_RESERVED" and err.errors
    # c's subscription carried on: w3 joined after it was restored
    assert [(m["type"], m["peer"]["peer_id"]) for m in new.pop("c")] == [("peer_joined", "w3")]
    # window over: w2 never came back, c hears it left
    new.tick(15.0)
    assert new.pop("c") == [{"type": "peer_left", "peer": {"peer_id": "w2"}}]
    # the reservation still expires on time (old deadline: 100 s after it was granted at 0)
    new.tick(old.state.wall_offset - new.state.wall_offset + 100.0)
    assert new.state.peers["w1"].reserved_by is None


def test_a_handover_applies_only_to_restored_peers():
    old = Room()
    old.reg("c", role="client")
    old.reg("w", role="worker")
    old.send("c", {"type": "subscribe", "filters": {}})
    old.send("c", {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 100})
    facts = old.state.handover()
    new = Room()
    new._take(new.state.take_over(facts, 0.0, window=5.0))
    new.reg("c", role="client")  # a fresh register (say, a new client reusing the id)
    new.reg("w", role="worker")
    assert new.state.subscribers == {} and new.state.peers["w"].reserved_by is None
    assert new.state.take_over(["not", "facts"], 0.0, window=5.0).sends == []  # junk is ignored


def test_a_cached_discovery_answer_follows_every_change(room):
    room.reg("c", role="client")
    room.reg("w", role="worker", metadata={"properties": {"status": "available"}})
    ask = {"type": "discover_peers", "filters": {"role": "worker"}}

    def answer():
        room.send("c", ask)
        return room.last("c")

    first = answer()
    assert answer() == first  # served from the cache, same bytes
    room.send("w", {"type": "update_metadata", "metadata": {"properties": {"status": "busy"}}})
    assert answer()["peers"][0]["metadata"]["properties"]["status"] == "busy"
    room.send("c", {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 10})
    assert answer()["peers"][0]["reserved_by"] == "c"
    room.tick(11.0)
    assert "reserved_by" not in answer()["peers"][0]
    room.reg("w2", role="worker")
    assert [p["peer_id"] for p in answer()["peers"]] == ["w", "w2"]
    room.leave("w")
    assert [p["peer_id"] for p in answer()["peers"]] == ["w2"]
    # a worker asking for workers is not in its own answer
    room.send("w2", ask)
    mine = room.last("w2")
    assert mine["peers"] == [] and mine["count"] == 0
