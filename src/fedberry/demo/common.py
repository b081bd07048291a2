"""What every demo worker shares, whatever its framework: how it trains and which data it has."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fedberry.data.fashion_mnist import load_fashion_mnist
from fedberry.data.partition import partition


@dataclass
class TrainConfig:
    """How a demo worker trains. Every field has a command-line flag of the same name."""

    model: str = "mlp"
    partition_scheme: str = "iid"  # iid | dirichlet:ALPHA | shards[:K]
    seed: int = 0
    batch_size: int = 32
    lr: float = 0.05
    sync_every: int | None = None  # local steps per round; None: one pass over the local data
    data_dir: str | None = None
    framework: str = "torch"
    codec: str = "none"  # how updates travel: none | fp16 | q8 (codecs.py)

    def argv(self) -> list[str]:
        """These settings as ``fedberry worker`` flags."""
        out = []
        for k, v in asdict(self).items():
            if v is not None:
                out += [f"--{k.replace('_', '-')}", str(v)]
        return out


def local_data(cfg: TrainConfig, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """This worker's shard of the training set (``index`` is 1-based), the same on every run."""
    data = load_fashion_mnist(cfg.data_dir)
    idx = partition(data.y_train, count, cfg.partition_scheme, seed=cfg.seed)[index - 1]
    return data.x_train[idx], data.y_train[idx]
