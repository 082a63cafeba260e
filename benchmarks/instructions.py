"""Instructions per connect + register, and per HTTP request: a count, not a time.

    python benchmarks/instructions.py                      # this checkout
    python benchmarks/instructions.py --before /tmp/ctl    # and another (a git worktree)

CPU time on these machines drifts by tens of percent between runs, so a change worth 5 %
hides in it (benchmarks/connect.py needs many rounds to show one). Here the server runs
under valgrind (cachegrind, no cache simulation), which counts the instructions it
executes in user space: repeatable to about half a percent. The connect scenario of
connect.py (rooms of 10, one `/anonymous-signin` and one `/create-room` per room, then every
peer connects and registers and stays) runs at N1 and at N2 peers, each on a new server,
and the difference over N2 - N1 is the cost of one more peer (start-up cancels out). A run
with the HTTP calls alone splits it into its HTTP part and its WebSocket part.

What it does not count: the kernel's work (system calls, the socket layer), which CPU time
includes. So it compares two versions of this server, not this server with another.
Needs `valgrind` (Debian package valgrind); a run takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from connect import ROOM_SIZE, make_rooms
from run import RESULTS_LOGS, ROOT, Loadgen, ensure_node_modules, free_port, stop, wait_port


def count(peers: int, src: str | None, *, http_only: bool) -> int:
    """Instructions of one server's whole life: start, `peers` made (and connected unless
    `http_only`), stop."""
    ws_port, http_port = free_port(), free_port()
    os.makedirs(RESULTS_LOGS, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="instructions-") as data:
        out = os.path.join(data, "cachegrind.out")
        argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}",
                sys.executable, "-m", "signaling_trio", "serve", "--host", "127.0.0.1", "--ws-port", str(ws_port),
                "--http-port", str(http_port), "--store", "memory", "--data-dir", data,
                "--rate-limit", "1000000000", "--rate-burst", "1000000000", "--http-rate-limit", "0",
                "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": src} if src else None
        with open(os.path.join(RESULTS_LOGS, f"instructions-{ws_port}.log"), "w") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=src or ROOT, env=env)
            try:
                for port in (ws_port, http_port):
                    wait_port(port, proc, timeout=300)  # ~30x slower under valgrind
                time.sleep(2)
                srv = {"kind": "ours", "pid": proc.pid, "ws_url": f"ws://127.0.0.1:{ws_port}/",
                       "http": f"http://127.0.0.1:{http_port}"}
                rooms, _ = make_rooms(srv, peers)
                if not http_only:
                    lg = Loadgen(srv, {"scenario": "capacity", "count": peers, "concurrency": 10,
                                       "rooms": rooms, "id_token": rooms[0]["id_token"]})
                    lg.wait_phase("connected")
                    lg.wait_phase("idle")
                    lg.finish()
            finally:
                stop(proc, timeout=300)
        with open(out) as f:
            found = re.search(r"^summary:\s+(\d+)", f.read(), re.M)
    if found is None:
        raise RuntimeError("cachegrind wrote no summary")
    return int(found.group(1))


def per_peer(n1: int, n2: int, src: str | None) -> dict[str, float]:
    whole = (count(n2, src, http_only=False) - count(n1, src, http_only=False)) / (n2 - n1)
    http = (count(n2, src, http_only=True) - count(n1, src, http_only=True)) / (n2 - n1)
    return {"per_peer": whole, "http_per_peer": http, "ws_per_peer": whole - http,
            "per_http_request": http * ROOM_SIZE / 2}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=None, metavar="DIR", help="also count the server from this checkout")
    ap.add_argument("--n1", type=int, default=100)
    ap.add_argument("--n2", type=int, default=500)
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    ensure_node_modules()
    got = {"now": per_peer(args.n1, args.n2, None)}
    if args.before:
        got["before"] = per_peer(args.n1, args.n2, args.before)
    print(json.dumps(got))
    print(f"\ninstructions (millions), peers {args.n1} -> {args.n2}, rooms of {ROOM_SIZE}\n")
    print("| | per connect + register | HTTP part per peer | WebSocket part per peer | per HTTP request |")
    print("|---|---|---|---|---|")
    for name, row in got.items():
        print(f"| {name} | {row['per_peer'] / 1e6:.3f} | {row['http_per_peer'] / 1e6:.3f} "
              f"| {row['ws_per_peer'] / 1e6:.3f} | {row['per_http_request'] / 1e6:.3f} |")
    if args.before:
        now, before = got["now"], got["before"]
        print("\nnow / before: " + ", ".join(
            f"{what} {now[key] / before[key]:.3f}" for what, key in
            (("per peer", "per_peer"), ("HTTP", "http_per_peer"), ("WebSocket", "ws_per_peer"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
