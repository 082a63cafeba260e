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
The table also splits each server's CPU at the end of its HTTP calls: the HTTP part (per
peer, and per request: two requests per room) and the WebSocket part (per peer, and
against bare, whose whole cost is a WebSocket part): where a difference between two
servers comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from run import (HERE, LOADGEN_CPU, MACHINE, RESULTS_LOGS, ROOT, SERVER_CPU, Loadgen, _post, cpu_seconds,
                 ensure_node_modules, free_port, pinned, stop, wait_port)

ROOM_SIZE = 10


@contextmanager
def ours(store: str, *, profile: str | None = None, src: str | None = None,
         log_level: str = "warning", under: tuple[str, ...] = (), data_dir: str | None = None
         ) -> Iterator[dict[str, Any]]:
    """Our server; `src`: from another checkout of this repository (a before/after run);
    `under`: a command it runs under (valgrind, for benchmarks/instructions.py).
    A data dir of its own (the signing key is the one that version makes on first start),
    or `data_dir`: a restart that keeps the key, so tokens signed before it still pass."""
    ws_port, http_port = free_port(), free_port()
    prefix = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else [])
    with (nullcontext(data_dir) if data_dir else tempfile.TemporaryDirectory(prefix="connect-data-")) as data:
        argv = prefix + ["-m", "signaling_trio", "serve", "--host", "127.0.0.1", "--ws-port", str(ws_port),
                         "--http-port", str(http_port), "--store", store, "--data-dir", data,
                         "--rate-limit", "1000000000", "--rate-burst", "1000000000", "--http-rate-limit", "0",
                         "--log-level", log_level]
        with _process(argv, ws_port, "ours", src, under=under) as pid:
            yield {"kind": "ours", "pid": pid, "ws_url": f"ws://127.0.0.1:{ws_port}/",
                   "http": f"http://127.0.0.1:{http_port}"}


