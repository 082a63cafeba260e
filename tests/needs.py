"""What a test needs from the machine (a tool, root, a browser): missing, it is a skip
that says why, except under CI (`CI` set), where .ci/run installs everything and a
missing piece is a failure: no claimed feature goes untested there."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(why: str, *, under_ci: str | None = None) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(under_ci or why)
    pytest.skip(why)
