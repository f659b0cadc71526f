"""Small files replaced whole: a reader sees the old content or the new, never a part.

Written beside the target under a name of this process's own, then renamed over it;
``durable``: the data and the rename reach the disk before this returns (fsync of the
file, then of its directory), for state a crash must not lose or tear.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_file(path: str | os.PathLike[str], data: str | bytes, *, durable: bool = False) -> None:
    p = Path(path)
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
