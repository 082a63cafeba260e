"""A smoke run of every benchmark scenario (tiny sizes, seconds), so benchmarks/ cannot
rot. Figures are not asserted: speed is measured in benchmarks/, never in tests."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import trio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def test_every_scenario_runs(tmp_path):
    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed for the benchmark smoke run")
        pytest.skip("node/npm not installed: the benchmarks' load generator is a Node program")
    with trio.fail_after(300):
        proc = await trio.run_process(
            [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--out", str(tmp_path)],
            capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
        )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    table = (tmp_path / "latest.md").read_text()
    for row in ("relay 2x2 msgs/s", "relay 1x1 RTT p50 ms", "RSS per idle registered peer", "server CPU per connect+register",
                "discover_100_broad_1", "discover_100_broad_4", "discover_100_selective", "discover_200_selective", "presence events/s"):
        assert row in table, row
    assert "n/a" not in table.split("\n", 3)[3]  # every figure was measured


async def test_cluster_benchmark_runs(tmp_path):
    if shutil.which("node") is None or shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("node and redis-server are needed for the cluster benchmark smoke run")
        pytest.skip("node or redis-server not installed (the cluster benchmark needs both)")
    with trio.fail_after(300):
        proc = await trio.run_process(
            [sys.executable, os.path.join(ROOT, "benchmarks", "cluster.py"), "--quick", "--out", str(tmp_path)],
            capture_stdout=True, capture_stderr=True, check=False, cwd=os.path.join(ROOT, "benchmarks"),
        )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    table = (tmp_path / "cluster.md").read_text()
    for row in ("same instance", "across 2 instances", "--workers 1", "--workers 2", "workers 2 / 1"):
        assert row in table, row
