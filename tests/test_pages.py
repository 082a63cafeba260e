"""The /login and /status pages, driven in headless Chromium (tests/browser.py), with
the real `sleap-rtc login` (PyPI 0.0.7) polling, and an OAuth/OIDC provider running in
the test (tests/issuer.py FakeProvider). Refusals are tested over plain HTTP.

The browser runs in a thread (selenium blocks); the server and the provider run on this
test's trio loop. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import secrets
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
import pytest
import trio

import browser
from issuer import FakeProvider
from needs import unavailable
from signaling_trio.client import open_signaling_client
from signaling_trio.testing import open_test_server

ROOT = pathlib.Path(__file__).resolve().parent.parent


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    why = browser.missing()
    if why is not None:
        unavailable(why)
    cm = browser.chromium()
    driver = await trio.to_thread.run_sync(cm.__enter__)
    try:
        yield driver
    finally:
        await trio.to_thread.run_sync(cm.__exit__, None, None, None)


async def in_browser(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


@pytest.fixture(scope="module")
def sleap_rtc() -> str:
    try:
        subprocess.run([str(ROOT / "scripts" / "sleap-rtc-venv")], check=True, timeout=900, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        unavailable(f"the sleap-rtc 0.0.7 venv could not be made: {exc}")
    return str(ROOT / ".venv-sleap-rtc" / "bin" / "sleap-rtc")


@asynccontextmanager
async def sleap_rtc_login(sleap_rtc: str, server: Any, home: pathlib.Path) -> AsyncIterator[tuple[Any, str]]:
    """The real `sleap-rtc login`, pointed at our /login; yields (process, the link it printed)."""
    env = {**os.environ, "HOME": str(home), "BROWSER": "true", "PYTHONUNBUFFERED": "1",
           "SLEAP_DASHBOARD_URL": server.http_url + "/login", "SLEAP_RTC_SIGNALING_HTTP": server.http_url,
           "SLEAP_RTC_SIGNALING_WS": server.ws_url}
    proc = await trio.lowlevel.open_process([sleap_rtc, "login", "--timeout", "60"], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = b""
    try:
        with trio.fail_after(30):
            while (m := re.search(rb"(http://\S+/login\?cli=true&cli_state=\S+)", seen)) is None:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, seen.decode(errors="replace")
                seen += chunk
        yield proc, m.group(1).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _exit_code(proc: Any, timeout: float = 30) -> int:
    with trio.fail_after(timeout):
        return await proc.wait()


def _credentials(home: pathlib.Path) -> dict[str, Any]:
    return json.loads((home / ".sleap-rtc" / "credentials.json").read_text())


# ------------------------------------------------------------------------- login
async def test_sleap_rtc_login_in_the_browser_with_an_account_key(sleap_rtc, tmp_path):
    """`sleap-rtc login` polls while Chromium signs in (keyboard only) and asks for an
    account key: the CLI saves a JWT, the user and the key, and all of them work."""
    async with open_test_server(login="open") as server, chromium() as driver:
        async with sleap_rtc_login(sleap_rtc, server, tmp_path) as (proc, url):
            assert f"{server.http_url}/login?cli=true&cli_state=" in url
            await in_browser(browser.local_sign_in, driver, url, "carol", account_key=True)
            assert await _exit_code(proc) == 0
        creds = _credentials(tmp_path)
        assert creds["user"]["username"] == "carol" and creds["user"]["id"] == "carol"
        assert creds["account_key"].startswith("slp_acct_") and creds["public_key_registered"] is True
        status, rooms = await server.http("GET", "/api/auth/rooms", token=creds["jwt"])
        assert status == 200 and rooms == {"rooms": []}
        status, keys = await server.http("GET", "/api/auth/account-keys", token=creds["account_key"])
        assert status == 200 and [k["name"] for k in keys["keys"]] == ["sleap-rtc login"]
        # the link is spent: the poll says so (a replay), and reopening it says so too
        state = url.split("cli_state=")[1]
        assert (await server.http("GET", f"/api/auth/cli/poll?state={state}"))[0] == 410
        await in_browser(driver.get, url)
        await in_browser(browser.wait_text, driver, "message", "not valid any more")
        os.makedirs(browser.ARTIFACTS, exist_ok=True)
        await in_browser(driver.save_screenshot, os.path.join(browser.ARTIFACTS, "login-spent-link.png"))


@pytest.mark.parametrize("kind", ["oidc", "github"])
async def test_oauth_login_in_the_browser(kind, nursery):
    """The page's code flow with PKCE against a provider running in the test; the result
    is this server's own JWT for the provider's user, and it works here."""
    provider = FakeProvider(nursery, client_secret="s3cret" if kind == "github" else None)
    await provider.up()
    options: dict[str, Any] = {"login": kind, "login_client_id": "signaling"}
    if kind == "oidc":
        options.update(auth="oidc", oidc_issuer=provider.url, oidc_audience="client-app")
    else:
        options.update(login_client_secret="s3cret", github_url=provider.url, github_api_url=provider.url)
    state = secrets.token_urlsafe(32)
    async with open_test_server(**options) as server, chromium() as driver:
        await in_browser(driver.get, f"{server.http_url}/login?cli=true&cli_state={state}")
        link = await in_browser(browser.wait_visible, driver, "oauth-link")
        assert ("GitHub" if kind == "github" else "institution") in link.text
        await in_browser(link.click)
        await in_browser(browser.finish, driver, account_key=False)
        status, result = await server.http("GET", f"/api/auth/cli/poll?state={state}")
        assert status == 200, result
        username, sub = ("octo-cat", "github:4242") if kind == "github" else ("dana", "u-1234")
        assert result["user"] == {"id": sub, "username": username} and "account_key" not in result
        status, rooms = await server.http("POST", "/api/auth/rooms", {"name": "lab"}, token=result["jwt"])
        assert status == 200, rooms
        # the exchange carried the PKCE verifier the provider checked against its challenge
        assert len(provider.exchanges) == 1 and len(provider.exchanges[0]["code_verifier"]) >= 43
        # a callback this browser did not start is refused
        status, body = await server.http("GET", "/login/callback?code=x&state=forged")
        assert status == 403 and body["error"] == "STATE_MISMATCH"


# ---------------------------------------------------------------- refusals (HTTP)
async def _page_session(client: httpx.AsyncClient, state: str) -> dict[str, str]:
    resp = await client.get(f"/login?cli=true&cli_state={state}")
    assert resp.status_code == 200
    for header in ("content-security-policy", "x-frame-options", "referrer-policy"):
        assert header in resp.headers
    assert "script-src 'self'" in resp.headers["content-security-policy"]
    assert "unsafe-inline" not in resp.headers["content-security-policy"]
    cookie = resp.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    info = (await client.get("/api/auth/login/session")).json()
    assert info["cli"] is True and info["user"] is None
    return {"X-CSRF-Token": info["csrf"]}


async def test_login_refusals():
    async with open_test_server(login="open", login_state_ttl=1.0) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as a, httpx.AsyncClient(base_url=server.http_url) as b:
            state_a, state_b = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
            csrf_a, csrf_b = await _page_session(a, state_a), await _page_session(b, state_b)
            # no CSRF token, another site, no session: refused before anything happens
            assert (await a.post("/api/auth/login/local", json={"name": "eve"})).status_code == 403
            resp = await a.post("/api/auth/login/local", json={"name": "eve"},
                                headers={**csrf_a, "Origin": "http://evil.example"})
            assert resp.json()["error"] == "CROSS_ORIGIN"
            async with httpx.AsyncClient(base_url=server.http_url) as nobody:
                assert (await nobody.post("/api/auth/cli/deposit", json={}, headers=csrf_a)).status_code == 403
            # a bad name; then deposit before signing in
            resp = await a.post("/api/auth/login/local", json={"name": "a b"}, headers=csrf_a)
            assert resp.status_code == 400 and resp.json()["error"] == "INVALID_NAME"
            assert (await a.post("/api/auth/cli/deposit", json={}, headers=csrf_a)).json()["error"] == "NOT_SIGNED_IN"
            assert (await a.post("/api/auth/login/local", json={"name": "ann"}, headers=csrf_a)).status_code == 200
            # session a cannot deposit for the state session b was opened with (login CSRF)
            resp = await a.post("/api/auth/cli/deposit", json={"cli_state": state_b}, headers=csrf_a)
            assert resp.status_code == 403 and resp.json()["error"] == "STATE_MISMATCH"
            assert (await a.get(f"/api/auth/cli/poll?state={state_b}")).status_code == 202
            assert (await a.get("/api/auth/cli/poll?state=x")).status_code == 400
            # b's state expires before b signs in and deposits
            assert (await b.post("/api/auth/login/local", json={"name": "bob"}, headers=csrf_b)).status_code == 200
            await trio.sleep(1.2)
            resp = await b.post("/api/auth/cli/deposit", json={}, headers=csrf_b)
            assert resp.status_code == 410 and resp.json()["error"] == "STATE_EXPIRED"
            assert (await b.get(f"/api/auth/cli/poll?state={state_b}")).status_code == 202
            # a fresh state: deposited once, taken once; then every replay is refused
            state_c = secrets.token_urlsafe(32)
            await a.get(f"/login?cli=true&cli_state={state_c}")
            assert (await a.post("/api/auth/cli/deposit", json={}, headers=csrf_a)).status_code == 200
            assert (await a.post("/api/auth/cli/deposit", json={"cli_state": state_c}, headers=csrf_a)).status_code \
                == 403  # (the session let go of it)
            polls = [(await a.get(f"/api/auth/cli/poll?state={state_c}")).status_code for _ in range(3)]
            assert polls == [200, 410, 410]
            assert (await b.get(f"/login?cli=true&cli_state={state_c}")).status_code == 409  # a spent link
    async with open_test_server(login="off") as server:
        assert (await server.http("GET", "/login"))[0] == 404
        assert (await server.http("GET", "/api/auth/cli/poll?state=" + "a" * 43))[0] == 404


async def test_invite_codes(tmp_path):
    """--login invite: codes from `signaling-trio user invite` (the real command, on the
    server's sqlite store), one use each; a named code signs in that name only."""
    store = f"sqlite:{tmp_path / 'rooms.sqlite3'}"

    async def invite(*args: str) -> str:
        argv = [sys.executable, "-m", "signaling_trio", "user", "invite", *args, "--store", store]
        out = await trio.run_process(argv,
                                     capture_stdout=True, capture_stderr=True)
        return out.stdout.decode().strip()

    async with open_test_server(login="invite", store=store) as server:
        anyone, only_flo = await invite(), await invite("flo")
        async with httpx.AsyncClient(base_url=server.http_url) as c:
            csrf = await _page_session(c, secrets.token_urlsafe(32))
            sign = functools.partial(c.post, "/api/auth/login/local", headers=csrf)
            assert (await sign(json={"name": "gus"})).json()["error"] == "INVITE_REQUIRED"
            assert (await sign(json={"name": "gus", "invite_code": "nope"})).json()["error"] == "INVALID_INVITE"
            assert (await sign(json={"name": "gus", "invite_code": only_flo})).json()["error"] == "INVALID_INVITE"
            assert (await sign(json={"name": "gus", "invite_code": anyone})).status_code == 200
            assert (await sign(json={"name": "hal", "invite_code": anyone})).json()["error"] == "INVALID_INVITE"
            assert (await sign(json={"name": "flo", "invite_code": only_flo})).status_code == 200
    out = subprocess.run([sys.executable, "-m", "signaling_trio", "user", "invite", "--store", "memory"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "memory" in out.stderr


# ------------------------------------------------------------------------ status
async def test_status_page_shows_peers_coming_and_going():
    async with open_test_server(status_page="open") as server, chromium() as driver:
        room = await server.new_room()
        await in_browser(driver.get, server.http_url + "/status")
        await in_browser(browser.wait_text, driver, "peers", "0")
        async with open_signaling_client(server.ws_url) as w, open_signaling_client(server.ws_url) as c:
            await w.register("gpu-1", room["room_id"], room["token"], room["id_token"], role="worker",
                             metadata={"properties": {"secret_note": "meta-value-never-shown"}})
            await c.register("laptop", room["room_id"], room["token"], room["id_token"], role="client")
            await in_browser(browser.wait_text, driver, "peers", "2")
            await in_browser(browser.wait_text, driver, "roles", "worker")
            source = await in_browser(lambda: driver.page_source)
            assert "meta-value-never-shown" not in source and room["token"] not in source
            os.makedirs(browser.ARTIFACTS, exist_ok=True)
            await in_browser(driver.save_screenshot, os.path.join(browser.ARTIFACTS, "status-two-peers.png"))
            _, raw = await server.http("GET", "/api/status")
            assert "meta-value-never-shown" not in json.dumps(raw) and raw["metrics"]["active_connections"] == 2
        await in_browser(browser.wait_text, driver, "peers", "0")
        await in_browser(driver.save_screenshot, os.path.join(browser.ARTIFACTS, "status-empty.png"))


async def test_status_for_operators_only():
    async with open_test_server(status_page="operator", operators="ops") as server:
        authority = server.server.local_authority
        assert authority is not None
        status, headers, page = await server.http_raw("GET", "/status")  # the page itself holds no data
        assert status == 200 and headers["content-type"].startswith("text/html") and b"<script" in page
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert (await server.http("GET", "/api/status"))[0] == 401
        assert (await server.http("GET", "/api/status", token=authority.issue("someone")))[0] == 403
        status, body = await server.http("GET", "/api/status", token=authority.issue("ops"))
        assert status == 200 and body["store"] == "ok" and "rates" in body
    async with open_test_server(status_page="off") as server:
        assert (await server.http("GET", "/status"))[0] == 404
        assert (await server.http("GET", "/api/status"))[0] == 404


@pytest.mark.parametrize("options, says", [
    ({"login": "bogus"}, "use open, invite, oidc, github or off"),
    ({"auth": "oidc", "oidc_issuer": "https://idp", "login": "open"}, "names local users"),
    ({"login": "github", "login_client_id": "x"}, "--login-client-secret"),
    ({"login": "oidc", "login_client_id": "x"}, "--oidc-issuer"),
    ({"login": "github"}, "--login-client-id"),
    ({"status_page": "operator"}, "--operators"),
    ({"status_page": "maybe"}, "use open, operator or off"),
])
def test_login_and_status_options_are_checked(options, says):
    from signaling_trio.config import ConfigError, Settings, validate

    with pytest.raises(ConfigError, match=re.escape(says)):
        validate(Settings(**options))
    assert Settings(auth="oidc", oidc_issuer="https://idp").login_mode == "off"
    assert Settings(auth="oidc", oidc_issuer="https://idp", login_client_id="c").login_mode == "oidc"
    assert Settings().login_mode == "open"
