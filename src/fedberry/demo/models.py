"""Reference models of the FedAvg paper (McMahan et al. 2017): the MLP and the CNN.

This module imports torch at the top: import it only where torch is installed (the ``torch``
extra). The rest of fedberry does not import it, so the chief and the plain-numpy worker run
without torch.

``get_arrays``/``set_arrays`` (the bridge between a torch model and the wire) live in
``fedberry.integrations.torch`` and are re-exported here for the demos.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedberry.integrations.torch import array_names, get_arrays, set_arrays

__all__ = [
    "MODELS",
    "array_names",
    "build_model",
    "cnn",
    "evaluate",
    "get_arrays",
    "mlp",
    "model_input",
    "set_arrays",
]


def mlp() -> nn.Sequential:
    """The paper's "2NN": 784-200-200-10 with ReLU, 199,210 parameters.

    Takes flat ``(N, 784)`` rows; the leading Flatten also accepts ``(N, 1, 28, 28)`` images.
    """
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 200),
        nn.ReLU(),
        nn.Linear(200, 200),
        nn.ReLU(),
        nn.Linear(200, 10),
    )


def cnn() -> nn.Sequential:
    """The paper's CNN on ``(N, 1, 28, 28)``: 1,663,370 parameters.

    Two 5x5 convolutions (32 then 64 channels, each followed by ReLU and 2x2 max pooling), FC 512
    with ReLU, FC 10. "Same" padding, as the paper's parameter count implies (7x7x64 into FC 512).
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(7 * 7 * 64, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": cnn}
_INPUT_SHAPES = {"mlp": (784,), "cnn": (1, 28, 28)}


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A fresh model whose initial weights depend only on ``seed``.

    The global torch RNG is left as it was, so building a model does not shift the user's
    shuffling or dropout streams.
    """
    factory = MODELS.get(name)
    if factory is None:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def model_input(name: str, x_flat: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Flat 784-pixel rows as the float32 tensor the model ``name`` takes, sharing memory."""
    if name not in _INPUT_SHAPES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return _as_tensor(x_flat, torch.float32).reshape(-1, *_INPUT_SHAPES[name])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    batch_size: int = 2000,
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``x`` (already shaped for the model).

    Batched so that memory stays bounded on a small machine; the model's train/eval mode is
    restored afterwards.
    """
    x, y = _as_tensor(x, torch.float32), _as_tensor(y, torch.int64)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"need as many labels as inputs (> 0), got {len(x)} and {len(y)}")
    was_training = model.training
    model.eval()
    try:
        correct, loss = 0, 0.0
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            target = y[start : start + batch_size]
            loss += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    return correct / len(x), loss / len(x)


def _as_tensor(a: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(dtype)
    a = np.ascontiguousarray(a, dtype=_NUMPY_DTYPES[dtype])
    # The cached dataset is read-only on purpose. torch only reads it here, so share the buffer
    # instead of copying up to 190 MB, and silence torch's "not writable" warning about it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.int64: np.int64}
