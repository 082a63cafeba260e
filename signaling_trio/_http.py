"""The HTTP API (quart-trio, served by hypercorn on the server's nursery).

Owns: request parsing and the auth rule of each endpoint (SPEC section 2), and the JSON
shape of every HTTP error.
Never touches: a room's state directly; it asks the room through the `RoomRouter`.

Each endpoint is a method of `HttpApi`, registered from the `ROUTES` table; what they
share (the Bearer check, the body, a field, a store or room call) is one helper each.
"""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import orjson
import trio
from quart import request
from quart.json.provider import DefaultJSONProvider
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ._httpserve import InlineRequest
from ._log import event
from ._prometheus import PrometheusExporter, negotiate
from ._router import RoomRouter
from ._version import __version__
from .accounts import AccountError
from .auth import AuthError, LocalAuthority, Verifier
from .config import Settings
from .protocol import errors as E
from .store import RoomRecord, Store, StoreFull, StoreUnavailable, bounded, new_room

MAX_TTL = 30 * 86400
MAX_FIELD_LEN = 256


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True, slots=True)
class HttpContext:
    """What the endpoints need of the server."""

    settings: Settings
    store: Store
    verifier: Verifier
    local_authority: Callable[[], LocalAuthority | None]  # auth=local: this server issues tokens
    jwks_ready: Callable[[], bool] | None  # auth=oidc: the issuer's keys are loaded
    router: RoomRouter
    metrics_json: Callable[[], dict[str, Any]]
    prometheus: PrometheusExporter
    count_room_created: Callable[[], None]


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def _error(status: int, code: str, message: str) -> tuple[dict[str, str], int]:
    return {"error": code, "message": message}, status


def _not_available(message: str) -> HttpError:
    return HttpError(404, "NOT_AVAILABLE", message)


