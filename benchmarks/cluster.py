"""Scale-out benchmark: relay through Redis across instances, and 1 vs 2 --workers.

    python benchmarks/cluster.py            # 3 runs of each, medians, table to stdout
    python benchmarks/cluster.py --quick    # a smoke run (the test suite runs this)

Scenarios, each with a fresh redis-server (from PATH) and fresh servers (`--store redis`):
- same:    one instance; both sides of every pair on it (Redis in use, nothing crosses it)
- cross:   two instances; side a on one, side b on the other: every message crosses Redis
           once (pub/sub from the connection's instance to the room's owner, or back)
- workers: `--workers 1` vs `--workers 2` on one port, P pairs spread over R rooms (rooms
           are the unit of scale-out: each lives on one worker)
Reports delivered msgs/s, RTT percentiles, and the CPU of servers, Redis and the load
generator over the measured window (no pinning: with 2 workers, every core is in use).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlsplit

from run import CORES, HERE, RESULTS_LOGS, ROOT, _post, cpu_seconds, ensure_node_modules, free_port, stop, wait_port


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (the --workers parent)."""
    total = cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        kids = []
    return total + sum(tree_cpu(k) for k in kids)


@contextmanager
def redis_server() -> Iterator[dict[str, Any]]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield {"url": f"redis://127.0.0.1:{port}/0", "pid": proc.pid}
    finally:
        stop(proc)


