"""Today's sleap-rtc dialect (SPEC section 4) over real sockets, frames as the 0.0.7
programs send them (../shared/SLEAP-RTC-CLIENTS.md): the /api/auth provisioning the CLI
calls, `register` with an account key, a worker token and a JWT, the extended
registered_auth, the admin role, JSON pings, routed errors and the mesh relays,
/delete-peer; and the TURN credential scheme against an independent HMAC (openssl)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import time
from typing import Any

import pytest
import trio

from conftest import register, ws_peer
from signaling_trio.ice import IceConfig, turn_credential
from signaling_trio.testing import TestServer, open_test_server

WORKER_META = {"tags": ["sleap-rtc", "training-worker"],
               "properties": {"gpu_memory_mb": 24000, "status": "available", "worker_name": "gpu1"}}


async def user(server: TestServer) -> str:
    return (await server.signin())["id_token"]


async def provisioned(server: TestServer) -> dict[str, Any]:
    """An owner with a room and an account key, as `room create` and `key create` make them."""
    jwt = await user(server)
    status, room = await server.http("POST", "/api/auth/rooms", {"expires_in_days": None, "name": "lab"}, token=jwt)
    assert status == 200, room
    assert room["expires_at"] is None and room["name"] == "lab" and room["room_token"]
    status, key = await server.http("POST", "/api/auth/account-keys", {"name": "gpu box"}, token=jwt)
    assert status == 200 and key["key_id"].startswith("slp_acct_"), key
    return {"jwt": jwt, "room_id": room["room_id"], "room_token": room["room_token"], "key": key["key_id"]}


def worker_register(room_id: str, api_key: str, peer_id: str | None = None, is_admin: bool = True) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "register", "role": "worker", "is_admin": is_admin, "api_key": api_key,
                           "room_id": room_id, "metadata": WORKER_META}
    if peer_id is not None:
        msg["peer_id"] = peer_id
    return msg


def client_register(room_id: str, jwt: str, peer_id: str = "alice") -> dict[str, Any]:
    return {"type": "register", "peer_id": peer_id, "room_id": room_id, "token": None, "role": "client",
            "jwt": jwt, "metadata": {"tags": ["sleap-rtc", "training-client"], "properties": {}}}


async def test_the_cli_provisioning_endpoints(server):
    p = await provisioned(server)
    jwt = p["jwt"]
    status, listed = await server.http("GET", "/api/auth/rooms?role=owner", token=jwt)
    assert status == 200 and [r["room_id"] for r in listed["rooms"]] == [p["room_id"]]
    assert listed["rooms"][0]["role"] == "owner" and listed["rooms"][0]["name"] == "lab"
    # the account key works as a Bearer too; a listing never shows a usable key
    status, keys = await server.http("GET", "/api/auth/account-keys", token=p["key"])
    assert status == 200 and len(keys["keys"]) == 1 and not keys["keys"][0]["key_id"].startswith("slp_acct_")
    assert p["key"] not in str(keys)
    # invite and join: another user becomes a member
    status, invite = await server.http("POST", f"/api/auth/rooms/{p['room_id']}/invite", token=jwt)
    assert status == 200 and invite["invite_code"]
    other = await user(server)
    status, joined = await server.http("POST", "/api/auth/rooms/join", {"invite_code": invite["invite_code"]},
                                       token=other)
    assert status == 200 and joined == {"room_id": p["room_id"], "role": "member"}
    status, listed = await server.http("GET", "/api/auth/rooms?role=member", token=other)
    assert [r["room_id"] for r in listed["rooms"]] == [p["room_id"]]
    status, members = await server.http("GET", f"/api/auth/rooms/{p['room_id']}/members", token=jwt)
    assert sorted(m["role"] for m in members["members"]) == ["member", "owner"]
    # a member may not delete; the owner may
    status, body = await server.http("DELETE", f"/api/auth/rooms/{p['room_id']}", token=other)
    assert status == 403 and body["error"] == "ROOM_ACCESS_DENIED"
    # bad input: clear errors
    status, body = await server.http("POST", "/api/auth/rooms", {"expires_in_days": 999}, token=jwt)
    assert status == 400 and body["error"] == "INVALID_MESSAGE"
    status, body = await server.http("POST", "/api/auth/rooms/join", {"invite_code": "nope"}, token=other)
    assert status == 404 and body["error"] == "INVALID_INVITE"
    status, body = await server.http("GET", "/api/auth/rooms", token="slp_acct_not-a-key")
    assert status == 401 and body["error"] == "INVALID_API_KEY"
    status, body = await server.http("DELETE", f"/api/auth/rooms/{p['room_id']}", token=jwt)
    assert status == 200


async def test_a_worker_registers_with_an_account_key_and_a_client_with_its_jwt(server):
    p = await provisioned(server)
    async with ws_peer(server.ws_url) as w, ws_peer(server.ws_url) as c:
        auth = await w.request(worker_register(p["room_id"], p["key"]))
        assert auth["type"] == "registered_auth", auth
        worker_id = auth["peer_id"]
        assert worker_id.startswith("worker-") and auth["room_id"] == p["room_id"] and auth["token"] is None
        assert auth["admin_peer_id"] == worker_id and auth["peer_list"] == [] and auth["peer_metadata"] == {}
        assert auth["ice_servers"] == [] and auth["mesh_ice_servers"] == []
        # the client (the room's owner here) registers with its JWT and a null token
        cauth = await c.request(client_register(p["room_id"], p["jwt"]))
        assert cauth["type"] == "registered_auth" and cauth["peer_id"] == "alice" and cauth["peer_list"] == [worker_id]
        found = await c.request({"type": "discover_peers", "from_peer_id": "alice", "filters": {
            "role": "worker", "room_id": p["room_id"], "tags": ["sleap-rtc"],
            "properties": {"status": "available", "gpu_memory_mb": {"$gte": 8000}}}})
        assert [peer["peer_id"] for peer in found["peers"]] == [worker_id]
        # the offer reaches the worker with the sender's role; a busy worker's error goes back
        await c.send({"type": "offer", "sender": "alice", "target": worker_id, "sdp": "v=0"})
        offer = await w.recv_type("offer")
        assert offer["role"] == "client" and offer["sender"] == "alice"
        await w.send({"type": "error", "target": "alice", "reason": "worker_busy", "message": "busy",
                      "current_status": "reserved"})
        busy = await c.recv_type("error")
        assert busy["reason"] == "worker_busy" and busy["sender"] == worker_id
        # status updates answer with the merged metadata; a re-register on the same socket
        # keeps the generated peer id
        updated = await w.request({"type": "update_metadata", "peer_id": worker_id,
                                   "metadata": {"properties": {"status": "busy"}}})
        assert updated["metadata"]["properties"] == {**WORKER_META["properties"], "status": "busy"}
        again = await w.request(worker_register(p["room_id"], p["key"]))
        assert again["type"] == "registered_auth" and again["peer_id"] == worker_id


async def test_refusals_are_clear_register_errors(server):
    p = await provisioned(server)
    stranger = await user(server)
    async with ws_peer(server.ws_url) as peer:
        err = await peer.request(worker_register(p["room_id"], "slp_acct_unknown"))
        assert err["type"] == "error" and err["code"] == "INVALID_API_KEY" and err["reason"]
        err = await peer.request(client_register(p["room_id"], stranger))
        assert err["code"] == "ROOM_ACCESS_DENIED"
        err = await peer.request(client_register(p["room_id"], "not.a.jwt"))
        assert err["code"] == "INVALID_ID_TOKEN"
        err = await peer.request({**worker_register(p["room_id"], p["key"]), "room_id": None})
        assert err["code"] == "MISSING_FIELDS"
        # with the room's token a non-member gets in (SPEC 4)
        ok = await peer.request({**client_register(p["room_id"], stranger, "bob"), "token": p["room_token"]})
        assert ok["type"] == "registered_auth"
    # a revoked key is refused from then on
    status, _ = await server.http("DELETE", f"/api/auth/account-keys/{p['key']}", token=p["jwt"])
    assert status == 200
    async with ws_peer(server.ws_url) as peer:
        err = await peer.request(worker_register(p["room_id"], p["key"]))
        assert err["code"] == "INVALID_API_KEY"


async def test_a_worker_token_admits_to_its_own_room_only(server):
    p = await provisioned(server)
    status, tok = await server.http("POST", "/api/auth/token", {"room_id": p["room_id"], "worker_name": "gpu1"},
                                    token=p["jwt"])
    assert status == 200 and tok["token_id"].startswith("slp_") and tok["room_id"] == p["room_id"]
    async with ws_peer(server.ws_url) as w:
        auth = await w.request({**worker_register(p["room_id"], tok["token_id"]), "room_id": None})
        assert auth["type"] == "registered_auth" and auth["room_id"] == p["room_id"]
        err = await w.request(worker_register("another-room", tok["token_id"]))
        assert err["code"] == "ROOM_ACCESS_DENIED"
    status, tokens = await server.http("GET", "/api/auth/tokens", token=p["jwt"])
    assert [t["is_active"] for t in tokens["tokens"]] == [True]
    await server.http("DELETE", f"/api/auth/token/{tokens['tokens'][0]['token_id']}", token=p["jwt"])
    async with ws_peer(server.ws_url) as w:
        err = await w.request(worker_register(p["room_id"], tok["token_id"]))
        assert err["code"] == "INVALID_API_KEY"


async def test_the_admin_role_and_the_mesh(server):
    p = await provisioned(server)
    async with ws_peer(server.ws_url) as w1, ws_peer(server.ws_url) as w2:
        a1 = await w1.request(worker_register(p["room_id"], p["key"], "w1"))
        a2 = await w2.request(worker_register(p["room_id"], p["key"], "w2"))
        assert a1["admin_peer_id"] == "w1" and a2["admin_peer_id"] == "w1"
        assert a2["peer_list"] == ["w1"] and a2["peer_metadata"]["w1"] == WORKER_META
        assert await w2.nothing_pending()  # registered_auth named the admin: no conflict frame
        again = await w2.request(worker_register(p["room_id"], p["key"], "w2"))  # claims it again
        assert again["admin_peer_id"] == "w1"
        assert await w2.recv_type("admin_conflict") == {"type": "admin_conflict", "current_admin": "w1"}
        await w2.send({"type": "mesh_connect", "target_peer_id": "w1", "offer": {"sdp": "x"}})
        mesh = await w1.recv_type("mesh_offer")
        assert mesh["from_peer_id"] == "w2" and mesh["offer"] == {"sdp": "x"}
        await w1.send({"type": "mesh_answer", "target_peer_id": "w2", "answer": {"sdp": "y"}})
        assert (await w2.recv_type("mesh_answer"))["from_peer_id"] == "w1"
        await w1.send({"type": "ice_candidate", "target_peer_id": "w2", "candidate": {"candidate": "c"}})
        assert (await w2.recv_type("ice_candidate"))["candidate"] == {"candidate": "c"}
    # the admin left: the next worker to claim it gets it
    async with ws_peer(server.ws_url) as w3:
        a3 = await w3.request(worker_register(p["room_id"], p["key"], "w3"))
        assert a3["admin_peer_id"] == "w3"


async def test_json_pings_for_this_dialect_only():
    async with open_test_server(app_ping_interval=0.3) as server:
        p = await provisioned(server)
        v2 = await server.new_room()
        async with ws_peer(server.ws_url) as w, ws_peer(server.ws_url) as old:
            await w.request(worker_register(p["room_id"], p["key"]))
            await register(old, v2, "v2-peer")
            assert await w.recv_type("ping", timeout=3) == {"type": "ping"}
            assert await w.recv_type("ping", timeout=3) == {"type": "ping"}
            with trio.move_on_after(1.0):
                frame = await old.recv(timeout=2)
                pytest.fail(f"a v2 connection got {frame}")


async def test_delete_peer_is_always_200_and_never_kicks_a_live_peer_of_someone_else(server):
    p = await provisioned(server)
    async with ws_peer(server.ws_url) as c:
        await c.request(client_register(p["room_id"], p["jwt"]))
        status, _ = await server.http("POST", "/delete-peer", {"peer_id": "alice"})
        assert status == 200
        status, _ = await server.http("POST", "/delete-peer", {"peer_id": "alice"}, token=await user(server))
        assert status == 200
        assert await c.nothing_pending()  # still connected
        status, _ = await server.http("POST", "/delete-peer", {"peer_id": "alice"}, token=p["jwt"])
        assert status == 200 and await c.closed() == 1000
    status, _ = await server.http("POST", "/delete-peer", {"peer_id": "never-seen"})
    assert status == 200


async def test_the_room_owner_deletes_a_room_by_its_id(server):
    p = await provisioned(server)
    status, body = await server.http("POST", "/delete-peers-and-room", {"room_id": p["room_id"]},
                                     token=await user(server))
    assert status == 403
    status, body = await server.http("POST", "/delete-peers-and-room", {"room_id": p["room_id"]}, token=p["jwt"])
    assert status == 200 and "deleted" in body["status"]


async def test_authorized_keys_for_members(server):
    p = await provisioned(server)
    status, _ = await server.http("POST", "/api/auth/public-keys", {"public_key": "AAAA", "device_name": "laptop"},
                                  token=p["jwt"])
    assert status == 200
    status, keys = await server.http("GET", f"/api/rooms/{p['room_id']}/authorized-keys", token=p["key"])
    assert status == 200 and [k["public_key"] for k in keys["authorized_keys"]] == ["AAAA"]
    status, _ = await server.http("GET", f"/api/rooms/{p['room_id']}/authorized-keys", token=await user(server))
    assert status == 403


# ------------------------------------------------------------------ ICE servers
@pytest.mark.skipif(shutil.which("openssl") is None and os.environ.get("CI") != "true",
                    reason="openssl is the independent HMAC-SHA1 here (under CI its absence fails)")
def test_turn_credentials_follow_coturns_shared_secret_scheme():
    secret, user_id, expiry = "north-lab-secret", "alice", 1767225600
    username, credential = turn_credential(secret, user_id, expiry)
    assert username == "1767225600:alice"
    # what coturn computes for use-auth-secret: base64(HMAC-SHA1(secret, username))
    out = subprocess.run(["openssl", "dgst", "-sha1", "-hmac", secret, "-binary"], input=username.encode(),
                         capture_output=True, check=True)
    assert credential == base64.b64encode(out.stdout).decode()
    assert credential == base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()


def test_turn_credentials_handed_out_are_never_expired():
    ice = IceConfig.from_settings('[{"urls": ["stun:10.0.0.1:3478"]}]', "turn:10.0.0.1:3478", "s", 600)
    servers = ice.servers_for("alice", now=1000.0)
    assert servers[0] == {"urls": ["stun:10.0.0.1:3478"]}
    expiry = int(servers[1]["username"].split(":")[0])
    assert expiry == 1600 and servers[1]["urls"] == ["turn:10.0.0.1:3478"]
    later = ice.servers_for("alice", now=5000.0)  # each registration gets a fresh one
    assert int(later[1]["username"].split(":")[0]) == 5600


async def test_registered_auth_and_the_http_endpoint_carry_the_ice_servers():
    async with open_test_server(ice_servers='[{"urls": ["stun:127.0.0.1:3478"]}]', turn_urls="turn:127.0.0.1:3478",
                                turn_secret="s3cret") as server:
        p = await provisioned(server)
        async with ws_peer(server.ws_url) as w:
            auth = await w.request(worker_register(p["room_id"], p["key"]))
        assert auth["ice_servers"][0] == {"urls": ["stun:127.0.0.1:3478"]}
        turn = auth["ice_servers"][1]
        expiry, who = turn["username"].split(":", 1)
        assert int(expiry) > time.time() + 86000 and turn["urls"] == ["turn:127.0.0.1:3478"]
        assert turn["credential"] == turn_credential("s3cret", who, int(expiry))[1]
        status, body = await server.http("GET", "/api/ice-servers", token=p["jwt"])
        assert status == 200 and len(body["ice_servers"]) == 2 and body["ice_servers"][1]["credential"]
        status, _ = await server.http("GET", "/api/ice-servers")
        assert status == 401


async def test_an_operator_gives_a_user_a_jwt_without_a_browser(tmp_path, capsys):
    from signaling_trio.__main__ import main

    creds = tmp_path / "home" / "credentials.json"
    creds.parent.mkdir()
    creds.write_text('{"account_key": "slp_acct_kept"}')
    assert main(["user", "token", "carol", "--data-dir", str(tmp_path / "data"), "--write-credentials",
                 str(creds)]) == 0
    jwt = capsys.readouterr().out.strip()
    saved = json.loads(creds.read_text())
    assert saved == {"account_key": "slp_acct_kept", "jwt": jwt, "user": {"id": "carol", "username": "carol"}}
    assert creds.stat().st_mode & 0o777 == 0o600
    async with open_test_server(store="sqlite", data_dir=str(tmp_path / "data")) as server:
        status, room = await server.http("POST", "/api/auth/rooms", {"name": "carol's"}, token=jwt)
        assert status == 200
        async with ws_peer(server.ws_url) as c:
            auth = await c.request(client_register(room["room_id"], jwt, "carol"))
            assert auth["type"] == "registered_auth" and auth["peer_id"] == "carol"
    assert main(["user", "token", "", "--data-dir", str(tmp_path / "data")]) == 2


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_accounts_on_every_lasting_store(store, tmp_path, request):
    """sqlite: across a restart; Redis: across two instances (the key made on one, used
    on the other; a never-expiring room keeps its record)."""
    if store == "redis":
        url = request.getfixturevalue("redis").url
        first, second = {"store": url}, {"store": url}
    else:
        first = second = {"store": "sqlite", "data_dir": str(tmp_path)}
    async with open_test_server(**first) as a:
        p = await provisioned(a)
        if store == "sqlite":
            await a.http("GET", "/health")
        else:
            async with open_test_server(**second) as b, ws_peer(b.ws_url) as w, ws_peer(a.ws_url) as c:
                auth = await w.request(worker_register(p["room_id"], p["key"]))
                assert auth["type"] == "registered_auth" and auth["room_id"] == p["room_id"]
                status, rooms = await b.http("GET", "/api/auth/rooms", token=p["key"])
                assert status == 200 and rooms["rooms"][0]["expires_at"] is None
                # its client on the other instance: registers, finds it, offers with its role
                cauth = await c.request(client_register(p["room_id"], p["jwt"]))
                assert cauth["type"] == "registered_auth" and cauth["peer_list"] == [auth["peer_id"]]
                found = await c.request({"type": "discover_peers", "filters": {"role": "worker"}})
                assert [peer["peer_id"] for peer in found["peers"]] == [auth["peer_id"]]
                await c.send({"type": "offer", "sender": "alice", "target": auth["peer_id"], "sdp": "v=0"})
                assert (await w.recv_type("offer"))["role"] == "client"
            return
    async with open_test_server(**second) as b, ws_peer(b.ws_url) as w:
        auth = await w.request(worker_register(p["room_id"], p["key"]))
        assert auth["type"] == "registered_auth"
        status, rooms = await b.http("GET", "/api/auth/rooms", token=p["jwt"])
        assert status == 200 and rooms["rooms"][0]["expires_at"] is None


async def test_expired_invites_rooms_and_other_users_keys_are_refused(server):
    p = await provisioned(server)
    other = await user(server)
    # an invite past its hour
    status, invite = await server.http("POST", f"/api/auth/rooms/{p['room_id']}/invite", token=p["jwt"])
    store = server.server.rooms  # (writes through the kept room records, as the server's own do)
    doc = await store.get_doc(f"invite:{invite['invite_code']}")
    await store.put_doc(f"invite:{invite['invite_code']}", {**doc, "expires_at": time.time() - 1})
    status, body = await server.http("POST", "/api/auth/rooms/join", {"invite_code": invite["invite_code"]},
                                     token=other)
    assert status == 410 and body["error"] == "INVITE_EXPIRED"
    # one user cannot revoke (or even see) another's key
    status, body = await server.http("DELETE", f"/api/auth/account-keys/{p['key']}", token=other)
    assert status == 404 and body["error"] == "KEY_NOT_FOUND"
    status, keys = await server.http("GET", "/api/auth/account-keys", token=other)
    assert keys == {"keys": []}
    # malformed bodies
    status, body = await server.http("POST", "/api/auth/account-keys", ["not", "an", "object"], token=p["jwt"])
    assert status == 400 and body["error"] == "INVALID_MESSAGE"
    status, body = await server.http("POST", "/api/auth/token", {"room_id": p["room_id"]}, token=p["jwt"])
    assert status == 400 and body["error"] == "MISSING_FIELDS"
    status, body = await server.http("POST", "/api/auth/token", {"room_id": p["room_id"], "worker_name": "w"},
                                     token=p["key"])  # worker tokens: the JWT only
    assert status == 401
    # an expired room refuses new registrations
    await store.set_expiry(p["room_id"], time.time() - 1)
    async with ws_peer(server.ws_url) as w:
        err = await w.request(worker_register(p["room_id"], p["key"]))
        assert err["code"] == "ROOM_EXPIRED"


async def test_secrets_never_reach_the_log(caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="signaling_trio")
    async with open_test_server(turn_urls="turn:127.0.0.1:3478", turn_secret="very-secret-turn") as server:
        p = await provisioned(server)
        async with ws_peer(server.ws_url) as w, ws_peer(server.ws_url) as c:
            await w.request(worker_register(p["room_id"], p["key"]))
            await c.request(client_register(p["room_id"], p["jwt"]))
            await w.request(worker_register(p["room_id"], "slp_acct_wrong-key"))
        await server.http("DELETE", f"/api/auth/account-keys/{p['key']}", token=p["jwt"])
    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "account key created" in logged  # the log is what was captured
    for secret in (p["key"], p["jwt"], p["room_token"], "very-secret-turn", "slp_acct_wrong-key"):
        assert secret not in logged
