"""``fedberry demo --framework keras``: a Keras chief (initial model, test-set evaluation) and Keras
workers training through ``model.fit``, in real processes over loopback TCP.

The PyTorch demo's bar (README's run): 4 workers, 10 rounds, test accuracy >= 0.85. At batch 128
and learning rate 0.2 instead of the defaults 32 and 0.05: a Keras step costs several times a torch
step whatever the batch (its per-step overhead, not the MLP's arithmetic), so a quarter of the
steps costs 85 CPU-s instead of 122 (0.860 at round 10; the defaults reach 0.872), half of
it the five processes importing Keras.
"""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
from helpers import fedberry_env, python

from fedberry.chief.metrics import read

MLP_PARAMS = 199_210

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None,
                                reason="Keras 3 is the 'keras' extra")


def run_demo(out, *args: str, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(python("-m", "fedberry", "demo", "--framework", "keras", "--out",
                                 str(out), *args),
                          env=fedberry_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_keras_demo_reaches_085_in_10_rounds_with_4_workers(tmp_path):
    """The README's bar, the same as the PyTorch demo's: only reachable if the chief reads the
    Keras layout (Dense kernels are (in, out)) and the workers really average."""
    out = tmp_path / "demo"
    proc = run_demo(out, "--workers", "4", "--rounds", "10", "--batch-size", "128", "--lr", "0.2",
                    timeout=900)
    records = read(out / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(1, 11))
    assert all(r["workers"] == 4 and r["bytes_up"] >= 4 * 4 * MLP_PARAMS for r in records)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_accuracy"] >= 0.85
    assert "done: round 10" in proc.stdout
    log = (out / "worker-1.log").read_text()
    assert "finished" in log and "'backend'" in log and "'round': 10" in log
    # The trained model, as the chief's last line says: one line loads it into the demo's Keras
    # model (names are its weight paths), which scores the accuracy the chief logged.
    path = out / "model.safetensors"
    assert proc.stdout.strip().splitlines()[-1] == f"model: {path}"
    import fedberry.keras
    from fedberry.chief.model_file import load
    from fedberry.demo.keras_demo import build_keras_model, make_keras_evaluator
    from fedberry.integrations.keras import get_arrays, weight_names

    model = build_keras_model("mlp", seed=123)  # other weights than any the run had
    fedberry.keras.load_weights(model, path)
    # The workers' weight paths (Keras numbers its layers per process: "dense_1" here may be
    # "dense_4" there, so load_weights falls back to the file's order, the model's).
    names = list(load(path))
    assert len(names) == len(weight_names(model))
    assert [n.rsplit("/", 1)[-1] for n in names] == ["kernel", "bias"] * 3
    score = make_keras_evaluator("mlp")(get_arrays(model))
    assert score["accuracy"] == pytest.approx(records[-1]["test_accuracy"], abs=1e-6)
