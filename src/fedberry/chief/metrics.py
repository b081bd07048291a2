"""One JSON object per closed round, appended to OUT/metrics.jsonl and flushed at once, so that a
run killed midway still leaves every finished round on disk.

Every line is strict JSON (``allow_nan=False``): a NaN or infinite number (an evaluation that
diverged) is written as ``null`` and its key listed in ``"nonfinite"``, since ``NaN`` and
``Infinity`` are not JSON and make strict parsers refuse the whole file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


class MetricsLog:
    def __init__(self, out_dir: str | os.PathLike | None, append: bool = False) -> None:
        self.path = Path(out_dir) / "metrics.jsonl" if out_dir else None
        self.records: list[dict[str, Any]] = []
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                self.path.write_text("")

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one round's line and return it as written. Numpy scalars (an evaluation's
        ``np.float32`` accuracy) are written as plain numbers, NaN and infinities as ``null``
        with their keys in ``"nonfinite"``; anything else JSON cannot hold raises TypeError
        before the line is kept anywhere, so memory and file never disagree."""
        record = _finite(record)
        line = json.dumps(record, default=_plain, allow_nan=False) + "\n"
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line)
        return record


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with each non-finite number replaced by None and flagged in ``nonfinite``."""
    out: dict[str, Any] = {}
    bad: list[str] = []
    for key, value in record.items():
        if isinstance(value, np.generic) and not isinstance(value, (np.bool_, np.str_)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            value = None
        out[key] = value
    if bad:
        out["nonfinite"] = bad
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"a metrics value of type {type(obj).__name__} cannot be written as JSON")


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
