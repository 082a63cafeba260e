"""A peer as its room holds it, and what handling a message asks of the connections.

Owns: `Peer` (one registered peer: identity, profile, reservation, subscription) and
`Effects` (frames to send, connections to close, counters), the ready-made JSON pieces
of presence events and peer lists.
Never touches: sockets, trio, the clock.
"""

from __future__ import annotations

from typing import Any, Hashable

from . import errors as E
from .filters import Filter
from .messages import dumps

Conn = Hashable
EMPTY: frozenset[Any] = frozenset()  # the empty set every peer starts with, shared


class Peer:
    __slots__ = (
        "peer_id", "conn", "subject", "role", "metadata", "tags", "properties",
        "connected_at", "reserved_by", "reserved_until", "reserve_deadline",
        "holding", "subscription", "subscribed_with", "known", "_public_json", "seq",
    )

    def __init__(self, peer_id: str, conn: Conn, subject: str, connected_at: float) -> None:
        self.peer_id = peer_id
        self.conn = conn
        self.subject = subject  # who its credential says it is
        self.role = "peer"
        self.metadata: dict[str, Any] = {}
        self.tags: frozenset[Any] = EMPTY
        self.properties: dict[str, Any] = {}
        self.connected_at = connected_at
        self.reserved_by: str | None = None
        self.reserved_until: float | None = None
        self.reserve_deadline: float | None = None
        # the two sets start as one shared empty frozenset (most peers never hold a
        # reservation or subscribe; an empty set is 216 bytes) and become sets when used
        self.holding: set[str] | frozenset[str] = EMPTY
        self.subscription: Filter | None = None  # a subscriber's compiled filters
        self.subscribed_with: Any = None  # ... as it sent them (handed over when the room moves)
        self.known: set[str] | frozenset[str] = EMPTY  # a subscriber's matching peers, as it was told
        self._public_json: str | None = None
        self.seq = 0

    def set_profile(self, role: str, metadata: dict[str, Any], tags: frozenset[Any]) -> None:
        self.role = role
        self.metadata = metadata
        self.tags = tags
        props = metadata.get("properties")
        self.properties = props if isinstance(props, dict) else {}
        self._public_json = None

    def public(self) -> dict[str, Any]:
        view: dict[str, Any] = {
            "peer_id": self.peer_id,
            "role": self.role,
            "metadata": self.metadata,
            "connected_at": self.connected_at,
        }
        if self.reserved_by is not None:
            view["reserved_by"] = self.reserved_by
            view["reserved_until"] = self.reserved_until
        return view

    @property
    def public_json(self) -> str:
        # Kept ready-made: discovery in a big room joins these strings, it does not
        # re-encode every peer on every request.
        if self._public_json is None:
            self._public_json = dumps(self.public())
        return self._public_json

    def touch(self) -> None:
        self._public_json = None


class Effects:
    __slots__ = ("sends", "closes", "routed", "dropped", "errors")

    def __init__(self) -> None:
        self.sends: list[tuple[Conn, str]] = []
        self.closes: list[tuple[Conn, int, str]] = []
        self.routed = 0
        self.dropped = 0
        self.errors: list[tuple[Conn, str]] = []

    def send(self, conn: Conn, msg: dict[str, Any] | str) -> None:
        self.sends.append((conn, msg if isinstance(msg, str) else dumps(msg)))

    def error(self, conn: Conn, exc: E.ProtocolError) -> None:
        self.errors.append((conn, exc.code))
        self.send(conn, exc.to_message())


def event_json(kind: str, peer: Peer) -> str:
    return '{"type":"%s","peer":%s}' % (kind, peer.public_json)


def peer_list_json(type_: str, head: dict[str, Any], peers: Any) -> str:
    # {"type":..., <head fields>, "peers":[...], "count":N} built from ready-made parts
    parts = dumps({"type": type_, **head})[:-1]
    items = [p.public_json for p in peers]
    return f'{parts},"peers":[{",".join(items)}],"count":{len(items)}}}'
