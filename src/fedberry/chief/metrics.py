"""One JSON object per closed round, appended to OUT/metrics.jsonl and flushed at once, so that a
run killed midway still leaves every finished round on disk."""

from __future__ import annotations

import json
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

    def write(self, record: dict[str, Any]) -> None:
        """Append one round's line. Numpy scalars (an evaluation's ``np.float32`` accuracy) are
        written as plain numbers; anything else JSON cannot hold raises TypeError before the
        line is kept anywhere, so memory and file never disagree."""
        line = json.dumps(record, default=_plain) + "\n"
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line)


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"a metrics value of type {type(obj).__name__} cannot be written as JSON")


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
