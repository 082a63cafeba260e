"""A v2 SLEAP-RTC worker and client, driven with the `websockets` package exactly as the
v2 clients do (asyncio, hand-written JSON, same order as docs/WORKFLOW.md shows), against
the real server. Any error frame fails the test: real v2 workers shut down on one."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import trio
import websockets


def post(base: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(base + path, data=data, method="POST", headers=headers)
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
        return json.loads(r.read())


async def v2_session(ws_url: str, http_url: str) -> list[str]:
    log: list[str] = []

    async def recv(ws) -> dict:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert msg.get("type") != "error", msg  # a v2 worker would shut down here
        return msg

    # --- worker: sign in, create the room, register, wait for work
    w_auth = await asyncio.to_thread(post, http_url, "/anonymous-signin")
    room = await asyncio.to_thread(post, http_url, "/create-room", None, w_auth["id_token"])
    worker_id = w_auth["username"]
    worker_meta = {
        "tags": ["sleap-rtc", "training-worker"],
        "properties": {"gpu_memory_mb": 16384, "gpu_model": "A100", "status": "available", "sleap_version": "1.4.1"},
    }
    async with websockets.connect(ws_url) as worker_ws, websockets.connect(ws_url) as client_ws:
        await worker_ws.send(json.dumps({
            "type": "register", "peer_id": worker_id, "room_id": room["room_id"], "token": room["token"],
            "id_token": w_auth["id_token"], "role": "worker", "metadata": worker_meta,
        }))
        reg = await recv(worker_ws)
        assert reg == {
            "type": "registered_auth",
            "room_id": room["room_id"],
            "token": room["token"],
            "peer_id": worker_id,
        }
        log.append("worker registered")

        # --- client: its own identity, same room credentials (shared out of band)
        c_auth = await asyncio.to_thread(post, http_url, "/anonymous-signin")
        client_id = c_auth["username"]
        await client_ws.send(json.dumps({
            "type": "register", "peer_id": client_id, "room_id": room["room_id"], "token": room["token"],
            "id_token": c_auth["id_token"], "role": "client",
            "metadata": {"tags": ["sleap-rtc", "training-client"], "properties": {}},
        }))
        assert (await recv(client_ws))["type"] == "registered_auth"

        await client_ws.send(json.dumps({
            "type": "discover_peers", "from_peer_id": client_id,
            "filters": {"role": "worker", "tags": ["training-worker"],
                        "properties": {"gpu_memory_mb": {"$gte": 8192}, "status": "available"}},
        }))
        peers = await recv(client_ws)
        assert peers["type"] == "peer_list" and peers["to_peer_id"] == client_id and peers["count"] == 1
        assert peers["peers"][0]["peer_id"] == worker_id and peers["peers"][0]["metadata"] == worker_meta
        log.append("client discovered worker")

        await client_ws.send(json.dumps({
            "type": "peer_message", "from_peer_id": client_id, "to_peer_id": worker_id,
            "payload": {"app_message_type": "job_request", "job_id": "job-1", "job_type": "training",
                        "config": {"dataset": "labels.slp", "epochs": 3}},
        }))
        job = await recv(worker_ws)
        assert job["type"] == "peer_message" and job["from_peer_id"] == client_id
        assert job["payload"]["job_id"] == "job-1"

        await worker_ws.send(json.dumps({"type": "update_metadata", "peer_id": worker_id,
                                         "metadata": {"properties": {"status": "busy", "current_job": "job-1"}}}))
        upd = await recv(worker_ws)
        assert upd["type"] == "metadata_updated" and upd["metadata"]["properties"]["status"] == "busy"
        assert upd["metadata"]["properties"]["gpu_memory_mb"] == 16384

        await worker_ws.send(json.dumps({
            "type": "peer_message", "from_peer_id": worker_id, "to_peer_id": client_id,
            "payload": {"app_message_type": "job_response", "job_id": "job-1", "accepted": True}}))
        assert (await recv(client_ws))["payload"]["accepted"] is True
        log.append("job accepted")

        # WebRTC signalling, v2 shape: sender/target set by the client itself
        await client_ws.send(
            json.dumps({"type": "offer", "sender": client_id, "target": worker_id, "sdp": "v=0 offer"})
        )
        offer = await recv(worker_ws)
        # SPEC 4: a forwarded offer also carries the sender's role (v2 clients read only sdp and sender)
        assert offer == {
            "type": "offer",
            "sender": client_id,
            "target": worker_id,
            "sdp": "v=0 offer",
            "role": "client",
        }
        await worker_ws.send(
            json.dumps({"type": "answer", "sender": worker_id, "target": client_id, "sdp": "v=0 answer"})
        )
        assert (await recv(client_ws))["sdp"] == "v=0 answer"
        for i in range(3):
            await client_ws.send(
                json.dumps(
                    {
                        "type": "candidate",
                        "sender": client_id,
                        "target": worker_id,
                        "candidate": {"candidate": f"candidate:{i}", "sdpMid": "0", "sdpMLineIndex": 0},
                    }
                )
            )
            assert (await recv(worker_ws))["candidate"]["candidate"] == f"candidate:{i}"
        log.append("webrtc signalled")

        # after the job, the worker re-registers on the same socket (as v2 workers do)
        for _ in range(2):
            await worker_ws.send(json.dumps({
                "type": "register", "peer_id": worker_id, "room_id": room["room_id"], "token": room["token"],
                "id_token": w_auth["id_token"], "role": "worker", "metadata": worker_meta,
            }))
            assert (await recv(worker_ws))["type"] == "registered_auth"
        await client_ws.send(json.dumps({"type": "discover_peers", "from_peer_id": client_id,
                                         "filters": {"role": "worker", "properties": {"status": "available"}}}))
        assert (await recv(client_ws))["count"] == 1
        log.append("worker available again")

    # v1/v2 teardown: sockets closed, then delete by peer_id with no bearer
    status = await asyncio.to_thread(post, http_url, "/delete-peers-and-room", {"peer_id": client_id})
    assert "status" in status
    log.append("room deleted")
    return log


async def test_v2_worker_and_client_with_websockets_package(server):
    log = await trio.to_thread.run_sync(lambda: asyncio.run(v2_session(server.ws_url, server.http_url)))
    assert log == ["worker registered", "client discovered worker", "job accepted", "webrtc signalled",
                   "worker available again", "room deleted"]
    # the whole session produced no error frame
    assert server.server.metrics.errors_by_code == {}