class HttpApi:
    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx

    # ------------------------------------------------------------ helpers
    async def store_call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        try:
            return await bounded(fn, *args)
        except StoreFull:
            raise HttpError(507, E.STORE_UNAVAILABLE, "the room store is out of space; nothing was changed") from None
        except StoreUnavailable:
            raise HttpError(503, E.STORE_UNAVAILABLE, "the room store cannot be reached") from None

    async def room_call(self, room_id: str, op: str, *args: Any) -> Any:
        """A question for the room's actor (here or on the instance that owns it)."""
        try:
            return await self.ctx.router.call(room_id, op, *args)
        except (trio.TooSlowError, StoreUnavailable):
            raise HttpError(503, E.STORE_UNAVAILABLE, "the room did not answer in time; try again") from None

    @staticmethod
    def bearer_token() -> str:
        """The Authorization header's token ("" when absent). v1 servers stripped
        "Bearer " if present; a bare token was accepted too."""
        header = request.headers.get("Authorization", "")
        return header[7:].strip() if header[:7].lower() == "bearer " else header.strip()

    async def bearer(self, required: bool) -> dict[str, Any] | None:
        token = self.bearer_token()
        if not token:
            if required:
                raise HttpError(401, E.INVALID_ID_TOKEN, "Authorization: Bearer <id_token> required")
            return None
        try:
            return await self.ctx.verifier.verify(token)
        except AuthError as exc:
            raise HttpError(401, E.INVALID_ID_TOKEN, str(exc)) from None

    async def room_record(self, room_id: str) -> RoomRecord:
        record = await self.store_call(self.ctx.store.get_room, room_id)
        if record is None:
            raise HttpError(404, E.ROOM_NOT_FOUND, f"Room {room_id} not found")
        return record

    async def subject(self) -> str:
        claims = await self.bearer(required=True)
        assert claims is not None
        return str(claims["sub"])

    @staticmethod
    async def body() -> dict[str, Any]:
        raw = await request.get_data()
        if not raw:
            return {}
        try:
            data = orjson.loads(raw)  # invalid UTF-8 is a JSONDecodeError too
        except orjson.JSONDecodeError:
            raise HttpError(400, E.INVALID_JSON, "the body must be a JSON object") from None
        if not isinstance(data, dict):
            raise HttpError(400, E.INVALID_MESSAGE, "the body must be a JSON object")
        return data

    @staticmethod
    def field(data: dict[str, Any], name: str) -> str:
        value = HttpApi.optional_field(data, name)
        if value is None:
            raise HttpError(400, E.MISSING_FIELDS, f"Missing required fields: {name}")
        return value

    @staticmethod
    def optional_field(data: dict[str, Any], name: str) -> str | None:
        value = data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value or len(value) > MAX_FIELD_LEN:
            raise HttpError(400, E.INVALID_MESSAGE, f"field '{name}' must be a non-empty string")
        return value

    async def store_health(self) -> str:
        """"ok", "error" (the store said no) or "unreachable" (no answer within 2 s)."""
        try:
            with trio.fail_after(2):
                await self.ctx.store.check()
            return "ok"
        except (StoreUnavailable, trio.TooSlowError) as exc:
            return "unreachable" if isinstance(exc, trio.TooSlowError) else "error"

    # ---------------------------------------------------------- endpoints
    async def health(self) -> Any:
        checks: dict[str, Any] = {"store": await self.store_health()}
        if self.ctx.jwks_ready is not None:
            checks["jwks"] = "ok" if self.ctx.jwks_ready() else "unavailable"
        answer: dict[str, Any] = {"status": "healthy", "timestamp": utc_timestamp(), "version": __version__}
        if any(v != "ok" for v in checks.values()):
            return answer | {"status": "unhealthy", "checks": checks}, 503
        return answer

    async def metrics(self) -> Any:
        # JSON stays the default (v2); Prometheus scrapers ask for text or OpenMetrics.
        best = negotiate(request.headers.get("Accept", ""))
        if best == "json":
            return self.ctx.metrics_json()
        text, content_type = self.ctx.prometheus.render(openmetrics=best == "openmetrics")
        return text, 200, {"Content-Type": content_type}

    async def anonymous_signin(self) -> Any:
        authority = self.ctx.local_authority()
        if authority is None:
            raise _not_available("anonymous sign-in is only offered with --auth local; "
                                 "sign in with your identity provider")
        username = str(uuid.uuid4())
        event(logging.INFO, "anonymous signin", sub=username)
        return {"id_token": authority.issue(username), "username": username}

    async def jwks(self) -> Any:
        authority = self.ctx.local_authority()
        if authority is None:
            raise _not_available("this server verifies an external issuer's tokens; it has no keys of its own")
        return authority.jwks()

    async def create_room(self) -> Any:
        sub = await self.subject()
        now = time.time()
        record, token = new_room(sub, now, int(now + self.ctx.settings.room_ttl))
        await self.store_call(self.ctx.store.create_room, record)
        self.ctx.count_room_created()
        event(logging.INFO, "room created", room_id=record.room_id, creator=sub)
        return {"room_id": record.room_id, "token": token, "expires_at": record.expires_at}

    async def extend_room(self) -> Any:
        sub = await self.subject()
        data = await self.body()
        room_id = self.field(data, "room_id")
        ttl = data.get("ttl_sec", self.ctx.settings.room_ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl <= MAX_TTL:
            raise HttpError(400, E.INVALID_MESSAGE, f"'ttl_sec' must be a number from 1 to {MAX_TTL}")
        record = await self.room_record(room_id)
        if sub != record.creator:
            subjects = await self.room_call(room_id, "subjects")
            if not subjects or sub not in subjects:
                raise HttpError(403, "FORBIDDEN", "only the room's creator or a peer registered in it may extend it")
        expires_at = int(time.time() + ttl)
        await self.store_call(self.ctx.store.set_expiry, room_id, expires_at)
        event(logging.INFO, "room extended", room_id=room_id, ttl=ttl)
        return {"room_id": room_id, "expires_at": expires_at}

    async def delete_peers_and_room(self) -> Any:
        data = await self.body()
        room_id = self.optional_field(data, "room_id")
        peer_id = self.field(data, "peer_id") if room_id is None else self.optional_field(data, "peer_id")
        claims = await self.bearer(required=False)
        if room_id is None:
            assert peer_id is not None
            room_id = await self.ctx.router.find_room(peer_id)
        if room_id is None:
            return {"status": "peer not found"}
        record = await self.store_call(self.ctx.store.get_room, room_id)
        sub = claims["sub"] if claims else None
        if peer_id is None and (record is None or sub != record.creator):
            raise HttpError(403, "FORBIDDEN", "only the room's owner may delete a room by its id")
        if record is not None and sub is not None and sub == record.creator:
            await self.room_call(room_id, "kick", None, E.CLOSE_NORMAL, "room deleted")
            await self.store_call(self.ctx.store.delete_room, room_id)
            event(logging.INFO, "room deleted", room_id=room_id, by="creator")
            return {"status": "room deleted; all peers disconnected"}
        peer_subject = await self.room_call(room_id, "peer_subject", peer_id)
        if peer_subject is not None:
            if sub is None or sub != peer_subject:
                raise HttpError(403, "FORBIDDEN",
                                f"peer {peer_id} is still connected; only it or the room's creator may remove it")
            await self.room_call(room_id, "kick", peer_id, E.CLOSE_NORMAL, "peer deleted")
        return await self._after_peer_deleted(room_id, record)

    async def delete_peer(self) -> Any:
        """sleap-rtc programs, after closing their socket: always 200. A live peer is
        disconnected only for a Bearer of its own identity."""
        peer_id = self.field(await self.body(), "peer_id")
        try:
            claims = await self.bearer(required=False)
        except HttpError:
            claims = None
        room_id = await self.ctx.router.find_room(peer_id)
        if room_id is None:
            return {"status": "peer not found"}
        subject = await self.room_call(room_id, "peer_subject", peer_id)
        if subject is None:
            return {"status": "peer deleted"}
        if claims is not None and claims["sub"] == subject:
            await self.room_call(room_id, "kick", peer_id, E.CLOSE_NORMAL, "peer deleted")
            return {"status": "peer deleted"}
        return {"status": "peer still connected; it leaves when its socket closes"}

    async def _after_peer_deleted(self, room_id: str, record: RoomRecord | None) -> dict[str, str]:
        remaining = await self.room_call(room_id, "count") or 0
        if record is None:
            return {"status": "peer deleted. Room status: not found"}
        if remaining == 0:
            await self.store_call(self.ctx.store.delete_room, room_id)
            event(logging.INFO, "room deleted", room_id=room_id, by="last peer")
            return {"status": "peer deleted successfully. Room status: deleted"}
        return {"status": f"peer deleted successfully. Room status: active ({remaining} peers connected)"}


ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/health", "health"),
    ("GET", "/metrics", "metrics"),
    ("POST", "/anonymous-signin", "anonymous_signin"),
    ("GET", "/.well-known/jwks.json", "jwks"),
    ("POST", "/create-room", "create_room"),
    ("POST", "/extend-room", "extend_room"),
    ("POST", "/delete-peers-and-room", "delete_peers_and_room"),
    ("POST", "/delete-peer", "delete_peer"),
)


