"""Keras 3 drop-in: a callback that turns ``model.fit`` into a FedAvg worker.

    model.fit(x, y, epochs=100, callbacks=[
        FederatedCallback(chief="tcp://203.0.113.5:7777", sync_every=100,
                          num_samples=len(x), token_file="fedberry.token")])

* At train begin it joins the federation and loads the federation's model (the chief's initial
  weights, or the current global model when joining a run already under way).
* Every ``sync_every`` training batches it sends the model's weights and loads the weighted
  average back, like Horovod's Keras callbacks attach to ``fit`` without changing the loop.
* At train end it sends the batches trained since the last average (if any), so that they are not
  lost, and leaves the federation.
* When the chief has run all its rounds, it stops ``fit`` (``model.stop_training``) and the model
  ends ``fit`` holding the federation's final model: local batches after the end of the run would
  only move the model away from the one everybody agreed on. ``stop_when_done=False`` keeps
  training locally instead (e.g. to fine-tune the global model on local data).

Weights are ``model.get_weights()``: every variable, trainable or not (BatchNorm's moving
statistics are averaged too, as in the FedAvg reference implementations), in ``model.weights``
order, floats as float32. It works on every Keras 3 backend (torch, TensorFlow, JAX); under JAX
the model's variables are only attached to the model between steps when a callback asks for them
(``Callback.model`` syncs them), which is why this module reads ``self.model`` exactly at the sync
points and nowhere else: syncing on every batch would cost a device-to-host copy per step.

A round configuration from the chief with an ``lr`` sets the optimizer's ``learning_rate`` when
the round's model arrives (``Worker.round_config`` holds the whole dict).

If ``fit`` raises, Keras does not call ``on_train_end``: call ``close()`` (or use the callback as
a context manager) to leave the federation promptly; otherwise the chief notices the silence.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    import keras
except ModuleNotFoundError as exc:  # say which backend is missing and how to pick another
    if exc.name and exc.name.split(".")[0] in ("tensorflow", "jax", "torch"):
        raise ImportError(
            f"Keras is set to its {exc.name.split('.')[0]} backend, which is not installed: "
            "set KERAS_BACKEND=torch or KERAS_BACKEND=jax (whichever is installed) before "
            "Python starts, or before the first 'import keras'") from exc
    if exc.name == "keras":
        raise ImportError("fedberry.keras needs Keras 3: pip install 'fedberry[keras]' (and "
                          "a backend: torch or jax)") from exc
    raise

from fedberry.chief import model_file
from fedberry.errors import ModelMismatchError
from fedberry.worker import Worker

log = logging.getLogger("fedberry.keras")

__all__ = ["FederatedCallback", "get_arrays", "load_weights", "set_arrays", "weight_names"]


def weight_names(model: keras.Model) -> list[str]:
    """The variable paths (e.g. ``sequential/dense/kernel``) in ``get_arrays`` order."""
    return [getattr(v, "path", None) or v.name for v in model.weights]


def get_arrays(model: keras.Model) -> list[np.ndarray]:
    """``model.get_weights()`` with floating arrays as float32 (the wire's common dtype)."""
    out = []
    for a in model.get_weights():
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) and a.dtype != np.float32:
            a = a.astype(np.float32)
        out.append(a)
    return out


