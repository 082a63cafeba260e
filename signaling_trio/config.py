"""Settings: every option from flags and environment, validated once, frozen.

Owns: option names, defaults, precedence (flag > SIGNALING_* env > v1 COGNITO_* > default).
Never touches: sockets, files (besides reading os.environ), the running server.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


class ConfigError(Exception):
    """Bad configuration: the CLI prints the message as one line and exits 2."""


HARD_MAX_FRAME = 1024 * 1024  # the least a WebSocket message may reach before 1009


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    ws_port: int = 8080
    http_port: int = 8001
    data_dir: str = "./signaling-data"
    store: str = "sqlite"
    room_ttl: int = 7200
    auth: str = "local"
    oidc_issuer: str | None = None
    oidc_jwks_url: str | None = None
    oidc_audience: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    token_lifetime: int = 86400
    max_frame_bytes: int = 65536
    max_metadata_bytes: int = 16384
    max_room_peers: int = 1000
    rate_limit: float = 100.0
    rate_burst: int = 200
    register_timeout: float = 30.0
    stalled_reader_timeout: float = 10.0
    idle_ping_interval: float = 30.0
    idle_ping_timeout: float = 20.0
    outbox_size: int = 256
    room_inbox_size: int = 256
    shutdown_timeout: float = 4.0
    workers: int = 1
    http_rate_limit: float = 600.0
    http_request_timeout: float = 10.0
    reuse_port: bool = False  # set for --workers' children (SIGNALING_REUSE_PORT=1)
    handoff_dir: str = ""
    app_ping_interval: float = 20.0
    ice_servers: str = "[]"
    turn_urls: str = ""
    turn_secret: str | None = None
    turn_ttl: int = 86400
    login: str = ""  # "" = the default for --auth: open (local) or oidc/off (oidc)
    login_client_id: str | None = None
    login_client_secret: str | None = None
    github_url: str = "https://github.com"
    github_api_url: str = "https://api.github.com"
    public_url: str = ""
    login_state_ttl: float = 300.0
    status_page: str = "open"
    operators: str = ""

    @property
    def login_mode(self) -> str:
        if self.login:
            return self.login
        if self.auth == "local":
            return "open"
        return "oidc" if self.login_client_id else "off"

    @property
    def ws_max_message_bytes(self) -> int:
        """Past this a WebSocket message closes its connection (1009); between
        max_frame_bytes and this it is answered MESSAGE_TOO_LARGE instead."""
        return max(HARD_MAX_FRAME, self.max_frame_bytes)

    @property
    def operator_subjects(self) -> frozenset[str]:
        return frozenset(x.strip() for x in self.operators.split(",") if x.strip())

    def with_changes(self, **changes: Any) -> "Settings":
        return validate(dataclasses.replace(self, **changes))

    @property
    def store_kind(self) -> str:
        return self.store.split(":", 1)[0] if not self.store.startswith("redis://") else "redis"


# name, type, help
_OPTIONS: list[tuple[str, type, str]] = [
    ("host", str, "bind address of both listeners"),
    ("ws_port", int, "WebSocket port (any path is accepted)"),
    ("http_port", int, "HTTP API port"),
    ("data_dir", str, "where the embedded store and the local signing key live"),
    ("store", str, "memory, sqlite[:PATH] or redis://HOST:PORT/DB"),
    ("room_ttl", int, "seconds a created room lives"),
    ("auth", str, "local (own tokens) or oidc (an external issuer's)"),
    ("oidc_issuer", str, "issuer URL (auth=oidc)"),
    ("oidc_jwks_url", str, "JWKS URL (default <issuer>/.well-known/jwks.json)"),
    ("oidc_audience", str, "required aud claim (Cognito: the app client id)"),
    ("log_level", str, "debug, info, warning, error"),
    ("log_format", str, "text or json"),
    ("token_lifetime", int, "seconds an id_token from /anonymous-signin is valid"),
    ("max_frame_bytes", int, "largest accepted text frame"),
    ("max_metadata_bytes", int, "largest peer metadata, after merge"),
    ("max_room_peers", int, "peers per room"),
    ("rate_limit", float, "messages/s per connection sustained (0 turns it off)"),
    ("rate_burst", int, "burst size of the per-connection token bucket"),
    ("register_timeout", float, "seconds a connection may stay unregistered"),
    ("stalled_reader_timeout", float, "seconds a peer's outbox may stay full"),
    ("idle_ping_interval", float, "seconds of silence before the server pings a connection"),
    ("idle_ping_timeout", float, "seconds to wait for the pong before closing"),
    ("http_rate_limit", float, "sign-ins and room creations per minute per client address (0 turns it off)"),
    ("http_request_timeout", float, "seconds an HTTP request's body may take to arrive"),
    ("workers", int, "processes sharing the ports (SO_REUSEPORT); more than 1 needs --store redis://"),
    ("handoff_dir", str, "a directory shared by instances on this machine: a connection moves to the one that "
                         "owns its room (--workers sets one up)"),
    ("app_ping_interval", float, "seconds between JSON pings to sleap-rtc connections (at most 30)"),
    ("ice_servers", str, "JSON list of RTCIceServer objects handed to sleap-rtc peers, or @FILE"),
    ("turn_urls", str, "comma-separated turn: URLs of a TURN server with shared-secret auth"),
    ("turn_secret", str, "that TURN server's static-auth-secret (coturn use-auth-secret)"),
    ("turn_ttl", int, "seconds a TURN credential is valid"),
    ("login", str, "the /login page: open, invite, oidc, github or off (default: open with --auth local, "
                   "oidc with --auth oidc and a --login-client-id, else off)"),
    ("login_client_id", str, "OAuth client id at the provider (--login oidc or github)"),
    ("login_client_secret", str, "OAuth client secret (GitHub needs one; an OIDC public client with PKCE does not)"),
    ("github_url", str, "GitHub's web address (GitHub Enterprise: yours)"),
    ("github_api_url", str, "GitHub's API address"),
    ("public_url", str, "this HTTP port's public base URL, for OAuth redirects (default: from the request)"),
    ("login_state_ttl", float, "seconds a `sleap-rtc login` link, and its result, stay valid"),
    ("status_page", str, "/status: open, operator (a Bearer whose sub is in --operators) or off"),
    ("operators", str, "comma-separated subjects (JWT sub) who may see /status with --status-page operator"),
]

_DEFAULTS = Settings()


def env_name(name: str) -> str:
    return "SIGNALING_" + name.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signaling-trio",
        description="WebRTC signaling server for SLEAP-RTC (v1/v2 compatible).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (WebSocket + HTTP) in one process")
    # listed for --help; `signaling-trio user ...` is handled before these options (_usercli.py)
    sub.add_parser("user", help="local users: `user token NAME` prints a JWT (see `signaling-trio user -h`)")
    for name, _type, help_ in _OPTIONS:
        default = getattr(_DEFAULTS, name)
        serve.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{help_} (env {env_name(name)}; default {default})",
        )
    return parser


def _convert(name: str, typ: type, raw: str, source: str) -> Any:
    try:
        return typ(raw)
    except ValueError:
        raise ConfigError(f"{source}: {raw!r} is not a valid {typ.__name__}") from None


def from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    parser = build_parser()
    ns = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, typ, _ in _OPTIONS:
        flag = getattr(ns, name)
        if flag is not None:
            values[name] = _convert(name, typ, flag, "--" + name.replace("_", "-"))
        elif env.get(env_name(name)):
            values[name] = _convert(name, typ, env[env_name(name)], env_name(name))
    if env.get("SIGNALING_REUSE_PORT") == "1":  # set by --workers for its children only
        values["reuse_port"] = True
    # The v1 deployment's variables select OIDC against Cognito.
    region, pool, client = (env.get(k) for k in ("COGNITO_REGION", "COGNITO_USER_POOL_ID", "COGNITO_APP_CLIENT_ID"))
    if "auth" not in values and region and pool and client:
        values["auth"] = "oidc"
        values.setdefault("oidc_issuer", f"https://cognito-idp.{region}.amazonaws.com/{pool}")
        values.setdefault("oidc_audience", client)
    return validate(Settings(**values))


def validate(s: Settings) -> Settings:
    """The settings, or ConfigError naming the first option that is wrong."""
    _check_choices(s)
    _check_numbers(s)
    _check_ice(s)
    return s


def _check_choices(s: Settings) -> None:
    for port_name in ("ws_port", "http_port"):
        port = getattr(s, port_name)
        if not 0 <= port <= 65535:
            raise ConfigError(f"--{port_name.replace('_', '-')} {port} is not a port number")
    if not (s.store in ("memory", "sqlite") or s.store.startswith("sqlite:") or s.store.startswith("redis://")):
        raise ConfigError(
            f"--store {s.store!r}: unknown store scheme (use memory, sqlite[:PATH] or redis://HOST:PORT/DB)"
        )
    if s.auth not in ("local", "oidc"):
        raise ConfigError(f"--auth {s.auth!r}: use local or oidc")
    if s.auth == "oidc" and not s.oidc_issuer:
        raise ConfigError("--auth oidc needs --oidc-issuer (or SIGNALING_OIDC_ISSUER)")
    _check_login(s)
    if s.log_format not in ("text", "json"):
        raise ConfigError(f"--log-format {s.log_format!r}: use text or json")
    if s.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError(f"--log-level {s.log_level!r}: use debug, info, warning or error")


def _check_login(s: Settings) -> None:
    mode = s.login_mode
    if mode not in ("open", "invite", "oidc", "github", "off"):
        raise ConfigError(f"--login {mode!r}: use open, invite, oidc, github or off")
    if s.auth == "oidc" and mode in ("open", "invite"):
        raise ConfigError(f"--login {mode} names local users; with --auth oidc use --login oidc, github or off")
    if mode in ("oidc", "github") and not s.login_client_id:
        raise ConfigError(f"--login {mode} needs --login-client-id (the OAuth app registered at the provider)")
    if mode == "oidc" and not s.oidc_issuer:
        raise ConfigError("--login oidc needs --oidc-issuer (the provider's issuer URL)")
    if mode == "github" and not s.login_client_secret:
        raise ConfigError("--login github needs --login-client-secret (GitHub OAuth apps exchange codes with it)")
    if s.status_page not in ("open", "operator", "off"):
        raise ConfigError(f"--status-page {s.status_page!r}: use open, operator or off")
    if s.status_page == "operator" and not s.operator_subjects:
        raise ConfigError("--status-page operator needs --operators (the subjects who may see it)")
    if s.login_state_ttl <= 0:
        raise ConfigError("--login-state-ttl must be positive")


def _check_ice(s: Settings) -> None:
    from .ice import IceError, parse_ice_servers  # (ice imports nothing of config's)

    try:
        parse_ice_servers(s.ice_servers)
    except IceError as exc:
        raise ConfigError(f"--ice-servers: {exc}") from None
    if bool(s.turn_urls) != bool(s.turn_secret):
        raise ConfigError("--turn-urls and --turn-secret go together")
    if not 0 < s.app_ping_interval <= 30:
        raise ConfigError("--app-ping-interval must be above 0 and at most 30 (sleap-rtc reconnects after 90 s)")
    if s.turn_ttl <= 0:
        raise ConfigError("--turn-ttl must be positive")


def _check_numbers(s: Settings) -> None:
    positive = ("room_ttl", "token_lifetime", "max_frame_bytes", "max_metadata_bytes", "max_room_peers",
                "rate_burst", "register_timeout", "stalled_reader_timeout", "idle_ping_interval",
                "idle_ping_timeout", "http_request_timeout")
    for name in positive:
        if getattr(s, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if s.workers < 1:
        raise ConfigError("--workers must be 1 or more")
    if s.workers > 1 and not s.store.startswith("redis://"):
        raise ConfigError(
            "--workers above 1 needs --store redis://HOST:PORT/DB (the workers share rooms through Redis)"
        )
    if s.handoff_dir and not s.store.startswith("redis://"):
        raise ConfigError("--handoff-dir needs --store redis://HOST:PORT/DB (rooms are found through Redis)")
    if s.workers > 1 and 0 in (s.ws_port, s.http_port):
        raise ConfigError("--workers above 1 needs fixed ports (the workers share them)")
    for name in ("rate_limit", "http_rate_limit"):
        if getattr(s, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be 0 (off) or positive")


__all__ = ["ConfigError", "Settings", "build_parser", "env_name", "from_args", "validate"]
