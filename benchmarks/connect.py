"""Connect cost: what a connection costs the server from accept to `registered_auth`.

    python benchmarks/connect.py                 # 3 interleaved rounds, ratios, table
    python benchmarks/connect.py --profile       # where the server's time goes (cProfile)
    python benchmarks/connect.py --storm         # 5,000 reconnecting at once after a restart
    python benchmarks/connect.py --quick         # a smoke run (the test suite runs this)

Scenario (the reconnect wave of issue 16): N peers in rooms of 10; per room one
`POST /anonymous-signin` and one `POST /create-room` (a new HTTP connection each, as the
v2 clients' `requests.post` makes them); then every peer connects and registers (role and
metadata) and stays idle. Server CPU over the whole phase (HTTP included), divided by N.
Baseline, in the same round: the bare trio-websocket relay (benchmarks/bare_relay.py)
taking N connections that each send one naming frame and get one reply: the handshake
and one message each way, nothing else: the floor for anything built on trio-websocket.
Server pinned to core 0, the load generator (Node `ws`) to core 1, as in run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Iterator

from run import (HERE, RESULTS_LOGS, ROOT, SERVER_CPU, Loadgen, _post, cpu_seconds, ensure_node_modules,
                 free_port, pinned, stop, wait_port)

ROOM_SIZE = 10


@contextmanager
def ours(store: str, *, profile: str | None = None, src: str | None = None) -> Iterator[dict[str, Any]]:
    """Our server; `src`: from another checkout of this repository (a before/after run)."""
    ws_port, http_port = free_port(), free_port()
    prefix = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else [])
    argv = prefix + ["-m", "signaling_trio", "serve", "--host", "127.0.0.1", "--ws-port", str(ws_port),
                     "--http-port", str(http_port), "--store", store, "--rate-limit", "1000000000",
                     "--rate-burst", "1000000000", "--http-rate-limit", "0", "--log-level", "warning"]
    with _process(argv, ws_port, "ours", src) as pid:
        yield {"kind": "ours", "pid": pid, "ws_url": f"ws://127.0.0.1:{ws_port}/",
               "http": f"http://127.0.0.1:{http_port}"}


@contextmanager
def bare() -> Iterator[dict[str, Any]]:
    ws_port = free_port()
    with _process([sys.executable, os.path.join(HERE, "bare_relay.py"), str(ws_port)], ws_port, "bare") as pid:
        yield {"kind": "bare", "pid": pid, "ws_url": f"ws://127.0.0.1:{ws_port}/"}


@contextmanager
def _process(argv: list[str], port: int, name: str, src: str | None = None) -> Iterator[int]:
    os.makedirs(RESULTS_LOGS, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": src} if src else None
    with open(os.path.join(RESULTS_LOGS, f"connect-{name}-{port}.log"), "w") as log:
        proc = subprocess.Popen(pinned(SERVER_CPU, argv), stdout=log, stderr=subprocess.STDOUT, cwd=src or ROOT,
                                env=env)
        try:
            wait_port(port, proc)
            time.sleep(0.3)
            yield proc.pid
        finally:
            stop(proc, timeout=30)


def make_rooms(srv: dict[str, Any], count: int) -> tuple[list[dict[str, str]], str]:
    rooms, id_token = [], ""
    for _ in range((count + ROOM_SIZE - 1) // ROOM_SIZE):
        id_token = _post(srv["http"] + "/anonymous-signin")["id_token"]
        room = _post(srv["http"] + "/create-room", id_token)
        rooms.append({"room_id": room["room_id"], "token": room["token"], "id_token": id_token})
    return rooms, id_token


def wave(srv: dict[str, Any], count: int, *, rooms: list[dict[str, str]] | None = None,
         concurrency: int = 200) -> dict[str, Any]:
    """Connect `count` peers (making their rooms first when `srv` is ours and none are
    given); the server's CPU over it all, per peer, and the wall time of the connects."""
    cpu0, t0 = cpu_seconds(srv["pid"]), time.monotonic()
    cfg: dict[str, Any] = {"scenario": "capacity", "count": count, "concurrency": concurrency}
    if srv["kind"] == "ours":
        if rooms is None:
            rooms, _ = make_rooms(srv, count)
        # every peer presents its own room's signer's id_token (the loadgen's `where`)
        cfg.update(rooms=rooms, id_token=rooms[0]["id_token"])
    lg = Loadgen(srv, cfg)
    connected = lg.wait_phase("connected")
    cpu1, t1 = cpu_seconds(srv["pid"]), time.monotonic()
    lg.wait_phase("idle")
    lg.finish()
    return {"ms_per_peer": 1000 * (cpu1 - cpu0) / count, "connect_s": connected["seconds"], "wall_s": t1 - t0}


