"""Cluster chores off the message path: where peers last registered, and the counts
every instance shares for /metrics.

Owns: the queue of peer-id -> room notes written to Redis (for v1's
/delete-peers-and-room on any instance), and this instance's view of the whole
cluster's rooms and peers (refreshed every STATS_EVERY s).
"""

from __future__ import annotations

from typing import Any

import trio

from .._actors import RoomSupervisor
from ..store import StoreUnavailable
from .transport import Transport

STATS_EVERY = 2.0
NOTES_QUEUE = 10000  # peer notes waiting to be written; beyond, they are skipped


class Upkeep:
    def __init__(self, transport: Transport, supervisor: RoomSupervisor, instance: str) -> None:
        self.transport = transport
        self.supervisor = supervisor
        self.instance = instance
        self.view: dict[str, Any] = {"instances": 1, "active_rooms": 0, "active_connections": 0,
                                     "peers_by_role": {}}
        self._notes_send, self._notes_recv = trio.open_memory_channel[tuple[str, str]](NOTES_QUEUE)

    def note_peer(self, peer_id: str, room_id: str) -> None:
        try:
            self._notes_send.send_nowait((peer_id, room_id))
        except trio.WouldBlock:
            pass

    async def find_room(self, peer_id: str) -> str | None:
        try:
            return await self.transport.peer_room(peer_id)
        except StoreUnavailable:
            return None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_notes)
            nursery.start_soon(self._share_stats)

    async def _write_notes(self) -> None:
        async for peer_id, room_id in self._notes_recv:
            try:
                await self.transport.set_peer_room(peer_id, room_id)
            except StoreUnavailable:
                pass

    async def _share_stats(self) -> None:
        """Publish this instance's counts; sum everyone's."""
        while True:
            sup = self.supervisor
            mine = {"rooms": len(sup.rooms), "peers": sup.peer_count(), "peers_by_role": sup.peers_by_role()}
            try:
                everyone = await self.transport.share_stats(self.instance, mine, STATS_EVERY)
            except StoreUnavailable:
                everyone = None
            if everyone is not None:
                roles: dict[str, int] = {}
                for stats in everyone:
                    for role, n in stats["peers_by_role"].items():
                        roles[role] = roles.get(role, 0) + n
                self.view = {"instances": len(everyone), "active_rooms": sum(s["rooms"] for s in everyone),
                             "active_connections": sum(s["peers"] for s in everyone), "peers_by_role": roles}
            await trio.sleep(STATS_EVERY)
