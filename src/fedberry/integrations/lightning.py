"""PyTorch Lightning drop-in: a callback that makes ``Trainer.fit`` a FedAvg worker.

    trainer = lightning.Trainer(max_epochs=100, callbacks=[
        FederatedCallback(chief="tcp://203.0.113.5:7777", sync_every=100,
                          num_samples=len(train_set), token_file="fedberry.token")])

* At the start of training it joins the federation (not before: the constructor opens no
  connection) and loads the federation's model into the ``LightningModule``.
* Every ``sync_every`` optimizer steps (``trainer.global_step``, so gradient accumulation and
  skipped steps count as Lightning counts them) it sends the module's ``state_dict`` with the
  mean training loss since the last average, and loads the weighted average back, at the end of
  the batch that took the step.
* A round configuration from the chief (``serve(round_config=...)``, ``--round-config``) with an
  ``lr`` sets the learning rate of every param group of the trainer's optimizers when the
  round's model arrives, as ``FederatedOptimizer`` does; a scheduler stepping later in the
  round changes it from there. With ``evaluate=``, the callback answers the chief's requests
  to evaluate the global model (``--evaluate-every``) on the worker's held-out data.
* When the chief has run all its rounds it stops the trainer (``trainer.should_stop``); at the
  end of training every worker holds the federation's final model (steps taken after the last
  round do not linger), and it leaves the federation.

The averaging itself is ``integrations.torch.ModelFederation``'s, as for ``FederatedOptimizer``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fedberry.integrations.torch import ModelFederation
from fedberry.transports.connect import InProcessChief
from fedberry.worker import Worker

try:  # the `lightning` package; the older `pytorch_lightning` has the same Callback
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on what is installed
    from pytorch_lightning import Callback, LightningModule, Trainer

log = logging.getLogger("fedberry.lightning")

__all__ = ["FederatedCallback"]


class FederatedCallback(Callback):
    """Average the ``LightningModule`` with a federation every ``sync_every`` optimizer steps.

    Parameters
    ----------
    chief : str or ChiefHandle
        Required: the chief's address (``"tcp://host:port"``, ``"mpi://"``) or the handle
        ``fedberry.serve()`` returns.
    sync_every : int, default 100
        Optimizer steps between averages.
    num_samples : float, optional
        This worker's weight in the average, usually the size of its training set; by default
        ``sync_every`` (equal weights when every worker syncs after the same number of steps).
    stop_when_done : bool, default True
        Stop the trainer once the chief has run all its rounds.
    worker : fedberry.Worker, optional
        A worker built elsewhere; ``chief``, ``evaluate`` and ``worker_options`` are then not
        used (give that Worker its own ``evaluate``).
    evaluate : callable, optional
        ``evaluate(module) -> (num_examples, {"accuracy": .., "loss": ..})`` on this worker's
        held-out data; when the chief asks, it is called with the module holding the global
        model (in ``torch.no_grad()``, train mode restored after).
    **worker_options
        Passed to ``fedberry.Worker``: ``token``, ``token_file``, ``ca``, ``cert``, ``key``,
        ``worker_id``, ``codec``, timeouts.

    Attributes
    ----------
    syncs : int
        Averages done by this callback.
    """

    def __init__(self, chief: str | InProcessChief | None = None, *, sync_every: int = 100,
                 num_samples: float | None = None, stop_when_done: bool = True,
                 worker: Worker | None = None,
                 evaluate: Callable[[torch.nn.Module], Any] | None = None,
                 **worker_options: Any) -> None:
        if chief is None and worker is None:
            raise TypeError("FederatedCallback needs chief=, the chief's address (for example "
                            "'tcp://203.0.113.5:7777') or the handle fedberry.serve() returns")
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be a whole number of at least 1, got {sync_every!r}")
        super().__init__()
        self.chief = chief
        self.sync_every = sync_every
        self.num_samples = float(num_samples) if num_samples else float(sync_every)
        self.stop_when_done = stop_when_done
        self.syncs = 0
        self._worker = worker
        self._worker_options = worker_options
        self._evaluate = evaluate
        self._trainer: Trainer | None = None
        self._fed: ModelFederation | None = None
        self._finished = False  # the last fit ended with the federation done
        self._synced_at = 0  # trainer.global_step at the last average (or the join)

    # -- state -------------------------------------------------------------------------------
    @property
    def worker(self) -> Worker | None:
        """The ``fedberry.Worker``, once training has started."""
        return self._fed.worker if self._fed is not None else self._worker

    @property
    def done(self) -> bool:
        """True once the chief has run all its rounds (and after the fit that saw it)."""
        return self._fed.done if self._fed is not None else self._finished

    # -- Lightning hooks ---------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Join the federation and load its model (the first gradient is taken at it)."""
        self._trainer = trainer
        if self._fed is None:
            self._fed = ModelFederation(pl_module, self.chief, self.num_samples, self._worker,
                                        self._worker_options, evaluate=self._evaluate,
                                        on_model=self._apply_round_config)
        self._fed.join()
        self._synced_at = trainer.global_step
        self._stop_if_done(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """Record the batch's loss; average once ``sync_every`` optimizer steps have passed."""
        if self._fed is None or self._fed.done:
            self._stop_if_done(trainer)
            return
        loss = _loss_of(outputs)
        if loss is not None:
            self._fed.record_loss(loss)
        if trainer.global_step - self._synced_at >= self.sync_every:
            self._fed.synchronize()
            self.syncs += 1
            self._synced_at = trainer.global_step
        self._stop_if_done(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Leave the federation with its final model in the module (``ModelFederation.close``)."""
        self.close()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The same as ``on_train_end`` (a no-op when that already ran)."""
        self.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        """A failed fit leaves the federation at once rather than going silent."""
        self.close()

    def close(self) -> None:
        """Leave the federation; once it is done, the module holds its final model."""
        fed, self._fed = self._fed, None
        if fed is not None:  # a later fit joins afresh (with a new Worker, unless one was given)
            self._finished = fed.done
            fed.close()

    def _apply_round_config(self) -> None:
        """The chief's ``lr`` for this round, into every param group of the trainer's
        optimizers (when it sent one)."""
        fed, trainer = self._fed, self._trainer
        if fed is None or trainer is None:
            return
        lr = fed.worker.round_config.get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = float(lr)

    def _stop_if_done(self, trainer: Trainer) -> None:
        if self.stop_when_done and self.done:
            trainer.should_stop = True


def _loss_of(outputs: Any) -> torch.Tensor | float | None:
    """The loss ``training_step`` returned: a tensor, or a mapping with ``"loss"``."""
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    if isinstance(outputs, torch.Tensor) and outputs.numel() == 1:
        return outputs
    if isinstance(outputs, (int, float)):
        return float(outputs)
    return None
