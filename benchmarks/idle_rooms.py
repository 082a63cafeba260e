"""What rooms cost a cluster while nothing happens in them: lease renewals, owner
look-ups and heartbeats, which grow with rooms, not messages.

    python benchmarks/idle_rooms.py                      # 1,000 rooms, 10 s
    python benchmarks/idle_rooms.py --before /tmp/before # the same, another checkout too

Scenario: two instances on one fresh redis-server; N rooms, one idle peer in each on
instance A (the rooms' owner), then one more on instance B (its connections' rooms live
elsewhere). After 3 s of quiet, the CPU of A, B and Redis over `--seconds`, as % of a
core; and A's CPU per peer while its peers connected and registered (each a new room:
its lease, its peer note), in waves of 100. `--before DIR` runs the same with the server of another checkout of this
repository, right after (one run each; the figures are steady within a few tenths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import trio
from trio_websocket import open_websocket_url

from cluster import instance, new_rooms, redis_server
from run import HERE, ROOT, cpu_seconds


async def _peers(url: str, token: str, rooms: list[dict[str, str]], tag: str, ready: list[int],
                 hold: trio.Event) -> None:
    async def one(i: int, room: dict[str, str]) -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"type": "register", "peer_id": f"{tag}{i}", "room_id": room["room_id"],
                                              "token": room["token"], "id_token": token}))
            assert json.loads(await ws.get_message())["type"] == "registered_auth"
            ready.append(1)
            await hold.wait()

    async with trio.open_nursery() as nursery:
        for i, room in enumerate(rooms):
            nursery.start_soon(one, i, room)
            if i % 100 == 99:
                await trio.sleep(0.05)  # (connects in waves of 100)


def measure(rooms_n: int, seconds: float, root: str, quiet: float = 3.0) -> dict[str, Any]:
    with redis_server() as r, instance(r["url"], root=root) as a, instance(r["url"], root=root) as b:
        token, rooms = new_rooms(a["http"], rooms_n)
        out: dict[str, Any] = {"rooms": rooms_n}

        async def main() -> None:
            on_a: list[int] = []
            on_b: list[int] = []
            hold = trio.Event()
            async with trio.open_nursery() as nursery:
                c0 = cpu_seconds(a["pid"])
                nursery.start_soon(_peers, a["ws_url"], token, rooms, "a", on_a, hold)
                while len(on_a) < rooms_n:
                    await trio.sleep(0.1)
                await trio.sleep(0.5)  # (what the registers queued: leases, peer notes)
                out["owner_connect_ms_per_peer"] = round(1000 * (cpu_seconds(a["pid"]) - c0) / rooms_n, 3)
                nursery.start_soon(_peers, b["ws_url"], token, rooms, "b", on_b, hold)
                while len(on_b) < rooms_n:
                    await trio.sleep(0.1)
                await trio.sleep(quiet)
                pids = {"owner": a["pid"], "other": b["pid"], "redis": r["pid"]}
                before, t0 = {k: cpu_seconds(p) for k, p in pids.items()}, time.monotonic()
                await trio.sleep(seconds)
                after, t1 = {k: cpu_seconds(p) for k, p in pids.items()}, time.monotonic()
                out.update({f"{k}_cpu_pct": round(100 * (after[k] - before[k]) / (t1 - t0), 1) for k in pids})
                hold.set()

        trio.run(main)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rooms", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--before", help="another checkout of this repository, measured right after")
    ap.add_argument("--quick", action="store_true", help="20 rooms, 0.2 s quiet, 1 s: the test suite's smoke run")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    n, secs, quiet = (20, 1.0, 0.2) if args.quick else (args.rooms, args.seconds, 3.0)
    runs = {"now": measure(n, secs, ROOT, quiet)}
    print(json.dumps(runs["now"]), flush=True)
    if args.before:
        runs["before"] = measure(n, secs, args.before, quiet)
        print(json.dumps(runs["before"]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "idle_rooms.json"), "w") as f:
        json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