def set_arrays(model: keras.Model, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays into ``model`` after checking them all, so a bad list leaves the model intact.

    Raises ModelMismatchError naming the variable whose shape differs.
    """
    variables = model.weights
    names = weight_names(model)
    if len(arrays) != len(variables):
        raise ModelMismatchError(
            f"the federation's model has {len(arrays)} tensors, this Keras model has "
            f"{len(variables)} ({', '.join(names)})", "spec_mismatch")
    for name, v, a in zip(names, variables, arrays):
        if tuple(v.shape) != tuple(np.shape(a)):
            raise ModelMismatchError(
                f"{name}: this Keras model has shape {tuple(v.shape)}, the federation's "
                f"{tuple(np.shape(a))}", "spec_mismatch")
    model.set_weights([np.asarray(a) for a in arrays])


def load_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """Load a model file of the chief (``OUT/model.safetensors``) into ``model``.

    Tensors are matched by weight path when the file has this model's paths; otherwise (paths
    differ when a layer was named by Keras's counter in another process, or the file has
    ``global.<i>`` names) in the file's order, which is the model's ``model.weights`` order in
    every file fedberry writes. Shapes are checked before anything is loaded.

    Raises ModelMismatchError naming the first tensor that does not fit, ValueError when the
    file is not safetensors.
    """
    tensors = model_file.load(path)
    set_arrays(model, model_file.ordered(tensors, weight_names(model)))


def explain_mismatch(exc: ModelMismatchError, model: keras.Model) -> ModelMismatchError:
    """The chief's refusal, with the tensor index translated into the Keras variable's path.

    The chief only knows tensor indices and shapes ("tensor 0 is float32[784, 200], the
    federation's is float32[200, 784]"); the user knows layers.
    """
    message = str(exc)
    names = weight_names(model)
    m = re.search(r"tensor (\d+) is \w+\[([\d, ]*)\], the federation's is \w+\[([\d, ]*)\]",
                  message)
    if m and int(m.group(1)) < len(names):
        i = int(m.group(1))
        ours, theirs = m.group(2), m.group(3)
        message += f" (tensor {i} is the Keras variable {names[i]!r})"
        if ours != theirs and ours.split(", ")[::-1] == theirs.split(", "):
            message += (". The shapes are transposed: the federation's model looks like a "
                        "PyTorch model (Linear weights are (out, in), Keras Dense kernels are "
                        "(in, out)); start the chief with a Keras model, e.g. "
                        "`fedberry chief --framework keras`")
    elif re.search(r"the model has \d+ tensors", message):
        message += f" (this Keras model's tensors: {', '.join(names)})"
    return ModelMismatchError(message, exc.code or "spec_mismatch")


class FederatedCallback(keras.callbacks.Callback):
    """Federated averaging for ``model.fit``.

    ``sync_every`` counts training batches, across epochs. ``num_samples`` is this worker's
    weight in the average (FedAvg weights by local dataset size: pass ``len(x_train)``); by
    default the number of batches trained since the last average, which gives equal weights to
    workers that sync at the same cadence and less weight to the shorter final sync.
    ``leave_at_end=False`` keeps the worker in the federation across ``fit`` calls (for a loop of
    ``fit(epochs=1)`` calls): nothing is sent at train end and ``close()`` leaves. ``worker``
    takes a ready ``fedberry.Worker``; other keyword arguments (``token_file``, ``ca``,
    ``worker_id``, ``local_dp``, ...) go to the ``Worker`` this callback creates. Under a chief run
    with ``--dp`` the worker learns the clipping bound at join and clips every update to it
    (docs/privacy.md).

    ``evaluate(model) -> (num_examples, metrics)`` offers an evaluation on this worker's
    held-out data (docs/fleet.md); when the chief asks (``--evaluate-every``) it is called with
    the model holding the global weights, e.g.
    ``lambda m: (len(x_val), m.evaluate(x_val, y_val, return_dict=True, verbose=0))``.
    Keras's ``evaluate`` resets the model's running training metrics, as its own validation at
    an epoch's end does: the ``train_loss`` this callback reports for that round is then
    approximate.
    """

    def __init__(self, chief: Any = "tcp://127.0.0.1:7777", *, sync_every: int = 100,
                 num_samples: float | None = None, token: str | None = None,
                 worker: Worker | None = None, stop_when_done: bool = True,
                 leave_at_end: bool = True, evaluate: Any = None,
                 **worker_options: Any) -> None:
        super().__init__()
        if sync_every < 1:
            raise ValueError("sync_every must be at least 1")
        if num_samples is not None and not num_samples > 0:
            raise ValueError(f"num_samples must be positive, got {num_samples!r}")
        self.chief = chief
        self.sync_every = sync_every
        self.num_samples = num_samples
        self.stop_when_done = stop_when_done
        self.leave_at_end = leave_at_end
        self._worker_options = dict(worker_options, token=token)
        self.evaluate = evaluate
        if evaluate is not None:
            self._worker_options["evaluate"] = self._evaluate_arrays
        self.worker = worker
        self._own_worker = worker is None
        self._open = False
        self._left = False
        self.steps = 0  # training batches seen, all fit calls together
        self.syncs = 0
        self._since_sync = 0
        self._batch_begin = 0
        self._final: list[np.ndarray] | None = None
        # Keras reports the running mean of the loss since the epoch began; the mean over the
        # batches since the last sync is recovered from it by differences (_close_epoch_window).
        self._loss_sum = 0.0
        self._loss_batches = 0
        self._anchor = (0, 0.0)  # (batches into the epoch, running mean) at the window's start
        self._last = (0, 0.0)

    # -- federation --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once the chief has run all its rounds."""
        return self.worker is not None and self.worker.done

    def join(self) -> None:
        """Join the federation and load its model (``on_train_begin`` calls this).

        A no-op while still a member (``leave_at_end=False`` across ``fit`` calls).
        """
        if self._open:
            return
        if self.worker is None or (self._own_worker and self._left):
            self.worker = Worker(self.chief, **self._worker_options)
        elif self._left:
            raise RuntimeError("the Worker given to FederatedCallback has left the federation; "
                               "pass a new one, or use leave_at_end=False")
        model = self.model
        arrays = get_arrays(model)
        if not arrays:
            raise ValueError("the model has no weights yet: build it before fit")
        self._open = True
        try:
            # The weight paths name the tensors of the chief's OUT/model.safetensors.
            global_arrays = self.worker.join(arrays, names=weight_names(model))
        except ModelMismatchError as exc:
            self.close()
            raise explain_mismatch(exc, model) from None
        except BaseException:
            self.close()
            raise
        set_arrays(model, global_arrays)
        self._since_sync = 0
        self._loss_sum, self._loss_batches = 0.0, 0
        self._anchor = self._last = (0, 0.0)
        self._after_sync(global_arrays)

    def synchronize(self) -> None:
        """Average with the federation now (every ``sync_every`` batches and at train end)."""
        if self.worker is None or not self._open or self.worker.done:
            return
        metrics = {}
        loss = self._take_loss()
        if loss is not None:
            metrics["loss"] = loss
        weight = self.num_samples if self.num_samples is not None else max(1, self._since_sync)
        # Callback.model, not _model: under JAX it writes the training state into the variables
        # (else get_weights is stale) and makes fit read them back after this batch (else
        # set_weights below would be ignored by the training loop).
        model = self.model
        global_arrays = self.worker.sync(get_arrays(model), weight, metrics)
        set_arrays(model, global_arrays)
        self.syncs += 1
        self._since_sync = 0
        self._after_sync(global_arrays)

    def _evaluate_arrays(self, arrays: list[np.ndarray]) -> Any:
        """The Worker's ``evaluate``: the user's, on the model holding the global weights."""
        set_arrays(self.model, arrays)
        return self.evaluate(self.model)

    def close(self) -> None:
        """Leave the federation (``on_train_end`` calls this unless ``leave_at_end=False``)."""
        if self.worker is not None and self._open:
            self._open = False
            self._left = True
            self.worker.close()

    def __enter__(self) -> FederatedCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _after_sync(self, global_arrays: list[np.ndarray]) -> None:
        lr = self.worker.round_config.get("lr") if self.worker is not None else None
        optimizer = getattr(self.model, "optimizer", None)
        if (isinstance(lr, (int, float)) and not isinstance(lr, bool)
                and optimizer is not None):
            try:
                optimizer.learning_rate = float(lr)  # Keras 3 assigns into its variable
            except TypeError as exc:  # built with a LearningRateSchedule: not settable
                log.warning("the chief's lr %g is not applied: %s", lr, exc)
        if self.worker is not None and self.worker.done:
            log.info("the federation has finished (round %d)", self.worker.round)
            if self.stop_when_done:
                self._final = global_arrays
                self.model.stop_training = True

    # -- Keras hooks -------------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._final = None
        self.join()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._close_epoch_window()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._batch_begin = batch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # With steps_per_execution > 1 (TensorFlow, JAX) one call covers several batches, and
        # the last call of an epoch names a full execution's end even when fewer batches were
        # left: clip to the epoch's length when Keras knows it.
        steps = (self.params or {}).get("steps")
        if isinstance(steps, int) and steps > 0:
            batch = min(batch, steps - 1)
        n = max(1, batch - self._batch_begin + 1)
        self.steps += n
        self._since_sync += n
        self._track_loss(batch + 1, logs)
        if self._since_sync >= self.sync_every:
            self.synchronize()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.leave_at_end:
            if self._since_sync > 0:
                self._close_epoch_window()
                self.synchronize()
            self.close()
        if self._final is not None:
            # The federation ended during this fit: leave the model holding its final model,
            # even if Keras trained one more batch after we asked it to stop.
            set_arrays(self.model, self._final)

    # -- loss bookkeeping --------------------------------------------------------------------
    def _track_loss(self, batches_into_epoch: int, logs: dict[str, Any] | None) -> None:
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float)) and np.isfinite(loss):
            self._last = (batches_into_epoch, float(loss))

    def _close_epoch_window(self) -> None:
        # k * mean_k is the sum of the first k batch losses, so the sum over (k1, k2] is a
        # difference of two such products. Keras weights its mean by batch size, so a short last
        # batch counts as a full one here: close enough for a progress metric.
        (k1, m1), (k2, m2) = self._anchor, self._last
        if k2 > k1:
            self._loss_sum += k2 * m2 - k1 * m1
            self._loss_batches += k2 - k1
        self._anchor = self._last = (0, 0.0)

    def _take_loss(self) -> float | None:
        (k1, m1), (k2, m2) = self._anchor, self._last
        total, batches = self._loss_sum, self._loss_batches
        if k2 > k1:
            total += k2 * m2 - k1 * m1
            batches += k2 - k1
        self._loss_sum, self._loss_batches = 0.0, 0
        self._anchor = self._last
        return total / batches if batches else None
