"""auth=oidc: verify id_tokens of an external issuer (AWS Cognito, Keycloak, Auth0, …).

Owns: the issuer's JWKS (fetched over HTTPS with httpx on trio, cached, refreshed on a
timer and on an unknown `kid`, the latter rate-limited), and the checks: signature with
an allow-listed asymmetric algorithm, `iss`, `aud`, `exp`, `nbf`, 30 s leeway.
Never touches: rooms, sockets; never logs a token.

An issuer that is down never blocks verification with the keys already cached. At start
the first fetch is tried once, quickly; if the issuer is unreachable the server starts
anyway, keeps retrying in the background, and `/health` answers 503 until keys arrive.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import trio
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import extract_compact

from ._log import event
from .auth import AuthError, TokenCache, decode_and_check

# Asymmetric only: "none" and HS* (an HMAC keyed with the public key) are never accepted.
ALLOWED_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


class OidcVerifier:
    def __init__(
        self,
        issuer: str,
        *,
        audience: str | None,
        jwks_url: str | None = None,
        refresh_interval: float = 600.0,
        min_refetch_interval: float = 30.0,
        fetch_timeout: float = 5.0,
    ) -> None:
        self.issuer = issuer.rstrip("/") if issuer.startswith("http") else issuer
        self.audience = audience
        self.jwks_url = jwks_url or self.issuer + "/.well-known/jwks.json"
        self.refresh_interval = refresh_interval
        self.min_refetch_interval = min_refetch_interval
        self.fetch_timeout = fetch_timeout
        self.keyset: KeySet | None = None
        self.kids: set[str] = set()
        self.cache = TokenCache()
        self.clock = time.time
        self.fetches = 0
        self._last_attempt = -float("inf")
        self._fetching: trio.Event | None = None
        self._client: httpx.AsyncClient | None = None

    # ------------------------------------------------------------ JWKS
    @property
    def ready(self) -> bool:
        return self.keyset is not None

    async def _fetch(self) -> bool:
        """Fetch the JWKS once (concurrent callers share one request)."""
        if self._fetching is not None:
            await self._fetching.wait()
            return self.ready
        self._fetching = trio.Event()
        self._last_attempt = trio.current_time()
        try:
            if self._client is None:
                self._client = httpx.AsyncClient(timeout=self.fetch_timeout, follow_redirects=True)
            with trio.fail_after(self.fetch_timeout + 1):
                resp = await self._client.get(self.jwks_url)
            resp.raise_for_status()
            data = resp.json()
            keyset = KeySet.import_key_set(data)
            self.keyset = keyset
            self.kids = {k.kid for k in keyset.keys if k.kid}
            self.fetches += 1
            event(logging.INFO, "jwks fetched", url=self.jwks_url, keys=len(keyset.keys))
            return True
        except (httpx.HTTPError, trio.TooSlowError, ValueError, KeyError, JoseError) as exc:
            event(logging.WARNING, "jwks fetch failed", url=self.jwks_url, error=type(exc).__name__)
            return False
        finally:
            self._fetching.set()
            self._fetching = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background refresh: quick first try, then retry until keys arrive, then a timer."""
        try:
            await self._fetch()
            task_status.started()
            while True:
                await trio.sleep(self.refresh_interval if self.ready else min(self.min_refetch_interval, 5.0))
                await self._fetch()
        finally:
            if self._client is not None:
                with trio.CancelScope(shield=True):
                    await self._client.aclose()

    # ------------------------------------------------------------ verify
    async def verify(self, token: str) -> dict[str, Any]:
        now = self.clock()
        cached = self.cache.get(token, now)
        if cached is not None:
            return cached
        if not isinstance(token, str) or not token:
            raise AuthError("id_token missing")
        try:
            header = extract_compact(token.encode()).protected
        except Exception:  # joserfc raises several types for garbage
            raise AuthError("id_token rejected: malformed") from None
        kid = header.get("kid")
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthError(f"id_token rejected: algorithm {alg!r} not allowed")
        needs_keys = self.keyset is None or (kid is not None and kid not in self.kids)
        if needs_keys and trio.current_time() - self._last_attempt >= self.min_refetch_interval:
            # An unknown key id: the issuer may have rotated. Refetch, but at most once
            # per min_refetch_interval, so a flood of bad tokens cannot hammer the issuer.
            await self._fetch()
        if self.keyset is None:
            raise AuthError("id_token rejected: the issuer's keys are not available yet")
        if kid is not None and kid not in self.kids:
            raise AuthError("id_token rejected: unknown key id")
        claims = decode_and_check(token, self.keyset, algorithms=ALLOWED_ALGORITHMS,
                                  issuer=self.issuer, audience=self.audience, now=now)
        self.cache.put(token, claims, now)
        return claims
