"""Accounts for today's SLEAP-RTC programs: room owners and members, invites, account
keys, worker tokens and users' public keys (SPEC section 4).

Owns: what these are and the rules between them, kept as small JSON documents in the
store (`Store.get_doc/put_doc/delete_doc`), so every store (memory, sqlite, Redis) keeps
them the same way:

- `room-meta:<room>`: `{"name", "members": {sub: {"role", "joined_at"}}}` (the owner is
  the room record's creator and is listed as "owner");
- `user-rooms:<sub>`: `{"rooms": {room: {"role", "joined_at"}}}`;
- `account-key:<sha256 of the key>`: `{"sub", "id", "name", "created_at",
  "last_used_at", "revoked_at"}`, and `user-keys:<sub>`: `{"keys": {id: hash}}`;
- `worker-token:<sha256>`: `{"sub", "id", "room_id", "worker_name", "created_at",
  "expires_at", "revoked_at"}`, and `user-tokens:<sub>`: `{"tokens": {id: hash}}`;
- `invite:<code>`: `{"room_id", "expires_at"}`;
- `public-keys:<sub>`: `{"keys": {device: {"public_key", "username", "device_name"}}}`.

Secrets (account keys, worker tokens) are stored only as SHA-256 hashes and shown once,
when created. A document changed by two instances at the same moment keeps the later
write (rooms' membership changes are rare and made by people, not programs).
Never touches: sockets, live rooms.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .store import RoomRecord, Store, hash_token, new_room

ACCOUNT_KEY_PREFIX = "slp_acct_"
WORKER_TOKEN_PREFIX = "slp_"
NEVER = math.inf  # a room's expiry when it never expires (null on the wire)
INVITE_LIFETIME = 3600.0
MAX_ROOM_DAYS = 365
DEFAULT_ROOM_DAYS = 30
DAY = 86400.0


def wire_time(t: float | None) -> int | None:
    """Unix seconds for the wire; None for "never"."""
    return None if t is None or math.isinf(t) else int(t)


class AccountError(Exception):
    """A request the rules refuse: `status` is the HTTP status, `code` the error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True, slots=True)
class NewRoom:
    record: RoomRecord
    token: str  # the room token, shown once
    name: str


