"""The README's demo, end to end: a chief and 4 worker processes over loopback TCP sockets."""

import importlib.util
import subprocess

import pytest
from helpers import fedberry_env, python

from fedberry.chief.metrics import read

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="the demo trains with torch (the torch extra)")

MLP_PARAMS = 199_210


def test_demo_reaches_085_in_10_rounds_with_4_workers(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        python("-m", "fedberry", "demo", "--workers", "4", "--rounds", "10", "--out", str(out)),
        env=fedberry_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read(out / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(1, 11))
    for r in records:
        assert set(r) >= {"round", "workers", "test_accuracy", "train_loss", "bytes_up",
                          "bytes_down", "wall_s"}
        assert r["workers"] == 4
        # Counted at the sockets: at least four full float32 models up and down every round.
        assert r["bytes_up"] >= 4 * 4 * MLP_PARAMS
        assert r["bytes_down"] >= 4 * 4 * MLP_PARAMS
    assert records[-1]["test_accuracy"] >= 0.85
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert all(a["wall_s"] <= b["wall_s"] for a, b in zip(records, records[1:]))
    assert "test_acc" in proc.stdout and "done: round 10" in proc.stdout
    # The trained model, as the chief's last line says: one line loads it into the demo's torch
    # model (names are its state_dict keys), which scores the accuracy the chief logged.
    path = out / "model.safetensors"
    assert proc.stdout.strip().splitlines()[-1] == f"model: {path}"
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="the torch extra")
    from fedberry.demo.models import build_model, get_arrays
    from fedberry.demo.torch_demo import make_evaluator

    model = build_model("mlp", seed=123)  # other weights than any the run had
    model.load_state_dict(safetensors_torch.load_file(path))
    score = make_evaluator("mlp")(get_arrays(model))
    assert score["accuracy"] == pytest.approx(records[-1]["test_accuracy"], abs=1e-6)
