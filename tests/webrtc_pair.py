"""Two real aiortc peers (asyncio) that signal through a signaling_trio server: offer,
answer and trickled ICE candidates over the WebSocket protocol, then a data channel echo.

    python webrtc_pair.py WS_URL ROOM_ID ROOM_TOKEN ID_TOKEN

Nothing leaves the machine: host candidates are restricted to 127.0.0.1 (aioice skips
loopback by default) and there is no STUN/TURN server. Prints one JSON line of results.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aioice.ice
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]

WS, ROOM, TOKEN, ID_TOKEN = sys.argv[1:5]
stats = {"candidates_sent": 0, "candidates_received": 0}


def split_candidates(sdp: str) -> tuple[str, list[str]]:
    """The SDP without its a=candidate lines, and those candidates (to trickle)."""
    lines = sdp.splitlines()
    cands = [line[len("a=candidate:"):] for line in lines if line.startswith("a=candidate:")]
    rest = [line for line in lines if not line.startswith("a=candidate:") and line != "a=end-of-candidates"]
    return "\r\n".join(rest) + "\r\n", cands


async def recv(ws) -> dict:
    msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
    assert msg.get("type") != "error", msg
    return msg


async def register(ws, peer_id: str) -> None:
    await ws.send(
        json.dumps({"type": "register", "peer_id": peer_id, "room_id": ROOM, "token": TOKEN, "id_token": ID_TOKEN})
    )
    assert (await recv(ws))["type"] == "registered_auth"


async def send_description(ws, pc, kind: str, target: str, me: str) -> None:
    sdp, cands = split_candidates(pc.localDescription.sdp)
    await ws.send(json.dumps({"type": kind, "sender": me, "target": target, "sdp": sdp}))
    for c in cands:  # trickle, one frame per candidate
        await ws.send(json.dumps({"type": "candidate", "sender": me, "target": target,
                                  "candidate": {"candidate": "candidate:" + c, "sdpMid": "0", "sdpMLineIndex": 0}}))
        stats["candidates_sent"] += 1
    await ws.send(json.dumps({"type": "candidate", "sender": me, "target": target, "candidate": None}))


async def take_description(ws, pc, kind: str) -> None:
    msg = await recv(ws)
    assert msg["type"] == kind, msg
    await pc.setRemoteDescription(RTCSessionDescription(sdp=msg["sdp"], type=kind))
    while True:
        msg = await recv(ws)
        assert msg["type"] == "candidate", msg
        if msg["candidate"] is None:
            break
        cand = candidate_from_sdp(msg["candidate"]["candidate"].split(":", 1)[1])
        cand.sdpMid = msg["candidate"]["sdpMid"]
        cand.sdpMLineIndex = msg["candidate"]["sdpMLineIndex"]
        await pc.addIceCandidate(cand)
        stats["candidates_received"] += 1


async def answerer(ready: asyncio.Event) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    done = asyncio.Event()

    @pc.on("datachannel")
    def on_dc(channel):
        @channel.on("message")
        def on_message(message):
            channel.send("echo:" + message)
            if message == "bye":
                done.set()

    async with websockets.connect(WS) as ws:
        await register(ws, "answerer")
        ready.set()
        await take_description(ws, pc, "offer")
        await pc.setLocalDescription(await pc.createAnswer())
        await send_description(ws, pc, "answer", "offerer", "answerer")
        await asyncio.wait_for(done.wait(), 30)
    await pc.close()


async def offerer(ready: asyncio.Event) -> list[str]:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    channel = pc.createDataChannel("jobs")
    opened = asyncio.Event()
    echoes: asyncio.Queue[str] = asyncio.Queue()
    channel.on("open", opened.set)
    channel.on("message", echoes.put_nowait)
    await ready.wait()
    async with websockets.connect(WS) as ws:
        await register(ws, "offerer")
        await pc.setLocalDescription(await pc.createOffer())
        await send_description(ws, pc, "offer", "answerer", "offerer")
        await take_description(ws, pc, "answer")
        await asyncio.wait_for(opened.wait(), 30)
        got = []
        for m in ["hello", "job_request", "bye"]:
            channel.send(m)
            got.append(await asyncio.wait_for(echoes.get(), 10))
    await pc.close()
    return got


async def main() -> None:
    ready = asyncio.Event()
    got, _ = await asyncio.gather(offerer(ready), answerer(ready))
    print(json.dumps({"echoes": got, **stats}))


asyncio.run(main())
