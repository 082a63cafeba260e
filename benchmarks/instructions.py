"""Instructions per connect + register, and per HTTP request: a count, not a time.

    python benchmarks/instructions.py                      # this checkout
    python benchmarks/instructions.py --before /tmp/ctl    # and another (a git worktree)
    python benchmarks/instructions.py --bare --old DIR --old-python PY   # and the baselines

CPU time on these machines drifts by tens of percent between runs, so a change worth 5 %
hides in it (benchmarks/connect.py needs many rounds to show one). Here the server runs
under valgrind (cachegrind, no cache simulation), which counts the instructions it
executes in user space: repeatable to about half a percent. The connect scenario of
connect.py (rooms of 10, one `/anonymous-signin` and one `/create-room` per room, then every
peer connects and registers and stays) runs at N1 and at N2 peers, each on a new server,
and the difference over N2 - N1 is the cost of one more peer (start-up cancels out). A run
with the HTTP calls alone splits it into its HTTP part and its WebSocket part.

`--bare` counts bare trio-websocket taking the same connections (connect.py's baseline:
the handshake and one message each way), `--old` the old v2 server (connect.py's, AWS in
memory, its clients' permessage-deflate on). What it does not count: the kernel's work
(system calls, the socket layer), which CPU time includes; so between two servers it
compares the work each does in user space (with their runtimes, C libraries included).
Needs `valgrind` (Debian package valgrind); a run takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import AbstractContextManager
from typing import Any, Callable

from connect import ROOM_SIZE, bare, make_rooms, old, ours, wave
from run import ensure_node_modules

Start = Callable[[int, tuple[str, ...]], AbstractContextManager[dict[str, Any]]]


def count(start: Start, peers: int, *, http_only: bool) -> int:
    """Instructions of one server's whole life: start, `peers` made (and connected unless
    `http_only`), stop. `start(peers, under)` opens the server under valgrind."""
    with tempfile.TemporaryDirectory(prefix="instructions-") as data:
        out = os.path.join(data, "cachegrind.out")
        under = ("valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}")
        with start(peers, under) as srv:
            if http_only:
                make_rooms(srv, peers)
            else:
                wave(srv, peers, concurrency=10)
        with open(out) as f:
            found = re.search(r"^summary:\s+(\d+)", f.read(), re.M)
    if found is None:
        raise RuntimeError("cachegrind wrote no summary")
    return int(found.group(1))


def per_peer(n1: int, n2: int, start: Start, *, http: bool = True) -> dict[str, float]:
    """The cost of one more peer: the difference between N2 and N1 peers over N2 - N1
    (start-up cancels out), split into its HTTP and WebSocket parts when `http`."""
    whole = (count(start, n2, http_only=False) - count(start, n1, http_only=False)) / (n2 - n1)
    part = (count(start, n2, http_only=True) - count(start, n1, http_only=True)) / (n2 - n1) if http else 0.0
    return {"per_peer": whole, "http_per_peer": part, "ws_per_peer": whole - part,
            "per_http_request": part * ROOM_SIZE / 2}


def starters(args: argparse.Namespace) -> dict[str, tuple[Start, bool]]:
    """Each server to count: how it starts, and whether it has an HTTP part."""
    got: dict[str, tuple[Start, bool]] = {"now": (lambda n, u: ours("memory", under=u), True)}
    if args.before:
        got["before"] = (lambda n, u: ours("memory", src=args.before, under=u), True)
    if args.old:
        got["old v2"] = (lambda n, u: old(args.old, args.old_python, "memory", n, under=u), True)
    if args.bare:
        got["bare"] = (lambda n, u: bare(under=u), False)
    return got


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", default=None, metavar="DIR", help="also count the server from this checkout")
    ap.add_argument("--bare", action="store_true", help="also count bare trio-websocket (connect.py's baseline)")
    ap.add_argument("--old", default=None, metavar="DIR", help="also count the old v2 server (connect.py --old)")
    ap.add_argument("--old-python", default="python3", metavar="PY")
    ap.add_argument("--n1", type=int, default=100)
    ap.add_argument("--n2", type=int, default=500)
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    ensure_node_modules()
    got = {name: per_peer(args.n1, args.n2, start, http=http) for name, (start, http) in starters(args).items()}
    print(json.dumps(got))
    print(f"\ninstructions (millions), peers {args.n1} -> {args.n2}, rooms of {ROOM_SIZE}\n")
    print("| | per connect + register | HTTP part per peer | WebSocket part per peer | per HTTP request |")
    print("|---|---|---|---|---|")
    for name, row in got.items():
        print(f"| {name} | {row['per_peer'] / 1e6:.3f} | {row['http_per_peer'] / 1e6:.3f} "
              f"| {row['ws_per_peer'] / 1e6:.3f} | {row['per_http_request'] / 1e6:.3f} |")
    now = got["now"]
    for name, row in got.items():
        if name != "now":
            print(f"\nnow / {name}: " + ", ".join(
                f"{what} {now[key] / row[key]:.3f}" for what, key in
                (("per peer", "per_peer"), ("HTTP", "http_per_peer"), ("WebSocket", "ws_per_peer")) if row[key]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
