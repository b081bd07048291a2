"""What differs between the Pythons pyproject.toml declares (3.10 to 3.13), checked on each
(scripts/test-pythons.sh runs the core suite on all of them)."""

from __future__ import annotations

import numpy as np

from fedberry.serve import serve


def test_a_chief_still_running_makes_wait_return_false() -> None:
    """Before 3.11 ``concurrent.futures.TimeoutError`` is not the builtin ``TimeoutError``:
    catching the builtin one made ``fedberry chief`` crash after its first one-second wait."""
    handle = serve(None, workers=1, rounds=1, initial=[np.zeros(2, np.float32)])
    try:
        assert handle.wait(0.05) is False
    finally:
        handle.stop()
