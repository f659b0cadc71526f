"""A real, small filesystem for disk-full tests: a tmpfs of a given size.

Mounting needs root (as here and in CI); elsewhere the tests that need it skip and say
why. Every mount is undone when the test ends."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (mount's syntax: "1m", "512k") at ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Write a ballast file in ``path``'s filesystem so that about ``leave`` bytes stay
    free; delete the file to give the space back."""
    ballast = path / "ballast"
    size = max(free_bytes(path) - leave, 0)
    with ballast.open("wb") as fh:
        chunk = b"\0" * 65536
        while size > 0:
            size -= fh.write(chunk[: min(size, len(chunk))])
    return ballast
