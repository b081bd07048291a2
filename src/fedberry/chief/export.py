"""``fedberry export CHECKPOINT``: a chief's checkpoint as the model file people load.

Checkpoints (``checkpoint.npz``, ``chief.checkpoint``) hold the global model as ``global.0`` ..
``global.<N-1>`` next to the strategy's state and the run's config; chiefs of before wrote no
``model.safetensors``. This writes the checkpoint's model as one (``chief.model_file``), under
the same ``global.<i>`` names: a checkpoint does not record the workers' tensor names. The
tensors are in the model's order, which is what ``fedberry.keras.load_weights`` and a torch
``load_state_dict`` after renaming (README, "The trained model") rely on.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedberry.chief import checkpoint as ckpt_io
from fedberry.chief import model_file


def export_checkpoint(checkpoint: str | os.PathLike,
                      out: str | os.PathLike | None = None) -> Path:
    """Write the model of ``checkpoint`` to ``out`` (default: ``model.safetensors`` beside the
    checkpoint) and return where it went.

    Raises
    ------
    FileNotFoundError
        No file at ``checkpoint``.
    ValueError
        ``checkpoint`` is not a fedberry checkpoint (the sentence names it), or ``out`` is the
        checkpoint itself.
    """
    src = Path(checkpoint)
    dst = Path(out) if out is not None else src.with_name(model_file.FILE_NAME)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"-o {dst} is the checkpoint itself: give another file")
    ck = ckpt_io.load(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model_file.save(dst, ck.arrays, None, {"format": "np", "producer": "fedberry export",
                                           "round": str(ck.round)})
    return dst
