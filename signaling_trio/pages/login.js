// The login page: asks the server who is signed in, shows the one form that fits, and
// finishes a `sleap-rtc login` (the server deposits the result for the CLI's poll).
// No data is inlined in the page; every request is same-origin JSON with a CSRF header.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const fromCli = params.has("cli_state");
let session = null;

function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

async function api(method, path, body) {
  const resp = await fetch(path, {
    method,
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": session ? session.csrf || "" : "" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = {};
  try { data = await resp.json(); } catch (e) { /* an empty or non-JSON answer */ }
  if (!resp.ok) throw new Error(data.message || `the server answered ${resp.status}`);
  return data;
}

function show(id, visible) { $(id).hidden = !visible; }

function render() {
  const signedIn = session.user !== null;
  show("local", !signedIn && (session.mode === "open" || session.mode === "invite"));
  show("invite-row", session.mode === "invite");
  $("invite").required = session.mode === "invite";
  show("oauth", !signedIn && (session.mode === "oidc" || session.mode === "github"));
  if (session.provider) $("oauth-link").textContent = `Sign in with ${session.provider}`;
  show("finish", signedIn && session.cli);
  if (signedIn) $("who").textContent = session.user.username;
  if (fromCli && !session.cli) {
    say("This login link is not valid any more (used, expired, or opened in another browser). " +
        "Run `sleap-rtc login` again.", true);
  } else if (!session.cli) {
    $("intro").textContent = "This page completes `sleap-rtc login`: run it, and open the link it prints.";
  }
  const first = document.querySelector("form:not([hidden]) input, form:not([hidden]) button, #oauth:not([hidden]) a");
  if (first) first.focus();
}

async function refresh() {
  session = await api("GET", "/api/auth/login/session");
  render();
}

$("local").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  say("Signing in…");
  try {
    const body = { name: $("name").value.trim() };
    if (session.mode === "invite") body.invite_code = $("invite").value.trim();
    await api("POST", "/api/auth/login/local", body);
    say("");
    await refresh();
  } catch (e) { say(e.message, true); }
});

$("finish").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  say("Finishing…");
  try {
    // the state this browser's session was opened with (after a provider's redirect the
    // address no longer carries it; the server holds it)
    const body = { account_key: $("want-key").checked };
    if (params.get("cli_state")) body.cli_state = params.get("cli_state");
    await api("POST", "/api/auth/cli/deposit", body);
    show("finish", false);
    show("done", true);
    say("Signed in. You can close this page.");
    $("done").focus();
  } catch (e) { say(e.message, true); }
});

refresh().catch((e) => say(`Could not reach the server: ${e.message}`, true));
