"""Per-connection rate limiting as a pure token bucket (time is an argument).

Owns: the bucket arithmetic. Never touches: clocks, sockets.
"""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; every frame takes one.
    A rate of 0 means no limit."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        if self.rate <= 0:
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
