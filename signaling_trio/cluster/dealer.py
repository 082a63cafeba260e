"""`--workers`: which process of the machine gets a new room.

Owns: how many new rooms this instance has given each process of its machine, and the
choice of the next one. Never touches: Redis, leases (node.Cluster takes the lease for
the one picked), sockets.
"""

from __future__ import annotations

from typing import Sequence


class Dealer:
    """New rooms dealt out in turn: to the candidate given fewest so far, ties going
    round the sorted ring from this instance (its own first, so no move; and every
    instance's turns start in a different place). A candidate new to the list starts
    level with the least used; one gone from it is forgotten."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.placed: dict[str, int] = {}

    def pick(self, candidates: Sequence[str]) -> str:
        """The next room's process (`candidates`: sorted, this instance among them),
        counted now, so that picks in flight together spread too."""
        placed = self.placed
        level = min((placed[c] for c in candidates if c in placed), default=0)
        for gone in [c for c in placed if c not in candidates]:
            del placed[gone]
        ring = {c: i for i, c in enumerate(candidates)}
        me = ring.get(self.me, 0)
        pick = min(candidates, key=lambda c: (placed.setdefault(c, level), (ring[c] - me) % len(ring)))
        placed[pick] += 1
        return pick

    def give_back(self, pick: str) -> None:
        """The room had an owner already: the pick did not count."""
        if pick in self.placed:
            self.placed[pick] -= 1
