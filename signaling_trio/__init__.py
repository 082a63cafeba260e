"""signaling_trio: the WebRTC signaling server SLEAP-RTC runs on, on trio actors."""

from ._version import __version__
from .config import ConfigError, Settings

__all__ = ["ConfigError", "ServerInfo", "Settings", "SignalingServer", "__version__", "serve"]
_FROM_SERVER = ("ServerInfo", "SignalingServer", "serve")


def __getattr__(name: str) -> object:
    """The server's names are imported when first used, so that the pure core
    (`signaling_trio.protocol`) imports no I/O library (quart, hypercorn, coredis, ...)."""
    if name in _FROM_SERVER:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'signaling_trio' has no attribute {name!r}")
