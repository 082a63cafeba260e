"""A room's handover state, saved while it lives and taken back by its next owner.

Owns: which rooms' subscriptions and reservations changed and are not yet saved, the
task that saves them, and loading them into a room that starts here (its previous
owner died). protocol/handover.py says what is saved.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import trio

from .._actors import Call, RoomActor, RoomSupervisor
from .._log import event
from ..store import StoreUnavailable
from .link import to_actor
from .transport import Transport

HANDOVER_WINDOW = 10.0  # after a room moved, how long its old subscriptions/reservations wait for their peers
MAX_HANDOVER_BYTES = 256 * 1024  # beyond this a saved handover leaves out who-knows-whom lists
RETRY_AFTER = 1.0


class HandoverSaver:
    def __init__(self, transport: Transport, supervisor: RoomSupervisor) -> None:
        self.transport = transport
        self.supervisor = supervisor
        # rooms whose handover changed (None: the room ended here, delete it)
        self._dirty: dict[str, RoomActor | None] = {}
        self._wake = trio.Event()

    def changed(self, actor: RoomActor) -> None:
        self._dirty[actor.room_id] = actor
        self._wake.set()

    def ended(self, room_id: str) -> None:
        self._dirty[room_id] = None
        self._wake.set()

    def watch(self, actor: RoomActor) -> None:
        """A room starting here: save its handover on every change, once loaded."""
        actor.on_handover_change = self.changed
        actor.handover_loaded = False

    async def load(self, actor: RoomActor) -> None:
        """If the room lived elsewhere before (its owner died), take over what its peers
        cannot rebuild by registering again."""
        data = None
        try:
            raw = await self.transport.load_handover(actor.room_id)
            data = orjson.loads(raw) if raw else None
        except (StoreUnavailable, orjson.JSONDecodeError):
            pass
        if isinstance(data, dict):
            event(logging.INFO, "room handover taken", room_id=actor.room_id,
                  subscriptions=len(data.get("subs") or {}), reservations=len(data.get("res") or {}))
            reply, _ = trio.open_memory_channel[Any](1)
            await to_actor(actor, Call("take_over", (data, trio.current_time(), HANDOVER_WINDOW), reply))
        actor.handover_loaded = True
        self.changed(actor)  # what changed meanwhile is saved now

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            dirty, self._dirty = self._dirty, {}
            failed = False
            for room_id, actor in dirty.items():
                if actor is not None and (not actor.handover_loaded or self.supervisor.rooms.get(room_id) is not actor):
                    continue  # not loaded yet (it marks itself again), or no longer ours
                try:
                    await self.transport.save_handover(room_id, None if actor is None else _encode(actor))
                except StoreUnavailable:
                    self._dirty.setdefault(room_id, actor)
                    failed = True
            if failed:
                await trio.sleep(RETRY_AFTER)  # Redis is away
                self._wake.set()


def _encode(actor: RoomActor) -> bytes | None:
    """The room's handover as saved; None when there is nothing to hand over."""
    data = actor.state.handover()
    if not data["subs"] and not data["res"]:
        return None
    raw = orjson.dumps(data)
    if len(raw) > MAX_HANDOVER_BYTES:
        for sub in data["subs"].values():
            sub["m"] = []
        raw = orjson.dumps(data)
    return raw
