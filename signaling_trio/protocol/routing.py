"""Messages a room routes from one peer to another: peer messages, WebRTC signals, a
peer's routed error, sleap-rtc's worker mesh; and the sender check they share.

Owns: each one's fields and what its target receives. Pure functions of the room's
peers (read only), the sender and the frame, adding to `Effects`; protocol/room.py's
handler table calls them.
Never touches: the room's other state, sockets, trio.
"""

from __future__ import annotations

from typing import Any

from . import errors as E
from .messages import dumps
from .peer import Effects, Peer


def check_identity(peer: Peer, msg: dict[str, Any], field: str) -> None:
    claimed = msg.get(field)
    if claimed is not None and claimed != peer.peer_id:
        raise E.ProtocolError(
            E.SENDER_MISMATCH,
            f"'{field}' does not match the peer registered on this connection",
        )


def peer_message(peers: dict[str, Peer], peer: Peer, msg: dict[str, Any], raw: str, fx: Effects) -> None:
    check_identity(peer, msg, "from_peer_id")
    missing = [f for f in ("to_peer_id", "payload") if f not in msg]
    if missing:
        raise E.ProtocolError(E.MISSING_FIELDS, f"Missing required fields: {', '.join(missing)}")
    to = msg["to_peer_id"]
    if not isinstance(to, str):
        raise E.ProtocolError(E.INVALID_MESSAGE, "field 'to_peer_id' must be a string")
    target = peers.get(to)
    if target is None:
        raise E.ProtocolError(E.PEER_NOT_IN_ROOM, f"Target peer {to} not in same room")
    fx.send(
        target.conn,
        {"type": "peer_message", "from_peer_id": peer.peer_id, "to_peer_id": to, "payload": msg["payload"]},
    )
    fx.routed += 1


def _target(peers: dict[str, Peer], msg: dict[str, Any], field: str, fx: Effects) -> Peer | None:
    """The peer `msg[field]` names; None (counted as dropped) when it is not in the room:
    v2 dropped signalling to a peer that is gone without answering, and a trickled
    candidate racing a disconnect must not make a v2 client shut down."""
    to = msg.get(field)
    if to is None:
        raise E.ProtocolError(E.MISSING_FIELDS, f"Missing required fields: {field}")
    if not isinstance(to, str):
        raise E.ProtocolError(E.INVALID_MESSAGE, f"field '{field}' must be a string")
    target = peers.get(to)
    if target is None:
        fx.dropped += 1
    return target


def signal(peers: dict[str, Peer], peer: Peer, msg: dict[str, Any], raw: str, fx: Effects) -> None:
    check_identity(peer, msg, "sender")
    target = _target(peers, msg, "target", fx)
    if target is None:
        return
    as_sent = msg.get("sender") == peer.peer_id
    if msg["type"] == "offer":  # the answerer learns who offers (sleap-rtc workers read it)
        if as_sent and "role" not in msg:  # the sent text (an object with "type"), the role appended
            fx.send(target.conn, f'{raw.rstrip()[:-1]},"role":{dumps(peer.role)}}}')
        else:
            fx.send(target.conn, {**msg, "sender": peer.peer_id, "role": peer.role})
    elif as_sent:
        fx.send(target.conn, raw)  # as sent: no re-encoding
    else:
        fx.send(target.conn, {**msg, "sender": peer.peer_id})
    fx.routed += 1


def mesh(peers: dict[str, Peer], peer: Peer, msg: dict[str, Any], raw: str, fx: Effects) -> None:
    """sleap-rtc's worker mesh: routed by `target_peer_id`, `from_peer_id` set here;
    `mesh_connect` reaches its target as `mesh_offer`."""
    target = _target(peers, msg, "target_peer_id", fx)
    if target is None:
        return
    kind = "mesh_offer" if msg["type"] == "mesh_connect" else msg["type"]
    fx.send(target.conn, {**msg, "type": kind, "from_peer_id": peer.peer_id})
    fx.routed += 1
