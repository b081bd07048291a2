"""Atomic checkpoints of the chief: global model, round, strategy state, the run's config.

A ``.npz`` written to a temporary file, fsynced, renamed over the old one, and the directory
fsynced, so a chief killed at any instant leaves either the previous checkpoint or the new one.
Loading uses ``allow_pickle=False``: a checkpoint is data, never code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Checkpoint:
    round: int
    arrays: list[np.ndarray]
    strategy_state: dict[str, np.ndarray]
    config: dict[str, Any]


def save(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries: dict[str, np.ndarray] = {f"global.{i}": a for i, a in enumerate(ckpt.arrays)}
    entries.update({f"strategy.{k}": v for k, v in ckpt.strategy_state.items()})
    header = {"round": ckpt.round, "tensors": len(ckpt.arrays), "config": ckpt.config}
    entries["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not also leave a model-sized leftover
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike) -> Checkpoint:
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(z["header"].tobytes().decode())
        arrays = [z[f"global.{i}"] for i in range(header["tensors"])]
        state = {k[len("strategy."):]: z[k] for k in z.files if k.startswith("strategy.")}
    return Checkpoint(int(header["round"]), arrays, state, header.get("config", {}))
