"""OUT/run.json: what a run is, next to its metrics.jsonl.

``metrics.jsonl`` holds one record per closed round and nothing else (readers take every line
for a round), so the run's own description goes in a file beside it, rewritten atomically when
the chief starts (and again on ``--resume``, with the round it resumed at):

    {"strategy": "fedadam:lr=0.05,...", "strategy_name": "fedadam",
     "strategy_params": {"lr": 0.05, ...}, "start_round": 0, "config": {...}}

``strategy`` is ``--strategy`` text that reproduces the rule; ``config`` is the run's
configuration as the caller gave it (the command line's options for ``fedberry chief``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedberry.strategies import Strategy, describe

RUN_FILE = "run.json"


def write_run_info(out_dir: str | os.PathLike, strategy: Strategy, config: dict[str, Any],
                   start_round: int = 0) -> Path:
    path = Path(out_dir) / RUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"strategy": describe(strategy), "strategy_name": strategy.name,
            "strategy_params": strategy.params(), "start_round": start_round,
            "config": config}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1, default=str) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def read_run_info(out_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(out_dir) / RUN_FILE).read_text())
