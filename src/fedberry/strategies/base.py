"""The strategy interface, and the small helpers every aggregation rule shares.

A strategy sees a round as ``begin_round(global)``, one ``add(update, weight)`` per accepted
update, then ``result() -> new global``. Rules that can fold updates into a running sum do so as
they arrive, so the chief's memory is O(model) however many workers there are; rules that must
see every update at once (the median) say so with ``needs_all_updates = True``.

The arrays given to ``add`` belong to the strategy from then on: it may overwrite them or keep
them, and it returns those it is done with, whose memory the caller may reuse for the next update
it receives (their contents are then meaningless). Strategies are pure: no I/O, no clocks.

Any object with these attributes and methods is a strategy (``Strategy`` is a
``typing.Protocol``, so a rule of your own need not inherit from anything): see
docs/strategies.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

Arrays = list[np.ndarray]


@dataclass
class StrategyState:
    """What a strategy carries from one round to the next, as saved in a checkpoint.

    ``name`` and ``params`` say whose state it is, so that ``load_state_dict`` can refuse the
    state of another rule or of other hyperparameters; ``None`` for either means a checkpoint
    written before they were recorded (only the arrays' names can be checked then).
    """

    name: str | None
    params: dict[str, Any] | None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@runtime_checkable
class Strategy(Protocol):
    """An aggregation rule, as the chief's state machine drives it.

    Attributes
    ----------
    name : str
        The rule's name on the command line (``--strategy NAME:key=value``) and in checkpoints.
    needs_all_updates : bool
        True if the rule keeps every update of a round until ``result()`` (memory
        O(model x workers)); such a rule cannot run over MPI, whose collective leaves the sum.
    updates : int
        Updates added since ``begin_round``.
    """

    name: str
    needs_all_updates: bool
    updates: int

    def begin_round(self, global_arrays: Sequence[np.ndarray]) -> None:
        """Start a round from this global model; forget the previous round's updates."""
        ...

    def add(self, update: list[np.ndarray], weight: float) -> list[np.ndarray]:
        """Take one worker's weights with its weight (sample count); return the arrays of
        ``update`` the strategy does not keep, free for the caller to reuse."""
        ...

    def result(self) -> Arrays:
        """The new global model from the updates added since ``begin_round`` (at least one)."""
        ...

    def params(self) -> dict[str, Any]:
        """The hyperparameters, as the constructor's keyword arguments (JSON-able values)."""
        ...

    def state_dict(self) -> StrategyState:
        """The state to checkpoint (e.g. server momentum), with the rule's name and params."""
        ...

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore ``state_dict()``'s output; refuse another rule's or other params' state."""
        ...


# -- helpers shared by the rules -------------------------------------------------------------
class Accumulator(Protocol):
    """Where a round's updates go until ``result()``: ``running_mean.RunningMean`` (O(model)) or
    ``coordinatewise.UpdateStack`` (every update, for the median and the trimmed mean)."""

    updates: int

    def begin(self, global_arrays: Sequence[np.ndarray]) -> None: ...

    def add(self, update: list[np.ndarray], weight: float) -> list[np.ndarray]: ...


class Accumulating:
    """What every built-in rule does the same way: it hands a round's updates to its
    accumulator ``self._acc``; a rule differs only in what ``result()`` makes of them. Not a
    rule itself (no rule subclasses another)."""

    _acc: Accumulator

    @property
    def updates(self) -> int:
        """Updates added since ``begin_round``."""
        return self._acc.updates

    def begin_round(self, global_arrays: Sequence[np.ndarray]) -> None:
        """Start a round from the current global model."""
        self._acc.begin(global_arrays)

    def add(self, update: list[np.ndarray], weight: float) -> list[np.ndarray]:
        """Add one update of ``weight``; returns the buffers the accumulator does not keep."""
        return self._acc.add(update, weight)


def format_strategy(name: str | None, params: dict[str, Any] | None) -> str:
    """``name:key=value,...``, the form ``--strategy`` takes (``spec.parse`` reads it back)."""
    if not params:
        return str(name)
    return f"{name}:" + ",".join(f"{k}={_format_value(v)}" for k, v in params.items())


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def is_number(x: Any) -> bool:
    """A finite real number given as a hyperparameter (not a bool, not NaN)."""
    return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
            and math.isfinite(x))


def check_weight(weight: float) -> float:
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
        raise ValueError(f"an update's weight must be a positive number, not {weight!r}")
    return float(weight)


def check_state(strategy: Any, state: StrategyState, saves: Sequence[str] = ()) -> None:
    """Refuse ``state`` unless it is ``strategy``'s own: same name, same hyperparameters, and
    only arrays this rule saves (``saves``: their names, ``"m.*"`` for ``m.0``, ``m.1``, ...).
    An empty state (a checkpoint of a run that closed no round yet) is accepted."""
    mine = format_strategy(strategy.name, strategy.params())
    if state.name is not None and (state.name != strategy.name or (
            state.params is not None and state.params != strategy.params())):
        theirs = format_strategy(state.name, state.params)
        raise ValueError(f"this state was saved by the strategy {theirs}, not by {mine}")
    plain = {s for s in saves if not s.endswith(".*")}
    prefixes = tuple(s[:-1] for s in saves if s.endswith(".*"))
    for key in state.arrays:
        if key in plain or (key.startswith(prefixes) and key.rsplit(".", 1)[1].isdigit()):
            continue
        raise ValueError(f"this state holds {key!r}, but {mine} saves "
                         f"{', '.join(saves) or 'nothing'}")


def indexed(arrays: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    """``arrays[prefix.0]``, ``arrays[prefix.1]``, ... as a list (one per model tensor)."""
    out = []
    while f"{prefix}.{len(out)}" in arrays:
        out.append(np.array(arrays[f"{prefix}.{len(out)}"]))  # a copy the strategy may own
    if len(out) != sum(k.startswith(prefix + ".") for k in arrays):
        raise ValueError(f"the saved {prefix}.* arrays are not numbered 0, 1, 2, ...")
    return out


def check_fits(name: str, what: str, state: Sequence[np.ndarray],
               model: Sequence[np.ndarray]) -> None:
    """Raise ``ValueError`` unless the saved per-tensor ``state`` (a velocity, moments) has one
    array of the model's shape per tensor. Else ``zip`` would silently drop tensors: state from
    a checkpoint of another model, or a strategy object reused for another model."""
    if len(state) != len(model) or any(s.shape != g.shape for s, g in zip(state, model)):
        have = [tuple(s.shape) for s in state]
        want = [tuple(g.shape) for g in model]
        raise ValueError(f"{name}: its {what} has shapes {have}, but the model's tensors are "
                         f"{want}: state of another model (a checkpoint, or this strategy "
                         f"object used for another run)")


def cast_to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` in the model's dtype; integer and boolean tensors are rounded, not truncated."""
    # np.asarray throughout: numpy computes a 0-d result as a scalar, and a model is arrays.
    if x.dtype == dtype:
        return np.asarray(x)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        x = np.rint(x)
    return np.asarray(x.astype(dtype))


def is_float(a: np.ndarray) -> bool:
    """Whether a server optimizer steps this tensor (integer ones, e.g. BatchNorm's step
    counters, just take the mean: a momentum on a counter means nothing)."""
    return bool(np.issubdtype(a.dtype, np.floating))
