"""What a message does to a room: the whole room protocol as a pure state machine.

Owns: the peers of one room, their metadata, subscriptions and reservations, and the
rule for every message type once a connection is in the room.
Never touches: sockets, trio, the store, the clock (time comes in as `now`, trio's
monotonic clock; `wall_offset` turns it into Unix seconds for the wire).

Every entry point returns `Effects`: frames to send to connections and connections to
close. Connections are opaque hashable keys; the actor in `signaling_trio._rooms` maps
them to real outboxes. Nothing here awaits, so a membership change is never interrupted.
"""

from __future__ import annotations

from collections import OrderedDict
from operator import attrgetter
from typing import Any, Hashable

import orjson

from . import errors as E
from . import metadata as md
from .filters import Filter, index_key
from .messages import dumps

Conn = Hashable
_NONE: frozenset[Any] = frozenset()  # the empty set every peer starts with, shared
MAX_TAG_SETS = 1024


class Peer:
    __slots__ = (
        "peer_id", "conn", "sub", "role", "metadata", "tags", "properties",
        "connected_at", "reserved_by", "reserved_until", "reserve_deadline",
        "holding", "subscription", "sub_filters", "sub_matches", "_public_json", "seq",
    )

    def __init__(self, peer_id: str, conn: Conn, sub: str, connected_at: float) -> None:
        self.peer_id = peer_id
        self.conn = conn
        self.sub = sub
        self.role = "peer"
        self.metadata: dict[str, Any] = {}
        self.tags: frozenset[Any] = _NONE
        self.properties: dict[str, Any] = {}
        self.connected_at = connected_at
        self.reserved_by: str | None = None
        self.reserved_until: float | None = None
        self.reserve_deadline: float | None = None
        # the two sets start as one shared empty frozenset (most peers never hold a
        # reservation or subscribe; an empty set is 216 bytes) and become sets when used
        self.holding: set[str] | frozenset[str] = _NONE
        self.subscription: Filter | None = None
        self.sub_filters: Any = None  # as the peer sent them (carried when the room moves)
        self.sub_matches: set[str] | frozenset[str] = _NONE
        self._public_json: str | None = None
        self.seq = 0

    def set_profile(self, role: str, metadata: dict[str, Any], tags: frozenset[Any]) -> None:
        self.role = role
        self.metadata = metadata
        self.tags = tags
        props = metadata.get("properties")
        self.properties = props if isinstance(props, dict) else {}
        self._public_json = None

    def public(self) -> dict[str, Any]:
        view: dict[str, Any] = {
            "peer_id": self.peer_id,
            "role": self.role,
            "metadata": self.metadata,
            "connected_at": self.connected_at,
        }
        if self.reserved_by is not None:
            view["reserved_by"] = self.reserved_by
            view["reserved_until"] = self.reserved_until
        return view

    @property
    def public_json(self) -> str:
        # Kept ready-made: discovery in a big room joins these strings, it does not
        # re-encode every peer on every request.
        if self._public_json is None:
            self._public_json = dumps(self.public())
        return self._public_json

    def touch(self) -> None:
        self._public_json = None


class Effects:
    __slots__ = ("sends", "closes", "routed", "dropped", "errors")

    def __init__(self) -> None:
        self.sends: list[tuple[Conn, str]] = []
        self.closes: list[tuple[Conn, int, str]] = []
        self.routed = 0
        self.dropped = 0
        self.errors: list[tuple[Conn, str]] = []

    def send(self, conn: Conn, msg: dict[str, Any] | str) -> None:
        self.sends.append((conn, msg if isinstance(msg, str) else dumps(msg)))

    def error(self, conn: Conn, exc: E.ProtocolError) -> None:
        self.errors.append((conn, exc.code))
        self.send(conn, exc.to_message())


def _event(kind: str, peer: Peer) -> str:
    return '{"type":"%s","peer":%s}' % (kind, peer.public_json)


def _peer_list(type_: str, head: dict[str, Any], peers: Any) -> str:
    # {"type":..., <head fields>, "peers":[...], "count":N} built from ready-made parts
    parts = dumps({"type": type_, **head})[:-1]
    items = [p.public_json for p in peers]
    return f'{parts},"peers":[{",".join(items)}],"count":{len(items)}}}'


