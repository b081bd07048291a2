"""Differential privacy (fedberry.privacy, docs/privacy.md): DP-FedAvg over real loopback TCP,
worker-side clipping with the codecs, local DP, adaptive clipping, --target-epsilon, --dp text.

Federations here are in-process: ``serve`` on 127.0.0.1 and ``Worker`` threads, tiny models.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
import pytest

import fedberry
from fedberry.chief.admission import update_norm
from fedberry.chief.model_file import load as load_model_file
from fedberry.privacy import DPConfig, DPFedAvg, parse_dp
from fedberry.protocol.messages import ProtocolError, Welcome, from_frame, to_frame

SHAPES = [(6, 5), (5,)]


def _initial() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _step(i: int, r: int, model: list[np.ndarray]) -> list[np.ndarray]:
    """Worker i's update in round r: the model moved by multiples of 1/4 (exact in float32, so
    that sums agree whatever order the updates arrive in)."""
    return [a + np.float32(0.25 * ((i + 1) * (j + 1) + r)) for j, a in enumerate(model)]


def federate(*, workers: int = 3, rounds: int = 3, dp: DPConfig | None = None,
             strategy: str | fedberry.strategies.Strategy = "fedavg", codec: str = "none",
             local_dp: DPConfig | None = None,
             step: Callable[[int, int, list[np.ndarray]], list[np.ndarray]] = _step,
             ) -> tuple[list[np.ndarray], list[dict], list[fedberry.Worker]]:
    """A TCP federation of ``workers`` threads; returns the final model, the metrics and the
    Worker objects (closed)."""
    handle = fedberry.serve("127.0.0.1:0", workers=workers, rounds=rounds, insecure=True,
                            initial=_initial(), strategy=strategy, dp=dp, finish_grace=2.0)
    errors: list[BaseException] = []
    done: list[fedberry.Worker] = []

    def run(i: int) -> None:
        try:
            w = fedberry.Worker(handle.url, worker_id=f"w{i}", codec=codec, local_dp=local_dp,
                                connect_timeout=30)
            model = w.join([np.zeros(s, np.float32) for s in SHAPES])
            r = 0
            while not w.done:
                model = w.sync(step(i, r, model), 10)
                r += 1
            w.close()
            done.append(w)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert handle.wait(20)
        return [np.array(a) for a in handle.chief.global_arrays], handle.metrics, done
    finally:
        handle.stop()


class Spy(DPFedAvg):
    """DP-FedAvg that records the norm of every update it folds in, against the round's model."""

    def __init__(self, config: DPConfig) -> None:
        super().__init__(config)
        self.folded: list[float] = []
        self.pre_clip: list[float] = []  # what the admission saw before clipping

    def begin_round(self, global_arrays) -> None:
        if self._admission is not None:
            self.pre_clip += self._admission.norms
        super().begin_round(global_arrays)

    def add(self, update, weight):
        self.folded.append(update_norm(update, self._mean.global_arrays))
        assert weight == 1.0  # uniform weights, whatever the sample count claimed
        return super().add(update, weight)


def test_noise_zero_and_a_large_clip_give_plain_fedavgs_model():
    # Two workers: a float32 sum of two is the same in either order, so the models can be
    # compared bit for bit (with three, the order updates arrive in shows in the last ulp).
    plain, _, _ = federate(workers=2)
    private, metrics, workers = federate(workers=2, dp=DPConfig(clip=1e6, noise=0.0))
    for a, b in zip(plain, private):
        np.testing.assert_array_equal(a, b)
    assert all(w.clip == 1e6 for w in workers)  # learned at join (where=worker)
    assert [m["dp_noise_std"] for m in metrics] == [0.0] * 3
    assert all(m["epsilon"] is None and "epsilon" in m["nonfinite"] for m in metrics)


@pytest.mark.parametrize("where,codec", [("chief", "none"), ("worker", "none"),
                                         ("worker", "q8")])
