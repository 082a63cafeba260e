"""The WebSocket opening handshake, for the one request shape every client sends.

Owns: reading an upgrade request's head strictly (`fast_key`) and the 101 answer. Pure:
bytes in, bytes out.
Never touches: sockets (`_wsfix.handle_connection` reads and writes), anything unusual.

Why: wsproto parses the handshake with h11 and builds the answer through it, about
120 us of CPU per connection on our machines, a tenth of a whole connect. Here a
canonical request (`GET … HTTP/1.1`, Host, `Upgrade: websocket`, a `Connection` with
`upgrade`, version 13, a key of 16 bytes, no body, no subprotocol) is answered in a few
microseconds. Anything else, however legal, returns None and goes to wsproto, which
accepts or refuses it as before: this path only ever accepts what wsproto accepts
(tests/test_wshandshake.py checks that against wsproto itself).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

MAX_HEAD = 16 * 1024  # as h11's limit for a request's head
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
# a header that would make this request not the plain one: let wsproto judge it
_SLOW = {b"content-length", b"transfer-encoding", b"sec-websocket-protocol"}


def fast_key(head: bytes) -> bytes | None:
    """The Sec-WebSocket-Key of a canonical upgrade request (`head` ends with the blank
    line), or None: anything else is for wsproto."""
    lines = head.split(b"\r\n")
    if len(lines) < 3 or lines[-1] or lines[-2]:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1" or not _TARGET.fullmatch(parts[1]):
        return None
    fields: dict[bytes, bytes] = {}
    for line in lines[1:-2]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            return None
        name, value = name.lower(), value.strip(b" \t")
        if name in fields or name in _SLOW or not _VALUE.fullmatch(value):
            return None  # (a repeated field, or one that changes the request: wsproto decides)
        fields[name] = value
    if not fields.get(b"host") or fields.get(b"upgrade", b"").lower() != b"websocket":
        return None
    if b"upgrade" not in [t.strip(b" \t").lower() for t in fields.get(b"connection", b"").split(b",")]:
        return None
    key = fields.get(b"sec-websocket-key", b"")
    if fields.get(b"sec-websocket-version") != b"13" or not _sixteen_bytes(key):
        return None
    return key


def _sixteen_bytes(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept_response(key: bytes) -> bytes:
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
