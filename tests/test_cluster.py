"""One logical server on many instances: three signaling_trio instances on one real
redis-server, peers of one room spread over them (docs/SCALING.md).

Every case here crosses instances: the room's owner (the instance of its first peer) is
never the only instance involved."""

from __future__ import annotations

import os

from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

from prometheus_client.parser import text_string_to_metric_families
import trio
import trio.testing

from conftest import race_to_reserve, register, ws_peer
from redisproc import RedisServer
from signaling_trio.testing import TestServer, open_test_server


@asynccontextmanager
async def instances(url: str, n: int = 3, **options: Any) -> AsyncIterator[list[TestServer]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_test_server(store=url, **options)) for _ in range(n)]


async def eventually(check: Any, timeout: float = 10.0, every: float = 0.1) -> Any:
    """Poll `check()` (async) until it returns something truthy; fail after `timeout`."""
    with trio.fail_after(timeout):
        while True:
            value = await check()
            if value:
                return value
            await trio.sleep(every)


async def test_discovery_messages_and_signals_cross_instances(redis):
    async with instances(redis.url) as (a, b, c):
        room = await a.new_room()
        async with ws_peer(a.ws_url) as owner, ws_peer(b.ws_url) as worker, ws_peer(c.ws_url) as client:
            assert (await register(owner, room, "owner", role="watcher"))["type"] == "registered_auth"
            assert (await owner.request({"type": "subscribe", "filters": {"role": "worker"}}))["type"] == "subscribed"
            reg = await register(
                worker,
                room,
                "w1",
                role="worker",
                metadata={"tags": ["gpu"], "properties": {"gpu_memory_mb": 24000, "status": "available"}},
            )
            assert reg == {
                "type": "registered_auth",
                "room_id": room["room_id"],
                "token": room["token"],
                "peer_id": "w1",
            }
            joined = await owner.recv_type("peer_joined")
            assert joined["peer"]["peer_id"] == "w1"
            assert (await register(client, room, "c1", role="client"))["type"] == "registered_auth"

            # discovery from C sees the worker on B, by role, tag and property
            found = await client.request({"type": "discover_peers", "filters": {
                "role": "worker", "tags": ["gpu"], "properties": {"gpu_memory_mb": {"$gte": 16000}}}})
            assert found["type"] == "peer_list" and [p["peer_id"] for p in found["peers"]] == ["w1"]

            # metadata updated on B is seen from C and pushed to the subscriber on A
            upd = await worker.request({"type": "update_metadata", "metadata": {"properties": {"status": "busy"}}})
            assert upd["type"] == "metadata_updated" and upd["metadata"]["properties"]["status"] == "busy"
            assert (await owner.recv_type("peer_updated"))["peer"]["metadata"]["properties"]["status"] == "busy"
            found = await client.request({"type": "discover_peers", "filters": {"properties": {"status": "busy"}}})
            assert [p["peer_id"] for p in found["peers"]] == ["w1"]

            # application messages and WebRTC signals both ways, payload untouched
            await client.send({"type": "peer_message", "from_peer_id": "c1", "to_peer_id": "w1",
                               "payload": {"job": [1, 2, {"x": "é"}]}})
            got = await worker.recv_type("peer_message")
            assert got["from_peer_id"] == "c1" and got["payload"] == {"job": [1, 2, {"x": "é"}]}
            await worker.send({"type": "offer", "sender": "w1", "target": "c1", "sdp": "v=0 offer"})
            offer = await client.recv_type("offer")
            assert offer["sdp"] == "v=0 offer" and offer["sender"] == "w1"
            await client.send({"type": "answer", "sender": "c1", "target": "w1", "sdp": "v=0 answer"})
            assert (await worker.recv_type("answer"))["sdp"] == "v=0 answer"
            await client.send({"type": "candidate", "sender": "c1", "target": "w1", "candidate": {"candidate": "c"}})
            assert (await worker.recv_type("candidate"))["candidate"] == {"candidate": "c"}

            # identity stays bound to the connection across instances
            err = await client.request(
                {"type": "peer_message", "from_peer_id": "w1", "to_peer_id": "owner", "payload": 1}
            )
            assert err["type"] == "error" and err["code"] == "SENDER_MISMATCH"

        # everyone left (on three instances): a newcomer finds nobody (discovery never
        # lists the asker itself)
        async with ws_peer(b.ws_url) as again:
            assert (await register(again, room, "probe"))["type"] == "registered_auth"
            left = await again.request({"type": "discover_peers", "filters": {}})
        assert left["peers"] == []