def test_with_clipping_every_update_folded_in_is_within_the_bound(where, codec):
    clip = 0.3
    spy = Spy(DPConfig(clip=clip, where=where))
    federate(strategy=spy, dp=spy.config, codec=codec)
    assert len(spy.folded) == 9
    assert max(spy.folded) <= clip * (1 + 1e-6), spy.folded
    assert min(spy.folded) > clip * 0.99  # every raw update is far larger: all were clipped
    if where == "worker" and codec == "none":
        # The workers clipped before sending: the chief never saw an unclipped update.
        assert spy.pre_clip and max(spy.pre_clip) <= clip * (1 + 1e-6), spy.pre_clip
    if where == "chief":
        assert min(spy.pre_clip) > 1.0  # the admission clipped them
    if codec == "q8":
        # Error feedback: what rounding lost is carried over, so the decoded update may exceed
        # C by that rounding error (never by the part clipping removed); the admission clips
        # it again.
        assert max(spy.pre_clip) < clip * 1.1, spy.pre_clip


def test_the_added_noise_has_the_configured_std():
    """N = 200 rounds x 35 coordinates = 7000 draws of N(0, s^2), s = z C / n. The sample std's
    standard error is s / sqrt(2 N) (1.2 % here): the test allows 5 of them, and 5 standard
    errors (s / sqrt(N)) for the mean. A wrong factor (C instead of C/n, n^2) fails by far."""
    pytest.importorskip("dp_accounting")  # result() reports epsilon
    z, c, n, rounds = 1.1, 0.5, 4, 200
    dp = DPFedAvg(DPConfig(clip=c, noise=z, seed=12345))
    dp.keep_noise = True
    model = [np.zeros(s, np.float32) for s in SHAPES]
    draws = []
    for _ in range(rounds):
        dp.begin_round(model)
        for _ in range(n):
            dp.add([a.copy() for a in model], 1.0)
        out = dp.result()
        draws.append(np.concatenate([a.ravel() for a in out]))  # the global model was 0
        np.testing.assert_allclose(draws[-1], np.concatenate([d.ravel() for d in dp.last_noise]),
                                   atol=1e-6)
    x = np.concatenate(draws).astype(np.float64)
    want = z * c / n
    assert dp.last_noise_std == pytest.approx(want)
    se = want / math.sqrt(2 * x.size)
    assert abs(x.std(ddof=1) - want) < 5 * se, (x.std(ddof=1), want)
    assert abs(x.mean()) < 5 * want / math.sqrt(x.size)
    # A fixed seed gives the same noise again; no seed gives fresh noise.
    again = DPFedAvg(DPConfig(clip=c, noise=z, seed=12345))
    again.begin_round(model)
    for _ in range(n):
        again.add([a.copy() for a in model], 1.0)
    np.testing.assert_array_equal(np.concatenate([a.ravel() for a in again.result()]), draws[0])


def test_epsilon_in_every_round_of_a_run_and_the_noise_std_recorded():
    pytest.importorskip("dp_accounting")
    from fedberry.privacy.accountant import epsilon

    dp = DPConfig(clip=0.5, noise=1.2, delta=1e-5, seed=1)
    _, metrics, _ = federate(dp=dp, rounds=3)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["epsilon"] == pytest.approx(epsilon(1.2, m["round"], 1e-5))
        assert m["dp_noise_std"] == pytest.approx(1.2 * 0.5 / 3)
        assert m["delta"] == 1e-5
    assert metrics[0]["epsilon"] < metrics[1]["epsilon"] < metrics[2]["epsilon"]


