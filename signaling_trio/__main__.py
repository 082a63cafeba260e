"""`signaling-trio serve` / `python -m signaling_trio serve`."""

from __future__ import annotations

import signal
import sys
from typing import Sequence

import trio

from . import _log
from .config import ConfigError, from_args
from .server import SignalingServer


async def _main(server: SignalingServer) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                async for signum in signals:
                    _log.event(20, "signal", signal=signal.Signals(signum).name)
                    server.shutdown()
                    return

            nursery.start_soon(watch)
            await server.run()
            nursery.cancel_scope.cancel()


def _config_errors(exc: BaseException) -> list[ConfigError]:
    if isinstance(exc, ConfigError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        found: list[ConfigError] = []
        for e in exc.exceptions:
            found.extend(_config_errors(e))
        return found
    return []


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = from_args(argv)
    except ConfigError as exc:
        print(f"signaling-trio: {exc}", file=sys.stderr)
        return 2
    _log.setup(settings.log_level, settings.log_format)
    server = SignalingServer(settings)
    try:
        trio.run(_main, server)
    except BaseException as exc:  # noqa: BLE001 - unwrap start-up errors into one line
        errors = _config_errors(exc)
        if not errors:
            raise
        print(f"signaling-trio: {errors[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
