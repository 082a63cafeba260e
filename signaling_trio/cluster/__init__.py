"""Many instances, one logical server: rooms shared through Redis (`--store redis://`).

`node.Cluster` is the `RoomRouter` (signaling_trio/_router.py) a server uses with a
Redis store. Inside: `wire` (the items instances send each other), `transport` (every
Redis key, script and call), `link` (a room as this instance reaches it), `owner` (a
room's owner serving other instances' connections), `outlink` (ordered, batched
publishing), `saver` (a room's handover state), `upkeep` (peer notes and shared counts),
`dealer` (--workers: which process of the machine gets a new room).
docs/SCALING.md describes the design and every failure case.
"""

from .node import Cluster
from .transport import RedisTransport

__all__ = ["Cluster", "RedisTransport"]
