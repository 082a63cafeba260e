"""Decoding and encoding frames, and the shape checks shared by every handler.

Owns: JSON codec choice, the set of message types, field validation helpers.
Never touches: rooms, sockets, trio.
"""

from __future__ import annotations

from typing import Any

import orjson

from . import errors as E

V2_TYPES = frozenset(
    {"register", "discover_peers", "update_metadata", "peer_message", "offer", "answer", "candidate"}
)
BEYOND_V2_TYPES = frozenset({"subscribe", "unsubscribe", "reserve_peer", "release_peer", "ping"})
# sleap-rtc 0.0.x (SPEC section 4): a routed error (a worker refusing an offer), the mesh
SLEAP_RTC_TYPES = frozenset({"error", "mesh_connect", "mesh_answer", "ice_candidate"})
KNOWN_TYPES = V2_TYPES | BEYOND_V2_TYPES | SLEAP_RTC_TYPES
ROOM_TYPES = KNOWN_TYPES - {"register", "ping"}
# Requests the room answers exactly once (an answer or an error); the others are routed
# to a peer and answered only when they fail.
ANSWERED_TYPES = frozenset(
    {"discover_peers", "update_metadata", "subscribe", "unsubscribe", "reserve_peer", "release_peer"}
)


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def decode(text: str) -> dict[str, Any]:
    """One text frame -> a message dict with a string `type`, or ProtocolError."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise E.ProtocolError(E.INVALID_JSON, "Invalid JSON format") from None
    if not isinstance(msg, dict):
        raise E.ProtocolError(E.INVALID_MESSAGE, "a message must be a JSON object")
    mtype = msg.get("type")
    if not isinstance(mtype, str):
        raise E.ProtocolError(E.INVALID_MESSAGE, "a message needs a string field 'type'")
    return msg


def encoded_size(obj: Any) -> int:
    return len(orjson.dumps(obj))