@contextmanager
def bare(under: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    ws_port = free_port()
    argv = [sys.executable, os.path.join(HERE, "bare_relay.py"), str(ws_port)]
    with _process(argv, ws_port, "bare", under=under) as pid:
        yield {"kind": "bare", "pid": pid, "ws_url": f"ws://127.0.0.1:{ws_port}/"}


@contextmanager
def old(server_dir: str, python: str, aws: str, count: int, log_level: str = "warning",
        under: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """The upstream v2 server (benchmarks/old_v2.py). `aws`: "moto" (a moto server in a
    process of its own on the load generator's core; its CPU is not counted) or "memory"
    (AWS as dicts in the old server's process, tokens signed before it starts)."""
    ws_port, http_port = free_port(), free_port()

    @contextmanager
    def run(aws_arg: str) -> Iterator[dict[str, Any]]:
        argv = [python, os.path.join(HERE, "old_v2.py"), server_dir, str(ws_port), str(http_port), aws_arg,
                log_level]
        with _process(argv, ws_port, "old", also=(http_port,), under=under) as pid:
            yield {"kind": "old", "pid": pid, "ws_url": f"ws://127.0.0.1:{ws_port}/",
                   "http": f"http://127.0.0.1:{http_port}"}

    if aws == "memory":
        with run(f"memory:{count // ROOM_SIZE + 1}") as srv:
            yield srv
        return
    moto_port = free_port()
    with _process([python, "-m", "moto.server", "-p", str(moto_port)], moto_port, "moto", cpu=LOADGEN_CPU):
        with run(f"http://127.0.0.1:{moto_port}") as srv:
            yield srv


@contextmanager
def _process(argv: list[str], port: int, name: str, src: str | None = None,
             cpu: str = SERVER_CPU, also: tuple[int, ...] = (), under: tuple[str, ...] = ()) -> Iterator[int]:
    """`argv` started (pinned to `cpu`, under the command `under`), once `port` and the
    ports `also` accept. Under a command (valgrind: ~30x slower) it gets 300 s to start
    and 450 to stop, not 20 and 30."""
    slow = 15 if under else 1
    os.makedirs(RESULTS_LOGS, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": src} if src else None
    with open(os.path.join(RESULTS_LOGS, f"connect-{name}-{port}.log"), "w") as log:
        proc = subprocess.Popen(pinned(cpu, [*under, *argv]), stdout=log, stderr=subprocess.STDOUT, cwd=src or ROOT,
                                env=env)
        try:
            for each in (port, *also):
                wait_port(each, proc, timeout=20 * slow)
            time.sleep(0.3 * slow)
            yield proc.pid
        finally:
            stop(proc, timeout=30 * slow)


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
    # the old server's own clients (Python `websockets`) offer permessage-deflate; it takes it
    cfg: dict[str, Any] = {"scenario": "capacity", "count": count, "concurrency": concurrency,
                           "deflate": srv["kind"] == "old"}
    if "http" in srv:
        if rooms is None:
            rooms, _ = make_rooms(srv, count)
        # every peer presents its own room's signer's id_token (the loadgen's `where`)
        cfg.update(rooms=rooms, id_token=rooms[0]["id_token"])
    cpu_http = cpu_seconds(srv["pid"])  # the HTTP part ends here (nothing for bare)
    lg = Loadgen(srv, cfg)
    connected = lg.wait_phase("connected")
    cpu1, t1 = cpu_seconds(srv["pid"]), time.monotonic()
    lg.wait_phase("idle")
    lg.finish()
    return {"ms_per_peer": 1000 * (cpu1 - cpu0) / count, "http_ms_per_peer": 1000 * (cpu_http - cpu0) / count,
            "ws_ms_per_peer": 1000 * (cpu1 - cpu_http) / count, "connect_s": connected["seconds"],
            "wall_s": t1 - t0}


def rounds(runs: int, count: int, store: str, before: str | None = None,
           old_server: tuple[str, str, str] | None = None, log_level: str = "warning") -> dict[str, Any]:
    """Each round runs bare, ours (and `before`, and the old v2 server) in turn, each on a
    fresh server; ratios are taken within a round, then the medians over the rounds."""
    per: list[dict[str, Any]] = []
    for i in range(runs):
        row: dict[str, Any] = {}
        with bare() as srv:
            row["bare"] = wave(srv, count)
        with ours(_fresh(store, i, "now"), log_level=log_level) as srv:
            row["ours"] = wave(srv, count)
        if before:
            with ours(_fresh(store, i, "before"), src=before, log_level=log_level) as srv:
                row["before"] = wave(srv, count)
        if old_server:
            with old(*old_server, count, log_level=log_level) as srv:
                row["old"] = wave(srv, count)
        per.append(row)
        print(json.dumps(row), flush=True)
    med = statistics.median

    def ratio(a: str, b: str, part: str = "ms_per_peer") -> tuple[float, list[float]]:
        each = [r[a][part] / r[b][part] for r in per]
        return med(each), [round(x, 2) for x in each]

    out: dict[str, Any] = {"raw": per}
    for name in per[0]:
        for part in ("", "http_", "ws_"):
            out[f"{name}_{part}ms"] = med([r[name][part + "ms_per_peer"] for r in per])
        if name != "bare":
            out[name + "_over_bare"] = ratio(name, "bare")
            # bare has no HTTP part: its whole cost is the WebSocket part
            out[name + "_ws_over_bare"] = ratio(name, "bare", "ws_ms_per_peer")
    if before:
        out["ours_over_before"] = ratio("ours", "before")
    if old_server:
        out["ours_over_old"] = ratio("ours", "old")
        if before:
            out["before_over_old"] = ratio("before", "old")
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
        with ours(store, data_dir=data) as srv:
            rooms, _ = make_rooms(srv, count)
        with ours(store, data_dir=data) as srv:  # (the same signing key: the tokens still pass)
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
    ap.add_argument("--old", default=None, metavar="DIR",
                    help="also run the upstream v2 server: webRTC_external/ of talmolab/webRTC-connect")
    ap.add_argument("--old-python", default="python3", metavar="PATH",
                    help="a Python with the old server's packages and moto[server] (docs/PERFORMANCE.md)")
    ap.add_argument("--log-level", default="warning", choices=("info", "warning"),
                    help="every server's log level (the old server's own is info)")
    ap.add_argument("--old-aws", choices=("memory", "moto"), default="memory",
                    help="AWS for the old server: dicts in its process (its own cost only) or a moto server")
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
    r = rounds(args.runs, args.count, args.store, args.before,
               (args.old, args.old_python, args.old_aws) if args.old else None, args.log_level)

    def cell(key: str) -> str:
        m, each = r[key]
        return f"{m:.2f} (rounds {', '.join(map(str, each))})"

    rows = [
        f"{MACHINE}; "
        f"store {args.store.split(':')[0]}; log level {args.log_level}; {args.runs} interleaved rounds, medians",
        "",
        f"| server CPU per connect + register, ms ({args.count:,} peers, rooms of {ROOM_SIZE}) | ms | / bare "
        "| HTTP part: ms per peer; per request | WebSocket part: ms per peer; / bare |",
        "|---|---|---|---|---|",
        f"| bare trio-websocket | {r['bare_ms']:.3f} | | | |",
    ]

    def row(name: str, what: str) -> str:
        # two requests per room of ROOM_SIZE peers
        http = f"{r[name + '_http_ms']:.3f}; {r[name + '_http_ms'] * ROOM_SIZE / 2:.2f}"
        return (f"| {what} | {r[name + '_ms']:.3f} | {cell(name + '_over_bare')} | {http} "
                f"| {r[name + '_ws_ms']:.3f}; {cell(name + '_ws_over_bare')} |")

    rows.append(row("ours", "signaling_trio"))
    if args.before:
        rows.append(row("before", f"signaling_trio from {args.before}"))
    if args.old:
        rows.append(row("old", f"old v2 server (AWS: {args.old_aws})"))
    rows.append("")
    for key, what in (("ours_over_before", "now / before"), ("ours_over_old", "now / old v2"),
                      ("before_over_old", "before / old v2")):
        if key in r:
            rows.append(f"{what}: {cell(key)}")
    table = "\n".join(rows)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "connect.md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
