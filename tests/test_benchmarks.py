"""A smoke run of every benchmark scenario (tiny sizes, seconds), so benchmarks/ cannot
rot. Figures are not asserted: speed is measured in benchmarks/, never in tests."""

from __future__ import annotations

import json
import os
import shutil
import sys


import trio

from needs import unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def quick_run(script: str, tmp_path, needs: tuple[str, ...], *extra: str) -> None:
    """`benchmarks/<script> --quick --out tmp_path [extra]`, which must exit 0. Tools it
    needs missing: a failure under CI, a skip saying which elsewhere."""
    missing = [tool for tool in needs if shutil.which(tool) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed: benchmarks/{script} needs {', '.join(needs)}",
                    under_ci=f"{', '.join(missing)} needed for the {script} smoke run")
    with trio.fail_after(300):
        proc = await trio.run_process(
            [sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--out", str(tmp_path), *extra],
            capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
        )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]


async def test_every_scenario_runs(tmp_path):
    await quick_run("run.py", tmp_path, ("node", "npm"))
    table = (tmp_path / "latest.md").read_text()
    for row in (
        "relay 2x2 msgs/s",
        "relay 1x1 RTT p50 ms",
        "RSS per idle registered peer",
        "server CPU per connect+register",
        "discover_100_broad_1",
        "discover_100_broad_4",
        "discover_100_selective",
        "discover_200_selective",
        "presence events/s",
    ):
        assert row in table, row
    assert "n/a" not in table.split("\n", 3)[3]  # every figure was measured


async def test_connect_benchmark_runs(tmp_path):
    await quick_run("connect.py", tmp_path, ("node", "npm"))
    table = (tmp_path / "connect.md").read_text()
    assert "server CPU per connect + register, ms" in table and "n/a" not in table
    assert "| signaling_trio |" in table and "| bare trio-websocket |" in table


async def test_workers_benchmark_runs(tmp_path):
    await quick_run("workers.py", tmp_path, ("node", "npm", "redis-server"))
    table = (tmp_path / "workers.md").read_text()
    assert "delivered msgs/s" in table and "server CPU per msg" in table


async def test_workers_benchmark_runs_on_relaygen(tmp_path):
    """benchmarks/relaygen.c, built by the run, drives both servers, corked and with one
    send per message: every pair's messages came back (RTT samples), and the sweep ran at
    each load."""
    for gen in ("c", "c1"):
        await quick_run("workers.py", tmp_path, ("cc", "redis-server"), "--gen", gen)
        for side in json.loads((tmp_path / "workers.json").read_text())[0].values():
            if isinstance(side, dict):
                assert side["delivered"] > 0 and side["samples"] > 0 and side["rtt_p50_ms"] > 0
        assert f"load generator {gen}\n" in (tmp_path / "workers.md").read_text()
    await quick_run("workers.py", tmp_path, ("cc", "redis-server"), "--gen", "c", "--sweep")
    rows = json.loads((tmp_path / "workers-sweep.json").read_text())
    assert [r["inflight"] for r in rows] == [1, 2, 4, 8] and all(r["msgs_per_s"] > 0 for r in rows)


async def test_workers_benchmark_runs_against_peerjs(tmp_path):
    """`--peerjs`: relaygen drives the PeerJS server on its own wire (OFFERs between ids)
    in the same round as both of ours; its messages came back too."""
    await quick_run("workers.py", tmp_path, ("cc", "node", "npm", "redis-server"), "--gen", "c", "--peerjs")
    pj = json.loads((tmp_path / "workers.json").read_text())[0]["pj"]
    assert pj["delivered"] > 0 and pj["samples"] > 0 and pj["rtt_p50_ms"] > 0
    assert "--workers 2 / PeerJS" in (tmp_path / "workers.md").read_text()


async def test_idle_rooms_benchmark_runs(tmp_path):
    await quick_run("idle_rooms.py", tmp_path, ("redis-server",))
    now = json.loads((tmp_path / "idle_rooms.json").read_text())["now"]
    assert now["rooms"] == 20 and {"owner_cpu_pct", "other_cpu_pct", "redis_cpu_pct"} <= set(now)


async def test_cluster_benchmark_runs(tmp_path):
    await quick_run("cluster.py", tmp_path, ("node", "npm", "redis-server"))
    table = (tmp_path / "cluster.md").read_text()
    for row in ("same instance", "across 2 instances", "--workers 1", "--workers 2", "workers 2 / 1"):
        assert row in table, row


async def test_memory_breakdown_runs(tmp_path):
    await quick_run("memory.py", tmp_path, ("node", "npm"))
    text = (tmp_path / "memory.md").read_text()
    assert "Python allocations per idle registered peer (50 peers" in text
    assert "signaling_trio" in text and "bare trio-websocket" in text


async def test_soak_runs(tmp_path):
    """The soak's smoke run exits non-zero if any request went unanswered."""
    await quick_run("soak.py", tmp_path, ("redis-server",))
    text = (tmp_path / "soak.md").read_text()
    assert "## single" in text and "## cluster" in text
    assert "unanswered 0" in text
