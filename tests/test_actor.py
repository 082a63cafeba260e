"""The real room actors and supervisor, with fake connections (no sockets) and trio's
MockClock: reservation expiry, holder disconnect, room retirement, crash isolation."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from signaling_trio._metrics import Metrics
from signaling_trio._actors import Leave, Message, Register, RoomSupervisor
from signaling_trio.config import Settings


class FakeConn:
    _next = 0

    def __init__(self, name: str) -> None:
        FakeConn._next += 1
        self.id = FakeConn._next
        self.name = name
        self.frames: list[dict] = []
        self.closed: tuple[int, str] | None = None
        self.arrived = trio.Event()

    def queue(self, text: str) -> None:
        self.frames.append(json.loads(text))
        self.arrived.set()

    def flush(self) -> None:
        pass

    def request_close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    async def next(self) -> dict:
        while not self.frames:
            self.arrived = trio.Event()
            await self.arrived.wait()
        return self.frames.pop(0)


@pytest.fixture
async def supervisor(nursery):
    sup = RoomSupervisor(Settings(store="memory"), Metrics())
    await nursery.start(sup.run)
    return sup


async def reg(sup, conn, room="r", peer_id=None):
    send, recv = trio.open_memory_channel(1)
    await sup.room(room).inbox.send(Register(conn, peer_id or conn.name, conn.name, "peer", {}, "tok", send))
    return await recv.receive()


async def say(sup, conn, msg, room="r"):
    await sup.room(room).inbox.send(Message(conn, msg, json.dumps(msg)))


async def test_reservation_expires_on_trio_clock(supervisor, autojump_clock):
    w, c = FakeConn("w"), FakeConn("c")
    assert await reg(supervisor, w) == "w"
    assert await reg(supervisor, c) == "c"
    await w.next(), await c.next()
    t0 = trio.current_time()
    await say(supervisor, c, {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 600})
    granted = await c.next()
    assert granted["type"] == "reservation_granted"
    assert (await w.next())["type"] == "peer_reserved"
    released = await w.next()  # the autojump clock skips the 600 s
    assert released == {"type": "peer_released", "by": "c", "reason": "expired"}
    assert trio.current_time() - t0 == pytest.approx(600, abs=0.01)


async def test_holder_disconnect_releases(supervisor, autojump_clock):
    w, c = FakeConn("w"), FakeConn("c")
    await reg(supervisor, w)
    await reg(supervisor, c)
    await say(supervisor, c, {"type": "reserve_peer", "to_peer_id": "w", "duration_sec": 3600})
    await supervisor.room("r").inbox.send(Leave(c))
    frames = [await w.next() for _ in range(3)]
    assert frames[-1] == {"type": "peer_released", "by": "c", "reason": "holder_left"}
    await trio.sleep(7200)  # no expiry fires for a reservation that is gone
    assert w.frames == []


async def test_empty_room_retires_and_restarts(supervisor):
    a = FakeConn("a")
    await reg(supervisor, a)
    actor = supervisor.rooms["r"]
    await actor.inbox.send(Leave(a))
    await trio.testing.wait_all_tasks_blocked()
    assert "r" not in supervisor.rooms
    # a late command to the retired actor fails cleanly; a new actor serves the room
    with pytest.raises(trio.BrokenResourceError):
        await actor.inbox.send(Leave(a))
    assert await reg(supervisor, FakeConn("b")) == "b"
    assert supervisor.rooms["r"] is not actor


async def test_crash_in_one_room_spares_others(supervisor, monkeypatch):
    a, b = FakeConn("a"), FakeConn("b")
    await reg(supervisor, a, room="bad")
    await reg(supervisor, b, room="good")
    bad = supervisor.rooms["bad"]

    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(bad.state, "handle", boom)
    await say(supervisor, a, {"type": "discover_peers"}, room="bad")
    await trio.testing.wait_all_tasks_blocked()
    assert a.closed == (1011, "internal error")
    assert "bad" not in supervisor.rooms and supervisor.metrics.room_crashes == 1
    b.frames.clear()
    await say(supervisor, b, {"type": "ping"}, room="good")
    assert (await b.next()) == {"type": "pong"}


async def test_actor_keeps_order(supervisor):
    w, c = FakeConn("w"), FakeConn("c")
    await reg(supervisor, w)
    await reg(supervisor, c)
    for i in range(1000):
        await say(supervisor, c, {"type": "peer_message", "to_peer_id": "w", "payload": i})
    await trio.testing.wait_all_tasks_blocked()
    assert [f["payload"] for f in w.frames if f["type"] == "peer_message"] == list(range(1000))
