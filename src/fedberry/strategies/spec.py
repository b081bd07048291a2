"""``--strategy`` text <-> strategy objects: ``fedadam:lr=0.05,tau=1e-4`` and back.

The form is ``name`` or ``name:key=value,key=value``. The keys are the rule's constructor's
keyword arguments and each value is typed from the constructor's annotation (``float``, ``int``
or ``bool``), so a new hyperparameter is reachable from the command line as soon as the
constructor has it. Anything unknown is refused with a sentence that lists what is allowed.
"""

from __future__ import annotations

import inspect
import math
import typing
from typing import Any

from fedberry.strategies.base import Strategy, format_strategy
from fedberry.strategies.fedadam import FedAdam
from fedberry.strategies.fedavg import FedAvg
from fedberry.strategies.fedavgm import FedAvgM
from fedberry.strategies.median import Median
from fedberry.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type] = {cls.name: cls for cls in
                               (FedAvg, FedAvgM, FedAdam, Median, TrimmedMean)}

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def hyperparameters(cls: type) -> dict[str, tuple[type, Any]]:
    """A rule's keyword arguments: name -> (type, default), in the constructor's order."""
    hints = typing.get_type_hints(cls.__init__)
    return {p.name: (hints.get(p.name, str), p.default)
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def parse(text: str) -> Strategy:
    """The strategy ``text`` names, e.g. ``"trimmed_mean:trim=1"``.

    Raises
    ------
    ValueError
        For an unknown name or key, a key given twice, or a value of the wrong type or out of
        range, with a sentence saying what is allowed.
    """
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(sorted(STRATEGIES))}")
    allowed = hyperparameters(cls)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in allowed and not allowed:
            raise ValueError(f"strategy {name} takes no hyperparameters, so not {key!r}")
        if key not in allowed:
            raise ValueError(f"strategy {name} has no hyperparameter {key!r}; its keys are "
                             f"{', '.join(allowed)}")
        if not eq:
            raise ValueError(f"strategy {name}: give {key} a value, as {key}=VALUE")
        if key in kwargs:
            raise ValueError(f"strategy {name}: {key} is given twice")
        kwargs[key] = _typed(name, key, value.strip(), allowed[key][0])
    return cls(**kwargs)


def _typed(name: str, key: str, value: str, kind: type) -> Any:
    try:
        if kind is bool:
            if value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if kind is int:
            return int(value)
        if kind == (int | float):  # a count or a fraction (trimmed_mean's trim)
            try:
                return int(value)
            except ValueError:
                x = float(value)
            if math.isfinite(x):
                return x
            raise ValueError
        if kind is float:
            x = float(value)
            if math.isfinite(x):
                return x
            raise ValueError
    except ValueError:
        words = {bool: "true or false", int: "a whole number", float: "a finite number",
                 int | float: "a whole number or a fraction"}
        raise ValueError(f"strategy {name}: {key} must be {words[kind]}, not {value!r}") from None
    return value


def make_strategy(spec: str | Strategy) -> Strategy:
    """A strategy from ``--strategy`` text (see ``parse``), or the strategy object itself."""
    if isinstance(spec, str):
        return parse(spec)
    if not isinstance(spec, Strategy):
        raise TypeError(f"a strategy is a name such as 'fedavg' or an object with the Strategy "
                        f"interface (fedberry.strategies.Strategy), not {type(spec).__name__}")
    return spec


def describe(strategy: Strategy) -> str:
    """The strategy as ``--strategy`` text, every hyperparameter spelled out: ``parse`` of it
    gives an equal strategy (for the built-in rules)."""
    return format_strategy(strategy.name, strategy.params())
