"""Checkpoint and resume.

With real processes: the chief is killed with SIGKILL after round r and restarted with --resume
on the same port; it continues at round r+1 from a global model bit-identical to the checkpoint
(a worker joining mid-training receives exactly those bytes), the connected workers reconnect by
themselves, and the run completes. In process: a stateful strategy's state survives too, each
checkpoint (written off the chief's loop, after the round's model has gone out) holds its own
round's model and state however far the rounds have run ahead of the writes, and a resume with
another strategy or model is refused.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from robustness_harness import TOKEN, Cluster

from fedberry import Worker
from fedberry.chief import checkpoint as ckpt_io
from fedberry.serve import serve

ROUNDS = 10


# On the q8 wire the workers' pending updates are changes since the model they hold, which the
# resumed chief must hold bit for bit: the checkpoint is written after the model is rounded.
@pytest.mark.parametrize("wire", [(), ("--downlink", "q8")], ids=["f32", "q8"])
def test_chief_killed_and_resumed_continues_from_an_identical_model(tmp_path: Path,
                                                                    wire: tuple) -> None:
    with Cluster(tmp_path) as c:
        args = ["--workers", "2", "--rounds", str(ROUNDS), *wire]
        chief = c.chief(*args)
        workers = [c.worker(i, 2, *(("--codec", "q8") if wire else ())) for i in (1, 2)]
        c.wait_round(3)
        # Freeze the workers first, so that nobody reconnects before the probe below has
        # looked at the resumed chief's model; they resume later and reconnect on their own.
        for w in workers:
            w.signal(signal.SIGSTOP)
        chief.signal(signal.SIGKILL)
        assert chief.wait(10) == -signal.SIGKILL
        saved = ckpt_io.load(c.out / "checkpoint.npz")
        r = saved.round
        assert 3 <= r < ROUNDS
        shutil.copy(c.out / "checkpoint.npz", tmp_path / "at-kill.npz")
        before = c.metrics()
        # A round's checkpoint is written before its metrics line (after its broadcast): the
        # workers may hold round r+1 already, and are answered as stale by the resumed chief.
        assert before and before[-1]["round"] <= r

        resumed = c.chief(*args, "--resume", name="chief-resumed")
        # A worker joining mid-training starts from the current global model: the checkpoint's.
        probe = Worker(c.url, token=TOKEN, worker_id="probe", connect_timeout=30)
        try:
            got = probe.join([np.zeros_like(a) for a in saved.arrays])
            assert probe.round == r
        finally:
            probe.close()
        assert len(got) == len(saved.arrays)
        for a, b in zip(got, saved.arrays):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes()  # bit-identical

        for w in workers:
            w.signal(signal.SIGCONT)
        assert resumed.wait(120) == 0, c.logs()
        for w in workers:
            assert w.wait(30) == 0, c.logs()

        after = c.metrics()[len(before):]
        assert [rec["round"] for rec in after] == list(range(r + 1, ROUNDS + 1))
        # The probe that came and went did not stand in for a worker: round r+1 waited for both.
        assert after[0]["workers"] == 2
        assert f"resuming from {c.out / 'checkpoint.npz'} at round {r}" in resumed.log()
        final = ckpt_io.load(c.out / "checkpoint.npz")
        assert final.round == ROUNDS and final.config["resume"] is True
        assert after[-1]["test_accuracy"] > 0.6
        for w in workers:
            assert f"'round': {ROUNDS}" in w.log()


def _run_rounds(handle, n: int, rng: np.random.Generator) -> None:  # type: ignore[no-untyped-def]
    w = Worker(handle, worker_id="local")
    try:
        model = w.join([np.zeros((4, 3), np.float32), np.zeros(3, np.float32)])
        for _ in range(n):
            model = w.sync([m + rng.standard_normal(m.shape).astype(np.float32) for m in model], 5)
    finally:
        w.close()


def test_strategy_state_survives_a_restart(tmp_path: Path) -> None:
    ck = tmp_path / "ck.npz"
    initial = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]
    h = serve(None, workers=1, rounds=10, strategy="fedavgm", initial=initial, checkpoint=ck)
    try:
        _run_rounds(h, 3, np.random.default_rng(0))
        velocity = [v.copy() for v in h.chief.strategy._velocity]
        model = [a.copy() for a in h.chief.global_arrays]
    finally:
        h.stop()
    saved = ckpt_io.load(ck)
    assert saved.round == 3 and saved.config["strategy"] == "fedavgm"

    h = serve(None, workers=1, rounds=10, strategy="fedavgm", initial=initial, checkpoint=ck,
              resume=True)
    try:
        assert h.chief.round == 3
        for a, b in zip(h.chief.global_arrays, model):
            assert a.tobytes() == b.tobytes()
        assert len(h.chief.strategy._velocity) == len(velocity)
        for a, b in zip(h.chief.strategy._velocity, velocity):
            assert a.tobytes() == b.tobytes()
        _run_rounds(h, 1, np.random.default_rng(1))
        assert h.chief.round == 4
    finally:
        h.stop()


def test_each_checkpoint_holds_its_rounds_state_while_rounds_run_ahead(tmp_path: Path) -> None:
    ck = tmp_path / "ck.npz"
    initial = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]
    saved: list[ckpt_io.Checkpoint] = []

    def evaluate(arrays: list[np.ndarray]) -> dict[str, float]:
        # On the chief's work thread, right after this round's write and before the next's.
        saved.append(ckpt_io.load(ck))
        time.sleep(0.3)  # the rounds run ahead meanwhile; FedAvgM updates its velocity in place
        return {}

    h = serve(None, workers=1, rounds=4, strategy="fedavgm", initial=initial, checkpoint=ck,
              evaluate=evaluate)
    rng = np.random.default_rng(0)
    velocities, models = {}, {}
    w = Worker(h, worker_id="local")
    try:
        model = w.join(initial)
        for _ in range(4):
            model = w.sync([m + rng.standard_normal(m.shape).astype(np.float32) for m in model], 5)
            velocities[w.round] = [v.copy() for v in h.chief.strategy._velocity]
            models[w.round] = [a.copy() for a in model]
        w.close()
        assert h.wait(30)
    finally:
        h.stop()
    assert [c.round for c in saved] == [1, 2, 3, 4]
    for c in saved:
        for a, b in zip(c.arrays, models[c.round], strict=True):
            assert a.tobytes() == b.tobytes()
        got = [c.strategy.arrays[f"velocity.{i}"] for i in range(len(initial))]
        for a, b in zip(got, velocities[c.round], strict=True):
            assert a.tobytes() == b.tobytes(), f"round {c.round}: a later round's velocity"


def test_resume_refuses_another_strategy_or_model(tmp_path: Path) -> None:
    ck = tmp_path / "ck.npz"
    initial = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]
    h = serve(None, workers=1, rounds=5, initial=initial, checkpoint=ck)
    try:
        _run_rounds(h, 1, np.random.default_rng(0))
    finally:
        h.stop()
    with pytest.raises(ValueError, match="--strategy fedavg, not fedadam"):
        serve(None, workers=1, strategy="fedadam", initial=initial, checkpoint=ck, resume=True)
    with pytest.raises(ValueError, match="not this run's model"):
        serve(None, workers=1, initial=[np.zeros(7, np.float32)], checkpoint=ck, resume=True)
    with pytest.raises(FileNotFoundError):
        serve(None, workers=1, checkpoint=tmp_path / "none.npz", resume=True)


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = tmp_path / "ck.npz"
    first = ckpt_io.Checkpoint(1, [np.ones(3, np.float32)], {}, {"strategy": "fedavg"})
    ckpt_io.save(ck, first)

    def crash(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.os, "replace", crash)
    with pytest.raises(OSError):
        ckpt_io.save(ck, ckpt_io.Checkpoint(2, [np.zeros(3, np.float32)], {}, {}))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.npz"]  # no temporary left behind
    kept = ckpt_io.load(ck)  # the old checkpoint, whole
    assert kept.round == 1 and kept.arrays[0].tobytes() == first.arrays[0].tobytes()


def test_a_corrupt_checkpoint_is_one_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "checkpoint.npz"
    bad.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match="is not a readable fedberry checkpoint"):
        ckpt_io.load(bad)
    np.savez(bad, other=np.zeros(2))  # a valid .npz, not ours
    with pytest.raises(ValueError, match="is not a readable fedberry checkpoint"):
        ckpt_io.load(bad)
