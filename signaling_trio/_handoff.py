"""Sibling processes on one machine (`--workers N`, or instances given one `--handoff-dir`):
a connection whose room another of them owns is handed to that process, descriptor and
all, so a room's peers share one process and their messages never touch Redis.

Owns: this process's Unix socket in the shared directory (`<instance>.sock`), giving a
connection (SCM_RIGHTS: the TCP socket itself, then what was read but not handled, the
admission, the rate bucket) and taking one (rebuilt with `_wsmove.adopt`, registered
with the admission it came with, then reading on from the bytes that came with it).
Never touches: rooms and leases (the cluster says who owns a room), credentials (the
sender admitted the peer; the directory is 0700, so only this user's processes talk).

Exactly one process serves a connection: the sender lets go only after the receiver
acknowledges. If the sibling cannot be reached, or gives the connection back (it closes
the Unix socket without a word, after closing the descriptor), the connection stays and
registers here (through Redis, as any instance). If no word comes in time, the sender
lets go anyway, quietly (the receiver has it, or the client sees a closed socket: the
fault of a process dying).
"""

from __future__ import annotations

import array
import base64
import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import orjson
import trio

from ._log import event
from ._register import Admission, Identity, MoveTo
from ._ws import Connection, WsContext
from ._wsserve import serve_connection
from ._wsfix import DISCONNECT_TIMEOUT, serve_then_close
from ._wsmove import adopt, take
from .protocol import errors as E
from .protocol.messages import decode
from .protocol.registration import parse_register

GIVE_TIMEOUT = 2.0
HEADER = struct.Struct("!I")
MAX_PAYLOAD = 4 * 1024 * 1024  # the register frame and the leftover bytes


@dataclass(frozen=True, slots=True)
class Handed:
    """What travels with the descriptor."""

    register: str  # the register frame: the receiver registers it with `admission`
    admission: Admission
    leftover: bytes  # received after it, not yet parsed (frames that came after the register)
    tokens: float  # the connection's rate bucket

    def encode(self) -> bytes:
        a = self.admission
        return orjson.dumps({
            "register": self.register, "subject": a.identity.subject,
            "digest": a.identity.credential_digest.hex(), "room_id": a.room_id, "echo": a.echo_token,
            "sleap_rtc": a.sleap_rtc, "leftover": base64.b64encode(self.leftover).decode(), "tokens": self.tokens,
        })

    @staticmethod
    def decode(raw: bytes) -> "Handed":
        d = orjson.loads(raw)
        admission = Admission(Identity(d["subject"], bytes.fromhex(d["digest"])), d["room_id"], d["echo"],
                              d["sleap_rtc"])
        return Handed(d["register"], admission, base64.b64decode(d["leftover"]), float(d["tokens"]))


