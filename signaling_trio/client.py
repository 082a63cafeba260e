"""An async client for trio: sign in, create or join a room, register, discover,
subscribe, reserve, and exchange peer messages and WebRTC signalling.

    async with open_signaling_client("ws://localhost:8080") as peer:
        await peer.register("worker-1", room_id, token, id_token, role="worker")
        async for msg in peer.incoming():
            ...

How answers are matched to requests: the server answers one connection's frames in
order, and sends an error only in answer to a frame that failed. Requests (register,
discover, …) are serialized per client and await their answer; an error that arrives
while one is pending is that request's. Fire-and-forget sends (peer messages, offers,
answers, candidates) get no answer when they succeed; before the next request the client
sends a `ping` barrier, so an error for one of them can never be mistaken for the
request's: such errors go to `errors()`.

Never touches the server's internals; it speaks only the wire protocol (docs/API.md).
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import httpx
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

PUSH_TYPES = frozenset({"peer_message", "offer", "answer", "candidate", "peer_reserved", "peer_released"})
PRESENCE_TYPES = frozenset({"peer_joined", "peer_updated", "peer_left"})
DEFAULT_TIMEOUT = 10.0


class SignalingError(Exception):
    """The server answered a request with an error frame (or the connection closed)."""

    def __init__(self, code: str, message: str, frame: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame = frame or {}


class SignalingClosed(SignalingError):
    """The connection is closed; `close_code` is the WebSocket close code (4000: replaced)."""

    def __init__(self, close_code: int | None, reason: str | None) -> None:
        super().__init__("CLOSED", f"connection closed ({close_code} {reason or ''})".strip())
        self.close_code = close_code
        self.reason = reason


# ------------------------------------------------------------------------- HTTP
@dataclass(frozen=True)
class Identity:
    id_token: str
    username: str


@dataclass(frozen=True)
class Room:
    room_id: str
    token: str
    expires_at: float


class HttpApi:
    """The HTTP API (sign-in, rooms), over httpx on trio."""

    def __init__(self, http_url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.http_url = http_url.rstrip("/")
        self.timeout = timeout

    async def _post(self, path: str, body: dict[str, Any] | None = None, id_token: str | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {id_token}"} if id_token else {}
        async with httpx.AsyncClient(timeout=self.timeout) as http:
            resp = await http.post(self.http_url + path, json=body, headers=headers)
        try:
            data = resp.json()
        except ValueError:
            data = {}
        if resp.status_code != 200:
            raise SignalingError(data.get("error", f"HTTP_{resp.status_code}"), data.get("message", resp.text), data)
        return data

    async def anonymous_signin(self) -> Identity:
        data = await self._post("/anonymous-signin")
        return Identity(data["id_token"], data["username"])

    async def create_room(self, id_token: str) -> Room:
        data = await self._post("/create-room", id_token=id_token)
        return Room(data["room_id"], data["token"], data["expires_at"])

    async def extend_room(self, id_token: str, room_id: str, ttl_sec: float | None = None) -> float:
        body: dict[str, Any] = {"room_id": room_id}
        if ttl_sec is not None:
            body["ttl_sec"] = ttl_sec
        return (await self._post("/extend-room", body, id_token=id_token))["expires_at"]

    async def delete_peers_and_room(
        self, peer_id: str, *, id_token: str | None = None, room_id: str | None = None
    ) -> str:
        body = {"peer_id": peer_id, **({"room_id": room_id} if room_id else {})}
        return (await self._post("/delete-peers-and-room", body, id_token=id_token))["status"]


# -------------------------------------------------------------------- WebSocket
class Subscription:
    """Presence events for one filter: `peers` are the matches when it started; iterate
    for `peer_joined` / `peer_updated` / `peer_left` frames."""

    def __init__(self, peers: list[dict[str, Any]], receive: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
        self.peers = peers
        self._receive = receive

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._receive.__aiter__()

    async def next_event(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        with trio.fail_after(timeout):
            return await self._receive.receive()


class SignalingClient:
    def __init__(self, ws: WebSocketConnection, *, timeout: float = DEFAULT_TIMEOUT, buffer: int = 1000) -> None:
        self.ws = ws
        self.timeout = timeout
        self.peer_id: str | None = None
        self.room_id: str | None = None
        self._lock = trio.Lock()
        self._reply: trio.MemorySendChannel[dict[str, Any]] | None = None
        self._unconfirmed = 0
        self._incoming_send, self._incoming = trio.open_memory_channel[dict[str, Any]](buffer)
        self._errors_send, self._errors = trio.open_memory_channel[SignalingError](buffer)
        self._presence_send: trio.MemorySendChannel[dict[str, Any]] | None = None
        self._buffer = buffer
        self._closed: SignalingClosed | None = None

    # ------------------------------------------------------------- reader
    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    text = await self.ws.get_message()
                except ConnectionClosed as exc:
                    self._closed = SignalingClosed(exc.reason.code, exc.reason.reason)
                    return
                frame = json.loads(text)
                mtype = frame.get("type")
                if mtype in PUSH_TYPES:
                    await _put(self._incoming_send, frame)
                elif mtype in PRESENCE_TYPES:
                    if self._presence_send is not None:
                        await _put(self._presence_send, frame)
                elif self._reply is not None:
                    await _put(self._reply, frame)
                elif mtype == "error":
                    await _put(
                        self._errors_send, SignalingError(frame.get("code", "?"), frame.get("message", ""), frame)
                    )
        finally:
            self._incoming_send.close()
            self._errors_send.close()
            if self._presence_send is not None:
                self._presence_send.close()
            if self._reply is not None:
                self._reply.close()

    def _check_open(self) -> None:
        if self._closed is not None or self.ws.closed is not None:
            raise self._closed or SignalingClosed(self.ws.closed.code if self.ws.closed else None, None)

    async def _send(self, frame: dict[str, Any]) -> None:
        self._check_open()
        try:
            await self.ws.send_message(json.dumps(frame))
        except ConnectionClosed as exc:
            raise SignalingClosed(exc.reason.code, exc.reason.reason) from None

    async def _exchange(self, frame: dict[str, Any], *, expect: str) -> dict[str, Any]:
        """Send `frame`, return the answer of type `expect`, or raise its error."""
        async with self._lock:
            send, receive = trio.open_memory_channel[dict[str, Any]](16)
            self._reply = send
            sent = done = False
            try:
                with trio.fail_after(self.timeout):
                    if self._unconfirmed:
                        await self._barrier(receive)
                    await self._send(frame)
                    sent = True
                    while True:
                        try:
                            answer = await receive.receive()
                        except trio.EndOfChannel:
                            self._check_open()
                            raise SignalingClosed(None, "connection lost") from None
                        if answer.get("type") == "error":
                            done = True
                            raise SignalingError(answer.get("code", "?"), answer.get("message", ""), answer)
                        if answer.get("type") == expect:
                            done = True
                            return answer
            finally:
                self._reply = None
                if sent and not done:
                    # cancelled or timed out with the answer still to come: the next
                    # request first drains it with a ping barrier
                    self._unconfirmed += 1

    async def _barrier(self, receive: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
        # Answers come in order: errors before this pong belong to earlier unanswered sends.
        await self._send({"type": "ping"})
        while True:
            answer = await receive.receive()
            if answer.get("type") == "pong":
                break
            if answer.get("type") == "error":
                err = SignalingError(answer.get("code", "?"), answer.get("message", ""), answer)
                try:
                    self._errors_send.send_nowait(err)
                except trio.WouldBlock:
                    pass
        self._unconfirmed = 0

    async def _fire(self, frame: dict[str, Any]) -> None:
        async with self._lock:
            await self._send(frame)
            self._unconfirmed += 1

    # --------------------------------------------------------- requests
    async def register(
        self, peer_id: str, room_id: str, token: str, id_token: str, *,
        role: str = "peer", metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        frame = {"type": "register", "peer_id": peer_id, "room_id": room_id, "token": token,
                 "id_token": id_token, "role": role, "metadata": metadata or {}}
        answer = await self._exchange(frame, expect="registered_auth")
        self.peer_id, self.room_id = peer_id, room_id
        return answer

    async def discover(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return (await self._exchange({"type": "discover_peers", "filters": filters or {}}, expect="peer_list"))["peers"]

    async def update_metadata(self, metadata: dict[str, Any]) -> dict[str, Any]:
        return (await self._exchange({"type": "update_metadata", "metadata": metadata}, expect="metadata_updated"))[
            "metadata"
        ]

    async def subscribe(self, filters: dict[str, Any] | None = None) -> Subscription:
        """Start (or replace) this connection's subscription; a replaced one's iterator ends.
        The new channel is in place before the request goes out, so no event that follows
        the server's answer can be missed."""
        send, receive = trio.open_memory_channel[dict[str, Any]](self._buffer)
        old, self._presence_send = self._presence_send, send
        try:
            answer = await self._exchange({"type": "subscribe", "filters": filters or {}}, expect="subscribed")
        except BaseException:
            self._presence_send = old  # the server kept the old subscription
            send.close()
            raise
        if old is not None:
            old.close()
        return Subscription(answer["peers"], receive)

    async def unsubscribe(self) -> None:
        await self._exchange({"type": "unsubscribe"}, expect="unsubscribed")
        if self._presence_send is not None:
            self._presence_send.close()
            self._presence_send = None

    async def reserve(self, peer_id: str, duration_sec: float, *, filters: dict[str, Any] | None = None) -> float:
        frame: dict[str, Any] = {"type": "reserve_peer", "to_peer_id": peer_id, "duration_sec": duration_sec}
        if filters is not None:
            frame["filters"] = filters
        return (await self._exchange(frame, expect="reservation_granted"))["reserved_until"]

    async def release(self, peer_id: str) -> None:
        await self._exchange({"type": "release_peer", "to_peer_id": peer_id}, expect="reservation_released")

    async def ping(self) -> None:
        await self._exchange({"type": "ping"}, expect="pong")

    # ------------------------------------------------------ fire and forget
    async def send_peer_message(self, to_peer_id: str, payload: Any) -> None:
        await self._fire({"type": "peer_message", "to_peer_id": to_peer_id, "payload": payload})

    async def send_signal(self, type_: str, target: str, **fields: Any) -> None:
        if type_ not in ("offer", "answer", "candidate"):
            raise ValueError(f"not a signalling type: {type_}")
        await self._fire({"type": type_, "target": target, **fields})

    async def send_offer(self, target: str, sdp: str, **fields: Any) -> None:
        await self.send_signal("offer", target, sdp=sdp, **fields)

    async def send_answer(self, target: str, sdp: str, **fields: Any) -> None:
        await self.send_signal("answer", target, sdp=sdp, **fields)

    async def send_candidate(self, target: str, candidate: Any, **fields: Any) -> None:
        await self.send_signal("candidate", target, candidate=candidate, **fields)

    async def flush(self) -> None:
        """Wait until the server has handled every send so far (errors go to errors())."""
        await self.ping()

    # ------------------------------------------------------------ receiving
    def incoming(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """Peer messages, offers/answers/candidates and peer_reserved/peer_released, in
        arrival order; iterate with `async for`. Ends when the connection closes."""
        return self._incoming

    async def receive(self, timeout: float | None = None) -> dict[str, Any]:
        with trio.fail_after(self.timeout if timeout is None else timeout):
            try:
                return await self._incoming.receive()
            except trio.EndOfChannel:
                self._check_open()
                raise SignalingClosed(None, "connection lost") from None

    def errors(self) -> trio.MemoryReceiveChannel[SignalingError]:
        """Errors for fire-and-forget sends (and any error nobody was waiting for)."""
        return self._errors

    async def aclose(self, code: int = 1000) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self.ws.aclose(code)


async def _put(channel: trio.MemorySendChannel[Any], item: Any) -> None:
    # A full channel blocks the reader: backpressure up to the server, whose outbox for
    # us fills; a closed one (a replaced subscription, a consumer that went away) drops.
    try:
        await channel.send(item)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass


async def connect(url: str, nursery: trio.Nursery, *, timeout: float = DEFAULT_TIMEOUT) -> SignalingClient:
    """Open a client whose tasks run in `nursery` (close it with `aclose()`)."""
    urlsplit(url)  # ValueError early for garbage
    with trio.fail_after(timeout):
        ws = await connect_websocket_url(nursery, url, message_queue_size=64)
    client = SignalingClient(ws, timeout=timeout)
    nursery.start_soon(client._read_loop)
    return client


@asynccontextmanager
async def open_signaling_client(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> AsyncIterator[SignalingClient]:
    """A client for the WebSocket endpoint at `url`, closed (code 1000) on exit."""
    async with trio.open_nursery() as nursery:
        client = await connect(url, nursery, timeout=timeout)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()


__all__ = [
    "HttpApi", "Identity", "Room", "SignalingClient", "SignalingClosed", "SignalingError",
    "Subscription", "connect", "open_signaling_client",
]
