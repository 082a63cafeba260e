"""One machine's cores: `--workers 2` against `--workers 1`, interleaved, per-round ratios.

    python benchmarks/workers.py                 # 3 rounds of 5 s each, table to stdout
    python benchmarks/workers.py --rounds 5
    python benchmarks/workers.py --quick         # a smoke run (the test suite runs this)
    python benchmarks/workers.py --against DIR --rounds 6  # --workers 2 here against another checkout
    python benchmarks/workers.py --gen c --rounds 5  # load from relaygen.c instead of Node's `ws`
    python benchmarks/workers.py --gen c1 --rounds 5 # relaygen.c, one send per message
    python benchmarks/workers.py --gen c --sweep     # --workers 1 at 1, 2, 4, 8 in flight per pair
    python benchmarks/workers.py --gen c --peerjs    # and the PeerJS server, in every round

Scenario (issue 16): 50 rooms of 2 peers, 4 messages in flight per pair (a `peer_message`
each way, echoed), every peer connecting to the one shared port (the kernel's
SO_REUSEPORT picks a worker). Both servers on a fresh redis-server (`--store redis://`),
nothing pinned (with 2 workers every core is in use; the load generator shares them).
Per round: delivered msgs/s, RTT p50, and the CPU of all server processes (the
`--workers` parent and its workers) and of Redis per delivered message; the ratios are
taken within the round (whose runs go in turn, the order rotating between rounds), then
their median is shown with every round's. With `--peerjs` each round also runs the PeerJS
server (one Node process, no Redis) under the same load: `--workers 2` against it.

The load generator is loadgen.mjs (Node `ws`, ~20 us of CPU per message), or with
`--gen c` benchmarks/relaygen.c (~5 us, built with `cc` into results/; the frames one
read answers go out in one send), or with `--gen c1` relaygen.c sending each message on
its own (~7 us): the same messages on the same wire, at less of the cores the servers
share with it. `--sweep` shows what one worker's CPU per message does as its load falls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from typing import Any

from cluster import redis_server, instance, new_rooms, relay
from run import HERE, MACHINE, RESULTS_LOGS, ROOT, ensure_node_modules, server

PAIRS, INFLIGHT = 50, 4


def rooms_per_owner(redis_url: str) -> list[int]:
    """How many rooms each process owns (their leases), most first."""
    cli = ["redis-cli", "-u", redis_url]
    keys = subprocess.run(cli + ["--scan", "--pattern", "signaling:lease:*"], capture_output=True, text=True,
                          check=True).stdout.split()
    owners = subprocess.run(cli + ["mget", *keys], capture_output=True, text=True, check=True).stdout.split()
    return sorted(Counter(owners).values(), reverse=True) if keys else []


def bound(w1: dict[str, Any]) -> float:
    """What `--workers 2` can relay over `--workers 1` on two cores that the load generator
    shares, if a message costs the servers what it costs one worker (s) and the load
    generator what it costs it beside one worker (g): one worker is held to one core,
    1/s messages a second; two workers and the generator fill both, 2/(s + g). So 2s/(s + g):
    below 2, and lower the cheaper the server is next to its load generator."""
    s = w1["server_cpu_us_per_msg"]
    g = 1e6 * w1["loadgen_cpu_pct"] / 100 / max(w1["msgs_per_s"], 1e-9)
    return 2 * s / (s + g)


def one(n: int, duration: float, pairs: int, root: str = ROOT, gen: str = "node",
        inflight: int = INFLIGHT) -> dict[str, Any]:
    with redis_server() as r, instance(r["url"], workers=n, root=root) as w:
        token, rooms = new_rooms(w["http"], pairs)  # one room per pair
        res = relay(w["ws_url"], w["ws_url"], token, rooms, pairs, inflight, duration, [w["pid"]], r["pid"], gen)
        res["rooms_per_process"] = rooms_per_owner(r["url"])
    return per_message(res)


def one_peerjs(duration: float, pairs: int, gen: str) -> dict[str, Any]:
    """The PeerJS server (one Node process, not pinned) under the same relay load (its own
    wire: OFFERs between ids)."""
    with server("peerjs", pin=False) as p:
        res = relay(p["ws_url"], p["ws_url"], None, None, pairs, INFLIGHT, duration, [p["pid"]], None, gen,
                    target="peerjs")
    return per_message(res)


def per_message(res: dict[str, Any]) -> dict[str, Any]:
    """The servers' and Redis's CPU per delivered message, in us, added to a relay result."""
    for who in ("server", "redis"):
        res[f"{who}_cpu_us_per_msg"] = 1e6 * res[f"{who}_cpu_pct"] / 100 / max(res["msgs_per_s"], 1e-9)
    return res


def against(other: str, rounds: int, dur: float, pairs: int) -> int:
    """`--workers 2` of this checkout against `--workers 2` of another, interleaved (the
    order alternates each round), per-round ratios of msgs/s."""
    pairs_run: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for i in range(rounds):
        if i % 2 == 0:
            now, before = one(2, dur, pairs), one(2, dur, pairs, other)
        else:
            before, now = one(2, dur, pairs, other), one(2, dur, pairs)
        pairs_run.append((now, before))
        print(json.dumps({side: {"msgs_per_s": round(r["msgs_per_s"]), "rooms_per_process": r["rooms_per_process"]}
                          for side, r in (("now", now), ("other", before))}), flush=True)
    ratios = [n["msgs_per_s"] / b["msgs_per_s"] for n, b in pairs_run]
    print(f"--workers 2, msgs/s: this checkout {statistics.median(n['msgs_per_s'] for n, _ in pairs_run):,.0f}, "
          f"{other} {statistics.median(b['msgs_per_s'] for _, b in pairs_run):,.0f}; ratio "
          f"{statistics.median(ratios):.2f} (rounds {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


def sweep(dur: float, pairs: int, gen: str, out: str) -> int:
    """`--workers 1` alone at 1, 2, 4 and 8 messages in flight per pair: what a message
    costs one worker as its load falls (fewer messages per wake-up to share its cost)."""
    rows = []
    for inflight in (1, 2, 4, 8):
        r = one(1, dur, pairs, gen=gen, inflight=inflight)
        rows.append({"inflight": inflight, **{k: r[k] for k in ("msgs_per_s", "server_cpu_us_per_msg", "server_cpu_pct",
                                                                 "loadgen_cpu_pct", "rtt_p50_ms")}})
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        f"{MACHINE}; "
        f"--workers 1, {pairs} rooms of 2 peers, {dur:g} s per run, load generator {gen}",
        "",
        "| in flight per pair | delivered msgs/s | server CPU per msg, us | server CPU % | load generator CPU % |"
        " RTT p50 ms |",
        "|---|---|---|---|---|---|",
        *(f"| {r['inflight']} | {r['msgs_per_s']:,.0f} | {r['server_cpu_us_per_msg']:.1f} | {r['server_cpu_pct']:.0f} "
          f"| {r['loadgen_cpu_pct']:.0f} | {r['rtt_p50_ms']:.2f} |" for r in rows),
    ]
    return write(out, "workers-sweep", "\n".join(lines), rows)


def write(out: str, name: str, table: str, data: Any) -> int:
    print("\n" + table)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--against", metavar="DIR", help="another checkout: --workers 2 of both, interleaved")
    ap.add_argument("--gen", choices=("node", "c", "c1"), default="node", help="load generator (see above)")
    ap.add_argument("--sweep", action="store_true", help="--workers 1 at 1, 2, 4, 8 in flight")
    ap.add_argument("--peerjs", action="store_true", help="the PeerJS server too, in every round")
    args = ap.parse_args()
    rounds, dur, pairs = (1, 0.5, 4) if args.quick else (args.rounds, args.seconds, PAIRS)
    if args.gen == "node" or args.against or args.peerjs:
        ensure_node_modules()
    os.makedirs(RESULTS_LOGS, exist_ok=True)
    if args.against:
        return against(args.against, rounds, dur, pairs)
    if args.sweep:
        return sweep(dur, pairs, args.gen, args.out)
    runs = {"w1": lambda: one(1, dur, pairs, gen=args.gen), "w2": lambda: one(2, dur, pairs, gen=args.gen)}
    if args.peerjs:
        runs["pj"] = lambda: one_peerjs(dur, pairs, args.gen)
    per: list[dict[str, Any]] = []
    for i in range(rounds):  # the order rotates, so a drift of the VM favours no side
        order = list(runs)[i % len(runs):] + list(runs)[:i % len(runs)]
        r = {side: runs[side]() for side in order}
        w1, w2 = r["w1"], r["w2"]
        per.append({**r, "throughput": w2["msgs_per_s"] / w1["msgs_per_s"],
                    "rtt": w2["rtt_p50_ms"] / w1["rtt_p50_ms"],
                    "cpu": w2["server_cpu_us_per_msg"] / w1["server_cpu_us_per_msg"], "bound": bound(w1)})
        if "pj" in r:
            per[-1].update(vs_pj=w2["msgs_per_s"] / r["pj"]["msgs_per_s"],
                           rtt_vs_pj=w2["rtt_p50_ms"] / r["pj"]["rtt_p50_ms"])
        print(json.dumps({k: v if not isinstance(v, dict) else {x: round(y, 2) if isinstance(y, float) else y
                                                                 for x, y in v.items()
                                                                 if isinstance(y, (int, float, list))}
                          for k, v in per[-1].items()}), flush=True)
    return write(args.out, "workers", table(per, pairs, dur, rounds, args.gen), per)


def table(per: list[dict[str, Any]], pairs: int, dur: float, rounds: int, gen: str) -> str:
    def med(key: str, side: str | None = None) -> float:
        return statistics.median(r[side][key] if side else r[key] for r in per)

    def each(key: str) -> str:
        return ", ".join(f"{r[key]:.2f}" for r in per)

    splits = "; ".join("/".join(map(str, r["w2"]["rooms_per_process"])) for r in per)
    pj = [] if "pj" not in per[0] else [
        "",
        "| figure | PeerJS (one process) | --workers 2 | ratio --workers 2 / PeerJS (median; every round) |",
        "|---|---|---|---|",
        f"| delivered msgs/s | {med('msgs_per_s', 'pj'):,.0f} | {med('msgs_per_s', 'w2'):,.0f} | "
        f"{med('vs_pj'):.2f} ({each('vs_pj')}) |",
        f"| RTT p50 ms | {med('rtt_p50_ms', 'pj'):.2f} | {med('rtt_p50_ms', 'w2'):.2f} | "
        f"{med('rtt_vs_pj'):.2f} ({each('rtt_vs_pj')}) |",
        f"| server CPU per msg, us | {med('server_cpu_us_per_msg', 'pj'):.1f} | "
        f"{med('server_cpu_us_per_msg', 'w2'):.1f} | |",
        f"| server CPU % | {med('server_cpu_pct', 'pj'):.0f} | {med('server_cpu_pct', 'w2'):.0f} | |",
        f"| load generator CPU % | {med('loadgen_cpu_pct', 'pj'):.0f} | {med('loadgen_cpu_pct', 'w2'):.0f} | |",
    ]
    return "\n".join([
        f"{MACHINE}; "
        f"{pairs} rooms of 2 peers, {INFLIGHT} in flight, {dur:g} s per run, {rounds} rounds, load generator {gen}",
        "",
        "| figure | --workers 1 | --workers 2 | ratio 2/1 (median; every round) |",
        "|---|---|---|---|",
        f"| delivered msgs/s | {med('msgs_per_s', 'w1'):,.0f} | {med('msgs_per_s', 'w2'):,.0f} | "
        f"{med('throughput'):.2f} ({each('throughput')}) |",
        f"| RTT p50 ms | {med('rtt_p50_ms', 'w1'):.2f} | {med('rtt_p50_ms', 'w2'):.2f} | "
        f"{med('rtt'):.2f} ({each('rtt')}) |",
        f"| server CPU per msg, us (all processes) | {med('server_cpu_us_per_msg', 'w1'):.1f} | "
        f"{med('server_cpu_us_per_msg', 'w2'):.1f} | {med('cpu'):.2f} ({each('cpu')}) |",
        f"| server CPU % (all processes) | {med('server_cpu_pct', 'w1'):.0f} | {med('server_cpu_pct', 'w2'):.0f} | |",
        f"| Redis CPU per msg, us | {med('redis_cpu_us_per_msg', 'w1'):.1f} | "
        f"{med('redis_cpu_us_per_msg', 'w2'):.1f} | |",
        f"| load generator CPU % | {med('loadgen_cpu_pct', 'w1'):.0f} | {med('loadgen_cpu_pct', 'w2'):.0f} | |",
        f"| rooms per process (every round) | | {splits} | |",
        f"| the machine's bound: 2 / 1 if a message cost two workers what it costs one | | | "
        f"{med('bound'):.2f} ({each('bound')}) |",
        *pj,
    ])


if __name__ == "__main__":
    sys.exit(main())
