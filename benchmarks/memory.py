"""Where an idle registered peer's memory goes: Python allocations per connection
(tracemalloc) in signaling_trio and in the bare trio-websocket relay, and the source
lines that differ most. RSS per peer is measured by run.py (`--only capacity`); this
explains it.

    python benchmarks/memory.py              # 1,000 peers each, ~30 s
    python benchmarks/memory.py --quick      # 50 peers: the test suite's smoke run

Each server runs in its own process: importing signaling_trio changes trio-websocket
(signaling_trio/_wsfix.py), and the bare relay must be measured as shipped. Peers are
the capacity scenario's (benchmarks/loadgen.mjs: register with role and metadata; bare:
one naming frame), from one Node process; a first batch warms caches and indexes, then
a snapshot is taken before and after N more connect and go idle.

The server process imports signaling_trio as the venv has it (an editable install: this
checkout); for another checkout, `PYTHONPATH=DIR python DIR/benchmarks/memory.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


async def _child(target: str, count: int) -> dict:
    import gc
    import tracemalloc

    import trio

    async def loadgen(cfg: dict) -> trio.Process:
        proc = await trio.lowlevel.open_process(
            ["node", os.path.join(HERE, "loadgen.mjs"), json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE,
        )
        buf = b""
        while b'"idle"' not in buf:
            chunk = await proc.stdout.receive_some(65536)
            if not chunk:
                raise RuntimeError("load generator ended early")
            buf += chunk
        return proc

    async def measure(cfg: dict, settle: float) -> dict:
        """`settle`: seconds after the peers go idle until the server holds nothing
        transient for them (ours: until their writer tasks have lingered out)."""
        warm = await loadgen({**cfg, "count": 50, "tag": "warm"})
        await trio.sleep(settle)
        gc.collect()
        tracemalloc.start(4)
        before = tracemalloc.take_snapshot()
        proc = await loadgen({**cfg, "count": count, "tag": "m"})
        await trio.sleep(settle)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        for p in (proc, warm):
            await p.stdin.send_all(b"quit\n")
            await p.wait()
        lines = after.compare_to(before, "lineno")
        return {
            "bytes_per_peer": sum(s.size_diff for s in lines) / count,
            "lines": {str(s.traceback[0]): s.size_diff / count for s in lines if abs(s.size_diff) >= count * 16},
        }

    if target == "ours":
        from signaling_trio._ws import WRITER_LINGER
        from signaling_trio._wsserve import SWEEP_PERIOD
        from signaling_trio.testing import open_test_server

        # a writer ends WRITER_LINGER after its last frame, at the sweep after that
        settle = WRITER_LINGER + SWEEP_PERIOD + 0.5

        async with open_test_server(rate_limit=0, max_room_peers=100_000) as srv:
            room = await srv.new_room()
            return await measure({"scenario": "capacity", "target": "ours", "ws_url": srv.ws_url, **room}, settle)

    sys.path.insert(0, HERE)
    from bare_relay import serve

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, 0)
        result = await measure({"scenario": "capacity", "target": "bare", "ws_url": f"ws://127.0.0.1:{port}/"}, 1.5)
        nursery.cancel_scope.cancel()
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="50 peers: a smoke run")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--child", choices=("ours", "bare"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    count = 50 if args.quick else args.count
    if args.child:
        import trio

        print(json.dumps(trio.run(_child, args.child, count)))
        return 0

    sys.path.insert(0, HERE)
    from run import ensure_node_modules

    ensure_node_modules()
    res = {}
    for target in ("ours", "bare"):
        out = subprocess.run([sys.executable, __file__, "--child", target, "--count", str(count)],
                             capture_output=True, text=True, check=True, cwd=HERE)
        res[target] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, bare = res["ours"], res["bare"]
    diff = {k: ours["lines"].get(k, 0) - bare["lines"].get(k, 0) for k in set(ours["lines"]) | set(bare["lines"])}
    lines = [
        f"Python allocations per idle registered peer ({count} peers, tracemalloc):",
        f"  signaling_trio {ours['bytes_per_peer']:,.0f} B, bare trio-websocket {bare['bytes_per_peer']:,.0f} B, "
        f"difference {ours['bytes_per_peer'] - bare['bytes_per_peer']:+,.0f} B",
        "Source lines that differ most (B per peer, ours - bare):",
    ]
    for k, v in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        lines.append(f"  {v:+7.0f}  {k.replace(sys.prefix, '<venv>')}")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write("```\n" + text + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
