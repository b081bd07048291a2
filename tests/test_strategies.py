"""Each aggregation rule against an independent numpy implementation of its paper's equations,
over several rounds; the interface's contracts (buffers given back, state saved and refused);
``--strategy`` text parsed and printed back; checkpoints that record the strategy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedberry.chief import checkpoint as ckpt_io
from fedberry.chief.resume import check_resumable
from fedberry.protocol.frames import spec_of
from fedberry.strategies import (
    STRATEGIES,
    FedAdam,
    FedAvg,
    FedAvgM,
    Median,
    Strategy,
    StrategyState,
    TrimmedMean,
    describe,
    make_strategy,
    parse,
)

SHAPES = [(3, 5), (5,), (2, 2, 2)]


def _rounds(seed: int, rounds: int = 4, workers: int = 4):
    """Per round, per worker: (weights as offsets from the global model, sample count)."""
    rng = np.random.default_rng(seed)
    return [[([rng.standard_normal(s) for s in SHAPES], float(rng.integers(1, 50)))
             for _ in range(workers)] for _ in range(rounds)]


def _drive(strategy, initial, rounds):
    """Run ``strategy`` over the rounds; every worker sends global + its offset, in float32."""
    glob = [a.copy() for a in initial]
    models = []
    for updates in rounds:
        strategy.begin_round(glob)
        for offsets, n in updates:
            strategy.add([(g + o).astype(np.float32) for g, o in zip(glob, offsets)], n)
        glob = strategy.result()
        models.append(glob)
    return models


def _reference(step, initial, rounds, combine=None):
    """The paper's rule written out in float64; the model is float32, so it is rounded to
    float32 after each round as the chief's is. ``step(x, aggregate, t) -> new x``."""
    x = [a.astype(np.float64) for a in initial]
    models = []
    for t, updates in enumerate(rounds, start=1):
        sent = [[(xi.astype(np.float32) + o).astype(np.float32).astype(np.float64)
                 for xi, o in zip(x, offsets)] for offsets, _ in updates]
        ns = [n for _, n in updates]
        if combine is None:  # McMahan et al. 2017, Algorithm 1: sum_k n_k / n * w_k
            agg = [sum(n * s[i] for n, s in zip(ns, sent)) / sum(ns) for i in range(len(x))]
        else:
            agg = [combine(np.stack([s[i] for s in sent])) for i in range(len(x))]
        x = [xi.astype(np.float32).astype(np.float64) for xi in step(x, agg, t)]
        models.append([xi.astype(np.float32) for xi in x])
    return models


def _initial(seed=7):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _assert_models(got, want, rtol=2e-5, atol=2e-6):
    assert len(got) == len(want)
    for g_round, w_round in zip(got, want):
        for g, w in zip(g_round, w_round):
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


# -- each rule against its paper -------------------------------------------------------------
def test_fedavg_is_the_sample_weighted_mean_over_rounds():
    rounds = _rounds(0)
    _assert_models(_drive(FedAvg(), _initial(), rounds),
                   _reference(lambda x, mean, t: mean, _initial(), rounds))


@pytest.mark.parametrize("lr,momentum", [(1.0, 0.9), (0.5, 0.0), (2.0, 0.99)])
def test_fedavgm_is_hsu_et_al_server_momentum(lr, momentum):
    rounds = _rounds(1)
    v = [np.zeros(s) for s in SHAPES]

    def step(x, mean, t):  # Hsu et al. 2019: v <- beta v + (x - mean); x <- x - eta v
        for i in range(len(x)):
            v[i] = momentum * v[i] + (x[i] - mean[i])
        return [x[i] - lr * v[i] for i in range(len(x))]

    _assert_models(_drive(FedAvgM(lr=lr, momentum=momentum), _initial(), rounds),
                   _reference(step, _initial(), rounds))


@pytest.mark.parametrize("params", [dict(lr=0.05, tau=1e-4), dict(lr=0.3, beta1=0.5, beta2=0.9,
                                                                  tau=1e-2)])
def test_fedadam_without_bias_correction_is_reddi_et_al_algorithm_2(params):
    rounds = _rounds(2, rounds=5)
    p = dict(dict(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3), **params)
    m = [np.zeros(s) for s in SHAPES]
    v = [np.full(s, p["tau"] ** 2) for s in SHAPES]  # v_{-1} >= tau^2

    def step(x, mean, t):
        out = []
        for i in range(len(x)):
            delta = mean[i] - x[i]
            m[i] = p["beta1"] * m[i] + (1 - p["beta1"]) * delta
            v[i] = p["beta2"] * v[i] + (1 - p["beta2"]) * delta ** 2
            out.append(x[i] + p["lr"] * m[i] / (np.sqrt(v[i]) + p["tau"]))
        return out

    _assert_models(_drive(FedAdam(**params), _initial(), rounds),
                   _reference(step, _initial(), rounds))


