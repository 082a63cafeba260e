"""ICE servers handed to sleap-rtc peers: a static list, and time-limited TURN credentials.

Owns: reading `--ice-servers` (JSON, or @FILE), and the TURN REST credential scheme
coturn's `use-auth-secret` checks: username `<expiry unix seconds>:<user>`, credential
`base64(HMAC-SHA1(secret, username))`. The secret never leaves this module (it is not
logged; only credentials derived from it are handed out).
Never touches: sockets, the store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any


class IceError(ValueError):
    pass


def parse_ice_servers(raw: str) -> list[dict[str, Any]]:
    """The RTCIceServer list of `--ice-servers` (JSON text, or `@path` of a JSON file)."""
    text = raw
    if raw.startswith("@"):
        try:
            with open(raw[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise IceError(f"cannot read {raw[1:]}: {exc.strerror}") from None
    try:
        servers = json.loads(text)
    except json.JSONDecodeError:
        raise IceError("not JSON (a list of RTCIceServer objects)") from None
    if not isinstance(servers, list) or not all(isinstance(s, dict) and "urls" in s for s in servers):
        raise IceError('a list of RTCIceServer objects, each with "urls"')
    return servers


def turn_credential(secret: str, user: str, expires_at: int) -> tuple[str, str]:
    """(username, credential) for `user` valid until `expires_at` (Unix seconds)."""
    username = f"{expires_at}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


@dataclass(frozen=True)
class IceConfig:
    static: tuple[dict[str, Any], ...]
    turn_urls: tuple[str, ...] = ()
    turn_secret: str | None = None
    turn_ttl: int = 86400

    @classmethod
    def from_settings(cls, ice_servers: str, turn_urls: str, turn_secret: str | None, turn_ttl: int) -> "IceConfig":
        urls = tuple(u.strip() for u in turn_urls.split(",") if u.strip())
        return cls(tuple(parse_ice_servers(ice_servers)), urls, turn_secret, turn_ttl)

    def servers_for(self, user: str, now: float | None = None) -> list[dict[str, Any]]:
        """What a registration of `user` gets: fresh TURN credentials (never expired
        ones: each call makes its own) after the static list."""
        servers = [dict(s) for s in self.static]
        if self.turn_urls and self.turn_secret:
            expires_at = int((time.time() if now is None else now) + self.turn_ttl)
            username, credential = turn_credential(self.turn_secret, user, expires_at)
            servers.append({"urls": list(self.turn_urls), "username": username, "credential": credential})
        return servers
