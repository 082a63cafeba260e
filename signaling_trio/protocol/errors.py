"""Error codes, close codes and the one exception the protocol core raises.

Owns: the wire names of every error and the WebSocket close codes the server uses.
Never touches: sockets, trio, logging.
"""

from __future__ import annotations

from typing import Any

# v2 codes
NOT_IN_ROOM = "NOT_IN_ROOM"
ROOM_NOT_FOUND = "ROOM_NOT_FOUND"
PEER_NOT_IN_ROOM = "PEER_NOT_IN_ROOM"
PEER_NOT_FOUND = "PEER_NOT_FOUND"
INVALID_MESSAGE = "INVALID_MESSAGE"
DELIVERY_FAILED = "DELIVERY_FAILED"
UNKNOWN_MESSAGE_TYPE = "UNKNOWN_MESSAGE_TYPE"
INVALID_JSON = "INVALID_JSON"
# added by signaling_trio
MISSING_FIELDS = "MISSING_FIELDS"
INVALID_ID_TOKEN = "INVALID_ID_TOKEN"
INVALID_ROOM_TOKEN = "INVALID_ROOM_TOKEN"
ROOM_EXPIRED = "ROOM_EXPIRED"
PEER_ID_TAKEN = "PEER_ID_TAKEN"
SENDER_MISMATCH = "SENDER_MISMATCH"
MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"
METADATA_TOO_LARGE = "METADATA_TOO_LARGE"
RATE_LIMITED = "RATE_LIMITED"
ROOM_FULL = "ROOM_FULL"
PEER_RESERVED = "PEER_RESERVED"
PRECONDITION_FAILED = "PRECONDITION_FAILED"
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
INVALID_API_KEY = "INVALID_API_KEY"  # an unknown, revoked or expired account key or worker token
ROOM_ACCESS_DENIED = "ROOM_ACCESS_DENIED"  # a valid identity that is not the room's owner or a member
ROOM_UNAVAILABLE = "ROOM_UNAVAILABLE"  # a request outlived a room's move between instances

ALL_CODES = frozenset(
    v for k, v in dict(globals()).items() if k.isupper() and isinstance(v, str)
)

# WebSocket close codes
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_REPLACED = 4000


class ProtocolError(Exception):
    """A request that failed; becomes one `{"type":"error",...}` frame."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def to_message(self) -> dict[str, Any]:
        return error_message(self.code, self.message, **self.extra)


def error_message(code: str, message: str, **extra: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "error", "code": code, "message": message}
    msg.update(extra)
    return msg