MIN_RESERVATION = 1
MAX_RESERVATION = 3600
MAX_INDEXED_KEYS = 16
MAX_CACHED_QUERIES = 64
_by_seq = attrgetter("seq")


class RoomState:
    """One room's peers. Not thread-safe, not task-safe: exactly one actor owns it."""

    def __init__(
        self,
        room_id: str,
        *,
        max_peers: int = 1000,
        max_metadata_bytes: int = 16384,
        wall_offset: float = 0.0,
    ) -> None:
        self.room_id = room_id
        self.max_peers = max_peers
        self.max_metadata_bytes = max_metadata_bytes
        self.wall_offset = wall_offset
        self.peers: dict[str, Peer] = {}
        self.by_conn: dict[Conn, Peer] = {}
        self.subscribers: dict[str, Peer] = {}
        self.deadlines: dict[str, float] = {}  # reserved target -> trio deadline
        # Discovery: peers by role, and by property value for the keys filters have
        # asked about (built on first use, kept up to date after); and the answers to
        # recent filters, valid while `version` (bumped on every visible change) holds.
        self.version = 0
        self._seq = 0
        self._tag_sets: dict[frozenset[Any], frozenset[Any]] = {}  # one of each, shared by peers
        self._by_role: dict[str, dict[str, Peer]] = {}
        self._by_prop: dict[str, dict[Any, dict[str, Peer]]] = {}
        self._queries: OrderedDict[bytes, list[Any]] = OrderedDict()
        # Subscriptions and reservations, the state a room carries when it moves to another
        # instance (see `facts`/`carry`): bumped whenever they change.
        self.facts_version = 0
        self.carried: dict[str, Any] | None = None
        self.carry_deadline: float | None = None

    # ---------------------------------------------------------------- queries
    @property
    def empty(self) -> bool:
        return not self.peers

    def next_deadline(self) -> float | None:
        soonest = min(self.deadlines.values()) if self.deadlines else None
        if self.carry_deadline is not None and (soonest is None or self.carry_deadline < soonest):
            return self.carry_deadline
        return soonest

    def peer_sub(self, peer_id: str) -> str | None:
        peer = self.peers.get(peer_id)
        return peer.sub if peer else None

    def subs(self) -> set[str]:
        return {p.sub for p in self.peers.values()}

    def role_counts(self) -> dict[str, int]:
        return {role: len(members) for role, members in self._by_role.items()}

    # ---------------------------------------------------------------- register
    def register(
        self,
        conn: Conn,
        *,
        peer_id: str,
        sub: str,
        role: str,
        metadata: dict[str, Any],
        token: str,
        now: float,
        announce: bool = True,
    ) -> Effects:
        """A connection whose id_token and room token the caller has already checked.

        `announce=False` restores a peer that was already told it is registered (its room
        moved to another instance, see docs/SCALING.md): no second `registered_auth`."""
        fx = Effects()
        try:
            md.check_size(metadata, self.max_metadata_bytes)
            current = self.by_conn.get(conn)
            holder = self.peers.get(peer_id)
            if holder is not None and holder.conn is not conn and holder.sub != sub:
                raise E.ProtocolError(
                    E.PEER_ID_TAKEN, f"peer_id {peer_id!r} is already in use in this room"
                )
            frees = (current is not None and current.peer_id != peer_id) or holder is not None
            if len(self.peers) - (1 if frees else 0) >= self.max_peers:
                raise E.ProtocolError(
                    E.ROOM_FULL, f"room is full ({self.max_peers} peers)"
                )
        except E.ProtocolError as exc:
            exc.extra.setdefault("reason", exc.message)
            fx.error(conn, exc)
            return fx

        if current is not None and current.peer_id != peer_id:
            self._remove(current, fx)
        if holder is not None and holder.conn is not conn:
            # Same identity on a new connection: the new one takes over the peer,
            # its reservations included (a worker reconnecting before its dead
            # socket was noticed).
            fx.closes.append((holder.conn, E.CLOSE_REPLACED, "replaced"))
            del self.by_conn[holder.conn]
            self._drop_subscription(holder)
            holder.conn = conn
            self.by_conn[conn] = holder
        peer = self.peers.get(peer_id)
        joined = peer is None
        if peer is None:
            peer = Peer(peer_id, conn, sub, connected_at=round(now + self.wall_offset, 3))
            self._seq += 1
            peer.seq = self._seq
            self.peers[peer_id] = peer
            self.by_conn[conn] = peer
        else:
            self._unindex(peer)
        peer.sub = sub
        self._set_profile(peer, role, metadata)
        self._index(peer)
        if announce:
            fx.send(
                conn,
                {"type": "registered_auth", "room_id": self.room_id, "token": token, "peer_id": peer_id},
            )
        self._notify(peer, fx, "joined" if joined else "changed")
        if not announce and self.carried is not None:
            self._restore_facts(peer, now, fx)
        return fx

    # ------------------------------------------------------- moving rooms
    def facts(self) -> dict[str, Any]:
        """What a room's peers cannot rebuild by registering again: who subscribed to
        what (and which peers each subscriber knows of), and who holds whom until when
        (Unix seconds). Plain JSON data; `carry` takes it on the room's next instance."""
        subs = {
            p.peer_id: {"f": p.sub_filters, "m": sorted(p.sub_matches)}
            for p in self.subscribers.values()
        }
        res = {
            p.peer_id: [p.reserved_by, p.reserved_until]
            for p in self.peers.values() if p.reserved_by is not None
        }
        return {"subs": subs, "res": res}

    def carry(self, facts: dict[str, Any], now: float, window: float) -> Effects:
        """Take over the facts of this room's previous life (its instance died). They
        apply to each peer as it is restored (register with announce=False) for `window`
        seconds; then subscribers hear `peer_left` for the peers that never came back."""
        fx = Effects()
        if not isinstance(facts, dict):
            return fx
        self.carried = {"subs": dict(facts.get("subs") or {}), "res": dict(facts.get("res") or {}),
                        "restored": set()}
        self.carry_deadline = now + window
        # peers restored before the facts arrived (they are fetched while restores run)
        for peer in sorted(self.peers.values(), key=_by_seq):
            self._restore_facts(peer, now, fx)
        return fx

    def _restore_facts(self, peer: Peer, now: float, fx: Effects) -> None:
        carried = self.carried
        assert carried is not None
        carried["restored"].add(peer.peer_id)
        sub = carried["subs"].pop(peer.peer_id, None)
        if sub is not None and peer.subscription is None:
            try:
                flt, matches = self.query(sub.get("f"))
            except E.ProtocolError:
                flt = None
            if flt is not None:
                known = set(sub.get("m") or ())
                peer.subscription = flt
                peer.sub_filters = sub.get("f")
                self.subscribers[peer.peer_id] = peer
                self.facts_version += 1
                # peers it knew stay known (restored later: peer_updated, or peer_left if
                # they changed); what changed while the room moved is told now
                for other in matches.values():
                    if other is not peer and other.peer_id not in known:
                        fx.send(peer.conn, _event("peer_joined", other))
                for pid in list(known):
                    other = self.peers.get(pid)
                    if other is not None and pid not in matches:
                        known.discard(pid)
                        fx.send(peer.conn, _event("peer_left", other))
                peer.sub_matches = known
        # reservations whose holder and target are both back, and still running
        for target_id, entry in list(carried["res"].items()):
            try:
                holder_id, until = entry
                until = float(until)
            except (TypeError, ValueError):
                del carried["res"][target_id]
                continue
            if target_id not in carried["restored"] or holder_id not in carried["restored"]:
                continue
            del carried["res"][target_id]
            target, holder = self.peers.get(target_id), self.peers.get(holder_id)
            deadline = until - self.wall_offset
            if target is None or holder is None or target.reserved_by is not None or deadline <= now:
                continue
            self._hold(target, holder, until, deadline)
            self._notify(target, fx, "changed")

    def _end_carry(self, fx: Effects) -> None:
        """The window is over: peers that did not come back are gone for good."""
        self.carried = None
        self.carry_deadline = None
        for sub in list(self.subscribers.values()):
            for pid in [p for p in sub.sub_matches if p not in self.peers]:
                sub.sub_matches.discard(pid)
                fx.send(sub.conn, '{"type":"peer_left","peer":%s}' % dumps({"peer_id": pid}))
                self.facts_version += 1

    # ---------------------------------------------------------------- messages
    def handle(self, conn: Conn, msg: dict[str, Any], raw: str, now: float) -> Effects:
        """Any message type but register and ping, from `conn`."""
        fx = Effects()
        peer = self.by_conn.get(conn)
        try:
            if peer is None:
                raise E.ProtocolError(E.NOT_IN_ROOM, "Peer not registered in any room")
            handler = _HANDLERS.get(msg["type"])
            if handler is None:
                raise E.ProtocolError(
                    E.UNKNOWN_MESSAGE_TYPE, f"Unknown message type: {msg['type']}"
                )
            handler(self, peer, msg, raw, now, fx)
        except E.ProtocolError as exc:
            fx.error(conn, exc)
        return fx

    def _identity(self, peer: Peer, msg: dict[str, Any], field: str) -> None:
        claimed = msg.get(field)
        if claimed is not None and claimed != peer.peer_id:
            raise E.ProtocolError(
                E.SENDER_MISMATCH,
                f"'{field}' does not match the peer registered on this connection",
            )

    def _discover(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        self._identity(peer, msg, "from_peer_id")
        _, found = self.query(msg.get("filters"))
        if peer.peer_id in found:
            found = {k: v for k, v in found.items() if v is not peer}
        fx.send(peer.conn, _peer_list("peer_list", {"to_peer_id": peer.peer_id}, found.values()))

    # ------------------------------------------------------------- discovery
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
                found.sort(key=_by_seq)
            entry[1], entry[2] = self.version, {p.peer_id: p for p in found}
        return entry[0], entry[2]

    def _candidates(self, flt: Filter) -> tuple[Any, bool]:
        best: dict[str, Peer] = self.peers
        if flt.role is not None:
            by_role = self._by_role.get(flt.role, {})
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

    def _set_profile(self, peer: Peer, role: str, metadata: dict[str, Any]) -> None:
        """A peer's role and metadata. Its tag set is the room's one copy of that set
        (peers mostly send the same few tag lists; a frozenset is 216 bytes or more)."""
        tags = metadata.get("tags")
        tag_set = frozenset(tags) if isinstance(tags, list) and tags else _NONE
        shared = self._tag_sets.get(tag_set)
        if shared is None:
            if len(self._tag_sets) >= MAX_TAG_SETS:
                self._tag_sets.clear()
            shared = self._tag_sets[tag_set] = tag_set
        peer.set_profile(role, metadata, shared)

    def _index(self, peer: Peer) -> None:
        self._by_role.setdefault(peer.role, {})[peer.peer_id] = peer
        for key, index in self._by_prop.items():
            if key in peer.properties:
                ikey = index_key(peer.properties[key])
                if ikey is not None:
                    index.setdefault(ikey, {})[peer.peer_id] = peer
        self.version += 1

    def _unindex(self, peer: Peer) -> None:
        by_role = self._by_role.get(peer.role)
        if by_role is not None:
            by_role.pop(peer.peer_id, None)
            if not by_role:
                del self._by_role[peer.role]
        for key, index in self._by_prop.items():
            if key in peer.properties:
                ikey = index_key(peer.properties[key])
                bucket = index.get(ikey) if ikey is not None else None
                if bucket is not None:
                    bucket.pop(peer.peer_id, None)
                    if not bucket:
                        del index[ikey]
        self.version += 1

    def _update_metadata(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        self._identity(peer, msg, "peer_id")
        if "metadata" not in msg or msg["metadata"] is None:
            raise E.ProtocolError(E.MISSING_FIELDS, "Missing required fields: metadata")
        update = md.validate(msg["metadata"])
        merged = md.merge(peer.metadata, update)
        md.check_size(merged, self.max_metadata_bytes)
        self._unindex(peer)
        self._set_profile(peer, peer.role, merged)
        self._index(peer)
        fx.send(peer.conn, {"type": "metadata_updated", "peer_id": peer.peer_id, "metadata": merged})
        self._notify(peer, fx, "changed")

    def _peer_message(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        self._identity(peer, msg, "from_peer_id")
        missing = [f for f in ("to_peer_id", "payload") if f not in msg]
        if missing:
            raise E.ProtocolError(E.MISSING_FIELDS, f"Missing required fields: {', '.join(missing)}")
        to = msg["to_peer_id"]
        if not isinstance(to, str):
            raise E.ProtocolError(E.INVALID_MESSAGE, "field 'to_peer_id' must be a string")
        target = self.peers.get(to)
        if target is None:
            raise E.ProtocolError(E.PEER_NOT_IN_ROOM, f"Target peer {to} not in same room")
        fx.send(
            target.conn,
            {"type": "peer_message", "from_peer_id": peer.peer_id, "to_peer_id": to, "payload": msg["payload"]},
        )
        fx.routed += 1

    def _signal(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        self._identity(peer, msg, "sender")
        to = msg.get("target")
        if to is None:
            raise E.ProtocolError(E.MISSING_FIELDS, "Missing required fields: target")
        if not isinstance(to, str):
            raise E.ProtocolError(E.INVALID_MESSAGE, "field 'target' must be a string")
        target = self.peers.get(to)
        if target is None:
            # v2 dropped signalling to a peer that is gone without answering; a trickled
            # candidate racing a disconnect must not make a v2 client shut down.
            fx.dropped += 1
            return
        if msg.get("sender") == peer.peer_id:
            fx.send(target.conn, raw)  # as sent: no re-encoding
        else:
            fx.send(target.conn, {**msg, "sender": peer.peer_id})
        fx.routed += 1

    # ------------------------------------------------------------- presence
    def _subscribe(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        flt, matches = self.query(msg.get("filters"))
        found = [p for p in matches.values() if p is not peer]
        peer.subscription = flt
        peer.sub_filters = msg.get("filters")
        peer.sub_matches = {p.peer_id for p in found}
        self.subscribers[peer.peer_id] = peer
        self.facts_version += 1
        fx.send(peer.conn, _peer_list("subscribed", {}, found))

    def _unsubscribe(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        self._drop_subscription(peer)
        fx.send(peer.conn, {"type": "unsubscribed"})

    def _drop_subscription(self, peer: Peer) -> None:
        if self.subscribers.pop(peer.peer_id, None) is not None:
            self.facts_version += 1
        peer.subscription = None
        peer.sub_filters = None
        peer.sub_matches = _NONE

    def _notify(self, changed: Peer, fx: Effects, kind: str) -> None:
        """Tell every subscriber but `changed` itself how its match set moved."""
        pid = changed.peer_id
        for sub in list(self.subscribers.values()):
            if sub is changed:
                continue
            was = pid in sub.sub_matches
            now_matches = kind != "left" and sub.subscription.matches(changed)  # type: ignore[union-attr]
            if now_matches and not was:
                sub.sub_matches.add(pid)
                self.facts_version += 1
                fx.send(sub.conn, _event("peer_joined", changed))
            elif now_matches:
                fx.send(sub.conn, _event("peer_updated", changed))
            elif was:
                sub.sub_matches.discard(pid)
                self.facts_version += 1
                fx.send(sub.conn, _event("peer_left", changed))

    # ---------------------------------------------------------- reservations
    def _reserve(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        if "to_peer_id" not in msg or "duration_sec" not in msg:
            missing = [f for f in ("to_peer_id", "duration_sec") if f not in msg]
            raise E.ProtocolError(E.MISSING_FIELDS, f"Missing required fields: {', '.join(missing)}")
        to = msg["to_peer_id"]
        duration = msg["duration_sec"]
        if not isinstance(to, str):
            raise E.ProtocolError(E.INVALID_MESSAGE, "field 'to_peer_id' must be a string")
        if (
            isinstance(duration, bool)
            or not isinstance(duration, (int, float))
            or not MIN_RESERVATION <= duration <= MAX_RESERVATION
        ):
            raise E.ProtocolError(
                E.INVALID_MESSAGE,
                f"'duration_sec' must be a number from {MIN_RESERVATION} to {MAX_RESERVATION}",
            )
        flt = Filter(msg["filters"]) if msg.get("filters") is not None else None
        if to == peer.peer_id:
            raise E.ProtocolError(E.INVALID_MESSAGE, "a peer cannot reserve itself")
        target = self.peers.get(to)
        if target is None:
            raise E.ProtocolError(E.PEER_NOT_FOUND, f"Target peer {to} not found in room")
        if target.reserved_by is not None and target.reserved_by != peer.peer_id:
            raise E.ProtocolError(
                E.PEER_RESERVED,
                f"peer {to} is reserved until {target.reserved_until}",
                peer_id=to,
                reserved_until=target.reserved_until,
            )
        if flt is not None and not flt.matches(target, viewer=peer.peer_id):
            raise E.ProtocolError(E.PRECONDITION_FAILED, f"peer {to} does not match the filters")
        deadline = now + duration
        until = round(deadline + self.wall_offset, 3)
        self._hold(target, peer, until, deadline)
        fx.send(peer.conn, {"type": "reservation_granted", "peer_id": to, "reserved_until": until})
        fx.send(target.conn, {"type": "peer_reserved", "by": peer.peer_id, "reserved_until": until})
        self._notify(target, fx, "changed")

    def _release_msg(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        if "to_peer_id" not in msg:
            raise E.ProtocolError(E.MISSING_FIELDS, "Missing required fields: to_peer_id")
        to = msg["to_peer_id"]
        if not isinstance(to, str):
            raise E.ProtocolError(E.INVALID_MESSAGE, "field 'to_peer_id' must be a string")
        target = self.peers.get(to)
        if target is None or target.reserved_by != peer.peer_id:
            raise E.ProtocolError(
                E.PRECONDITION_FAILED, f"this peer holds no reservation on {to}"
            )
        self._release(target, "released", fx)
        fx.send(peer.conn, {"type": "reservation_released", "peer_id": to})

    def _hold(self, target: Peer, holder: Peer, until: float, deadline: float) -> None:
        """`holder` reserves `target` until `until` (Unix seconds; `deadline` on trio's clock)."""
        target.reserved_by = holder.peer_id
        target.reserved_until = until
        target.reserve_deadline = deadline
        target.touch()
        self.version += 1
        self.facts_version += 1
        if not holder.holding:
            holder.holding = set()
        holder.holding.add(target.peer_id)  # type: ignore[union-attr]
        self.deadlines[target.peer_id] = deadline

    def _release(self, target: Peer, reason: str, fx: Effects) -> None:
        holder_id = target.reserved_by
        assert holder_id is not None
        holder = self.peers.get(holder_id)
        if holder is not None and holder.holding:
            holder.holding.discard(target.peer_id)  # type: ignore[union-attr]
        target.reserved_by = None
        target.reserved_until = None
        target.reserve_deadline = None
        target.touch()
        self.version += 1
        self.facts_version += 1
        self.deadlines.pop(target.peer_id, None)
        fx.send(target.conn, {"type": "peer_released", "by": holder_id, "reason": reason})
        self._notify(target, fx, "changed")

    def expire(self, now: float) -> Effects:
        fx = Effects()
        for target_id, deadline in list(self.deadlines.items()):
            if deadline <= now:
                self._release(self.peers[target_id], "expired", fx)
        if self.carry_deadline is not None and self.carry_deadline <= now:
            self._end_carry(fx)
        return fx

    def _ping(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        fx.send(peer.conn, '{"type":"pong"}')

    # ---------------------------------------------------------------- leaving
    def leave(self, conn: Conn) -> Effects:
        fx = Effects()
        peer = self.by_conn.get(conn)
        if peer is not None:
            self._remove(peer, fx)
        return fx

    def kick(self, peer_id: str | None, code: int, reason: str) -> Effects:
        """Disconnect one peer (or all, with None) on the server's own initiative."""
        fx = Effects()
        victims = list(self.peers.values()) if peer_id is None else [self.peers[peer_id]] if peer_id in self.peers else []
        for peer in victims:
            fx.closes.append((peer.conn, code, reason))
            self._remove(peer, fx)
        return fx

    def _remove(self, peer: Peer, fx: Effects) -> None:
        del self.peers[peer.peer_id]
        del self.by_conn[peer.conn]
        self._unindex(peer)
        self._drop_subscription(peer)
        for target_id in list(peer.holding):
            target = self.peers.get(target_id)
            if target is not None and target.reserved_by == peer.peer_id:
                self._release(target, "holder_left", fx)
        peer.holding = _NONE
        if peer.reserved_by is not None:
            holder = self.peers.get(peer.reserved_by)
            if holder is not None and holder.holding:
                holder.holding.discard(peer.peer_id)  # type: ignore[union-attr]
            self.deadlines.pop(peer.peer_id, None)
        self._notify(peer, fx, "left")


_HANDLERS = {
    "discover_peers": RoomState._discover,
    "update_metadata": RoomState._update_metadata,
    "peer_message": RoomState._peer_message,
    "offer": RoomState._signal,
    "answer": RoomState._signal,
    "candidate": RoomState._signal,
    "subscribe": RoomState._subscribe,
    "unsubscribe": RoomState._unsubscribe,
    "reserve_peer": RoomState._reserve,
    "release_peer": RoomState._release_msg,
    "ping": RoomState._ping,
}
