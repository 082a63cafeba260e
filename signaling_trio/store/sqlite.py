"""The embedded store: one sqlite file, used from one worker thread at a time.

sqlite3 blocks, so every call runs in trio.to_thread behind a CapacityLimiter(1): the
connection is only ever used by one thread at once, and the event loop never blocks.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from typing import Any, Callable, TypeVar

import orjson
import trio

from .base import ClosingStore, RoomRecord, StoreFull, StoreUnavailable

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    room_id    TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    creator    TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rooms_expires_at ON rooms (expires_at);
CREATE TABLE IF NOT EXISTS health (k INTEGER PRIMARY KEY, checked_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS docs (key TEXT PRIMARY KEY, body TEXT NOT NULL);
"""


class SqliteStore(ClosingStore):
    def __init__(self, path: str) -> None:
        self.path = path
        self._limiter = trio.CapacityLimiter(1)
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, timeout=2.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def job() -> T:
            try:
                return fn(self._connect())
            except (sqlite3.Error, OSError) as exc:
                kind = StoreFull if _is_full(exc) else StoreUnavailable
                raise kind(f"sqlite store {self.path}: {exc}") from exc

        # abandon_on_cancel: a caller's deadline fires even while sqlite is stuck (a
        # locked or stalled file); the thread keeps the limiter until it is done.
        return await trio.to_thread.run_sync(job, limiter=self._limiter, abandon_on_cancel=True)

    async def create_room(self, room: RoomRecord) -> None:
        await self._run(
            lambda db: db.execute(
                "INSERT INTO rooms VALUES (?, ?, ?, ?, ?)",
                (room.room_id, room.token_hash, room.creator, room.created_at, room.expires_at),
            )
        )

    async def get_room(self, room_id: str, fresh: bool = False) -> RoomRecord | None:
        def q(db: sqlite3.Connection) -> Any:
            return db.execute(
                "SELECT room_id, token_hash, creator, created_at, expires_at FROM rooms WHERE room_id = ?",
                (room_id,),
            ).fetchone()

        row = await self._run(q)
        return RoomRecord(*row) if row else None

    async def set_expiry(self, room_id: str, expires_at: float) -> bool:
        cur = await self._run(
            lambda db: db.execute("UPDATE rooms SET expires_at = ? WHERE room_id = ?", (expires_at, room_id))
        )
        return cur.rowcount > 0

    async def delete_room(self, room_id: str) -> bool:
        cur = await self._run(lambda db: db.execute("DELETE FROM rooms WHERE room_id = ?", (room_id,)))
        return cur.rowcount > 0

    async def purge_expired(self, before: float) -> int:
        cur = await self._run(lambda db: db.execute("DELETE FROM rooms WHERE expires_at < ?", (before,)))
        return cur.rowcount

    async def get_doc(self, key: str) -> dict[str, Any] | None:
        row = await self._run(lambda db: db.execute("SELECT body FROM docs WHERE key = ?", (key,)).fetchone())
        return None if row is None else orjson.loads(row[0])

    async def put_doc(self, key: str, doc: dict[str, Any]) -> None:
        body = orjson.dumps(doc).decode()
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO docs VALUES (?, ?)", (key, body)))

    async def delete_doc(self, key: str) -> bool:
        cur = await self._run(lambda db: db.execute("DELETE FROM docs WHERE key = ?", (key,)))
        return cur.rowcount > 0

    async def check(self) -> None:
        # A write, not just a read: a read-only file or a full disk must show as unhealthy.
        await self._run(
            lambda db: db.execute("INSERT OR REPLACE INTO health VALUES (1, ?)", (time.time(),))
        )

    async def aclose(self) -> None:
        def close(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        if self._db is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await trio.to_thread.run_sync(lambda: close(self._db), limiter=self._limiter)  # type: ignore[arg-type]


def _is_full(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)
