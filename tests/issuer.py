"""A tiny OIDC issuer for tests: publishes a JWKS over real HTTP on 127.0.0.1 and signs
tokens with its keys. It can rotate keys and go down (its listener really closes)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import socket
import time
import urllib.parse
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey


class FakeIssuer:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.keys: list[RSAKey] = []
        self.requests = 0
        self.port = 0
        self._stop: trio.Event | None = None
        self._stopped: trio.Event | None = None
        self.rotate()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rotate(self) -> RSAKey:
        key = RSAKey.generate_key(2048, parameters={"kid": f"k{len(self.keys) + 1}", "use": "sig", "alg": "RS256"})
        self.keys.append(key)
        return key

    def token(self, *, key: RSAKey | None = None, alg: str = "RS256", **claims: Any) -> str:
        key = key or self.keys[-1]
        now = int(time.time())
        body = {"iss": self.url, "aud": "client-app", "sub": "user-1", "exp": now + 600, "iat": now, "token_use": "id"}
        body.update(claims)
        return jwt.encode({"alg": alg, "kid": key.kid}, {k: v for k, v in body.items() if v is not None}, key)

    async def app(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.requests += 1
        if scope["path"] == "/.well-known/jwks.json":
            body = json.dumps(KeySet(self.keys).as_dict(private=False)).encode()
            status = 200
        else:
            body, status = b"{}", 404
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": body})

    async def up(self) -> None:
        if not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        config = Config()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.graceful_timeout = 0.1
        self._stop, self._stopped = trio.Event(), trio.Event()
        stop, stopped = self._stop, self._stopped

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await serve(self.app, config, shutdown_trigger=stop.wait, task_status=task_status)
            finally:
                stopped.set()

        await self.nursery.start(run)

    async def down(self) -> None:
        assert self._stop is not None and self._stopped is not None
        self._stop.set()
        await self._stopped.wait()


class FakeProvider(FakeIssuer):
    """An OAuth 2.0 / OIDC provider for login tests, on real HTTP: discovery, an
    authorization endpoint that approves at once (302 back with a code), a token endpoint
    that checks the code, the redirect URI, the client and the PKCE S256 verifier, and
    GitHub's endpoints (`/login/oauth/...`, `/user`) with the same rules."""

    def __init__(self, nursery: trio.Nursery, client_id: str = "signaling", client_secret: str | None = None) -> None:
        super().__init__(nursery)
        self.client_id, self.client_secret = client_id, client_secret
        self.user = {"sub": "u-1234", "preferred_username": "dana"}
        self.codes: dict[str, dict[str, str]] = {}
        self.tokens: set[str] = set()
        self.exchanges: list[dict[str, str]] = []  # what each token request sent (PKCE checked)

    def openid_configuration(self) -> dict[str, Any]:
        return {"issuer": self.url, "authorization_endpoint": self.url + "/authorize",
                "token_endpoint": self.url + "/token", "jwks_uri": self.url + "/.well-known/jwks.json",
                "response_types_supported": ["code"], "code_challenge_methods_supported": ["S256"]}

    def authorize(self, query: dict[str, str]) -> tuple[int, dict[str, Any], list[tuple[bytes, bytes]]]:
        if query.get("client_id") != self.client_id or query.get("code_challenge_method") != "S256":
            return 400, {"error": "invalid_request"}, []
        code = secrets.token_urlsafe(16)
        self.codes[code] = query
        target = f"{query['redirect_uri']}?{urllib.parse.urlencode({'code': code, 'state': query['state']})}"
        return 302, {}, [(b"location", target.encode())]

    def exchange(self, form: dict[str, str], *, github: bool) -> tuple[int, dict[str, Any]]:
        self.exchanges.append(form)
        asked = self.codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if (asked is None or form.get("redirect_uri") != asked["redirect_uri"] or challenge != asked["code_challenge"]
                or form.get("client_id") != self.client_id
                or (self.client_secret is not None and form.get("client_secret") != self.client_secret)):
            return 400, {"error": "invalid_grant"}
        access = secrets.token_urlsafe(16)
        self.tokens.add(access)
        answer: dict[str, Any] = {"access_token": access, "token_type": "bearer", "scope": asked.get("scope", "")}
        if not github:
            answer["id_token"] = self.token(aud=self.client_id, nonce=asked.get("nonce"), **self.user)
        return 200, answer

    async def app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await super().app(scope, receive, send)
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        query = dict(urllib.parse.parse_qsl(scope["query_string"].decode()))
        form = dict(urllib.parse.parse_qsl(body.decode()))
        path, headers = scope["path"], dict(scope["headers"])
        extra: list[tuple[bytes, bytes]] = []
        if path == "/.well-known/openid-configuration":
            status, answer = 200, self.openid_configuration()
        elif path in ("/authorize", "/login/oauth/authorize"):
            status, answer, extra = self.authorize(query)
        elif path in ("/token", "/login/oauth/access_token"):
            status, answer = self.exchange(form, github=path.startswith("/login"))
        elif path == "/user":
            ok = headers.get(b"authorization", b"").decode().removeprefix("Bearer ") in self.tokens
            status, answer = (200, {"id": 4242, "login": "octo-cat", "avatar_url": ""}) if ok else (401, {})
        else:
            return await super().app(scope, _replayed(body), send)
        self.requests += 1
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


def _replayed(body: bytes):
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    return receive
