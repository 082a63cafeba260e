"""What every store shares: the room record, the interface, the errors, the deadline.

Owns: `RoomRecord`, `Store` (the interface), `StoreUnavailable`/`StoreFull`, `bounded`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, TypeVar

from .. import _nowait as nowait


class ClosingStore:
    """`async with` for stores that need nothing to open: exit means aclose()."""

    async def __aenter__(self) -> "ClosingStore":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()  # type: ignore[attr-defined]


class StoreUnavailable(Exception):
    """The store cannot be reached or written; clients get STORE_UNAVAILABLE / 503."""


class StoreFull(StoreUnavailable):
    """The store is reachable but out of space (a full disk); HTTP answers 507."""


@dataclass(frozen=True)
class RoomRecord:
    room_id: str
    token_hash: str
    creator: str
    created_at: float
    expires_at: float

    def token_matches(self, token: str) -> bool:
        return hmac.compare_digest(hash_token(token), self.token_hash)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_room(creator: str, created_at: float, expires_at: float) -> tuple[RoomRecord, str]:
    """A new room's record and its token (192 bits, shown once; only its hash is kept)."""
    token = secrets.token_urlsafe(24)
    return RoomRecord(secrets.token_hex(6), hash_token(token), creator, created_at, expires_at), token


T = TypeVar("T")
STORE_TIMEOUT = 5.0


async def bounded(fn: Callable[..., Awaitable[T]], *args: Any, timeout: float = STORE_TIMEOUT) -> T:
    """A store call with a deadline: no client ever waits on the store for longer, and a
    store too slow to answer is unavailable like one that failed."""
    # every register passes here, and most answer from RoomCache without waiting at all
    with nowait.within(timeout):
        return await fn(*args)
    raise StoreUnavailable(f"the store did not answer within {timeout:g} s")


class Store(Protocol):
    """Used as `async with store:` by the server, in its own task, around everything
    else; `__aexit__` closes it (bounded, and safe under cancellation)."""

    async def __aenter__(self) -> "Store": ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def create_room(self, room: RoomRecord) -> None: ...
    # fresh: past any cache (store/cache.py); a store itself always reads fresh
    async def get_room(self, room_id: str, fresh: bool = False) -> RoomRecord | None: ...
    async def set_expiry(self, room_id: str, expires_at: float) -> bool: ...
    async def delete_room(self, room_id: str) -> bool: ...
    async def purge_expired(self, before: float) -> int: ...
    async def check(self) -> None: ...
    # Documents: small JSON objects by key (accounts, members, keys, invites; see
    # signaling_trio/accounts.py). A missing key is None; put replaces.
    async def get_doc(self, key: str) -> dict[str, Any] | None: ...
    async def put_doc(self, key: str, doc: dict[str, Any]) -> None: ...
    async def delete_doc(self, key: str) -> bool: ...
    async def aclose(self) -> None: ...
