"""auth=oidc against a second in-process issuer publishing its JWKS over HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
import trio
from joserfc.jwk import RSAKey

from conftest import register, ws_peer
from issuer import FakeIssuer
from signaling_trio.testing import open_test_server


@pytest.fixture
async def issuer(nursery):
    iss = FakeIssuer(nursery)
    await iss.up()
    return iss


@pytest.fixture
async def oidc_server(issuer):
    async with open_test_server(auth="oidc", oidc_issuer=issuer.url, oidc_audience="client-app") as srv:
        yield srv


async def test_accepts_issuer_tokens(oidc_server, issuer):
    token = issuer.token(sub="alice")
    status, room = await oidc_server.http("POST", "/create-room", token=token)
    assert status == 200
    async with ws_peer(oidc_server.ws_url) as p:
        reply = await register(p, {**room, "id_token": token}, "alice-laptop")
        assert reply["type"] == "registered_auth"


async def test_rejections(oidc_server, issuer):
    other = RSAKey.generate_key(2048, parameters={"kid": issuer.keys[-1].kid})  # same kid, wrong key
    now = int(time.time())
    public_pem = issuer.keys[-1].as_pem(private=False)
    bad = {
        "other issuer's key": issuer.token(key=other),
        "wrong audience": issuer.token(aud="someone-else"),
        "no audience": issuer.token(aud=None),
        "wrong issuer": issuer.token(iss="https://evil.example"),
        "expired": issuer.token(exp=now - 3600),
        "not yet valid": issuer.token(nbf=now + 3600),
        "no sub": issuer.token(sub=None),
        "alg none": _unsigned(
            {"alg": "none", "kid": issuer.keys[-1].kid},
            {"iss": issuer.url, "aud": "client-app", "sub": "x", "exp": now + 600},
        ),
        "HS256 with the public key": _hs256_with(
            public_pem,
            {"alg": "HS256", "kid": issuer.keys[-1].kid},
            {"iss": issuer.url, "aud": "client-app", "sub": "x", "exp": now + 600},
        ),
        "garbage": "not.a.jwt",
    }
    for why, token in bad.items():
        status, body = await oidc_server.http("POST", "/create-room", token=token)
        assert status == 401, why
        assert body["error"] == "INVALID_ID_TOKEN", why
    status, body = await oidc_server.http("POST", "/anonymous-signin")
    assert status == 404 and "identity provider" in body["message"]
    status, body = await oidc_server.http("GET", "/.well-known/jwks.json")
    assert status == 404


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unsigned(header, claims):
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def _hs256_with(secret: bytes, header, claims):
    """The classic key-confusion attack: an HMAC keyed with the issuer's public key."""
    signing_input = _unsigned(header, claims)[:-1]
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


async def test_key_rotation_picked_up_without_restart(oidc_server, issuer):
    assert (await oidc_server.http("POST", "/create-room", token=issuer.token()))[0] == 200
    oidc = oidc_server.server.oidc
    fetches = oidc.fetches
    new_key = issuer.rotate()
    # a token with the new kid right after a fetch is refused (refetch rate limit)...
    assert (await oidc_server.http("POST", "/create-room", token=issuer.token(key=new_key)))[0] == 401
    assert oidc.fetches == fetches
    # ...and accepted once the rate-limit interval has passed, without a restart
    oidc._last_attempt -= oidc.min_refetch_interval
    assert (await oidc_server.http("POST", "/create-room", token=issuer.token(key=new_key)))[0] == 200
    assert oidc_server.server.oidc.fetches == fetches + 1


async def test_unknown_kid_flood_is_rate_limited(oidc_server, issuer):
    stranger = RSAKey.generate_key(2048, parameters={"kid": "nobody"})
    before = issuer.requests
    for i in range(20):
        status, _ = await oidc_server.http("POST", "/create-room", token=issuer.token(key=stranger, sub=f"s{i}"))
        assert status == 401
    assert issuer.requests - before <= 1


async def test_issuer_down_cached_keys_still_verify(oidc_server, issuer):
    token = issuer.token(sub="bob")
    assert (await oidc_server.http("POST", "/create-room", token=token))[0] == 200
    await issuer.down()
    oidc_server.server.oidc.cache._claims.clear()  # force a real signature check
    fresh = issuer.token(sub="carol")  # signed by a key the server already has
    status, _ = await oidc_server.http("POST", "/create-room", token=fresh)
    assert status == 200
    status, health = await oidc_server.http("GET", "/health")
    assert status == 200


async def test_start_with_issuer_down_then_recovers(nursery):
    issuer = FakeIssuer(nursery)
    await issuer.up()
    await issuer.down()
    async with open_test_server(auth="oidc", oidc_issuer=issuer.url, oidc_audience="client-app") as srv:
        status, health = await srv.http("GET", "/health")
        assert status == 503 and health["checks"]["jwks"] == "unavailable"
        status, body = await srv.http("POST", "/create-room", token=issuer.token())
        assert status == 401 and "not available" in body["message"]
        await issuer.up()
        with trio.fail_after(15):  # the background retry runs every 5 s until keys arrive
            while not srv.server.oidc.ready:
                await trio.sleep(0.1)
        assert (await srv.http("GET", "/health"))[0] == 200
        assert (await srv.http("POST", "/create-room", token=issuer.token()))[0] == 200


async def test_jwks_url_option(issuer):
    async with open_test_server(auth="oidc", oidc_issuer="https://cognito-idp.example/pool", oidc_audience="client-app",
                                oidc_jwks_url=issuer.url + "/.well-known/jwks.json") as srv:
        token = issuer.token(iss="https://cognito-idp.example/pool")
        assert (await srv.http("POST", "/create-room", token=token))[0] == 200
