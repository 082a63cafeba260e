"""Registration: from a parsed `register` to a peer bound in its room.

Owns: what each kind of credential admits (a table, `Registrar.admits`: the credential's
type -> its check), the room record checks, leaving the previous room, handing the
Register to the room (wherever it lives) and waiting for its answer.
Never touches: sockets, a room's state (the room decides the rest: peer id taken, room
full; and sends `registered_auth` or the error itself).

The connection's side is `Registrant`: it says what it registered with before, and
leaves its room when asked. The result is a `Registration` the connection keeps.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import trio

from ._actors import PeerConnection, Register
from ._log import event
from ._router import RoomHandle, RoomRouter
from .auth import AuthError, Verifier
from .protocol import errors as E
from .protocol.registration import Credential, RegisterRequest, RoomTokenCredential
from .store import Store, StoreUnavailable, bounded

REPLY_TIMEOUT = 5.0  # a room (perhaps on another instance) answers a Register within this
OPEN_ATTEMPTS = 3  # a room that retires between look-up and send is started again


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified credential names, and a digest of the credential: "same credential
    again?" is all that is asked of it later (a JWT is a kilobyte; it is not kept)."""

    subject: str
    credential_digest: bytes


@dataclass(frozen=True, slots=True)
class Registration:
    """A peer bound in a room: what its connection keeps while it is in the room."""

    room: RoomHandle
    room_id: str
    peer_id: str


class Registrant(PeerConnection, Protocol):
    registration: Registration | None
    identity: Identity | None  # the last credential that registered on this connection

    async def leave_room(self) -> None: ...


def _unavailable(what: str) -> E.ProtocolError:
    return E.ProtocolError(E.STORE_UNAVAILABLE, what)


def digest_of(secret: str) -> bytes:
    return hashlib.blake2b(secret.encode(), digest_size=16).digest()


class Registrar:
    def __init__(self, verifier: Verifier, store: Store, router: RoomRouter) -> None:
        self.verifier = verifier
        self.store = store
        self.router = router
        self.admits: dict[type, Callable[[Registrant, RegisterRequest, Any], Awaitable[Identity]]] = {
            RoomTokenCredential: self._room_token,
        }

    async def register(self, conn: Registrant, req: RegisterRequest) -> Registration | None:
        """The peer's registration, or None when the room refused it (and told the peer
        why). ProtocolError for anything refused before the room."""
        identity = await self._admit(conn, req, req.credential)
        current = conn.registration
        if current is not None and current.room_id != req.room_id:
            await conn.leave_room()
        reply_send, reply_recv = trio.open_memory_channel[str | None](1)
        cmd = Register(conn, req.peer_id, identity.subject, req.role, req.metadata,
                       _room_token(req.credential), reply_send)
        room = await self._hand_over(req.room_id, cmd)
        bound = None
        with trio.move_on_after(REPLY_TIMEOUT) as waited:
            bound = await reply_recv.receive()
        if waited.cancelled_caught:
            room.register_abandoned(conn.id)
            raise _unavailable("the room did not answer in time; try again")
        if bound is None:
            return None
        conn.identity = identity
        self.router.note_peer(bound, req.room_id)
        event(logging.INFO, "register", conn=conn.id, peer_id=bound, room_id=req.room_id, role=req.role)
        return Registration(room, req.room_id, bound)

    async def _admit(self, conn: Registrant, req: RegisterRequest, credential: Credential) -> Identity:
        check = self.admits[type(credential)]
        return await check(conn, req, credential)

    async def _hand_over(self, room_id: str, cmd: Register) -> RoomHandle:
        for _attempt in range(OPEN_ATTEMPTS):
            try:
                room = await self.router.open(room_id)
                await room.send(cmd)
                return room
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue  # the room retired between look-up and send; a new one starts
            except StoreUnavailable:
                raise _unavailable("the room store cannot be reached; try again") from None
        raise _unavailable("room unavailable; try again")

    # ------------------------------------------------------------ credentials
    async def _jwt_identity(self, conn: Registrant, jwt: str) -> Identity:
        """Who the JWT names. A token this connection already registered with was
        verified then: a long-running worker re-registering after it expired keeps working."""
        digest = digest_of(jwt)
        if conn.identity is not None and conn.identity.credential_digest == digest:
            return conn.identity
        try:
            claims = await self.verifier.verify(jwt)
        except AuthError as exc:
            raise E.ProtocolError(E.INVALID_ID_TOKEN, str(exc)) from None
        return Identity(claims["sub"], digest)

    async def _room_token(self, conn: Registrant, req: RegisterRequest, cred: RoomTokenCredential) -> Identity:
        """v1/v2: a valid id_token, and the room's own token."""
        identity = await self._jwt_identity(conn, cred.id_token)
        try:
            record = await bounded(self.store.get_room, req.room_id)
        except StoreUnavailable:
            raise _unavailable("the room store cannot be reached; try again") from None
        if record is None:
            raise E.ProtocolError(E.ROOM_NOT_FOUND, f"Room {req.room_id} not found")
        if not record.token_matches(cred.token):
            raise E.ProtocolError(E.INVALID_ROOM_TOKEN, "Invalid room token")
        current = conn.registration
        already_here = current is not None and current.room_id == req.room_id
        if record.expires_at <= time.time() and not already_here:
            raise E.ProtocolError(E.ROOM_EXPIRED, f"Room {req.room_id} expired")
        return identity


def _room_token(credential: Credential) -> str:
    """The token `registered_auth` echoes back (v1/v2 clients read it)."""
    return credential.token
