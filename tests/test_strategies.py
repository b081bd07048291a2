import numpy as np
import pytest

from fedberry.strategies import FedAdam, FedAvg, FedAvgM, make_strategy


def _updates(rng, n=4):
    shapes = [(3, 5), (5,), (2, 2, 2)]
    return [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(n)]


def test_fedavg_is_the_sample_weighted_mean():
    rng = np.random.default_rng(0)
    glob = [np.zeros(s, np.float32) for s in [(3, 5), (5,), (2, 2, 2)]]
    ups = _updates(rng)
    ns = [10, 1, 300, 7]
    s = FedAvg()
    s.begin(glob)
    for u, n in zip(ups, ns):
        s.add([a.copy() for a in u], n)
    out = s.finish()
    for i in range(3):
        ref = sum(n * u[i].astype(np.float64) for u, n in zip(ups, ns)) / sum(ns)
        assert out[i].dtype == np.float32
        np.testing.assert_allclose(out[i], ref, rtol=1e-6, atol=1e-7)


def test_fedavg_order_does_not_matter_beyond_float32_rounding():
    rng = np.random.default_rng(1)
    glob = [np.zeros(s, np.float32) for s in [(3, 5), (5,), (2, 2, 2)]]
    ups = _updates(rng, 6)
    results = []
    for order in (range(6), reversed(range(6))):
        s = FedAvg()
        s.begin(glob)
        for i in order:
            s.add([x.copy() for x in ups[i]], i + 1)
        results.append(s.finish())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_integer_tensors_are_rounded_back():
    s = FedAvg()
    s.begin([np.array([0], np.int64)])
    s.add([np.array([3], np.int64)], 1)
    s.add([np.array([4], np.int64)], 2)
    out = s.finish()
    assert out[0].dtype == np.int64 and out[0][0] == 4  # 11/3 = 3.67 -> 4


def test_fedavgm_without_momentum_and_unit_lr_is_fedavg():
    rng = np.random.default_rng(2)
    glob = [rng.standard_normal((4, 4)).astype(np.float32)]
    ups = [[rng.standard_normal((4, 4)).astype(np.float32)] for _ in range(3)]
    a, b = FedAvg(), FedAvgM(server_lr=1.0, momentum=0.0)
    for s in (a, b):
        s.begin(glob)
        for u in ups:
            s.add([x.copy() for x in u], 2)  # add() may scale its input in place
    np.testing.assert_allclose(a.finish()[0], b.finish()[0], rtol=1e-6)


def test_fedavgm_momentum_accumulates_and_round_trips_state():
    glob = [np.zeros(3, np.float32)]
    s = FedAvgM(server_lr=1.0, momentum=0.5)
    s.begin(glob)
    s.add([np.ones(3, np.float32)], 1)
    g1 = s.finish()  # v = -1, g = 0 - (-1) = 1
    np.testing.assert_allclose(g1[0], 1.0)
    s.begin(g1)
    s.add([np.ones(3, np.float32)], 1)
    g2 = s.finish()  # v = 0.5*-1 + 0 = -0.5, g = 1 + 0.5
    np.testing.assert_allclose(g2[0], 1.5)
    t = FedAvgM(server_lr=1.0, momentum=0.5)
    t.load_state_dict(s.state_dict())
    np.testing.assert_allclose(t.state_dict()["velocity.0"], -0.5)


def test_fedadam_moves_towards_the_mean():
    glob = [np.zeros(2, np.float32)]
    s = FedAdam(server_lr=0.1)
    s.begin(glob)
    s.add([np.array([1.0, -1.0], np.float32)], 1)
    out = s.finish()[0]
    assert out[0] > 0 > out[1]
    assert set(s.state_dict()) == {"m.0", "v.0"}


def test_bad_inputs():
    s = FedAvg()
    s.begin([np.zeros(1, np.float32)])
    with pytest.raises(ValueError):
        s.add([np.zeros(1, np.float32)], 0)
    with pytest.raises(RuntimeError):
        s.finish()
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("median-of-nothing")


