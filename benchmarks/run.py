"""Benchmarks: signaling_trio against its ceiling (a bare trio-websocket relay) and the
PeerJS server, in one invocation, server pinned to core 0 and load generator to core 1.

    python benchmarks/run.py                # the full table (several minutes)
    python benchmarks/run.py --quick        # tiny sizes, seconds: the test suite's smoke run
    python benchmarks/run.py --only relay,capacity --runs 5

Writes the table to stdout and to benchmarks/results/latest.md (+ .json). Each figure is
the median of --runs runs; both processes' CPU is reported, so a saturated load
generator shows. Needs node/npm (installs `ws` and `peer` into benchmarks/node_modules).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
SERVER_CPU, LOADGEN_CPU = ("0", "1") if CORES >= 2 else ("0", "0")
RESULTS_LOGS = os.path.join(HERE, "results", "logs")
MACHINE = f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM (a graceful stop), SIGKILL after `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ensure_node_modules() -> None:
    """The load generator's npm packages (`ws`, and `peer` for the PeerJS baseline)."""
    if not os.path.isdir(os.path.join(HERE, "node_modules", "ws")):
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=HERE, check=True)


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if CORES >= 2 else argv


@contextmanager
def server(kind: str, pin: bool = True) -> Iterator[dict[str, Any]]:
    """`kind` on a free port, pinned to SERVER_CPU unless `pin` is false."""
    ws_port = free_port()
    info: dict[str, Any] = {"kind": kind, "ws_port": ws_port}
    if kind == "ours":
        http_port = free_port()
        argv = [sys.executable, "-m", "signaling_trio", "serve", "--host", "127.0.0.1",
                "--ws-port", str(ws_port), "--http-port", str(http_port), "--store", "memory",
                # limits on, but out of the way of a benchmark
                "--rate-limit", "1000000000", "--rate-burst", "1000000000", "--max-room-peers", "100000",
                "--http-rate-limit", "0",
                "--log-level", "warning"]
        info["http"] = f"http://127.0.0.1:{http_port}"
        info["ws_url"] = f"ws://127.0.0.1:{ws_port}/"
    elif kind == "bare":
        argv = [sys.executable, os.path.join(HERE, "bare_relay.py"), str(ws_port)]
        info["ws_url"] = f"ws://127.0.0.1:{ws_port}/"
    elif kind == "peerjs":
        argv = ["node", os.path.join(HERE, "peerjs_server.cjs"), str(ws_port)]
        info["ws_url"] = f"ws://127.0.0.1:{ws_port}/"
    else:
        raise ValueError(kind)
    # The server's log goes to a file: a pipe nobody reads would fill and stall it.
    log_path = os.path.join(RESULTS_LOGS, f"{kind}-{ws_port}.log")
    log_file = open(log_path, "w")
    proc = subprocess.Popen(pinned(SERVER_CPU, argv) if pin else argv, stdout=log_file, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    try:
        wait_port(ws_port, proc)
        info["pid"] = proc.pid
        if kind == "ours":
            signin = _post(info["http"] + "/anonymous-signin")
            room = _post(info["http"] + "/create-room", signin["id_token"])
            info.update(room_id=room["room_id"], token=room["token"], id_token=signin["id_token"])
        yield info
    finally:
        stop(proc)
        log_file.close()


def _post(url: str, token: str | None = None) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=b"", method="POST", headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Loadgen:
    def __init__(self, srv: dict[str, Any], cfg: dict[str, Any]) -> None:
        full = {
            **{k: srv[k] for k in ("ws_url", "room_id", "token", "id_token") if k in srv},
            "target": srv["kind"],
            **cfg,
        }
        self.err = open(os.path.join(RESULTS_LOGS, "loadgen.err"), "a")
        arg = json.dumps(full)
        if len(arg) > 64_000:  # over argv's limit for one argument: pass a file instead
            path = os.path.join(RESULTS_LOGS, f"loadgen-{os.getpid()}.json")
            with open(path, "w") as f:
                f.write(arg)
            arg = "@" + path
        self.proc = subprocess.Popen(
            pinned(LOADGEN_CPU, ["node", os.path.join(HERE, "loadgen.mjs"), arg]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            cwd=HERE,
        )

    def wait_phase(self, phase: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if msg["phase"] == phase:
                return msg
        raise RuntimeError(f"load generator ended before {phase} (see {self.err.name})")

    def finish(self) -> dict[str, Any]:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
        result = self.wait_phase("done")["result"]
        self.proc.wait(timeout=30)
        return result


def measured(srv: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """Run a timed scenario; add server/loadgen CPU over the measured window."""
    lg = Loadgen(srv, cfg)
    lg.wait_phase("measure")
    s0, l0, t0 = cpu_seconds(srv["pid"]), cpu_seconds(lg.proc.pid), time.monotonic()
    result = lg.finish()
    # the loadgen has exited; its CPU is read from the window just before (approximation:
    # finish() returns right after the window closes)
    wall = time.monotonic() - t0
    result["server_cpu_s"] = cpu_seconds(srv["pid"]) - s0
    result["server_cpu_pct"] = 100 * result["server_cpu_s"] / wall
    result["loadgen_cpu_pct"] = 100 * (lg_cpu_after(lg, l0)) / wall
    return result


def lg_cpu_after(lg: Loadgen, before: float) -> float:
    try:
        return cpu_seconds(lg.proc.pid) - before
    except (FileNotFoundError, ProcessLookupError):
        return float("nan")


# ------------------------------------------------------------------ scenarios
def relay(kind: str, pairs: int, inflight: int, duration: float) -> dict[str, Any]:
    with server(kind) as srv:
        lg = Loadgen(
            srv, {"scenario": "relay", "pairs": pairs, "inflight": inflight, "duration": duration, "warmup": 1}
        )
        lg.wait_phase("measure")
        s0, l0, t0 = cpu_seconds(srv["pid"]), cpu_seconds(lg.proc.pid), time.monotonic()
        time.sleep(duration)
        s1, l1, t1 = cpu_seconds(srv["pid"]), cpu_seconds(lg.proc.pid), time.monotonic()
        result = lg.finish()
        result["server_cpu_pct"] = 100 * (s1 - s0) / (t1 - t0)
        result["loadgen_cpu_pct"] = 100 * (l1 - l0) / (t1 - t0)
        return result


def capacity(kind: str, count: int, probe: int = 0) -> dict[str, Any]:
    with server(kind) as srv:
        time.sleep(0.3)
        rss0, cpu0 = rss_kb(srv["pid"]), cpu_seconds(srv["pid"])
        lg = Loadgen(srv, {"scenario": "capacity", "count": count, "probe": probe})
        connected = lg.wait_phase("connected")
        cpu1 = cpu_seconds(srv["pid"])
        idle = lg.wait_phase("idle")
        time.sleep(0.5)
        rss1 = rss_kb(srv["pid"])
        lg.finish()
        return {
            "count": count, "rss_per_peer_kb": (rss1 - rss0) / count, "rss_mb": rss1 / 1024,
            "server_cpu_ms_per_connect": 1000 * (cpu1 - cpu0) / count,
            "connect_seconds": connected["seconds"], "probe": idle.get("probe"),
        }


def populate(srv: dict[str, Any], n: int, tag: str) -> Loadgen:
    """n idle peers (see loadgen.mjs capacity(): 25% workers, `slot` = k % 100)."""
    lg = Loadgen(srv, {"scenario": "capacity", "count": n, "tag": tag})
    lg.wait_phase("connected")
    lg.wait_phase("idle")
    return lg


def discover(n: int, clients: int, filt: dict[str, Any], duration: float) -> dict[str, Any]:
    with server("ours") as srv:
        holder = populate(srv, n, "")
        res = measured(srv, {"scenario": "discover", "clients": clients, "filter": filt, "duration": duration})
        holder.finish()
        res["server_cpu_ms_per_request"] = 1000 * res["server_cpu_s"] / max(1, res["requests"])
        return res


def presence(subscribers: int, updaters: int, duration: float) -> dict[str, Any]:
    with server("ours") as srv:
        res = measured(
            srv, {"scenario": "presence", "subscribers": subscribers, "updaters": updaters, "duration": duration}
        )
        res["server_cpu_us_per_event"] = 1e6 * res["server_cpu_s"] / max(1, res["events"])
        return res


# ------------------------------------------------------------------ driver
def median_of(runs: int, fn, *args) -> dict[str, Any]:
    return summarize([fn(*args) for _ in range(runs)])


def interleaved(runs: int, kinds: list[str], fn, *args) -> dict[str, dict[str, Any]]:
    """fn(kind, *args) for every kind in turn, `runs` rounds. This machine's speed drifts
    by tens of percent within minutes: interleaved, a slow spell hits every server of a
    round alike, and each round's ratio to the baseline is taken within the round."""
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for _ in range(runs):
        for kind in kinds:
            results[kind].append(fn(kind, *args))
    return {kind: summarize(rs) for kind, rs in results.items()}


def round_ratios(a: dict[str, Any], b: dict[str, Any], key: str, diff: bool = False) -> dict[str, Any]:
    """Per-round a/b (or a-b) of `key` over interleaved runs, and their median."""
    vals = [(x[key] - y[key]) if diff else x[key] / y[key] for x, y in zip(a["runs"], b["runs"])]
    return {"median": statistics.median(vals), "rounds": vals}


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": results}
    for key, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            vals = [r[key] for r in results if isinstance(r.get(key), (int, float))]
            out[key] = statistics.median(vals) if vals else None
        elif key == "probe" and value:
            out["probe_rtt_p99_ms"] = statistics.median(r["probe"]["rtt_p99_ms"] for r in results)
            out["probe_rtt_p50_ms"] = statistics.median(r["probe"]["rtt_p50_ms"] for r in results)
    return out


def fmt(v: Any, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every scenario")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--only", default="relay,capacity,discover,presence,scale")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    q = args.quick
    runs = args.runs or (1 if q else 3)
    dur = 0.5 if q else float(os.environ.get("BENCH_SECONDS", "3"))
    os.makedirs(RESULTS_LOGS, exist_ok=True)
    ensure_node_modules()

    R: dict[str, Any] = {
        "machine": {
            "cores": CORES,
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "server_core": SERVER_CPU,
            "loadgen_core": LOADGEN_CPU,
        }
    }
    kinds = ["bare", "ours", "peerjs"]
    if "relay" in only:
        big = (2, 2) if q else (50, 4)
        for kind, res in interleaved(runs, kinds, relay, *big, dur).items():
            R[f"relay_{kind}"] = res
        for kind, res in interleaved(runs, kinds, relay, 1, 1, dur).items():
            R[f"rtt_{kind}"] = res
        R["ratio_relay"] = round_ratios(R["relay_ours"], R["relay_bare"], "msgs_per_s")
        R["ratio_rtt"] = round_ratios(R["rtt_ours"], R["rtt_bare"], "rtt_p50_ms")
    if "capacity" in only:
        k = 50 if q else 5000
        for kind, res in interleaved(runs, kinds, capacity, k).items():
            R[f"capacity_{kind}"] = res
        R["diff_rss"] = round_ratios(R["capacity_ours"], R["capacity_bare"], "rss_per_peer_kb", diff=True)
    if "discover" in only:
        n1, n2 = (100, 200) if q else (1000, 10000)
        # populate(): every 4th peer is a worker (25% match), `slot` cycles 0..99 (1% match)
        broad = {"role": "worker", "properties": {"gpu_memory_mb": {"$gte": 8192}}}
        selective = {"properties": {"slot": 7}}
        for clients in (1, 4):
            R[f"discover_{n1}_broad_{clients}"] = median_of(runs, discover, n1, clients, broad, dur)
        R[f"discover_{n1}_selective"] = median_of(runs, discover, n1, 1, selective, dur)
        R[f"discover_{n2}_selective"] = median_of(runs, discover, n2, 1, selective, dur)
    if "presence" in only:
        R["presence"] = median_of(runs, presence, 5 if q else 50, 2 if q else 10, dur)
    if "scale" in only and not q:
        R["scale"] = median_of(1, capacity, "ours", int(os.environ.get("SCALE_PEERS", "19000")), 2000)

    os.makedirs(args.out, exist_ok=True)
    table = render(R, q)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


def per_round(r: dict[str, Any], spec: str, each: str = "{:.2f}") -> str:
    """The median of per-round figures, and each round's (interleaved runs)."""
    rounds = ", ".join(each.format(v) for v in r["rounds"])
    return f"{spec.format(r['median'])} (rounds: {rounds})" if len(r["rounds"]) > 1 else spec.format(r["median"])


def render(R: dict[str, Any], quick: bool) -> str:
    lines = [
        f"machine: {R['machine']}",
        "",
        "| figure | signaling_trio | bare trio-websocket | PeerJS | ratio |",
        "|---|---|---|---|---|",
    ]

    def row(name: str, ours: Any, bare: Any, peer: Any, ratio: str = "") -> None:
        lines.append(f"| {name} | {ours} | {bare} | {peer} | {ratio} |")

    if "relay_ours" in R:
        o, b, p = R["relay_ours"], R["relay_bare"], R["relay_peerjs"]
        row(
            "relay 50x4 delivered msgs/s" if not quick else "relay 2x2 msgs/s",
            fmt(o["msgs_per_s"]),
            fmt(b["msgs_per_s"]),
            fmt(p["msgs_per_s"]),
            per_round(R["ratio_relay"], "{:.2f} x bare"),
        )
        row(
            "  server / loadgen CPU %",
            f"{fmt(o['server_cpu_pct'])} / {fmt(o['loadgen_cpu_pct'])}",
            f"{fmt(b['server_cpu_pct'])} / {fmt(b['loadgen_cpu_pct'])}",
            f"{fmt(p['server_cpu_pct'])} / {fmt(p['loadgen_cpu_pct'])}",
        )
        o, b, p = R["rtt_ours"], R["rtt_bare"], R["rtt_peerjs"]
        row(
            "relay 1x1 RTT p50 ms",
            fmt(o["rtt_p50_ms"], ".3f"),
            fmt(b["rtt_p50_ms"], ".3f"),
            fmt(p["rtt_p50_ms"], ".3f"),
            per_round(R["ratio_rtt"], "{:.2f} x bare"),
        )
    if "capacity_ours" in R:
        o, b, p = R["capacity_ours"], R["capacity_bare"], R["capacity_peerjs"]
        row(
            f"RSS per idle registered peer KB ({o['count']:,} held)",
            fmt(o["rss_per_peer_kb"], ".1f"),
            fmt(b["rss_per_peer_kb"], ".1f"),
            fmt(p["rss_per_peer_kb"], ".1f"),
            per_round(R["diff_rss"], "bare {:+.1f} KB", "{:+.1f}"),
        )
        row(
            "server CPU per connect+register ms",
            fmt(o["server_cpu_ms_per_connect"], ".3f"),
            fmt(b["server_cpu_ms_per_connect"], ".3f"),
            fmt(p["server_cpu_ms_per_connect"], ".3f"),
        )
    for key, value in R.items():
        if key.startswith("discover_"):
            row(
                f"{key} server CPU ms/request (matched {value['matched']:.0f}, {value['per_s']:,.0f} req/s)",
                fmt(value["server_cpu_ms_per_request"], ".3f"),
                "",
                "",
            )
    if "presence" in R:
        v = R["presence"]
        row(
            f"presence events/s (CPU {v['server_cpu_us_per_event']:.1f} us/event, "
            f"lag p50 {fmt(v['lag_p50_ms'], '.2f')} ms)",
            fmt(v["events_per_s"]),
            "",
            "",
        )
    if "scale" in R:
        v = R["scale"]
        row(
            f"{v['count']:,} registered peers: RSS MB, probe RTT p99 ms",
            f"{v['rss_mb']:.0f} MB, {fmt(v.get('probe_rtt_p99_ms'), '.2f')} ms",
            "",
            "",
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
