"""Counters of one server instance. Incremented synchronously by the tasks that see the
events (never across a checkpoint), read by /metrics."""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.total_connections = 0
        self.active_connections = 0
        self.total_messages = 0  # messages routed peer to peer (v2 meaning)
        self.rooms_created = 0
        self.messages_by_type: Counter[str] = Counter()
        self.errors_by_code: Counter[str] = Counter()
        self.closes_by_code: Counter[int] = Counter()
        self.dropped_signals = 0
        self.outbox_overflows = 0
        self.room_crashes = 0
        self.connection_crashes = 0  # a bug in one connection's task (logged, that connection closed)
        self.rate_limited_drops = 0
        self.stalled_readers = 0
        self.register_timeouts = 0
        self.ping_timeouts = 0
        # with a Redis cluster: items sent to / received from other instances, and dropped
        self.cluster_sent = 0
        self.cluster_received = 0
        self.cluster_drops = 0
        self.cluster_duplicates = 0  # second answers to a request sent to two owners around a move (not delivered)
