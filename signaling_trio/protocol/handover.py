"""What a room hands over when it moves to another instance, and taking it back.

A room's peers rebuild most of its state by registering again (their instance restores
them). Two things they cannot rebuild: who subscribed to what (and which peers each
subscriber was told of), and who holds whom until when. `snapshot` writes those as
plain JSON data (saved to Redis by the cluster on every change); on the next owner a
`PendingHandover` hands them back, peer by peer, as the peers are restored.

The saved form, kept compact since it is written on every change:
`{"subs": {subscriber: {"f": filters as sent, "m": [known peer ids]}},
  "res": {target: [holder, reserved_until (Unix seconds)]}}`

Never touches: sockets, trio, the clock, the room's other state (protocol/room.py applies
what this returns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from .peer import Peer


def snapshot(peers: Iterable[Peer], subscribers: Iterable[Peer]) -> dict[str, Any]:
    subs = {p.peer_id: {"f": p.subscribed_with, "m": sorted(p.known)} for p in subscribers}
    res = {p.peer_id: [p.reserved_by, p.reserved_until] for p in peers if p.reserved_by is not None}
    return {"subs": subs, "res": res}


@dataclass(frozen=True, slots=True)
class Subscription:
    filters: Any
    known: set[str]


@dataclass(frozen=True, slots=True)
class Reservation:
    target: str
    holder: str
    until: float  # Unix seconds


@dataclass
class PendingHandover:
    """A previous life's subscriptions and reservations, waiting for their peers until
    `deadline` (trio's clock)."""

    deadline: float
    subscriptions: dict[str, Any]
    reservations: dict[str, Any]
    restored: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, data: Any, deadline: float) -> "PendingHandover | None":
        """None for anything that is not a handover (it is ignored, never an error)."""
        if not isinstance(data, dict):
            return None
        subs, res = data.get("subs") or {}, data.get("res") or {}
        if not isinstance(subs, dict) or not isinstance(res, dict):
            return None
        return cls(deadline, dict(subs), dict(res))

    def restore(self, peer_id: str) -> tuple[Subscription | None, list[Reservation]]:
        """`peer_id` is back: its subscription (if it had one), and the reservations whose
        holder and target are now both back (each returned once)."""
        self.restored.add(peer_id)
        sub = self.subscriptions.pop(peer_id, None)
        subscription = None
        if isinstance(sub, dict):
            subscription = Subscription(sub.get("f"), set(sub.get("m") or ()))
        due = []
        for target, entry in list(self.reservations.items()):
            try:
                holder, until = entry
                until = float(until)
            except (TypeError, ValueError):
                del self.reservations[target]
                continue
            if target in self.restored and holder in self.restored:
                del self.reservations[target]
                due.append(Reservation(target, str(holder), until))
        return subscription, due
