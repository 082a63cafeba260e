"""Everything this instance sends to one other instance: ordered, batched, bounded.

Owns: one destination's queue of wire items and the task that publishes them in
numbered batches. A full queue drops (counted), like a full connection outbox.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import trio

from .._log import event
from .._metrics import Metrics
from ..store import StoreUnavailable
from . import wire
from .transport import Transport

LINK_QUEUE = 20000  # items queued for one destination instance before drops
PUBLISH_BATCH = 512
PUBLISH_RETRY_FOR = 10.0  # a batch that cannot be published (Redis away) is retried this long
PUBLISH_RETRY_EVERY = 0.25


class Outlink:
    def __init__(self, transport: Transport, metrics: Metrics, source: str, batches: itertools.count[int],
                 target: str) -> None:
        self.transport = transport
        self.metrics = metrics
        self.source = source
        self.batches = batches  # the instance's batch numbers, shared by its outlinks
        self.target = target
        self._send, self._recv = trio.open_memory_channel[list[Any]](LINK_QUEUE)
        self.last_put = trio.current_time()

    def put(self, item: wire.Item) -> None:
        self.last_put = trio.current_time()
        try:
            self._send.send_nowait(wire.encode_item(item))
        except trio.WouldBlock:
            self.metrics.cluster_drops += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def queued(self) -> int:
        return self._recv.statistics().current_buffer_used

    def close(self) -> None:
        """Idle: end the publisher task (a later put() goes through a new Outlink)."""
        self._send.close()

    async def run(self) -> None:
        recv = self._recv
        async with recv:
            async for item in recv:
                batch = [item]
                while len(batch) < PUBLISH_BATCH:
                    try:
                        batch.append(recv.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._publish(wire.encode_batch(self.source, next(self.batches), batch), len(batch))

    async def _publish(self, payload: bytes, count: int) -> None:
        """Publish one batch. While Redis is away, or nobody receives it (the target is
        resubscribing after a Redis restart, or is gone), retry it, in order (nothing
        behind it overtakes), for up to PUBLISH_RETRY_FOR; then count it dropped."""
        give_up = trio.current_time() + PUBLISH_RETRY_FOR
        failed = False
        while True:
            try:
                if await self.transport.publish(self.target, payload):
                    self.metrics.cluster_sent += count
                    return
                error = "no receiver"
            except StoreUnavailable as exc:
                error = str(exc)
            if not failed:
                event(logging.WARNING, "cluster publish failed", to=self.target, items=count, error=error)
                failed = True
            if trio.current_time() >= give_up:
                self.metrics.cluster_drops += count
                return
            await trio.sleep(PUBLISH_RETRY_EVERY)
