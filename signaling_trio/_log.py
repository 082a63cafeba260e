"""Structured logging: one line per event, text or JSON.

Owns: the log format. Callers pass an event name and ids, types and sizes; never payloads,
SDP or tokens (nothing here could tell them apart, so the rule is on the callers).
"""

from __future__ import annotations

import datetime
import logging
import logging.handlers
import queue
import sys
from typing import Any

import orjson

logger = logging.getLogger("signaling_trio")


def event(level: int, name: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):  # no formatting work for events that are off
        logger.log(level, name, extra={"fields": fields})


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[
            :-3
        ]
        fields = getattr(record, "fields", None) or {}
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{ts}Z {record.levelname.lower():7} {record.getMessage()}" + (f" {tail}" if tail else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        obj.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(obj, default=str).decode()


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; never blocks the event loop. When the queue is
    full (stderr not being read), records are dropped and counted, not waited for."""

    dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            DroppingQueueHandler.dropped += 1

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # formatting happens in the writer thread


_listener: logging.handlers.QueueListener | None = None


def setup(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    """Log lines are written by a thread of their own: a slow or blocked stderr (a full
    pipe, a stuck log shipper) must never stall the server."""
    global _listener
    shutdown()
    writer = logging.StreamHandler(stream or sys.stderr)
    writer.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    q: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=10_000)
    _listener = logging.handlers.QueueListener(q, writer, respect_handler_level=False)
    _listener.start()
    logger.handlers[:] = [DroppingQueueHandler(q)]
    logger.setLevel(level.upper())
    logger.propagate = False


def shutdown() -> None:
    """Flush what is queued and stop the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
