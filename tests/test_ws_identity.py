"""Identity is the connection: spoofing, re-register, takeover, PEER_ID_TAKEN, errors."""

from __future__ import annotations

import pytest

from conftest import register, ws_peer
from signaling_trio.auth import AuthError


@pytest.mark.parametrize(
    "msg, field",
    [
        ({"type": "discover_peers", "from_peer_id": "b", "filters": {}}, "from_peer_id"),
        ({"type": "update_metadata", "peer_id": "b", "metadata": {"x": 1}}, "peer_id"),
        ({"type": "peer_message", "from_peer_id": "b", "to_peer_id": "b", "payload": 1}, "from_peer_id"),
        ({"type": "offer", "sender": "b", "target": "b", "sdp": "x"}, "sender"),
        ({"type": "answer", "sender": "b", "target": "b", "sdp": "x"}, "sender"),
        ({"type": "candidate", "sender": "b", "target": "b", "candidate": {}}, "sender"),
    ],
)
async def test_spoofing_is_rejected_and_nothing_delivered(server, room, msg, field):
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "a")
        await register(b, room, "b")
        err = await a.request(msg)
        assert err["type"] == "error" and err["code"] == "SENDER_MISMATCH", err
        assert field in err["message"]
        assert await b.nothing_pending()
        # b's metadata is untouched
        peers = (await a.request({"type": "discover_peers"}))["peers"]
        assert peers[0]["metadata"] == {}


async def test_reregister_same_socket_replaces_role_and_metadata(server, room):
    async with ws_peer(server.ws_url) as w, ws_peer(server.ws_url) as c:
        await register(w, room, "w", role="worker", metadata={"tags": ["a"], "properties": {"status": "busy"}})
        await register(c, room, "c")
        for status in ("available", "busy", "available"):
            reply = await register(w, room, "w", role="worker", metadata={"properties": {"status": status}})
            assert reply["type"] == "registered_auth"
            peers = (await c.request({"type": "discover_peers", "filters": {"properties": {"status": "available"}}}))[
                "peers"
            ]
            assert [p["peer_id"] for p in peers] == (["w"] if status == "available" else [])
            if peers:
                assert peers[0]["metadata"] == {"properties": {"status": "available"}}


async def test_reregister_other_room_leaves_old(server):
    r1, r2 = await server.new_room(), await server.new_room()
    async with ws_peer(server.ws_url) as w, ws_peer(server.ws_url) as c1:
        await register(c1, r1, "c1")
        await register(w, r1, "w")
        assert (await c1.request({"type": "discover_peers"}))["count"] == 1
        await register(w, {**r2, "id_token": r1["id_token"]}, "w")
        assert (await c1.request({"type": "discover_peers"}))["count"] == 0


async def test_reregister_other_peer_id_same_room(server, room):
    async with ws_peer(server.ws_url) as w, ws_peer(server.ws_url) as c:
        await register(c, room, "c")
        await register(w, room, "w-old")
        await register(w, room, "w-new")
        peers = (await c.request({"type": "discover_peers"}))["peers"]
        assert [p["peer_id"] for p in peers] == ["w-new"]


async def test_peer_id_taken_by_other_identity(server, room):
    other = await server.signin()
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "w")
        err = await register(b, room, "w", id_token=other["id_token"])
        assert err["type"] == "error" and err["code"] == "PEER_ID_TAKEN" and "reason" in err
        # a is untouched and b is not in the room
        assert await a.nothing_pending()
        err = await b.request({"type": "discover_peers"})
        assert err["code"] == "NOT_IN_ROOM"


async def test_same_identity_takes_over_with_4000(server, room):
    async with ws_peer(server.ws_url) as c, ws_peer(server.ws_url) as old:
        await register(c, room, "c")
        await register(old, room, "w", role="worker")
        async with ws_peer(server.ws_url) as new:
            reply = await register(new, room, "w", role="worker", metadata={"v": 2})
            assert reply["type"] == "registered_auth"
            assert await old.closed() == 4000
            assert old.ws.closed.reason == "replaced"
            await c.send({"type": "peer_message", "to_peer_id": "w", "payload": "hi"})
            assert (await new.recv())["payload"] == "hi"
            peers = (await c.request({"type": "discover_peers"}))["peers"]
            assert [(p["peer_id"], p["metadata"]) for p in peers] == [("w", {"v": 2})]


async def test_expired_id_token_reregister_on_same_socket(server, room):
    auth = server.server.local_authority
    token = auth.issue("worker-sub", lifetime=60)
    async with ws_peer(server.ws_url) as w:
        assert (await register(w, room, "w", id_token=token))["type"] == "registered_auth"
        # the token expires during a long job
        auth.cache._claims.clear()
        expired = auth.issue("worker-sub", lifetime=-3600)
        with pytest.raises(AuthError, match="expired"):
            auth.check(expired)
        # a fresh connection with an expired token is refused
        async with ws_peer(server.ws_url) as x:
            err = await register(x, room, "x", id_token=expired)
            assert err["code"] == "INVALID_ID_TOKEN"
        # two hours on, the worker's own token has expired too...
        real_clock = auth.clock
        auth.clock = lambda: real_clock() + 7200
        try:
            with pytest.raises(AuthError, match="expired"):
                auth.check(token)
            # ...yet re-registering on its own connection with it keeps working
            reply = await register(w, room, "w", id_token=token)
        finally:
            auth.clock = real_clock
        assert reply["type"] == "registered_auth"


