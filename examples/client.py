"""A SLEAP-RTC-style client on signaling_trio.client: discover a free GPU worker,
reserve it, send a job request, wait for the result, release it.

    python examples/client.py --room-file room.json
"""

from __future__ import annotations

import argparse
import json
import os

import trio

from signaling_trio.client import HttpApi, SignalingError, open_signaling_client


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ws", default="ws://127.0.0.1:8080")
    ap.add_argument("--http", default="http://127.0.0.1:8001")
    ap.add_argument("--room-file", default="room.json")
    ap.add_argument("--min-gpu-mb", type=int, default=16000)
    args = ap.parse_args()

    with trio.fail_after(30):
        while not os.path.exists(args.room_file):
            await trio.sleep(0.1)
    with open(args.room_file) as f:
        room = json.load(f)
    me = await HttpApi(args.http).anonymous_signin()
    wanted = {"role": "worker", "unreserved": True,
              "properties": {"gpu_memory_mb": {"$gte": args.min_gpu_mb}, "status": "available"}}

    async with open_signaling_client(args.ws) as peer:
        await peer.register(f"client-{os.getpid()}", room["room_id"], room["token"], me.id_token, role="client")
        sub = await peer.subscribe(wanted)
        candidates = [p["peer_id"] for p in sub.peers]
        while not candidates:  # no worker yet: wait for one to appear
            event = await sub.next_event(timeout=60)
            if event["type"] != "peer_left":
                candidates.append(event["peer"]["peer_id"])
        await peer.unsubscribe()

        for worker in candidates:
            try:
                until = await peer.reserve(worker, 300, filters=wanted)
                break
            except SignalingError as exc:  # someone else got it first
                print(f"client: {worker} taken ({exc.code}), trying the next")
        else:
            raise SystemExit("client: every worker was taken")
        print(f"client: reserved {worker} until {until:.0f}")

        await peer.send_peer_message(worker, {"app_message_type": "job_request", "job_id": "job-1",
                                              "job_type": "training", "config": {"epochs": 3}})
        async for msg in peer.incoming():
            if msg["type"] == "peer_message":
                print(f"client: {msg['payload']['app_message_type']} from {msg['from_peer_id']}")
                if msg["payload"]["app_message_type"] == "job_complete":
                    break
        await peer.release(worker)
        print("client: released, done")


if __name__ == "__main__":
    trio.run(main)
