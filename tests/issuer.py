"""A tiny OIDC issuer for tests: publishes a JWKS over real HTTP on 127.0.0.1 and signs
tokens with its keys. It can rotate keys and go down (its listener really closes)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey


class FakeIssuer:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.keys: list[RSAKey] = []
        self.requests = 0
        self.port = 0
        self._stop: trio.Event | None = None
        self._stopped: trio.Event | None = None
        self.rotate()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rotate(self) -> RSAKey:
        key = RSAKey.generate_key(2048, parameters={"kid": f"k{len(self.keys) + 1}", "use": "sig", "alg": "RS256"})
        self.keys.append(key)
        return key

    def token(self, *, key: RSAKey | None = None, alg: str = "RS256", **claims: Any) -> str:
        key = key or self.keys[-1]
        now = int(time.time())
        body = {"iss": self.url, "aud": "client-app", "sub": "user-1", "exp": now + 600, "iat": now, "token_use": "id"}
        body.update(claims)
        return jwt.encode({"alg": alg, "kid": key.kid}, {k: v for k, v in body.items() if v is not None}, key)

    async def app(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.requests += 1
        if scope["path"] == "/.well-known/jwks.json":
            body = json.dumps(KeySet(self.keys).as_dict(private=False)).encode()
            status = 200
        else:
            body, status = b"{}", 404
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": body})

    async def up(self) -> None:
        if not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.graceful_timeout = 0.1
        self._stop, self._stopped = trio.Event(), trio.Event()
        stop, stopped = self._stop, self._stopped

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await serve(self.app, config, shutdown_trigger=stop.wait, task_status=task_status)
            finally:
                stopped.set()

        await self.nursery.start(run)

    async def down(self) -> None:
        assert self._stop is not None and self._stopped is not None
        self._stop.set()
        await self._stopped.wait()
