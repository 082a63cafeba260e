"""The ceiling: a bare trio-websocket relay with no logic. The first frame names the
connection; every later frame is `target|rest`, forwarded to `target` as `rest`.

    python benchmarks/bare_relay.py PORT
"""

from __future__ import annotations

import sys

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket


async def serve(port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """The relay on `port` (0: any free one), until cancelled; started() with the port."""
    peers: dict[str, object] = {}

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        name = None
        try:
            name = await ws.get_message()
            peers[name] = ws
            await ws.send_message('{"ok":true}')
            while True:
                frame = await ws.get_message()
                target, _, rest = frame.partition("|")
                dest = peers.get(target)
                if dest is not None:
                    try:
                        await dest.send_message(rest)
                    except ConnectionClosed:
                        pass
        except ConnectionClosed:
            pass
        finally:
            if name is not None and peers.get(name) is ws:
                del peers[name]

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", port, None)
        task_status.started(server.port)


async def main(port: int) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, port)
        print('{"listening": %d}' % port, flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
