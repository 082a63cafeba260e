"""The pure protocol core: no trio, no sockets, no I/O. See ARCHITECTURE.md."""

from .errors import ProtocolError
from .filters import Filter
from .room import Effects, RoomState

__all__ = ["Effects", "Filter", "ProtocolError", "RoomState"]