@pytest.mark.parametrize(
    "change, code",
    [
        ({"room_id": "nope"}, "ROOM_NOT_FOUND"),
        ({"token": "wrong"}, "INVALID_ROOM_TOKEN"),
        ({"id_token": "not-a-jwt"}, "INVALID_ID_TOKEN"),
        ({"peer_id": None}, "MISSING_FIELDS"),
        ({"id_token": None}, "MISSING_FIELDS"),
        ({"peer_id": 5}, "INVALID_MESSAGE"),
        ({"metadata": []}, "INVALID_MESSAGE"),
        ({"metadata": {"tags": "gpu"}}, "INVALID_MESSAGE"),
        ({"role": 3}, "INVALID_MESSAGE"),
    ],
)
async def test_register_errors_carry_reason(server, room, change, code):
    msg = {
        "type": "register",
        "peer_id": "p",
        "room_id": room["room_id"],
        "token": room["token"],
        "id_token": room["id_token"],
    }
    msg.update(change)
    msg = {k: v for k, v in msg.items() if v is not None}
    async with ws_peer(server.ws_url) as p:
        err = await p.request(msg)
        assert err["type"] == "error" and err["code"] == code, err
        assert isinstance(err["reason"], str) and err["reason"]
        # the connection goes on
        assert (await register(p, room, "p"))["type"] == "registered_auth"


async def test_expired_room(server, room):
    rec = await server.server.rooms.get_room(room["room_id"])
    await server.server.rooms.set_expiry(room["room_id"], rec.created_at - 10)
    async with ws_peer(server.ws_url) as p:
        err = await register(p, room, "p")
        assert err["code"] == "ROOM_EXPIRED"


async def test_unregistered_connection_gets_not_in_room(server):
    async with ws_peer(server.ws_url) as p:
        for msg in ({"type": "discover_peers"}, {"type": "peer_message", "to_peer_id": "x", "payload": 1},
                    {"type": "offer", "target": "x"}, {"type": "subscribe"}, {"type": "whatever"}):
            err = await p.request(msg)
            assert err["type"] == "error" and err["code"] == "NOT_IN_ROOM", (msg, err)
        assert (await p.request({"type": "ping"})) == {"type": "pong"}


async def test_malformed_input_keeps_connection(server, room):
    async with ws_peer(server.ws_url) as p:
        await register(p, room, "p")
        cases = [
            ("{not json", "INVALID_JSON"),
            ("[1, 2]", "INVALID_MESSAGE"),
            ('"just a string"', "INVALID_MESSAGE"),
            ('{"no_type": 1}', "INVALID_MESSAGE"),
            ('{"type": 5}', "INVALID_MESSAGE"),
            ('{"type": "launch_missiles"}', "UNKNOWN_MESSAGE_TYPE"),
            ('{"type": "peer_message", "to_peer_id": "x"}', "MISSING_FIELDS"),
            ('{"type": "peer_message", "to_peer_id": 5, "payload": 1}', "INVALID_MESSAGE"),
            ('{"type": "offer", "sdp": "x"}', "MISSING_FIELDS"),
            ('{"type": "update_metadata"}', "MISSING_FIELDS"),
            ('{"type": "update_metadata", "metadata": {"properties": []}}', "INVALID_MESSAGE"),
            ('{"type": "discover_peers", "filters": []}', "INVALID_MESSAGE"),
            ('{"type": "discover_peers", "filters": {"properties": {"x": {"$regex": "a"}}}}', "INVALID_MESSAGE"),
            ('{"type": "peer_message", "to_peer_id": "nobody", "payload": 1}', "PEER_NOT_IN_ROOM"),
            ('{"type": "x", "n": 1' + "0" * 400 + "}", "INVALID_JSON"),
            ("[" * 5000 + "]" * 5000, "INVALID_JSON"),
        ]
        for raw, code in cases:
            await p.send(raw)
            err = await p.recv()
            assert err["type"] == "error" and err["code"] == code, (raw[:60], err)
            assert err["message"]
        await p.ws.send_message(b"\x00binary")
        err = await p.recv()
        assert err["code"] == "INVALID_MESSAGE"
        assert (await p.request({"type": "discover_peers"}))["type"] == "peer_list"


async def test_unknown_fields_are_ignored(server, room):
    async with ws_peer(server.ws_url) as p:
        reply = await p.request({"type": "register", "peer_id": "p", "room_id": room["room_id"], "token": room["token"],
                                 "id_token": room["id_token"], "is_admin": False, "api_key": None, "extra": [1]})
        assert reply["type"] == "registered_auth"
        reply = await p.request({"type": "discover_peers", "filters": {"role": "worker", "exclude_self": True}, "x": 1})
        assert reply["type"] == "peer_list"