def rounds(runs: int, count: int, store: str, before: str | None = None) -> dict[str, Any]:
    per: list[dict[str, Any]] = []
    for i in range(runs):
        with bare() as srv:
            b = wave(srv, count)
        with ours(_fresh(store, i, "now")) as srv:
            o = wave(srv, count)
        row = {"ours": o, "bare": b, "ratio": o["ms_per_peer"] / b["ms_per_peer"]}
        if before:
            with ours(_fresh(store, i, "before"), src=before) as srv:
                row["before"] = w = wave(srv, count)
            row["before_ratio"] = w["ms_per_peer"] / b["ms_per_peer"]
            row["now_over_before"] = o["ms_per_peer"] / w["ms_per_peer"]
        per.append(row)
        print(json.dumps(row), flush=True)
    med = statistics.median
    out = {
        "ours_ms": med([r["ours"]["ms_per_peer"] for r in per]),
        "bare_ms": med([r["bare"]["ms_per_peer"] for r in per]),
        "ratio": med([r["ratio"] for r in per]),
        "rounds": [round(r["ratio"], 2) for r in per],
        "raw": per,
    }
    if before:
        out.update(before_ms=med([r["before"]["ms_per_peer"] for r in per]),
                   before_ratio=med([r["before_ratio"] for r in per]),
                   now_over_before=med([r["now_over_before"] for r in per]),
                   now_over_before_rounds=[round(r["now_over_before"], 2) for r in per])
    return out


def _fresh(store: str, i: int, who: str) -> str:
    """A new sqlite file per run (the same store kind, nothing left from the last run)."""
    if not store.startswith("sqlite"):
        return store
    path = os.path.join(tempfile.gettempdir(), f"connect-{os.getpid()}-{who}-{i}.sqlite3")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    return "sqlite:" + path


def storm(count: int) -> dict[str, Any]:
    """Rooms made on a sqlite store; the server restarted; then all `count` peers connect
    at once (one load generator, every connection opened before any is awaited)."""
    data = tempfile.mkdtemp(prefix="storm-")
    try:
        store = "sqlite:" + os.path.join(data, "rooms.sqlite3")
        with ours(store) as srv:
            rooms, _ = make_rooms(srv, count)
        with ours(store) as srv:
            got = wave(srv, count, rooms=rooms, concurrency=count)
        return {"count": count, "all_registered_s": got["connect_s"], "server_ms_per_peer": got["ms_per_peer"]}
    finally:
        shutil.rmtree(data, ignore_errors=True)


def profile(count: int, store: str, out: str) -> None:
    import pstats

    with ours(store, profile=out) as srv:
        got = wave(srv, count)
    print(json.dumps(got))
    stats = pstats.Stats(out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--store", default="memory", help="ours: memory (default) or sqlite:PATH")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--storm", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--before", default=None, metavar="DIR",
                    help="also run the server from this checkout (e.g. a git worktree of an older commit)")
    args = ap.parse_args()
    ensure_node_modules()
    if args.quick:
        args.runs, args.count = 1, 100
    if args.profile:
        profile(args.count, args.store, os.path.join(RESULTS_LOGS, "connect.prof"))
        return 0
    if args.storm:
        print(json.dumps(storm(args.count)))
        return 0
    r = rounds(args.runs, args.count, args.store, args.before)
    rows = [
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"store {args.store.split(':')[0]}; {args.runs} interleaved rounds, medians",
        "",
        f"| figure ({args.count:,} peers, rooms of {ROOM_SIZE}) | signaling_trio | bare trio-websocket | ratio |",
        "|---|---|---|---|",
        f"| server CPU per connect, ms | {r['ours_ms']:.3f} | {r['bare_ms']:.3f} | {r['ratio']:.2f} "
        f"(rounds {', '.join(map(str, r['rounds']))}) |",
    ]
    if args.before:
        rows.append(f"| the same, from {args.before} | {r['before_ms']:.3f} | | {r['before_ratio']:.2f}; now / before "
                    f"{r['now_over_before']:.2f} (rounds {', '.join(map(str, r['now_over_before_rounds']))}) |")
    table = "\n".join(rows)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "connect.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
