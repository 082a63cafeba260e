"""The login page's OAuth 2.0 providers: any OIDC provider, and GitHub's OAuth apps.

Owns: the authorization URL (code flow with PKCE S256, a state, and for OIDC a nonce),
the code exchange (authlib's httpx client, on trio through anyio), and who signed in:
for OIDC the id_token's claims, checked against the provider's JWKS (signature, iss,
aud = our client id, exp, nonce); for GitHub the `/user` the access token belongs to.
Never touches: sessions or cookies (`login`, `_http_login`); never logs a code or token.

OIDC endpoints come from `<issuer>/.well-known/openid-configuration`, read once per
sign-in: sign-ins are rare, and a provider's rotated keys are then always seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import warnings

import httpx
import trio
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ._oidc import ALLOWED_ALGORITHMS
from .auth import AuthError, decode_and_check
from .config import Settings
from .login import User

import authlib.deprecate  # noqa: E402,F401  (its "always" filter first, so ours below wins)

with warnings.catch_warnings():
    # authlib 1.9 asks for the `httpx2` fork, and falls back to httpx (which we already
    # use, and which runs on trio) with a deprecation warning at import: not for our log
    warnings.simplefilter("ignore")
    from authlib.integrations.httpx_client import AsyncOAuth2Client

TIMEOUT = 10.0


class ProviderError(Exception):
    """The provider refused, failed or answered nonsense: the sign-in ends with this."""


@dataclass(frozen=True, slots=True)
class Flow:
    """One sign-in under way, kept in the browser's session until the callback."""

    state: str
    verifier: str  # PKCE code_verifier
    nonce: str


class Provider(Protocol):
    label: str  # how the page names it ("Sign in with …")

    async def authorize_url(self, redirect_uri: str, flow: Flow) -> str: ...
    async def user(self, code: str, redirect_uri: str, flow: Flow) -> User: ...


def _client(s: Settings, redirect_uri: str, scope: str) -> AsyncOAuth2Client:
    return AsyncOAuth2Client(s.login_client_id, s.login_client_secret, scope=scope, redirect_uri=redirect_uri,
                             code_challenge_method="S256", timeout=TIMEOUT,
                             token_endpoint_auth_method="client_secret_post" if s.login_client_secret else "none")


async def _json(client: AsyncOAuth2Client, url: str, **kwargs: Any) -> dict[str, Any]:
    try:
        with trio.fail_after(TIMEOUT + 1):
            resp = await client.request("GET", url, withhold_token=True, **kwargs)
        resp.raise_for_status()
        data = resp.json()
    except (httpx.HTTPError, trio.TooSlowError, ValueError) as exc:
        raise ProviderError(f"{url}: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ProviderError(f"{url}: not a JSON object")
    return data


async def _token(client: AsyncOAuth2Client, url: str, code: str, flow: Flow) -> dict[str, Any]:
    try:
        with trio.fail_after(TIMEOUT + 1):
            token = await client.fetch_token(url, code=code, code_verifier=flow.verifier)
    except (httpx.HTTPError, trio.TooSlowError, ValueError) as exc:
        raise ProviderError(f"code exchange failed: {type(exc).__name__}") from None
    except Exception as exc:  # authlib's OAuthError family: the provider refused the code
        raise ProviderError(f"code exchange refused: {getattr(exc, 'error', type(exc).__name__)}") from None
    return dict(token)


class OidcProvider:
    def __init__(self, s: Settings) -> None:
        assert s.oidc_issuer is not None
        self.s = s
        self.issuer = s.oidc_issuer.rstrip("/")
        self.label = "your institution's sign-in"

    async def _config(self, client: AsyncOAuth2Client) -> dict[str, Any]:
        conf = await _json(client, self.issuer + "/.well-known/openid-configuration")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(conf.get(key), str):
                raise ProviderError(f"the provider's configuration has no {key}")
        return conf

    async def authorize_url(self, redirect_uri: str, flow: Flow) -> str:
        async with _client(self.s, redirect_uri, "openid profile email") as client:
            conf = await self._config(client)
            url, _ = client.create_authorization_url(conf["authorization_endpoint"], state=flow.state,
                                                     code_verifier=flow.verifier, nonce=flow.nonce)
            return url

    async def user(self, code: str, redirect_uri: str, flow: Flow) -> User:
        async with _client(self.s, redirect_uri, "openid profile email") as client:
            conf = await self._config(client)
            token = await _token(client, conf["token_endpoint"], code, flow)
            id_token = token.get("id_token")
            if not isinstance(id_token, str):
                raise ProviderError("the provider returned no id_token")
            try:
                keys = KeySet.import_key_set(await _json(client, conf["jwks_uri"]))
                claims = decode_and_check(id_token, keys, algorithms=ALLOWED_ALGORITHMS, issuer=self.issuer,
                                          audience=self.s.login_client_id, now=time.time())
            except (AuthError, JoseError, ValueError) as exc:
                raise ProviderError(f"id_token refused: {exc}") from None
        if claims.get("nonce") != flow.nonce:
            raise ProviderError("id_token refused: nonce does not match this sign-in")
        name = next((claims[k] for k in ("preferred_username", "email", "sub") if isinstance(claims.get(k), str)))
        return User(str(claims["sub"]), _peer_safe(name))


class GitHubProvider:
    label = "GitHub"

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.web = s.github_url.rstrip("/")
        self.api = s.github_api_url.rstrip("/")

    async def authorize_url(self, redirect_uri: str, flow: Flow) -> str:
        async with _client(self.s, redirect_uri, "read:user") as client:
            url, _ = client.create_authorization_url(self.web + "/login/oauth/authorize", state=flow.state,
                                                     code_verifier=flow.verifier)
            return url

    async def user(self, code: str, redirect_uri: str, flow: Flow) -> User:
        async with _client(self.s, redirect_uri, "read:user") as client:
            token = await _token(client, self.web + "/login/oauth/access_token", code, flow)
            access = token.get("access_token")
            if not isinstance(access, str):
                raise ProviderError("GitHub returned no access token")
            me = await _json(client, self.api + "/user", headers={"Authorization": f"Bearer {access}",
                                                                   "Accept": "application/vnd.github+json"})
        if not isinstance(me.get("id"), int) or not isinstance(me.get("login"), str):
            raise ProviderError("GitHub's /user has no id and login")
        return User(f"github:{me['id']}", _peer_safe(me["login"]))


def _peer_safe(name: str) -> str:
    """A display name usable as sleap-rtc's client peer id: at most 64 characters of
    letters, digits, '.', '_', '-' and '@'."""
    kept = "".join(c if c.isalnum() or c in "._-@" else "-" for c in name)[:64]
    return kept or "user"


def provider_for(s: Settings) -> Provider | None:
    mode = s.login_mode
    if mode == "oidc":
        return OidcProvider(s)
    if mode == "github":
        return GitHubProvider(s)
    return None
