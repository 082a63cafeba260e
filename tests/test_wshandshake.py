"""The handshake fast path (signaling_trio/_wshandshake.py) against wsproto itself: it
accepts only what wsproto accepts, with the same Sec-WebSocket-Accept; everything else
it leaves to wsproto. And over real sockets: the fast path and the wsproto path both
serve a client."""

from __future__ import annotations

import base64
import random

import pytest
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

import signaling_trio._wsfix as wsfix
from conftest import WsPeer, register, ws_peer
from signaling_trio._wshandshake import accept_response, fast_key
from signaling_trio.testing import open_test_server

KEY = base64.b64encode(bytes(range(16)))
CANONICAL = (b"GET /ws?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nUser-Agent: Python/3.11 "
             b"websockets/12.0\r\n\r\n")


def wsproto_answer(head: bytes) -> bytes | None:
    """What wsproto's server side answers to `head` when it accepts it, else None."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(head)
        events = list(ws.events())
    except Exception:
        return None
    if not any(isinstance(e, Request) for e in events):
        return None
    try:
        return ws.send(AcceptConnection())
    except Exception:
        return None


def accept_of(response: bytes) -> bytes:
    for line in response.split(b"\r\n"):
        if line.lower().startswith(b"sec-websocket-accept:"):
            return line.split(b":", 1)[1].strip()
    raise AssertionError(response)


def variants(rng: random.Random, n: int) -> list[bytes]:
    """The canonical request, bent in the ways parsers get surprised."""
    edits = [
        lambda h: h.replace(b"GET", b"POST"), lambda h: h.replace(b"HTTP/1.1", b"HTTP/1.0"),
        lambda h: h.replace(b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"),
        lambda h: h.replace(b"Connection: Upgrade", b"Connection: close"),
        lambda h: h.replace(b"Upgrade: websocket", b"Upgrade: WebSocket"),
        lambda h: h.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        lambda h: h.replace(b"Version: 13", b"Version: 8"), lambda h: h.replace(KEY, KEY[:-4]),
        lambda h: h.replace(KEY, b"not base64!!"), lambda h: h.replace(b"Host: 127.0.0.1:8080\r\n", b""),
        lambda h: h.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n"),
        lambda h: h.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n"),
        lambda h: h.replace(b"\r\n\r\n", b"\r\nHost: other\r\n\r\n"),
        lambda h: h.replace(b"Host:", b"Host :"), lambda h: h.replace(b"Host:", b" Host:"),
        lambda h: h.replace(b"User-Agent", b"User\x00Agent"), lambda h: h.replace(b"/ws?x=1", b"*"),
        lambda h: h.replace(b"/ws?x=1", b"http://x/ws"), lambda h: h.replace(b"\r\n", b"\n", 1),
        lambda h: h.replace(b"Upgrade: websocket", b"upgrade:websocket"),
        lambda h: h.replace(b"Sec-WebSocket-Version: 13", b"sec-websocket-version:    13   "),
        lambda h: h.replace(b"User-Agent: Python/3.11", b"User-Agent: \xff\xfe"),
        lambda h: h[:-2], lambda h: h + b"\x81\x80abcd",
    ]
    out = [CANONICAL]
    for _ in range(n):
        h = CANONICAL
        for edit in rng.sample(edits, rng.randrange(1, 4)):
            h = edit(h)
        out.append(h)
    return out


@pytest.mark.parametrize("head", variants(random.Random(7), 400))
def test_fast_path_accepts_only_what_wsproto_accepts(head):
    end = head.find(b"\r\n\r\n") + 4
    key = fast_key(head[:end]) if end >= 4 else None
    if key is None:
        return  # wsproto decides (the other tests show that path serves clients)
    answer = wsproto_answer(head[:end])
    assert answer is not None, head
    assert accept_of(accept_response(key)) == accept_of(answer)


def test_the_canonical_request_takes_the_fast_path():
    assert fast_key(CANONICAL) == KEY


async def test_both_paths_serve_clients(monkeypatch):
    """A trio-websocket client takes the fast path; a request with a subprotocol goes to
    wsproto; both are served (register, message) on one server."""
    seen: list[bytes | None] = []

    def recording(head: bytes) -> bytes | None:
        seen.append(fast_key(head))
        return seen[-1]

    monkeypatch.setattr(wsfix, "fast_key", recording)
    async with open_test_server() as server:
        room = await server.new_room()
        async with ws_peer(server.ws_url) as fast, open_websocket_url(server.ws_url, subprotocols=["chat"]) as ws:
            assert (await register(fast, room, "fast"))["type"] == "registered_auth"
            slow = WsPeer(ws)
            assert (await register(slow, room, "slow"))["type"] == "registered_auth"
            await slow.send({"type": "peer_message", "to_peer_id": "fast", "payload": 1})
            assert (await fast.recv_type("peer_message"))["payload"] == 1
    assert seen[0] is not None and seen[1] is None  # (the second asked for a subprotocol)
