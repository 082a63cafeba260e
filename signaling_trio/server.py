"""The one nursery: listeners, HTTP app, room supervisor, housekeeping; and shutdown.

Owns: start-up order (bind both ports first, so a port in use fails before anything
runs), the set of live connections, graceful shutdown (close listeners, 1001 to every
WebSocket, flush the store, return).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import logging
import math
import os
import socket
import stat
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from trio_websocket import WebSocketServer

from ._accept import serve_listener
from ._actors import RoomSupervisor
from ._handoff import Hub
from ._http import HttpContext, add_routes, create_app
from ._http_accounts import ROUTES as ACCOUNT_ROUTES
from ._http_accounts import AccountsApi
from ._http_pages import ROUTES as PAGE_ROUTES
from ._http_pages import PagesApi
from ._httpguard import HttpGuard
from ._httpserve import serve_http
from ._log import BatchWriter, event
from ._metrics import Metrics
from ._oauth import provider_for
from ._oidc import OidcVerifier
from ._prometheus import PrometheusExporter
from ._register import Registrar
from ._router import LocalRouter, RoomRouter
from ._status import StatusHistory
from ._version import __version__
from ._ws import LiveConnections, WsContext
from ._wsserve import handle_request, sweep_connections
from ._wsfix import DISCONNECT_TIMEOUT, handle_connection
from .accounts import Accounts
from .auth import EitherIssuer, LocalAuthority, Verifier
from .cluster import Cluster, RedisTransport
from .config import ConfigError, Settings
from .ice import IceConfig
from .login import Logins
from .protocol import errors as E
from .store import Store, StoreUnavailable, open_store
from .store.cache import RoomCache
from .store.redis import RedisStore

PURGE_INTERVAL = 300.0
EXPIRED_GRACE = 86400.0  # an expired room answers ROOM_EXPIRED for a day, then is purged
LOGIN_TOKEN_LIFETIME = 7 * 86400  # a JWT from the login page (sleap-rtc keeps it in credentials.json)


@dataclass(frozen=True)
class ServerInfo:
    host: str
    ws_port: int
    http_port: int

    @property
    def ws_url(self) -> str:
        return f"ws://{_connect_host(self.host)}:{self.ws_port}/"

    @property
    def http_url(self) -> str:
        return f"http://{_connect_host(self.host)}:{self.http_port}"


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _bind(host: str, port: int, what: str, *, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # --workers: the kernel spreads connections over the processes
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(f"cannot listen on {host}:{port} ({what}): {reason}") from None
    sock.setblocking(False)
    return sock


class SignalingServer:
    def __init__(self, settings: Settings, *, store: Store | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.supervisor = RoomSupervisor(settings, self.metrics)
        # rooms in this process; a Cluster instead when the store is Redis (set in run)
        self.router: RoomRouter = LocalRouter(self.supervisor)
        self.prometheus = PrometheusExporter(self.metrics, self.router)
        self.live = LiveConnections()
        self.history = StatusHistory(self.metrics_json, time.time)
        self.hub: Hub | None = None  # --workers: connections handed between sibling processes
        self.ice = IceConfig.from_settings(settings.ice_servers, settings.turn_urls, settings.turn_secret,
                                           settings.turn_ttl)
        self.rooms: RoomCache  # (made in run, with the store)
        self.accounts: Accounts
        self._store = store
        self.local_authority: LocalAuthority | None = None  # auth=local: /anonymous-signin, /jwks
        self.login_authority: LocalAuthority | None = None  # signs what the login page issues
        self.oidc: OidcVerifier | None = None
        self.verifier: Verifier
        self.info: ServerInfo | None = None
        self.started_at = time.time()
        self._shutdown = trio.Event()

    @property
    def store(self) -> Store:
        assert self._store is not None
        return self._store

    @property
    def connections(self) -> set[Any]:
        return self.live.all

    def shutdown(self) -> None:
        """Begin a graceful shutdown; `run` returns when it is done."""
        self._shutdown.set()

    async def _own_key(self) -> LocalAuthority:
        """This server's signing key: for its tokens (auth=local) and the login page's."""
        s = self.settings
        if s.store == "memory":
            return LocalAuthority.ephemeral(lifetime=s.token_lifetime)
        if isinstance(self._store, RedisStore):
            # one key for every instance on this Redis: tokens are valid on all
            try:
                pem = await self._store.signing_key(LocalAuthority.new_key_pem())
            except StoreUnavailable as exc:
                raise ConfigError(str(exc)) from None
            return LocalAuthority.from_pem(pem, lifetime=s.token_lifetime)
        return LocalAuthority.load_or_create(s.data_dir, lifetime=s.token_lifetime)

    async def _setup_auth(self) -> None:
        s = self.settings
        if s.auth == "local":
            self.local_authority = self.login_authority = await self._own_key()
            self.verifier = self.local_authority
            return
        assert s.oidc_issuer is not None  # validated in config
        self.oidc = OidcVerifier(s.oidc_issuer, audience=s.oidc_audience, jwks_url=s.oidc_jwks_url)
        self.verifier = self.oidc
        if s.login_mode != "off":  # the login page issues this server's own tokens
            self.login_authority = await self._own_key()
            self.verifier = EitherIssuer(self.login_authority, self.oidc)

    def _setup_router(self) -> None:
        if isinstance(self._store, RedisStore):
            # one logical server with every other instance on this Redis
            self.router = Cluster(RedisTransport(self._store.client), self.supervisor, self.metrics)
            self.prometheus = PrometheusExporter(self.metrics, self.router)

    async def run(self, *, task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        if self._store is None:
            self._store = open_store(s)
        async with self._store:  # e.g. Redis's connection pool lives as long as we run
            await self._setup_auth()
            self._setup_router()
            await self._run(task_status)

    def _bind_both(self) -> tuple[socket.socket, socket.socket]:
        s = self.settings
        ws_sock = _bind(s.host, s.ws_port, "--ws-port", reuse_port=s.reuse_port)
        try:
            http_sock = _bind(s.host, s.http_port, "--http-port", reuse_port=s.reuse_port)
        except ConfigError:
            ws_sock.close()
            raise
        self.info = ServerInfo(s.host, ws_sock.getsockname()[1], http_sock.getsockname()[1])
        return ws_sock, http_sock

    async def _run(self, task_status: trio.TaskStatus[ServerInfo]) -> None:
        s = self.settings
        # room records for the register path; every write goes through it. Redis's rooms
        # are changed by other instances too: nothing is kept for those
        self.rooms = RoomCache(self.store, ttl=0 if isinstance(self._store, RedisStore) else math.inf)
        self.accounts = Accounts(self.rooms)
        if s.handoff_dir:
            self._check_handoff_dir()
        ws_sock, http_sock = self._bind_both()
        try:
            try:
                await self.store.check()
            except Exception as exc:
                raise ConfigError(
                    str(exc) if isinstance(exc, StoreUnavailable) else f"store {s.store}: {exc}"
                ) from None
            async with trio.open_nursery() as root:
                await root.start(self.router.run)
                if self.oidc is not None:
                    await root.start(self.oidc.run)
                root.start_soon(self._purge_loop)
                await root.start(self.history.run)  # /status: rates over the last minutes
                root.start_soon(sweep_connections, self.live, s)  # every connection's timers
                await self._serve(root, ws_sock, http_sock, task_status)
                root.cancel_scope.cancel()
        finally:
            for sock in (ws_sock, http_sock):
                try:
                    sock.close()
                except OSError:
                    pass
            event(logging.INFO, "stopped")

    async def _serve(self, root: trio.Nursery, ws_sock: socket.socket, http_sock: socket.socket,
                     task_status: trio.TaskStatus[ServerInfo]) -> None:
        """Both ports until shutdown; then the graceful part of it."""
        s = self.settings
        assert self.info is not None
        ws_context = self._ws_context()
        if s.handoff_dir and isinstance(self.router, Cluster):
            ws_context = await self._start_handoff(root, ws_context)
        async with trio.open_nursery() as listeners:
            ws_listener = trio.SocketListener(trio.socket.from_stdlib_socket(ws_sock))
            ws_server = WebSocketServer(
                partial(handle_request, ws_context),
                [ws_listener],  # accepted by serve_listener, not ws_server.run
                handler_nursery=root,
                max_message_size=s.ws_max_message_bytes,
                connect_timeout=10,
                disconnect_timeout=DISCONNECT_TIMEOUT,
            )
            ws_scope = trio.CancelScope()

            async def run_ws(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with ws_scope:
                    await serve_listener(ws_listener, partial(handle_connection, ws_server), handler_nursery=root,
                                         what="ws", on_crash=self._connection_crashed, task_status=task_status)

            await listeners.start(run_ws)
            http_stop = trio.Event()
            await listeners.start(partial(
                serve_http, self._http_app(), trio.socket.from_stdlib_socket(http_sock),
                stop=http_stop, on_crash=self._connection_crashed,
            ))
            event(logging.INFO, "listening", ws=self.info.ws_url, http=self.info.http_url,
                  store=s.store_kind, auth=s.auth, version=__version__)
            task_status.started(self.info)
            await self._shutdown.wait()
            event(logging.INFO, "shutting down", connections=len(self.live))
            # Stop accepting, then tell every client we are going away (1001).
            ws_scope.cancel()
            http_stop.set()
            with trio.move_on_after(s.shutdown_timeout / 2):
                await self.live.close_all(E.CLOSE_GOING_AWAY, "server shutting down")
            await self.router.stop()
            # hypercorn drains within its graceful_timeout; never wait longer.
            listeners.cancel_scope.deadline = trio.current_time() + 1.5

    def _check_handoff_dir(self) -> None:
        """Connections (and who their peers are) pass through it: this user's only."""
        path = self.settings.handoff_dir
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"--handoff-dir {path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ConfigError(f"--handoff-dir {path} must be a directory owned by this user, mode 0700")

    async def _start_handoff(self, root: trio.Nursery, ctx: WsContext) -> WsContext:
        """Sibling processes (--workers): connections move to the owner of their room."""
        assert isinstance(self.router, Cluster)
        hub = self.hub = Hub(self.settings.handoff_dir, self.router.id, root.start_soon)
        hub.ctx = ctx = dataclasses.replace(ctx, mover=hub.move)
        ctx.registrar.machine = hub
        await root.start(hub.run)
        return ctx

    def _ws_context(self) -> WsContext:
        registrar = Registrar(self.verifier, self.rooms, self.router, self.accounts, self.ice)
        return WsContext(self.settings, self.metrics, registrar, self.live, self.prometheus.register_seconds.observe)

    def _http_app(self) -> HttpGuard:
        s = self.settings
        oidc = self.oidc
        ctx = HttpContext(s, self.rooms, self.verifier, lambda: self.local_authority,
                          (lambda: oidc.ready) if oidc is not None else None, self.router, self.metrics_json,
                          self.prometheus, self._count_room_created)
        app = create_app(ctx)
        add_routes(app, AccountsApi(ctx, self.accounts, self.ice.servers_for), ACCOUNT_ROUTES)
        add_routes(app, PagesApi(ctx, self._logins(), provider_for(s), self.history), PAGE_ROUTES)
        return HttpGuard(app, rate_limit=s.http_rate_limit, body_timeout=s.http_request_timeout,
                         ws_port=lambda: self.info.ws_port if self.info else None)

    def _logins(self) -> Logins | None:
        s, authority = self.settings, self.login_authority
        if s.login_mode == "off" or authority is None:
            return None
        return Logins(self.rooms, self.accounts, lambda sub: authority.issue(sub, lifetime=LOGIN_TOKEN_LIFETIME),
                      state_ttl=s.login_state_ttl)

    def _count_room_created(self) -> None:
        self.metrics.rooms_created += 1

    def _connection_crashed(self) -> None:
        self.metrics.connection_crashes += 1

    async def _purge_loop(self) -> None:
        while True:
            await trio.sleep(PURGE_INTERVAL)
            try:
                n = await self.rooms.purge_expired(time.time() - EXPIRED_GRACE)
                if n:
                    event(logging.INFO, "rooms purged", count=n)
            except Exception as exc:  # the store may be down; /health reports it
                event(logging.WARNING, "purge failed", error=type(exc).__name__)

    def metrics_json(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None).isoformat() + "Z",
            "active_rooms": len(self.supervisor.rooms),
            "active_connections": self.supervisor.peer_count(),
            "peers_by_role": self.supervisor.peers_by_role(),
            "total_connections": m.total_connections,
            "total_messages": m.total_messages,
            "rooms_created": m.rooms_created,
            "open_websockets": m.active_connections,
            "messages_by_type": dict(m.messages_by_type),
            "errors_by_code": dict(m.errors_by_code),
            "dropped_signals": m.dropped_signals,
            "outbox_overflows": m.outbox_overflows,
            "rate_limited_drops": m.rate_limited_drops,
            "room_crashes": m.room_crashes,
            "connection_crashes": m.connection_crashes,
            "log_lines_dropped": BatchWriter.dropped,
            "uptime_sec": round(time.time() - self.started_at, 3),
        } | self.router.json_fields() | self._handoff_fields()

    def _handoff_fields(self) -> dict[str, int]:
        hub = self.hub
        return {} if hub is None else {"handed_over": hub.given, "handed_in": hub.taken}


async def serve(settings: Settings, *, task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a server until cancelled (or until SIGINT/SIGTERM when used from the CLI)."""
    server = SignalingServer(settings)
    await server.run(task_status=task_status)