async def test_fifty_clients_on_three_instances_race_for_one_worker(redis):
    async with instances(redis.url) as servers, AsyncExitStack() as stack:
        room = await servers[0].new_room()
        worker = await stack.enter_async_context(ws_peer(servers[0].ws_url))
        await register(worker, room, "worker", role="worker")
        clients = []
        for i in range(50):
            c = await stack.enter_async_context(ws_peer(servers[i % 3].ws_url))
            assert (await register(c, room, f"client-{i}", role="client"))["type"] == "registered_auth"
            clients.append(c)
        winners, losers = await race_to_reserve(clients, "worker")
        assert len(winners) == 1, winners
        assert len(losers) == 49 and {r["code"] for r in losers} <= {"PEER_RESERVED", "PRECONDITION_FAILED"}
        told = await worker.recv()
        assert told["type"] == "peer_reserved" and told["by"] == f"client-{winners[0]}"
        # every instance sees the same holder
        for c in clients[:3]:
            (w,) = (await c.request({"type": "discover_peers", "filters": {"role": "worker"}}))["peers"]
            assert w["reserved_by"] == f"client-{winners[0]}"


async def test_peer_id_taken_and_takeover_across_instances(redis):
    async with instances(redis.url, n=2) as (a, b):
        room = await a.new_room()
        other = await b.signin()
        async with ws_peer(a.ws_url) as first, ws_peer(b.ws_url) as thief:
            assert (await register(first, room, "w"))["type"] == "registered_auth"
            err = await register(thief, room, "w", id_token=other["id_token"])
            assert err["type"] == "error" and err["code"] == "PEER_ID_TAKEN"
            # the same identity on another instance takes the peer over: the old socket gets 4000
            async with ws_peer(b.ws_url) as successor:
                assert (await register(successor, room, "w"))["type"] == "registered_auth"
                assert await first.closed() == 4000
                found = await thief.request({"type": "discover_peers", "filters": {}})
                # the thief is not in the room; the answer is an error, not a list
                assert found["code"] == "NOT_IN_ROOM"
                assert (await register(thief, room, "t", id_token=other["id_token"]))["type"] == "registered_auth"
                found = await thief.request({"type": "discover_peers", "filters": {}})
                assert [p["peer_id"] for p in found["peers"]] == ["w"]


async def test_http_and_cluster_metrics_cross_instances(redis):
    async with instances(redis.url) as (a, b, c):
        room = await a.new_room()
        joiner = await c.signin()
        async with ws_peer(a.ws_url) as p1, ws_peer(b.ws_url) as p2, ws_peer(c.ws_url) as p3:
            await register(p1, room, "p1", role="worker")
            await register(p2, room, "p2", role="worker")
            await register(p3, room, "p3", role="client", id_token=joiner["id_token"])

            async def summed() -> bool:
                views = [(await s.http("GET", "/metrics"))[1] for s in (a, b, c)]
                return (
                    all(
                        v["cluster"]["active_connections"] == 3
                        and v["cluster"]["peers_by_role"] == {"worker": 2, "client": 1}
                        and v["cluster"]["instances"] == 3
                        and v["cluster"]["active_rooms"] == 1
                        for v in views
                    )
                    and views
                )

            views = await eventually(summed)
            assert sum(v["active_rooms"] for v in views) == 1  # one owner
            assert len({v["instance"] for v in views}) == 3
            status, headers, text = await b.http_raw("GET", "/metrics", {"Accept": "text/plain"})
            families = {f.name: f for f in text_string_to_metric_families(text.decode())}
            assert families["signaling_cluster_peers"].samples[0].value == 3
            assert families["signaling_cluster_instances"].samples[0].value == 3
            assert families["signaling_cluster_items_received"].samples[0].value > 0

            # a peer registered on C (not the creator) may extend the room, asked on B
            status, body = await b.http("POST", "/extend-room", {"room_id": room["room_id"], "ttl_sec": 600},
                                        token=joiner["id_token"])
            assert status == 200, body
            # delete-peers-and-room on C: the owner (A) disconnects everyone, wherever they are
            status, body = await c.http("POST", "/delete-peers-and-room", {"peer_id": "p2"}, token=room["id_token"])
            assert status == 200 and body["status"] == "room deleted; all peers disconnected"
            for p in (p1, p2, p3):
                assert await p.closed() == 1000


