"""A numpy worker process for the secure-aggregation tests: ``python secagg_worker.py URL ID
INDEX [DIE_AT]``. It joins, sends the update ``global + update_of(INDEX)`` once, and, with
DIE_AT (a chief step: ``forward`` or ``unmask``), dies the moment that step arrives: at
``forward`` it has shared its keys but sent no masked update, at ``unmask`` its masked update
is in the chief's sum (the chief asks for reveals only once the masked step has closed)."""

from __future__ import annotations

import os
import sys

import numpy as np

import fedberry
from fedberry.transports import secure_sync

SHAPES = [(40, 25), (25,)]


def initial() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def update_of(index: int) -> list[np.ndarray]:
    """Worker ``index``'s change: seeded, so the test knows it."""
    rng = np.random.default_rng(100 + index)
    return [rng.normal(0, 0.05, size=s).astype(np.float32) for s in SHAPES]


def samples_of(index: int) -> int:
    return 10 * (index + 1)


def main() -> None:
    url, wid, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    die_at = sys.argv[4] if len(sys.argv) > 4 else None
    if die_at:
        answer = secure_sync.SecureSync.answer

        def dying(self: secure_sync.SecureSync, message: object) -> object:
            if message.step == die_at:  # type: ignore[attr-defined]
                os._exit(17)  # no goodbye: a crash, a pulled plug
            return answer(self, message)  # type: ignore[arg-type]

        secure_sync.SecureSync.answer = dying  # type: ignore[method-assign]
    w = fedberry.Worker(chief=url, worker_id=wid)
    g = w.join(initial())
    w.sync([a + d for a, d in zip(g, update_of(index))], num_samples=samples_of(index))
    w.close()


if __name__ == "__main__":
    main()
