"""One JSON object per closed round, appended to OUT/metrics.jsonl and flushed at once, so that a
run killed midway still leaves every finished round on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, out_dir: str | os.PathLike | None, append: bool = False) -> None:
        self.path = Path(out_dir) / "metrics.jsonl" if out_dir else None
        self.records: list[dict[str, Any]] = []
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not append:
                self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
