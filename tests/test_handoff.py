"""Connections handed between sibling processes (`--handoff-dir`, which `--workers` sets
up): a peer whose room another instance on this machine owns moves there at its first
register, descriptor and all (signaling_trio/_handoff.py, docs/SCALING.md).

Two in-process instances share a handoff directory and a real redis-server, so the test
knows which one each peer dialled; `--workers 2` is covered in test_cluster.py."""

from __future__ import annotations

import json
import os
import signal
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url
from wsproto import ConnectionType
from wsproto.connection import Connection as WsprotoConnection
from wsproto.events import TextMessage

from conftest import register, ws_peer
from rawws import frame, raw_connect
from signaling_trio.testing import open_test_server
from test_cluster import ANSWER_BOUND, ask_through, server_process


def cluster_sent(server: Any) -> int:
    return server.server.router.metrics.cluster_sent


async def test_a_moved_connection_keeps_its_order_identity_and_limits(redis, tmp_path):
    limits = {"rate_limit": 0.001, "rate_burst": 6}  # 6 frames, then RATE_LIMITED (no refill in the test)
    async with open_test_server(store=redis.url, handoff_dir=str(tmp_path), **limits) as a, \
            open_test_server(store=redis.url, handoff_dir=str(tmp_path), **limits) as b:
        room = await a.new_room()
        async with ws_peer(a.ws_url) as worker, open_websocket_url(b.ws_url) as client:
            assert (await register(worker, room, "gpu", role="worker"))["type"] == "registered_auth"  # A owns it
            sent_before = cluster_sent(a) + cluster_sent(b)
            # the client dials B and sends its register and ten messages without waiting:
            # whatever B read before the move travels with the descriptor, in order
            await client.send_message(json.dumps({"type": "register", "peer_id": "laptop", "role": "client",
                                                  "room_id": room["room_id"], "token": room["token"],
                                                  "id_token": room["id_token"]}))
            for i in range(10):
                await client.send_message(json.dumps({"type": "peer_message", "to_peer_id": "gpu", "payload": i}))
            answers = [json.loads(await client.get_message()) for _ in range(2)]
            assert [m["type"] for m in answers] == ["registered_auth", "error"], answers
            assert answers[1]["code"] == "RATE_LIMITED"
            # the bucket came along: the register took one token at B, five messages pass
            got = [await worker.recv_type("peer_message") for _ in range(5)]
            assert [m["payload"] for m in got] == [0, 1, 2, 3, 4]
            assert {m["from_peer_id"] for m in got} == {"laptop"}  # bound to the identity it registered
            assert await worker.nothing_pending()
            assert b.server.hub.given == 1 and a.server.hub.taken == 1
            assert a.server.metrics.active_connections == 2 and b.server.metrics.active_connections == 0
            assert cluster_sent(a) + cluster_sent(b) == sent_before  # nothing went through Redis
            # re-registering on the same socket (as sleap-rtc does after a job) stays where it is
            await trio.sleep(1.5)  # (a token for it)


async def test_a_moved_connection_re_registers_and_is_answered_by_its_new_process(redis, tmp_path):
    async with open_test_server(store=redis.url, handoff_dir=str(tmp_path)) as a, \
            open_test_server(store=redis.url, handoff_dir=str(tmp_path)) as b:
        room = await a.new_room()
        async with ws_peer(a.ws_url) as worker, ws_peer(b.ws_url) as client:
            assert (await register(worker, room, "gpu", role="worker"))["type"] == "registered_auth"
            for _ in range(3):  # the v2 clients re-register on the same socket after every job
                reply = await register(client, room, "laptop", role="client")
                assert reply["type"] == "registered_auth" and reply["peer_id"] == "laptop"
            reply = await client.request({"type": "discover_peers", "filters": {"role": "worker"}})
            assert [p["peer_id"] for p in reply["peers"]] == ["gpu"]
            await client.send({"type": "offer", "target": "gpu", "sdp": "v=0"})
            assert (await worker.recv_type("offer"))["sender"] == "laptop"
            assert b.server.hub.given == 1 and a.server.hub.taken == 1
            # its frame limits are the same as anywhere: past max_frame_bytes (64 KiB) an
            # error, the connection kept; past 1 MiB a close (1009)
            err = await client.request({"type": "peer_message", "to_peer_id": "gpu", "payload": "x" * 100_000})
            assert err["code"] == "MESSAGE_TOO_LARGE"
            assert (await client.request({"type": "ping"}))["type"] == "pong"
        # a room B owns keeps B's peers at B
        other = await b.new_room()
        async with ws_peer(b.ws_url) as p, ws_peer(a.ws_url) as q:
            assert (await register(p, other, "p"))["type"] == "registered_auth"
            assert (await register(q, other, "q"))["type"] == "registered_auth"
            assert a.server.hub.given == 1 and b.server.hub.taken == 1


