"""Peer metadata: validation and the update_metadata merge rule.

Owns: what a valid metadata object is and how an update merges into it.
Never touches: rooms, sockets, trio.
"""

from __future__ import annotations

from typing import Any

from . import errors as E
from .messages import encoded_size


def validate(metadata: Any, *, field: str = "metadata") -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise E.ProtocolError(E.INVALID_MESSAGE, f"'{field}' must be a JSON object")
    tags = metadata.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or not all(
            isinstance(t, (str, int, float)) for t in tags
        ):
            raise E.ProtocolError(
                E.INVALID_MESSAGE, f"'{field}.tags' must be a list of strings"
            )
    props = metadata.get("properties")
    if props is not None and not isinstance(props, dict):
        raise E.ProtocolError(E.INVALID_MESSAGE, f"'{field}.properties' must be a JSON object")
    return metadata


def check_size(metadata: dict[str, Any], limit: int) -> None:
    size = encoded_size(metadata)
    if size > limit:
        raise E.ProtocolError(
            E.METADATA_TOO_LARGE, f"metadata is {size} bytes, the limit is {limit}"
        )


def merge(old: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """tags: union, old order first; properties: shallow merge, null removes;
    any other key in the update replaces; keys the update does not name are kept."""
    merged = dict(old)
    for key, value in update.items():
        if key == "tags" and value is not None:
            old_tags = old.get("tags")
            tags = list(old_tags) if isinstance(old_tags, list) else []
            seen = set(tags)
            for t in value:
                if t not in seen:
                    seen.add(t)
                    tags.append(t)
            merged["tags"] = tags
        elif key == "properties" and value is not None:
            old_props = old.get("properties")
            props = dict(old_props) if isinstance(old_props, dict) else {}
            for pk, pv in value.items():
                if pv is None:
                    props.pop(pk, None)
                else:
                    props[pk] = pv
            merged["properties"] = props
        else:
            merged[key] = value
    return merged
