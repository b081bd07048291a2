"""Client sampling: each round draws its workers reproducibly from the seed, the others stay
connected and idle (heartbeats keep them), quorum and deadline apply to the drawn ones, and a
short run with 3 of 10 workers a round reaches the accuracy of full participation. The round
machine is driven directly for the edge cases; the runs are 10 worker threads over loopback."""

import threading
import time

import numpy as np
import pytest

from fedberry import Worker, serve
from fedberry.chief.sampling import SamplingPolicy
from fedberry.chief.state import Chief, ChiefConfig, RoundClosed, SendGlobal
from fedberry.protocol.frames import spec_of

MODEL = [np.zeros(2, np.float32)]
SPEC = spec_of(MODEL)


def _sent(actions) -> set[str]:
    return {w for a in actions if isinstance(a, SendGlobal) for w in a.worker_ids}


def _chief(n_members: int, **config) -> tuple[Chief, set[str]]:
    chief = Chief(ChiefConfig(**config), initial=[a.copy() for a in MODEL])
    sent: set[str] = set()
    for i in range(n_members):
        sent |= _sent(chief.join(f"w{i}", SPEC, 0.0))
    return chief, sent


def test_draws_are_a_function_of_seed_round_and_ids():
    ids = [f"w{i}" for i in range(10)]
    p = SamplingPolicy(sample=3, seed=7)
    draws = [p.draw(ids, r)[0] for r in range(20)]
    assert all(len(d) == 3 for d in draws)
    assert draws == [p.draw(reversed(ids), r)[0] for r in range(20)]  # order does not matter
    assert len(set(draws)) > 10  # rounds differ
    assert draws != [SamplingPolicy(sample=3, seed=8).draw(ids, r)[0] for r in range(20)]
    assert p.draw(ids, 0)[1] == pytest.approx(0.3)
    assert SamplingPolicy(fraction=0.25).draw(ids, 0)[0].__len__() == 2  # round(2.5) = 2
    q = SamplingPolicy(fraction=0.3, poisson=True, seed=1)
    sizes = [len(q.draw(ids, r)[0]) for r in range(400)]
    assert q.poisson_rate == 0.3 and q.draw(ids, 0)[1] == 0.3
    assert abs(np.mean(sizes) - 3.0) < 0.3 and len(set(sizes)) > 3  # Binomial(10, 0.3)
    for bad, why in [(dict(sample=0), "--sample"), (dict(fraction=1.5), "--fraction"),
                     (dict(sample=2, fraction=0.5), "not both"), (dict(poisson=True), "--poisson")]:
        with pytest.raises(ValueError, match=why):
            SamplingPolicy(**bad)
    with pytest.raises(ValueError, match="cannot exceed --sample"):
        ChiefConfig(workers=5, min_workers=3, sampling=SamplingPolicy(sample=2))


def test_only_the_drawn_get_the_model_and_the_round_waits_for_them_alone():
    chief, sent = _chief(6, workers=6, rounds=3, sampling=SamplingPolicy(sample=2, seed=3))
    assert sent == set(chief.sampled) and len(sent) == 2  # drawn once the barrier is met
    assert chief.idle == set(chief.members) - sent
    first = set(chief.sampled)
    actions = []
    for w in sorted(first):
        actions += chief.update(w, 0, 1.0, [np.ones(2, np.float32)], {}, 1.0)
    (rc,) = [a for a in actions if isinstance(a, RoundClosed)]
    assert rc.workers == 2 and rc.sampled == 2 and rc.sample_rate == pytest.approx(2 / 6)
    # The next round's workers get its model, whether they trained last round or sat idle.
    assert _sent(actions) == set(chief.sampled)
    # An update from a worker the round did not draw does not count.
    idle = sorted(set(chief.members) - set(chief.sampled))[0]
    out = chief.update(idle, 1, 1.0, [np.ones(2, np.float32)], {}, 2.0)
    assert not any(isinstance(a, RoundClosed) for a in out) and idle not in _sent(out)


