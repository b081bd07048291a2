"""PyTorch drop-in: wrap the optimizer, keep the training loop.

    opt = FederatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model,
                             chief="tcp://203.0.113.5:7777", sync_every=100,
                             num_samples=len(train_set))

Every ``sync_every``-th ``step()`` sends the model's state (parameters and buffers) to the chief
and loads the federation's average back. Like Horovod's ``DistributedOptimizer``, the object
returned is an instance of a subclass of the user's optimizer class, so LR schedulers,
``GradScaler``, gradient clipping, hooks and ``state_dict()`` see a real optimizer.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from fedberry.transports.connect import InProcessChief
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
    Read-only arrays, such as views on a received frame, are fine. An integer entry (BatchNorm's
    ``num_batches_tracked``) is rounded to the nearest integer, not truncated.
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
            source = torch.tensor(a)
            if not (tensor.is_floating_point() or tensor.is_complex()):
                # get_arrays sends integer buffers as float32, and their average comes back off
                # the integer: by secure aggregation's fixed-point step (2 - 2.4e-7), or as a
                # weighted mean. copy_ would truncate 1.9999998 to 1.
                source = source.round()
            tensor.copy_(source)


class ModelFederation:
    """A torch model's membership of a federation: join, record the loss, average, leave.

    What ``FederatedOptimizer`` and the Lightning callback (``integrations.lightning``) share;
    each decides *when* to average, this does the averaging. No network until ``join()``.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose ``state_dict`` (parameters and buffers) is averaged; its keys name the
        tensors of the chief's model file.
    chief : str or ChiefHandle or None
        The chief's address or in-process handle (not used when ``worker`` is given).
    num_samples : float
        This worker's weight in the average.
    worker : fedberry.Worker, optional
        A worker built elsewhere.
    worker_options : dict
        Passed to ``fedberry.Worker``.
    evaluate : callable, optional
        ``evaluate(model) -> (num_examples, metrics)`` on held-out data, called with ``model``
        holding the global model when the chief asks (not used when ``worker`` is given).
    on_model : callable, optional
        Called with no arguments each time the federation's model has been loaded into
        ``model`` (after ``join`` and each average): ``FederatedOptimizer`` applies the
        round's configuration there.
    """

    def __init__(self, model: torch.nn.Module, chief: str | InProcessChief | None,
                 num_samples: float, worker: Worker | None = None,
                 worker_options: dict[str, Any] | None = None, *,
                 evaluate: Callable[[torch.nn.Module], Any] | None = None,
                 on_model: Callable[[], None] | None = None) -> None:
        if chief is None and worker is None:
            raise TypeError("a federated torch model needs chief=, the chief's address (for "
                            "example 'tcp://203.0.113.5:7777') or the handle fedberry.serve() "
                            "returns")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        self.model = model
        self.num_samples = num_samples
        self._chief = chief
        self._worker_options = worker_options or {}
        self._worker = worker
        self._final: list[np.ndarray] | None = None
        self._loss_sum = 0.0
        self._loss_count = 0
        self._evaluate = evaluate
        self._on_model = on_model

    @property
    def worker(self) -> Worker:
        """The ``fedberry.Worker`` (made on first use; it connects at ``join()``)."""
        if self._worker is None:
            options = dict(self._worker_options)
            if self._evaluate is not None:
                options["evaluate"] = self._evaluate_arrays
            self._worker = Worker(self._chief, **options)
        return self._worker

    def _evaluate_arrays(self, arrays: list[np.ndarray]) -> Any:
        """The Worker's ``evaluate``: the user's, on ``model`` holding the global model (which
        it then keeps: ``join``/``synchronize`` load that model next anyway)."""
        assert self._evaluate is not None
        set_arrays(self.model, arrays)
        training = self.model.training  # the user's evaluate may switch to eval(): undo it
        try:
            with torch.no_grad():
                return self._evaluate(self.model)
        finally:
            self.model.train(training)

    @property
    def joined(self) -> bool:
        """True once joined."""
        return self._worker is not None and self._worker.joined

    @property
    def done(self) -> bool:
        """True once the chief has run all its rounds."""
        return self._worker is not None and self._worker.done

    def join(self) -> None:
        """Join now and load the federation's model into ``model`` (a no-op once joined).

        Raises ValueError when the federation's model has other tensors than ``model``.
        """
        if self.joined:
            return
        # The state_dict keys name the tensors of the chief's OUT/model.safetensors.
        out = self.worker.join(get_arrays(self.model), names=array_names(self.model))
        set_arrays(self.model, out)
        if self._on_model is not None:
            self._on_model()
        if self.worker.done:
            self._final = out

    def record_loss(self, loss: float | torch.Tensor) -> None:
        """One step's training loss; the mean since the last average goes to the chief."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self._loss_sum += value
        self._loss_count += 1

    def synchronize(self) -> None:
        """Average with the federation now (joining first); nothing once it is done."""
        if not self.joined:
            self.join()
        if self.done:
            return
        metrics = {"loss": self._loss_sum / self._loss_count} if self._loss_count else {}
        self._loss_sum, self._loss_count = 0.0, 0
        out = self.worker.sync(get_arrays(self.model), self.num_samples, metrics)
        set_arrays(self.model, out)
        if self._on_model is not None:
            self._on_model()
        if self.worker.done:
            self._final = out

    def close(self) -> None:
        """Leave; once the federation is done, put its final model back into ``model``.

        Leaving before the chief has run all its rounds keeps the local model as it is (the
        federation's final model does not exist yet) and says so in the log.
        """
        if self._final is not None:
            set_arrays(self.model, self._final)
        elif self.joined:
            log.warning("leaving before the federation finished (round %d): the model keeps "
                        "its local training", self.worker.round)
        if self._worker is not None:
            self._worker.close()


