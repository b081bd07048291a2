"""A small real federation for the status page tests: logistic regression in numpy on two
overlapping Gaussian classes, so that accuracy and loss move over the rounds.

Run as a worker: ``python status_worker.py CHIEF_URL WORKER_ID SHARD PAUSE_S``; it trains and
syncs until the chief finishes (or the test kills it). The chief's side imports ``data`` and
``evaluate`` from here.
"""

from __future__ import annotations

import sys
import time

import numpy as np

DIM = 20


def data(shard: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Shard ``shard``'s examples (-1: the held-out test set), the same on every machine."""
    rng = np.random.default_rng(1000 + shard)
    y = rng.integers(0, 2, n)
    centre = np.linspace(-1, 1, DIM, dtype=np.float32) * 0.35
    x = rng.normal(0, 1, (n, DIM)).astype(np.float32) + np.where(y[:, None] == 1, centre,
                                                                  -centre)
    return x, y.astype(np.float32)


def _loss_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    p = 1 / (1 + np.exp(-(x @ w[:-1] + w[-1])))
    eps = 1e-7
    loss = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
    g = p - y
    return loss, np.concatenate([x.T @ g / len(y), [g.mean()]]).astype(np.float32)


def initial() -> list[np.ndarray]:
    """A poor start (weights pointing away from the answer), so that accuracy climbs for a
    few dozen rounds instead of being right after the first."""
    return [np.random.default_rng(7).normal(0, 1.5, DIM + 1).astype(np.float32)]


def evaluate(arrays: list[np.ndarray]) -> dict[str, float]:
    x, y = data(-1, 1000)
    w = arrays[0]
    loss, _ = _loss_grad(w, x, y)
    acc = float(np.mean(((x @ w[:-1] + w[-1]) > 0) == (y == 1)))
    return {"accuracy": acc, "loss": loss}


def main() -> None:
    import fedberry

    chief, worker_id, shard, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(
        sys.argv[4])
    x, y = data(shard)
    worker = fedberry.Worker(chief=chief, worker_id=worker_id)
    arrays = initial()
    while not worker.done:
        w = arrays[0].copy()
        for _ in range(2):  # a little local training, slowly, so the curves climb over rounds
            loss, g = _loss_grad(w, x, y)
            w -= 0.3 * g
        time.sleep(pause)
        arrays = worker.sync([w], len(y), metrics={"loss": loss})
    worker.close()


if __name__ == "__main__":
    main()