def test_target_epsilon_stops_the_run_at_the_last_round_within_budget(caplog):
    pytest.importorskip("dp_accounting")
    from fedberry.privacy.accountant import epsilon

    z, delta = 2.0, 1e-5
    target = (epsilon(z, 3, delta) + epsilon(z, 4, delta)) / 2  # round 4 would exceed it
    caplog.set_level("WARNING", logger="fedberry.privacy")
    _, metrics, _ = federate(dp=DPConfig(clip=0.5, noise=z, delta=delta, target_epsilon=target),
                             rounds=20, workers=2)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["epsilon"] <= target
    assert "the run stops after round 3, the last within budget" in caplog.text
    with pytest.raises(ValueError, match="even one round with noise 0.5 spends more"):
        fedberry.serve(None, rounds=5, dp=DPConfig(clip=1, noise=0.5, target_epsilon=0.1))


def test_local_dp_noises_each_workers_update_and_counts_its_own_epsilon():
    pytest.importorskip("dp_accounting")
    from fedberry.privacy.accountant import epsilon

    local = DPConfig(clip=0.2, noise=1.0, delta=1e-6, seed=5)
    final, _, workers = federate(workers=1, rounds=3, local_dp=local)
    (w,) = workers
    assert w.clip == 0.2  # the chief has no --dp: the worker's own bound
    assert w.epsilon == pytest.approx(epsilon(1.0, 3, 1e-6))
    # Three rounds of one worker: the model moved by three clipped, noised changes. With the
    # noise's std 0.2 on 35 coordinates, its norm is far above the 3 x 0.2 clipping allows.
    moved = update_norm(final, _initial())
    assert moved > 3 * 0.2


def test_adaptive_clipping_follows_the_quantile_of_the_norms():
    """Noise 0 (the count is exact): every update is within the bound while C > its norm, so
    b = 1 and C shrinks by exp(-clip_lr (1 - quantile)) a round (Andrew et al. 2021)."""
    dp = DPConfig(clip=50.0, where="chief", adaptive=True, quantile=0.5, clip_lr=0.2)
    _, metrics, _ = federate(dp=dp, rounds=4, workers=2)
    want = [50.0 * math.exp(-0.2 * 0.5) ** r for r in range(1, 5)]
    np.testing.assert_allclose([m["dp_clip"] for m in metrics], want, rtol=1e-12)


@pytest.mark.parametrize("text,sentence", [
    ("clip=1,nois=2", "--dp has no key 'nois'; its keys are clip, noise, delta, where"),
    ("noise=1.1", "--dp needs clip=C"),
    ("clip=-1", "dp: clip must be a positive number, not -1.0"),
    ("clip=1,noise=nan", "--dp: noise must be a finite number, not 'nan'"),
    ("clip=1,clip=2", "--dp: clip is given twice"),
    ("clip=1,delta", "--dp: give delta a value"),
    ("clip=1,where=there", "dp: where must be one of worker, chief, not 'there'"),
    ("clip=1,adaptive=true", "dp: adaptive clipping needs where=chief"),
    ("clip=1,noise=1,adaptive=true,where=chief", "needs count_noise above 0.5"),
])
def test_bad_dp_text_is_refused_with_a_sentence(text, sentence, capsys):
    with pytest.raises(ValueError) as info:
        parse_dp(text)
    assert sentence in str(info.value)
    from fedberry.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["chief", "--workers", "1", "--model", "none", "--dp", text])
    assert exit_.value.code == 2
    assert sentence in capsys.readouterr().err


def test_dp_text_round_trips_and_target_epsilon_needs_dp(capsys):
    dp = parse_dp("clip=1.5,noise=1.1,delta=1e-6,where=chief,seed=3")
    assert dp == DPConfig(clip=1.5, noise=1.1, delta=1e-6, where="chief", seed=3)
    assert parse_dp(dp.text()) == dp
    from fedberry.cli import main

    assert main(["chief", "--workers", "1", "--model", "none", "--target-epsilon", "3"]) == 2
    assert "--target-epsilon needs --dp" in capsys.readouterr().err


