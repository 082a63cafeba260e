"""Waiting only when there is something to wait for.

A trio channel send or receive, and a lock's acquire, is a schedule point even when it
need not wait: the task yields to the run loop and is resumed, and resuming a connection's
task resumes its whole stack of coroutines (some twenty frames in the WebSocket and HTTP
paths). These try the no-wait call first and wait only when it would block, so a
request or a register that finds room or an answer ready runs on without a task switch
(docs/PERFORMANCE.md: an HTTP request took 17 task steps, a connect + register 15).
Cancellation still reaches the caller at its next real wait, a socket read or write.
`within` is the deadline those paths put on a wait, at the cost of one cancel scope.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

import trio

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)
T_co = TypeVar("T_co", covariant=True)


class Sendable(Protocol[T_contra]):
    """A memory channel's send side, or anything that behaves like one (a RoomHandle)."""

    def send_nowait(self, value: T_contra) -> None: ...
    async def send(self, value: T_contra) -> None: ...


class Receivable(Protocol[T_co]):
    def receive_nowait(self) -> T_co: ...
    async def receive(self) -> T_co: ...


async def send(channel: Sendable[T], value: T) -> None:
    """`channel.send(value)`, waiting only while the channel is full."""
    try:
        channel.send_nowait(value)
    except trio.WouldBlock:
        await channel.send(value)


async def receive(channel: Receivable[T]) -> T:
    """`channel.receive()`, waiting only while nothing is there."""
    try:
        return channel.receive_nowait()
    except trio.WouldBlock:
        return await channel.receive()


async def acquire(lock: trio.Lock | trio.StrictFIFOLock) -> None:
    """`lock.acquire()`, waiting only while another task holds it (or waits for it: the
    no-wait acquire refuses then, so the order stays first come, first served)."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def within(seconds: float, *, shield: bool = False) -> trio.CancelScope:
    """A cancel scope ending `seconds` from now: `trio.move_on_after` without the
    generator context manager around it (`fail_after` is two of them), for the waits every
    connection and request passes. After it, `.cancelled_caught` says it ran out."""
    return trio.CancelScope(deadline=trio.current_time() + seconds, shield=shield)


class Answer(Generic[T]):
    """One value from one task to the one task that waits for it (a room's answer to a
    register): what a memory channel of size one does for a single reply, without the
    channel's state and its two ends. A second send is refused as a full channel would."""

    __slots__ = ("_value", "_done", "_task")

    def __init__(self) -> None:
        self._value: T | None = None
        self._done = False
        self._task: trio.lowlevel.Task | None = None

    def send_nowait(self, value: T) -> None:
        if self._done:
            raise trio.WouldBlock
        self._value, self._done = value, True
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def receive(self) -> T:
        """The value; waits for it only when it has not come yet (a schedule point then)."""
        if not self._done:
            self._task = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                self._task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self._value  # type: ignore[return-value]