def test_median_ignores_a_minority_of_poisoned_updates():
    rng = np.random.default_rng(3)
    honest = [[rng.normal(1.0, 0.01, (4, 3)).astype(np.float32)] for _ in range(3)]
    poisoned = [[np.full((4, 3), 1e6, np.float32)] for _ in range(2)]
    s = make_strategy("median")
    s.begin([np.zeros((4, 3), np.float32)])
    for u in honest:
        s.add(u, 1)
    for u in poisoned:
        s.add(u, 1_000_000)  # a huge claimed count buys nothing
    out = s.finish()[0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.median(np.stack([u[0] for u in honest + poisoned]), 0))
    assert np.abs(out - 1.0).max() < 0.05


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    vals = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]], np.float32)
    s = make_strategy("trimmed_mean")  # trim 0.1 of 5 updates: nothing dropped
    s.begin([np.zeros(1, np.float32)])
    for v in vals:
        s.add([v], 1)
    np.testing.assert_allclose(s.finish()[0], vals.mean())
    from fedberry.strategies import TrimmedMean

    t = TrimmedMean(trim=0.2)  # one of five dropped at each end: mean of 1, 2, 3
    t.begin([np.zeros(1, np.float32)])
    for v in vals:
        t.add([v], 1)
    np.testing.assert_allclose(t.finish()[0], 2.0)
    with pytest.raises(ValueError):
        TrimmedMean(trim=0.5)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "median", "trimmed_mean"])
def test_zero_dim_tensors_average_over_every_update(name):
    # A BatchNorm step counter is a 0-d int64: numpy hands back scalars for 0-d results, and a
    # running sum kept in one counted only the first update.
    strategy = make_strategy(name)
    strategy.begin([np.array(0, np.int64), np.array(0.0, np.float32)])
    for v, n in [(10, 1.0), (20, 1.0), (30, 2.0)]:
        strategy.add([np.array(v, np.int64), np.array(float(v), np.float32)], n)
    counter, value = strategy.finish()
    assert isinstance(counter, np.ndarray) and counter.shape == () and counter.dtype == np.int64
    assert isinstance(value, np.ndarray) and value.shape == ()
    if name in ("fedavg", "fedavgm"):
        assert counter == 22  # (10 + 20 + 2 * 30) / 4 = 22.5, rounded half to even
    else:
        assert 10 <= counter <= 30


def test_fedavg_gives_back_the_buffers_it_does_not_keep():
    s = FedAvg()
    s.begin([np.zeros(3, np.float32), np.zeros(1, np.int64)])
    first = [np.ones(3, np.float32), np.array([2], np.int64)]
    assert [x is first[1] for x in s.add(first, 2)] == [True]  # the float32 one is the sum
    second = [np.full(3, 4, np.float32), np.array([5], np.int64)]
    spare = s.add(second, 2)
    assert len(spare) == 1 and spare[0] is second[0]
    out = s.finish()
    assert out[0] is first[0]
    np.testing.assert_allclose(out[0], 2.5)
    assert out[1][0] == 4  # 3.5 rounded half to even


@pytest.mark.parametrize("ns", [[1, 1, 1], [3, 3], [1e-6, 5, 2], [2e30, 1e-30], [0.25, 0.25]])
def test_fedavg_equal_and_unequal_weights_and_extreme_ones(ns):
    rng = np.random.default_rng(3)
    ups = [[rng.standard_normal(50).astype(np.float32)] for _ in ns]
    s = FedAvg()
    s.begin([np.zeros(50, np.float32)])
    for u, n in zip(ups, ns):
        s.add([u[0].copy()], n)
    out = s.finish()[0]
    ref = sum(n * u[0].astype(np.float64) for u, n in zip(ups, ns)) / sum(ns)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
