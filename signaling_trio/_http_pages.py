"""The two pages a person opens: `/login` (sleap-rtc's browser sign-in) and `/status`.

Owns: serving the pages and their files (from the package, `pages/`), the session
cookie, CSRF and origin checks on every state-changing request, the OAuth redirect and
callback, the CLI's deposit and poll, and the status JSON with its access rule.
Never touches: what a session holds or how a deposit is made (`login`), the provider
exchange (`_oauth`), rooms (the status reads counters only).

Every page response carries a strict Content-Security-Policy (scripts and styles from
this origin only, no inline script, no framing, no referrer: the login link carries the
CLI's state). Pages hold no data: their scripts fetch it, same-origin, as JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from importlib import resources
from typing import Any

import orjson
import trio
from quart import Response, redirect, request

from ._http import HttpApi, HttpContext, HttpError
from ._log import event
from ._oauth import Flow, Provider, ProviderError
from ._status import StatusHistory
from .login import Logins, LoginError, Session, valid_state
from .protocol import errors as E

COOKIE = "st_session"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
FILES = {  # everything the pages load: name -> content type
    "login.html": "text/html; charset=utf-8",
    "status.html": "text/html; charset=utf-8",
    "login.js": "text/javascript; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "pages.css": "text/css; charset=utf-8",
}


def _load_files() -> dict[str, bytes]:
    folder = resources.files("signaling_trio") / "pages"
    return {name: (folder / name).read_bytes() for name in FILES}


class PagesApi(HttpApi):
    def __init__(self, ctx: HttpContext, logins: Logins | None, provider: Provider | None,
                 history: StatusHistory) -> None:
        super().__init__(ctx)
        self.logins = logins  # None: --login off
        self.provider = provider
        self.history = history
        self.files = _load_files()

    # ------------------------------------------------------------ helpers
    def file(self, name: str, status: int = 200) -> Response:
        return Response(self.files[name], status=status, content_type=FILES[name], headers=SECURITY_HEADERS)

    def enabled(self) -> Logins:
        if self.logins is None:
            raise HttpError(404, "NOT_AVAILABLE", "the login page is off on this server (--login off)")
        return self.logins

    async def current(self) -> Session | None:
        return await self.store_call(self.enabled().session, request.cookies.get(COOKIE))

    async def checked_session(self) -> Session:
        """A state-changing request: same origin, the session's cookie, its CSRF token."""
        site = request.headers.get("Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        if (site not in (None, "same-origin")) or (origin is not None and origin != self.origin()):
            raise HttpError(403, "CROSS_ORIGIN", "requests from other sites are refused")
        session = await self.current()
        if session is None or not self.enabled().csrf_ok(session, request.headers.get("X-CSRF-Token")):
            raise HttpError(403, "CSRF", "reload the page and try again (session or CSRF token missing)")
        return session

    def origin(self) -> str:
        public = self.ctx.settings.public_url.rstrip("/")
        return public or f"{request.scheme}://{request.host}"

    def with_cookie(self, resp: Response, sid: str | None) -> Response:
        if sid is not None:
            resp.set_cookie(COOKIE, sid, httponly=True, samesite="Lax", path="/", max_age=15 * 60,
                            secure=self.origin().startswith("https:"))
        return resp

    # --------------------------------------------------------------- pages
    async def login_page(self) -> Any:
        logins = self.enabled()
        state = request.args.get("cli_state")
        session, sid = await self.current(), None
        if not valid_state(state):  # nothing to sign in for: the page says to run sleap-rtc login
            return self.file("login.html")
        if session is None:  # (only here: a session is a store document; this path is rate-limited)
            sid, session = await self.store_call(logins.new_session)
        status = 200
        if state != session.cli_state:
            try:
                await self.store_call(logins.bind_state, session, state)
            except LoginError as exc:
                status = exc.status  # the page says so (its script asks the session)
        return self.with_cookie(self.file("login.html", status), sid)

    def status_enabled(self) -> str:
        """--status-page: "open" or "operator"; 404 when "off"."""
        mode = self.ctx.settings.status_page
        if mode == "off":
            raise HttpError(404, "NOT_AVAILABLE", "the status page is off on this server (--status-page off)")
        return mode

    async def status_page(self) -> Any:
        self.status_enabled()
        return self.file("status.html")

    async def static_file(self, name: str) -> Any:
        if name not in FILES or name.endswith(".html"):
            raise HttpError(404, "NOT_FOUND", f"no such file: {name}")
        return self.file(name)

    # ---------------------------------------------------------- login API
    async def session_info(self) -> Any:
        logins = self.enabled()
        session = await self.current()
        now = logins.clock()
        mode = self.ctx.settings.login_mode
        info: dict[str, Any] = {"mode": mode, "provider": self.provider.label if self.provider else None,
                                "user": None, "cli": False, "csrf": None}
        if session is not None:
            info.update(user=session.user.wire() if session.user else None, csrf=session.csrf,
                        cli=session.cli_state is not None and session.state_expires_at > now)
        return Response(orjson.dumps(info), content_type="application/json", headers=SECURITY_HEADERS)

    async def local_sign_in(self) -> Any:
        mode = self.ctx.settings.login_mode
        if mode not in ("open", "invite"):
            raise HttpError(404, "NOT_AVAILABLE", f"this server signs in with {mode}, not local names")
        session = await self.checked_session()
        data = await self.body()
        user = await self.store_call(self.enabled().local_user, mode, data.get("name"), data.get("invite_code"))
        await self.store_call(self.enabled().sign_in, session, user)
        event(logging.INFO, "login", how=mode, sub=user.sub)
        return {"user": user.wire()}

    async def oauth_start(self) -> Any:
        logins = self.enabled()
        if self.provider is None:
            raise HttpError(404, "NOT_AVAILABLE", "this server has no OAuth provider (--login oidc or github)")
        session = await self.current()
        if session is None:
            return redirect("/login")
        flow = Flow(secrets.token_urlsafe(24), secrets.token_urlsafe(48), secrets.token_urlsafe(16))
        try:
            url = await self.provider.authorize_url(self.origin() + "/login/callback", flow)
        except ProviderError as exc:
            raise HttpError(502, "PROVIDER_ERROR", str(exc)) from None
        await self.store_call(logins.save, dataclasses.replace(session, oauth=dataclasses.asdict(flow)))
        return Response("", status=302, headers={"Location": url, **SECURITY_HEADERS})

    async def oauth_callback(self) -> Any:
        logins = self.enabled()
        session = await self.current()
        flow = session.oauth if session is not None else None
        state = request.args.get("state", "")
        if session is None or flow is None or not secrets.compare_digest(flow["state"].encode(), state.encode()):
            raise HttpError(403, "STATE_MISMATCH", "this sign-in was not started in this browser; start again")
        code = request.args.get("code")
        if not code or self.provider is None:
            raise HttpError(400, "PROVIDER_ERROR", request.args.get("error", "the provider sent no code")[:200])
        try:
            with trio.fail_after(30):
                user = await self.provider.user(code, self.origin() + "/login/callback", Flow(**flow))
        except (ProviderError, trio.TooSlowError) as exc:
            raise HttpError(502, "PROVIDER_ERROR", str(exc) or "the provider did not answer") from None
        await self.store_call(logins.sign_in, session, user)
        event(logging.INFO, "login", how=self.ctx.settings.login_mode, sub=user.sub)
        return Response("", status=302, headers={"Location": "/login", **SECURITY_HEADERS})

    async def cli_deposit(self) -> Any:
        session = await self.checked_session()
        data = await self.body()
        want_key = data.get("account_key", False)
        if not isinstance(want_key, bool):
            raise HttpError(400, E.INVALID_MESSAGE, "'account_key' must be true or false")
        user = await self.store_call(self.enabled().deposit, session, data.get("cli_state"), want_key)
        event(logging.INFO, "cli login deposited", sub=user.sub, account_key=want_key)
        return {"status": "deposited", "user": user.wire()}

    async def cli_poll(self) -> Any:
        status, body = await self.store_call(self.enabled().poll, request.args.get("state"))
        return Response(orjson.dumps(body), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------- status
    async def status_json(self) -> Any:
        s = self.ctx.settings
        if self.status_enabled() == "operator":
            try:
                claims = await self.bearer(required=True)
            except HttpError:
                raise HttpError(401, E.INVALID_ID_TOKEN, "an operator's Authorization: Bearer token is needed")
            assert claims is not None
            if claims["sub"] not in s.operator_subjects:
                raise HttpError(403, "FORBIDDEN", "this identity is not one of the server's --operators")
        body = {"metrics": self.ctx.metrics_json(), "rates": self.history.rates(),
                "store": await self.store_health(), "store_kind": s.store_kind}
        return Response(orjson.dumps(body), content_type="application/json", headers=SECURITY_HEADERS)


ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/login", "login_page"),
    ("GET", "/status", "status_page"),
    ("GET", "/static/<name>", "static_file"),
    ("GET", "/api/auth/login/session", "session_info"),
    ("POST", "/api/auth/login/local", "local_sign_in"),
    ("GET", "/login/start", "oauth_start"),
    ("GET", "/login/callback", "oauth_callback"),
    ("POST", "/api/auth/cli/deposit", "cli_deposit"),
    ("GET", "/api/auth/cli/poll", "cli_poll"),
    ("GET", "/api/status", "status_json"),
)

