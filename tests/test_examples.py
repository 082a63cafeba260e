"""The examples run end to end against a real server, as the README tells people to."""

from __future__ import annotations

import os
import sys

import trio

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


async def test_worker_and_client_examples(signaling_server, tmp_path):
    info = signaling_server.server.info
    room_file = str(tmp_path / "room.json")
    common = ["--ws", signaling_server.ws_url, "--http", signaling_server.http_url, "--room-file", room_file]

    async def run(script: str) -> str:
        proc = await trio.run_process([sys.executable, os.path.join(EXAMPLES, script), *common],
                                      capture_stdout=True, capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode()

    out: dict[str, str] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            async def go(script: str) -> None:
                out[script] = await run(script)
            n.start_soon(go, "worker.py")
            n.start_soon(go, "client.py")
    assert info.ws_port
    assert "job job-1 from client-" in out["worker.py"]
    assert "reserved by client-" in out["worker.py"] and "released by client-" in out["worker.py"]
    client_out = out["client.py"]
    assert "reserved worker-" in client_out
    assert "job_response" in client_out and "job_complete" in client_out and "released, done" in client_out
