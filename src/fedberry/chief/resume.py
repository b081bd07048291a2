"""Whether a checkpoint may be resumed by this run: the same strategy and the same model."""

from __future__ import annotations

import os

from fedberry.chief import checkpoint as ckpt_io
from fedberry.protocol.frames import Spec, spec_mismatch, spec_of


def check_resumable(ckpt: ckpt_io.Checkpoint, path: str | os.PathLike, strategy: str,
                    spec: Spec | None) -> None:
    """Refuse to resume a run with a different strategy or model: the state would not fit.

    Parameters
    ----------
    ckpt : Checkpoint
        The checkpoint to resume from.
    path : str or os.PathLike
        Where it was read, for the message.
    strategy : str
        This run's strategy name.
    spec : Spec or None
        This run's model (None: the chief has no model of its own and adopts the checkpoint's).

    Raises
    ------
    ValueError
        With a sentence naming what differs.
    """
    saved = ckpt.config.get("strategy")
    if saved is not None and saved != strategy:
        raise ValueError(f"--resume: {path} was written by a run with --strategy {saved}, not "
                         f"{strategy}")
    if spec is not None:
        why = spec_mismatch(spec, spec_of(ckpt.arrays))
        if why:
            raise ValueError(f"--resume: the model in {path} is not this run's model: {why}")
