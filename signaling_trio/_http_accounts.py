"""The `/api/...` endpoints the sleap-rtc CLI and programs call (SPEC section 4).

Owns: each endpoint's body fields and rule; who the caller is (`Authorization: Bearer`
with the user's JWT or one of their account keys).
Never touches: live rooms except through the router (a deleted room's peers are
disconnected), documents directly (`accounts.Accounts` keeps them).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

from quart import request

from ._http import HttpApi, HttpContext, HttpError
from ._log import event
from .accounts import ACCOUNT_KEY_PREFIX, DAY, DEFAULT_ROOM_DAYS, MAX_ROOM_DAYS, Accounts, NewRoom, wire_time
from .auth import AuthError
from .protocol import errors as E
from .store import RoomRecord

SORT_KEYS = ("joined_at", "name", "expires_at", "role")


class AccountsApi(HttpApi):
    def __init__(
        self, ctx: HttpContext, accounts: Accounts, ice_servers: Callable[[str], list[dict[str, Any]]]
    ) -> None:
        super().__init__(ctx)
        self.accounts = accounts
        self.ice_servers = ice_servers  # for a user: the static list, and TURN credentials

    # ------------------------------------------------------------ helpers
    async def caller(self, *, jwt_only: bool = False) -> str:
        """The Bearer's user: a JWT, or (unless `jwt_only`) one of their account keys."""
        token = self.bearer_token()
        if not token:
            raise HttpError(401, E.INVALID_ID_TOKEN, "Authorization: Bearer <JWT or account key> required")
        if token.startswith(ACCOUNT_KEY_PREFIX) and not jwt_only:
            sub = await self.store_call(self.accounts.account_key_owner, token)
            if sub is None:
                raise HttpError(401, "INVALID_API_KEY", "unknown or revoked account key")
            return str(sub)
        try:
            claims = await self.ctx.verifier.verify(token)
        except AuthError as exc:
            raise HttpError(401, E.INVALID_ID_TOKEN, str(exc)) from None
        return str(claims["sub"])

    async def standing(self, room_id: str, sub: str, *, owner: bool = False) -> tuple[RoomRecord, str]:
        """The room and the caller's role in it; 403 without one (or not the owner)."""
        record = await self.room_record(room_id)
        role = await self.store_call(self.accounts.role_in, record, sub)
        if role is None or (owner and role != "owner"):
            raise HttpError(403, "ROOM_ACCESS_DENIED",
                            "only the room's owner may do this" if owner else "you are not a member of this room")
        return record, role

    @staticmethod
    def days(data: dict[str, Any], name: str, default: float | None, *, allow_never: bool) -> float | None:
        if name not in data:
            return default
        value = data[name]
        if value is None and allow_never:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= MAX_ROOM_DAYS:
            never = " or null (never)" if allow_never else ""
            raise HttpError(
                400, E.INVALID_MESSAGE, f"'{name}' must be a number of days from 1 to {MAX_ROOM_DAYS}{never}"
            )
        return float(value)

    # ------------------------------------------------------------- rooms
    async def create_room_v3(self) -> Any:
        sub = await self.caller()
        data = await self.body()
        days = self.days(data, "expires_in_days", DEFAULT_ROOM_DAYS, allow_never=True)
        room: NewRoom = await self.store_call(self.accounts.create_room, sub, self.optional_field(data, "name"), days)
        self.ctx.count_room_created()
        event(logging.INFO, "room created", room_id=room.record.room_id, creator=sub)
        return {"room_id": room.record.room_id, "room_token": room.token, "name": room.name,
                "expires_at": wire_time(room.record.expires_at)}

    async def list_rooms(self) -> Any:
        sub = await self.caller()
        args = request.args
        role = args.get("role")
        search = (args.get("search") or "").lower()
        rooms = []
        for room_id, entry in (await self.store_call(self.accounts.rooms_of, sub)).items():
            record = await self.store_call(self.ctx.store.get_room, room_id)
            if record is None or (role and entry["role"] != role):
                continue
            meta = await self.store_call(self.accounts.room_meta, room_id)
            if search and search not in meta["name"].lower() and search not in room_id:
                continue
            rooms.append({"room_id": room_id, "name": meta["name"], "role": entry["role"],
                          "expires_at": wire_time(record.expires_at), "joined_at": wire_time(entry["joined_at"])})
        key = args.get("sort_by") if args.get("sort_by") in SORT_KEYS else "joined_at"
        rooms.sort(key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0),
                   reverse=args.get("sort_order") == "desc")
        return {"rooms": rooms}

    async def room_info(self, room_id: str) -> Any:
        sub = await self.caller()
        record, role = await self.standing(room_id, sub)
        meta = await self.store_call(self.accounts.room_meta, room_id)
        members = await self.store_call(self.accounts.members, record)
        return {"room_id": room_id, "name": meta["name"], "role": role, "owner": record.creator,
                "created_at": wire_time(record.created_at), "expires_at": wire_time(record.expires_at),
                "member_count": len(members)}

    async def update_room(self, room_id: str) -> Any:
        sub = await self.caller()
        record, _ = await self.standing(room_id, sub, owner=True)
        data = await self.body()
        name = self.optional_field(data, "name")
        if name is not None:
            await self.store_call(self.accounts.rename, record, name)
        if "expires_in_days" in data:
            days = self.days(data, "expires_in_days", None, allow_never=True)
            expires_at = math.inf if days is None else time.time() + days * DAY
            await self.store_call(self.ctx.store.set_expiry, room_id, expires_at)
        return await self.room_info(room_id)

    async def delete_room_v3(self, room_id: str) -> Any:
        sub = await self.caller()
        record, _ = await self.standing(room_id, sub, owner=True)
        await self.room_call(room_id, "kick", None, E.CLOSE_NORMAL, "room deleted")
        await self.store_call(self.accounts.delete_room, record)
        event(logging.INFO, "room deleted", room_id=room_id, by="owner")
        return {"status": "deleted", "room_id": room_id}

    async def room_members(self, room_id: str) -> Any:
        sub = await self.caller()
        record, _ = await self.standing(room_id, sub)
        members = await self.store_call(self.accounts.members, record)
        return {"members": [{"user_id": s, "role": e["role"], "joined_at": wire_time(e["joined_at"])}
                            for s, e in members.items()]}

    async def remove_member(self, room_id: str, member: str) -> Any:
        sub = await self.caller()
        record, _ = await self.standing(room_id, sub, owner=True)
        if not await self.store_call(self.accounts.remove_member, record, member):
            raise HttpError(404, "NOT_A_MEMBER", f"{member} is not a member of this room")
        return {"status": "removed", "user_id": member}

    async def invite(self, room_id: str) -> Any:
        sub = await self.caller()
        record, _ = await self.standing(room_id, sub)
        code, expires_at = await self.store_call(self.accounts.invite, record)
        return {"invite_code": code, "room_id": room_id, "expires_at": wire_time(expires_at)}

    async def join(self) -> Any:
        sub = await self.caller()
        code = self.field(await self.body(), "invite_code")
        room_id = await self.store_call(self.accounts.redeem, code)  # (AccountError: the app's handler)
        record = await self.room_record(room_id)
        await self.store_call(self.accounts.add_member, record, sub)
        role = await self.store_call(self.accounts.role_in, record, sub)
        return {"room_id": room_id, "role": role}

    # ------------------------------------------------------- account keys
    async def create_key(self) -> Any:
        sub = await self.caller()
        key, entry = await self.store_call(
            self.accounts.create_account_key, sub, self.optional_field(await self.body(), "name")
        )
        event(logging.INFO, "account key created", sub=sub, key=entry["id"])
        return {"key_id": key, "id": entry["id"], "name": entry["name"], "created_at": wire_time(entry["created_at"])}

    async def list_keys(self) -> Any:
        sub = await self.caller()
        keys = await self.store_call(self.accounts.account_keys, sub)
        return {"keys": [{"key_id": e["id"], "name": e["name"], "created_at": wire_time(e["created_at"]),
                          "last_used_at": wire_time(e["last_used_at"]), "revoked": e["revoked_at"] is not None}
                         for e in keys]}

    async def revoke_key(self, key: str) -> Any:
        sub = await self.caller()
        if not await self.store_call(self.accounts.revoke_account_key, sub, key):
            raise HttpError(404, "KEY_NOT_FOUND", "no such account key of yours")
        event(logging.INFO, "account key revoked", sub=sub)
        return {"status": "revoked"}

    # ------------------------------------------------------ worker tokens
    async def create_token(self) -> Any:
        sub = await self.caller(jwt_only=True)
        data = await self.body()
        record, _ = await self.standing(self.field(data, "room_id"), sub)
        worker_name = self.field(data, "worker_name")
        days = self.days(data, "expires_days", None, allow_never=True)
        token, entry = await self.store_call(self.accounts.create_worker_token, sub, record, worker_name, days)
        return {"token_id": token, "room_id": record.room_id, "worker_name": worker_name,
                "expires_at": wire_time(entry["expires_at"])}

    async def list_tokens(self) -> Any:
        sub = await self.caller()
        tokens = []
        for e in await self.store_call(self.accounts.worker_tokens, sub):
            meta = await self.store_call(self.accounts.room_meta, e["room_id"])
            live = self.accounts.worker_token_live(e)
            tokens.append({"token_id": e["id"], "room_id": e["room_id"], "room_name": meta["name"],
                           "worker_name": e["worker_name"], "created_at": wire_time(e["created_at"]),
                           "expires_at": wire_time(e["expires_at"]), "revoked_at": wire_time(e["revoked_at"]),
                           "is_active": live})
        return {"tokens": tokens}

    async def revoke_token(self, token: str) -> Any:
        sub = await self.caller()
        if not await self.store_call(self.accounts.revoke_worker_token, sub, token):
            raise HttpError(404, "TOKEN_NOT_FOUND", "no such worker token of yours")
        return {"status": "revoked"}

    async def delete_token(self, token: str) -> Any:
        sub = await self.caller()
        if not await self.store_call(self.accounts.delete_worker_token, sub, token):
            raise HttpError(404, "TOKEN_NOT_FOUND", "no such worker token of yours")
        return {"status": "deleted"}

    async def delete_inactive_tokens(self) -> Any:
        sub = await self.caller()
        deleted = 0
        for e in await self.store_call(self.accounts.worker_tokens, sub):
            if not self.accounts.worker_token_live(e):
                deleted += await self.store_call(self.accounts.delete_worker_token, sub, e["id"])
        return {"deleted": deleted}

    # -------------------------------------------------- keys for the channel
    async def add_public_key(self) -> Any:
        sub = await self.caller()
        data = await self.body()
        public_key = self.field(data, "public_key")
        device = self.optional_field(data, "device_name") or "default"
        await self.store_call(self.accounts.add_public_key, sub, sub, public_key, device)
        return {"status": "registered", "device_name": device}

    async def authorized_keys(self, room_id: str) -> Any:
        sub = await self.caller()
        record, _ = await self.standing(room_id, sub)
        return {"authorized_keys": await self.store_call(self.accounts.authorized_keys, record)}

    async def list_ice_servers(self) -> Any:
        sub = await self.caller()
        return {"ice_servers": self.ice_servers(sub)}