class Hub:
    def __init__(self, directory: str, instance: str, spawn: Callable[..., Any]) -> None:
        self.directory = directory
        self.instance = instance
        self.spawn = spawn  # runs an arrived connection (in the server's connection nursery)
        self.ctx: WsContext  # set by the server once the context (whose mover we are) exists
        self.given = self.taken = 0

    def path(self, instance: str) -> str:
        return os.path.join(self.directory, f"{instance}.sock")

    def is_sibling(self, instance: str) -> bool:
        return instance != self.instance and os.path.exists(self.path(instance))

    def instances(self) -> list[str]:
        """Every process listening in the directory, this one included, sorted."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            names = []
        found = {name[:-5] for name in names if name.endswith(".sock")}
        return sorted(found | {self.instance})

    # ------------------------------------------------------------ receiving
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = self.path(self.instance)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind(path)
            listener.listen(128)
            task_status.started()
            async with trio.open_nursery() as arrivals:
                while True:
                    sock, _ = await listener.accept()
                    arrivals.start_soon(self._arrive, sock)
        finally:
            listener.close()
            try:
                os.unlink(path)
            except OSError:
                pass

    async def _arrive(self, sock: trio.socket.SocketType) -> None:
        """Take one connection. Anything wrong with what came (it is a sibling's, but a
        bug there must not end this process): the descriptor is closed before our end of
        the Unix socket, so the sender, seeing it close without a word, keeps serving."""
        fd = -1
        with sock:
            try:
                with trio.fail_after(GIVE_TIMEOUT):
                    fd, raw = await _receive_with_fd(sock)
                    handed = Handed.decode(raw)
                    stream = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
                    fd = -1  # (the stream owns it now)
                    await sock.send(b"\x01")
            except Exception as exc:
                if fd >= 0:
                    os.close(fd)
                event(logging.WARNING, "handoff failed", side="receive", error=type(exc).__name__)
                return
        self.taken += 1
        self.spawn(self._serve, stream, handed)

    async def _serve(self, stream: trio.SocketStream, handed: Handed) -> None:
        s = self.ctx.settings
        async with stream:
            ws = adopt(stream, handed.leftover, max_message_size=s.ws_max_message_bytes)
            conn = Connection(self.ctx, ws)
            conn._bucket.tokens = handed.tokens
            conn.arrival = partial(_arrived, handed=handed)
            await serve_then_close(ws, serve_connection(self.ctx, conn), DISCONNECT_TIMEOUT)

    # --------------------------------------------------------------- giving
    async def move(self, conn: Connection, to: MoveTo, register: str) -> bool:
        """Give `conn` to `to.instance`: True when that process has it now."""
        leftover = take(conn.ws)
        if leftover is None:
            return False  # closing, or not between frames: it stays, and reads on here
        handed = Handed(register, to.admission, leftover, conn._bucket.tokens)
        sent = await self._give(to.instance, conn.ws._stream.socket.fileno(), handed.encode())
        if sent is None:  # it never left, or the sibling gave it back: serve it here
            return False
        self.given += 1
        event(logging.INFO, "handed over", conn=conn.id, to=to.instance, room_id=to.admission.room_id,
              acknowledged=sent, leftover=len(leftover))
        return True

    async def _give(self, instance: str, fd: int, payload: bytes) -> bool | None:
        """None: not taken (nothing sent, or the sibling closed without a word: it closed
        the descriptor first): serve it here; True: acknowledged; False: sent and no
        word in time (let go: see the module docstring)."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with sock:
            try:
                with trio.fail_after(GIVE_TIMEOUT):
                    await sock.connect(self.path(instance))
            except (OSError, trio.TooSlowError) as exc:
                event(logging.WARNING, "handoff failed", side="connect", to=instance, error=type(exc).__name__)
                if isinstance(exc, ConnectionRefusedError):  # nobody listens: a process that died
                    with contextlib.suppress(OSError):
                        os.unlink(self.path(instance))  # (no longer offered new rooms)
                return None
            try:
                with trio.fail_after(GIVE_TIMEOUT):
                    data = HEADER.pack(len(payload)) + payload
                    sent = await sock.sendmsg([data[:4096]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                               array.array("i", [fd]))])
                    await _send_all(sock, data[sent:])
                    word = await sock.recv(1)
                    return True if word == b"\x01" else None
            except (OSError, trio.TooSlowError) as exc:
                event(logging.WARNING, "handoff failed", side="send", to=instance, error=type(exc).__name__)
                return False


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


async def _receive_with_fd(sock: trio.socket.SocketType) -> tuple[int, bytes]:
    data, ancdata, _flags, _addr = await sock.recvmsg(4096, socket.CMSG_SPACE(array.array("i").itemsize))
    fds = array.array("i")
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError("expected one descriptor")
    try:
        while len(data) < HEADER.size:
            data += await _more(sock)
        (size,) = HEADER.unpack_from(data)
        if size > MAX_PAYLOAD:
            raise ValueError("handoff payload too large")
        while len(data) < HEADER.size + size:
            data += await _more(sock)
    except BaseException:
        os.close(fds[0])
        raise
    return fds[0], bytes(data[HEADER.size:HEADER.size + size])


async def _more(sock: trio.socket.SocketType) -> bytes:
    chunk = await sock.recv(65536)
    if not chunk:
        raise ValueError("handoff connection closed early")
    return chunk


async def _arrived(conn: Connection, *, handed: Handed) -> None:
    """First thing a moved connection does here: register as admitted; then it reads on
    (the frames that came after the register first: they are the leftover bytes)."""
    try:
        conn.registration = await conn.ctx.registrar.enter(conn, parse_register(decode(handed.register)),
                                                           handed.admission)
    except E.ProtocolError as exc:  # (the room is unavailable: the peer is told, as anywhere)
        exc.extra.setdefault("reason", exc.message)
        conn._error(exc)
