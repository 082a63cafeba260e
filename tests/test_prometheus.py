"""/metrics content negotiation; Prometheus output parsed back with prometheus_client."""

from __future__ import annotations

import json

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from conftest import register, ws_peer


def samples(text: str, parser=text_string_to_metric_families) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in parser(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_json_is_default(server):
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"}):
        status, hdrs, body = await server.http_raw("GET", "/metrics", headers)
        assert status == 200 and hdrs["content-type"].startswith("application/json")
        assert "active_rooms" in json.loads(body)


async def test_prometheus_text_and_openmetrics(server, room):
    async with ws_peer(server.ws_url) as w, ws_peer(server.ws_url) as c:
        await register(w, room, "w", role="worker")
        await register(c, room, "c", role="client")
        await c.send({"type": "peer_message", "to_peer_id": "w", "payload": 1})
        await w.recv()
        await c.request({"type": "bogus"})
        await c.request({"type": "discover_peers", "filters": {"properties": {"x": {"$nope": 1}}}})

        status, hdrs, body = await server.http_raw("GET", "/metrics", {"Accept": "text/plain;version=0.0.4"})
        assert status == 200 and hdrs["content-type"].startswith("text/plain")
        s = samples(body.decode())
        assert s[("signaling_websockets_open", ())] == 2
        assert s[("signaling_rooms_active", ())] == 1
        assert s[("signaling_peers", (("role", "worker"),))] == 1
        assert s[("signaling_peers", (("role", "client"),))] == 1
        assert s[("signaling_messages_routed_total", ())] == 1
        assert s[("signaling_messages_total", (("type", "peer_message"),))] == 1
        assert s[("signaling_messages_total", (("type", "register"),))] == 2
        assert s[("signaling_errors_total", (("code", "UNKNOWN_MESSAGE_TYPE"),))] == 1
        assert s[("signaling_errors_total", (("code", "INVALID_MESSAGE"),))] == 1
        assert s[("signaling_register_seconds_count", ())] == 2
        assert s[("signaling_limit_rejections_total", (("limit", "rate"),))] == 0
        assert ("signaling_room_inbox_depth_max", ()) in s
        assert ("signaling_rooms_created_total", ()) in s

        prom = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
        status, hdrs, body = await server.http_raw("GET", "/metrics", {"Accept": prom})
        assert hdrs["content-type"].startswith("application/openmetrics-text")
        om = samples(body.decode(), parse_openmetrics)
        assert om[("signaling_websockets_open", ())] == 2
        assert om[("signaling_register_seconds_count", ())] == 2


def test_negotiate():
    from signaling_trio._prometheus import negotiate

    assert negotiate("") == "json"
    assert negotiate("*/*") == "json"
    assert negotiate("application/json") == "json"
    assert negotiate("text/plain") == "text"
    assert negotiate("text/plain;version=0.0.4;q=0.5,*/*;q=0.1") == "text"
    assert negotiate("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5") == "openmetrics"
    assert negotiate("application/json;q=0.9,text/plain;q=0.1") == "json"
    assert negotiate("text/plain;q=bogus") == "json"