async def test_peers_of_a_closed_connection_leave_everywhere(redis):
    async with instances(redis.url, n=2) as (a, b):
        room = await a.new_room()
        async with ws_peer(a.ws_url) as watcher:
            await register(watcher, room, "watcher")
            await watcher.request({"type": "subscribe", "filters": {}})
            async with ws_peer(b.ws_url) as passer:
                await register(passer, room, "passer")
                assert (await watcher.recv_type("peer_joined"))["peer"]["peer_id"] == "passer"
            assert (await watcher.recv_type("peer_left"))["peer"]["peer_id"] == "passer"
            found = await watcher.request({"type": "discover_peers", "filters": {}})
            assert found["peers"] == []


# ------------------------------------------------------------------ faults
async def discover_ids(peer: Any, filters: dict[str, Any] | None = None) -> list[str]:
    """One discovery, answered even when the room's owner dies meanwhile (the request is
    sent again to the next owner: docs/SCALING.md), within ANSWER_BOUND."""
    await peer.send({"type": "discover_peers", "filters": filters or {}})
    with trio.fail_after(ANSWER_BOUND):
        while True:
            msg = await peer.recv(timeout=ANSWER_BOUND)
            if msg["type"] == "peer_list":
                return sorted(p["peer_id"] for p in msg["peers"])


ANSWER_BOUND = 10.0


