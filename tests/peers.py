"""Locate real peers (Debian binaries) used by the tests.

Locally a missing peer skips the test with a reason; CI sets
``POSTWARDEN_REQUIRE_PEERS=1`` so a missing peer fails instead of hiding a gap.
"""

from __future__ import annotations

import os
import shutil

import pytest

_EXTRA_PATH = ("/usr/sbin", "/usr/bin", "/sbin")


def require_binary(name: str) -> str:
    """Return the absolute path of ``name`` or skip/fail the calling test."""
    path = shutil.which(name) or shutil.which(
        name, path=os.pathsep.join((os.environ.get("PATH", ""), *_EXTRA_PATH))
    )
    if path:
        return path
    msg = f"{name} not installed (Debian package needed; .ci/run installs it)"
    if os.environ.get("POSTWARDEN_REQUIRE_PEERS") == "1":
        pytest.fail(msg)
    pytest.skip(msg)
