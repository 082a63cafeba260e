"""The real SLEAP-RTC programs (PyPI sleap-rtc 0.0.7, in .venv-sleap-rtc made by
scripts/sleap-rtc-venv) run a job through the server, inside a network namespace made for
the test (tests/sleap_rtc_e2e.py does the run; this checks what it saw).

Needs root (for `unshare --net`) and iproute2's `ip`. Without them the test is skipped
with the reason, except under CI=true, where it fails: CI runs as root and must run it.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import browser
from needs import unavailable

ROOT = pathlib.Path(__file__).resolve().parent.parent
HERE = pathlib.Path(__file__).resolve().parent

ORDER = [
    "client registered",
    "offer reached the worker with role client",
    "worker sent the answer",
    "answer reached the client",
    "ICE completed",
    "data channel open",
    "job request reached the worker",
]


MESH = [
    "second worker respects the admin",
    "mesh offer reached the admin",
    "mesh answer reached the second worker",
    "mesh ICE completed",
    "mesh data channel open",
]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root for `unshare --net` (the test's own network namespace)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (util-linux / iproute2)"
    return browser.missing()  # `sleap-rtc login` is completed in Chromium


@pytest.fixture(scope="module")
def sleap_rtc() -> str:
    why = _missing()
    if why is not None:
        unavailable(why)
    subprocess.run([str(ROOT / "scripts" / "sleap-rtc-venv")], check=True, timeout=900)
    return str(ROOT / ".venv-sleap-rtc" / "bin" / "sleap-rtc")


def test_a_job_through_the_server_with_the_real_programs(sleap_rtc, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["unshare", "--net", sys.executable, str(HERE / "sleap_rtc_e2e.py"), sleap_rtc,
                          str(tmp_path)], capture_output=True, text=True, timeout=400, env=env)
    assert out.stdout.strip(), out.stderr[-3000:]
    run = json.loads(out.stdout)
    context = json.dumps({k: v for k, v in run.items() if k != "server_log_tail"}, indent=1)[-6000:]
    # `sleap-rtc login` finished by Chromium on /login; then everything below used its JWT
    assert run["login_exit"] == 0 and run["login_user"] == "alice", context
    assert run["room"] and run["has_key"], context  # `room create`, `key create --save` through the CLI
    # the worker registered with its account key and stayed: pings kept its 90 s
    # watchdog quiet (no reconnect, no second registration)
    assert run["worker_id"].startswith("worker-"), context
    assert run["worker_alive"] and run["worker_registrations"] == 2, context  # each worker once
    assert run["worker_saw_pings"] >= 4, context
    assert "reconnected" not in run.get("worker_log_tail", "").lower(), context
    # a second worker joined: it left the admin role to the first and meshed with it
    # through the server's mesh relays
    assert run["mesh"] == MESH, context
    # then, in order: everything of the job the server takes part in
    assert run["checkpoints"] == ORDER, context
    assert run["client_ids"] == ["alice"], context
    # both stop on SIGINT; nobody is left in the room
    assert run["exit_codes"] == [0, 0, 0], context
    assert run["peers_after"] == 0 and run["rooms_after"] == 0, context
    assert "timeouts" not in run, context
