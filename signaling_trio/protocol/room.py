"""What a message does to a room: the whole room protocol as a pure state machine.

Owns: the peers of one room, their metadata, subscriptions and reservations, and the
rule for every message type once a connection is in the room.
Never touches: sockets, trio, the store, the clock (time comes in as `now`, trio's
monotonic clock; `wall_offset` turns it into Unix seconds for the wire).

Every entry point returns `Effects` (protocol/peer.py): frames to send to connections
and connections to close. Connections are opaque hashable keys; the room's actor
(`signaling_trio._actors`) maps them to real outboxes. Nothing here awaits, so a
membership change is never interrupted. Beside it: `discovery.py` (the indexes that
answer filters) and `handover.py` (what the room hands over when it moves).
"""

from __future__ import annotations

from typing import Any, Callable

from . import errors as E
from . import metadata as md
from . import routing
from .discovery import Discovery, by_join_order
from .filters import Filter
from .handover import PendingHandover, Reservation, Subscription, snapshot
from .messages import dumps
from .peer import EMPTY, Conn, Effects, Peer, event_json, peer_list_json
from .routing import check_identity

Handler = Callable[["RoomState", Peer, dict[str, Any], str, float, Effects], None]

MIN_RESERVATION = 1
MAX_RESERVATION = 3600


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
        self.index = Discovery(self.peers)
        self._seq = 0  # join order
        # Subscriptions and reservations, what the room hands over when it moves to
        # another instance (handover.py): bumped whenever they change.
        self.handover_version = 0
        self.pending: PendingHandover | None = None  # a previous life's, while its peers come back
        self.admin: str | None = None  # the sleap-rtc admin worker's peer id

    @property
    def handover_deadline(self) -> float | None:
        return self.pending.deadline if self.pending is not None else None

    # ---------------------------------------------------------------- queries
    @property
    def empty(self) -> bool:
        return not self.peers

    def next_deadline(self) -> float | None:
        soonest = min(self.deadlines.values()) if self.deadlines else None
        handover = self.handover_deadline
        if handover is not None and (soonest is None or handover < soonest):
            return handover
        return soonest

    def peer_subject(self, peer_id: str) -> str | None:
        peer = self.peers.get(peer_id)
        return peer.subject if peer else None

    def subjects(self) -> set[str]:
        return {p.subject for p in self.peers.values()}

    def role_counts(self) -> dict[str, int]:
        return self.index.role_counts()

    def query(self, filters: Any) -> tuple[Filter, dict[str, Peer]]:
        return self.index.query(filters)

    # ---------------------------------------------------------------- register
    def register(
        self,
        conn: Conn,
        *,
        peer_id: str,
        subject: str,
        role: str,
        metadata: dict[str, Any],
        token: str | None,
        now: float,
        announce: bool = True,
        is_admin: bool = False,
        welcome: dict[str, Any] | None = None,
        restored: bool = False,
    ) -> Effects:
        """A connection whose credential the caller has already checked; `subject` is who
        it says the peer is (a peer id in use by another subject is refused).

        `announce=False` restores a peer that was already told it is registered (its room
        moved to another instance, see docs/SCALING.md): no second `registered_auth`.
        A restored peer (`announce=False`, or `restored`: a re-register that crossed the
        move) takes back what the handover holds for it; a fresh registration does not.
        `welcome` (sleap-rtc registrations) makes `registered_auth` carry the room's admin
        and other workers besides it; `is_admin` claims the admin role if it is free
        (a peer already in the room that claims it in vain also gets `admin_conflict`)."""
        fx = Effects()
        try:
            self._admit(conn, peer_id, subject, metadata)
        except E.ProtocolError as exc:
            exc.extra.setdefault("reason", exc.message)
            fx.error(conn, exc)
            return fx
        peer, joined = self._place(conn, peer_id, subject, now, fx)
        self.index.set_profile(peer, role, metadata)
        self.index.add(peer)
        conflict = is_admin and not self._claim_admin(peer)
        if announce:
            fx.send(conn, self._registered(peer, token, welcome))
            # A peer's first registration learns the admin from registered_auth; sleap-rtc
            # 0.0.7 workers answer an admin_conflict there by reconnecting, and register
            # again with is_admin: a loop (docs/SLEAP-RTC.md). A re-register is told.
            if conflict and not joined:
                fx.send(conn, {"type": "admin_conflict", "current_admin": self.admin})
        self._notify(peer, fx, "joined" if joined else "changed")
        if (restored or not announce) and self.pending is not None:
            self._restore_handover(peer, now, fx)
        return fx

    def _place(self, conn: Conn, peer_id: str, subject: str, now: float, fx: Effects) -> tuple[Peer, bool]:
        """The peer this registration is (new, or the same peer again: taken over from
        another connection of the same subject, or re-registered); True if new."""
        current = self.by_conn.get(conn)
        if current is not None and current.peer_id != peer_id:
            self._remove(current, fx)
        holder = self.peers.get(peer_id)
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
            peer = Peer(peer_id, conn, subject, connected_at=round(now + self.wall_offset, 3))
            self._seq += 1
            peer.seq = self._seq
            self.peers[peer_id] = peer
            self.by_conn[conn] = peer
        else:
            self.index.remove(peer)
        peer.subject = subject
        return peer, joined

    def _claim_admin(self, peer: Peer) -> bool:
        """The room's admin role (sleap-rtc's first worker): True if `peer` holds it now."""
        if self.admin is None or self.admin == peer.peer_id or self.admin not in self.peers:
            self.admin = peer.peer_id
        return self.admin == peer.peer_id

    def _registered(self, peer: Peer, token: str | None, welcome: dict[str, Any] | None) -> dict[str, Any]:
        answer: dict[str, Any] = {"type": "registered_auth", "room_id": self.room_id, "token": token,
                                  "peer_id": peer.peer_id}
        if welcome is not None:
            workers = [p for p in self.index.by_role.get("worker", {}).values() if p is not peer]
            answer["admin_peer_id"] = self.admin
            answer["peer_list"] = [p.peer_id for p in workers]
            answer["peer_metadata"] = {p.peer_id: p.metadata for p in workers}
            answer.update(welcome)
        return answer

    def _admit(self, conn: Conn, peer_id: str, subject: str, metadata: dict[str, Any]) -> None:
        """ProtocolError when the room cannot take this registration as it is now."""
        md.check_size(metadata, self.max_metadata_bytes)
        current = self.by_conn.get(conn)
        holder = self.peers.get(peer_id)
        if holder is not None and holder.conn is not conn and holder.subject != subject:
            raise E.ProtocolError(E.PEER_ID_TAKEN, f"peer_id {peer_id!r} is already in use in this room")
        frees = (current is not None and current.peer_id != peer_id) or holder is not None
        if len(self.peers) - (1 if frees else 0) >= self.max_peers:
            raise E.ProtocolError(E.ROOM_FULL, f"room is full ({self.max_peers} peers)")

    # ------------------------------------------------------- moving rooms
    def handover(self) -> dict[str, Any]:
        """What this room's peers could not rebuild by registering again, as plain JSON
        data (handover.py); `take_over` takes it on the room's next instance."""
        return snapshot(self.peers.values(), self.subscribers.values())

    def take_over(self, data: Any, now: float, window: float) -> Effects:
        """Take over the handover of this room's previous life (its instance died). It
        applies to each peer as it is restored (register with announce=False) for
        `window` seconds; then subscribers hear `peer_left` for the peers that never came
        back. Anything that is not a handover is ignored."""
        fx = Effects()
        self.pending = PendingHandover.parse(data, now + window)
        if self.pending is not None:
            # peers restored before the handover arrived (it is read while restores run)
            for peer in sorted(self.peers.values(), key=by_join_order):
                self._restore_handover(peer, now, fx)
        return fx

    def _restore_handover(self, peer: Peer, now: float, fx: Effects) -> None:
        assert self.pending is not None
        subscription, due = self.pending.restore(peer.peer_id)
        if subscription is not None and peer.subscription is None:
            self._resubscribe(peer, subscription, fx)
        for reservation in due:
            self._rehold(reservation, now, fx)

    def _resubscribe(self, peer: Peer, subscription: Subscription, fx: Effects) -> None:
        try:
            flt, matches = self.query(subscription.filters)
        except E.ProtocolError:
            return
        known = subscription.known
        peer.subscription = flt
        peer.subscribed_with = subscription.filters
        self.subscribers[peer.peer_id] = peer
        self.handover_version += 1
        # peers it knew stay known (restored later: peer_updated, or peer_left if they
        # changed); what changed while the room moved is told now
        for other in matches.values():
            if other is not peer and other.peer_id not in known:
                fx.send(peer.conn, event_json("peer_joined", other))
        for pid in list(known):
            other = self.peers.get(pid)
            if other is not None and pid not in matches:
                known.discard(pid)
                fx.send(peer.conn, event_json("peer_left", other))
        peer.known = known

    def _rehold(self, reservation: Reservation, now: float, fx: Effects) -> None:
        """A reservation of the previous life, its holder and target both back."""
        target, holder = self.peers.get(reservation.target), self.peers.get(reservation.holder)
        deadline = reservation.until - self.wall_offset
        if target is None or holder is None or target.reserved_by is not None or deadline <= now:
            return
        self._hold(target, holder, reservation.until, deadline)
        self._notify(target, fx, "changed")

    def _end_handover(self, fx: Effects) -> None:
        """The window is over: peers that did not come back are gone for good."""
        self.pending = None
        for sub in list(self.subscribers.values()):
            for pid in [p for p in sub.known if p not in self.peers]:
                sub.known.discard(pid)
                fx.send(sub.conn, '{"type":"peer_left","peer":%s}' % dumps({"peer_id": pid}))
                self.handover_version += 1

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

    def _discover(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        check_identity(peer, msg, "from_peer_id")
        _, found = self.query(msg.get("filters"))
        if peer.peer_id in found:
            found = {k: v for k, v in found.items() if v is not peer}
        fx.send(peer.conn, peer_list_json("peer_list", {"to_peer_id": peer.peer_id}, found.values()))

    def _update_metadata(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        check_identity(peer, msg, "peer_id")
        if "metadata" not in msg or msg["metadata"] is None:
            raise E.ProtocolError(E.MISSING_FIELDS, "Missing required fields: metadata")
        update = md.validate(msg["metadata"])
        merged = md.merge(peer.metadata, update)
        md.check_size(merged, self.max_metadata_bytes)
        self.index.remove(peer)
        self.index.set_profile(peer, peer.role, merged)
        self.index.add(peer)
        fx.send(peer.conn, {"type": "metadata_updated", "peer_id": peer.peer_id, "metadata": merged})
        self._notify(peer, fx, "changed")

    # ------------------------------------------------------------- presence
    def _subscribe(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        flt, matches = self.query(msg.get("filters"))
        found = [p for p in matches.values() if p is not peer]
        peer.subscription = flt
        peer.subscribed_with = msg.get("filters")
        peer.known = {p.peer_id for p in found}
        self.subscribers[peer.peer_id] = peer
        self.handover_version += 1
        fx.send(peer.conn, peer_list_json("subscribed", {}, found))

    def _unsubscribe(self, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        self._drop_subscription(peer)
        fx.send(peer.conn, {"type": "unsubscribed"})

    def _drop_subscription(self, peer: Peer) -> None:
        if self.subscribers.pop(peer.peer_id, None) is not None:
            self.handover_version += 1
        peer.subscription = None
        peer.subscribed_with = None
        peer.known = EMPTY

    def _notify(self, changed: Peer, fx: Effects, kind: str) -> None:
        """Tell every subscriber but `changed` itself how its match set moved."""
        pid = changed.peer_id
        for sub in list(self.subscribers.values()):
            if sub is changed:
                continue
            was = pid in sub.known
            now_matches = kind != "left" and sub.subscription.matches(changed)  # type: ignore[union-attr]
            if now_matches and not was:
                sub.known.add(pid)
                self.handover_version += 1
                fx.send(sub.conn, event_json("peer_joined", changed))
            elif now_matches:
                fx.send(sub.conn, event_json("peer_updated", changed))
            elif was:
                sub.known.discard(pid)
                self.handover_version += 1
                fx.send(sub.conn, event_json("peer_left", changed))

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
        self.index.changed()
        self.handover_version += 1
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
        self.index.changed()
        self.handover_version += 1
        self.deadlines.pop(target.peer_id, None)
        fx.send(target.conn, {"type": "peer_released", "by": holder_id, "reason": reason})
        self._notify(target, fx, "changed")

    def expire(self, now: float) -> Effects:
        fx = Effects()
        for target_id, deadline in list(self.deadlines.items()):
            if deadline <= now:
                self._release(self.peers[target_id], "expired", fx)
        if self.pending is not None and self.pending.deadline <= now:
            self._end_handover(fx)
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
        victims = (
            list(self.peers.values()) if peer_id is None else [self.peers[peer_id]] if peer_id in self.peers else []
        )
        for peer in victims:
            fx.closes.append((peer.conn, code, reason))
            self._remove(peer, fx)
        return fx

    def _remove(self, peer: Peer, fx: Effects) -> None:
        del self.peers[peer.peer_id]
        del self.by_conn[peer.conn]
        self.index.remove(peer)
        if self.admin == peer.peer_id:
            self.admin = None
        self._drop_subscription(peer)
        for target_id in list(peer.holding):
            target = self.peers.get(target_id)
            if target is not None and target.reserved_by == peer.peer_id:
                self._release(target, "holder_left", fx)
        peer.holding = EMPTY
        if peer.reserved_by is not None:
            holder = self.peers.get(peer.reserved_by)
            if holder is not None and holder.holding:
                holder.holding.discard(peer.peer_id)  # type: ignore[union-attr]
            self.deadlines.pop(peer.peer_id, None)
        self._notify(peer, fx, "left")


def _routed(route: Callable[[dict[str, Peer], Peer, dict[str, Any], str, Effects], None]) -> Handler:
    def handle(state: RoomState, peer: Peer, msg: dict[str, Any], raw: str, now: float, fx: Effects) -> None:
        route(state.peers, peer, msg, raw, fx)

    return handle


_HANDLERS: dict[str, Handler] = {
    "discover_peers": RoomState._discover,
    "update_metadata": RoomState._update_metadata,
    "peer_message": _routed(routing.peer_message),
    "offer": _routed(routing.signal),
    "answer": _routed(routing.signal),
    "candidate": _routed(routing.signal),
    "error": _routed(routing.signal),  # a worker's refusal of an offer (worker_busy), to its sender
    "mesh_connect": _routed(routing.mesh),
    "mesh_answer": _routed(routing.mesh),
    "ice_candidate": _routed(routing.mesh),
    "subscribe": RoomState._subscribe,
    "unsubscribe": RoomState._unsubscribe,
    "reserve_peer": RoomState._reserve,
    "release_peer": RoomState._release_msg,
    "ping": RoomState._ping,
}
