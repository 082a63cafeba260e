"""/metrics in Prometheus text and OpenMetrics formats, via prometheus-client.

Owns: the series names. Each server has its own CollectorRegistry (no global state);
most series are read from the server's live state at scrape time by a custom collector,
so the hot paths only bump plain integers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from .protocol import errors as E

if TYPE_CHECKING:
    from .server import SignalingServer


class _ServerCollector:
    def __init__(self, server: "SignalingServer") -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        s = self.server
        m = s.metrics
        sup = s.supervisor

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("signaling_websockets_open", "WebSocket connections open now", m.active_connections)
        yield counter("signaling_websockets", "WebSocket connections accepted", m.total_connections)
        yield gauge("signaling_rooms_active", "Rooms with live peers", len(sup.rooms))
        yield counter("signaling_rooms_created", "Rooms created over HTTP", m.rooms_created)
        peers = GaugeMetricFamily("signaling_peers", "Registered peers by role", labels=["role"])
        for role, n in sorted(sup.peers_by_role().items()):
            peers.add_metric([role], n)
        yield peers
        yield gauge("signaling_peers_registered", "Registered peers, all rooms", sup.peer_count())
        yield counter("signaling_messages_routed", "Messages routed peer to peer", m.total_messages)
        by_type = CounterMetricFamily("signaling_messages", "Frames handled by message type", labels=["type"])
        for t, n in sorted(m.messages_by_type.items()):
            by_type.add_metric([t], n)
        yield by_type
        errors = CounterMetricFamily("signaling_errors", "Error frames sent by code", labels=["code"])
        for code, n in sorted(m.errors_by_code.items()):
            errors.add_metric([code], n)
        yield errors
        closes = CounterMetricFamily("signaling_closes", "WebSocket closes by close code", labels=["code"])
        for code, n in sorted(m.closes_by_code.items()):
            closes.add_metric([str(code)], n)
        yield closes
        limits = CounterMetricFamily("signaling_limit_rejections", "Frames or connections refused by a limit", labels=["limit"])
        for limit, n in (
            ("frame_size", m.errors_by_code.get("MESSAGE_TOO_LARGE", 0) + m.closes_by_code.get(E.CLOSE_TOO_BIG, 0)),
            ("metadata_size", m.errors_by_code.get("METADATA_TOO_LARGE", 0)),
            ("room_full", m.errors_by_code.get("ROOM_FULL", 0)),
            ("rate", m.rate_limited_drops),
            ("outbox_full", m.outbox_overflows),
            ("stalled_reader", m.stalled_readers),
            ("register_timeout", m.register_timeouts),
            ("ping_timeout", m.ping_timeouts),
        ):
            limits.add_metric([limit], n)
        yield limits
        yield counter("signaling_signals_dropped", "offer/answer/candidate to a peer not in the room", m.dropped_signals)
        yield counter("signaling_room_crashes", "Room actors that died of a bug", m.room_crashes)
        yield counter("signaling_connection_crashes", "Connection tasks that died of a bug", m.connection_crashes)
        if s.cluster is not None:  # --store redis: the whole cluster, and traffic between instances
            view = s.cluster.view
            yield gauge("signaling_cluster_instances", "Live instances on this Redis", view["instances"])
            yield gauge("signaling_cluster_rooms", "Live rooms, all instances", view["active_rooms"])
            yield gauge("signaling_cluster_peers", "Registered peers, all instances", view["active_connections"])
            yield counter("signaling_cluster_items_sent", "Items published to other instances", m.cluster_sent)
            yield counter("signaling_cluster_items_received", "Items received from other instances", m.cluster_received)
            yield counter("signaling_cluster_items_dropped",
                          "Items to other instances dropped (queue full, Redis away over 10 s, nobody receiving)",
                          m.cluster_drops)
            yield counter("signaling_cluster_items_duplicate",
                          "Items received twice (a batch published again, a request answered by two owners "
                          "around a move), not delivered", m.cluster_duplicates)
        depths = [a.queue_depth() for a in sup.rooms.values()]
        yield gauge("signaling_room_inbox_depth_max", "Deepest room actor inbox now", max(depths, default=0))
        yield gauge("signaling_room_inbox_depth_sum", "Commands waiting in all room actor inboxes", sum(depths))


def negotiate(accept: str) -> str:
    """'json' (the v2 default), 'text' (Prometheus 0.0.4) or 'openmetrics', by the Accept
    header's q-values. Media-type parameters such as version=… are ignored; `*/*` and
    anything unknown mean JSON."""
    best, best_q = "json", 0.0
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        mtype = fields[0].lower()
        q = 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        kind = {"application/json": "json", "text/plain": "text", "application/openmetrics-text": "openmetrics"}.get(mtype)
        if kind is not None and q > best_q:
            best, best_q = kind, q
    return best


class PrometheusExporter:
    def __init__(self, server: "SignalingServer") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ServerCollector(server))  # type: ignore[arg-type]
        self.register_seconds = Histogram(
            "signaling_register_seconds", "Time from a register frame to its answer",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )

    def render(self, openmetrics: bool) -> tuple[bytes, str]:
        if openmetrics:
            return generate_openmetrics(self.registry), OPENMETRICS_TYPE
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
