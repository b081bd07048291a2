"""Shared bits for tests that start real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def fedberry_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


@contextmanager
def processes() -> Iterator[list[subprocess.Popen]]:
    """Processes started inside are killed on the way out, whatever happens."""
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