@contextmanager
def instance(redis_url: str, workers: int = 1, root: str = ROOT) -> Iterator[dict[str, Any]]:
    """`root`: the checkout whose server runs (another one for a before/after run)."""
    ws_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-m", "signaling_trio", "serve", "--host", "127.0.0.1", "--ws-port", str(ws_port),
            "--http-port", str(http_port), "--store", redis_url, "--workers", str(workers),
            "--rate-limit", "1000000000", "--rate-burst", "1000000000", "--max-room-peers", "100000",
            "--http-rate-limit", "0",
            "--log-level", "warning"]
    log = open(os.path.join(RESULTS_LOGS, f"cluster-{ws_port}.log"), "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        wait_port(ws_port, proc)
        wait_port(http_port, proc)
        time.sleep(0.5 if workers > 1 else 0)  # every worker listening
        yield {"pid": proc.pid, "ws_url": f"ws://127.0.0.1:{ws_port}/", "http": f"http://127.0.0.1:{http_port}"}
    finally:
        stop(proc, timeout=15)
        log.close()


def new_rooms(http: str, n: int) -> tuple[str, list[dict[str, str]]]:
    signin = _post(http + "/anonymous-signin")
    rooms = []
    for _ in range(n):
        room = _post(http + "/create-room", signin["id_token"])
        rooms.append({"room_id": room["room_id"], "token": room["token"]})
    return signin["id_token"], rooms


def relaygen() -> str:
    """benchmarks/relaygen.c built (again when the source is newer) into results/."""
    src, exe = os.path.join(HERE, "relaygen.c"), os.path.join(HERE, "results", "relaygen")
    if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(src):
        os.makedirs(os.path.dirname(exe), exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", exe, src], check=True)
    return exe


def relaygen_argv(cfg: dict[str, Any], one_send_per_message: bool = False) -> list[str]:
    """relaygen's command line for loadgen.mjs's relay config (one URL for both sides;
    target "ours", or "peerjs", which has no rooms)."""
    assert cfg["ws_url"] == cfg["ws_url_b"], "relaygen dials one server for both sides"
    url = urlsplit(cfg["ws_url"])
    rooms = cfg.get("rooms") or [{"room_id": "-", "token": "-"}]
    words = [url.hostname, url.port, url.path or "/", cfg["pairs"], cfg["inflight"], cfg["duration"],
             cfg["warmup"], 64, cfg.get("id_token") or "-", len(rooms)]
    words += [w for r in rooms for w in (r["room_id"], r["token"])]
    path = os.path.join(RESULTS_LOGS, "relaygen.cfg")
    with open(path, "w") as f:
        f.write(" ".join(map(str, words)) + "\n")
    flags = (["--one-send-per-message"] if one_send_per_message else []) + (
        ["--peerjs"] if cfg["target"] == "peerjs" else [])
    return [relaygen(), *flags, path]


def relay(a_url: str, b_url: str, id_token: str | None, rooms: list[dict[str, str]] | None, pairs: int,
          inflight: int, duration: float, pids: list[int], redis_pid: int | None, gen: str = "node",
          target: str = "ours") -> dict[str, Any]:
    """`gen`: "node" (loadgen.mjs), "c" (relaygen.c, a few us of CPU per message: the frames
    one read answers go in one send) or "c1" (relaygen.c, one send per message). `target`:
    "ours", or "peerjs" (no rooms, no token, no Redis)."""
    cfg = {"scenario": "relay", "target": target, "ws_url": a_url, "ws_url_b": b_url, "id_token": id_token,
           "rooms": rooms, "pairs": pairs, "inflight": inflight, "duration": duration, "warmup": 1}
    err = open(os.path.join(RESULTS_LOGS, "loadgen.err"), "a")
    argv = (relaygen_argv(cfg, gen == "c1") if gen in ("c", "c1")
            else ["node", os.path.join(HERE, "loadgen.mjs"), json.dumps(cfg)])
    lg = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE)
    assert lg.stdout is not None
    lines = iter(lg.stdout)
    while json.loads(next(lines))["phase"] != "measure":
        pass
    def redis_cpu() -> float:
        return cpu_seconds(redis_pid) if redis_pid else 0.0

    s0, r0, l0, t0 = sum(map(tree_cpu, pids)), redis_cpu(), cpu_seconds(lg.pid), time.monotonic()
    time.sleep(duration)
    s1, r1, l1, t1 = sum(map(tree_cpu, pids)), redis_cpu(), cpu_seconds(lg.pid), time.monotonic()
    result = None
    for line in lines:
        msg = json.loads(line)
        if msg["phase"] == "done":
            result = msg["result"]
    lg.wait(timeout=30)
    err.close()
    assert result is not None, "load generator failed (see results/logs/loadgen.err)"
    wall = t1 - t0
    result.update(server_cpu_pct=100 * (s1 - s0) / wall, redis_cpu_pct=100 * (r1 - r0) / wall,
                  loadgen_cpu_pct=100 * (l1 - l0) / wall)
    return result


def same(pairs: int, inflight: int, duration: float) -> dict[str, Any]:
    with redis_server() as r, instance(r["url"]) as a:
        token, rooms = new_rooms(a["http"], 1)
        return relay(a["ws_url"], a["ws_url"], token, rooms, pairs, inflight, duration, [a["pid"]], r["pid"])


def cross(pairs: int, inflight: int, duration: float) -> dict[str, Any]:
    with redis_server() as r, instance(r["url"]) as a, instance(r["url"]) as b:
        token, rooms = new_rooms(a["http"], 1)
        return relay(a["ws_url"], b["ws_url"], token, rooms, pairs, inflight, duration, [a["pid"], b["pid"]], r["pid"])


def workers(n: int, pairs: int, inflight: int, duration: float, rooms_n: int) -> dict[str, Any]:
    with redis_server() as r, instance(r["url"], workers=n) as w:
        token, rooms = new_rooms(w["http"], rooms_n)
        return relay(w["ws_url"], w["ws_url"], token, rooms, pairs, inflight, duration, [w["pid"]], r["pid"])


def median_of(runs: int, fn: Any, *args: Any) -> dict[str, Any]:
    results = [fn(*args) for _ in range(runs)]
    out: dict[str, Any] = {"runs": results}
    for key in results[0]:
        vals = [r[key] for r in results if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = statistics.median(vals)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    q = args.quick
    runs = args.runs or (1 if q else 3)
    dur = 0.5 if q else float(os.environ.get("BENCH_SECONDS", "5"))
    big = (2, 2) if q else (50, 4)
    rooms_n = 2 if q else 16
    os.makedirs(RESULTS_LOGS, exist_ok=True)
    ensure_node_modules()
    R: dict[str, Any] = {"machine": {"cores": CORES, "cpu": platform.processor() or platform.machine(),
                                      "python": platform.python_version()}}
    R["same"] = median_of(runs, same, *big, dur)
    R["cross"] = median_of(runs, cross, *big, dur)
    R["same_rtt"] = median_of(runs, same, 1, 1, dur)
    R["cross_rtt"] = median_of(runs, cross, 1, 1, dur)
    R["workers1"] = median_of(runs, workers, 1, *big, dur, rooms_n)
    R["workers2"] = median_of(runs, workers, 2, *big, dur, rooms_n)
    rows = [
        ("relay 50x4, one room: same instance", R["same"]),
        ("relay 50x4, one room: across 2 instances", R["cross"]),
        ("relay 1x1 RTT: same instance", R["same_rtt"]),
        ("relay 1x1 RTT: across 2 instances", R["cross_rtt"]),
        (f"relay 50x4 over {rooms_n} rooms: --workers 1", R["workers1"]),
        (f"relay 50x4 over {rooms_n} rooms: --workers 2", R["workers2"]),
    ]
    lines = [
        "| scenario | msgs/s | msgs per server CPU-s | RTT p50 ms | RTT p99 ms "
        "| servers CPU % | redis CPU % | loadgen CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        per_cpu = r["msgs_per_s"] / max(r["server_cpu_pct"] / 100, 1e-9)
        lines.append(
            f"| {name} | {r['msgs_per_s']:,.0f} | {per_cpu:,.0f} | {r['rtt_p50_ms']:.2f} | {r['rtt_p99_ms']:.2f} | "
            f"{r['server_cpu_pct']:.0f} | {r['redis_cpu_pct']:.0f} | {r['loadgen_cpu_pct']:.0f} |"
        )
    lines.append("")
    lines.append(f"cross / same throughput: {R['cross']['msgs_per_s'] / R['same']['msgs_per_s']:.2f}x; "
                 f"RTT p50: {R['cross_rtt']['rtt_p50_ms'] / R['same_rtt']['rtt_p50_ms']:.2f}x; "
                 f"workers 2 / 1: {R['workers2']['msgs_per_s'] / R['workers1']['msgs_per_s']:.2f}x")
    table = "\n".join(lines)
    out = args.out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "cluster.json"), "w") as f:
        json.dump(R, f, indent=1)
    with open(os.path.join(out, "cluster.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
