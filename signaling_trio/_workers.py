"""`--workers N`: N server processes on the same ports, one machine's cores all in use.

Owns: starting the workers, restarting one that dies, passing SIGINT/SIGTERM on, and the
exit code. Each worker is an ordinary `signaling-trio serve` process (its own trio loop)
whose listening sockets set SO_REUSEPORT, so the kernel spreads new connections over
them; they share rooms through Redis like any other instances, and a connection whose
room another worker owns moves to that worker (a directory of Unix sockets made here:
`_handoff`, docs/SCALING.md).
Never touches: sockets, rooms (the workers do).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from . import _log
from .config import Settings

RESTART_DELAY = 1.0
CONFIG_ERROR = 2


def _child_argv(argv: Sequence[str]) -> list[str]:
    """The command line without --workers (a worker is one process)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def run_workers(settings: Settings, argv: Sequence[str]) -> int:
    # the workers hand each other connections through Unix sockets here (_handoff)
    handoff = settings.handoff_dir or tempfile.mkdtemp(prefix="signaling-trio-")  # (mode 0700)
    try:
        return _run(settings, argv, handoff)
    finally:
        if not settings.handoff_dir:
            shutil.rmtree(handoff, ignore_errors=True)


def _run(settings: Settings, argv: Sequence[str], handoff: str) -> int:
    cmd = [sys.executable, "-m", "signaling_trio", *_child_argv(argv)]
    env = {k: v for k, v in os.environ.items() if k != "SIGNALING_WORKERS"}
    env["SIGNALING_REUSE_PORT"] = "1"
    env["SIGNALING_HANDOFF_DIR"] = handoff
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def start(index: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=env)
        _log.event(logging.INFO, "worker started", worker=index, pid=proc.pid)
        return proc

    procs = [start(i) for i in range(settings.workers)]
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)
            for i, proc in enumerate(procs):
                rc = proc.poll()
                if rc is None or stopping:
                    continue
                if rc == CONFIG_ERROR:  # it said why on stderr; the others would too
                    _log.event(logging.ERROR, "worker refused to start", worker=i)
                    code = CONFIG_ERROR
                    stopping.append(0)
                    break
                _log.event(logging.WARNING, "worker exited; restarting", worker=i, pid=proc.pid, code=rc)
                time.sleep(RESTART_DELAY)
                procs[i] = start(i)
    finally:
        if stopping and stopping[0]:
            _log.event(logging.INFO, "signal", signal=signal.Signals(stopping[0]).name, workers=len(procs))
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_timeout + 3
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return code
