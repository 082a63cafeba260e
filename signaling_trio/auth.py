"""Identity: issuing and verifying id_tokens.

Owns: the local signing key (created on first start, kept in the data dir with mode
0600), the JWT checks (signature, exp, iss, aud), and a verified-token cache.
Never touches: rooms, sockets; never logs a token.

A new key is EC P-256 and signs ES256: a signature costs ~0.1 ms against RS256's ~1 ms,
and every anonymous sign-in is one (docs/PERFORMANCE.md). An RSA key made by an earlier
version (a data dir's file, or Redis's shared key) keeps signing RS256; either way a token
is accepted only with the algorithm of the key that signed it.

JOSE is done with joserfc, the JOSE implementation Authlib itself now delegates to
(`authlib.jose` is deprecated in its favour).
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

import orjson
from joserfc import jwt
from joserfc.errors import InvalidKeyTypeError, JoseError
from joserfc.jws import extract_compact
from joserfc.jwk import ECKey, KeySet, RSAKey

from .config import ConfigError

LOCAL_ISSUER = "signaling-trio"
LOCAL_AUDIENCE = "signaling-trio"
KEY_FILE = "signing-key.pem"
SigningKey = RSAKey | ECKey
LEEWAY = 30  # seconds of clock skew tolerated on exp/nbf/iat


class AuthError(Exception):
    """An id_token that is missing, malformed, badly signed, expired or for someone else."""


class Verifier(Protocol):
    async def verify(self, token: str) -> dict[str, Any]: ...


class TokenCache:
    """Verified tokens -> claims, until each token's own expiry. Verifying RS256 costs far
    more than a dict lookup, and workers present the same token on every re-register."""

    def __init__(self, max_size: int = 50_000) -> None:
        self.max_size = max_size
        self._claims: dict[str, dict[str, Any]] = {}

    def get(self, token: str, now: float) -> dict[str, Any] | None:
        claims = self._claims.get(token)
        if claims is None:
            return None
        if claims["exp"] + LEEWAY < now:
            del self._claims[token]
            return None
        return claims

    def put(self, token: str, claims: dict[str, Any], now: float) -> None:
        if len(self._claims) >= self.max_size:
            for t in [t for t, c in self._claims.items() if c["exp"] + LEEWAY < now]:
                del self._claims[t]
            if len(self._claims) >= self.max_size:
                self._claims.clear()
        self._claims[token] = claims


def check_claims(claims: dict[str, Any], *, issuer: str, audience: str | None, now: float) -> None:
    reg_opts: dict[str, Any] = {
        "iss": {"essential": True, "value": issuer},
        "exp": {"essential": True},
        "sub": {"essential": True},
    }
    if audience is not None:
        reg_opts["aud"] = {"essential": True, "value": audience}
    registry = jwt.JWTClaimsRegistry(now=int(now), leeway=LEEWAY, **reg_opts)
    try:
        registry.validate(claims)
    except JoseError as exc:
        raise AuthError(f"id_token rejected: {exc.description or exc.error}") from None
    if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("exp"), (int, float)):
        raise AuthError("id_token rejected: sub and exp must be a string and a number")


def decode_and_check(token: str, keyset: KeySet, *, algorithms: list[str], issuer: str,
                     audience: str | None, now: float) -> dict[str, Any]:
    """Signature (an allow-listed algorithm), then the claims; AuthError on any failure."""
    try:
        decoded = jwt.decode(token, keyset, algorithms=algorithms)
    except (JoseError, ValueError) as exc:
        raise AuthError(f"id_token rejected: {type(exc).__name__}") from None
    claims = decoded.claims
    check_claims(claims, issuer=issuer, audience=audience, now=now)
    nbf = claims.get("nbf")
    if isinstance(nbf, (int, float)) and nbf > now + LEEWAY:
        raise AuthError("id_token rejected: not valid yet")
    return claims


class LocalAuthority:
    """auth=local: the server signs anonymous identities and verifies its own tokens."""

    def __init__(self, key: SigningKey, *, lifetime: int = 86400) -> None:
        self.key = key
        self.alg = key.alg
        self.keyset = KeySet([key])
        self.lifetime = lifetime
        self.issuer = LOCAL_ISSUER
        self.audience = LOCAL_AUDIENCE
        self.cache = TokenCache()
        self.clock = time.time  # replaceable in tests

    @classmethod
    def ephemeral(cls, *, lifetime: int = 86400) -> "LocalAuthority":
        return cls(_new_key(), lifetime=lifetime)

    @staticmethod
    def new_key_pem() -> bytes:
        return _new_key().as_pem(private=True)

    @classmethod
    def from_pem(cls, pem: bytes, *, lifetime: int = 86400) -> "LocalAuthority":
        return cls(_key_from_pem(pem), lifetime=lifetime)

    @classmethod
    def load_or_create(cls, data_dir: str, *, lifetime: int = 86400) -> "LocalAuthority":
        path = os.path.join(data_dir, KEY_FILE)
        try:
            os.makedirs(data_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create data dir {data_dir}: {exc.strerror}") from None
        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    pem = f.read()
            except OSError as exc:
                raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from None
            try:
                key = _key_from_pem(pem)
            except Exception:  # joserfc raises several types for a bad PEM
                raise ConfigError(f"signing key {path} is not an EC P-256 or RSA private key in PEM") from None
            if not key.is_private:
                raise ConfigError(f"signing key {path} holds no private key")
            return cls(key, lifetime=lifetime)
        key = _new_key()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.as_pem(private=True))
        except OSError as exc:
            raise ConfigError(f"cannot write signing key {path}: {exc.strerror}") from None
        return cls(key, lifetime=lifetime)

    def issue(self, sub: str, *, now: float | None = None, lifetime: int | None = None) -> str:
        """A token for `sub`, put in the verified-token cache as it is made: a sign-in's
        token is used at once (create-room, then every register) and needs no check here.
        (A given `now`, a test's clock, is not cached.)"""
        cache = now is None
        now = self.clock() if now is None else now
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "iat": int(now),
            "exp": int(now) + (self.lifetime if lifetime is None else lifetime),
            "token_use": "id",
        }
        token = jwt.encode({"alg": self.alg, "kid": self.key.kid}, claims, self.key)
        if cache:
            self.cache.put(token, claims, now)
        return token

    def jwks(self) -> dict[str, Any]:
        return self.keyset.as_dict(private=False)

    async def verify(self, token: str) -> dict[str, Any]:
        return self.check(token)

    def check(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        """Verify synchronously (our own key needs no I/O)."""
        now = self.clock() if now is None else now
        cached = self.cache.get(token, now)
        if cached is not None:
            return cached
        if not isinstance(token, str) or not token:
            raise AuthError("id_token missing")
        claims = decode_and_check(token, self.keyset, algorithms=[self.alg],
                                  issuer=self.issuer, audience=self.audience, now=now)
        self.cache.put(token, claims, now)
        return claims


def unverified_issuer(token: str) -> str | None:
    """The `iss` a token claims, before any check: only to pick who verifies it."""
    try:
        iss = orjson.loads(extract_compact(token.encode()).payload).get("iss")
    except Exception:  # joserfc and orjson raise several types for garbage
        return None
    return iss if isinstance(iss, str) else None


class EitherIssuer:
    """auth=oidc with a login page: the page's tokens are signed by this server (its
    own issuer), every other token is the external issuer's."""

    def __init__(self, local: LocalAuthority, external: Verifier) -> None:
        self.local = local
        self.external = external

    async def verify(self, token: str) -> dict[str, Any]:
        if isinstance(token, str) and unverified_issuer(token) == self.local.issuer:
            return self.local.check(token)
        return await self.external.verify(token)


def _key_from_pem(pem: bytes) -> SigningKey:
    """The signing key in `pem` (EC P-256: ES256; RSA: RS256), its kid the RFC 7638
    thumbprint (stable across restarts and instances that share the key)."""
    try:
        key: SigningKey = ECKey.import_key(pem)
        if key.curve_name != "P-256":
            raise ValueError(f"EC curve {key.curve_name} is not P-256")
        alg = "ES256"
    except InvalidKeyTypeError:
        key, alg = RSAKey.import_key(pem), "RS256"
    return type(key).import_key(pem, parameters={"use": "sig", "alg": alg, "kid": key.thumbprint()})


def _new_key() -> SigningKey:
    return _key_from_pem(ECKey.generate_key("P-256").as_pem(private=True))
