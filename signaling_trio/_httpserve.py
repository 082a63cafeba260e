"""Serving the HTTP app with hypercorn's HTTP/1.1 protocol, on our accept loop.

Owns: one task per HTTP connection (hypercorn's `TCPServer` with the changes below),
graceful stop of the HTTP port, and the quart app's lifespan.
Never touches: what an endpoint does (`_http`), request checks (`_httpguard`).

Why not `hypercorn.trio.serve`: read against hypercorn 0.17/0.18, its trio connection
has races that one client can trigger; each change here closes one of them.
- Closing the connection (`_close`: send_eof, aclose) took no lock while a response was
  being written by another task: `send_all` then raised BusyResourceError out of the
  connection's task group, and through `serve_listeners` out of the server. Here every
  write and the close hold the same lock, writes have a deadline (a client that stops
  reading holds no task), and `_accept` contains whatever a connection still raises.
- After a close, the reader could wait forever for `can_read` (a request pipelined
  behind one answered with `Connection: close`); here closing cancels the reader. And
  the reader's own protocol error (those pipelined bytes) closed the connection while
  the answer was half written; here the answer is finished first.
- HTTP/2 is never served (no h2c upgrade, no prior-knowledge `PRI *`): an HTTP/1 server
  that switches protocol on a client's word is attack surface we do not need.
- Protocol errors (bad chunk size, oversized headers, garbage) are answered with the
  API's JSON error shape and the connection closed.
The keep-alive hang (a request after a POST whose body arrived after its answer was
never read) is closed in `_httpguard`, which reads each body before the app runs.

What a request costs is cut where it need not be (docs/PERFORMANCE.md; every
`/anonymous-signin` and `/create-room` is a new connection, so they count in a reconnect
wave):
- The idle timer is a deadline on the reader, not hypercorn's timer task started and
  cancelled around every request. It also bounds a request's headers, as before.
- `InlineRequest` runs a request in the task hypercorn gave it: quart-trio's second task
  waits for body chunks and a disconnect, and `_httpguard` has already read the body and
  passes on no disconnect. A request whose client leaves is still cancelled with its
  connection's task group.
- `_AppTaskGroup`: the ASGI events between the reader and the app (body, end, disconnect)
  pass without a task switch when the queue has room or an item, the write lock is taken
  without one when free (`_nowait`), and the close calls the socket's own close: a
  request took 17 task steps, now 8.
- A cancel scope is a context object and trio's `move_on_after` a generator around one:
  reads take none (hypercorn's reader made one per read, for a read timeout we do not
  set) and a write takes one (shielded, with its deadline), not two.
`tests/test_http_attacks.py` fails if any of these stops holding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import parse_socket_addr
from quart.wrappers import Response
from quart_trio.asgi import TrioASGIHTTPConnection

from . import _nowait as nowait
from ._accept import serve_listener
from ._httpguard import Refusal
from ._log import logger

SEND_TIMEOUT = 10.0  # a response a client does not read within this is abandoned
KEEP_ALIVE_TIMEOUT = 5.0  # also bounds a request's headers: the idle timer runs until they are complete
MAX_HEADER_BYTES = 16 * 1024
GRACEFUL_TIMEOUT = 1.0

_REASONS = {400: "malformed HTTP request", 408: "request not complete in time",
            413: "request too large", 431: "request headers too large", 501: "not implemented",
            505: "HTTP version not supported"}


def protocol_error_bytes(conn: h11.Connection, status: int) -> bytes:
    """The JSON answer to a request h11 could not parse; the connection closes after it."""
    refusal = Refusal(status, "BAD_REQUEST" if status < 500 else "NOT_SUPPORTED",
                      _REASONS.get(status, "malformed HTTP request"))
    body, headers = refusal.encoded()
    return (conn.send(h11.Response(status_code=status, headers=headers))
            + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))


class _H11(H11Protocol):
    _head = b""

    async def _check_protocol(self, event: h11.Request) -> None:
        """No switch to HTTP/2 (see the module docstring); `_httpguard` answers 505."""

    async def _send_h11_event(self, event: Any) -> None:
        """As hypercorn's, but a response's head waits for its body's first bytes (or its
        end) and goes out in the same write: one send per answer instead of three. A
        streamed answer would send its first chunk at once (no endpoint streams today)."""
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if isinstance(event, h11.Response):
            self._head = data
            return
        data, self._head = self._head + data, b""
        if data:
            await self.send(RawData(data=data))

    async def _send_error_response(self, status_code: int) -> None:
        assert isinstance(self.connection, h11.Connection)
        try:
            data = protocol_error_bytes(self.connection, status_code)
        except h11.LocalProtocolError:
            return
        await self.send(RawData(data=data))


class InlineRequest(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection in one task (the module docstring says why)."""

    async def __call__(self, receive: Any, send: Any) -> None:
        request = self._create_request_from_scope(send)
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # gone before the body was whole: nobody to answer
            request.body.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        request.body.set_complete()
        response = await self.app.handle_request(request)
        timeout = response.timeout if isinstance(response, Response) else Ellipsis
        if timeout is Ellipsis:
            timeout = self.app.config["RESPONSE_TIMEOUT"]
        with nowait.within(math.inf if timeout is None else timeout):
            await self._send_response(send, response)


