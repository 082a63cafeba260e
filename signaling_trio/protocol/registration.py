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


@dataclass(frozen=True, slots=True)
class JwtCredential:
    """sleap-rtc clients: the user's JWT; the room admits its owner and members (or
    anyone with the room's token, if one is given too)."""

    jwt: str
    token: str | None


@dataclass(frozen=True, slots=True)
class ApiKeyCredential:
    """sleap-rtc workers: an account key (`slp_acct_…`, its user's rooms) or a worker
    token (`slp_…`, one room)."""

    api_key: str


Credential = RoomTokenCredential | JwtCredential | ApiKeyCredential


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    peer_id: str | None  # None: the server makes one (an api_key registration)
    room_id: str | None  # None: the credential names the room (a worker token)
    role: str
    metadata: dict[str, Any]
    credential: Credential
    is_admin: bool = False  # a sleap-rtc worker claiming its room's admin role


@dataclass(frozen=True, slots=True)
class CredentialKind:
    name: str
    fields: tuple[tuple[str, int], ...]  # required string fields and their length limits
    claims: Callable[[dict[str, Any]], bool]  # does this frame use this kind?
    read: Callable[[dict[str, Any]], Credential]
    needs_ids: bool = True  # peer_id and room_id required (else optional)


def _given(msg: dict[str, Any], name: str) -> bool:
    return msg.get(name) not in (None, "")


def _optional_token(msg: dict[str, Any]) -> str | None:
    token = msg.get("token")
    if token in (None, ""):
        return None
    if not isinstance(token, str) or len(token) > MAX_ID_LEN:
        raise E.ProtocolError(E.INVALID_MESSAGE, f"field 'token' must be a string of at most {MAX_ID_LEN} characters")
    return token


# Tried in order; the first that claims the frame reads it. The last claims every frame,
# so a frame with no credential at all is told what the v1/v2 kind misses.
CREDENTIALS: tuple[CredentialKind, ...] = (
    CredentialKind(
        "api_key", (("api_key", MAX_ID_LEN),),
        claims=lambda msg: _given(msg, "api_key") and not _given(msg, "id_token"),
        read=lambda msg: ApiKeyCredential(msg["api_key"]),
        needs_ids=False,
    ),
    CredentialKind(
        "jwt", (("jwt", MAX_TOKEN_LEN),),
        claims=lambda msg: _given(msg, "jwt") and not _given(msg, "id_token"),
        read=lambda msg: JwtCredential(msg["jwt"], _optional_token(msg)),
    ),
    CredentialKind(
        "room_token", (("token", MAX_ID_LEN), ("id_token", MAX_TOKEN_LEN)),
        claims=lambda msg: True,
        read=lambda msg: RoomTokenCredential(msg["token"], msg["id_token"]),
    ),
)
ROOM_FIELDS = (("peer_id", MAX_ID_LEN), ("room_id", MAX_ID_LEN))


def credential_kind(msg: dict[str, Any]) -> CredentialKind:
    return next(kind for kind in CREDENTIALS if kind.claims(msg))


def _check_strings(msg: dict[str, Any], fields: tuple[tuple[str, int], ...]) -> None:
    for name, limit in fields:
        value = msg.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > limit):
            raise E.ProtocolError(E.INVALID_MESSAGE, f"field '{name}' must be a string of at most {limit} characters")


def parse_register(msg: dict[str, Any]) -> RegisterRequest:
    """The request, or ProtocolError: MISSING_FIELDS naming every missing field, else
    INVALID_MESSAGE for the first field of the wrong type or length."""
    kind = credential_kind(msg)
    required = (ROOM_FIELDS if kind.needs_ids else ()) + kind.fields
    missing = [name for name, _ in required if msg.get(name) in (None, "")]
    if missing:
        raise E.ProtocolError(E.MISSING_FIELDS, "Missing required fields during registration: " + ", ".join(missing))
    _check_strings(msg, ROOM_FIELDS + kind.fields)
    role = msg.get("role")
    if role is None:
        role = "peer"
    elif not isinstance(role, str) or not role or len(role) > MAX_ID_LEN:
        raise E.ProtocolError(E.INVALID_MESSAGE, "field 'role' must be a non-empty string")
    is_admin = msg.get("is_admin", False)
    if not isinstance(is_admin, bool):
        raise E.ProtocolError(E.INVALID_MESSAGE, "field 'is_admin' must be true or false")
    metadata = md.validate(msg.get("metadata"))
    return RegisterRequest(msg.get("peer_id") or None, msg.get("room_id") or None, role, metadata,
                           kind.read(msg), is_admin)
