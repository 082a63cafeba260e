"""Browser sign-in for the sleap-rtc CLI: sessions, CLI states, deposits, invite codes.

Owns: what the login page's requests do to the store, none of HTTP. A browser session
(a random id in an HttpOnly cookie; the store keeps only its hash) holds the CLI state
the page was opened with, a CSRF token, who signed in, and an OAuth flow under way. A
deposit turns a signed-in session with a bound state into a result (JWT, user, and an
account key if asked) that the CLI's poll takes once.
Never touches: HTTP requests and cookies (`_http_login`), the OAuth exchange (`_oauth`).

Everything lives in the store's documents, so a poll or an OAuth callback may reach
another instance behind a load balancer. Each document carries its `expires_at`; an
expired one is refused and deleted when it is read.
"""

from __future__ import annotations

import dataclasses
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable

from .accounts import AccountError, Accounts
from .store import Store, hash_token

SESSION_TTL = 15 * 60  # a browser session: the page, the sign-in, the deposit
STATE_TTL = 5 * 60  # a CLI state, from page load to deposit, and a deposit until polled
INVITE_DAYS = 7.0
# sleap-rtc makes its state with secrets.token_urlsafe(32): 43 characters
STATE_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
# a local user's name is their peer id in sleap-rtc: no spaces, nothing to escape
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class LoginError(AccountError):
    """Refused: the HTTP layer answers `status` with `code` and the message."""


@dataclass(frozen=True, slots=True)
class User:
    sub: str  # the JWT's subject: rooms, members and keys belong to it
    username: str  # sleap-rtc's display name and client peer id

    def wire(self) -> dict[str, str]:
        return {"id": self.sub, "username": self.username}


@dataclass(frozen=True, slots=True)
class Session:
    sid_hash: str
    csrf: str
    cli_state: str | None
    state_expires_at: float
    user: User | None
    oauth: dict[str, str] | None  # an OAuth flow under way (_oauth.Flow as a dict: state, PKCE verifier, nonce)

    def doc(self, expires_at: float) -> dict[str, Any]:
        return {"csrf": self.csrf, "cli_state": self.cli_state, "state_expires_at": self.state_expires_at,
                "user": self.user.wire() if self.user else None, "oauth": self.oauth, "expires_at": expires_at}


def _session_from(sid_hash: str, doc: dict[str, Any]) -> Session:
    u = doc.get("user")
    return Session(sid_hash, doc["csrf"], doc.get("cli_state"), doc.get("state_expires_at", 0.0),
                   User(u["id"], u["username"]) if u else None, doc.get("oauth"))


def _result_key(state: str) -> str:
    """Where a deposit for this CLI state waits for its poll (then its tombstone)."""
    return f"cli-login:{hash_token(state)}"


def _used() -> LoginError:
    return LoginError(409, "STATE_USED", "this login link was used already; run `sleap-rtc login` again")


def valid_state(state: Any) -> bool:
    return isinstance(state, str) and STATE_RE.fullmatch(state) is not None


def valid_name(name: Any) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


async def create_invite(store: Store, name: str | None, days: float = INVITE_DAYS) -> str:
    """A one-time code for `--login invite` (for `name` only, if given); only its hash is kept."""
    code = secrets.token_urlsafe(12)
    await store.put_doc(f"login-invite:{hash_token(code)}", {"name": name, "expires_at": time.time() + days * 86400})
    return code