class _AppTaskGroup(TaskGroup):
    """hypercorn's task group; the app's queue put and get do not yield when they need
    not wait (the module docstring says why). A full queue still holds the reader back."""

    async def spawn_app(self, app: Any, config: Config, scope: Any, send: Any) -> Any:
        put, get = trio.open_memory_channel[Any](config.max_app_queue_size)
        assert self._nursery is not None
        self._nursery.start_soon(_handle, app, config, scope, partial(nowait.receive, get), send,
                                 trio.to_thread.run_sync, trio.from_thread.run)
        return partial(nowait.send, put)


class HttpConnection(TCPServer):
    """One HTTP connection: hypercorn's TCPServer, with the locking and close above."""

    def __init__(self, app: Any, config: Config, context: WorkerContext, state: dict[str, Any],
                 stream: trio.SocketStream) -> None:
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self._closed = False
        self._reading = trio.CancelScope()

    async def run(self) -> None:
        sock = self.stream.socket
        try:
            client = parse_socket_addr(sock.family, sock.getpeername())
            server = parse_socket_addr(sock.family, sock.getsockname())
        except OSError:  # reset before we could look
            return
        try:
            async with _AppTaskGroup() as task_group:
                self._task_group = task_group
                self.protocol = _H11(self.app, self.config, self.context, task_group,  # type: ignore[assignment]
                                     ConnectionState(self.state.copy()), False, client, server, self.protocol_send)
                self._idle(True)
                with self._reading:
                    await self._read_data()
        finally:
            await self._close()
            # the protocol holds our bound methods: let go of it, so reference counting
            # frees the connection (tests/test_ws_basic.py: no garbage cycles)
            self.protocol = self._task_group = None  # type: ignore[assignment]

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            if not self._closed and not await self._write(event.data):
                await self._close()
        elif isinstance(event, Closed):
            if self._answer_under_way():
                self._reading.cancel()  # read no more; close once the answer is out (_maybe_recycle)
            else:
                await self._close()
        elif isinstance(event, Updated):
            self._idle(event.idle)

    async def _read_data(self) -> None:
        """hypercorn's, without a cancel scope around each read (it has one for a read
        timeout, which we do not set): `_reading` carries the one deadline."""
        while True:
            try:
                data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            await self.protocol.handle(RawData(data=data))
            if not data:
                break
        await self.protocol.handle(Closed())

    def _idle(self, idle: bool) -> None:
        """Idle (no request under way): the reader's deadline is the keep-alive timeout."""
        self._reading.deadline = trio.current_time() + KEEP_ALIVE_TIMEOUT if idle else math.inf

    def _answer_under_way(self) -> bool:
        """A response has begun and not ended: the reader's protocol errors (bytes after a
        request answered with Connection: close) must not cut it off half sent."""
        conn = getattr(self.protocol, "connection", None)
        return isinstance(conn, h11.Connection) and conn.our_state is h11.SEND_BODY

    async def _write(self, data: bytes) -> bool:
        await nowait.acquire(self.send_lock)
        try:
            with nowait.within(SEND_TIMEOUT, shield=True):
                try:
                    await self.stream.send_all(data)
                    return True
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            self.send_lock.release()
        return False

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reading.cancel()
        with trio.CancelScope(shield=True):
            await nowait.acquire(self.send_lock)  # never while a write is under way
            try:
                # the socket's own close: SocketStream's send_eof and aclose each add a
                # schedule point, and the lock already keeps every writer out. No
                # shutdown first: close sends the same FIN after what is still queued.
                self.stream.socket.close()
            finally:
                self.send_lock.release()
            protocol = getattr(self, "protocol", None)
            if protocol is not None:
                await protocol.handle(Closed())


async def serve_http(
    app: Any,
    sock: trio.socket.SocketType,
    *,
    stop: trio.Event,
    on_crash: Callable[[], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` (ASGI) on the listening `sock` until `stop` is set; then let requests
    under way finish for up to GRACEFUL_TIMEOUT and close every connection."""
    config = Config()
    config.accesslog = None
    config.errorlog = logger.getChild("http")
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.graceful_timeout = GRACEFUL_TIMEOUT
    wrapped = ASGIWrapper(app)
    context = WorkerContext(None)
    state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, config, state)
    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                await accepting.start(partial(
                    serve_listener, trio.SocketListener(sock), partial(_serve_one, wrapped, config, context, state),
                    handler_nursery=connections, what="http", on_crash=on_crash))
                task_status.started()
                await stop.wait()
                accepting.cancel_scope.cancel()
            await context.terminated.set()  # answers from now on close their connection
            # requests under way get GRACEFUL_TIMEOUT; idle keep-alive connections and
            # whatever is left are cancelled then
            connections.cancel_scope.deadline = trio.current_time() + GRACEFUL_TIMEOUT
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


async def _serve_one(app: Any, config: Config, context: WorkerContext, state: dict[str, Any],
                     stream: trio.SocketStream) -> None:
    await HttpConnection(app, config, context, state, stream).run()

