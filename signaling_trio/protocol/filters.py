"""The discovery filter language, compiled once per query.

Owns: what `filters` means for discover_peers, subscribe and reserve_peer.
Never touches: rooms' state (it reads a peer through the small `FilterTarget` shape),
sockets, trio.

Semantics (docs/API.md "Filters"):
- `role`: equal.  `tags`: any of them.  `tags_all`: all of them.
- `properties`: `{key: value}` equality, or `{key: {"$op": operand, ...}}`.
- comparing unlike JSON types is a non-match, never an error; `true` is not `1`.
- a missing property fails every operator but `$ne`, `$nin` and `$exists: false`.
- `unreserved: true`: only peers nobody holds a reservation on.
- unknown top-level keys are ignored (v2 ignored them; v2 clients may send extras);
  an unknown operator or a malformed value is INVALID_MESSAGE.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Protocol

from . import errors as E

_MISSING = object()


class FilterTarget(Protocol):
    role: str
    tags: frozenset[Any]
    properties: dict[str, Any]
    reserved_by: str | None


def _kind(v: Any) -> str:
    # bool before int: JSON true is not the number 1
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "num"
    if isinstance(v, str):
        return "str"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "obj"
    return "other"


def json_equal(a: Any, b: Any) -> bool:
    ka = _kind(a)
    if ka != _kind(b):
        return False
    if ka == "list":
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if ka == "obj":
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return a == b


def _orderable(a: Any, b: Any) -> bool:
    ka = _kind(a)
    return ka in ("num", "str") and ka == _kind(b)


Pred = Callable[[Any], bool]  # takes the property value or _MISSING


def _compare(name: str, test: Callable[[Any, Any], bool]) -> Callable[[Any], Pred]:
    def build(operand: Any) -> Pred:
        if _kind(operand) not in ("num", "str"):
            raise E.ProtocolError(E.INVALID_MESSAGE, f"operator {name} needs a number or a string operand")
        return lambda v: v is not _MISSING and _orderable(v, operand) and test(v, operand)

    return build


def _membership(name: str, inside: bool) -> Callable[[Any], Pred]:
    def build(operand: Any) -> Pred:
        if not isinstance(operand, list):
            raise E.ProtocolError(E.INVALID_MESSAGE, f"operator {name} needs a list operand")
        items = list(operand)

        def is_in(v: Any) -> bool:
            return v is not _MISSING and any(json_equal(v, x) for x in items)

        return is_in if inside else (lambda v: not is_in(v))

    return build


def _exists(operand: Any) -> Pred:
    if not isinstance(operand, bool):
        raise E.ProtocolError(E.INVALID_MESSAGE, "operator $exists needs true or false")
    if operand:
        return lambda v: v is not _MISSING
    return lambda v: v is _MISSING


# operator -> its predicate's builder (which checks the operand)
_OPS: dict[str, Callable[[Any], Pred]] = {
    "$eq": lambda operand: lambda v: v is not _MISSING and json_equal(v, operand),
    "$ne": lambda operand: lambda v: v is _MISSING or not json_equal(v, operand),
    "$gt": _compare("$gt", operator.gt),
    "$gte": _compare("$gte", operator.ge),
    "$lt": _compare("$lt", operator.lt),
    "$lte": _compare("$lte", operator.le),
    "$in": _membership("$in", True),
    "$nin": _membership("$nin", False),
    "$exists": _exists,
}


def _op(name: str, operand: Any) -> Pred:
    build = _OPS.get(name)
    if build is None:
        raise E.ProtocolError(E.INVALID_MESSAGE, f"unknown filter operator {name!r}")
    return build(operand)


def _property_pred(key: str, spec: Any) -> Callable[[dict[str, Any]], bool]:
    preds: list[Pred]
    if isinstance(spec, dict) and spec and all(isinstance(k, str) and k.startswith("$") for k in spec):
        preds = [_op(name, operand) for name, operand in spec.items()]
    elif isinstance(spec, dict) and any(isinstance(k, str) and k.startswith("$") for k in spec):
        raise E.ProtocolError(
            E.INVALID_MESSAGE, f"property filter {key!r} mixes operators with plain keys"
        )
    else:
        preds = [_op("$eq", spec)]

    if len(preds) == 1:
        p = preds[0]
        return lambda props: p(props.get(key, _MISSING))
    return lambda props: all(p(props.get(key, _MISSING)) for p in preds)


def _tag_list(filters: dict[str, Any], name: str) -> frozenset[Any] | None:
    value = filters.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        _kind(t) in ("str", "num", "bool") for t in value
    ):
        raise E.ProtocolError(E.INVALID_MESSAGE, f"filter '{name}' must be a list of strings")
    return frozenset(value)


def index_key(value: Any) -> Any:
    """A dict key under which JSON-equal scalars meet and unequal ones do not (`true` is
    not `1`; `1` is `1.0`). None for values that are not indexed (lists, objects)."""
    kind = _kind(value)
    if kind in ("list", "obj", "other"):
        return None
    return (kind, value)


class Filter:
    """A compiled filter. `matches(peer, viewer=None)`; `viewer` is the asker, whose own
    reservation does not count against `unreserved` (used by reserve_peer renewals).
    `eq_props` lists the (key, index_key) pairs of plain equality conditions, which a
    room may answer from an index instead of a scan."""

    __slots__ = ("role", "tags_any", "tags_all", "props", "unreserved", "source", "eq_props")

    def __init__(self, filters: Any) -> None:
        if filters is None:
            filters = {}
        if not isinstance(filters, dict):
            raise E.ProtocolError(E.INVALID_MESSAGE, "'filters' must be a JSON object")
        role = filters.get("role")
        if role is not None and not isinstance(role, str):
            raise E.ProtocolError(E.INVALID_MESSAGE, "filter 'role' must be a string")
        self.role: str | None = role
        self.tags_any = _tag_list(filters, "tags")
        self.tags_all = _tag_list(filters, "tags_all")
        props = filters.get("properties")
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise E.ProtocolError(E.INVALID_MESSAGE, "filter 'properties' must be a JSON object")
        self.props = [_property_pred(k, v) for k, v in props.items()]
        self.eq_props: list[tuple[str, Any]] = []
        for k, v in props.items():
            operand = v["$eq"] if isinstance(v, dict) and len(v) == 1 and "$eq" in v else v
            if not isinstance(operand, dict):
                ik = index_key(operand)
                if ik is not None:
                    self.eq_props.append((k, ik))
        unreserved = filters.get("unreserved", False)
        if not isinstance(unreserved, bool):
            raise E.ProtocolError(E.INVALID_MESSAGE, "filter 'unreserved' must be true or false")
        self.unreserved = unreserved

    def matches(self, peer: FilterTarget, viewer: str | None = None) -> bool:
        if self.role is not None and peer.role != self.role:
            return False
        if self.tags_any is not None and self.tags_any.isdisjoint(peer.tags):
            return False
        if self.tags_all is not None and not self.tags_all <= peer.tags:
            return False
        if self.unreserved and peer.reserved_by is not None and peer.reserved_by != viewer:
            return False
        if self.props:
            props = peer.properties
            for p in self.props:
                if not p(props):
                    return False
        return True

