"""A `register` frame, read into a typed request: which peer, which room, which credential.

Owns: the fields of `register`, their limits, and the kinds of credential a peer may
register with, as a table (`CREDENTIALS`): each kind says which fields identify it and
reads them into its own frozen dataclass. What a credential admits (verifying it, the
room's rules) is the server's (`signaling_trio/_register.py`), one entry per kind too.
Never touches: sockets, trio, the store, auth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from . import errors as E
from . import metadata as md

MAX_ID_LEN = 256
MAX_TOKEN_LEN = 16384


@dataclass(frozen=True, slots=True)
class RoomTokenCredential:
    """v1/v2: the room's token (from /create-room) and an id_token (a JWT) naming the user."""

    token: str
    id_token: str


Credential = RoomTokenCredential


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    peer_id: str
    room_id: str
    role: str
    metadata: dict[str, Any]
    credential: Credential


@dataclass(frozen=True, slots=True)
class CredentialKind:
    name: str
    fields: tuple[tuple[str, int], ...]  # required string fields and their length limits
    claims: Callable[[dict[str, Any]], bool]  # does this frame use this kind?
    read: Callable[[dict[str, Any]], Credential]


# Tried in order; the first that claims the frame reads it. The last claims every frame,
# so a frame with no credential at all is told what the v1/v2 kind misses.
CREDENTIALS: tuple[CredentialKind, ...] = (
    CredentialKind(
        "room_token",
        (("token", MAX_ID_LEN), ("id_token", MAX_TOKEN_LEN)),
        claims=lambda msg: True,
        read=lambda msg: RoomTokenCredential(msg["token"], msg["id_token"]),
    ),
)
ROOM_FIELDS = (("peer_id", MAX_ID_LEN), ("room_id", MAX_ID_LEN))


def credential_kind(msg: dict[str, Any]) -> CredentialKind:
    return next(kind for kind in CREDENTIALS if kind.claims(msg))


def parse_register(msg: dict[str, Any]) -> RegisterRequest:
    """The request, or ProtocolError: MISSING_FIELDS naming every missing field, else
    INVALID_MESSAGE for the first field of the wrong type or length."""
    kind = credential_kind(msg)
    required = ROOM_FIELDS + kind.fields
    missing = [name for name, _ in required if msg.get(name) in (None, "")]
    if missing:
        raise E.ProtocolError(E.MISSING_FIELDS, "Missing required fields during registration: " + ", ".join(missing))
    for name, limit in required:
        value = msg[name]
        if not isinstance(value, str) or len(value) > limit:
            raise E.ProtocolError(E.INVALID_MESSAGE, f"field '{name}' must be a string of at most {limit} characters")
    role = msg.get("role")
    if role is None:
        role = "peer"
    elif not isinstance(role, str) or not role or len(role) > MAX_ID_LEN:
        raise E.ProtocolError(E.INVALID_MESSAGE, "field 'role' must be a non-empty string")
    metadata = md.validate(msg.get("metadata"))
    return RegisterRequest(msg["peer_id"], msg["room_id"], role, metadata, kind.read(msg))
