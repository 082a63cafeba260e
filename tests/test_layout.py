"""How the package is put together, where a test can hold it."""

from __future__ import annotations

import subprocess
import sys

IO_LIBRARIES = ("trio", "trio_websocket", "quart", "quart_trio", "hypercorn", "coredis", "httpx", "prometheus_client")


def test_the_pure_core_imports_no_io_library():
    code = ("import sys, signaling_trio.protocol, signaling_trio.protocol.room, signaling_trio.protocol.filters\n"
            f"print(','.join(m for m in {IO_LIBRARIES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_package_still_exports_the_server():
    import signaling_trio
    from signaling_trio import ServerInfo, SignalingServer, serve

    assert signaling_trio.serve is serve and SignalingServer.__name__ == "SignalingServer" and ServerInfo
    assert set(signaling_trio.__all__) >= {"ConfigError", "ServerInfo", "Settings", "SignalingServer", "serve"}
