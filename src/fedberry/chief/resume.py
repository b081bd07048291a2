"""Whether a checkpoint may be resumed by this run: the one place that decides, for every
transport (the TCP chief in ``serve``, rank 0 under MPI).

A run resumes only with the strategy that wrote the checkpoint, with the same hyperparameters,
and with the same model: any other state would not fit (a FedAdam run resumed from a FedAvgM
checkpoint would silently start from empty moments), and a model of other tensors cannot take
the saved weights.
"""

from __future__ import annotations

import logging
import os

from fedberry.chief.checkpoint import Checkpoint
from fedberry.protocol.frames import Spec, spec_mismatch, spec_of
from fedberry.strategies import Strategy, describe
from fedberry.strategies.base import format_strategy

log = logging.getLogger("fedberry.chief")


def check_resumable(ckpt: Checkpoint, path: str | os.PathLike, strategy: Strategy,
                    spec: Spec | None) -> None:
    """Raise ``ValueError`` with a sentence naming both sides unless ``ckpt`` (read from
    ``path``) was written by this ``strategy`` with these hyperparameters, for a model of this
    ``spec`` (None: this run brings no model of its own and takes the checkpoint's)."""
    saved = ckpt.strategy
    if saved.name is not None:
        if saved.name != strategy.name or (saved.params is not None
                                           and saved.params != strategy.params()):
            raise ValueError(f"--resume: {path} was written by a run with --strategy "
                             f"{format_strategy(saved.name, saved.params)}, not "
                             f"{describe(strategy)}")
        if saved.params is None and strategy.params():
            log.warning("--resume: %s does not record the hyperparameters of its %s run (an "
                        "older checkpoint); going on with %s", path, saved.name,
                        describe(strategy))
    if spec is not None:
        why = spec_mismatch(spec, spec_of(ckpt.arrays))
        if why:
            raise ValueError(f"--resume: the model in {path} is not this run's model: {why}")
