"""Run the real server inside a test's own nursery, on ephemeral ports.

    async with open_test_server(max_room_peers=5) as srv:
        srv.ws_url, srv.http_url, srv.server  # the live SignalingServer

Options are Settings fields. Defaults: host 127.0.0.1, ports 0, store `memory`, no HTTP
rate limit (a test suite signs in and creates rooms faster than any lab),
warnings-only logging is left to the caller.
"""

from __future__ import annotations

import json
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import trio

from .config import Settings, validate
from .server import ServerInfo, SignalingServer


@dataclass
class TestServer:
    server: SignalingServer
    info: ServerInfo
    settings: Settings

    __test__ = False  # not a pytest test class

    @property
    def ws_url(self) -> str:
        return self.info.ws_url

    @property
    def http_url(self) -> str:
        return self.info.http_url

    async def http(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        """A small HTTP call (stdlib, in a thread) returning (status, parsed JSON)."""
        url = self.http_url + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"

        def call() -> tuple[int, Any]:
            req = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, json.loads(resp.read() or b"null")
            except urllib.error.HTTPError as err:
                raw = err.read()
                try:
                    return err.code, json.loads(raw)
                except ValueError:
                    return err.code, raw.decode(errors="replace")

        return await trio.to_thread.run_sync(call)

    async def http_raw(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body bytes), for non-JSON answers."""

        def call() -> tuple[int, dict[str, str], bytes]:
            req = urllib.request.Request(self.http_url + path, method=method, headers=headers or {})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
            except urllib.error.HTTPError as err:
                return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()

        return await trio.to_thread.run_sync(call)

    async def new_room(self) -> dict[str, Any]:
        """Sign in anonymously and create a room: {id_token, username, room_id, token, expires_at}."""
        status, signin = await self.http("POST", "/anonymous-signin")
        assert status == 200, signin
        status, room = await self.http("POST", "/create-room", token=signin["id_token"])
        assert status == 200, room
        return {**signin, **room}

    async def signin(self) -> dict[str, Any]:
        status, signin = await self.http("POST", "/anonymous-signin")
        assert status == 200, signin
        return signin


@asynccontextmanager
async def open_test_server(**options: Any) -> AsyncIterator[TestServer]:
    base = {"host": "127.0.0.1", "ws_port": 0, "http_port": 0, "store": "memory", "http_rate_limit": 0}
    base.update(options)
    settings = validate(Settings(**base))
    server = SignalingServer(settings)
    started = False
    try:
        async with trio.open_nursery() as nursery:
            info = await nursery.start(server.run)
            started = True
            try:
                yield TestServer(server, info, settings)
            finally:
                server.shutdown()
    except BaseExceptionGroup as group:
        # A server that failed to start raises its own error, not a nursery's group.
        if not started and len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
