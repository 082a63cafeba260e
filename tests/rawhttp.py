"""Raw HTTP/1.1 over a TCP socket, as an attacker (or a broken client) speaks it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import trio


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_answers(data: bytes) -> list[Answer]:
    """Every complete response in `data` (bodies framed by Content-Length)."""
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        answers.append(Answer(status, headers, rest[:length]))
        data = rest[length:]
    return answers


async def exchange(port: int, *parts: bytes, pause: float = 0.0, timeout: float = 5.0) -> tuple[list[Answer], bool]:
    """Send `parts` (with `pause` between them), then read until the server closes or
    `timeout` passes. Returns the answers and whether the server closed the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    closed = False
    async with stream:
        try:
            for i, part in enumerate(parts):
                if i and pause:
                    await trio.sleep(pause)
                await stream.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server may close before it has read everything
        with trio.move_on_after(timeout):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                data += chunk
    return parse_answers(data), closed


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))