def test_welcome_carries_the_clipping_bound_and_refuses_a_bad_one():
    msg = from_frame(_decode(to_frame(Welcome(3, dp_clip=0.75))))
    assert msg.dp_clip == 0.75
    assert from_frame(_decode(to_frame(Welcome(3)))).dp_clip is None
    for bad in (-1.0, 0, math.inf, True, "1"):
        with pytest.raises(ProtocolError, match="dp_clip must be a positive number"):
            Welcome(3, dp_clip=bad)


def _decode(encoded):
    from fedberry.protocol.frames import FrameDecoder

    (frame,) = FrameDecoder().receive_data(encoded.tobytes())
    return frame


def test_the_torch_drop_in_learns_the_bound_at_join_and_clips_in_process():
    torch = pytest.importorskip("torch")
    from fedberry.torch import FederatedOptimizer

    model = torch.nn.Linear(4, 2)
    initial = [p.detach().numpy().copy() for p in model.parameters()]
    spy = Spy(DPConfig(clip=0.05, noise=0.0))
    handle = fedberry.serve(None, workers=1, rounds=2, strategy=spy, dp=spy.config,
                            initial=initial)
    try:
        opt = FederatedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model,
                                 chief=handle, sync_every=2)
        with opt:
            while not opt.done:
                opt.zero_grad()
                model(torch.ones(8, 4)).pow(2).sum().backward()
                opt.step()
        assert opt.worker.clip == 0.05  # in-process, the chief's bound reaches the worker too
    finally:
        handle.stop()
    assert len(spy.folded) == 2 and max(spy.folded) <= 0.05 * (1 + 1e-6)
    assert max(spy.pre_clip) <= 0.05 * (1 + 1e-6)  # clipped by the worker, before sending


def test_a_resumed_run_keeps_counting_its_privacy_budget(tmp_path):
    pytest.importorskip("dp_accounting")
    from fedberry.privacy.accountant import epsilon

    dp = DPConfig(clip=0.5, noise=1.5, where="chief", adaptive=True, count_noise=1.0, seed=2)
    ck = tmp_path / "ck.npz"
    handle = fedberry.serve(None, workers=1, rounds=2, dp=dp, initial=_initial(), checkpoint=ck,
                            out_dir=tmp_path / "out")
    w = fedberry.Worker(handle, worker_id="w0")
    model = w.join(_initial())
    while not w.done:
        model = w.sync(_step(0, 0, model), 10)
    w.close()
    handle.stop()
    clip_after_2 = handle.metrics[-1]["dp_clip"]
    # A DP run writes its model file too: the noised global model, as the worker received it.
    saved = list(load_model_file(tmp_path / "out" / "model.safetensors").values())
    for a, b in zip(saved, model, strict=True):
        np.testing.assert_array_equal(a, b)
    handle = fedberry.serve(None, workers=1, rounds=3, dp=dp, checkpoint=ck, resume=True,
                            initial=_initial())
    try:
        assert handle.chief.strategy.clip == clip_after_2  # the adaptive bound, restored
        w = fedberry.Worker(handle, worker_id="w0")
        model = w.join(_initial())
        while not w.done:
            model = w.sync(_step(0, 0, model), 10)
        w.close()
    finally:
        handle.stop()
    (last,) = handle.metrics
    assert last["round"] == 3 and last["epsilon"] == pytest.approx(epsilon(1.5, 3, 1e-5))


def test_a_tighter_operator_bound_stays_under_dp():
    spy = Spy(DPConfig(clip=1.0, where="chief"))
    handle = fedberry.serve(None, workers=1, rounds=1, strategy=spy, dp=spy.config,
                            initial=_initial(), max_update_norm=0.2)
    try:
        w = fedberry.Worker(handle, worker_id="w0")
        model = w.join(_initial())
        w.sync(_step(0, 0, model), 10)
        w.close()
    finally:
        handle.stop()
    assert spy.folded and max(spy.folded) <= 0.2 * (1 + 1e-6)
