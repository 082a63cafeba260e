"""signaling_trio: the WebRTC signaling server SLEAP-RTC runs on, on trio actors."""

from importlib.metadata import PackageNotFoundError, version as _pkg_version

try:
    __version__ = _pkg_version("signaling-trio")
except PackageNotFoundError:  # running from a source tree
    __version__ = "2.1.0"

from .config import ConfigError, Settings  # noqa: E402
from .server import ServerInfo, SignalingServer, serve  # noqa: E402

__all__ = ["ConfigError", "ServerInfo", "Settings", "SignalingServer", "__version__", "serve"]
