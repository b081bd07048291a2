"""PyTorch drop-in: wrap the optimizer, keep the training loop.

    opt = FederatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model,
                             chief="tcp://203.0.113.5:7777", sync_every=100,
                             num_samples=len(train_set))

Every ``sync_every``-th ``step()`` sends the model's state (parameters and buffers) to the chief
and loads the federation's average back. Like Horovod's DistributedOptimizer, it forwards
everything else to the wrapped optimizer, so schedulers and ``zero_grad`` work as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedberry.worker import Worker

log = logging.getLogger("fedberry.torch")


def array_names(model: torch.nn.Module) -> list[str]:
    """The ``state_dict`` keys, in the order ``get_arrays`` returns and ``set_arrays`` expects."""
    return list(model.state_dict().keys())


def get_arrays(model: torch.nn.Module) -> list[np.ndarray]:
    """Copies of every ``state_dict`` entry as C-contiguous float32 numpy arrays.

    Copies, so that later training steps do not change arrays already handed to the transport.
    """
    return [
        t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous().numpy()
        for t in model.state_dict().values()
    ]


def set_arrays(model: torch.nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays produced by ``get_arrays`` (or received from the chief) into ``model``.

    Everything is checked before anything is written, so a bad update leaves the model intact.
    Raises ValueError on a count, shape or dtype (must be float32) mismatch, naming the tensor.
    Read-only arrays, such as views on a received frame, are fine.
    """
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ValueError(f"expected {len(state)} arrays for this model, got {len(arrays)}")
    for (name, tensor), a in zip(state.items(), arrays, strict=True):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{name}: expected a float32 numpy array, got {got}")
        if a.shape != tuple(tensor.shape):
            raise ValueError(f"{name}: expected shape {tuple(tensor.shape)}, got {a.shape}")
    with torch.no_grad():
        for tensor, a in zip(state.values(), arrays, strict=True):
            # torch.tensor copies, so a read-only source is fine (from_numpy would warn).
            tensor.copy_(torch.tensor(a))



class FederatedOptimizer:
    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *,
                 chief: Any = "tcp://127.0.0.1:7777", sync_every: int = 100,
                 num_samples: int | None = None, worker: Worker | None = None,
                 **worker_options: Any) -> None:
        if sync_every < 1:
            raise ValueError("sync_every must be at least 1")
        self.optimizer = optimizer
        self.model = model
        self.sync_every = sync_every
        # Weight of this worker in the average; by default its share of steps (every worker
        # syncs after the same number of steps, so equal weights).
        self.num_samples = num_samples or sync_every
        self.worker = worker or Worker(chief, **worker_options)
        self.steps = 0
        self._loss_sum = 0.0
        self._loss_count = 0
        set_arrays(model, self.worker.join(get_arrays(model)))

    # -- the optimizer interface -------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        loss = self.optimizer.step(closure)
        if loss is not None:
            self.record_loss(float(loss))
        self.steps += 1
        if self.steps % self.sync_every == 0:
            self.synchronize()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        # param_groups, state, state_dict, add_param_group ...: the wrapped optimizer's.
        return getattr(self.__dict__["optimizer"], name)

    # -- federation --------------------------------------------------------------------------
    def record_loss(self, loss: float) -> None:
        """Report a training loss; the chief logs the sample-weighted mean per round."""
        self._loss_sum += loss
        self._loss_count += 1

    @property
    def done(self) -> bool:
        """True once the chief has run all its rounds: stop training."""
        return self.worker.done

    def synchronize(self) -> None:
        """Average with the federation now (``step`` calls this every ``sync_every`` steps)."""
        if self.worker.done:
            return
        metrics = {"loss": self._loss_sum / self._loss_count} if self._loss_count else {}
        self._loss_sum, self._loss_count = 0.0, 0
        set_arrays(self.model, self.worker.sync(get_arrays(self.model), self.num_samples,
                                                metrics))

    def close(self) -> None:
        self.worker.close()

    def __enter__(self) -> FederatedOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