async def test_a_sibling_that_is_gone_leaves_the_connection_here(redis, tmp_path):
    """The owner's socket file is there but nobody listens (a SIGKILLed worker): the
    connection registers where it is, through Redis, and is answered."""
    async with open_test_server(store=redis.url, handoff_dir=str(tmp_path)) as b:
        room = await b.new_room()
        async with server_process(redis.url, handoff_dir=str(tmp_path)) as a:
            async with ws_peer(a.ws_url) as worker:
                assert (await register(worker, room, "gpu", role="worker"))["type"] == "registered_auth"
                a.send_signal(signal.SIGKILL)
                a.wait(timeout=10)
        assert any(p.suffix == ".sock" for p in tmp_path.iterdir())  # (a SIGKILL unlinks nothing)
        async with ws_peer(b.ws_url) as client:
            with trio.fail_after(ANSWER_BOUND + 5):
                reply = await register(client, room, "laptop", role="client")
            assert reply["type"] == "registered_auth"
            assert b.server.hub.given == 0


async def test_killing_a_worker_mid_traffic_loses_no_answer(redis, tmp_path):
    """Peers that dialled B were moved to A (the room's owner); B is SIGKILLed while they
    and A's own peers keep a request in flight: every request is answered, once."""
    async with open_test_server(store=redis.url, handoff_dir=str(tmp_path)) as a:
        room = await a.new_room()
        async with server_process(redis.url, handoff_dir=str(tmp_path)) as b, AsyncExitStack() as stack:
            owner = await stack.enter_async_context(ws_peer(a.ws_url))
            assert (await register(owner, room, "owner", role="worker"))["type"] == "registered_auth"
            askers = {}
            for i in range(6):
                peer = await stack.enter_async_context(ws_peer(b.ws_url if i % 2 else a.ws_url))
                assert (await register(peer, room, f"p{i}", role="client"))["type"] == "registered_auth"
                askers[f"p{i}"] = peer
            assert a.server.hub.taken == 3  # the three that dialled B are served by A

            async def kill() -> None:
                b.send_signal(signal.SIGKILL)

            log = await ask_through(kill, askers, before=0.5, after=2.0)
            assert {name for name, _ in log} == set(askers)
            assert max(t for _, t in log) < ANSWER_BOUND


@pytest.mark.parametrize("cut", [False, True])
async def test_frames_sent_after_the_register_travel_with_it(redis, tmp_path, cut):
    """Register and thirteen messages in one TCP write: B has received them all when it
    moves the connection, and parsed only the register (its task reads inline and
    handles the register before reading on), so the rest travel as unparsed bytes; with
    the write ending in the middle of a frame (`cut`) too, the rest of it sent after the
    move. Every message arrives, in order, and nothing goes through Redis."""
    async with open_test_server(store=redis.url, handoff_dir=str(tmp_path), rate_limit=0) as a, \
            open_test_server(store=redis.url, handoff_dir=str(tmp_path), rate_limit=0) as b:
        room = await a.new_room()
        async with ws_peer(a.ws_url) as worker:
            assert (await register(worker, room, "gpu", role="worker"))["type"] == "registered_auth"
            sent_before = cluster_sent(a) + cluster_sent(b)
            stream = await raw_connect(int(b.ws_url.rsplit(":", 1)[1].strip("/")))
            reg = {"type": "register", "peer_id": "laptop", "room_id": room["room_id"], "token": room["token"],
                   "id_token": room["id_token"], "role": "client"}
            frames = [frame(1, json.dumps(reg).encode())] + [
                frame(1, json.dumps({"type": "peer_message", "to_peer_id": "gpu", "payload": i}).encode())
                for i in range(13)]
            data = b"".join(frames)
            head, tail = (data[:-10], data[-10:]) if cut else (data, b"")
            await stream.send_all(head)
            client = WsprotoConnection(ConnectionType.CLIENT)
            with trio.fail_after(5):
                got: list[dict[str, Any]] = []
                while not got:
                    client.receive_data(await stream.receive_some(65536))
                    got += [json.loads(e.data) for e in client.events() if isinstance(e, TextMessage)]
            assert got[0]["type"] == "registered_auth"
            if tail:
                await stream.send_all(tail)
            payloads = [(await worker.recv_type("peer_message"))["payload"] for _ in range(13)]
            assert payloads == list(range(13))
            assert (b.server.hub.given, a.server.hub.taken) == (1, 1)
            assert cluster_sent(a) + cluster_sent(b) == sent_before
            await stream.aclose()


