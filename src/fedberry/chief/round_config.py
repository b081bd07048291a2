"""Per-round configuration: what the chief sends with each round's global model.

A round configuration is a small dict of scalars (``protocol.messages.check_round_config``) that
every worker receives with the model of the round it is about to train, e.g. a learning rate
that decays: ``{"lr": 0.05}``. It is given to ``serve(round_config=...)`` as a callable
``config(round) -> dict`` (``round``: rounds completed so far, 0 for the first round's model),
or as a ``Schedule``, which is what the command line's ``--round-config`` (and a config file's
table) become::

    Schedule({"lr": {0: 0.1, 10: 0.05}, "local_epochs": 1})

    --round-config lr=0.1@0,0.05@10 --round-config local_epochs=1

A key's value holds from its round on, until the next one given; a key whose first round is
later than 0 is absent before it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Scalar = str | int | float | bool
RoundConfig = Callable[[int], Mapping[str, Any]]


class Schedule:
    """``config(round)`` from a plain table: key -> a scalar (every round) or a mapping
    {first round: value}.

    Raises ValueError on a round that is not a whole number >= 0 or a value that is no scalar.
    """

    def __init__(self, table: Mapping[str, Scalar | Mapping[int, Scalar]]) -> None:
        self.table: dict[str, list[tuple[int, Scalar]]] = {}
        for key, spec in table.items():
            steps = dict(spec) if isinstance(spec, Mapping) else {0: spec}
            clean: list[tuple[int, Scalar]] = []
            for start, value in steps.items():
                start = int(start) if isinstance(start, str) and start.isdigit() else start
                if type(start) is not int or start < 0:
                    raise ValueError(f"round config {key!r}: a round must be a whole number "
                                     f">= 0, not {start!r}")
                if type(value) not in (str, int, float, bool):
                    raise ValueError(f"round config {key!r}: a value must be a string, number "
                                     f"or boolean, not {type(value).__name__}")
                clean.append((start, value))
            self.table[str(key)] = sorted(clean)

    def __call__(self, round_: int) -> dict[str, Scalar]:
        out: dict[str, Scalar] = {}
        for key, steps in self.table.items():
            for start, value in steps:
                if start <= round_:
                    out[key] = value
        return out

    def to_dict(self) -> dict[str, dict[int, Scalar]]:
        """The plain table again (for run.json and ``--print-config``)."""
        return {k: dict(v) for k, v in self.table.items()}

    def __repr__(self) -> str:
        return f"Schedule({self.to_dict()!r})"


def parse_value(text: str) -> Scalar:
    """``0.1`` -> 0.1, ``3`` -> 3, ``true``/``false`` -> bool, anything else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_schedule(items: list[str]) -> Schedule:
    """``--round-config`` texts, each ``KEY=VALUE[@ROUND][,VALUE@ROUND...]``, as a Schedule.

    Raises ValueError with the text that is wrong.
    """
    table: dict[str, dict[int, Scalar]] = {}
    for item in items:
        key, eq, rest = item.partition("=")
        key = key.strip()
        if not eq or not key or not rest:
            raise ValueError(f"--round-config {item!r}: expected KEY=VALUE[@ROUND][,VALUE@ROUND"
                             "...], e.g. lr=0.1@0,0.05@10")
        steps = table.setdefault(key, {})
        for part in rest.split(","):
            value, at, start = part.rpartition("@") if "@" in part else (part, "", "0")
            try:
                first = int(start)
            except ValueError:
                raise ValueError(f"--round-config {item!r}: {start!r} is not a round number"
                                 ) from None
            steps[first] = parse_value(value)
    return Schedule(table)
