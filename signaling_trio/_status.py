"""What `/status` shows: the `/metrics` JSON now, and its rates over the last minutes.

Owns: a ring of samples of the counters (every SAMPLE_EVERY seconds, KEEP of them) and
the rates between them (connects, messages, limits hit per minute).
Never touches: payloads, metadata values, tokens: it reads counters and gauges only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import trio

SAMPLE_EVERY = 5.0
KEEP = 180  # 15 minutes
LIMIT_CODES = ("RATE_LIMITED", "ROOM_FULL", "MESSAGE_TOO_LARGE", "METADATA_TOO_LARGE")


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # unix seconds
    connects: int
    messages: int
    limits: int


def limits_hit(m: dict[str, Any]) -> int:
    """Refusals for a limit, and frames dropped for one (rate, outbox, signal queue)."""
    codes = m.get("errors_by_code", {})
    return (sum(codes.get(c, 0) for c in LIMIT_CODES) + m.get("rate_limited_drops", 0)
            + m.get("outbox_overflows", 0) + m.get("dropped_signals", 0))


class StatusHistory:
    def __init__(self, metrics_json: Callable[[], dict[str, Any]], clock: Callable[[], float]) -> None:
        self.metrics_json = metrics_json
        self.clock = clock
        self.samples: deque[Sample] = deque(maxlen=KEEP)

    def sample(self) -> None:
        m = self.metrics_json()
        self.samples.append(Sample(self.clock(), m["total_connections"], m["total_messages"], limits_hit(m)))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.sample()
        task_status.started()
        while True:
            await trio.sleep(SAMPLE_EVERY)
            self.sample()

    def rates(self) -> list[dict[str, float]]:
        """Per minute, between each sample and the one before it (the latest interval
        ends now, so a page polling every few seconds sees activity at once)."""
        points = list(self.samples)
        m = self.metrics_json()
        points.append(Sample(self.clock(), m["total_connections"], m["total_messages"], limits_hit(m)))
        out = []
        for a, b in zip(points, points[1:]):
            span = b.t - a.t
            if span <= 0:
                continue
            per_min = 60.0 / span
            out.append({"t": round(b.t, 1), "connects": round((b.connects - a.connects) * per_min, 1),
                        "messages": round((b.messages - a.messages) * per_min, 1),
                        "limits": round((b.limits - a.limits) * per_min, 1)})
        return out
