"""The installed version (from the package metadata; the source tree's when not installed)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("signaling-trio")
except PackageNotFoundError:  # running from a source tree
    __version__ = "2.1.0"
