"""Shared fixtures. Rules every test here follows (after trio-websocket's own suite):
servers bind 127.0.0.1 on port 0; every wait has a timeout (`recv` fails after 5 s);
no sleeps as synchronisation: a test waits for the frame that proves the state."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, open_websocket_url

from signaling_trio.testing import TestServer

RECV_TIMEOUT = 5.0


class WsPeer:
    """A raw JSON-over-WebSocket client, as the v2 clients are."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, msg: dict[str, Any] | str) -> None:
        await self.ws.send_message(msg if isinstance(msg, str) else json.dumps(msg))

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        with trio.fail_after(timeout):
            return json.loads(await self.ws.get_message())

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        await self.send(msg)
        return await self.recv()

    async def recv_type(self, mtype: str, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        """Next frame of `mtype`, failing if any other type arrives first."""
        msg = await self.recv(timeout)
        assert msg["type"] == mtype, msg
        return msg

    async def closed(self, timeout: float = RECV_TIMEOUT) -> int | None:
        """Wait for the server to close; return the close code."""
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code

    async def nothing_pending(self) -> bool:
        """True if no frame arrives after a ping/pong round trip (the server answers
        in order, so anything queued for us before the pong would come first)."""
        await self.send({"type": "ping"})
        return (await self.recv())["type"] == "pong"


@asynccontextmanager
async def ws_peer(url: str) -> AsyncIterator[WsPeer]:
    async with open_websocket_url(url) as ws:
        yield WsPeer(ws)


async def register(
    peer: WsPeer, room: dict[str, Any], peer_id: str, *, id_token: str | None = None,
    role: str | None = None, metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": "register", "peer_id": peer_id, "room_id": room["room_id"],
        "token": room["token"], "id_token": id_token or room["id_token"],
    }
    if role is not None:
        msg["role"] = role
    if metadata is not None:
        msg["metadata"] = metadata
    return await peer.request(msg)


@pytest.fixture
def server(signaling_server: TestServer) -> TestServer:
    """Our own tests use the pytest plugin's server fixture, as users do."""
    return signaling_server


@pytest.fixture
async def room(server: TestServer) -> dict[str, Any]:
    return await server.new_room()


@pytest.fixture
def redis():
    """A real redis-server on a free port (tests/redisproc.py), stopped after the test."""
    from redisproc import RedisServer

    server = RedisServer()
    server.start()
    yield server
    server.stop()


async def race_to_reserve(clients: list[WsPeer], target: str) -> tuple[list[int], list[dict[str, Any]]]:
    """Every client sends reserve_peer for `target` at the same moment; returns the
    indexes of the winners and the error answers of the others."""
    results: dict[int, dict[str, Any]] = {}
    go = trio.Event()

    async def race(i: int, c: WsPeer) -> None:
        await go.wait()
        results[i] = await c.request({"type": "reserve_peer", "to_peer_id": target, "duration_sec": 60,
                                      "filters": {"unreserved": True}})

    async with trio.open_nursery() as n:
        for i, c in enumerate(clients):
            n.start_soon(race, i, c)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    winners = [i for i, r in results.items() if r["type"] == "reservation_granted"]
    losers = [r for r in results.values() if r["type"] == "error"]
    return winners, losers