@asynccontextmanager
async def server_process(url: str, handoff_dir: str | None = None) -> AsyncIterator[Any]:
    """A separate `signaling-trio serve` process on this Redis (to be SIGKILLed)."""
    import subprocess
    import sys
    import urllib.request

    from redisproc import free_port

    ws_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "signaling_trio", "serve", "--host", "127.0.0.1", "--ws-port", str(ws_port),
         "--http-port", str(http_port), "--store", url, "--log-level", "warning",
         *(["--handoff-dir", handoff_dir] if handoff_dir else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        with trio.fail_after(20):
            while not await trio.to_thread.run_sync(healthy):
                assert proc.poll() is None, "server process exited"
                await trio.sleep(0.1)
        proc.ws_url = f"ws://127.0.0.1:{ws_port}/"  # type: ignore[attr-defined]
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def test_sigkilled_owner_its_room_moves_and_its_peers_vanish(redis):
    async with instances(redis.url, n=2) as (b, c), server_process(redis.url) as a:
        room = await b.new_room()
        async with ws_peer(a.ws_url) as wa, ws_peer(b.ws_url) as cb, ws_peer(c.ws_url) as wc, ws_peer(c.ws_url) as cc:
            assert (await register(wa, room, "wa", role="worker"))["type"] == "registered_auth"  # A owns the room
            assert (await register(cb, room, "cb", role="client"))["type"] == "registered_auth"
            assert (await register(wc, room, "wc", role="worker", metadata={"properties": {"status": "available"}}))[
                "type"
            ] == "registered_auth"
            assert (await register(cc, room, "cc", role="client"))["type"] == "registered_auth"
            assert not b.server.supervisor.rooms and not c.server.supervisor.rooms  # A owns it
            # cb watches the workers and holds wc: state that lives in the owner's actor
            subscribed = await cb.request({"type": "subscribe", "filters": {"role": "worker"}})
            assert sorted(p["peer_id"] for p in subscribed["peers"]) == ["wa", "wc"]
            assert (await cb.request({"type": "reserve_peer", "to_peer_id": "wc", "duration_sec": 300}))[
                "type"
            ] == "reservation_granted"
            assert (await wc.recv_type("peer_reserved"))["by"] == "cb"
            assert (await cb.recv_type("peer_updated"))["peer"]["reserved_by"] == "cb"  # its own subscription
            assert await discover_ids(cc) == ["cb", "wa", "wc"]
            await trio.sleep(0.3)  # the owner saves subscriptions and reservations within milliseconds

            a.kill()  # SIGKILL: no goodbye, its lease lapses by itself
            killed_at = trio.current_time()

            async def gone() -> bool:
                return await discover_ids(cc) == ["cb", "wc"]

            await eventually(gone, timeout=15)
            moved_after = trio.current_time() - killed_at
            assert moved_after < 10, moved_after
            owners = [s for s in (b, c) if room["room_id"] in s.server.supervisor.rooms]
            assert len(owners) == 1  # exactly one survivor took the room over
            # the reservation moved with the room: wc is still cb's, for everyone
            (w,) = (await cc.request({"type": "discover_peers", "filters": {"role": "worker"}}))["peers"]
            assert w["peer_id"] == "wc" and w["reserved_by"] == "cb"
            err = await cc.request({"type": "reserve_peer", "to_peer_id": "wc", "duration_sec": 30})
            assert err["type"] == "error" and err["code"] == "PEER_RESERVED"
            # the subscription moved too: cb hears that wa is gone for good, nothing else
            # but wc's updates, and never a second registered_auth or subscribed
            with trio.fail_after(20):
                while True:
                    event = await cb.recv(timeout=20)
                    assert event["type"] in ("peer_updated", "peer_left"), event
                    if event["type"] == "peer_left":
                        assert event["peer"]["peer_id"] == "wa"
                        break
                    assert event["peer"]["peer_id"] == "wc"
            # and keeps working: wc's next update reaches cb's subscription
            await wc.request({"type": "update_metadata", "metadata": {"properties": {"status": "busy"}}})
            while (event := await cb.recv())["type"] != "peer_updated" or event["peer"]["metadata"]["properties"][
                "status"
            ] != "busy":
                assert event["type"] == "peer_updated", event
            # messages across the survivors, and cb releases what it held
            await cb.send({"type": "peer_message", "from_peer_id": "cb", "to_peer_id": "wc", "payload": "after"})
            while (msg := await wc.recv())["type"] != "peer_message":
                pass
            assert msg["payload"] == "after" and msg["from_peer_id"] == "cb"
            await cb.send({"type": "release_peer", "to_peer_id": "wc"})
            assert (await cb.recv_type("peer_updated"))["peer"].get("reserved_by") is None  # its subscription first
            assert await cb.recv() == {"type": "reservation_released", "peer_id": "wc"}
            assert (await wc.recv_type("peer_released"))["by"] == "cb"


async def test_redis_restart_no_ghosts_and_recovery(redis, tmp_path):
    persistent = RedisServer(data_dir=str(tmp_path))  # rooms survive the restart, as in production
    persistent.start()
    try:
        async with instances(persistent.url, n=2) as (a, b):
            room = await a.new_room()
            async with ws_peer(a.ws_url) as x, ws_peer(b.ws_url) as y:
                await register(x, room, "x")
                await register(y, room, "y")
                async with ws_peer(b.ws_url) as z:
                    await register(z, room, "z")
                    assert await discover_ids(x) == ["y", "z"]
                    persistent.stop()

                    async def unhealthy() -> bool:
                        return [(await s.http("GET", "/health"))[0] for s in (a, b)] == [503, 503]

                    await eventually(unhealthy)
                    async with ws_peer(b.ws_url) as late:
                        err = await register(late, room, "late")
                        assert err["type"] == "error" and err["code"] == "STORE_UNAVAILABLE"
                # z left while Redis was away (its Leave could not reach the owner)
                await trio.sleep(5)  # longer than an owner waits for a silent instance
                persistent.start()

                async def healthy() -> bool:
                    return [(await s.http("GET", "/health"))[0] for s in (a, b)] == [200, 200]

                await eventually(healthy)
                # no ghost: z is gone; y (alive all along) is back in the owner's room
                async def settled() -> bool:
                    return await discover_ids(x) == ["y"]

                await eventually(settled, timeout=15)
                await y.send({"type": "peer_message", "from_peer_id": "y", "to_peer_id": "x", "payload": 7})
                while (msg := await x.recv())["type"] != "peer_message":
                    pass
                assert msg["payload"] == 7
                async with ws_peer(b.ws_url) as late:
                    assert (await register(late, room, "late"))["type"] == "registered_auth"
                    assert await discover_ids(late) == ["x", "y"]
    finally:
        persistent.stop()


async def test_workers_share_the_ports_and_the_rooms(redis):
    import signal
    import subprocess
    import sys

    from redisproc import free_port

    ws_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "signaling_trio", "serve", "--workers", "2", "--host", "127.0.0.1",
         "--ws-port", str(ws_port), "--http-port", str(http_port), "--store", redis.url, "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        from signaling_trio.server import ServerInfo

        # the test helpers' HTTP calls, pointed at the shared ports (no server object here)
        front = TestServer(None, ServerInfo("127.0.0.1", ws_port, http_port), None)  # type: ignore[arg-type]
        ws_url = front.ws_url

        async def both_up() -> bool:
            try:
                seen = {(await front.http("GET", "/metrics"))[1]["cluster"]["instances"] for _ in range(4)}
            except OSError:
                return False
            return seen == {2}

        await eventually(both_up, timeout=30, every=0.3)
        room = await front.new_room()
        async with AsyncExitStack() as stack:
            peers = [await stack.enter_async_context(ws_peer(ws_url)) for _ in range(16)]
            for i, p in enumerate(peers):
                assert (await register(p, room, f"p{i}"))["type"] == "registered_auth"

            async def spread() -> Any:
                views = [(await front.http("GET", "/metrics"))[1] for _ in range(8)]
                by_instance = {v["instance"]: (v["open_websockets"], v["handed_over"]) for v in views}
                return len(by_instance) == 2 and sum(n for n, _ in by_instance.values()) == 16 and by_instance

            by_instance = await eventually(spread)
            # the kernel spread the connects over both workers, and those that reached the
            # worker not owning the room moved to the one that does: all 16 share a process
            assert sorted(n for n, _ in by_instance.values()) == [0, 16]
            assert sum(h for _, h in by_instance.values()) > 0
            # every peer reaches the next one, whichever worker each is on
            for i, p in enumerate(peers):
                await p.send(
                    {"type": "peer_message", "from_peer_id": f"p{i}", "to_peer_id": f"p{(i + 1) % 16}", "payload": i}
                )
            for i, p in enumerate(peers):
                got = await p.recv_type("peer_message")
                assert got["payload"] == (i - 1) % 16
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(lambda: proc.wait(timeout=15)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_need_redis_and_fixed_ports():
    import subprocess
    import sys

    for extra, says in ((["--store", "memory"], "needs --store redis://"),
                        (["--store", "redis://127.0.0.1:1/0", "--ws-port", "0"], "needs fixed ports")):
        out = subprocess.run([sys.executable, "-m", "signaling_trio", "serve", "--workers", "2", *extra],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and says in out.stderr and len(out.stderr.strip().splitlines()) == 1


async def test_an_owner_that_loses_its_lease_hands_the_room_over(redis):
    """Redis lost the lease and another instance took it (say, Redis restarted without
    persistence while the owner was between renewals): the old owner stops its actor
    silently and moves its peers, their subscription and reservation with them."""
    import coredis

    from signaling_trio.cluster.transport import lease_key

    async with instances(redis.url, n=2) as (a, b):
        room = await a.new_room()
        async with ws_peer(a.ws_url) as holder, ws_peer(a.ws_url) as worker, ws_peer(b.ws_url) as other:
            await register(holder, room, "holder", role="client")
            await register(worker, room, "worker", role="worker")
            await register(other, room, "other", role="client")
            assert room["room_id"] in a.server.supervisor.rooms
            await holder.request({"type": "subscribe", "filters": {"role": "worker"}})
            assert (await holder.request({"type": "reserve_peer", "to_peer_id": "worker", "duration_sec": 300}))[
                "type"
            ] == "reservation_granted"
            assert (await worker.recv_type("peer_reserved"))["by"] == "holder"
            await trio.sleep(0.3)  # facts saved
            async with coredis.Redis(host="127.0.0.1", port=redis.port, decode_responses=True) as r:
                await r.set(lease_key(room["room_id"]), b.server.router.id, px=3000)

            async def moved() -> bool:
                return room["room_id"] in b.server.supervisor.rooms and room["room_id"] not in a.server.supervisor.rooms

            await eventually(moved)
            assert await discover_ids(other) == ["holder", "worker"]
            (w,) = (await other.request({"type": "discover_peers", "filters": {"role": "worker"}}))["peers"]
            assert w["reserved_by"] == "holder"
            # nobody was told anything but the subscription's own news
            assert await worker.nothing_pending()
            # the subscription still works: a worker joining on B reaches the holder on A
            async with ws_peer(b.ws_url) as late:
                await register(late, room, "late", role="worker")
                while (event := await holder.recv())["type"] != "peer_joined":
                    assert event["type"] == "peer_updated", event
                assert event["peer"]["peer_id"] == "late"


async def test_churn_across_three_instances_leaves_a_consistent_room(redis):
    """Peers join, re-register, message and leave at random on three instances; then
    every instance's discovery and the cluster counts agree with who is connected."""
    import random

    rng = random.Random(int(os.environ.get("CHURN_SEED", "8")))
    async with instances(redis.url) as servers:
        room = await servers[0].new_room()
        alive: dict[str, Any] = {}

        async def answer(p: Any, mtype: str) -> dict[str, Any]:
            """The next `mtype` frame; on the way only other peers' messages and errors
            for messages to peers that already left are allowed."""
            while True:
                msg = await p.recv()
                if msg["type"] == mtype:
                    return msg
                assert msg["type"] == "peer_message" or msg.get("code") == "PEER_NOT_IN_ROOM", msg

        async def life(n: int) -> None:
            srv = servers[rng.randrange(3)]
            pid = f"p{n}"
            async with ws_peer(srv.ws_url) as p:
                assert (await register(p, room, pid, role=rng.choice(["worker", "client"])))[
                    "type"
                ] == "registered_auth"
                for _ in range(rng.randrange(1, 6)):
                    step = rng.random()
                    if step < 0.3:
                        await p.send(
                            {
                                "type": "register",
                                "peer_id": pid,
                                "room_id": room["room_id"],
                                "token": room["token"],
                                "id_token": room["id_token"],
                                "role": "worker",
                                "metadata": {"properties": {"n": n}},
                            }
                        )
                        await answer(p, "registered_auth")
                    elif step < 0.6:
                        await p.send({"type": "peer_message", "to_peer_id": f"p{rng.randrange(40)}", "payload": n})
                    else:
                        await p.send({"type": "discover_peers", "filters": {"role": "worker"}})
                        await answer(p, "peer_list")
                    await trio.sleep(rng.random() * 0.05)
                if n % 3 == 0:  # a third stay
                    alive[pid] = p
                    await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(life, n)
                await trio.sleep(0.01)
            with trio.fail_after(20):
                while len(alive) < 14:
                    await trio.sleep(0.05)
            expected = sorted(alive)
            async with ws_peer(servers[1].ws_url) as probe:
                await register(probe, room, "probe")

                async def consistent() -> bool:
                    return await discover_ids(probe) == expected

                await eventually(consistent)

            async def counted() -> bool:
                views = [(await s.http("GET", "/metrics"))[1]["cluster"] for s in servers]
                return all(v["active_connections"] == len(expected) for v in views)

            await eventually(counted)
            nursery.cancel_scope.cancel()


async def test_a_gracefully_stopped_owner_hands_its_rooms_over(redis):
    async with open_test_server(store=redis.url) as b:
        room = await b.new_room()
        async with ws_peer(b.ws_url) as stays:
            async with AsyncExitStack() as a_life:
                a = await a_life.enter_async_context(open_test_server(store=redis.url))
                goes = await a_life.enter_async_context(ws_peer(a.ws_url))
                assert (await register(goes, room, "goes"))["type"] == "registered_auth"  # A owns it
                assert (await register(stays, room, "stays", role="worker"))["type"] == "registered_auth"
                assert room["room_id"] in a.server.supervisor.rooms
                # A stops (its peer leaves first); on the way out it hands its lease back
            stopped_at = trio.current_time()

            async def alone() -> bool:
                return await discover_ids(stays) == []

            await eventually(alone)
            assert room["room_id"] in b.server.supervisor.rooms
            took = trio.current_time() - stopped_at
            assert took < 4.5  # measured 3.3 s; 6.6 s when the lease was left to lapse
            async with ws_peer(b.ws_url) as late:
                assert (await register(late, room, "late"))["type"] == "registered_auth"
                assert await discover_ids(late) == ["stays"]


async def keep_asking(peer: Any, name: str, stop_at: float, log: list[tuple[str, float]]) -> None:
    """Request after request until `stop_at`, each waiting for its answer: alternately
    update_metadata with a counter (its answer carries the counter back, so an answer to
    an older request, or a second one, is caught) and discover_peers."""
    i = 0
    while trio.current_time() < stop_at:
        i += 1
        sent = trio.current_time()
        if i % 2:
            await peer.send({"type": "update_metadata", "metadata": {"properties": {"n": i}}})
            msg = await peer.recv(timeout=ANSWER_BOUND)
            assert msg["type"] == "metadata_updated" and msg["metadata"]["properties"]["n"] == i, (name, i, msg)
        else:
            await peer.send({"type": "discover_peers", "filters": {}})
            msg = await peer.recv(timeout=ANSWER_BOUND)
            assert msg["type"] == "peer_list", (name, i, msg)
        log.append((name, trio.current_time() - sent))
        await trio.sleep(0.02)  # within the per-connection rate limit


async def ask_through(
    fault: Any, askers: dict[str, Any], before: float = 1.0, after: float = 10.0
) -> list[tuple[str, float]]:
    """Every asker keeps a request in flight while `fault()` runs; returns (asker,
    seconds to the answer) for every request; then checks that no late second answer
    arrives."""
    log: list[tuple[str, float]] = []
    start = trio.current_time()
    async with trio.open_nursery() as n:
        for name, peer in askers.items():
            n.start_soon(keep_asking, peer, name, start + before + after, log)
        await trio.sleep(before)
        await fault()
    await trio.sleep(1.0)
    for peer in askers.values():
        assert await peer.nothing_pending()  # nothing queued: no request answered twice
    return log


async def test_requests_in_flight_through_an_owner_sigkill_are_all_answered(redis):
    async with instances(redis.url, n=2) as (b, c), server_process(redis.url) as a:
        room = await b.new_room()
        async with ws_peer(a.ws_url) as wa, ws_peer(b.ws_url) as p1, ws_peer(b.ws_url) as p2, ws_peer(c.ws_url) as p3, \
                ws_peer(b.ws_url) as q, ws_peer(c.ws_url) as r:
            assert (await register(wa, room, "wa", role="worker"))["type"] == "registered_auth"  # A owns the room
            for name, p in (("p1", p1), ("p2", p2), ("p3", p3), ("q", q), ("r", r)):
                assert (await register(p, room, name, role="client"))["type"] == "registered_auth"
            assert not b.server.supervisor.rooms and not c.server.supervisor.rooms
            drops_before = b.server.metrics.cluster_drops

            async def kill() -> None:
                a.kill()
                await trio.sleep(0.2)
                # fire-and-forget into the gap: routed through the dead owner
                await q.send({"type": "peer_message", "to_peer_id": "r", "payload": "gap"})

            log = await ask_through(kill, {"p1": p1, "p2": p2, "p3": p3})
            # it is either delivered after the move or counted as dropped (docs/SCALING.md)
            delivered = not await r.nothing_pending()
            assert delivered or b.server.metrics.cluster_drops > drops_before
            worst = max(t for _, t in log)
            print(f"\nSIGKILL: {len(log)} requests, all answered once; slowest {worst:.2f} s")
            assert worst < ANSWER_BOUND
            assert len([s for s in (b, c) if room["room_id"] in s.server.supervisor.rooms]) == 1


async def test_requests_in_flight_through_a_redis_restart_are_all_answered(redis, tmp_path):
    persistent = RedisServer(data_dir=str(tmp_path))
    persistent.start()
    try:
        async with instances(persistent.url, n=2) as (a, b):
            room = await a.new_room()
            async with ws_peer(a.ws_url) as x, ws_peer(b.ws_url) as y, ws_peer(b.ws_url) as z:
                for name, p in (("x", x), ("y", y), ("z", z)):
                    assert (await register(p, room, name))["type"] == "registered_auth"

                async def restart() -> None:
                    persistent.stop()
                    await trio.sleep(3.0)
                    persistent.start()

                log = await ask_through(restart, {"x": x, "y": y, "z": z})
                worst = max(t for _, t in log)
                print(f"\nRedis restart: {len(log)} requests, all answered once; slowest {worst:.2f} s")
                assert worst < ANSWER_BOUND
    finally:
        persistent.stop()


async def test_requests_in_flight_through_a_graceful_stop_are_all_answered(redis):
    async with instances(redis.url, n=2) as (b, c):
        room = await b.new_room()
        async with AsyncExitStack() as a_life:
            a = await a_life.enter_async_context(open_test_server(store=redis.url))
            goes = await a_life.enter_async_context(ws_peer(a.ws_url))
            assert (await register(goes, room, "goes"))["type"] == "registered_auth"  # A owns the room
            async with ws_peer(b.ws_url) as p1, ws_peer(c.ws_url) as p2:
                for name, p in (("p1", p1), ("p2", p2)):
                    assert (await register(p, room, name))["type"] == "registered_auth"

                async def stop_a() -> None:
                    a.server.shutdown()  # graceful: as on SIGTERM

                log = await ask_through(stop_a, {"p1": p1, "p2": p2}, after=4.0)
                assert any(room["room_id"] in s.server.supervisor.rooms for s in (b, c))
        worst = max(t for _, t in log)
        print(f"\ngraceful stop: {len(log)} requests, all answered once; slowest {worst:.2f} s")
        assert worst < ANSWER_BOUND


async def test_requests_in_flight_through_a_lost_lease_are_all_answered(redis):
    import coredis

    from signaling_trio.cluster.transport import lease_key

    async with instances(redis.url, n=2) as (a, b):
        room = await a.new_room()
        async with ws_peer(a.ws_url) as p1, ws_peer(a.ws_url) as p2, ws_peer(b.ws_url) as p3:
            for name, p in (("p1", p1), ("p2", p2), ("p3", p3)):
                assert (await register(p, room, name))["type"] == "registered_auth"
            assert room["room_id"] in a.server.supervisor.rooms

            async def steal() -> None:
                async with coredis.Redis(host="127.0.0.1", port=redis.port, decode_responses=True) as r:
                    await r.set(lease_key(room["room_id"]), b.server.router.id, px=3000)

            log = await ask_through(steal, {"p1": p1, "p2": p2, "p3": p3}, after=5.0)
            assert room["room_id"] in b.server.supervisor.rooms
        worst = max(t for _, t in log)
        print(f"\nlost lease: {len(log)} requests, all answered once; slowest {worst:.2f} s")
        assert worst < ANSWER_BOUND