def test_a_round_whose_drawn_workers_all_leave_is_drawn_again():
    chief, _ = _chief(5, workers=5, rounds=2, sampling=SamplingPolicy(sample=2, seed=0))
    first = sorted(chief.sampled)
    chief.leave(first[0], 1.0)
    actions = chief.leave(first[1], 1.0)
    assert chief.sampled and not set(chief.sampled) & set(first)
    assert _sent(actions) == set(chief.sampled) and chief.round == 0


def test_quorum_and_deadline_count_the_drawn_workers():
    chief, _ = _chief(6, workers=6, rounds=2, min_workers=2, round_timeout=10.0,
                      sampling=SamplingPolicy(sample=3, seed=5))
    drawn = sorted(chief.sampled)
    assert not chief.update(drawn[0], 0, 1.0, [np.ones(2, np.float32)], {}, 1.0)
    assert not any(isinstance(a, RoundClosed) for a in chief.tick(11.0))  # 1 < quorum 2
    out = chief.update(drawn[1], 0, 1.0, [np.ones(2, np.float32)], {}, 12.0)
    (rc,) = [a for a in out if isinstance(a, RoundClosed)]
    assert rc.workers == 2 and rc.sampled == 3


def test_a_poisson_draw_of_nobody_closes_the_round_unchanged():
    # A rate of 0.05 over 2 workers draws nobody most rounds: those close at once.
    policy = SamplingPolicy(fraction=0.05, poisson=True, seed=2)
    first = next(r for r in range(30) if policy.draw(["w0", "w1"], r)[0])
    assert first > 0  # the premise: some rounds draw nobody
    chief, sent = _chief(2, workers=2, rounds=30, sampling=policy)
    # The first draw, of nobody, closed round 1; the next draw waits for a tick a second on
    # (no round timeout): the machine asks for it with wake_at, and an early tick does nothing.
    assert chief.round == 1 and chief.sampled is None and chief.wake_at == 1.0
    assert chief.tick(0.5) == [] and chief.round == 1
    now = 0.0
    while chief.sampled is None:
        now = chief.wake_at
        sent |= _sent(chief.tick(now))
    assert chief.round == first and now == first and sent == set(chief.sampled)
    np.testing.assert_array_equal(chief.global_arrays[0], MODEL[0])
    # Before any round with workers: a second, at most the round timeout (not the timeout
    # itself: tests/test_empty_round.py).
    timed, _ = _chief(2, workers=2, rounds=30, round_timeout=7.0, sampling=policy)
    assert timed.round == 1 and timed.wake_at == 1.0
    short, _ = _chief(2, workers=2, rounds=30, round_timeout=0.5, sampling=policy)
    assert short.round == 1 and short.wake_at == 0.5


def test_a_run_that_draws_nobody_writes_a_line_a_second_not_a_flood(tmp_path):
    # A rate so small that no round draws the one worker: before the wait between empty
    # draws, the rounds closed in a tight loop on the chief's thread (a line each, thousands
    # a second; without rounds, for ever). A bound on rounds lets the old behaviour end.
    handle = serve("127.0.0.1:0", workers=1, rounds=10 ** 5, token="t", fraction=1e-12,
                   poisson=True, initial=[np.zeros(DIM, np.float32)], out_dir=str(tmp_path))
    w = Worker(handle.url, token="t", worker_id="w0")
    ended: list = []

    def idle() -> None:  # never drawn: it waits, idle, until the chief stops
        try:
            w.join([np.zeros(DIM, np.float32)])
        except Exception as exc:
            ended.append(exc)
    t = threading.Thread(target=idle, daemon=True)
    t.start()
    try:
        time.sleep(2.0)
        assert 1 <= len(handle.metrics) <= 4  # one empty round a second, and the loop free
    finally:
        handle.stop()
        t.join(10)
        w.close()


# -- real runs: 10 worker threads over loopback TCP ------------------------------------------
DIM = 5
W_TRUE = np.linspace(-1.0, 1.0, DIM).astype(np.float32)


