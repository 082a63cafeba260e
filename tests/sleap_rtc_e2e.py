"""One SLEAP-RTC job through signaling_trio with the real sleap-rtc programs, run inside a
network namespace of its own (tests/test_sleap_rtc_real.py starts it with `unshare --net`).

    python sleap_rtc_e2e.py SLEAP_RTC_BIN WORKDIR

Sets up `lo` and a veth pair (10.199.0.1/24, 10.199.0.2/24: ICE needs addresses other
than 127.0.0.1, and nothing can leave the namespace), starts the server (this Python,
`-m signaling_trio serve`, JSON logs), signs user alice in with the real `sleap-rtc
login` completed in headless Chromium on the server's /login page (tests/browser.py),
provisions with the real CLI (`room create`, `key create
--save`), starts `sleap-rtc worker`, waits past the worker's 90 s ping watchdog, runs
`sleap-rtc train`, then SIGINTs both. Prints one JSON object: what happened, in order,
read from the server's log and the programs' output; the test asserts on it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import browser

SLEAP_RTC, WORKDIR = sys.argv[1:3]
WATCHDOG_WAIT = float(os.environ.get("E2E_WATCHDOG_WAIT", "100"))  # the worker's watchdog fires at 90 s
HOST = "10.199.0.1"
ENV = {**os.environ, "HOME": os.path.join(WORKDIR, "home"), "PYTHONUNBUFFERED": "1",
       "SLEAP_RTC_SIGNALING_WS": f"ws://{HOST}:8080", "SLEAP_RTC_SIGNALING_HTTP": f"http://{HOST}:8001"}
result: dict[str, Any] = {"steps": []}


def step(name: str, **facts: Any) -> None:
    result["steps"].append(name)
    result.update(facts)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def network() -> None:
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    sh("ip", "addr", "add", "10.199.0.1/24", "dev", "veth0")
    sh("ip", "addr", "add", "10.199.0.2/24", "dev", "veth1")
    sh("ip", "link", "set", "veth0", "up")
    sh("ip", "link", "set", "veth1", "up")


def start(name: str, argv: list[str], stdin: Any = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    log = open(os.path.join(WORKDIR, f"{name}.log"), "wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=stdin, env=ENV, cwd=WORKDIR)


def log_of(name: str) -> str:
    with open(os.path.join(WORKDIR, f"{name}.log"), encoding="utf-8", errors="replace") as f:
        return f.read()


def server_events() -> list[dict[str, Any]]:
    events = []
    for line in log_of("server").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def wait_for(what: str, test: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if test():
            return True
        time.sleep(0.2)
    result.setdefault("timeouts", []).append(what)
    return False


def cli(*args: str, stdin: str = "") -> str:
    out = subprocess.run([SLEAP_RTC, *args], input=stdin.encode(), capture_output=True, env=ENV, cwd=WORKDIR,
                         timeout=120)
    return (out.stdout + out.stderr).decode(errors="replace")


def credentials() -> dict[str, Any]:
    with open(os.path.join(ENV["HOME"], ".sleap-rtc", "credentials.json"), encoding="utf-8") as f:
        return json.load(f)


def registered(role: str) -> list[dict[str, Any]]:
    return [e for e in server_events() if e.get("event") == "register" and e.get("role") == role]


def main() -> None:
    network()
    os.makedirs(ENV["HOME"])
    server = start("server", [sys.executable, "-m", "signaling_trio", "serve", "--host", "0.0.0.0",
                              "--data-dir", os.path.join(WORKDIR, "data"), "--log-format", "json",
                              "--app-ping-interval", "20"])
    procs = [server]
    try:
        run_job(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        result["server_log_tail"] = log_of("server")[-3000:]
        print(json.dumps(result))


def login(name: str) -> bool:
    """`sleap-rtc login` prints its link and polls; Chromium opens the link, signs in
    and finishes; the CLI then writes credentials.json (used by everything after)."""
    env = {**ENV, "BROWSER": "true", "SLEAP_DASHBOARD_URL": f"http://{HOST}:8001/login"}
    log = open(os.path.join(WORKDIR, "login.log"), "wb")
    proc = subprocess.Popen([SLEAP_RTC, "login", "--timeout", "90"], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=WORKDIR)
    link = re.compile(r"(http://\S+/login\?cli=true&cli_state=\S+)")
    if not wait_for("login link", lambda: link.search(log_of("login")), 30):
        proc.kill()
        return False
    with browser.chromium() as driver:
        browser.local_sign_in(driver, link.search(log_of("login")).group(1), name, account_key=False)
    step("logged in", login_exit=_exit_code(proc, 30), login_user=credentials().get("user", {}).get("username"))
    return True


def run_job(procs: list[subprocess.Popen[bytes]]) -> None:
    if not wait_for("server listening", lambda: any(e.get("event") == "listening" for e in server_events()), 20):
        return
    if not login("alice"):
        return
    out = cli("room", "create", "--name", "e2e", "--expires", "never", stdin="y\n")
    room = credentials().get("default_room")
    step("room created", room=room, room_create_out=out[-500:])
    out = cli("key", "create", "--name", "gpu1", "--save")
    step("key created", has_key=str(credentials().get("account_key", "")).startswith("slp_acct_"))
    worker = start("worker", [SLEAP_RTC, "worker", "--name", "gpu1", "--working-dir", WORKDIR])
    procs.append(worker)
    if not wait_for("worker registered", lambda: registered("worker"), 60):
        return
    worker_id = registered("worker")[0]["peer_id"]
    step("worker registered", worker_id=worker_id)
    # a second worker joins the same room: not the admin; it meshes with the first
    os.makedirs(os.path.join(WORKDIR, "w2"))
    second = start("worker2", [SLEAP_RTC, "worker", "--name", "gpu2", "--working-dir", os.path.join(WORKDIR, "w2")])
    procs.append(second)
    wait_for("second worker registered", lambda: len({e["peer_id"] for e in registered("worker")}) >= 2, 60)
    wait_for("mesh", lambda: len(mesh_checkpoints()) == len(MESH_CHECKPOINTS), 60)
    step("mesh", mesh=mesh_checkpoints())
    time.sleep(WATCHDOG_WAIT)
    step("worker waited", worker_registrations=len(registered("worker")), worker_alive=worker.poll() is None,
         worker_saw_pings=log_of("worker").count("Received signaling server ping"))
    config = os.path.join(WORKDIR, "config.yaml")
    with open(config, "w") as f:
        f.write("data_config:\n  train_labels_path: [labels.slp]\ntrainer_config:\n  max_epochs: 1\n")
    client = start("client", [SLEAP_RTC, "train", "--room", room, "--worker-id", worker_id, "--config", config],
                   stdin=subprocess.PIPE)
    procs.append(client)
    wait_for("client registered", lambda: registered("client"), 30)
    step("client registered", client_ids=[e["peer_id"] for e in registered("client")])
    wait_for("data channel", lambda: "my-data-channel channel is open" in log_of("worker"), 60)
    try:
        client.stdin.write(b"s\n")  # type: ignore[union-attr]  # the confirmation prompt: submit
        client.stdin.flush()  # type: ignore[union-attr]
    except OSError:
        pass
    wait_for("job reached the worker", lambda: "Worker received: JOB_SUBMIT::" in log_of("worker"), 60)
    step("job", checkpoints=checkpoints())
    try:
        client.stdin.close()  # type: ignore[union-attr]  # EOF: the prompt cancels
    except OSError:
        pass
    for proc in (client, worker, second):
        proc.send_signal(signal.SIGINT)
    exited = [_exit_code(p, 30) for p in (client, worker, second)]
    time.sleep(1.0)
    with urllib.request.urlopen(f"http://{HOST}:8001/metrics", timeout=5) as resp:
        metrics = json.loads(resp.read())
    step("stopped", exit_codes=exited, peers_after=metrics["active_connections"],
         rooms_after=metrics["active_rooms"], worker_log_tail=log_of("worker")[-3000:],
         client_log_tail=log_of("client")[-3000:])


# What each side logs at each point of the job (sleap-rtc 0.0.7's own log lines), in order
CHECKPOINTS = (
    ("client registered", "client", "successfully registered with room"),
    ("offer reached the worker with role client", "worker", "Stored pending offer role: 'client'"),
    ("worker sent the answer", "worker", "Admin sent answer to client"),
    ("answer reached the client", "client", "Received answer from worker"),
    ("ICE completed", "client", "ICE completed"),
    ("data channel open", "worker", "my-data-channel channel is open"),
    ("job request reached the worker", "worker", "Worker received: JOB_SUBMIT::"),
)


# The second worker meshing with the admin through the server's relays
MESH_CHECKPOINTS = (
    ("second worker respects the admin", "worker2", "Respecting existing admin"),
    ("mesh offer reached the admin", "worker", "Admin received mesh_offer from"),
    ("mesh answer reached the second worker", "worker2", "Received mesh answer from signaling server"),
    ("mesh ICE completed", "worker", "Mesh ICE state with {id}: completed"),
    ("mesh data channel open", "worker", "performing admin duties"),
)


def checkpoints(marks: tuple[tuple[str, str, str], ...] = CHECKPOINTS) -> list[str]:
    """The checkpoints seen, each after the previous one in its program's log."""
    seen, where = [], {"client": 0, "worker": 0, "worker2": 0}
    logs = {who: log_of(who) if os.path.exists(os.path.join(WORKDIR, f"{who}.log")) else "" for who in where}
    for name, who, marker in marks:
        pattern = re.escape(marker).replace(re.escape("{id}"), r"\S+")  # {id}: any peer id
        found = re.compile(pattern).search(logs[who], where[who])
        if found is None:
            break
        where[who] = found.start()
        seen.append(name)
    return seen


def mesh_checkpoints() -> list[str]:
    return checkpoints(MESH_CHECKPOINTS)


def _exit_code(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None


if __name__ == "__main__":
    main()
