"""The sqlite store: rooms and the signing key survive a restart; store faults show."""

from __future__ import annotations

import os
import stat

import pytest
import trio

from joserfc.jwk import ECKey, RSAKey
from joserfc.jws import extract_compact

from conftest import register, ws_peer
from signaling_trio import ConfigError
from signaling_trio.testing import open_test_server


async def test_rooms_and_tokens_survive_restart(tmp_path):
    opts = {"store": "sqlite", "data_dir": str(tmp_path)}
    async with open_test_server(**opts) as srv:
        room = await srv.new_room()
    key = tmp_path / "signing-key.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    async with open_test_server(**opts) as srv:
        # the id_token from before the restart still verifies (same key), the room is there
        async with ws_peer(srv.ws_url) as p:
            assert (await register(p, room, "p"))["type"] == "registered_auth"
        status, _ = await srv.http("POST", "/extend-room", {"room_id": room["room_id"]}, token=room["id_token"])
        assert status == 200


async def test_signing_key_kinds(tmp_path):
    """A new data dir gets an EC P-256 key and ES256 tokens; an RSA key file (what earlier
    versions made) keeps signing RS256; an EC key on another curve is refused at start."""
    new, old, odd = tmp_path / "new", tmp_path / "old", tmp_path / "odd"
    for data, key in ((old, RSAKey.generate_key(2048)), (odd, ECKey.generate_key("P-384"))):
        data.mkdir()
        (data / "signing-key.pem").write_bytes(key.as_pem(private=True))
        os.chmod(data / "signing-key.pem", 0o600)
    for data, alg, kty in ((new, "ES256", "EC"), (old, "RS256", "RSA")):
        for _ in range(2):  # and again after a restart, from the file
            async with open_test_server(store="sqlite", data_dir=str(data)) as srv:
                room = await srv.new_room()
                assert extract_compact(room["id_token"].encode()).headers()["alg"] == alg
                _, jwks = await srv.http("GET", "/.well-known/jwks.json")
                assert [(k["kty"], k["alg"]) for k in jwks["keys"]] == [(kty, alg)]
                async with ws_peer(srv.ws_url) as p:
                    assert (await register(p, room, "p"))["type"] == "registered_auth"
    with pytest.raises(ConfigError, match="not an EC P-256 or RSA private key"):
        async with open_test_server(store="sqlite", data_dir=str(odd)):
            pass


async def test_sqlite_path_option(tmp_path):
    db = tmp_path / "sub" / "rooms.db"
    async with open_test_server(store=f"sqlite:{db}", data_dir=str(tmp_path / "data")) as srv:
        await srv.new_room()
    assert db.exists()


async def test_expired_rooms_purged_after_grace(tmp_path):
    async with open_test_server(store="sqlite", data_dir=str(tmp_path)) as srv:
        room = await srv.new_room()
        store = srv.server.rooms  # (the store behind the server's kept room records, as its API writes)
        await store.set_expiry(room["room_id"], 1000.0)
        assert await store.purge_expired(500.0) == 0  # still within its grace day
        async with ws_peer(srv.ws_url) as p:
            assert (await register(p, room, "p"))["code"] == "ROOM_EXPIRED"
        assert await store.purge_expired(2000.0) == 1
        async with ws_peer(srv.ws_url) as p:
            assert (await register(p, room, "p"))["code"] == "ROOM_NOT_FOUND"


async def test_readonly_store_reports_unhealthy(tmp_path):
    async with open_test_server(store="sqlite", data_dir=str(tmp_path)) as srv:
        room = await srv.new_room()
        async with ws_peer(srv.ws_url) as p:
            await register(p, room, "p")
            # the database file becomes unwritable under the running server
            db = srv.server.store._db
            db.execute("PRAGMA query_only = ON")
            status, body = await srv.http("GET", "/health")
            assert status == 503 and body["status"] == "unhealthy" and body["checks"]["store"] != "ok"
            status, body = await srv.http("POST", "/create-room", token=room["id_token"])
            assert status == 503 and body["error"] == "STORE_UNAVAILABLE"
            # connected peers stay connected
            assert (await p.request({"type": "discover_peers"}))["type"] == "peer_list"
            db.execute("PRAGMA query_only = OFF")
            status, body = await srv.http("GET", "/health")
            assert status == 200


async def test_unreachable_store_refuses_registration(tmp_path):
    async with open_test_server(store="sqlite", data_dir=str(tmp_path)) as srv:
        room = await srv.new_room()
        srv.server.rooms.ttl = 0  # every register reads the store (a kept record would outlive the outage)
        store = srv.server.store
        good_path = store.path
        # the database goes away: its path now lies under a regular file
        (tmp_path / "file").write_text("")
        store._db.close()
        store._db = None
        store.path = str(tmp_path / "file" / "db")
        async with ws_peer(srv.ws_url) as p:
            err = await register(p, room, "p")
            assert err["code"] == "STORE_UNAVAILABLE" and err["reason"]
            status, _ = await srv.http("GET", "/health")
            assert status == 503
            # and it comes back by itself
            store.path = good_path
            assert (await register(p, room, "p"))["type"] == "registered_auth"
            status, _ = await srv.http("GET", "/health")
            assert status == 200


async def test_store_check_at_start_fails_clearly(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="store"):
        async with open_test_server(store=f"sqlite:{tmp_path / 'file' / 'db'}", data_dir=str(tmp_path)):
            pass


async def test_a_stuck_sqlite_call_is_bounded(tmp_path):
    """sqlite runs in a worker thread; a call stuck there must still end at the caller's
    deadline (the thread is abandoned, not waited for)."""
    import time as _time

    from signaling_trio.store import StoreUnavailable, bounded

    async with open_test_server(store="sqlite", data_dir=str(tmp_path)) as srv:
        store = srv.server.store
        with trio.fail_after(4):  # liveness bound: without abandoning, this waits 6 s
            with pytest.raises(StoreUnavailable, match="did not answer"):
                await bounded(store._run, lambda db: _time.sleep(6), timeout=0.5)