def _shard(i: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x, (x @ W_TRUE + 0.1 * rng.normal(size=n)).astype(np.float32)


def _test_mse(w: np.ndarray) -> float:
    x, y = _shard(999, 500)
    return float(np.mean((x @ w - y) ** 2))


IDLE_TIMEOUT = 1.0  # both sides: an idle worker waiting longer lives on heartbeats alone


def _run(rounds: int, seed: int, pause: float = 0.0,
         **sampling) -> tuple[list[dict], dict[str, list[int]], list]:
    """A run of 10 workers doing a few steps of least squares each round (and sleeping
    ``pause`` s, so that rounds take time); returns the metrics, the rounds each worker
    trained, and each worker's warnings and reconnects."""
    handle = serve("127.0.0.1:0", workers=10, rounds=rounds, token="t",
                   initial=[np.zeros(DIM, np.float32)], sample_seed=seed,
                   idle_timeout=IDLE_TIMEOUT, **sampling)
    trained: dict[str, list[int]] = {f"w{i}": [] for i in range(10)}
    trouble: list = []
    errors: list = []

    def run(i: int) -> None:
        try:
            x, y = _shard(i)
            w = Worker(handle.url, token="t", worker_id=f"w{i}", heartbeat=0.2,
                       idle_timeout=IDLE_TIMEOUT)
            (model,) = w.join([np.zeros(DIM, np.float32)])
            while not w.done:
                trained[f"w{i}"].append(w.round)
                for _ in range(5):
                    model = model - 0.05 * (2 * x.T @ (x @ model - y) / len(y))
                time.sleep(pause)
                (model,) = w.sync([model.astype(np.float32)], len(y))
            if w.session.warnings or w.session.reconnects:
                trouble.append((i, w.session.warnings, w.session.reconnects))
            w.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors
        assert handle.wait(10)
        metrics, final = handle.metrics, handle.chief.global_arrays[0]
    finally:
        handle.stop()
    metrics[-1]["test_mse"] = _test_mse(final)
    return metrics, trained, trouble


def test_ten_workers_three_a_round_reproducibly_and_as_accurate_as_full_participation():
    rounds, pause = 12, 0.15
    metrics, trained, trouble = _run(rounds, seed=11, pause=pause, sample=3)
    assert not trouble, trouble  # the idle ones stayed connected, heard nothing spurious
    # ... though some sat out longer than the idle timeout (the premise of that check).
    longest_idle = max(max(b - a - 1 for a, b in zip([-1, *rs], [*rs, rounds]))
                       for rs in trained.values())
    assert longest_idle * pause > IDLE_TIMEOUT
    assert [m["workers"] for m in metrics] == [3] * rounds
    assert [m["sampled"] for m in metrics] == [3] * rounds
    assert all(m["sample_rate"] == pytest.approx(0.3) for m in metrics)
    by_round = [{w for w, rs in trained.items() if r in rs} for r in range(rounds)]
    policy = SamplingPolicy(sample=3, seed=11)
    assert by_round == [set(policy.draw(trained, r)[0]) for r in range(rounds)]
    # Same seed, same sets; another seed, others.
    _, again, _ = _run(rounds, seed=11, sample=3)
    assert again == trained
    _, other, _ = _run(rounds, seed=12, sample=3)
    assert other != trained
    # Full participation, over half the rounds, lands in the same accuracy band: within twice
    # the noise floor (the label noise's variance) of least squares.
    full, _, _ = _run(rounds // 2, seed=11)
    assert [m["workers"] for m in full] == [10] * (rounds // 2) and "sampled" not in full[0]
    noise = 0.1 ** 2
    assert full[-1]["test_mse"] < 2 * noise, full[-1]
    assert metrics[-1]["test_mse"] < 2 * noise, metrics[-1]
    assert _test_mse(np.zeros(DIM, np.float32)) > 30 * noise  # where both started
