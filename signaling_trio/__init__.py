"""signaling_trio: the WebRTC signaling server SLEAP-RTC runs on, on trio actors."""

from importlib.metadata import PackageNotFoundError, version as _pkg_version

try:
    __version__ = _pkg_version("signaling-trio")
except PackageNotFoundError:  # running from a source tree
    __version__ = "2.1.0"

from .config import ConfigError, Settings  # noqa: E402

__all__ = ["ConfigError", "ServerInfo", "Settings", "SignalingServer", "__version__", "serve"]
_FROM_SERVER = ("ServerInfo", "SignalingServer", "serve")


def __getattr__(name: str) -> object:
    """The server's names are imported when first used, so that the pure core
    (`signaling_trio.protocol`) imports no I/O library (quart, hypercorn, coredis, ...)."""
    if name in _FROM_SERVER:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'signaling_trio' has no attribute {name!r}")
