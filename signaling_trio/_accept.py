"""The accept loop of both ports: one task per listener, one handler task per connection.

Owns: accepting, retrying when the process runs out of descriptors or memory (logged once
per interval with a count, never a traceback per accept), and containing each
connection: whatever one connection's handler raises is logged as one line, counted,
and ends that connection alone; its stream is closed in `finally` either way.
Never touches: what is spoken on the connection (the WebSocket and HTTP handlers).

trio.serve_listeners does the same accepting but logs a full traceback every 0.1 s
while descriptors are exhausted, and lets a handler's exception end the whole server.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ._log import event

# Accept errors that mean "the process is out of something", not "this listener broke".
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
RETRY_SLEEP = 0.1
REPORT_INTERVAL = 5.0

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@dataclass
class CapacityReport:
    """Counts accept failures for one listener and says when to log them: the first one
    at once, then at most one line per `interval` with how many happened since."""

    what: str
    interval: float = REPORT_INTERVAL
    pending: int = 0
    last_report: float = float("-inf")

    def failed(self, now: float) -> int:
        """Record one failure; return the count to log now, or 0 to stay quiet."""
        self.pending += 1
        if now - self.last_report < self.interval:
            return 0
        count, self.pending, self.last_report = self.pending, 0, now
        return count


async def serve_listener(
    listener: trio.SocketListener,
    handler: Handler,
    *,
    handler_nursery: trio.Nursery,
    what: str,
    on_crash: Callable[[], None],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept connections until cancelled; run `handler(stream)` for each in
    `handler_nursery`. Closes the listener when it returns."""
    report = CapacityReport(what)
    async with listener:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _CAPACITY_ERRNOS:
                    raise
                count = report.failed(trio.current_time())
                if count:
                    event(logging.ERROR, "accept failing", port=what, error=errno.errorcode.get(exc.errno, "?"),
                          count=count, retry_sec=RETRY_SLEEP)
                await trio.sleep(RETRY_SLEEP)
                continue
            handler_nursery.start_soon(_contained, handler, stream, what, on_crash)


async def _contained(handler: Handler, stream: trio.SocketStream, what: str, on_crash: Callable[[], None]) -> None:
    try:
        await handler(stream)
    except Exception as exc:  # one connection's failure is never the server's
        on_crash()
        event(logging.ERROR, "connection crashed", port=what, error=type(exc).__name__, detail=str(exc)[:200])
    finally:
        # the socket's own close: SocketStream.aclose is the same close plus a schedule
        # point, a task switch an ending task does not need (and a plain close needs no shield)
        try:
            stream.socket.close()
        except OSError:
            pass
