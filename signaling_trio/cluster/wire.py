"""What instances say to each other: one frozen dataclass per kind of item.

Items travel in batches on the receiving instance's channel. On the wire an item is a
JSON array, its kind's tag first and then the fields in declaration order; the tag
says who it is for:

- to a room's **owner** (from the instance where the connection lives): `Join`,
  `Send`, `Part`, `Present`, `Ask`;
- to a connection's **home** instance (from the owner): `Deliver`, `Close`, `Joined`,
  `NotOwner`, `Unknown`, `Answer`, `Bounce`, `LetGo`, `Result`.

`cid` is a connection's id on its home instance; `req` numbers a Register or an HTTP
call, `seq` a request the room answers (first answer wins at the home).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

import orjson


# ------------------------------------------------------------ to a room's owner
@dataclass(frozen=True, slots=True)
class Join:
    """Register (or restore) connection `cid` in the room; answered by `Joined` or `NotOwner`."""

    room_id: str
    cid: int
    req: int
    peer_id: str
    subject: str
    role: str
    metadata: dict[str, Any]
    token: str | None
    announce: bool  # False: a restore after a move (the peer gets no second registered_auth)
    is_admin: bool = False
    welcome: dict[str, Any] | None = None
    restored: bool = False  # the peer was in the room before it moved (see Register)


@dataclass(frozen=True, slots=True)
class Send:
    """A frame for the room from connection `cid`; `seq` set when the room answers it."""

    room_id: str
    cid: int
    raw: str
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Part:
    """Connection `cid` left the room."""

    room_id: str
    cid: int


@dataclass(frozen=True, slots=True)
class Present:
    """Heartbeat: exactly these connections of the sender are in the room."""

    room_id: str
    cids: list[int]


@dataclass(frozen=True, slots=True)
class Ask:
    """An HTTP handler's question for the room (a `CALLS` operation); answered by `Result`."""

    room_id: str
    req: int
    op: str
    args: list[Any]


# -------------------------------------------------------- to a connection's home
@dataclass(frozen=True, slots=True)
class Deliver:
    """A frame the room sends to connection `cid`."""

    room_id: str
    cid: int
    text: str


@dataclass(frozen=True, slots=True)
class Close:
    room_id: str
    cid: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Joined:
    """The answer to `Join` number `req`: the peer id now bound, or None (refused), and
    everything the room said to `cid` while registering it (registered_auth, or the
    error): its home gives these to the peer only if it still waits for this `req`."""

    room_id: str
    cid: int
    req: int
    peer_id: str | None
    texts: list[str] | None = None


@dataclass(frozen=True, slots=True)
class NotOwner:
    """`Join` number `req` reached an instance that does not run the room (`owner`: who
    the lease names, None if it could not tell)."""

    room_id: str
    cid: int
    req: int
    owner: str | None


@dataclass(frozen=True, slots=True)
class Unknown:
    """The owner does not know these connections: their home restores them."""

    room_id: str
    cids: list[int]


@dataclass(frozen=True, slots=True)
class Answer:
    """Everything the room said to `cid` while handling its request `seq`."""

    room_id: str
    cid: int
    seq: int
    texts: list[str]


@dataclass(frozen=True, slots=True)
class Bounce:
    """Request `seq` reached an instance that could not take it: send it again."""

    room_id: str
    cid: int
    seq: int


@dataclass(frozen=True, slots=True)
class LetGo:
    """The owner is stopping and has released the room: follow it now."""

    room_id: str


@dataclass(frozen=True, slots=True)
class Result:
    """The answer to `Ask` number `req`."""

    req: int
    value: Any


Item = (
    Join
    | Send
    | Part
    | Present
    | Ask
    | Deliver
    | Close
    | Joined
    | NotOwner
    | Unknown
    | Answer
    | Bounce
    | LetGo
    | Result
)

TAGS: dict[type, str] = {
    Join: "join", Send: "send", Part: "part", Present: "present", Ask: "ask",
    Deliver: "deliver", Close: "close", Joined: "joined", NotOwner: "not-owner", Unknown: "unknown",
    Answer: "answer", Bounce: "bounce", LetGo: "let-go", Result: "result",
}
KINDS: dict[str, type] = {tag: kind for kind, tag in TAGS.items()}
_ARITY = {kind: (sum(f.default is MISSING for f in fields(kind)), len(fields(kind))) for kind in TAGS}


class Unreadable(ValueError):
    """A batch or item this build cannot read (logged and skipped)."""


@dataclass(frozen=True, slots=True)
class Batch:
    """What one publish carries: `number` increases per sender, so a batch published
    twice (a retry after a publish that did go through) is taken once."""

    source: str
    number: int
    items: list[Any]  # still encoded: each is decoded (and may fail) on its own


def encode_item(item: Item) -> list[Any]:
    return [TAGS[type(item)], *(getattr(item, f.name) for f in fields(item))]


def decode_item(raw: Any) -> Item:
    if not isinstance(raw, list) or not raw:
        raise Unreadable("an item is a non-empty list")
    kind = KINDS.get(raw[0])
    if kind is None:
        raise Unreadable(f"unknown kind {raw[0]!r}")
    least, most = _ARITY[kind]
    if not least <= len(raw) - 1 <= most:
        raise Unreadable(f"{raw[0]}: {len(raw) - 1} fields")
    return kind(*raw[1:])


def encode_batch(source: str, number: int, items: list[list[Any]]) -> bytes:
    return orjson.dumps({"from": source, "n": number, "items": items})


def decode_batch(data: bytes | str) -> Batch:
    try:
        batch = orjson.loads(data)
        return Batch(str(batch["from"]), int(batch["n"]), list(batch["items"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise Unreadable("not a batch") from None