def test_fedadam_with_bias_correction_is_adams_as_flower_applies_it():
    rounds = _rounds(3, rounds=5)
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-4
    m = [np.zeros(s) for s in SHAPES]
    v = [np.zeros(s) for s in SHAPES]

    def step(x, mean, t):
        # Kingma & Ba 2015 sec. 2: eta_t = eta sqrt(1 - b2^t) / (1 - b1^t), moments from 0.
        eta_t = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        out = []
        for i in range(len(x)):
            delta = mean[i] - x[i]
            m[i] = b1 * m[i] + (1 - b1) * delta
            v[i] = b2 * v[i] + (1 - b2) * delta ** 2
            out.append(x[i] + eta_t * m[i] / (np.sqrt(v[i]) + tau))
        return out

    got = _drive(FedAdam(lr=lr, tau=tau, bias_correction=True), _initial(), rounds)
    _assert_models(got, _reference(step, _initial(), rounds))
    # And it is a different rule: the first step is 1 / (1 - b1) = 10x the uncorrected one.
    plain = _drive(FedAdam(lr=lr, tau=tau), _initial(), rounds[:1])
    assert not np.allclose(plain[0][0], got[0][0], rtol=1e-3)


def _median_ref(stacked):
    # Per coordinate, written out: the middle value, or the mean of the two middle ones.
    flat = stacked.reshape(len(stacked), -1)
    out = []
    for j in range(flat.shape[1]):
        col = sorted(flat[:, j])
        k = len(col)
        out.append(col[k // 2] if k % 2 else (col[k // 2 - 1] + col[k // 2]) / 2)
    return np.array(out).reshape(stacked.shape[1:])


def _trimmed_ref(trim):
    def combine(stacked):
        flat = stacked.reshape(len(stacked), -1)
        out = []
        for j in range(flat.shape[1]):
            col = sorted(flat[:, j])
            kept = col[trim:len(col) - trim]  # Yin et al. 2018: drop beta*m at each end
            out.append(sum(kept) / len(kept))
        return np.array(out).reshape(stacked.shape[1:])
    return combine


@pytest.mark.parametrize("workers", [4, 5])
def test_median_is_the_coordinatewise_median_whatever_the_weights(workers):
    rounds = _rounds(4, workers=workers)
    _assert_models(_drive(Median(), _initial(), rounds),
                   _reference(lambda x, agg, t: agg, _initial(), rounds, _median_ref))


@pytest.mark.parametrize("trim,workers", [(1, 3), (1, 5), (2, 5), (0, 4)])
def test_trimmed_mean_drops_trim_updates_at_each_end(trim, workers):
    rounds = _rounds(5, workers=workers)
    _assert_models(_drive(TrimmedMean(trim=trim), _initial(), rounds),
                   _reference(lambda x, agg, t: agg, _initial(), rounds, _trimmed_ref(trim)))


def test_trimmed_mean_with_too_few_updates_keeps_the_middle_one():
    s = TrimmedMean(trim=2)
    s.begin_round([np.zeros(1, np.float32)])
    for v in (0.0, 1.0, 100.0):  # 2 at each end would leave nothing: 1 at each end goes
        s.add([np.array([v], np.float32)], 1)
    np.testing.assert_allclose(s.result()[0], 1.0)


def test_robust_rules_ignore_a_minority_of_poisoned_updates():
    rng = np.random.default_rng(3)
    honest = [[rng.normal(1.0, 0.01, (4, 3)).astype(np.float32)] for _ in range(3)]
    poisoned = [[np.full((4, 3), 1e6, np.float32)] for _ in range(2)]
    for s in (Median(), TrimmedMean(trim=2)):
        s.begin_round([np.zeros((4, 3), np.float32)])
        for u in honest:
            s.add([u[0].copy()], 1)
        for u in poisoned:
            s.add([u[0].copy()], 1_000_000)  # a huge claimed count buys nothing
        out = s.result()[0]
        assert out.dtype == np.float32 and np.abs(out - 1.0).max() < 0.05


# -- the interface's contracts ---------------------------------------------------------------
def test_every_rule_implements_the_interface():
    for name, cls in STRATEGIES.items():
        s = cls()
        assert isinstance(s, Strategy) and s.name == name
        json.dumps(s.params())  # JSON-able: it goes into checkpoints and run.json
        assert s.needs_all_updates == (name in ("median", "trimmed_mean"))
        assert not any(issubclass(cls, other) for other in STRATEGIES.values() if other is not cls)


def test_fedavg_sums_in_float32_for_float32_models_and_float64_for_integers():
    s = FedAvg()
    s.begin_round([np.zeros(3, np.float32), np.zeros(1, np.int64)])
    first = [np.ones(3, np.float32), np.array([2], np.int64)]
    assert [x is first[1] for x in s.add(first, 2)] == [True]  # the float32 one is the sum
    second = [np.full(3, 4, np.float32), np.array([5], np.int64)]
    spare = s.add(second, 2)
    assert len(spare) == 1 and spare[0] is second[0]  # given back for the next update
    out = s.result()
    assert out[0] is first[0] and out[0].dtype == np.float32  # summed in place, in float32
    np.testing.assert_allclose(out[0], 2.5)
    assert out[1][0] == 4  # 3.5 rounded half to even


def test_fedavg_order_does_not_matter_beyond_float32_rounding():
    rng = np.random.default_rng(1)
    ups = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(6)]
    results = []
    for order in (range(6), reversed(range(6))):
        s = FedAvg()
        s.begin_round([np.zeros(s_, np.float32) for s_ in SHAPES])
        for i in order:
            s.add([x.copy() for x in ups[i]], i + 1)
        results.append(s.result())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# [1e-300, 1e-300]: a round of tiny weights (liars, or a bug) once summed to 0 x inf = NaN;
# [1e-30, 2e30]: the heavy update second, so the sum moves to its unit mid-round.
@pytest.mark.parametrize("ns", [[1, 1, 1], [3, 3], [1e-6, 5, 2], [2e30, 1e-30], [0.25, 0.25],
                                [1e-300, 1e-300], [1e-300, 3e-300, 2e-300], [1e-30, 2e30],
                                [1, 2, 4, 8]])
def test_fedavg_equal_and_unequal_weights_and_extreme_ones(ns):
    rng = np.random.default_rng(3)
    ups = [rng.standard_normal(50).astype(np.float32) for _ in ns]
    s = FedAvg()
    s.begin_round([np.zeros(50, np.float32)])
    for u, n in zip(ups, ns):
        s.add([u.copy()], n)
    out = s.result()[0]
    ref = sum(n * u.astype(np.float64) for u, n in zip(ups, ns)) / sum(ns)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_zero_dim_tensors_average_over_every_update(name):
    # A BatchNorm step counter is a 0-d int64: numpy hands back scalars for 0-d results, and a
    # running sum kept in one counted only the first update.
    strategy = make_strategy(name)
    strategy.begin_round([np.array(0, np.int64), np.array(0.0, np.float32)])
    for v, n in [(10, 1.0), (20, 1.0), (30, 2.0)]:
        strategy.add([np.array(v, np.int64), np.array(float(v), np.float32)], n)
    counter, value = strategy.result()
    assert isinstance(counter, np.ndarray) and counter.shape == () and counter.dtype == np.int64
    assert isinstance(value, np.ndarray) and value.shape == ()
    if name in ("fedavg", "fedavgm", "fedadam"):
        assert counter == 22  # (10 + 20 + 2 * 30) / 4 = 22.5, rounded half to even
    else:
        assert counter == 20


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_bad_weights_and_empty_rounds_are_refused(name):
    s = make_strategy(name)
    s.begin_round([np.zeros(1, np.float32)])
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight must be a positive number"):
            s.add([np.zeros(1, np.float32)], bad)
    with pytest.raises(RuntimeError, match="no update"):
        s.result()


@pytest.mark.parametrize("make", [lambda: FedAvgM(lr=0.7, momentum=0.5),
                                  lambda: FedAdam(lr=0.05, tau=1e-4),
                                  lambda: FedAdam(lr=0.05, bias_correction=True)])
def test_state_saved_midway_continues_bit_exact(make):
    rounds = _rounds(6, rounds=4)
    whole = _drive(make(), _initial(), rounds)
    first = make()
    half = _drive(first, _initial(), rounds[:2])
    second = make()
    second.load_state_dict(first.state_dict())
    rest = _drive(second, half[-1], rounds[2:])
    for a_round, b_round in zip(whole[2:], rest):
        for a, b in zip(a_round, b_round):
            assert a.tobytes() == b.tobytes()


def test_load_state_dict_refuses_another_rule_or_other_hyperparameters():
    adam = FedAdam(lr=0.05, tau=1e-4)
    _drive(adam, _initial(), _rounds(0, rounds=1))
    state = adam.state_dict()
    with pytest.raises(ValueError, match=r"saved by the strategy fedadam:lr=0.05,.*tau=0.0001"
                                         r".*not by fedavgm:lr=1.0,momentum=0.9"):
        FedAvgM().load_state_dict(state)
    with pytest.raises(ValueError, match="not by fedadam:lr=0.01"):
        FedAdam(lr=0.01, tau=1e-4).load_state_dict(state)
    with pytest.raises(ValueError, match="not by fedavg"):
        FedAvg().load_state_dict(state)
    # A state of before names were recorded: only its arrays' names can tell.
    anonymous = StrategyState(None, None, {"velocity.0": np.zeros(3)})
    with pytest.raises(ValueError, match="holds 'velocity.0', but fedadam:.* saves m.\\*"):
        FedAdam().load_state_dict(anonymous)
    FedAvgM().load_state_dict(anonymous)
    stepless = StrategyState("fedadam", None, {"m.0": np.zeros(3), "v.0": np.zeros(3)})
    FedAdam().load_state_dict(stepless)
    with pytest.raises(ValueError, match="bias_correction=false"):
        FedAdam(bias_correction=True).load_state_dict(stepless)


@pytest.mark.parametrize("kwargs,match", [
    (dict(cls=FedAvgM, lr=0), "lr must be a positive number"),
    (dict(cls=FedAvgM, momentum=1.0), r"momentum must be in \[0, 1\)"),
    (dict(cls=FedAdam, tau=0), "tau must be a positive number"),
    (dict(cls=FedAdam, beta2=-0.1), r"beta2 must be in \[0, 1\)"),
    (dict(cls=FedAdam, lr=float("nan")), "lr must be a positive number"),
    (dict(cls=FedAdam, bias_correction=1), "bias_correction must be true or false"),
    (dict(cls=TrimmedMean, trim=0.5), r"trim as a fraction must be in \(0, 0.5\)"),
    (dict(cls=TrimmedMean, trim="1"), "trim must be a whole number of updates"),
    (dict(cls=TrimmedMean, trim=-1), "trim must be a whole number of updates"),
])
def test_constructors_check_their_arguments(kwargs, match):
    cls = kwargs.pop("cls")
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
    with pytest.raises(TypeError):
        cls(0.1)  # keyword-only: a positional number means nothing readable


# -- --strategy text -------------------------------------------------------------------------
def test_parse_types_values_from_the_constructor():
    s = parse("fedadam:lr=0.05,tau=1e-4")
    assert isinstance(s, FedAdam) and (s.lr, s.tau, s.beta1) == (0.05, 1e-4, 0.9)
    assert parse("trimmed_mean:trim=1").trim == 1
    assert parse("fedadam:bias_correction=true").bias_correction is True
    assert parse(" FedAvgM : momentum = 0.5 ").momentum == 0.5
    for cls in STRATEGIES.values():
        s = cls()
        assert parse(describe(s)).params() == s.params()
    assert describe(parse("fedavg")) == "fedavg"
    odd = FedAdam(lr=0.123456789, beta1=0.0, tau=3e-7, bias_correction=True)
    assert parse(describe(odd)).params() == odd.params()  # floats print back exactly


unit = st.floats(0, 1, exclude_max=True)
positive = st.floats(1e-12, 1e6)


@given(st.one_of(
    st.builds(FedAvgM, lr=positive, momentum=unit),
    st.builds(FedAdam, lr=positive, beta1=unit, beta2=unit, tau=positive,
              bias_correction=st.booleans()),
    st.builds(TrimmedMean, trim=st.integers(0, 10**6))))
def test_describe_prints_back_what_parse_reads(strategy):
    again = parse(describe(strategy))
    assert type(again) is type(strategy) and again.params() == strategy.params()


@pytest.mark.parametrize("text,match", [
    ("fedsgd", "unknown strategy 'fedsgd'; choose from fedadam, fedavg, fedavgm, median, "
               "trimmed_mean"),
    ("fedadam:eta=0.1", "strategy fedadam has no hyperparameter 'eta'; its keys are lr, beta1, "
                        "beta2, tau, bias_correction"),
    ("fedavg:lr=1", "strategy fedavg takes no hyperparameters, so not 'lr'"),
    ("fedadam:lr=fast", "strategy fedadam: lr must be a finite number, not 'fast'"),
    ("fedadam:lr=inf", "lr must be a finite number"),
    ("trimmed_mean:trim=few", "strategy trimmed_mean: trim must be a whole number or a "
                              "fraction, not 'few'"),
    ("trimmed_mean:trim=0.6", r"trim as a fraction must be in \(0, 0.5\)"),
    ("fedadam:bias_correction=maybe", "bias_correction must be true or false, not 'maybe'"),
    ("fedadam:lr", "give lr a value, as lr=VALUE"),
    ("fedadam:lr=1,lr=2", "lr is given twice"),
    ("fedavgm:momentum=1.5", r"momentum must be in \[0, 1\)"),
])
def test_parse_errors_say_what_is_allowed(text, match):
    with pytest.raises(ValueError, match=match):
        parse(text)


def test_make_strategy_takes_text_or_an_object():
    obj = FedAdam(lr=0.05)
    assert make_strategy(obj) is obj
    assert isinstance(make_strategy("median"), Median)
    with pytest.raises(TypeError, match="Strategy interface"):
        make_strategy(3)  # type: ignore[arg-type]


# -- checkpoints and resume ------------------------------------------------------------------
def test_checkpoint_records_the_strategy_and_resume_checks_it(tmp_path: Path):
    ck = tmp_path / "ck.npz"
    adam = FedAdam(lr=0.05, tau=1e-4)
    model = _drive(adam, _initial(), _rounds(0, rounds=2))[-1]
    ckpt_io.save(ck, ckpt_io.Checkpoint(2, model, adam.state_dict(), {"strategy": "fedadam"}))
    header = json.loads(np.load(ck)["header"].tobytes())
    assert header["strategy"] == {"name": "fedadam", "params": adam.params()}
    loaded = ckpt_io.load(ck)
    assert loaded.strategy.name == "fedadam" and loaded.strategy.params == adam.params()
    check_resumable(loaded, ck, FedAdam(lr=0.05, tau=1e-4), spec_of(model))
    with pytest.raises(ValueError, match=f"--resume: {ck} was written by a run with --strategy "
                       r"fedadam:lr=0.05,beta1=0.9,beta2=0.99,tau=0.0001,bias_correction=false,"
                       " not fedadam:lr=0.01,"):
        check_resumable(loaded, ck, FedAdam(lr=0.01, tau=1e-4), spec_of(model))
    with pytest.raises(ValueError, match="--strategy fedadam:.*, not fedavgm:lr=1.0"):
        check_resumable(loaded, ck, FedAvgM(), None)
    with pytest.raises(ValueError, match="not this run's model"):
        check_resumable(loaded, ck, FedAdam(lr=0.05, tau=1e-4), spec_of([np.zeros(2)]))
    fresh = FedAdam(lr=0.05, tau=1e-4)
    fresh.load_state_dict(loaded.strategy_state)
    assert fresh.state_dict().arrays["step"] == 2


def test_a_checkpoint_of_before_the_strategy_was_recorded_still_resumes(tmp_path: Path):
    # The format of before: no "strategy" in the header, the name in config, bare arrays.
    ck = tmp_path / "old.npz"
    header = {"round": 3, "tensors": 1, "config": {"strategy": "fedavgm"}}
    np.savez(ck, **{"global.0": np.ones(3, np.float32),
                    "strategy.velocity.0": np.full(3, 0.5),
                    "header": np.frombuffer(json.dumps(header).encode(), np.uint8)})
    old = ckpt_io.load(ck)
    assert old.round == 3 and old.strategy.name == "fedavgm" and old.strategy.params is None
    check_resumable(old, ck, FedAvgM(momentum=0.5), spec_of([np.ones(3, np.float32)]))
    s = FedAvgM(momentum=0.5)
    s.load_state_dict(old.strategy_state)
    np.testing.assert_array_equal(s.state_dict().arrays["velocity.0"], 0.5)
    with pytest.raises(ValueError, match="--strategy fedavgm, not fedadam"):
        check_resumable(old, ck, FedAdam(), None)


@pytest.mark.parametrize("make", [lambda: FedAvgM(), lambda: FedAdam()], ids=["fedavgm", "fedadam"])
def test_state_of_another_model_is_refused_not_truncated(make: Any) -> None:
    s = make()
    one = [np.zeros(3, np.float32)]
    s.begin_round(one)
    s.add([np.ones(3, np.float32)], 1.0)
    s.result()  # the state now fits a 1-tensor model
    two = [np.zeros(3, np.float32), np.zeros((2, 2), np.float32)]
    s.begin_round(two)
    s.add([np.ones(3, np.float32), np.ones((2, 2), np.float32)], 1.0)
    with pytest.raises(ValueError, match="state of another model"):
        s.result()