class FederatedOptimizer(torch.optim.Optimizer):
    """A torch optimizer that averages the model with a federation every ``sync_every`` steps.

    ``FederatedOptimizer(optimizer, model, chief=...)`` returns an instance of a subclass of
    ``type(optimizer)`` (``FederatedSGD`` for ``torch.optim.SGD``, and so on) that shares the
    wrapped optimizer's ``param_groups``, ``state``, ``defaults`` and hooks: it *is* that
    optimizer, plus federation. ``isinstance(opt, torch.optim.Optimizer)`` and
    ``isinstance(opt, type(optimizer))`` hold, so LR schedulers (``StepLR``, ``OneCycleLR``, ...),
    ``torch.amp.GradScaler`` (``scaler.step(opt)``), ``torch.nn.utils.clip_grad_norm_``,
    ``zero_grad(set_to_none=...)``, ``state_dict()`` and ``load_state_dict()`` work unchanged.

    The constructor opens no connection. The worker joins the federation at the first
    ``step()`` (the model then takes the federation's weights) or at an explicit ``join()``; call
    ``join()`` before training when the first gradient should be taken at the federation's
    weights. Every ``sync_every``-th ``step()`` runs the wrapped optimizer's step, sends the
    model's state (parameters and buffers) and loads the federation's average back. A step that
    ``GradScaler`` skips (inf/NaN gradients) does not call ``step()`` and so does not count.

    The training loss that the chief logs per round (its ``train_loss`` column) comes from either
    ``opt.step(closure)`` when the closure returns the loss, or ``opt.record_loss(loss)`` once per
    step in a loop that calls ``opt.step()`` without a closure.

    A round configuration from the chief (``serve(round_config=...)``, ``--round-config``) with
    an ``lr`` sets the learning rate of every param group when its model arrives (after
    ``join`` and each average): the chief's schedule then replaces a local scheduler's value
    for that round. The whole dict is ``opt.worker.round_config``.

    ``close()`` (or leaving a ``with`` block) leaves the federation; once the chief has run all
    its rounds (``done``) it also puts the federation's final model back into ``model``, so any
    steps taken after the last round do not linger.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer the training loop would use, built over ``model``'s parameters.
    model : torch.nn.Module
        The model whose ``state_dict`` (parameters and buffers) is averaged.
    chief : str or ChiefHandle
        Required: the chief's address (``"tcp://host:port"``, ``"mpi://"``) or the handle
        ``fedberry.serve()`` returns (the chief's process trains too).
    sync_every : int, default 100
        Optimizer steps between averages.
    num_samples : float, optional
        This worker's weight in the average, usually the size of its training set. By default
        ``sync_every`` (every worker syncs after the same number of steps: equal weights).
    worker : fedberry.Worker, optional
        A worker built elsewhere; ``chief``, ``evaluate`` and ``worker_options`` are then not
        used (give that Worker its own ``evaluate``).
    evaluate : callable, optional
        ``evaluate(model) -> (num_examples, {"accuracy": .., "loss": ..})`` on this worker's
        held-out data; when the chief asks (``--evaluate-every``) it is called with ``model``
        holding the global model, before training goes on (docs/fleet.md).
    **worker_options
        Passed to ``fedberry.Worker``: ``token``, ``token_file``, ``ca``, ``cert``, ``key``,
        ``worker_id``, ``codec``, timeouts, ``local_dp`` (this worker's own noise,
        docs/privacy.md). Under a chief run with ``--dp`` nothing is needed here: the worker
        learns the clipping bound at join and clips every update to it.

    Attributes
    ----------
    optimizer : torch.optim.Optimizer
        The wrapped optimizer, sharing this one's state: call ``step`` on this one.
    model : torch.nn.Module
    sync_every : int
    num_samples : float
    steps : int
        Steps taken through this optimizer.

    Examples
    --------
    >>> opt = FederatedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    ...                          model, chief="tcp://203.0.113.5:7777", sync_every=100,
    ...                          num_samples=len(train_set), token_file="fedberry.token")
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, 30)
    >>> with opt:
    ...     while not opt.done:
    ...         for x, y in loader:
    ...             opt.zero_grad()
    ...             loss = loss_fn(model(x), y)
    ...             loss.backward()
    ...             opt.record_loss(loss)
    ...             opt.step()
    ...             sched.step()
    """

    # Federation state lives in slots, outside the ``__dict__`` shared with the wrapped optimizer,
    # so the wrapped optimizer's namespace gains nothing.
    __slots__ = ("optimizer", "model", "sync_every", "steps", "_fed")

    # One subclass per optimizer class, so wrapping many optimizers builds no class per call.
    _subclasses: ClassVar[dict[type, type]] = {}

    def __new__(cls, optimizer: torch.optim.Optimizer, *args: Any,
                **kwargs: Any) -> FederatedOptimizer:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError("FederatedOptimizer wraps a torch.optim.Optimizer built over the "
                            f"model's parameters, not {type(optimizer).__name__}")
        base = type(optimizer)
        if issubclass(base, FederatedOptimizer):
            raise TypeError("this optimizer is already a FederatedOptimizer: wrap it once")
        sub = FederatedOptimizer._subclasses.get(base)
        if sub is None:
            # Horovod's DistributedOptimizer builds the same kind of class. The MRO is
            # (Federated<Base>, FederatedOptimizer, Base, ..., Optimizer): our step() runs
            # Base.step through super().
            sub = type(f"Federated{base.__name__}", (FederatedOptimizer, base),
                       {"__slots__": (), "__module__": __name__,
                        "__doc__": FederatedOptimizer.__doc__})
            FederatedOptimizer._subclasses[base] = sub
        return torch.optim.Optimizer.__new__(sub)

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *,
                 chief: str | InProcessChief | None = None, sync_every: int = 100,
                 num_samples: float | None = None, worker: Worker | None = None,
                 evaluate: Callable[[torch.nn.Module], Any] | None = None,
                 **worker_options: Any) -> None:
        if chief is None and worker is None:
            raise TypeError("FederatedOptimizer needs chief=, the chief's address (for example "
                            "'tcp://203.0.113.5:7777') or the handle fedberry.serve() returns")
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be a whole number of at least 1, got {sync_every!r}")
        # Share, rather than copy, the wrapped optimizer's namespace: param_groups, state,
        # defaults and hooks are then one set of objects seen through both names, including
        # after load_state_dict() (which rebinds self.state and self.param_groups) and after a
        # scheduler patches the instance. Re-running Base.__init__ over the same param groups
        # (Horovod's way) would drop existing state such as momentum buffers.
        self.__dict__ = optimizer.__dict__
        # A scheduler made on the wrapped optimizer before wrapping patched its ``step`` in that
        # dict (to notice a step before its own); left there it would shadow our step() and
        # nothing would sync. Patch it the same way around ours, so that scheduler still sees
        # its optimizer step.
        if self.__dict__.pop("step", None) is not None:
            self.__dict__["step"] = _tracked_by_schedulers(self)
        self.optimizer = optimizer
        self._fed = ModelFederation(model, chief,
                                    float(num_samples) if num_samples else float(sync_every),
                                    worker, worker_options, evaluate=evaluate,
                                    on_model=self._apply_round_config)
        self.model = model
        self.sync_every = sync_every
        self.steps = 0

    # -- the optimizer interface -------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take the wrapped optimizer's step, then average every ``sync_every``-th step.

        Joins the federation first if it has not yet. A loss returned by ``closure`` is
        recorded for the chief's ``train_loss`` (see ``record_loss``).

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss, as for the wrapped optimizer.

        Returns
        -------
        The wrapped optimizer's return value (the closure's loss, or None).
        """
        if not self.joined:
            self.join()
        loss = super().step(closure) if closure is not None else super().step()
        if loss is not None:
            self.record_loss(loss)
        self.steps += 1
        if self.steps % self.sync_every == 0:
            self.synchronize()
        return loss

    # The wrapped class's step is already wrapped by torch's profiling/hook wrapper; super().step
    # reaches it, so hooks run once. Marked as hooked, load_state_dict() (which calls
    # _patch_step_function) does not wrap ours a second time and run every hook twice.
    step.hooked = True  # type: ignore[attr-defined]

    # -- federation (ModelFederation does it; this optimizer decides when) ------------------
    @property
    def num_samples(self) -> float:
        """This worker's weight in the average."""
        return self._fed.num_samples

    @num_samples.setter
    def num_samples(self, value: float) -> None:
        self._fed.num_samples = float(value)

    @property
    def worker(self) -> Worker:
        """The ``fedberry.Worker`` (made on first use; it connects at ``join()``)."""
        return self._fed.worker

    @property
    def joined(self) -> bool:
        """True once this optimizer has joined the federation."""
        return self._fed.joined

    @property
    def done(self) -> bool:
        """True once the chief has run all its rounds: stop training."""
        return self._fed.done

    def join(self) -> None:
        """Join the federation now and load its model into ``model`` (``step`` does this first).

        Raises ValueError when the federation's model has other tensors than ``model``.
        """
        self._fed.join()

    def record_loss(self, loss: float | torch.Tensor) -> None:
        """Report one step's training loss; the chief logs the mean per round (``train_loss``).

        Parameters
        ----------
        loss : float or torch.Tensor
            The loss the loop computed (a one-element tensor is read with ``float``).
            ``step(closure)`` records the closure's loss itself: do not record it twice.
        """
        self._fed.record_loss(loss)

    def synchronize(self) -> None:
        """Average with the federation now (``step`` calls this every ``sync_every`` steps).

        Does nothing once the federation is done.
        """
        self._fed.synchronize()

    def _apply_round_config(self) -> None:
        """The chief's ``lr`` for this round, into every param group (when it sent one)."""
        lr = self.worker.round_config.get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            for group in self.param_groups:
                group["lr"] = float(lr)

    def close(self) -> None:
        """Leave the federation; once it is done, put its final model back into ``model``.

        Closing before the chief has run all its rounds keeps the local model as it is (the
        federation's final model does not exist yet) and says so in the log.
        """
        self._fed.close()

    def __enter__(self) -> FederatedOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tracked_by_schedulers(opt: FederatedOptimizer) -> Callable[..., Any]:
    """``opt.step`` marked the way ``torch.optim.lr_scheduler`` marks a step it tracks."""
    ref = weakref.ref(opt)

    def step(*args: Any, **kwargs: Any) -> Any:
        target = ref()
        assert target is not None, "the optimizer is gone"
        target._opt_called = True  # what the scheduler's own wrapper records
        return type(target).step(target, *args, **kwargs)

    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    step.__doc__ = FederatedOptimizer.step.__doc__
    return step
