"""Atomic checkpoints of the chief: global model, round, strategy state, the run's config.

A ``.npz`` written to a temporary file, fsynced, renamed over the old one, and the directory
fsynced, so a chief killed at any instant leaves either the previous checkpoint or the new one.
Loading uses ``allow_pickle=False``: a checkpoint is data, never code.

Layout: ``global.<i>`` (the model's tensors), ``strategy.<key>`` (the strategy's arrays) and
``header``, UTF-8 JSON: ``{"round", "tensors", "config", "strategy": {"name", "params"}}``.
Checkpoints written before the strategy's name and hyperparameters were recorded in ``header``
(they had only ``config["strategy"]``, a name) still load: their ``StrategyState`` has that
name and ``params=None``, "not recorded".
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedberry.chief.atomic_file import write_atomically
from fedberry.strategies import StrategyState


@dataclass
class Checkpoint:
    round: int
    arrays: list[np.ndarray]
    # A plain mapping of arrays is taken as the state of an unnamed strategy (the form of
    # before), named from ``config["strategy"]`` if that is there.
    strategy_state: StrategyState | Mapping[str, np.ndarray]
    config: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.strategy_state, StrategyState):
            name = self.config.get("strategy")
            self.strategy_state = StrategyState(name if isinstance(name, str) else None, None,
                                                dict(self.strategy_state))

    @property
    def strategy(self) -> StrategyState:
        """``strategy_state``, typed (``__post_init__`` made it a ``StrategyState``)."""
        assert isinstance(self.strategy_state, StrategyState)
        return self.strategy_state


def save(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = ckpt.strategy
    entries: dict[str, np.ndarray] = {f"global.{i}": a for i, a in enumerate(ckpt.arrays)}
    entries.update({f"strategy.{k}": v for k, v in state.arrays.items()})
    header = {"round": ckpt.round, "tensors": len(ckpt.arrays), "config": ckpt.config,
              "strategy": {"name": state.name, "params": state.params}}
    entries["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    write_atomically(path, lambda f: np.savez(f, **entries))


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by ``save``.

    Raises ``FileNotFoundError`` (or another ``OSError``) when it cannot be opened, and
    ``ValueError`` with a sentence naming the file when it is not a fedberry checkpoint (cut
    short, corrupt, or another ``.npz``). Nothing in it is unpickled.
    """
    try:
        return _load(path)
    except OSError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, KeyError, EOFError, JSON and int errors...
        raise ValueError(f"{path} is not a readable fedberry checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc


def _load(path: str | os.PathLike) -> Checkpoint:
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(z["header"].tobytes().decode())
        arrays = [z[f"global.{i}"] for i in range(header["tensors"])]
        state = {k[len("strategy."):]: z[k] for k in z.files if k.startswith("strategy.")}
    config = header.get("config", {})
    recorded = header.get("strategy")
    if isinstance(recorded, dict):
        strategy = StrategyState(recorded.get("name"), recorded.get("params"), state)
        return Checkpoint(int(header["round"]), arrays, strategy, config)
    return Checkpoint(int(header["round"]), arrays, state, config)  # named from config