async def test_the_handoff_directory_must_be_private(redis, tmp_path):
    from signaling_trio.config import ConfigError

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ConfigError, match="mode 0700"):
        async with open_test_server(store=redis.url, handoff_dir=str(shared)):
            pass


async def test_a_sibling_that_gives_it_back_leaves_it_here(redis, tmp_path):
    """The room's owner (as its lease says) takes the descriptor and closes it without a
    word, as a failing receiver does: the connection stays, and its register is answered
    (here, once the lease lapses and this instance takes the room)."""
    import socket as socketlib

    from coredis import Redis

    from signaling_trio.cluster.transport import lease_key

    refused: list[int] = []

    async def giving_back(listener: trio.socket.SocketType) -> None:
        while True:
            sock, _ = await listener.accept()
            with sock:
                _, ancdata, _, _ = await sock.recvmsg(4096, socketlib.CMSG_SPACE(4))
                refused.append(len(ancdata))
                for _, _, data in ancdata:
                    os.close(int.from_bytes(data[:4], "little"))

    listener = trio.socket.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    await listener.bind(str(tmp_path / "elsewhere.sock"))
    listener.listen(4)
    async with trio.open_nursery() as nursery, open_test_server(store=redis.url, handoff_dir=str(tmp_path)) as a:
        nursery.start_soon(giving_back, listener)
        room = await a.new_room()
        client = Redis.from_url(redis.url, decode_responses=True)
        async with client:
            await client.set(lease_key(room["room_id"]), "elsewhere", px=1500)
        async with ws_peer(a.ws_url) as peer:
            with trio.fail_after(20):
                reply = await register(peer, room, "p", role="worker")
            assert reply["type"] == "registered_auth"
            assert refused == [1] and a.server.hub.given == 0
            assert (await peer.request({"type": "discover_peers"}))["type"] == "peer_list"
        nursery.cancel_scope.cancel()
    listener.close()


async def test_new_rooms_are_dealt_out_among_the_processes(redis, tmp_path):
    """Eight new rooms whose first peer dials A: A keeps one, gives B the next, and so
    on (counted as it picks, so first registrations in flight together spread too);
    each room's second peer, dialling B, ends up in the room's process."""
    async with open_test_server(store=redis.url, handoff_dir=str(tmp_path)) as a, \
            open_test_server(store=redis.url, handoff_dir=str(tmp_path)) as b, AsyncExitStack() as stack:
        rooms = [await a.new_room() for _ in range(8)]
        firsts = [await stack.enter_async_context(ws_peer(a.ws_url)) for _ in rooms]
        answers: list[dict[str, Any]] = []

        async def first(i: int) -> None:
            answers.append(await register(firsts[i], rooms[i], f"w{i}", role="worker"))

        async with trio.open_nursery() as nursery:
            for i in range(len(rooms)):
                nursery.start_soon(first, i)
        assert [m["type"] for m in answers] == ["registered_auth"] * 8
        owned = {name: set(s.server.router.supervisor.rooms) for name, s in (("a", a), ("b", b))}
        assert len(owned["a"]) == len(owned["b"]) == 4 and not owned["a"] & owned["b"]
        assert (a.server.hub.given, b.server.hub.taken) == (4, 4)
        sent_before = cluster_sent(a) + cluster_sent(b)
        for i, room in enumerate(rooms):
            second = await stack.enter_async_context(ws_peer(b.ws_url))
            assert (await register(second, room, f"c{i}", role="client"))["type"] == "registered_auth"
            await second.send({"type": "peer_message", "to_peer_id": f"w{i}", "payload": i})
            assert (await firsts[i].recv_type("peer_message"))["payload"] == i
        assert b.server.hub.given == 4  # the seconds of A's rooms moved there
        assert cluster_sent(a) + cluster_sent(b) == sent_before  # nothing went through Redis


async def test_a_sibling_that_died_is_offered_no_more_rooms(tmp_path):
    """Its socket file stays (SIGKILL unlinks nothing); the first hand-off it refuses
    removes it, so new rooms are no longer dealt to it."""
    import socket as socketlib

    from signaling_trio._handoff import Hub

    dead = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    dead.bind(str(tmp_path / "dead.sock"))
    dead.close()  # bound, never listening: what a killed process leaves
    hub = Hub(str(tmp_path), "me", lambda *a: None)
    assert hub.instances() == ["dead", "me"] and hub.is_sibling("dead")
    with open(os.devnull) as f:
        assert await hub._give("dead", f.fileno(), b"{}") is None  # not taken: served here
    assert hub.instances() == ["me"] and not hub.is_sibling("dead")
