"""Split a labelled dataset among workers (numpy only).

Every function takes the labels ``y`` and a part count ``n`` and returns ``n`` sorted int64 index
arrays, one per worker. The same ``(y, n, seed)`` gives the same parts on every machine, so each
worker can compute its own part locally and only needs to know ``--partition INDEX/COUNT``.

Schemes:
- ``iid``: a uniform random split into near-equal parts.
- ``dirichlet``: label skew after Hsu, Qi & Brown 2019 (arXiv:1909.06335); small ``alpha`` means
  each worker sees few classes, large ``alpha`` approaches iid.
- ``shards``: the pathological non-iid split of McMahan et al. 2017 (FedAvg paper, sec. 3).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np

__all__ = ["PartitionSpec", "dirichlet", "iid", "parse_partition_spec", "partition", "shards"]


def iid(y: np.ndarray, n: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and cut into ``n`` parts whose sizes differ by at most one. Disjoint, covering."""
    y = _check(y, n)
    perm = np.random.default_rng(seed).permutation(len(y))
    return [np.sort(part) for part in np.array_split(perm, n)]


def dirichlet(y: np.ndarray, n: int, alpha: float, seed: int = 0) -> list[np.ndarray]:
    """Label-skewed parts: each class is spread over workers in Dirichlet(alpha) proportions.

    For each class separately, proportions ``p ~ Dir(alpha, ..., alpha)`` over the ``n`` workers
    decide how many of that class's samples each worker gets. Part sizes therefore vary too, more
    so for small ``alpha``. The parts are disjoint and cover ``y``. Every part is non-empty: a part
    left empty by the draw takes one random sample from the largest part (this changes the
    distribution by at most ``n`` samples, and needs ``len(y) >= n``).
    """
    y = _check(y, n)
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    chunks: list[list[np.ndarray]] = [[] for _ in range(n)]
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        p = rng.dirichlet(np.full(n, float(alpha)))
        cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for part, piece in zip(chunks, np.split(idx, cuts), strict=True):
            part.append(piece)
    parts = [np.concatenate(c) for c in chunks]
    for i in range(n):
        if len(parts[i]) == 0:
            j = int(np.argmax([len(p) for p in parts]))
            k = int(rng.integers(len(parts[j])))
            parts[i] = parts[j][k : k + 1]
            parts[j] = np.delete(parts[j], k)
    return [np.sort(p) for p in parts]


def shards(y: np.ndarray, n: int, shards_per_worker: int = 2, seed: int = 0) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into ``n * shards_per_worker`` shards, deal them out.

    With 2 shards per worker most workers see only two classes (the paper's 100 workers get 2
    shards of 300 MNIST images each). Shard sizes differ by at most one. Disjoint, covering.
    """
    y = _check(y, n)
    if shards_per_worker < 1:
        raise ValueError(f"shards_per_worker must be >= 1, got {shards_per_worker}")
    total = n * shards_per_worker
    if total > len(y):
        raise ValueError(f"{total} shards ({n} x {shards_per_worker}) for only {len(y)} samples")
    # Stable sort: which samples form a shard depends on y only; the seed decides who gets it.
    pieces = np.array_split(np.argsort(y, kind="stable"), total)
    order = np.random.default_rng(seed).permutation(total).reshape(n, shards_per_worker)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in order]


def partition(y: np.ndarray, n: int, scheme: str = "iid", seed: int = 0, **kw) -> list[np.ndarray]:
    """Dispatch on a scheme string: ``"iid"``, ``"dirichlet:0.5"``, ``"shards"``, ``"shards:3"``.

    The value after the colon is ``alpha`` for dirichlet and ``shards_per_worker`` for shards; it
    may be given as a keyword instead (``partition(y, 6, "dirichlet", alpha=0.5)``).
    """
    name, _, arg = scheme.strip().lower().partition(":")
    try:
        if name == "iid" and not arg:
            return iid(y, n, seed, **kw)
        if name == "dirichlet":
            if arg:
                kw["alpha"] = float(arg)
            if "alpha" not in kw:
                raise ValueError("dirichlet needs alpha, e.g. 'dirichlet:0.5'")
            return dirichlet(y, n, seed=seed, **kw)
        if name == "shards":
            if arg:
                kw["shards_per_worker"] = int(arg)
            return shards(y, n, seed=seed, **kw)
    except ValueError as e:
        raise ValueError(f"partition scheme {scheme!r}: {e}") from e
    raise ValueError(
        f"unknown partition scheme {scheme!r}; expected 'iid', 'dirichlet:ALPHA' or 'shards[:K]'"
    )


class PartitionSpec(NamedTuple):
    """Which part a worker takes: ``index`` is 1-based, ``1 <= index <= count``."""

    index: int
    count: int


_SPEC = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*")


def parse_partition_spec(spec: str) -> PartitionSpec:
    """Parse ``"3/6"`` (part 3 of 6, 1-based) as given to ``--partition``.

    The part's indices are ``parts[spec.index - 1]``.
    """
    m = _SPEC.fullmatch(spec)
    if m is None:
        raise ValueError(f"bad partition spec {spec!r}: expected INDEX/COUNT, e.g. '3/6'")
    index, count = int(m[1]), int(m[2])
    if not 1 <= index <= count:
        raise ValueError(
            f"bad partition spec {spec!r}: need 1 <= INDEX <= COUNT (INDEX is 1-based)"
        )
    return PartitionSpec(index, count)


def _check(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"number of parts must be a positive integer, got {n!r}")
    if n > len(y):
        raise ValueError(f"cannot split {len(y)} samples into {n} non-empty parts")
    return y
