"""Where rooms live: one small async interface, memory, sqlite and Redis behind it.

Owns: room records (id, token hash, creator, expiry) and their persistence; which
store a `--store` option opens.
Never touches: live peers (rooms' actors own those), sockets.
"""

from __future__ import annotations

import os

from ..config import ConfigError, Settings
from .base import RoomRecord, Store, StoreFull, StoreUnavailable, bounded, hash_token, new_room


def open_store(settings: Settings) -> Store:
    from .memory import MemoryStore
    from .sqlite import SqliteStore

    if settings.store == "memory":
        return MemoryStore()
    if settings.store == "sqlite" or settings.store.startswith("sqlite:"):
        path = settings.store[len("sqlite:"):] if settings.store.startswith("sqlite:") else ""
        if not path:
            path = os.path.join(settings.data_dir, "signaling.sqlite3")
        return SqliteStore(path)
    if settings.store.startswith("redis://"):
        from .redis import RedisStore

        return RedisStore(settings.store)
    raise ConfigError(f"--store {settings.store!r}: unknown store scheme")


__all__ = ["RoomRecord", "Store", "StoreFull", "StoreUnavailable", "bounded", "hash_token", "new_room", "open_store"]
