"""Soak and fault run: minutes of churn, then idle; every request answered once, and the
server's resources back where they began.

    python benchmarks/soak.py                  # single process, then a 3-instance cluster with faults
    python benchmarks/soak.py --quick          # a smoke run (the test suite runs this)
    python benchmarks/soak.py --mode cluster --churn 300 --idle 60

Per run: ROOMS rooms, each with STABLE stable peers (connected through the churn; they
only receive) and churners that keep connecting, registering, asking, messaging,
re-registering and leaving: cleanly, or by a TCP reset in the middle of a frame. Every
request is one the room answers exactly once (update_metadata carries a counter its
answer echoes, so an answer to another request is caught); each is counted answered,
errored (an error frame: a valid answer, by code) or unanswered (nothing within 20 s on a
live connection: must be 0). Churners send peer_messages to stable peers, which count
what arrives: lost = sent - received, after a drain.

Cluster mode: three instances on one redis-server (AOF on, so rooms survive its
restart); stable peers on instances 1 and 2; a third of the way in, instance 0 is
SIGKILLed (its churners reconnect elsewhere) and started again; two thirds in, Redis
is stopped for 2 s and started again.

Sampled before the churn, every 10 s, and after the idle: each server's RSS, open
descriptors and /metrics gauges. Results: <out>/soak.json and <out>/soak.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from run import HERE, free_port, rss_kb, stop, wait_port

ANSWER_TIMEOUT = 20.0
GAUGES = ("open_websockets", "active_rooms", "active_connections")


@dataclass
class Server:
    argv: list[str]
    ws_port: int
    http_port: int
    log: Any
    proc: subprocess.Popen | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=self.log)
        wait_port(self.http_port, self.proc)
        wait_port(self.ws_port, self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def make_server(store: str, log_dir: str, name: str) -> Server:
    ws_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "signaling_trio", "serve", "--host", "127.0.0.1", "--ws-port", str(ws_port),
            "--http-port", str(http_port), "--store", store, "--rate-limit", "0", "--http-rate-limit", "0",
            "--log-level", "warning"]
    return Server(argv, ws_port, http_port, open(os.path.join(log_dir, f"soak-{name}.log"), "w"))


def post(url: str, token: str | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url, data=b"", method="POST",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def sample(srv: Server) -> dict[str, Any]:
    """RSS, descriptors and gauges of one server (None where it is down)."""
    if not srv.alive():
        return {"down": True}
    pid = srv.proc.pid  # type: ignore[union-attr]
    out: dict[str, Any] = {"rss_kb": rss_kb(pid), "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    try:
        with urllib.request.urlopen(srv.http_url + "/metrics", timeout=5) as r:
            m = json.loads(r.read())
        out.update({g: m[g] for g in GAUGES})
        out["cluster_items_dropped"] = m.get("cluster_items_dropped", 0)
    except OSError:
        out["metrics"] = "unreachable"
    return out


async def sample_all(servers: list[Server]) -> list[dict[str, Any]]:
    return await trio.to_thread.run_sync(lambda: [sample(s) for s in servers])


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)  # answered / errored / unanswered / lost_with_connection
    errors: Counter[str] = field(default_factory=Counter)
    sessions: Counter[str] = field(default_factory=Counter)
    sent: set[int] = field(default_factory=set)
    received: set[int] = field(default_factory=set)
    next_id: int = 0
    wrong: list[str] = field(default_factory=list)
    refused: int = 0  # peer_messages answered PEER_NOT_IN_ROOM
    start: float = 0.0


class Unanswered(Exception):
    pass


async def ask(ws: Any, msg: dict[str, Any], expect: str, tally: Tally, check: Any = None) -> dict[str, Any]:
    await ws.send_message(json.dumps(msg))
    with trio.move_on_after(ANSWER_TIMEOUT):
        answer = json.loads(await ws.get_message())
        while answer["type"] == "error" and answer["code"] == "PEER_NOT_IN_ROOM":
            # an earlier peer_message's refusal (its stable target was being restored
            # after a move), not this request's answer
            tally.refused += 1
            answer = json.loads(await ws.get_message())
        if answer["type"] == "error":
            tally.requests["errored"] += 1
            tally.errors[answer["code"]] += 1
        elif answer["type"] != expect or (check is not None and not check(answer)):
            tally.requests["wrong answer"] += 1  # another request's, or a second one: must be 0
            tally.wrong.append(f"{trio.current_time() - tally.start:.1f} s: {msg['type']} answered by {answer['type']}")
            raise Unanswered(msg["type"])  # this connection's answers can no longer be matched
        else:
            tally.requests["answered"] += 1
        return answer
    tally.requests["unanswered"] += 1
    raise Unanswered(msg["type"])


async def churner(
    n: int, rooms: list[dict[str, Any]], servers: list[Server], end: float, tally: Tally, seed: int
) -> None:
    rng = random.Random(seed)
    while trio.current_time() < end:
        live = [s for s in servers if s.alive()]
        if not live:
            await trio.sleep(0.5)
            continue
        srv, room = rng.choice(live), rng.choice(rooms)
        if rng.random() < 0.15:
            await reset_mid_frame(srv, room, f"r{n}", tally)
            continue
        try:
            async with open_websocket_url(srv.ws_url) as ws:
                await session(ws, room, f"c{n}", rng, tally)
        except Unanswered:
            pass
        except (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
            tally.requests["lost_with_connection"] += 1  # its instance was killed mid-request
            tally.sessions["connection lost"] += 1
            await trio.sleep(0.2)


def register_msg(room: dict[str, Any], peer_id: str, **extra: Any) -> dict[str, Any]:
    return {"type": "register", "peer_id": peer_id, "room_id": room["room_id"], "token": room["token"],
            "id_token": room["id_token"], **extra}


async def session(ws: Any, room: dict[str, Any], peer_id: str, rng: random.Random, tally: Tally) -> None:
    reg = register_msg(room, peer_id, role="client", metadata={"tags": ["soak"]})
    if (await ask(ws, reg, "registered_auth", tally))["type"] == "error":
        await trio.sleep(0.5)  # e.g. STORE_UNAVAILABLE while Redis restarts
        return
    tally.sessions["registered"] += 1
    for i in range(rng.randrange(5, 30)):
        roll = rng.random()
        if roll < 0.3:
            await ask(ws, {"type": "discover_peers", "filters": {"role": "stable"}}, "peer_list", tally)
        elif roll < 0.5:
            await ask(ws, {"type": "update_metadata", "metadata": {"properties": {"n": i}}}, "metadata_updated", tally,
                      check=lambda a, i=i: a["metadata"]["properties"]["n"] == i)
        elif roll < 0.6:
            target = rng.choice(room["stable"])
            got = await ask(
                ws, {"type": "reserve_peer", "to_peer_id": target, "duration_sec": 5}, "reservation_granted", tally
            )
            if got["type"] != "error":
                await ask(ws, {"type": "release_peer", "to_peer_id": target}, "reservation_released", tally)
        elif roll < 0.65:
            await ask(ws, reg, "registered_auth", tally)  # as v2 workers do after every job
        else:
            tally.next_id += 1
            tally.sent.add(tally.next_id)
            await ws.send_message(json.dumps({"type": "peer_message", "to_peer_id": rng.choice(room["stable"]),
                                              "payload": {"id": tally.next_id, "pad": "x" * rng.randrange(0, 2000)}}))
        await trio.sleep(rng.uniform(0.0, 0.05))
    tally.sessions["left cleanly"] += 1


def frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def reset_mid_frame(srv: Server, room: dict[str, Any], peer_id: str, tally: Tally) -> None:
    """Register over a raw socket, then send half a frame and reset the connection."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request

    try:
        stream = await trio.open_tcp_stream("127.0.0.1", srv.ws_port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host="127.0.0.1", target="/")))
        with trio.fail_after(5):
            while not any(isinstance(e, AcceptConnection) for e in ws.events()):
                data = await stream.receive_some(65536)
                if not data:
                    raise OSError("closed in handshake")
                ws.receive_data(data)
            await stream.send_all(frame(json.dumps(register_msg(room, peer_id)).encode()))
            await stream.receive_some(65536)  # registered_auth (or an error)
        half = frame(json.dumps({"type": "peer_message", "to_peer_id": "x", "payload": "y" * 500}).encode())
        await stream.send_all(half[: len(half) // 2])
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        tally.sessions["reset mid-frame"] += 1
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        tally.sessions["reset failed to start"] += 1


async def stable_peer(srv: Server, room: dict[str, Any], peer_id: str, tally: Tally, done: trio.Event,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with open_websocket_url(srv.ws_url) as ws:
        await ws.send_message(json.dumps(register_msg(room, peer_id, role="stable")))
        assert json.loads(await ws.get_message())["type"] == "registered_auth"
        task_status.started()
        async with trio.open_nursery() as n:
            async def stop_on_done() -> None:
                await done.wait()
                n.cancel_scope.cancel()

            n.start_soon(stop_on_done)
            while True:
                msg = json.loads(await ws.get_message())
                if msg["type"] == "peer_message":
                    tally.received.add(msg["payload"]["id"])


async def faults(servers: list[Server], redis: "Redis | None", start: float, churn: float, log: list[str]) -> None:
    """Cluster mode: SIGKILL instance 0 and start it again; later restart Redis."""
    if redis is None:
        return
    await trio.sleep_until(start + churn / 3)
    servers[0].proc.kill()  # type: ignore[union-attr]
    log.append(f"{trio.current_time() - start:.1f} s: instance 0 SIGKILLed")
    await trio.sleep(3.0)
    await trio.to_thread.run_sync(servers[0].start)
    log.append(f"{trio.current_time() - start:.1f} s: instance 0 started again")
    await trio.sleep_until(start + 2 * churn / 3)
    await trio.to_thread.run_sync(redis.stop)
    log.append(f"{trio.current_time() - start:.1f} s: Redis stopped")
    await trio.sleep(2.0)
    await trio.to_thread.run_sync(redis.start)
    log.append(f"{trio.current_time() - start:.1f} s: Redis started again")


class Redis:
    """A redis-server with AOF in a temporary directory (rooms survive its restart)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="soak-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir,
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


async def sampler(servers: list[Server], start: float, samples: list[dict[str, Any]]) -> None:
    while True:
        await trio.sleep(10.0)
        samples.append({"t": round(trio.current_time() - start, 1),
                        "servers": await sample_all(servers)})


async def soak(mode: str, cfg: argparse.Namespace, log_dir: str) -> dict[str, Any]:
    redis = Redis() if mode == "cluster" else None
    if redis is not None:
        redis.start()
    store = redis.url if redis is not None else "memory"
    servers = [make_server(store, log_dir, f"{mode}{i}") for i in range(3 if redis else 1)]
    for s in servers:
        await trio.to_thread.run_sync(s.start)
    try:
        return await _soak(servers, redis, cfg)
    finally:
        for s in servers:
            if s.alive():
                stop(s.proc)  # type: ignore[arg-type]
        if redis is not None:
            redis.stop()


async def _soak(servers: list[Server], redis: Redis | None, cfg: argparse.Namespace) -> dict[str, Any]:
    rooms = []
    for r in range(cfg.rooms):
        me = await trio.to_thread.run_sync(post, servers[0].http_url + "/anonymous-signin")
        room = await trio.to_thread.run_sync(post, servers[0].http_url + "/create-room", me["id_token"])
        rooms.append({**room, "id_token": me["id_token"], "stable": [f"s{r}-{k}" for k in range(cfg.stable)]})
    await trio.sleep(1.0)
    before = await sample_all(servers)
    tally, samples, fault_log = Tally(), [], []
    homes = servers[1:] or servers  # stable peers never on the instance that gets killed
    done = trio.Event()
    start = tally.start = trio.current_time()
    async with trio.open_nursery() as outer:
        for r, room in enumerate(rooms):
            for k, peer_id in enumerate(room["stable"]):
                await outer.start(stable_peer, homes[(r + k) % len(homes)], room, peer_id, tally, done)
        outer.start_soon(sampler, servers, start, samples)
        async with trio.open_nursery() as churn:
            for n in range(cfg.churners):
                churn.start_soon(churner, n, rooms, servers, start + cfg.churn, tally, n)
            churn.start_soon(faults, servers, redis, start, cfg.churn, fault_log)
        await trio.sleep(3.0)  # the last messages drain to the stable peers
        done.set()
        await trio.sleep(cfg.idle)
        outer.cancel_scope.cancel()
    after = await sample_all(servers)
    lost = tally.sent - tally.received
    return {
        "requests": dict(tally.requests), "errors": dict(tally.errors), "sessions": dict(tally.sessions),
        "messages_sent": len(tally.sent), "messages_received": len(tally.received & tally.sent),
        "messages_lost": len(lost), "messages_refused": tally.refused, "faults": fault_log,
        "wrong_answers": tally.wrong, "before": before, "after": after, "samples": samples,
    }


def render(results: dict[str, Any], cfg: argparse.Namespace) -> str:
    lines = [f"# Soak ({cfg.churn:g} s churn, {cfg.idle:g} s idle, {cfg.rooms} rooms x {cfg.stable} stable peers, "
             f"{cfg.churners} churners)", ""]
    for mode, r in results.items():
        req = r["requests"]
        lines += [f"## {mode}", "",
                  f"- requests: {sum(req.values()):,} sent; answered {req.get('answered', 0):,}, "
                  f"errored {req.get('errored', 0):,} {r['errors'] or ''}, unanswered {req.get('unanswered', 0)}, "
                  f"lost with their connection (instance killed) {req.get('lost_with_connection', 0)}",
                  f"- sessions: {r['sessions']}",
                  f"- peer_messages to stable peers: {r['messages_sent']:,} sent, {r['messages_received']:,} received, "
                  f"{r['messages_lost']} lost; {r['messages_refused']} refused with PEER_NOT_IN_ROOM "
                  f"(the target not yet restored after a move)", ""]
        if r["faults"]:
            lines += ["- faults: " + "; ".join(r["faults"]), ""]
        if r["wrong_answers"]:
            lines += ["- wrong answers: " + "; ".join(r["wrong_answers"]), ""]
        lines += [
            "| server | RSS before -> during max -> after (KB) | fds before -> after | gauges after |",
            "|---|---|---|---|",
        ]
        for i, (b, a) in enumerate(zip(r["before"], r["after"], strict=True)):
            peak = max((s["servers"][i].get("rss_kb", 0) for s in r["samples"]), default=0)
            gauges = {g: a.get(g) for g in GAUGES}
            if "cluster_items_dropped" in a:
                gauges["cluster_items_dropped"] = a["cluster_items_dropped"]
            lines.append(f"| {i} | {b.get('rss_kb')} -> {peak} -> {a.get('rss_kb')} "
                         f"| {b.get('fds')} -> {a.get('fds')} | {gauges} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 12 s churn, 2 s idle, few peers")
    ap.add_argument("--mode", choices=("single", "cluster", "both"), default="both")
    ap.add_argument("--churn", type=float, default=180.0)
    ap.add_argument("--idle", type=float, default=60.0)
    ap.add_argument("--rooms", type=int, default=10)
    ap.add_argument("--stable", type=int, default=3)
    ap.add_argument("--churners", type=int, default=60)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    cfg = ap.parse_args()
    if cfg.quick:
        cfg.churn, cfg.idle, cfg.rooms, cfg.stable, cfg.churners = 12.0, 2.0, 3, 2, 12
    os.makedirs(os.path.join(cfg.out, "logs"), exist_ok=True)
    modes = ["single", "cluster"] if cfg.mode == "both" else [cfg.mode]
    results = {mode: trio.run(soak, mode, cfg, os.path.join(cfg.out, "logs")) for mode in modes}
    with open(os.path.join(cfg.out, "soak.json"), "w") as f:
        json.dump({"config": vars(cfg), "results": results, "at": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
    text = render(results, cfg)
    with open(os.path.join(cfg.out, "soak.md"), "w") as f:
        f.write(text)
    print(text)
    bad = sum(r["requests"].get("unanswered", 0) + r["requests"].get("wrong answer", 0) for r in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