class Accounts:
    def __init__(self, store: Store) -> None:
        self.store = store

    # ------------------------------------------------------------------ rooms
    async def create_room(self, owner: str, name: str | None, expires_in_days: float | None) -> NewRoom:
        now = time.time()
        record, token = new_room(owner, now, NEVER if expires_in_days is None else now + expires_in_days * DAY)
        room_id = record.room_id
        await self.store.create_room(record)
        name = name or room_id
        await self.store.put_doc(f"room-meta:{room_id}", {"name": name, "members": {}})
        await self._note_membership(owner, room_id, "owner", now)
        return NewRoom(record, token, name)

    async def room_meta(self, room_id: str) -> dict[str, Any]:
        return await self.store.get_doc(f"room-meta:{room_id}") or {"name": room_id, "members": {}}

    async def role_in(self, record: RoomRecord, sub: str) -> str | None:
        """"owner", "member", or None for someone with no standing in the room."""
        if sub == record.creator:
            return "owner"
        meta = await self.room_meta(record.room_id)
        entry = meta["members"].get(sub)
        return entry["role"] if entry else None

    async def members(self, record: RoomRecord) -> dict[str, dict[str, Any]]:
        meta = await self.room_meta(record.room_id)
        everyone = {record.creator: {"role": "owner", "joined_at": record.created_at}}
        everyone.update({sub: e for sub, e in meta["members"].items() if sub != record.creator})
        return everyone

    async def rooms_of(self, sub: str) -> dict[str, dict[str, Any]]:
        doc = await self.store.get_doc(f"user-rooms:{sub}")
        return dict(doc["rooms"]) if doc else {}

    async def add_member(self, record: RoomRecord, sub: str) -> None:
        if await self.role_in(record, sub) is not None:
            return
        now = time.time()
        meta = await self.room_meta(record.room_id)
        meta["members"][sub] = {"role": "member", "joined_at": now}
        await self.store.put_doc(f"room-meta:{record.room_id}", meta)
        await self._note_membership(sub, record.room_id, "member", now)

    async def remove_member(self, record: RoomRecord, sub: str) -> bool:
        meta = await self.room_meta(record.room_id)
        if meta["members"].pop(sub, None) is None:
            return False
        await self.store.put_doc(f"room-meta:{record.room_id}", meta)
        await self._forget_membership(sub, record.room_id)
        return True

    async def rename(self, record: RoomRecord, name: str) -> None:
        meta = await self.room_meta(record.room_id)
        meta["name"] = name
        await self.store.put_doc(f"room-meta:{record.room_id}", meta)

    async def delete_room(self, record: RoomRecord) -> None:
        for sub in await self.members(record):
            await self._forget_membership(sub, record.room_id)
        await self.store.delete_doc(f"room-meta:{record.room_id}")
        await self.store.delete_room(record.room_id)

    async def _note_membership(self, sub: str, room_id: str, role: str, when: float) -> None:
        rooms = await self.rooms_of(sub)
        rooms[room_id] = {"role": role, "joined_at": when}
        await self.store.put_doc(f"user-rooms:{sub}", {"rooms": rooms})

    async def _forget_membership(self, sub: str, room_id: str) -> None:
        rooms = await self.rooms_of(sub)
        if rooms.pop(room_id, None) is not None:
            await self.store.put_doc(f"user-rooms:{sub}", {"rooms": rooms})

    # ---------------------------------------------------------------- invites
    async def invite(self, record: RoomRecord) -> tuple[str, float]:
        code = secrets.token_urlsafe(9)
        expires_at = time.time() + INVITE_LIFETIME
        await self.store.put_doc(f"invite:{code}", {"room_id": record.room_id, "expires_at": expires_at})
        return code, expires_at

    async def redeem(self, code: str) -> str:
        """The room an invite code is for (it stays valid for others until it expires)."""
        doc = await self.store.get_doc(f"invite:{code}")
        if doc is None:
            raise AccountError(404, "INVALID_INVITE", "no such invite code")
        if doc["expires_at"] <= time.time():
            await self.store.delete_doc(f"invite:{code}")
            raise AccountError(410, "INVITE_EXPIRED", "this invite code has expired; ask for a new one")
        return str(doc["room_id"])

    # ----------------------------------------------------------- account keys
    async def create_account_key(self, sub: str, name: str | None) -> tuple[str, dict[str, Any]]:
        key = ACCOUNT_KEY_PREFIX + secrets.token_urlsafe(24)  # 192 bits
        digest = hash_token(key)
        entry = {"sub": sub, "id": "acct_" + digest[:12], "name": name or "", "created_at": time.time(),
                 "last_used_at": None, "revoked_at": None}
        await self.store.put_doc(f"account-key:{digest}", entry)
        await self._index(f"user-keys:{sub}", "keys", entry["id"], digest)
        return key, entry

    async def account_keys(self, sub: str) -> list[dict[str, Any]]:
        return await self._listed(f"user-keys:{sub}", "keys", "account-key")

    async def revoke_account_key(self, sub: str, key_or_id: str) -> bool:
        return await self._revoke(f"user-keys:{sub}", "keys", "account-key", key_or_id)

    async def account_key_owner(self, key: str) -> str | None:
        """The user an account key belongs to; None if unknown or revoked."""
        doc_key = f"account-key:{hash_token(key)}"
        entry = await self.store.get_doc(doc_key)
        if entry is None or entry.get("revoked_at") is not None:
            return None
        now = time.time()
        if entry.get("last_used_at") is None or now - entry["last_used_at"] > 60:  # not a write per use
            entry["last_used_at"] = now
            await self.store.put_doc(doc_key, entry)
        return str(entry["sub"])

    # ---------------------------------------------------------- worker tokens
    async def create_worker_token(self, sub: str, record: RoomRecord, worker_name: str,
                                  expires_days: float | None) -> tuple[str, dict[str, Any]]:
        token = WORKER_TOKEN_PREFIX + secrets.token_urlsafe(24)
        digest = hash_token(token)
        now = time.time()
        entry = {"sub": sub, "id": "tok_" + digest[:12], "room_id": record.room_id, "worker_name": worker_name,
                 "created_at": now, "expires_at": None if expires_days is None else now + expires_days * DAY,
                 "revoked_at": None}
        await self.store.put_doc(f"worker-token:{digest}", entry)
        await self._index(f"user-tokens:{sub}", "tokens", entry["id"], digest)
        return token, entry

    async def worker_tokens(self, sub: str) -> list[dict[str, Any]]:
        return await self._listed(f"user-tokens:{sub}", "tokens", "worker-token")

    async def revoke_worker_token(self, sub: str, token_or_id: str) -> bool:
        return await self._revoke(f"user-tokens:{sub}", "tokens", "worker-token", token_or_id)

    async def delete_worker_token(self, sub: str, token_or_id: str) -> bool:
        digest = await self._find(f"user-tokens:{sub}", "tokens", token_or_id)
        if digest is None:
            return False
        await self.store.delete_doc(f"worker-token:{digest}")
        await self._unindex(f"user-tokens:{sub}", "tokens", digest)
        return True

    async def worker_token(self, token: str) -> dict[str, Any] | None:
        """A live worker token's entry; None if unknown, revoked or expired."""
        entry = await self.store.get_doc(f"worker-token:{hash_token(token)}")
        return entry if entry is not None and self.worker_token_live(entry) else None

    @staticmethod
    def worker_token_live(entry: dict[str, Any]) -> bool:
        if entry.get("revoked_at") is not None:
            return False
        return entry.get("expires_at") is None or entry["expires_at"] > time.time()

    # ------------------------------------------------------------ public keys
    async def add_public_key(self, sub: str, username: str, public_key: str, device_name: str) -> None:
        doc = await self.store.get_doc(f"public-keys:{sub}") or {"keys": {}}
        doc["keys"][device_name] = {"public_key": public_key, "username": username, "device_name": device_name}
        await self.store.put_doc(f"public-keys:{sub}", doc)

    async def authorized_keys(self, record: RoomRecord) -> list[dict[str, str]]:
        found = []
        for sub in await self.members(record):
            doc = await self.store.get_doc(f"public-keys:{sub}")
            if doc:
                found.extend(doc["keys"].values())
        return found

    # --------------------------------------------------------------- indexes
    async def _index(self, index: str, field: str, entry_id: str, digest: str) -> None:
        doc = await self.store.get_doc(index) or {field: {}}
        doc[field][entry_id] = digest
        await self.store.put_doc(index, doc)

    async def _unindex(self, index: str, field: str, digest: str) -> None:
        doc = await self.store.get_doc(index) or {field: {}}
        doc[field] = {i: d for i, d in doc[field].items() if d != digest}
        await self.store.put_doc(index, doc)

    async def _listed(self, index: str, field: str, kind: str) -> list[dict[str, Any]]:
        doc = await self.store.get_doc(index) or {field: {}}
        entries = []
        for digest in doc[field].values():
            entry = await self.store.get_doc(f"{kind}:{digest}")
            if entry is not None:
                entries.append(entry)
        return sorted(entries, key=lambda e: e["created_at"])

    async def _find(self, index: str, field: str, secret_or_id: str) -> str | None:
        """The digest of one of the user's own secrets, named by the secret or its id."""
        doc = await self.store.get_doc(index) or {field: {}}
        digests = doc[field]
        if secret_or_id in digests:
            return str(digests[secret_or_id])
        digest = hash_token(secret_or_id)
        return digest if digest in digests.values() else None

    async def _revoke(self, index: str, field: str, kind: str, secret_or_id: str) -> bool:
        digest = await self._find(index, field, secret_or_id)
        entry = await self.store.get_doc(f"{kind}:{digest}") if digest else None
        if entry is None:
            return False
        if entry.get("revoked_at") is None:
            entry["revoked_at"] = time.time()
            await self.store.put_doc(f"{kind}:{digest}", entry)
        return True