async def _on_http_error(exc: HttpError | AccountError) -> Any:
    event(logging.INFO, "http error", path=request.path, status=exc.status, code=exc.code)
    return _error(exc.status, exc.code, exc.message)


async def _on_not_found(exc: Any) -> Any:
    return _error(404, "NOT_FOUND", f"no such endpoint: {request.method} {request.path}")


async def _on_bad_method(exc: Any) -> Any:
    return _error(405, "METHOD_NOT_ALLOWED", f"{request.method} is not allowed on {request.path}")


async def _on_http_exception(exc: HTTPException) -> Any:
    code = (exc.name or "error").upper().replace(" ", "_")
    return _error(exc.code or 400, code, exc.description or code)


async def _on_bug(exc: Exception) -> Any:
    # one line, no traceback: a request must never be able to flood the log
    event(logging.ERROR, "http handler failed", path=request.path, error=type(exc).__name__)
    return _error(500, "INTERNAL_ERROR", "the server failed to handle this request")


ERROR_HANDLERS: tuple[tuple[Any, Callable[..., Awaitable[Any]]], ...] = (
    (HttpError, _on_http_error),
    (AccountError, _on_http_error),  # the accounts' and the login's refusals (same shape)
    (404, _on_not_found),
    (405, _on_bad_method),
    (HTTPException, _on_http_exception),
    (Exception, _on_bug),
)


def add_routes(app: QuartTrio, api: HttpApi, routes: tuple[tuple[str, str, str], ...]) -> None:
    """Each (method, path, name) of a `ROUTES` table: the method `name` of `api`."""
    for method, path, name in routes:
        app.add_url_rule(path, name, getattr(api, name), methods=[method])


class JsonAnswers(DefaultJSONProvider):
    """An endpoint's dict answer, encoded by orjson (which already parses the bodies)
    rather than the standard library: the same bytes as Quart's default for ASCII
    (sorted keys, compact, a closing newline); other text as UTF-8, not \\u escapes.
    A value orjson cannot encode falls back to the default encoder."""

    def response(self, *args: Any, **kwargs: Any) -> Any:
        obj = self._prepare_response_obj(args, kwargs)
        try:
            body = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
        except TypeError:
            return super().response(obj)
        return self._app.response_class(body, mimetype=self.mimetype)


def create_app(ctx: HttpContext) -> QuartTrio:
    app = QuartTrio("signaling_trio")
    app.json = JsonAnswers(app)
    app.asgi_http_class = InlineRequest  # type: ignore[assignment]
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    add_routes(app, HttpApi(ctx), ROUTES)
    for key, handler in ERROR_HANDLERS:
        app.register_error_handler(key, handler)
    return app
