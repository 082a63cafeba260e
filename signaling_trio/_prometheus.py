"""/metrics in Prometheus text and OpenMetrics formats, via prometheus-client.

Owns: the series names. Each server has its own CollectorRegistry (no global state);
most series are read from the server's live state at scrape time by a custom collector,
so the hot paths only bump plain integers.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from ._metrics import Metrics
from ._router import RoomRouter
from .protocol import errors as E


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _by_label(family: GaugeMetricFamily | CounterMetricFamily, values: dict[object, int]) -> Metric:
    for label, n in sorted(values.items(), key=lambda kv: str(kv[0])):
        family.add_metric([str(label)], n)
    return family


class _ServerCollector:
    def __init__(self, metrics: Metrics, router: RoomRouter) -> None:
        self.metrics = metrics
        self.router = router

    def collect(self) -> Iterator[Metric]:
        yield from self._connections_and_rooms()
        yield from self._limits_and_faults()
        for series in self.router.series():  # e.g. the cluster's
            yield (gauge if series.kind == "gauge" else counter)(series.prometheus, series.help, series.value)
        depths = [a.queue_depth() for a in self.router.supervisor.rooms.values()]
        yield gauge("signaling_room_inbox_depth_max", "Deepest room actor inbox now", max(depths, default=0))
        yield gauge("signaling_room_inbox_depth_sum", "Commands waiting in all room actor inboxes", sum(depths))

    def _connections_and_rooms(self) -> Iterator[Metric]:
        m = self.metrics
        sup = self.router.supervisor
        yield gauge("signaling_websockets_open", "WebSocket connections open now", m.active_connections)
        yield counter("signaling_websockets", "WebSocket connections accepted", m.total_connections)
        yield gauge("signaling_rooms_active", "Rooms with live peers", len(sup.rooms))
        yield counter("signaling_rooms_created", "Rooms created over HTTP", m.rooms_created)
        yield _by_label(GaugeMetricFamily("signaling_peers", "Registered peers by role", labels=["role"]),
                        sup.peers_by_role())
        yield gauge("signaling_peers_registered", "Registered peers, all rooms", sup.peer_count())
        yield counter("signaling_messages_routed", "Messages routed peer to peer", m.total_messages)
        yield _by_label(CounterMetricFamily("signaling_messages", "Frames handled by message type", labels=["type"]),
                        m.messages_by_type)
        yield _by_label(CounterMetricFamily("signaling_errors", "Error frames sent by code", labels=["code"]),
                        m.errors_by_code)
        yield _by_label(CounterMetricFamily("signaling_closes", "WebSocket closes by close code", labels=["code"]),
                        m.closes_by_code)

    def _limits_and_faults(self) -> Iterator[Metric]:
        m = self.metrics
        limits = CounterMetricFamily(
            "signaling_limit_rejections", "Frames or connections refused by a limit", labels=["limit"]
        )
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
        yield counter(
            "signaling_signals_dropped", "offer/answer/candidate to a peer not in the room", m.dropped_signals
        )
        yield counter("signaling_room_crashes", "Room actors that died of a bug", m.room_crashes)
        yield counter("signaling_connection_crashes", "Connection tasks that died of a bug", m.connection_crashes)


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
        kind = {"application/json": "json", "text/plain": "text", "application/openmetrics-text": "openmetrics"}.get(
            mtype
        )
        if kind is not None and q > best_q:
            best, best_q = kind, q
    return best


class PrometheusExporter:
    def __init__(self, metrics: Metrics, router: RoomRouter) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = _ServerCollector(metrics, router)
        self.registry.register(self.collector)  # type: ignore[arg-type]
        self.register_seconds = Histogram(
            "signaling_register_seconds", "Time from a register frame to its answer",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )

    def render(self, openmetrics: bool) -> tuple[bytes, str]:
        if openmetrics:
            return generate_openmetrics(self.registry), OPENMETRICS_TYPE
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
