"""The command line: flags/env precedence, clear start-up errors, graceful signals."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import trio

from conftest import register, ws_peer
from signaling_trio import _log
from signaling_trio.config import ConfigError, Settings, from_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_defaults_match_spec():
    s = from_args(["serve"], environ={})
    assert (s.host, s.ws_port, s.http_port, s.data_dir, s.store, s.room_ttl, s.auth, s.log_level, s.log_format) == (
        "0.0.0.0", 8080, 8001, "./signaling-data", "sqlite", 7200, "local", "info", "text")
    assert (s.max_frame_bytes, s.max_metadata_bytes, s.max_room_peers, s.rate_limit, s.rate_burst,
            s.register_timeout, s.stalled_reader_timeout) == (65536, 16384, 1000, 100, 200, 30, 10)


def test_flag_wins_over_env():
    env = {"SIGNALING_WS_PORT": "9000", "SIGNALING_HTTP_PORT": "9001", "SIGNALING_STORE": "memory"}
    s = from_args(["serve", "--ws-port", "9100"], environ=env)
    assert (s.ws_port, s.http_port, s.store) == (9100, 9001, "memory")


def test_every_option_has_flag_and_env():
    from signaling_trio.config import _OPTIONS, build_parser, env_name

    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    words = set(help_text.replace("(", " ").replace(";", " ").split())
    for name, _, _ in _OPTIONS:
        assert "--" + name.replace("_", "-") in words
        assert env_name(name) in words


def test_cognito_variables_select_oidc():
    env = {"COGNITO_REGION": "us-west-1", "COGNITO_USER_POOL_ID": "us-west-1_abc", "COGNITO_APP_CLIENT_ID": "client123"}
    s = from_args(["serve"], environ=env)
    assert s.auth == "oidc"
    assert s.oidc_issuer == "https://cognito-idp.us-west-1.amazonaws.com/us-west-1_abc"
    assert s.oidc_audience == "client123"
    assert from_args(["serve"], environ={**env, "SIGNALING_AUTH": "local"}).auth == "local"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--store", "mongodb://x"], "unknown store scheme"),
        (["--auth", "oidc"], "--oidc-issuer"),
        (["--ws-port", "abc"], "not a valid int"),
        (["--log-format", "xml"], "text or json"),
    ],
)
def test_bad_configuration_rejected(argv, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("-", r"\-")):
        from_args(["serve", *argv], environ={})


def run_cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNALING_", "COGNITO_"))}
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "signaling_trio", "serve", *args], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("argv", [["--store", "ftp://x"], ["--auth", "oidc"], ["--store", "redis://127.0.0.1:1/0"]])
def test_cli_bad_config_exits_nonzero_with_one_line(argv, tmp_path):
    proc = run_cli(*argv, "--data-dir", str(tmp_path))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("signaling-trio: "), err


def test_cli_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("--host", "127.0.0.1", "--ws-port", str(port), "--http-port", "0", "--data-dir", str(tmp_path))
        out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "address already in use" in lines[0] and str(port) in lines[0], err


def wait_healthy(http_port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not become healthy")


def _post(http_port: int, path: str, token: str | None = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", data=b"", method="POST",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


async def cli_room(http_port: int) -> tuple[dict, dict]:
    """Sign in and create a room on a server started with run_cli: (signin, room+id_token)."""
    signin = await trio.to_thread.run_sync(_post, http_port, "/anonymous-signin")
    room = await trio.to_thread.run_sync(_post, http_port, "/create-room", signin["id_token"])
    return signin, {**signin, **room}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_cli_graceful_shutdown(tmp_path, signum):
    ws_port, http_port = free_port(), free_port()
    proc = run_cli("--host", "127.0.0.1", "--ws-port", str(ws_port), "--http-port", str(http_port),
                   "--data-dir", str(tmp_path))
    try:
        await trio.to_thread.run_sync(wait_healthy, http_port, proc)

        signin, room = await cli_room(http_port)
        async with ws_peer(f"ws://127.0.0.1:{ws_port}/any/path") as p:
            assert (await register(p, room, "p"))["type"] == "registered_auth"
            t0 = time.monotonic()
            proc.send_signal(signum)
            assert await p.closed() == 1001
        code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=10))
        assert code == 0
        assert time.monotonic() - t0 < 5
        _, err = proc.communicate()
        assert "shutting down" in err and "stopped" in err
        # never a token in the log
        assert signin["id_token"] not in err and room["token"] not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_settings_validate_roundtrip():
    assert Settings().with_changes(store="memory").store == "memory"


async def test_cli_json_logs(tmp_path):
    ws_port, http_port = free_port(), free_port()
    proc = run_cli("--host", "127.0.0.1", "--ws-port", str(ws_port), "--http-port", str(http_port),
                   "--data-dir", str(tmp_path), env={"SIGNALING_LOG_FORMAT": "json"})
    try:
        await trio.to_thread.run_sync(wait_healthy, http_port, proc)

        signin, room = await cli_room(http_port)
        async with ws_peer(f"ws://127.0.0.1:{ws_port}/") as p:
            await register(p, room, "json-peer", role="worker", metadata={"properties": {"secret_value": "s3cr3t"}})
            await p.request({"type": "peer_message", "to_peer_id": "nobody", "payload": {"sdp": "v=0 private"}})
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(lambda: proc.wait(timeout=10)) == 0
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records and all({"timestamp", "level", "event"} <= r.keys() for r in records)
    assert all(r["timestamp"].endswith("Z") for r in records)
    events = {r["event"] for r in records}
    assert {"listening", "connect", "register", "error", "disconnect", "shutting down", "stopped"} <= events
    reg = next(r for r in records if r["event"] == "register")
    assert reg["peer_id"] == "json-peer" and reg["room_id"] == room["room_id"] and reg["role"] == "worker"
    err_rec = next(r for r in records if r["event"] == "error")
    assert err_rec["code"] == "PEER_NOT_IN_ROOM"
    # the collector tuned for a long-lived process (start-up objects frozen out of it)
    gc_rec = next(r for r in records if r["event"] == "gc")
    assert gc_rec["thresholds"] == [50_000, 20, 10] and gc_rec["frozen"] > 10_000
    # never payloads, SDP, metadata values or tokens
    for secret in (signin["id_token"], room["token"], "s3cr3t", "v=0 private"):
        assert secret not in err


def test_log_lines_batched_in_order_flushed_at_shutdown(monkeypatch):
    """The writer thread writes lines in order, several per write, and what is queued at
    shutdown; past MAX_QUEUED waiting lines it drops and counts instead of waiting."""

    class Stream(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            Stream.writes += 1
            return super().write(text)

    stream = Stream()
    _log.setup("info", "text", stream)
    try:
        for i in range(2000):
            _log.event(logging.INFO, "register", conn=i)
    finally:
        _log.shutdown()
    lines = stream.getvalue().splitlines()
    assert [int(line.rsplit("conn=", 1)[1]) for line in lines] == list(range(2000))
    assert " info    register conn=0" in lines[0] and 1 <= Stream.writes < 100

    # stderr stuck in a write: the deque fills to MAX_QUEUED, the rest is dropped, counted
    monkeypatch.setattr(_log, "MAX_QUEUED", 10)
    entered, release = threading.Event(), threading.Event()

    class Stuck(io.StringIO):
        def write(self, text: str) -> int:
            entered.set()
            release.wait(10)
            return super().write(text)

    dropped, stream = _log.BatchWriter.dropped, Stuck()
    _log.setup("info", "text", stream)
    try:
        _log.event(logging.INFO, "first")
        assert entered.wait(5)
        for i in range(25):
            _log.event(logging.INFO, "queued", i=i)
        assert _log.BatchWriter.dropped == dropped + 15
    finally:
        release.set()
        _log.shutdown()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].endswith("queued i=9")


async def test_unread_stderr_never_stalls_the_server(tmp_path):
    """Logs are written by their own thread: a full stderr pipe drops lines, it does not
    block the event loop (a benchmark harness that never read the pipe found this)."""
    ws_port, http_port = free_port(), free_port()
    proc = run_cli("--host", "127.0.0.1", "--ws-port", str(ws_port), "--http-port", str(http_port),
                   "--store", "memory", "--log-level", "debug", "--rate-limit", "0")  # stderr: a pipe nobody reads
    try:
        await trio.to_thread.run_sync(wait_healthy, http_port, proc)
        async with ws_peer(f"ws://127.0.0.1:{ws_port}/") as p:
            with trio.fail_after(30):
                for _ in range(30):  # 3000 error lines: far more than a pipe buffer holds
                    for _ in range(100):
                        await p.send("{not json")
                    for _ in range(100):
                        assert (await p.recv())["code"] == "INVALID_JSON"
        for _ in range(20):
            await trio.to_thread.run_sync(wait_healthy, http_port, proc, 5)
    finally:
        proc.kill()
        proc.wait()
