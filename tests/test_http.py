"""The HTTP API over real sockets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time

import orjson
import trio

from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey

from conftest import register, ws_peer
from rawhttp import exchange, port_of
from signaling_trio.testing import open_test_server


async def test_health(server):
    status, body = await server.http("GET", "/health")
    assert status == 200
    assert body["status"] == "healthy"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", body["timestamp"])
    assert re.fullmatch(r"2\.\d+\.\d+", body["version"])


async def test_metrics_v2_names_and_counts(server, room):
    status, m = await server.http("GET", "/metrics")
    assert status == 200
    for name in (
        "timestamp",
        "active_rooms",
        "active_connections",
        "peers_by_role",
        "total_connections",
        "total_messages",
        "rooms_created",
    ):
        assert name in m
    assert m["rooms_created"] == 1 and m["active_rooms"] == 0
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "a", role="worker")
        await register(b, room, "b", role="client")
        await a.send({"type": "peer_message", "to_peer_id": "b", "payload": 1})
        await b.recv()
        status, m = await server.http("GET", "/metrics")
        assert m["active_rooms"] == 1 and m["active_connections"] == 2
        assert m["peers_by_role"] == {"worker": 1, "client": 1}
        assert m["total_connections"] == 2 and m["total_messages"] == 1


async def test_answers_are_compact_sorted_json_with_a_newline(server):
    """An answer's bytes: keys sorted, no spaces, one closing newline (Quart's default
    layout, which clients may have compared against), framed by its Content-Length."""
    request = (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
               b"POST /anonymous-signin HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    answers, _ = await exchange(port_of(server.http_url), request, timeout=1.0)
    assert [a.status for a in answers] == [200, 200], answers
    for answer in answers:
        expected = json.dumps(answer.json(), sort_keys=True, separators=(",", ":")).encode() + b"\n"
        assert answer.body == expected
        assert answer.headers["content-type"] == "application/json"
        assert list(answer.json()) == sorted(answer.json())


async def test_signin_and_jwks_verify(server):
    status, body = await server.http("POST", "/anonymous-signin")
    assert status == 200 and set(body) == {"id_token", "username"}
    status, jwks = await server.http("GET", "/.well-known/jwks.json")
    assert status == 200 and jwks["keys"][0]["kty"] == "EC" and "d" not in jwks["keys"][0]
    token = jwt.decode(body["id_token"], KeySet.import_key_set(jwks), algorithms=[jwks["keys"][0]["alg"]])
    claims = token.claims
    assert claims["sub"] == body["username"]
    assert claims["iss"] and claims["aud"]
    assert 86400 - 5 <= claims["exp"] - time.time() <= 86400 + 5


async def test_create_room(server):
    signin = await server.signin()
    status, room = await server.http("POST", "/create-room", token=signin["id_token"])
    assert status == 200 and set(room) == {"room_id", "token", "expires_at"}
    assert len(room["token"]) >= 22  # >= 128 bits of base64url
    assert abs(room["expires_at"] - (time.time() + 7200)) < 5
    for token in (None, "garbage", signin["id_token"][:-4] + "AAAA"):
        status, body = await server.http("POST", "/create-room", token=token)
        assert status == 401 and body["error"] == "INVALID_ID_TOKEN" and body["message"]


async def test_only_the_signing_keys_algorithm(server):
    """Our tokens verify only with our key's own algorithm: one signed RS256 by another
    key under our kid, one with alg "none", one HS256 keyed with our public key: 401."""
    authority = server.server.local_authority
    assert authority.alg == "ES256"
    claims = {"iss": authority.issuer, "aud": authority.audience, "sub": "mallory",
              "exp": int(time.time()) + 600}
    forged = RSAKey.generate_key(2048, parameters={"kid": authority.key.kid})
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    body = b64(orjson.dumps(claims))
    hs = b64(orjson.dumps({"alg": "HS256", "kid": authority.key.kid})) + "." + body
    mac = hmac.new(authority.key.as_pem(private=False), hs.encode(), hashlib.sha256).digest()
    tokens = [
        jwt.encode({"alg": "RS256", "kid": authority.key.kid}, claims, forged),
        b64(b'{"alg":"none"}') + "." + body + ".",
        hs + "." + b64(mac),
    ]
    for token in tokens:
        status, body = await server.http("POST", "/create-room", token=token)
        assert status == 401 and body["error"] == "INVALID_ID_TOKEN", token


async def test_create_room_expired_id_token(server):
    token = server.server.local_authority.issue("x", lifetime=-3600)
    status, body = await server.http("POST", "/create-room", token=token)
    assert status == 401 and "expired" in body["message"]


async def test_extend_room(server, room):
    status, body = await server.http(
        "POST", "/extend-room", {"room_id": room["room_id"], "ttl_sec": 100}, token=room["id_token"]
    )
    assert status == 200 and body["room_id"] == room["room_id"] and abs(body["expires_at"] - time.time() - 100) < 5
    # a peer registered in the room may extend it; a stranger may not
    peer = await server.signin()
    stranger = await server.signin()
    async with ws_peer(server.ws_url) as p:
        await register(p, room, "p", id_token=peer["id_token"])
        status, body = await server.http("POST", "/extend-room", {"room_id": room["room_id"]}, token=peer["id_token"])
        assert status == 200 and abs(body["expires_at"] - time.time() - 7200) < 5
        status, body = await server.http(
            "POST", "/extend-room", {"room_id": room["room_id"]}, token=stranger["id_token"]
        )
        assert status == 403
    status, body = await server.http("POST", "/extend-room", {"room_id": "nope"}, token=room["id_token"])
    assert status == 404 and body["error"] == "ROOM_NOT_FOUND"
    status, body = await server.http(
        "POST", "/extend-room", {"room_id": room["room_id"], "ttl_sec": -1}, token=room["id_token"]
    )
    assert status == 400
    status, body = await server.http("POST", "/extend-room", {"room_id": room["room_id"]})
    assert status == 401


async def test_delete_by_creator_disconnects_everyone(server, room):
    peer = await server.signin()
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "a", id_token=peer["id_token"])
        await register(b, room, "b", id_token=peer["id_token"])
        status, body = await server.http("POST", "/delete-peers-and-room", {"peer_id": "a"}, token=room["id_token"])
        assert status == 200 and "status" in body
        assert await a.closed() == 1000
        assert await b.closed() == 1000
    async with ws_peer(server.ws_url) as c:
        err = await register(c, room, "c")
        assert err["code"] == "ROOM_NOT_FOUND"


async def test_delete_by_own_peer(server, room):
    me = await server.signin()
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "a", id_token=me["id_token"])
        await register(b, room, "b")
        status, body = await server.http("POST", "/delete-peers-and-room", {"peer_id": "a"}, token=me["id_token"])
        assert status == 200 and "active" in body["status"]
        assert await a.closed() == 1000
        assert (await b.request({"type": "discover_peers"}))["count"] == 0
        # b is still there: the room is kept
    async with ws_peer(server.ws_url) as c:
        assert (await register(c, room, "c"))["type"] == "registered_auth"


async def test_delete_without_bearer_v1_flow(server, room):
    async with ws_peer(server.ws_url) as a, ws_peer(server.ws_url) as b:
        await register(a, room, "a")
        await register(b, room, "b")
        # a stranger (no bearer, or someone else's) cannot remove a connected peer
        status, body = await server.http("POST", "/delete-peers-and-room", {"peer_id": "a"})
        assert status == 403 and body["error"] and body["message"]
        stranger = await server.signin()
        status, body = await server.http("POST", "/delete-peers-and-room", {"peer_id": "a"}, token=stranger["id_token"])
        assert status == 403
        assert await a.nothing_pending()
    # v1: the client closes its own socket, then calls without a bearer
    status, body = await server.http("POST", "/delete-peers-and-room", {"peer_id": "a"})
    assert status == 200 and body["status"]
    async with ws_peer(server.ws_url) as c:
        err = await register(c, room, "c")
        assert err["code"] == "ROOM_NOT_FOUND"


async def test_delete_without_bearer_keeps_live_room(server, room):
    async with ws_peer(server.ws_url) as keeper:
        await register(keeper, room, "keeper")
        async with ws_peer(server.ws_url) as a:
            await register(a, room, "a")
        # a is gone (wait until the room saw it leave)
        with trio.fail_after(5):
            while (await keeper.request({"type": "discover_peers"}))["count"]:
                pass
        status, body = await server.http("POST", "/delete-peers-and-room", {"peer_id": "a"})
        assert status == 200 and "active" in body["status"]
        assert await keeper.nothing_pending()
    status, body = await server.http("POST", "/delete-peers-and-room", {"peer_id": "never-seen"})
    assert status == 200 and body["status"] == "peer not found"
    status, body = await server.http("POST", "/delete-peers-and-room", {})
    assert status == 400 and body["error"] == "MISSING_FIELDS"


async def test_http_errors_are_json(server):
    status, body = await server.http("GET", "/nope")
    assert status == 404 and body["error"]
    status, body = await server.http("GET", "/create-room")
    assert status == 405 and body["error"]


async def test_anonymous_signin_404_when_not_local():
    # oidc mode is configured elsewhere; here only that local-only endpoints say so
    async with open_test_server() as srv:
        srv.server.local_authority = None
        status, body = await srv.http("POST", "/anonymous-signin")
        assert status == 404 and "local" in body["message"]
