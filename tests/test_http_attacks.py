"""The HTTP port as an attacker (and a broken client) uses it: raw sockets, every request
answered with a JSON error or a closed connection, the process alive and serving
WebSocket peers throughout, at most one log line per bad request."""

from __future__ import annotations

import logging
import os

import httpx
import pytest
import trio

from conftest import register, ws_peer
from rawhttp import exchange, parse_answers, port_of
from signaling_trio._httpserve import KEEP_ALIVE_TIMEOUT
from signaling_trio.testing import open_test_server

BAD_CHUNK = b"POST /nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


async def assert_serving(server, peer) -> None:
    """The process still serves: a registered WebSocket peer gets its pong, /health is 200."""
    assert await peer.nothing_pending()
    status, body = await server.http("GET", "/health")
    assert status == 200 and body["status"] == "healthy"


async def test_bad_chunk_sizes_never_stop_the_server(server, room, caplog):
    """Each of these once raced hypercorn's error answer against the app's and ended the
    process within 2 to 25 requests."""
    caplog.set_level(logging.INFO, logger="signaling_trio")
    port = port_of(server.http_url)
    extend = (b"POST /extend-room HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + room["id_token"].encode()
              + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    results = []

    async def one(request: bytes) -> None:
        results.append(await exchange(port, request))

    async with ws_peer(server.ws_url) as peer:
        await register(peer, room, "watcher")
        for _ in range(15):
            async with trio.open_nursery() as n:
                for i in range(10):
                    n.start_soon(one, extend if i % 3 == 0 else BAD_CHUNK)
        await assert_serving(server, peer)
    assert len(results) == 150
    for answers, closed in results:
        assert closed
        assert len(answers) <= 1
        for a in answers:
            assert 400 <= a.status < 500 and "error" in a.json()
    no_tracebacks(caplog)
    assert server.server.metrics.connection_crashes == 0


async def test_content_length_with_transfer_encoding_is_refused(server):
    smuggle = (b"POST /anonymous-signin HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    answers, closed = await exchange(port_of(server.http_url), smuggle)
    assert closed
    assert [a.status for a in answers] == [400], answers
    assert answers[0].json()["error"] == "BAD_REQUEST", answers
    assert answers[0].headers["connection"] == "close"


async def test_websocket_upgrade_on_the_http_port_is_a_json_400(server, caplog):
    caplog.set_level(logging.INFO, logger="signaling_trio")
    upgrade = (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    answers, _ = await exchange(port_of(server.http_url), upgrade, timeout=3)
    assert [a.status for a in answers] == [400]
    body = answers[0].json()
    assert body["error"] == "WRONG_PORT" and str(server.info.ws_port) in body["message"]
    no_tracebacks(caplog)


@pytest.mark.parametrize("path", ["/extend-room", "/delete-peers-and-room"])
async def test_invalid_utf8_body_is_a_json_400(server, room, caplog, path):
    caplog.set_level(logging.INFO, logger="signaling_trio")
    body = b"\xff\xfe{}"
    request = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {room['id_token']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    answers, _ = await exchange(port_of(server.http_url), request, timeout=1)
    assert [a.status for a in answers] == [400]
    assert answers[0].json()["error"] == "INVALID_JSON"
    no_tracebacks(caplog)


async def test_bodies_that_never_finish_get_408_and_a_closed_connection():
    async with open_test_server(http_request_timeout=0.5) as server:
        port = port_of(server.http_url)
        signin = await server.signin()
        results = []

        async def one(path: str) -> None:
            head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {signin['id_token']}\r\n"
                    f"Content-Length: 1000\r\n\r\n{{").encode()
            results.append(await exchange(port, head, timeout=3))

        with trio.fail_after(4):  # the deadline is 0.5 s; every socket is answered and closed
            async with trio.open_nursery() as n:
                for i in range(100):
                    n.start_soon(one, ("/create-room", "/anonymous-signin", "/extend-room")[i % 3])
        assert len(results) == 100
        for answers, closed in results:
            assert closed
            assert [a.status for a in answers] == [408]
            assert answers[0].json()["error"] == "REQUEST_TIMEOUT"


async def test_oversized_body_refused_without_reading_it(server):
    big = 50 * 1024 * 1024
    head = f"POST /create-room HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\n\r\n".encode()
    answers, closed = await exchange(port_of(server.http_url), head, b"x" * 65536, timeout=3)
    assert closed and [a.status for a in answers] == [413]
    assert answers[0].json()["error"] == "MESSAGE_TOO_LARGE"
    chunked = b"POST /create-room HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    answers, closed = await exchange(port_of(server.http_url), chunked, chunk, chunk, timeout=3)
    assert closed and [a.status for a in answers] == [413]


@pytest.mark.parametrize("version", [b"HTTP/9.9", b"HTTP/2.0", b"HTTP/0.9"])
async def test_unknown_http_versions_get_505(server, version):
    answers, closed = await exchange(port_of(server.http_url), b"GET /health " + version + b"\r\nHost: x\r\n\r\n")
    assert closed
    assert len(answers) == 1 and answers[0].status in (400, 505)
    assert "error" in answers[0].json()


async def test_http2_prior_knowledge_is_not_served(server):
    answers, closed = await exchange(port_of(server.http_url), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert closed and [a.status for a in answers] in ([505], [400])


async def test_sign_ins_and_room_creations_are_rate_limited_per_address():
    async with open_test_server(http_rate_limit=5) as server:
        statuses = [(await server.http("POST", "/anonymous-signin"))[0] for _ in range(5)]
        assert statuses == [200] * 5
        status, body = await server.http("POST", "/anonymous-signin")
        assert status == 429 and body["error"] == "RATE_LIMITED"
        status, headers, _ = await server.http_raw("POST", "/create-room")
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert (await server.http("GET", "/health"))[0] == 200  # other endpoints are not limited


async def test_a_full_store_says_so():
    """sqlite's own 'database or disk is full' (a page limit stands in for the disk)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        async with open_test_server(store="sqlite", data_dir=tmp) as server:
            signin = await server.signin()
            db = server.server.store._db
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count={pages}")
            status, body = 0, {}
            for _ in range(200):  # until the last page is used up
                status, body = await server.http("POST", "/create-room", token=signin["id_token"])
                if status != 200:
                    break
            assert status == 507, body
            assert body["error"] == "STORE_UNAVAILABLE" and "out of space" in body["message"]


async def test_split_post_then_next_request_on_the_same_connection(server):
    """Headers first, the body a moment later, then the next request: every one answered
    (the next request was never read once, until the keep-alive timeout)."""
    port = port_of(server.http_url)
    for path in ("/anonymous-signin", "/delete-peers-and-room"):
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
        body = b"{}" if path == "/anonymous-signin" else b'{"peer_id":"x"}'[:2]
        answers, _ = await exchange(port, head.encode(), body, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
                                    pause=0.05, timeout=1)
        assert len(answers) == 2, answers
        assert answers[1].status == 200 and answers[1].json()["status"] == "healthy"


KINDS = [
    ("POST", "/anonymous-signin", None),  # a handler that never reads its body
    ("POST", "/anonymous-signin", b"{}"),
    ("POST", "/anonymous-signin", b'{"p":"' + b"x" * 1010 + b'"}'),
    ("POST", "/anonymous-signin", b'{"p":"' + b"x" * (64 * 1024 - 10) + b'"}'),
    ("POST", "/delete-peers-and-room", b'{"peer_id":"nobody"}'),  # one that reads it
    ("POST", "/delete-peers-and-room", b'{"peer_id":"nobody","p":"' + b"x" * 1000 + b'"}'),
    ("GET", "/health", None),
]


async def test_kept_alive_requests_of_every_kind_are_all_answered():
    async with open_test_server(http_rate_limit=0) as server:
        slow = []
        async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as client:
            for i in range(2800):
                method, path, body = KINDS[i % len(KINDS)]
                start = trio.current_time()
                with trio.fail_after(5):
                    response = await client.request(method, path, content=body,
                                                    headers={"content-type": "application/json"})
                assert response.status_code == 200, (path, response.text[:200])
                if trio.current_time() - start > 1.0:
                    slow.append((i, path))
        assert slow == []


async def test_keep_alive_connections_idle_out(server):
    """A connection that stays idle after an answer is closed by the server (it once kept
    no idle timer after its first request and stayed open for good)."""
    port = port_of(server.http_url)
    with trio.fail_after(15):
        answers, closed = await exchange(
            port, b"POST /anonymous-signin HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", timeout=12
        )
    assert closed and [a.status for a in answers] == [200]


async def test_stop_closes_idle_keep_alive_connections():
    """Stopping closes a kept-alive connection idle between requests within the grace
    period (not at its idle timeout), after the answer it already had."""
    async with open_test_server() as srv:
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(srv.http_url))
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while not parse_answers(data):
                data += await stream.receive_some(65536)
        assert parse_answers(data)[0].status == 200
        stopping = trio.current_time()
    with trio.fail_after(5):
        assert await stream.receive_some(65536) == b""
    assert trio.current_time() - stopping < KEEP_ALIVE_TIMEOUT
    await stream.aclose()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_abandoned_ws_handshakes_release_at_once(server):
    port = port_of(server.ws_url)
    await trio.sleep(0.2)
    before = open_fds()
    streams = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(100)]
    for s in streams:
        await s.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")  # never finished
    for s in streams:
        await s.aclose()
    with trio.fail_after(3):  # trio-websocket's connect_timeout is 10 s
        while open_fds() > before + 2:
            await trio.sleep(0.05)


def test_descriptor_exhaustion_is_logged_once_per_interval(tmp_path):
    """A server limited to 64 descriptors, 200 clients holding connections open: it
    refuses while out of descriptors, says so in a line or two (not a traceback every
    0.1 s), and serves again as soon as they leave."""
    import resource
    import socket
    import subprocess
    import sys
    import time

    from test_cli import wait_healthy

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ws_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNALING_", "COGNITO_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "signaling_trio", "serve", "--host", "127.0.0.1", "--ws-port", str(ws_port),
         "--http-port", str(http_port), "--store", "memory", "--data-dir", str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    try:
        wait_healthy(http_port, proc)
        clients = []
        for _ in range(200):
            clients.append(socket.create_connection(("127.0.0.1", ws_port), timeout=5))
        time.sleep(2.0)
        for c in clients:
            c.close()
        wait_healthy(http_port, proc, timeout=5)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    failing = [line for line in out.splitlines() if "accept failing" in line]
    assert 1 <= len(failing) <= 2, out[-3000:]
    assert "EMFILE" in failing[0]
    assert "Traceback" not in out, out[-3000:]
    assert proc.returncode == 0


def malformed_requests(rng, n: int) -> list[tuple[bytes, ...]]:
    """In the spirit of h11's fuzz contract: request lines, headers and chunked bodies
    broken in every way a parser can be surprised, some cut off mid-way (an early close)."""
    methods = [b"GET", b"POST", b"PUT", b"DELETE", b"G\x00T", b"", b"POST POST", b"\xff\xfe"]
    paths = [b"/health", b"/create-room", b"/extend-room", b"/delete-peers-and-room", b"/anonymous-signin",
             b"/metrics", b"/login?cli=true&cli_state=" + b"s" * 43, b"/api/auth/login/local", b"/api/auth/cli/deposit",
             b"/api/auth/cli/poll?state=" + b"p" * 43, b"/login/callback?code=c&state=s", b"/login/start", b"/status",
             b"/api/status", b"/static/login.js", b"/static/%2e%2e", b"*", b"", b"/%zz",
             b"/" + b"a" * 9000, b"http://x/health", b"/\r/", b"/?" + b"&" * 500]
    versions = [
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/1.2",
        b"HTTP/2.0",
        b"HTTP/9.9",
        b"HTTP/1.1x",
        b"http/1.1",
        b"",
        b"HTTP/",
    ]
    headers = [
        b"Host: x",
        b"Content-Length: 5",
        b"Content-Length: -1",
        b"Content-Length: 99999999999999999999",
        b"Content-Length: 3, 4",
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding: identity",
        b"Expect: 100-continue",
        b"Connection: close",
        b"Connection: upgrade",
        b"Upgrade: h2c",
        b"Upgrade: websocket",
        b"X: \x00",
        b"Bad Header: 1",
        b": empty",
        b"X-Long: " + b"y" * 20000,
        b"Authorization: Bearer x.y.z",
        b"Content-Type: application/json",
        b" folded: 1",
        b"Host: a\rb",
    ]
    bodies = [b"", b"{}", b"{", b"zz\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"3\r\nab", b"\xff" * 10,
              b"ffffffffffffffff\r\n", b"1;ext=\x01\r\na\r\n0\r\n\r\n", b'{"peer_id": "x"}', b"\r\n\r\n\r\n"]
    out = []
    for _ in range(n):
        line = b" ".join([rng.choice(methods), rng.choice(paths), rng.choice(versions)])
        head = line + b"\r\n" + b"".join(rng.choice(headers) + b"\r\n" for _ in range(rng.randrange(0, 5))) + b"\r\n"
        data = head + rng.choice(bodies)
        if rng.random() < 0.2:
            data = data[: rng.randrange(0, len(data) + 1)]  # closed part way
        if rng.random() < 0.1:
            data = bytes(b ^ 0x20 if rng.random() < 0.02 else b for b in data)  # flipped bits
        cut = rng.randrange(0, len(data) + 1)
        out.append((data[:cut], data[cut:]) if rng.random() < 0.3 else (data,))
    return out


async def test_http_fuzz_every_request_answered_or_closed(caplog):
    import random

    caplog.set_level(logging.INFO, logger="signaling_trio")
    requests = malformed_requests(random.Random(1234), 2000)
    bad: list[object] = []
    async with open_test_server(http_request_timeout=0.5) as server:
        room = await server.new_room()
        port = port_of(server.http_url)
        limit = trio.Semaphore(100)

        async def one(parts: tuple[bytes, ...]) -> None:
            async with limit:
                answers, closed = await exchange(port, *parts, timeout=8)
            for a in answers:
                if a.status >= 500 and a.status not in (501, 505):  # RFC 9112: unknown coding, version
                    bad.append(("5xx", parts, a))
                if a.status >= 400 and (a.headers.get("content-type") != "application/json" or "error" not in a.json()):
                    bad.append(("not json", parts, a))
            if not closed and not answers:
                bad.append(("unanswered and open", parts))

        async with ws_peer(server.ws_url) as peer:
            await register(peer, room, "watcher")
            async with trio.open_nursery() as n:
                for parts in requests:
                    n.start_soon(one, parts)
            await assert_serving(server, peer)
        assert server.server.metrics.connection_crashes == 0
    assert bad == []
    no_tracebacks(caplog)
    http_lines = [r for r in caplog.records if r.name.startswith("signaling_trio") and "http" in r.getMessage()]
    assert len(http_lines) <= len(requests)
