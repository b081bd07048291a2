"""One rule for every file the chief writes for keeps (checkpoint, model file): all or nothing.

The bytes go to a temporary file beside the target, are fsynced, replace the target in one
``os.replace``, and the directory is fsynced so that the rename survives a power cut. A failed
write (a full or read-only disk) removes the temporary file, so it cannot also leave a
model-sized leftover, and raises.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temporary file, then put it at ``path`` in one rename."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
