"""The one way into rooms: `RoomRouter`, and its single-process implementation.

Owns: the interface every other part uses to reach a room (open its handle, call a
named operation, find where a peer was, report on the rooms), and `LocalRouter`, the
implementation when this process is the whole server. `cluster.Cluster` is the other
implementation (rooms shared with other instances through Redis). Nothing outside these
two knows which one is running.

Never touches: a room's state (the actors own it), sockets, the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import trio

from ._actors import Command, RoomActor, RoomSupervisor


class RoomHandle(Protocol):
    """A connection's way into the room it registered in (a `RoomActor` here, or a
    cluster `RoomLink` whose room may live on another instance). The sends raise
    trio.BrokenResourceError / ClosedResourceError when the room is gone: the
    connection is then in no room."""

    room_id: str

    def send_nowait(self, cmd: Command) -> None: ...  # trio.WouldBlock when the room is busy
    async def send(self, cmd: Command) -> None: ...
    def register_abandoned(self, conn_id: Any) -> None: ...  # its Register's answer is no longer awaited


@dataclass(frozen=True, slots=True)
class Series:
    """A figure a router adds to /metrics: `name` as in JSON, Prometheus name and help."""

    name: str
    prometheus: str
    help: str
    kind: str  # "gauge" | "counter"
    value: float


class RoomRouter(Protocol):
    supervisor: RoomSupervisor  # this process's live rooms

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...
    # StoreUnavailable: cannot tell where it lives. `candidates` (--workers: this machine's
    # processes, this one included): a room nobody owns yet goes to one of them in turn
    async def open(self, room_id: str, candidates: Sequence[str] = ()) -> RoomHandle: ...
    async def call(self, room_id: str, op: str, *args: Any, timeout: float = 5.0) -> Any: ...
    async def find_room(self, peer_id: str) -> str | None: ...
    def note_peer(self, peer_id: str, room_id: str) -> None: ...
    def owner_elsewhere(self, room_id: str) -> str | None: ...  # the instance owning an opened room, if not us
    def json_fields(self) -> dict[str, Any]: ...  # added to /metrics JSON
    def series(self) -> list[Series]: ...  # added to /metrics in Prometheus formats
    async def stop(self) -> None: ...  # graceful shutdown, after connections are closed


class LocalRouter:
    """Every room lives in this process."""

    def __init__(self, supervisor: RoomSupervisor) -> None:
        self.supervisor = supervisor

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.supervisor.run(task_status=task_status)

    async def open(self, room_id: str, candidates: Sequence[str] = ()) -> RoomActor:
        return self.supervisor.room(room_id)  # (one process: every room lives here)

    async def call(self, room_id: str, op: str, *args: Any, timeout: float = 5.0) -> Any:
        """Run the CALLS operation `op` in the room's actor; None when the room has no
        live state. trio.TooSlowError after `timeout`."""
        return await self.supervisor.call(room_id, op, args, timeout=timeout)

    async def find_room(self, peer_id: str) -> str | None:
        return self.supervisor.last_room.get(peer_id)

    def note_peer(self, peer_id: str, room_id: str) -> None:
        self.supervisor.note_peer(peer_id, room_id)

    def owner_elsewhere(self, room_id: str) -> str | None:
        return None

    def json_fields(self) -> dict[str, Any]:
        return {}

    def series(self) -> list[Series]:
        return []

    async def stop(self) -> None:
        pass
