"""The HTTP API (quart-trio, served by hypercorn on the server's nursery).

Owns: request parsing and the auth rules of each endpoint (SPEC section 2).
Never touches: a room's state directly; it asks the room's actor through the supervisor.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
import trio
from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import __version__
from ._log import event
from ._prometheus import negotiate
from .auth import AuthError
from .protocol import errors as E
from .store import RoomRecord, StoreFull, StoreUnavailable, bounded, hash_token

if TYPE_CHECKING:
    from .server import SignalingServer

MAX_TTL = 30 * 86400


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def create_app(server: "SignalingServer") -> QuartTrio:
    app = QuartTrio("signaling_trio")
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024

    @app.errorhandler(HttpError)
    async def _http_error(exc: HttpError) -> Any:
        event(logging.INFO, "http error", path=request.path, status=exc.status, code=exc.code)
        return {"error": exc.code, "message": exc.message}, exc.status

    @app.errorhandler(404)
    async def _not_found(exc: Any) -> Any:
        return {"error": "NOT_FOUND", "message": f"no such endpoint: {request.method} {request.path}"}, 404

    @app.errorhandler(405)
    async def _bad_method(exc: Any) -> Any:
        return {"error": "METHOD_NOT_ALLOWED", "message": f"{request.method} is not allowed on {request.path}"}, 405

    @app.errorhandler(HTTPException)
    async def _http_exception(exc: HTTPException) -> Any:
        code = (exc.name or "error").upper().replace(" ", "_")
        return {"error": code, "message": exc.description or code}, exc.code or 400

    @app.errorhandler(Exception)
    async def _bug(exc: Exception) -> Any:
        # one line, no traceback: a request must never be able to flood the log
        event(logging.ERROR, "http handler failed", path=request.path, error=type(exc).__name__)
        return {"error": "INTERNAL_ERROR", "message": "the server failed to handle this request"}, 500

    async def store_call(coro_fn: Any, *args: Any) -> Any:
        try:
            return await bounded(coro_fn, *args)
        except StoreFull:
            raise HttpError(507, E.STORE_UNAVAILABLE, "the room store is out of space; nothing was changed") from None
        except StoreUnavailable:
            raise HttpError(503, E.STORE_UNAVAILABLE, "the room store cannot be reached") from None

    async def room_call(room_id: str, op: str, *args: Any) -> Any:
        """A question for the room's actor (here or on the instance that owns it)."""
        try:
            return await server.supervisor.call(room_id, op, *args)
        except (trio.TooSlowError, StoreUnavailable):
            raise HttpError(503, E.STORE_UNAVAILABLE, "the room did not answer in time; try again") from None

    async def bearer(required: bool) -> dict[str, Any] | None:
        header = request.headers.get("Authorization", "")
        if not header:
            if required:
                raise HttpError(401, E.INVALID_ID_TOKEN, "Authorization: Bearer <id_token> required")
            return None
        # v1 servers stripped "Bearer " if present; a bare token was accepted too.
        token = header[7:].strip() if header[:7].lower() == "bearer " else header.strip()
        try:
            return await server.verifier.verify(token)
        except AuthError as exc:
            raise HttpError(401, E.INVALID_ID_TOKEN, str(exc)) from None

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

    def string_field(data: dict[str, Any], name: str, required: bool = True) -> str | None:
        value = data.get(name)
        if value is None:
            if required:
                raise HttpError(400, E.MISSING_FIELDS, f"Missing required fields: {name}")
            return None
        if not isinstance(value, str) or not value or len(value) > 256:
            raise HttpError(400, E.INVALID_MESSAGE, f"field '{name}' must be a non-empty string")
        return value

    @app.get("/health")
    async def health() -> Any:
        checks: dict[str, Any] = {}
        try:
            with trio.fail_after(2):
                await server.store.check()
            checks["store"] = "ok"
        except (StoreUnavailable, trio.TooSlowError) as exc:
            checks["store"] = "unreachable" if isinstance(exc, trio.TooSlowError) else "error"
        if server.oidc is not None:
            checks["jwks"] = "ok" if server.oidc.ready else "unavailable"
        body_ = {"status": "healthy", "timestamp": utc_timestamp(), "version": __version__}
        if any(v != "ok" for v in checks.values()):
            body_["status"] = "unhealthy"
            body_["checks"] = checks
            return body_, 503
        return body_

    @app.get("/metrics")
    async def metrics() -> Any:
        # JSON stays the default (v2); Prometheus scrapers ask for text or OpenMetrics.
        best = negotiate(request.headers.get("Accept", ""))
        if best == "json":
            return server.metrics_json()
        body_, content_type = server.prometheus.render(openmetrics=best == "openmetrics")
        return body_, 200, {"Content-Type": content_type}

    @app.post("/anonymous-signin")
    async def anonymous_signin() -> Any:
        if server.local_authority is None:
            raise HttpError(
                404, "NOT_AVAILABLE",
                "anonymous sign-in is only offered with --auth local; sign in with your identity provider",
            )
        username = str(uuid.uuid4())
        token = server.local_authority.issue(username)
        event(logging.INFO, "anonymous signin", sub=username)
        return {"id_token": token, "username": username}

    @app.get("/.well-known/jwks.json")
    async def jwks() -> Any:
        if server.local_authority is None:
            raise HttpError(404, "NOT_AVAILABLE", "this server verifies an external issuer's tokens; it has no keys of its own")
        return server.local_authority.jwks()

    @app.post("/create-room")
    async def create_room() -> Any:
        claims = await bearer(required=True)
        assert claims is not None
        now = time.time()
        room_id = secrets.token_hex(6)
        token = secrets.token_urlsafe(24)  # 192 bits
        expires_at = int(now + server.settings.room_ttl)
        await store_call(server.store.create_room, RoomRecord(room_id, hash_token(token), claims["sub"], now, expires_at))
        server.metrics.rooms_created += 1
        event(logging.INFO, "room created", room_id=room_id, creator=claims["sub"])
        return {"room_id": room_id, "token": token, "expires_at": expires_at}

    @app.post("/extend-room")
    async def extend_room() -> Any:
        claims = await bearer(required=True)
        assert claims is not None
        data = await body()
        room_id = string_field(data, "room_id")
        assert room_id is not None
        ttl = data.get("ttl_sec", server.settings.room_ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl <= MAX_TTL:
            raise HttpError(400, E.INVALID_MESSAGE, f"'ttl_sec' must be a number from 1 to {MAX_TTL}")
        record = await store_call(server.store.get_room, room_id)
        if record is None:
            raise HttpError(404, E.ROOM_NOT_FOUND, f"Room {room_id} not found")
        sub = claims["sub"]
        if sub != record.creator:
            subs = await room_call(room_id, "subs")
            if not subs or sub not in subs:
                raise HttpError(403, "FORBIDDEN", "only the room's creator or a peer registered in it may extend it")
        expires_at = int(time.time() + ttl)
        await store_call(server.store.set_expiry, room_id, expires_at)
        event(logging.INFO, "room extended", room_id=room_id, ttl=ttl)
        return {"room_id": room_id, "expires_at": expires_at}

    @app.post("/delete-peers-and-room")
    async def delete_peers_and_room() -> Any:
        data = await body()
        peer_id = string_field(data, "peer_id")
        assert peer_id is not None
        claims = await bearer(required=False)
        room_id = string_field(data, "room_id", required=False) or await server.supervisor.find_room(peer_id)
        if room_id is None:
            return {"status": "peer not found"}
        record = await store_call(server.store.get_room, room_id)
        peer_sub = await room_call(room_id, "peer_sub", peer_id)
        sub = claims["sub"] if claims else None

        if record is not None and sub is not None and sub == record.creator:
            await room_call(room_id, "kick", None, E.CLOSE_NORMAL, "room deleted")
            await store_call(server.store.delete_room, room_id)
            event(logging.INFO, "room deleted", room_id=room_id, by="creator")
            return {"status": "room deleted; all peers disconnected"}

        if peer_sub is not None:
            if sub is None or sub != peer_sub:
                raise HttpError(403, "FORBIDDEN", f"peer {peer_id} is still connected; only it or the room's creator may remove it")
            await room_call(room_id, "kick", peer_id, E.CLOSE_NORMAL, "peer deleted")

        remaining = await room_call(room_id, "count") or 0
        if record is None:
            return {"status": "peer deleted. Room status: not found"}
        if remaining == 0:
            await store_call(server.store.delete_room, room_id)
            event(logging.INFO, "room deleted", room_id=room_id, by="last peer")
            return {"status": "peer deleted successfully. Room status: deleted"}
        return {"status": f"peer deleted successfully. Room status: active ({remaining} peers connected)"}

    return app