class Logins:
    def __init__(self, store: Store, accounts: Accounts, issue: Callable[[str], str], *,
                 state_ttl: float = STATE_TTL, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.accounts = accounts
        self.issue = issue  # sub -> a JWT signed by this server
        self.state_ttl = state_ttl
        self.clock = clock

    # ------------------------------------------------------------ sessions
    async def session(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 128:
            return None
        sid_hash = hash_token(sid)
        doc = await self._live(f"login-session:{sid_hash}")
        return None if doc is None else _session_from(sid_hash, doc)

    async def new_session(self) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(hash_token(sid), secrets.token_urlsafe(24), None, 0.0, None, None)
        await self.save(session)
        return sid, session

    async def save(self, session: Session) -> None:
        await self.store.put_doc(f"login-session:{session.sid_hash}", session.doc(self.clock() + SESSION_TTL))

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(session.csrf.encode(), token.encode())

    async def bind_state(self, session: Session, state: str) -> Session:
        """The page was opened for this CLI state: only this session may deposit for it."""
        if await self.store.get_doc(_result_key(state)) is not None:
            raise _used()
        bound = dataclasses.replace(session, cli_state=state, state_expires_at=self.clock() + self.state_ttl)
        await self.save(bound)
        return bound

    async def sign_in(self, session: Session, user: User) -> Session:
        signed = dataclasses.replace(session, user=user, oauth=None)
        await self.save(signed)
        return signed

    # ------------------------------------------------------- local sign-in
    async def local_user(self, mode: str, name: Any, code: Any) -> User:
        """auth=local: `open` takes any valid name; `invite` needs a code from
        `signaling-trio user invite` (one use; for one name if it was made for one)."""
        if not valid_name(name):
            raise LoginError(400, "INVALID_NAME", "a name is 1-64 letters, digits, '.', '_' or '-', "
                                                  "starting with a letter or digit")
        if mode == "invite":
            await self._redeem_invite(code, name)
        return User(name, name)

    async def _redeem_invite(self, code: Any, name: str) -> None:
        if not isinstance(code, str) or not code or len(code) > 128:
            raise LoginError(403, "INVITE_REQUIRED", "this server signs in by invite code only")
        key = f"login-invite:{hash_token(code)}"
        doc = await self._live(key)
        # (the delete is the redemption: of two requests with one code, one wins)
        if doc is None or doc.get("name") not in (None, name) or not await self.store.delete_doc(key):
            raise LoginError(403, "INVALID_INVITE", "unknown, used, expired or another user's invite code")

    # ----------------------------------------------------- deposit and poll
    async def deposit(self, session: Session, state: Any, want_key: bool) -> User:
        if session.user is None:
            raise LoginError(401, "NOT_SIGNED_IN", "sign in first")
        state = session.cli_state if state is None else state
        if not valid_state(state) or session.cli_state is None \
                or not hmac.compare_digest(session.cli_state.encode(), state.encode()):
            raise LoginError(403, "STATE_MISMATCH", "this login was not started in this browser; "
                                                    "open the link `sleap-rtc login` printed")
        if session.state_expires_at <= self.clock():
            raise LoginError(410, "STATE_EXPIRED", "this login link expired; run `sleap-rtc login` again")
        key = _result_key(state)
        if await self.store.get_doc(key) is not None:
            raise _used()
        result: dict[str, Any] = {"jwt": self.issue(session.user.sub), "user": session.user.wire()}
        if want_key:
            result["account_key"], _ = await self.accounts.create_account_key(session.user.sub, "sleap-rtc login")
        await self.store.put_doc(key, {"result": result, "expires_at": self.clock() + self.state_ttl})
        await self.save(dataclasses.replace(session, cli_state=None, state_expires_at=0.0, oauth=None))
        return session.user

    async def poll(self, state: Any) -> tuple[int, dict[str, Any]]:
        """200 with the result, once; 202 while nothing was deposited; 410 after it was
        taken or expired (sleap-rtc keeps polling on anything but 200)."""
        if not valid_state(state):
            return 400, {"error": "INVALID_STATE", "message": "state must be the CLI's login state"}
        key = _result_key(state)
        doc = await self.store.get_doc(key)
        if doc is None:
            return 202, {"status": "pending"}
        gone = 410, {"error": "STATE_USED", "message": "this login was completed or expired already"}
        if "result" not in doc or doc["expires_at"] <= self.clock():
            return gone
        if not await self.store.delete_doc(key):  # another poll took it first
            return gone
        # a tombstone: a replayed poll is told, not kept waiting
        await self.store.put_doc(key, {"taken": True, "expires_at": self.clock() + self.state_ttl})
        return 200, doc["result"]

    async def _live(self, key: str) -> dict[str, Any] | None:
        doc = await self.store.get_doc(key)
        if doc is not None and doc.get("expires_at", 0) <= self.clock():
            await self.store.delete_doc(key)
            return None
        return doc
