"""`signaling-trio serve` / `python -m signaling_trio serve`; `signaling-trio user token NAME`."""

from __future__ import annotations

import gc
import logging
import resource
import signal
import sys
from typing import Sequence

import trio

from . import _log
from .config import ConfigError, from_args
from .server import SignalingServer


async def _main(server: SignalingServer, files: tuple[int, int]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                async for signum in signals:
                    _log.event(logging.INFO, "signal", signal=signal.Signals(signum).name)
                    server.shutdown()
                    return

            async def run(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
                await server.run(task_status=task_status)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await nursery.start(run)  # start-up errors raise here, before anything is logged
            _report_open_files(*files)
            tune_gc()  # everything start-up made is frozen out of the collector's walks


def _config_errors(exc: BaseException) -> list[ConfigError]:
    if isinstance(exc, ConfigError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found: list[ConfigError] = []
        for e in exc.exceptions:
            found.extend(_config_errors(e))
        return found
    return []


WANTED_OPEN_FILES = 65536


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> tuple[int, int]:
    """Every connection is a file descriptor: lift the soft limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def _report_open_files(soft: int, hard: int, wanted: int = WANTED_OPEN_FILES) -> None:
    if hard != resource.RLIM_INFINITY and hard < wanted:
        _log.event(logging.WARNING, "open files limited", soft=soft, hard=hard, wanted=wanted,
                   max_connections_about=max(0, soft - 64))
    else:
        _log.event(logging.INFO, "open files", soft=soft, hard=hard)


# The garbage collector, for a process that holds thousands of long-lived connections.
# A full collection walks every live container object, and CPython runs one each time
# objects promoted since the last grow by a quarter: while peers connect that is again
# and again, and at 5,000 peers it cost 0.6 ms of CPU per connect+register (measured,
# docs/PERFORMANCE.md). Connections leave no reference cycles behind when they close
# (tests/test_ws_basic.py::test_connections_leave_no_garbage_cycles), so the collector
# has little to find: it runs far less often, and never walks the start-up objects.
GC_THRESHOLDS = (50_000, 20, 10)


def tune_gc() -> None:
    """Freeze what start-up allocated (imports, the app: never garbage) out of every
    collection, and collect young objects every 50,000 allocations instead of 700."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    _log.event(logging.INFO, "gc", frozen=gc.get_freeze_count(), thresholds=list(GC_THRESHOLDS))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["user"]:  # `signaling-trio user token NAME`: no server involved
        from ._usercli import main as user_main

        return user_main(args[1:])
    try:
        settings = from_args(argv)
    except ConfigError as exc:
        print(f"signaling-trio: {exc}", file=sys.stderr)
        return 2
    _log.setup(settings.log_level, settings.log_format)
    if settings.workers > 1:
        from ._workers import run_workers

        code = run_workers(settings, sys.argv[1:] if argv is None else argv)
        _log.shutdown()
        return code
    files = raise_open_files_limit()
    server = SignalingServer(settings)
    try:
        trio.run(_main, server, files)
    except BaseException as exc:  # noqa: BLE001 - unwrap start-up errors into one line
        _log.shutdown()
        errors = _config_errors(exc)
        if not errors:
            raise
        print(f"signaling-trio: {errors[0]}", file=sys.stderr)
        return 2
    _log.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
