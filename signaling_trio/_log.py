"""Structured logging: one line per event, text or JSON.

Owns: the log format. Callers pass an event name and ids, types and sizes; never payloads,
SDP or tokens (nothing here could tell them apart, so the rule is on the callers).
"""

from __future__ import annotations

import collections
import datetime
import logging
import sys
import threading
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


MAX_QUEUED = 10_000  # records waiting for the writer; beyond this they are dropped, counted
FLUSH_INTERVAL = 0.05  # seconds between the writer's batches


class BatchWriter(logging.Handler):
    """Records wait in a deque the writer thread empties every FLUSH_INTERVAL: formatted
    there, written in one write per batch. The event loop's thread only appends: it never
    waits on a lock the writer holds, nor wakes it, nor waits on stderr. A queue.Queue with
    a thread woken per record cost ~0.3 ms of CPU per line in a connect wave (GIL hand-offs;
    docs/PERFORMANCE.md). When the deque is full (stderr not being read), records are
    dropped and counted, not waited for."""

    dropped = 0

    def __init__(self, stream: Any, formatter: logging.Formatter) -> None:
        super().__init__()
        self.stream = stream
        self.setFormatter(formatter)
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="signaling-trio-log", daemon=True)
        self._thread.start()

    def handle(self, record: logging.LogRecord) -> bool:  # (no handler lock: a deque append is atomic)
        if len(self._records) >= MAX_QUEUED:
            BatchWriter.dropped += 1
        else:
            self._records.append(record)
        return True

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self._write_batch()
        self._write_batch()

    def _write_batch(self) -> None:
        records = self._records
        lines = []
        while records:
            record = records.popleft()
            try:
                lines.append(self.format(record) + "\n")
            except Exception:
                self.handleError(record)
        if lines:
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr gone: nothing to tell

    def close(self) -> None:
        """Write what is queued and stop the writer thread."""
        self._stop.set()
        self._thread.join()
        super().close()


_writer: BatchWriter | None = None


def setup(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    """Log lines are written by a thread of their own: a slow or blocked stderr (a full
    pipe, a stuck log shipper) must never stall the server."""
    global _writer
    shutdown()
    _writer = BatchWriter(stream or sys.stderr, JsonFormatter() if fmt == "json" else TextFormatter())
    logger.handlers[:] = [_writer]
    logger.setLevel(level.upper())
    logger.propagate = False


def shutdown() -> None:
    """Flush what is queued and stop the writer thread."""
    global _writer
    if _writer is not None:
        logger.removeHandler(_writer)
        _writer.close()
        _writer = None
