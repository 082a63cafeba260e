"""Real WebRTC through the server: two aiortc peers signal over signaling_trio (offer,
answer, trickled candidates), open a data channel on 127.0.0.1 and echo messages.
aiortc is asyncio, so the peers run in a subprocess; aiortc is in the test extra."""

from __future__ import annotations

import json
import os
import sys

import pytest
import trio

SCRIPT = os.path.join(os.path.dirname(__file__), "webrtc_pair.py")


async def test_aiortc_data_channel_through_server(signaling_server):
    if os.environ.get("CI"):
        import aiortc  # noqa: F401  (CI installs the test extra: a missing aiortc is a failure)
    else:
        pytest.importorskip("aiortc", reason="aiortc is in the test extra; scripts/test installs it")
    room = await signaling_server.new_room()
    with trio.fail_after(90):
        proc = await trio.run_process(
            [sys.executable, SCRIPT, signaling_server.ws_url, room["room_id"], room["token"], room["id_token"]],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert result["echoes"] == ["echo:hello", "echo:job_request", "echo:bye"]
    assert result["candidates_sent"] >= 2 and result["candidates_received"] >= 2
    m = signaling_server.server.metrics
    # offer + answer + every trickled candidate and both end-of-candidates markers
    assert m.messages_by_type["offer"] == 1 and m.messages_by_type["answer"] == 1
    assert m.messages_by_type["candidate"] == result["candidates_sent"] + 2
    assert m.total_messages == 2 + m.messages_by_type["candidate"]
    assert m.errors_by_code == {}