ROUTES: tuple[tuple[str, str, str], ...] = (
    ("POST", "/api/auth/rooms", "create_room_v3"),
    ("GET", "/api/auth/rooms", "list_rooms"),
    ("POST", "/api/auth/rooms/join", "join"),
    ("GET", "/api/auth/rooms/<room_id>", "room_info"),
    ("PATCH", "/api/auth/rooms/<room_id>", "update_room"),
    ("DELETE", "/api/auth/rooms/<room_id>", "delete_room_v3"),
    ("GET", "/api/auth/rooms/<room_id>/members", "room_members"),
    ("DELETE", "/api/auth/rooms/<room_id>/members/<member>", "remove_member"),
    ("POST", "/api/auth/rooms/<room_id>/invite", "invite"),
    ("POST", "/api/auth/account-keys", "create_key"),
    ("GET", "/api/auth/account-keys", "list_keys"),
    ("DELETE", "/api/auth/account-keys/<key>", "revoke_key"),
    ("POST", "/api/auth/token", "create_token"),
    ("GET", "/api/auth/tokens", "list_tokens"),
    ("DELETE", "/api/auth/token/<token>", "revoke_token"),
    ("DELETE", "/api/auth/tokens/<token>", "delete_token"),
    ("DELETE", "/api/auth/tokens", "delete_inactive_tokens"),
    ("POST", "/api/auth/public-keys", "add_public_key"),
    ("GET", "/api/rooms/<room_id>/authorized-keys", "authorized_keys"),
    ("GET", "/api/ice-servers", "list_ice_servers"),
)

