"""Evaluating ddp's models: rank 0 saves its weights after every step, the harness tests them."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedberry.data.fashion_mnist import load_fashion_mnist


class SnapshotEvaluator:
    """Evaluates ddp rank 0's per-step weights on the test set, in step order, beside training
    (as our chief evaluates beside dsgd), and posts ``eval`` events to the harness's queue."""

    def __init__(self, snapdir: Path, model: str, data_dir: str | None,
                 events: queue.Queue[tuple[str, dict[str, Any]]]) -> None:
        self.snapdir, self.model, self.data_dir, self.events = snapdir, model, data_dir, events
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ddp-eval")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import torch  # the torch extra, on this thread only when ddp runs

        from fedberry.demo.models import build_model, evaluate, model_input  # imports torch

        torch.set_num_threads(1)
        data = load_fashion_mnist(self.data_dir)
        x, y = model_input(self.model, data.x_test), data.y_test
        net = build_model(self.model)
        params = list(net.parameters())
        step = 1
        while not self._stop.is_set():
            path = self.snapdir / f"step-{step:06d}.npy"
            if not path.exists():
                time.sleep(0.05)
                continue
            flat = np.load(path)
            path.unlink()
            with torch.no_grad():
                offset = 0
                for p in params:
                    p.copy_(torch.from_numpy(flat[offset:offset + p.numel()]).view_as(p))
                    offset += p.numel()
            acc, loss = evaluate(net, x, y)
            self.events.put(("evaluator", {"ev": "eval", "step": step, "acc": acc, "loss": loss}))
            step += 1
