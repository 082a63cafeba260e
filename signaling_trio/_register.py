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
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import trio

from . import _nowait as nowait
from ._actors import PeerConnection, Register
from ._log import event
from ._router import RoomHandle, RoomRouter
from .accounts import ACCOUNT_KEY_PREFIX, Accounts
from .auth import AuthError, Verifier
from .ice import IceConfig
from .protocol import errors as E
from .protocol.registration import ApiKeyCredential, JwtCredential, RegisterRequest, RoomTokenCredential
from .store import RoomRecord, Store, StoreUnavailable, bounded

# A room (perhaps on another instance) answers a Register within this: the cluster's
# bound for a request through a room's move (cluster/link.REQUEST_DEADLINE), because a
# Register re-sent to a room's next owner is still answered, and an answer after the
# refusal would be a second answer.
REPLY_TIMEOUT = 15.0
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
    sleap_rtc: bool = False  # registered in today's sleap-rtc dialect (gets JSON pings)


class Registrant(PeerConnection, Protocol):
    registration: Registration | None
    identity: Identity | None  # the last credential that registered on this connection

    async def leave_room(self) -> None: ...


def _unavailable(what: str) -> E.ProtocolError:
    return E.ProtocolError(E.STORE_UNAVAILABLE, what)


def digest_of(secret: str) -> bytes:
    return hashlib.blake2b(secret.encode(), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class Admission:
    """What a credential admitted: who, to which room, and how registered_auth answers."""

    identity: Identity
    room_id: str
    echo_token: str | None  # the room token registered_auth echoes (None when none was used)
    sleap_rtc: bool  # today's sleap-rtc dialect: extended registered_auth, JSON pings


class Machine(Protocol):
    """This process's siblings on one machine (--workers: `_handoff.Hub`)."""

    def is_sibling(self, instance: str) -> bool: ...  # another process here we can hand to?
    def instances(self) -> list[str]: ...  # every process here, this one included


@dataclass(frozen=True, slots=True)
class MoveTo:
    """Admitted, and the room lives in a sibling process on this machine: the connection
    goes there (`_handoff`), and registers there with this admission."""

    instance: str
    admission: Admission


class Registrar:
    def __init__(self, verifier: Verifier, store: Store, router: RoomRouter, accounts: Accounts,
                 ice: IceConfig, machine: Machine | None = None) -> None:
        self.verifier = verifier
        self.store = store
        self.router = router
        self.accounts = accounts
        self.ice = ice
        self.machine = machine
        # one entry per credential kind (protocol/registration.CREDENTIALS)
        self.admits: dict[type, Callable[[Registrant, RegisterRequest, Any], Awaitable[Admission]]] = {
            RoomTokenCredential: self._room_token,
            JwtCredential: self._jwt,
            ApiKeyCredential: self._api_key,
        }

    async def register(self, conn: Registrant, req: RegisterRequest, *,
                       movable: bool = False) -> Registration | MoveTo | None:
        """The peer's registration, or None when the room refused it (and told the peer
        why), or MoveTo when a sibling process owns the room and the connection may move
        (`movable`: its first registration; a new room goes to this machine's processes in
        turn). ProtocolError for anything refused before the room."""
        admission = await self.admits[type(req.credential)](conn, req, req.credential)
        machine = self.machine
        if movable and machine is not None and conn.registration is None:
            # who owns it (a lease look-up), or who will
            await self._stored(self.router.open, admission.room_id, machine.instances())
            owner = self.router.owner_elsewhere(admission.room_id)
            if owner is not None and machine.is_sibling(owner):
                return MoveTo(owner, admission)
        return await self.enter(conn, req, admission)

    async def enter(self, conn: Registrant, req: RegisterRequest, admission: Admission) -> Registration | None:
        """Into the admitted room (here, or through its owner elsewhere)."""
        room_id, subject = admission.room_id, admission.identity.subject
        current = conn.registration
        if current is not None and current.room_id != room_id:
            await conn.leave_room()
            current = None
        peer_id = req.peer_id or (current.peer_id if current is not None else _new_peer_id(req.role))
        welcome = None
        if admission.sleap_rtc:
            servers = self.ice.servers_for(subject)
            welcome = {"ice_servers": servers, "mesh_ice_servers": servers}
        answer = nowait.Answer[str | None]()
        cmd = Register(conn, peer_id, subject, req.role, req.metadata, admission.echo_token, answer,
                       is_admin=req.is_admin, welcome=welcome)
        room = await self._hand_over(room_id, cmd)
        bound = None
        with nowait.within(REPLY_TIMEOUT) as waited:
            bound = await answer.receive()
        if waited.cancelled_caught:
            room.register_abandoned(conn.id)
            raise _unavailable("the room did not answer in time; try again")
        if bound is None:
            return None
        conn.identity = admission.identity
        self.router.note_peer(bound, room_id)
        event(logging.INFO, "register", conn=conn.id, peer_id=bound, room_id=room_id, role=req.role)
        return Registration(room, room_id, bound, admission.sleap_rtc)

    async def _hand_over(self, room_id: str, cmd: Register) -> RoomHandle:
        for _attempt in range(OPEN_ATTEMPTS):
            try:
                room = await self.router.open(room_id)
                await nowait.send(room, cmd)
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

    async def _room(self, conn: Registrant, room_id: str, token: str | None = None) -> RoomRecord:
        """The room's record: it exists, `token` (if given) is its token, and it has not
        expired (unless the peer is in it)."""
        record = await self._stored(self.store.get_room, room_id)
        if record is not None and self._refused(conn, record, token) is not None:
            # a kept copy may be stale (extended elsewhere): a refusal is the store's to say
            record = await self._stored(self.store.get_room, room_id, True)
        if record is None:
            raise E.ProtocolError(E.ROOM_NOT_FOUND, f"Room {room_id} not found")
        refusal = self._refused(conn, record, token)
        if refusal is not None:
            raise refusal
        return record

    @staticmethod
    def _refused(conn: Registrant, record: RoomRecord, token: str | None) -> E.ProtocolError | None:
        if token is not None and not record.token_matches(token):
            return E.ProtocolError(E.INVALID_ROOM_TOKEN, "Invalid room token")
        current = conn.registration
        already_here = current is not None and current.room_id == record.room_id
        if record.expires_at <= time.time() and not already_here:
            return E.ProtocolError(E.ROOM_EXPIRED, f"Room {record.room_id} expired")
        return None

    @staticmethod
    async def _stored(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        try:
            return await bounded(fn, *args)
        except StoreUnavailable:
            raise _unavailable("the room store cannot be reached; try again") from None

    async def _room_token(self, conn: Registrant, req: RegisterRequest, cred: RoomTokenCredential) -> Admission:
        """v1/v2: a valid id_token, and the room's own token."""
        identity = await self._jwt_identity(conn, cred.id_token)
        assert req.room_id is not None  # (required for this kind)
        await self._room(conn, req.room_id, cred.token)
        return Admission(identity, req.room_id, cred.token, sleap_rtc=False)

    async def _jwt(self, conn: Registrant, req: RegisterRequest, cred: JwtCredential) -> Admission:
        """sleap-rtc clients: a valid JWT of the room's owner or a member (or of anyone
        who also gives the room's token)."""
        identity = await self._jwt_identity(conn, cred.jwt)
        assert req.room_id is not None
        record = await self._room(conn, req.room_id)
        role = await self._stored(self.accounts.role_in, record, identity.subject)
        if role is None and not (cred.token is not None and record.token_matches(cred.token)):
            raise E.ProtocolError(E.ROOM_ACCESS_DENIED, f"you are not a member of room {req.room_id}")
        return Admission(identity, req.room_id, cred.token, sleap_rtc=True)

    async def _api_key(self, conn: Registrant, req: RegisterRequest, cred: ApiKeyCredential) -> Admission:
        """sleap-rtc workers: an account key admits its user to the rooms they own or
        belong to; a worker token to its own room."""
        digest = digest_of(cred.api_key)
        if cred.api_key.startswith(ACCOUNT_KEY_PREFIX):
            sub = await self._stored(self.accounts.account_key_owner, cred.api_key)
            if sub is None:
                raise E.ProtocolError(E.INVALID_API_KEY, "unknown or revoked account key")
            if req.room_id is None:
                raise E.ProtocolError(E.MISSING_FIELDS, "Missing required fields during registration: room_id")
            room_id = req.room_id
        else:
            entry = await self._stored(self.accounts.worker_token, cred.api_key)
            if entry is None:
                raise E.ProtocolError(E.INVALID_API_KEY, "unknown, revoked or expired worker token")
            sub, room_id = entry["sub"], entry["room_id"]
            if req.room_id not in (None, room_id):
                raise E.ProtocolError(E.ROOM_ACCESS_DENIED, "this worker token is for another room")
        record = await self._room(conn, room_id)
        if await self._stored(self.accounts.role_in, record, sub) is None:
            raise E.ProtocolError(E.ROOM_ACCESS_DENIED, f"the key's owner is not a member of room {room_id}")
        return Admission(Identity(sub, digest), room_id, None, sleap_rtc=True)


def _new_peer_id(role: str) -> str:
    return f"{role[:16]}-{secrets.token_hex(4)}"
