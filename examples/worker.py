"""A SLEAP-RTC-style GPU worker on signaling_trio.client.

    python examples/worker.py --room-file room.json          # creates the room, writes room.json
    python examples/client.py --room-file room.json          # in a second terminal

The worker registers with its GPU properties, waits for a job request, marks itself busy,
"runs" the job (a short sleep), answers, and marks itself available again. It leaves its
reservation handling to the server: the client reserves it before asking.
"""

from __future__ import annotations

import argparse
import json
import os

import trio

from signaling_trio.client import HttpApi, open_signaling_client


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ws", default="ws://127.0.0.1:8080")
    ap.add_argument("--http", default="http://127.0.0.1:8001")
    ap.add_argument("--room-file", default="room.json", help="written here for the client to read")
    ap.add_argument("--peer-id", default=f"worker-{os.getpid()}")
    ap.add_argument("--jobs", type=int, default=1, help="jobs to serve before exiting (0: forever)")
    args = ap.parse_args()

    api = HttpApi(args.http)
    me = await api.anonymous_signin()
    room = await api.create_room(me.id_token)
    with open(args.room_file, "w") as f:
        json.dump({"room_id": room.room_id, "token": room.token}, f)
    print(f"worker: room {room.room_id} written to {args.room_file}")

    metadata = {"tags": ["sleap-rtc", "training-worker"],
                "properties": {"gpu_memory_mb": 24576, "gpu_model": "RTX 4090", "status": "available"}}
    async with open_signaling_client(args.ws) as peer:
        await peer.register(args.peer_id, room.room_id, room.token, me.id_token, role="worker", metadata=metadata)
        print(f"worker: registered as {args.peer_id}, waiting for jobs")
        served = 0
        async for msg in peer.incoming():
            if msg["type"] == "peer_reserved":
                print(f"worker: reserved by {msg['by']} until {msg['reserved_until']:.0f}")
            elif msg["type"] == "peer_released":
                print(f"worker: released by {msg['by']} ({msg['reason']})")
                if args.jobs and served >= args.jobs:
                    break
            elif msg["type"] == "peer_message" and msg["payload"].get("app_message_type") == "job_request":
                job = msg["payload"]
                print(f"worker: job {job['job_id']} from {msg['from_peer_id']}")
                await peer.update_metadata({"properties": {"status": "busy", "current_job": job["job_id"]}})
                await peer.send_peer_message(msg["from_peer_id"], {"app_message_type": "job_response",
                                                                   "job_id": job["job_id"], "accepted": True})
                await trio.sleep(0.5)  # the training run
                await peer.send_peer_message(msg["from_peer_id"], {"app_message_type": "job_complete",
                                                                   "job_id": job["job_id"], "result": "model.zip"})
                await peer.update_metadata({"properties": {"status": "available", "current_job": None}})
                served += 1
    print("worker: done")


if __name__ == "__main__":
    trio.run(main)
