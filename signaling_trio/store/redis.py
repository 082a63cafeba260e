"""The Redis store: rooms (and the local signing key) in a shared Redis, so that several
instances accept each other's tokens and rooms.

Keys are hash-tagged per room (`signaling:room:{<room_id>}`) so a Redis Cluster keeps each
room's keys on one slot. A room key expires on its own a day after the room does (the
`ROOM_EXPIRED` grace), so there is nothing to purge. Every call has a timeout; any
failure is `StoreUnavailable` (clients: STORE_UNAVAILABLE, /health: 503), and the client
reconnects by itself when Redis is back.

Live peers are not here: each room's live state is held by the instance that owns it
(`cluster/`; docs/SCALING.md), whose own keys are in `cluster/transport.py`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

import coredis
import coredis.exceptions
import orjson
import trio

from ..config import ConfigError
from .base import RoomRecord, StoreUnavailable

T = TypeVar("T")
PREFIX = "signaling"  # every key and channel of this server, store and cluster alike
GRACE = 86400  # seconds an expired room is kept (answers ROOM_EXPIRED)
KEY_NAME = f"{PREFIX}:signing-key"


def _doc_key(key: str) -> str:
    return f"{PREFIX}:doc:{key}"


def _room_key(room_id: str) -> str:
    return f"{PREFIX}:room:{{{room_id}}}"


async def redis_call(fn: Callable[[], Awaitable[T]], what: str, *, timeout: float) -> T:
    """One Redis round trip (or a few), bounded: any failure or a deadline passed is
    StoreUnavailable naming `what`. The one wrapper for every Redis call of the server."""
    try:
        with trio.fail_after(timeout):
            return await fn()
    except (coredis.exceptions.RedisError, trio.TooSlowError, OSError) as exc:
        raise StoreUnavailable(f"{what} cannot be reached ({type(exc).__name__})") from None


class RedisStore:
    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ConfigError(f"--store {url}: use redis://HOST:PORT/DB")
        try:
            db = int(parts.path.lstrip("/") or 0)
            port = parts.port or 6379
        except ValueError:
            raise ConfigError(f"--store {url}: use redis://HOST:PORT/DB") from None
        self.url = url
        self.timeout = timeout
        self._client = coredis.Redis(
            host=parts.hostname, port=port, db=db, password=parts.password,
            decode_responses=True, connect_timeout=timeout, stream_timeout=timeout,
        )
        self._entered = False

    @property
    def client(self) -> Any:
        """The coredis client, shared with the cluster layer (`cluster/transport.py`)."""
        return self._client

    async def __aenter__(self) -> "RedisStore":
        await self._client.__aenter__()
        self._entered = True
        return self

    async def __aexit__(self, *exc: Any) -> None:
        # No cancel scope of ours around this: the client's own scopes, opened in
        # __aenter__, close here, and must not end inside a newer one.
        # The exception in flight (if any) is not handed to the client: its task group
        # would re-raise it wrapped in a group; it propagates unchanged from here.
        if self._entered:
            self._entered = False
            await self._client.__aexit__(None, None, None)

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        return await redis_call(fn, f"redis store {self.url}", timeout=self.timeout + 1)


    async def create_room(self, room: RoomRecord) -> None:
        key = _room_key(room.room_id)
        fields = {"token_hash": room.token_hash, "creator": room.creator,
                  "created_at": repr(room.created_at), "expires_at": repr(room.expires_at)}

        async def go() -> None:
            await self._client.hset(key, fields)
            await self._expire(key, room.expires_at)

        await self._call(go)

    async def _expire(self, key: str, expires_at: float) -> None:
        """The key lapses GRACE after the room; a room that never expires keeps it."""
        if math.isinf(expires_at):
            await self._client.persist(key)
        else:
            await self._client.expireat(key, int(expires_at + GRACE))

    async def get_room(self, room_id: str, fresh: bool = False) -> RoomRecord | None:
        data = await self._call(lambda: self._client.hgetall(_room_key(room_id)))
        if not data:
            return None
        return RoomRecord(
            room_id, data["token_hash"], data["creator"], float(data["created_at"]), float(data["expires_at"])
        )

    async def set_expiry(self, room_id: str, expires_at: float) -> bool:
        key = _room_key(room_id)

        async def go() -> bool:
            if not await self._client.exists([key]):
                return False
            await self._client.hset(key, {"expires_at": repr(expires_at)})
            await self._expire(key, expires_at)
            return True

        return await self._call(go)

    async def delete_room(self, room_id: str) -> bool:
        return bool(await self._call(lambda: self._client.delete([_room_key(room_id)])))

    async def purge_expired(self, before: float) -> int:
        return 0  # Redis expires room keys itself, GRACE after the room

    async def get_doc(self, key: str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self._client.get(_doc_key(key)))
        return None if raw is None else orjson.loads(raw)

    async def put_doc(self, key: str, doc: dict[str, Any]) -> None:
        body = orjson.dumps(doc).decode()
        await self._call(lambda: self._client.set(_doc_key(key), body))

    async def delete_doc(self, key: str) -> bool:
        return bool(await self._call(lambda: self._client.delete([_doc_key(key)])))

    async def check(self) -> None:
        await self._call(lambda: self._client.set(f"{PREFIX}:health", repr(time.time()), ex=60))

    async def signing_key(self, new_pem: bytes) -> bytes:
        """The key every instance signs with: the first instance's wins (SET NX)."""

        async def go() -> bytes:
            await self._client.set(KEY_NAME, new_pem.decode(), condition=coredis.PureToken.NX)
            stored = await self._client.get(KEY_NAME)
            return str(stored).encode()

        return await self._call(go)

    async def aclose(self) -> None:
        await self.__aexit__(None, None, None)
