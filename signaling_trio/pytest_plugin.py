"""pytest plugin (entry point `pytest11`) for pytest-trio users: a real signaling_trio
server on ephemeral ports, and registered clients on demand.

    async def test_my_worker(signaling_server, signaling_client_factory):
        worker = await signaling_client_factory(role="worker", metadata={"tags": ["gpu"]})
        client = await signaling_client_factory(role="client")
        assert [p["peer_id"] for p in await client.discover({"role": "worker"})] == [worker.peer_id]

Options for the server: mark a test with `@pytest.mark.signaling_server(max_room_peers=5)`
(any Settings field), or override the `signaling_server_options` fixture.
"""

from __future__ import annotations

import itertools
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import trio

from .client import HttpApi, Room, SignalingClient, connect
from .testing import TestServer, open_test_server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "signaling_server(**options): Settings for the signaling_server fixture")


@pytest.fixture
def signaling_server_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("signaling_server")
    return dict(marker.kwargs) if marker else {}


@pytest.fixture
async def signaling_server(signaling_server_options: dict[str, Any]) -> AsyncIterator[TestServer]:
    """A running server (store `memory`, 127.0.0.1, ports 0): `.ws_url`, `.http_url`, `.server`."""
    async with open_test_server(**signaling_server_options) as srv:
        yield srv


ClientFactory = Callable[..., Awaitable[SignalingClient]]


@pytest.fixture
async def signaling_client_factory(signaling_server: TestServer) -> AsyncIterator[ClientFactory]:
    """`await factory(role=..., metadata=..., peer_id=..., room=..., register=True)`: a
    connected client, registered in a room shared by the test unless `room` (a `Room`,
    or None for the shared one) says otherwise. All are closed when the test ends."""
    api = HttpApi(signaling_server.http_url)
    shared: dict[str, Any] = {}
    counter = itertools.count(1)
    clients: list[SignalingClient] = []

    async with trio.open_nursery() as nursery:

        async def factory(
            *, role: str = "peer", metadata: dict[str, Any] | None = None, peer_id: str | None = None,
            room: Room | None = None, register: bool = True,
        ) -> SignalingClient:
            client = await connect(signaling_server.ws_url, nursery)
            clients.append(client)
            if not register:
                return client
            identity = await api.anonymous_signin()
            if room is None:
                if "room" not in shared:
                    shared["room"] = await api.create_room(identity.id_token)
                room = shared["room"]
            await client.register(peer_id or f"{role}-{next(counter)}", room.room_id, room.token,
                                  identity.id_token, role=role, metadata=metadata)
            return client

        factory.api = api  # type: ignore[attr-defined]
        try:
            yield factory
        finally:
            for client in clients:
                await client.aclose()
            nursery.cancel_scope.cancel()
