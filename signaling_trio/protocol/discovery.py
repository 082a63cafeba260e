"""Which peers of a room match a filter, fast: the room's discovery indexes.

Owns: peers by role; by property value for the property keys filters have asked about
(built on first use, kept up to date after); the answers to recent filters, valid while
`version` holds (bumped on every change a filter or a peer's public view can see); one
shared copy of each tag set.
Never touches: sockets, trio, the clock. The room (protocol/room.py) calls `add` and
`remove` around every change to a peer's profile, and `changed` for other visible ones.
"""

from __future__ import annotations

from collections import OrderedDict
from operator import attrgetter
from typing import Any

import orjson

from .filters import Filter, index_key
from .peer import EMPTY, Peer

MAX_INDEXED_KEYS = 16
MAX_CACHED_QUERIES = 64
MAX_TAG_SETS = 1024
by_join_order = attrgetter("seq")


class Discovery:
    def __init__(self, peers: dict[str, Peer]) -> None:
        self.peers = peers  # the room's own dict (read only here)
        self.version = 0
        self.by_role: dict[str, dict[str, Peer]] = {}
        self._by_prop: dict[str, dict[Any, dict[str, Peer]]] = {}
        self._tag_sets: dict[frozenset[Any], frozenset[Any]] = {}
        self._queries: OrderedDict[bytes, list[Any]] = OrderedDict()

    def changed(self) -> None:
        """Something a filter or a public view can see changed (cached answers are stale)."""
        self.version += 1

    def role_counts(self) -> dict[str, int]:
        return {role: len(members) for role, members in self.by_role.items()}

    def query(self, filters: Any) -> tuple[Filter, dict[str, Peer]]:
        """Every peer matching `filters`, in join order (the asker included: callers
        drop it). Answers come from an index when the filter names a role or an equal
        property, and from a cache while nothing in the room has changed."""
        try:
            key = orjson.dumps(filters, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # not JSON (only from direct callers): no caching
            key = None
        entry = self._queries.get(key) if key is not None else None
        if entry is None:
            flt = Filter(filters)
            entry = [flt, -1, {}]
            if key is not None:
                self._queries[key] = entry
                if len(self._queries) > MAX_CACHED_QUERIES:
                    self._queries.popitem(last=False)
        elif key is not None:
            self._queries.move_to_end(key)
        if entry[1] != self.version:
            flt = entry[0]
            candidates, indexed = self._candidates(flt)
            found = [p for p in candidates if flt.matches(p)]
            if indexed:
                found.sort(key=by_join_order)
            entry[1], entry[2] = self.version, {p.peer_id: p for p in found}
        return entry[0], entry[2]

    def _candidates(self, flt: Filter) -> tuple[Any, bool]:
        best: dict[str, Peer] = self.peers
        if flt.role is not None:
            by_role = self.by_role.get(flt.role, {})
            if len(by_role) < len(best):
                best = by_role
        for key, ikey in flt.eq_props:
            index = self._by_prop.get(key)
            if index is None:
                if len(self._by_prop) >= MAX_INDEXED_KEYS:
                    continue
                index = self._build_prop_index(key)
            bucket = index.get(ikey, {})
            if len(bucket) < len(best):
                best = bucket
        return best.values(), best is not self.peers

    def _build_prop_index(self, key: str) -> dict[Any, dict[str, Peer]]:
        index: dict[Any, dict[str, Peer]] = {}
        for p in self.peers.values():
            if key in p.properties:
                ikey = index_key(p.properties[key])
                if ikey is not None:
                    index.setdefault(ikey, {})[p.peer_id] = p
        self._by_prop[key] = index
        return index

    def set_profile(self, peer: Peer, role: str, metadata: dict[str, Any]) -> None:
        """A peer's role and metadata (between `remove` and `add`). Its tag set is the
        room's one copy of that set (peers mostly send the same few tag lists; a
        frozenset is 216 bytes or more)."""
        tags = metadata.get("tags")
        tag_set = frozenset(tags) if isinstance(tags, list) and tags else EMPTY
        shared = self._tag_sets.get(tag_set)
        if shared is None:
            if len(self._tag_sets) >= MAX_TAG_SETS:
                self._tag_sets.clear()
            shared = self._tag_sets[tag_set] = tag_set
        peer.set_profile(role, metadata, shared)

    def add(self, peer: Peer) -> None:
        self.by_role.setdefault(peer.role, {})[peer.peer_id] = peer
        for key, index in self._by_prop.items():
            if key in peer.properties:
                ikey = index_key(peer.properties[key])
                if ikey is not None:
                    index.setdefault(ikey, {})[peer.peer_id] = peer
        self.version += 1

    def remove(self, peer: Peer) -> None:
        by_role = self.by_role.get(peer.role)
        if by_role is not None:
            by_role.pop(peer.peer_id, None)
            if not by_role:
                del self.by_role[peer.role]
        for key, index in self._by_prop.items():
            if key in peer.properties:
                ikey = index_key(peer.properties[key])
                bucket = index.get(ikey) if ikey is not None else None
                if bucket is not None:
                    bucket.pop(peer.peer_id, None)
                    if not bucket:
                        del index[ikey]
        self.version += 1
