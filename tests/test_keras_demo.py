"""``fedberry demo --framework keras``: a Keras chief (initial model, test-set evaluation) and Keras
workers training through ``model.fit``, in real processes over loopback TCP.

The short run is always on; the README's full run (4 workers, 10 rounds, test accuracy >= 0.85,
the PyTorch demo's bar) takes about a minute on two cores and runs with FEDBERRY_FULL_DEMO=1.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess

import pytest
from helpers import fedberry_env, python

from fedberry.metrics import read

MLP_PARAMS = 199_210

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None,
                                reason="Keras 3 is the 'keras' extra")


def run_demo(out, *args: str, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(python("-m", "fedberry", "demo", "--framework", "keras", "--out",
                                 str(out), *args),
                          env=fedberry_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_keras_demo_trains_and_the_chief_evaluates_the_keras_model(tmp_path):
    out = tmp_path / "demo"
    # One worker: every Keras process costs seconds of imports, and averaging is tested elsewhere.
    proc = run_demo(out, "--workers", "1", "--rounds", "2", "--sync-every", "100", timeout=300)
    records = read(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["workers"] == 1 and r["bytes_up"] >= 4 * MLP_PARAMS for r in records)
    # 200 SGD steps: well above chance (0.1) only if the chief reads the Keras layout.
    assert records[-1]["test_accuracy"] >= 0.6
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert "done: round 2" in proc.stdout
    log = (out / "worker-1.log").read_text()
    assert "finished" in log and "'backend'" in log and "'round': 2" in log


@pytest.mark.skipif(not os.environ.get("FEDBERRY_FULL_DEMO"),
                    reason="about a minute: set FEDBERRY_FULL_DEMO=1")
def test_keras_demo_reaches_085_in_10_rounds_with_4_workers(tmp_path):
    out = tmp_path / "demo"
    run_demo(out, "--workers", "4", "--rounds", "10", timeout=900)
    records = read(out / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(1, 11))
    assert records[-1]["test_accuracy"] >= 0.85
