"""Checks every HTTP request passes before the app sees it (an ASGI middleware).

Owns: which requests reach an endpoint at all: HTTP/1.0 and 1.1 only, unambiguous
framing (never both Content-Length and Transfer-Encoding: RFC 9112 section 6.1), no
WebSocket upgrades on the HTTP port, a per-client-address rate limit on the endpoints
that create state, and the whole body read, within a size cap and a deadline, before the
app runs. A refused request gets the API's JSON error and, where the rest of the
connection can no longer be trusted or read, `Connection: close`.
Never touches: what an endpoint does (`_http`), the connection itself (`_httpserve`).

Why the body is read here, always: quart-trio answers a request while a second task waits
for the body; when the answer came first (an endpoint that never reads its body) that task
saw the disconnect hypercorn sends after the response and cancelled the connection's
keep-alive bookkeeping half way: the rest of that body and the next request on the
connection were never read (a kept-alive client waited until its timeout). With the body
read before the app runs and no disconnect passed on, the app finishes only after
hypercorn is done with the request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import trio

from . import _nowait as nowait
from ._log import event

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY = 64 * 1024
# what creates something in the store: identities, rooms, login sessions, sign-ins
RATE_LIMITED = frozenset({("POST", "/anonymous-signin"), ("POST", "/create-room"), ("GET", "/login"),
                          ("POST", "/api/auth/login/local"), ("GET", "/login/start")})
MAX_TRACKED_ADDRESSES = 100_000


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    close: bool = True
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def encoded(self) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The API's JSON error body and the headers that go with it."""
        body = orjson.dumps({"error": self.code, "message": self.message})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *self.headers]
        if self.close:
            headers.append((b"connection", b"close"))
        return body, headers


@dataclass
class RateLimiter:
    """Requests per minute per client address: a token bucket per address (burst = one
    minute's allowance). Checked and updated without a checkpoint, so tasks never see
    it half-updated. Addresses whose bucket has refilled are forgotten."""

    per_minute: float
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # address -> (tokens, at)

    def check(self, address: str, now: float) -> float:
        """Take one request for `address`; 0 if allowed, else seconds until one is."""
        rate = self.per_minute / 60.0
        tokens, at = self.buckets.get(address, (self.per_minute, now))
        tokens = min(self.per_minute, tokens + (now - at) * rate)
        if tokens < 1.0:
            self.buckets[address] = (tokens, now)
            return (1.0 - tokens) / rate
        if len(self.buckets) >= MAX_TRACKED_ADDRESSES and address not in self.buckets:
            self.forget_full(now)
        self.buckets[address] = (tokens - 1.0, now)
        return 0.0

    def forget_full(self, now: float) -> None:
        rate = self.per_minute / 60.0
        self.buckets = {a: (t, at) for a, (t, at) in self.buckets.items()
                        if t + (now - at) * rate < self.per_minute}


def header(scope: Scope, name: bytes) -> list[bytes]:
    return [v for n, v in scope.get("headers", ()) if n.lower() == name]


def check_request(scope: Scope) -> Refusal | None:
    """What is wrong with a request's start line and framing, before any body is read."""
    if scope.get("http_version") not in ("1.0", "1.1"):
        return Refusal(505, "HTTP_VERSION_NOT_SUPPORTED", "this server speaks HTTP/1.0 and HTTP/1.1")
    if header(scope, b"transfer-encoding") and header(scope, b"content-length"):
        return Refusal(400, "BAD_REQUEST", "a request may not carry both Content-Length and Transfer-Encoding")
    lengths = header(scope, b"content-length")
    if lengths and int(lengths[0]) > MAX_BODY:  # h11 has checked it is one valid number
        return Refusal(413, "MESSAGE_TOO_LARGE", f"request body too large (at most {MAX_BODY} bytes)")
    return None


class HttpGuard:
    """The ASGI app hypercorn runs: checks, then hands the request to `app`."""

    def __init__(self, app: ASGIApp, *, rate_limit: float, body_timeout: float,
                 ws_port: Callable[[], int | None]) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.limiter = RateLimiter(rate_limit) if rate_limit > 0 else None
        self.ws_port = ws_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, send)
        elif kind == "websocket":
            port = self.ws_port()
            where = f"port {port}" if port else "the WebSocket port"
            await self._refuse(
                scope,
                send,
                Refusal(400, "WRONG_PORT", f"this is the HTTP API; WebSockets connect to {where}"),
                prefix="websocket.http.",
            )
        elif kind == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = None
        refusal = check_request(scope)
        if refusal is None:
            body, refusal = await read_body(receive, self.body_timeout)
            if body is None and refusal is None:
                return  # the client went away: nobody to answer
        refusal = refusal or self._rate_limited(scope)
        if refusal is not None:
            await self._refuse(scope, send, refusal)
            return
        await self.app(scope, _replay(body or b""), send)

    def _rate_limited(self, scope: Scope) -> Refusal | None:
        if self.limiter is None or (scope.get("method"), scope.get("path")) not in RATE_LIMITED:
            return None
        address = (scope.get("client") or ("?",))[0]
        wait = self.limiter.check(address, trio.current_time())
        if not wait:
            return None
        retry = str(max(1, math.ceil(wait))).encode()
        return Refusal(429, "RATE_LIMITED", f"too many requests from this address; retry in {retry.decode()} s",
                       close=False, headers=((b"retry-after", retry),))

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal, prefix: str = "http.") -> None:
        event(logging.INFO, "http refused", path=scope.get("path", "")[:100], status=refusal.status, code=refusal.code)
        body, headers = refusal.encoded()
        await send({"type": prefix + "response.start", "status": refusal.status, "headers": headers})
        await send({"type": prefix + "response.body", "body": body, "more_body": False})


async def read_body(receive: Receive, timeout: float) -> tuple[bytes | None, Refusal | None]:
    """The whole body within MAX_BODY and `timeout`: (body, None), (None, refusal),
    or (None, None) when the client disconnected first."""
    chunks: list[bytes] = []
    size = 0
    with nowait.within(timeout):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                return None, Refusal(413, "MESSAGE_TOO_LARGE", f"request body too large (at most {MAX_BODY} bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None
    return None, Refusal(408, "REQUEST_TIMEOUT", f"the request body did not arrive within {timeout:g} s")


def _replay(body: bytes) -> Receive:
    """The app's receive: the body once, then nothing (the app never sees a disconnect;
    quart-trio cancels its waiting reader once the response is sent)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    return receive
