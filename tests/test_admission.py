"""The chief's admission policy (chief/admission.py): each refusal with its sentence, clipping to
exactly the bound, the honest path bit for bit as before, a non-finite model never committed; and
through real TCP, a worker process lying about its sample count cannot break or own the model."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import fedberry_env, processes, python
from robustness_harness import wait_until

from fedberry.chief.admission import (
    DEFAULT_MAX_SAMPLES,
    Admission,
    AdmissionPolicy,
    clip_update,
    update_norm,
)
from fedberry.chief.build import OutputOptions, RoundPolicy, build_chief_server
from fedberry.chief.run_info import read_run_info
from fedberry.chief.scheduler import BlockingScheduler
from fedberry.chief.state import Chief, ChiefConfig, RoundClosed, SendError, SendGlobal
from fedberry.cli import build_parser
from fedberry.protocol.frames import ErrorCode, spec_of
from fedberry.serve import serve
from fedberry.strategies import FedAvg, FedAvgM, TrimmedMean
from fedberry.transports.mpi_chief import _CollectivePeer

SHAPES = [(3, 2), (2,)]


def arrays(value: float) -> list[np.ndarray]:
    return [np.full(s, value, np.float32) for s in SHAPES]


def make(workers: int = 3, strategy=None, initial=None, **policy) -> Chief:
    chief = Chief(ChiefConfig(workers, 3), strategy or FedAvg(),
                  initial=initial if initial is not None else arrays(0),
                  admission=AdmissionPolicy(**policy))
    for w in "abc"[:workers]:
        chief.join(w, spec_of(chief.global_arrays), 0)
    return chief


def of(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def refusal(actions: list) -> SendError:
    (err,) = of(actions, SendError)
    assert not err.fatal  # the worker stays, and the round goes on without its update
    return err


# -- the policy's options --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(max_samples=0), "max_samples must be a number in"),
    (dict(max_samples=float("inf")), "max_samples must be a number in"),
    (dict(max_samples=2.0 ** 54), "max_samples must be a number in"),
    (dict(max_update_norm=-1.0), "max_update_norm must be a positive number"),
    (dict(update_norm_mode="shrink"), "update_norm_mode must be one of clip, refuse"),
])
def test_policy_checks_its_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdmissionPolicy(**kwargs)


def test_default_bound_and_record():
    assert AdmissionPolicy().max_samples == DEFAULT_MAX_SAMPLES == 1e9
    assert AdmissionPolicy(max_update_norm=2.0, update_norm_mode="refuse").record() == {
        "max_samples": 1e9, "max_update_norm": 2.0, "update_norm_mode": "refuse",
        "max_sample_ratio": 100.0}


# -- refusals, each with its sentence --------------------------------------------------------
def test_sample_count_above_the_bound_is_refused_and_the_round_goes_on():
    chief = make()
    chief.update("a", 0, 10, arrays(1), {}, 1)
    err = refusal(chief.update("b", 0, 1e12, arrays(0), {}, 1))
    assert err.code == ErrorCode.LIMIT
    assert err.message == ("update of worker b refused: it claims 1e+12 samples, more than the "
                           "chief admits (max_samples 1e+09); the round goes on without it")
    acts = chief.update("c", 0, 30, arrays(5), {}, 1)
    (rc,) = of(acts, RoundClosed)
    assert (rc.workers, rc.num_samples, rc.worker_ids) == (2, 40, ["a", "c"])
    assert sorted(w for s in of(acts, SendGlobal) for w in s.worker_ids) == ["a", "b", "c"]
    np.testing.assert_allclose(chief.global_arrays[0], (10 * 1 + 30 * 5) / 40)


def test_refused_last_update_closes_the_round_without_waiting_for_it():
    chief = make()
    chief.update("a", 0, 1, arrays(1), {}, 1)
    chief.update("b", 0, 1, arrays(3), {}, 1)
    acts = chief.update("c", 0, 5e9, arrays(0), {}, 1)
    assert refusal(acts).code == ErrorCode.LIMIT and of(acts, RoundClosed)[0].workers == 2
    np.testing.assert_array_equal(chief.global_arrays[1], [2, 2])


def test_update_that_would_overflow_the_float32_sum_is_refused_before_it_is_added():
    chief = make()
    chief.update("a", 0, 1, arrays(1), {}, 1)
    big = arrays(0)
    big[1][:] = 1e30  # finite, but 1e30 x 1e9 samples is past float32's 3.4e38
    err = refusal(chief.update("b", 0, 1e9, big, {}, 1))
    assert err.code == ErrorCode.NON_FINITE
    assert err.message.startswith("update of worker b refused: tensor 1 (largest magnitude "
                                  "1e+30) weighted by its 1e+09 samples could take the round's "
                                  "running sum past 3.4e+38")
    chief.update("c", 0, 1, arrays(3), {}, 1)
    assert chief.round == 1 and all(np.isfinite(a).all() for a in chief.global_arrays)
    np.testing.assert_array_equal(chief.global_arrays[1], [2, 2])


def test_overflow_bound_adds_up_over_the_round():
    chief = make()
    near = arrays(2e38)  # each alone fits in float32; two summed do not
    assert of(chief.update("a", 0, 1, near, {}, 1), SendError) == []
    assert "tensor 0" in refusal(chief.update("b", 0, 1, arrays(2e38), {}, 1)).message
    assert of(chief.update("c", 0, 1, arrays(-1e38), {}, 1), SendError) == []
    assert all(np.isfinite(a).all() for a in chief.global_arrays)


def test_update_norm_refused_with_its_norm():
    chief = make(max_update_norm=1.0, update_norm_mode="refuse")
    err = refusal(chief.update("a", 0, 1, arrays(1), {}, 1))  # norm sqrt(8)
    assert err.code == ErrorCode.LIMIT
    assert err.message == ("update of worker a refused: its change from the global model has "
                           "norm 2.828, above the bound max_update_norm 1; the round goes on "
                           "without it")


def test_clip_gives_the_change_exactly_the_bound():
    chief = make(workers=1, max_update_norm=0.5)
    rng = np.random.default_rng(0)
    update = [rng.standard_normal(s).astype(np.float32) * 10 for s in SHAPES]
    assert of(chief.update("a", 0, 7, update, {}, 1), SendError) == []
    norm = update_norm(chief.global_arrays, arrays(0))
    assert norm == pytest.approx(0.5, rel=1e-6)


def test_clip_update_leaves_small_changes_and_integer_tensors_alone():
    ref = [np.zeros(4, np.float32), np.array(3, np.int64)]
    small = [np.full(4, 0.1, np.float32), np.array(9, np.int64)]
    before = [a.copy() for a in small]
    assert clip_update(small, ref, 1.0) == pytest.approx(0.2)
    assert all(np.array_equal(a, b) for a, b in zip(small, before))
    frozen = np.full(4, 10.0, np.float32)
    frozen.flags.writeable = False
    big = [frozen, np.array(9, np.int64)]
    assert clip_update(big, ref, 2.0) == pytest.approx(20.0)
    np.testing.assert_allclose(big[0], 1.0)  # replaced, not written: it was read-only
    assert int(big[1]) == 9 and frozen[0] == 10.0


# -- the honest path -------------------------------------------------------------------------
@pytest.mark.parametrize("policy", [{}, dict(max_update_norm=1e6)])
def test_honest_rounds_are_bit_identical_to_the_strategy_alone(policy):
    rng = np.random.default_rng(1)
    sent = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(3)]
    samples = [5, 120, 33]
    chief = make(**policy)
    for w, u, n in zip("abc", sent, samples):
        chief.update(w, 0, n, [a.copy() for a in u], {}, 1)
    plain = FedAvg()
    plain.begin_round(arrays(0))
    for u, n in zip(sent, samples):
        plain.add([a.copy() for a in u], n)
    for got, want in zip(chief.global_arrays, plain.result()):
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_combined_update_may_claim_the_bound_per_worker():
    admission = Admission(AdmissionPolicy(max_samples=100))
    admission.begin_round(arrays(0))
    assert admission.admit("mpi", 300, arrays(1), stands_for=3) is None
    assert "max_samples 300" in admission.admit("mpi", 301, arrays(1), stands_for=3).message


# -- the model committed ---------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_round_that_would_make_a_non_finite_model_is_not_committed(caplog):
    # A server step of 1e38 x the change overflows float32 although every update is finite.
    chief = make(workers=2, strategy=FedAvgM(lr=1e38, momentum=0.0))
    before = [a.copy() for a in chief.global_arrays]
    chief.update("a", 0, 1, arrays(10), {}, 1)
    acts = chief.update("b", 0, 1, arrays(10), {}, 1)
    assert of(acts, RoundClosed)[0].round == 1 and chief.round == 1
    assert sorted(w for s in of(acts, SendGlobal) for w in s.worker_ids) == ["a", "b"]
    assert all(np.array_equal(a, b) for a, b in zip(chief.global_arrays, before))
    assert "round 1 would make a non-finite global model (tensor 0 contains NaN or Inf); it " \
           "is not committed, the previous model stays" in caplog.text


def test_round_whose_every_update_was_refused_keeps_the_model():
    chief = make(workers=2)
    refusal(chief.update("a", 0, 2e9, arrays(1), {}, 1))
    acts = chief.update("b", 0, 3e9, arrays(1), {}, 1)
    (rc,) = of(acts, RoundClosed)
    assert (rc.round, rc.workers) == (1, 0)
    assert all(np.array_equal(a, b) for a, b in zip(chief.global_arrays, arrays(0)))
    assert of(chief.update("a", 1, 1, arrays(4), {}, 2), SendError) == []  # round 2 goes on


# -- robust rules trim what they promise -----------------------------------------------------
@pytest.mark.parametrize("trim", [1, 0.1, 0.3])
def test_trimmed_mean_of_three_ignores_one_sending_1e30(trim):
    chief = make(strategy=TrimmedMean(trim=trim))
    chief.update("a", 0, 1, arrays(1), {}, 1)
    chief.update("b", 0, 1, arrays(1e30), {}, 1)
    chief.update("c", 0, 1, arrays(2), {}, 1)
    assert chief.round == 1
    np.testing.assert_array_equal(chief.global_arrays[0], np.full((3, 2), 2.0))  # the middle


def test_trimmed_mean_fraction_trims_at_least_one_from_three_updates():
    s = TrimmedMean(trim=0.1)
    assert [s.trimmed_per_side(n) for n in (1, 2, 3, 9, 10, 20, 21)] == [0, 0, 1, 1, 1, 2, 2]
    assert [TrimmedMean(trim=2).trimmed_per_side(n) for n in (3, 5, 9)] == [1, 2, 2]
    assert TrimmedMean(trim=0).trimmed_per_side(5) == 0


# -- through real TCP, three worker processes ------------------------------------------------
HONEST = textwrap.dedent("""
    import sys
    import numpy as np
    from fedberry import Worker

    url, index, n, rounds, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5]
    saved = {}
    with Worker(url, worker_id=f"honest-{index}") as w:
        model = w.join([np.zeros(s, np.float32) for s in SHAPES_HERE])
        rng = np.random.default_rng(index)
        for r in range(rounds):
            mine = [(g + rng.standard_normal(g.shape)).astype(np.float32) for g in model]
            model = w.sync(mine, n)
            for j, (a, b) in enumerate(zip(mine, model)):
                saved[f"sent{r}_{j}"], saved[f"got{r}_{j}"] = a, b
        np.savez(out, done=np.array(w.done), **saved)
""")

# A token holder that sends the global model back unchanged, claiming CLAIM samples, over raw
# frames (fedberry's own Worker refuses counts the protocol refuses before they leave).
LIAR = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from robustness_harness import RawClient
    from fedberry.protocol.frames import MsgType, encode

    port, token, claim, spec = int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), eval(sys.argv[5])
    with RawClient(port, timeout=60) as c:
        assert c.handshake(token, spec, "liar", want_model=True).type == MsgType.WELCOME
        while True:
            f = c.answer()
            if f is None:
                print("liar: the chief closed the connection", flush=True)
                break
            if f.type == MsgType.ERROR:
                print(f"liar: chief says: {f.meta['message']} (fatal: {f.meta['fatal']})",
                      flush=True)
                if f.meta["fatal"]:
                    break
            elif f.type == MsgType.GLOBAL:
                if f.meta.get("done"):
                    break
                c.send(encode(MsgType.UPDATE, {"round": f.meta["round"], "num_samples": claim,
                                               "metrics": {}}, f.tensors).tobytes())
""")


@pytest.mark.parametrize("claim,heard", [
    (1e300, "num_samples must be a positive number of at most 2**53"),  # the protocol's limit
    (1e12, "update of worker liar refused: it claims 1e+12 samples, more than the chief "
           "admits (max_samples 1e+09)"),  # the policy's default bound
])
def test_a_worker_lying_about_its_samples_cannot_break_or_own_the_model(tmp_path: Path, claim,
                                                                        heard, caplog):
    caplog.set_level("WARNING", logger="fedberry.chief")
    rounds, samples, token = 2, [5, 120], "admission-test-token"
    rng = np.random.default_rng(7)
    initial = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    spec = [[a.dtype.str, list(a.shape)] for a in initial]
    env = fedberry_env(FEDBERRY_TOKEN=token)
    tests = str(Path(__file__).parent)
    # finish_grace: a connection the chief closed for a protocol error counts as lost, and a
    # finished chief waits that long for a lost worker to come back for the final model.
    handle = serve("127.0.0.1:0", workers=3, rounds=rounds, initial=initial, token=token,
                   finish_grace=2.0)
    try:
        with processes() as procs:
            for i, n in enumerate(samples):
                procs.append(subprocess.Popen(
                    python("-c", HONEST.replace("SHAPES_HERE", repr(SHAPES)), handle.url, str(i),
                       str(n), str(rounds), str(tmp_path / f"w{i}.npz")), env=env))
            # The liar joins last, so that it is one of the three the first round waits for
            # (refused first, it would leave the start barrier short of a worker).
            wait_until(lambda: len(handle.chief.members) == 2, 60, "the honest workers")
            liar = subprocess.Popen(python("-c", LIAR, tests, str(handle.address[1]), token,
                                           repr(claim), repr(spec)),
                                    env=env, stdout=subprocess.PIPE, text=True)
            procs.append(liar)
            for p in procs[:2]:
                assert p.wait(90) == 0
            said, _ = liar.communicate(timeout=60)
        assert handle.wait(10)
        final = handle.chief.global_arrays
    finally:
        handle.stop()

    assert heard in said, said
    if claim <= 2 ** 53:  # the policy's refusal, in the chief's log too
        assert heard in caplog.text
    assert all(np.isfinite(a).all() for a in final)
    got = []
    for i in range(len(samples)):
        with np.load(tmp_path / f"w{i}.npz") as z:
            assert bool(z["done"])  # trained to the end
            got.append({k: z[k] for k in z.files})
    for r in range(rounds):  # each round: the exact weighted mean of the honest updates
        for j in range(len(SHAPES)):
            ref = sum(n * g[f"sent{r}_{j}"].astype(np.float64)
                      for n, g in zip(samples, got)) / sum(samples)
            for g in got:
                np.testing.assert_allclose(g[f"got{r}_{j}"], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(final[0], got[0][f"got{rounds - 1}_0"])


# -- plumbing: serve(), the command line, MPI's combined update -------------------------------
def test_serve_takes_the_options_and_records_them(tmp_path: Path):
    handle = serve(None, max_samples=1e6, max_update_norm=2.0, update_norm_mode="refuse",
                   out_dir=tmp_path, initial=arrays(0))
    try:
        assert handle.chief.admission.policy == AdmissionPolicy(1e6, 2.0, "refuse")
    finally:
        handle.stop()
    assert read_run_info(tmp_path)["config"]["admission"] == {
        "max_samples": 1e6, "max_update_norm": 2.0, "update_norm_mode": "refuse",
        "max_sample_ratio": 100.0}


def test_chief_command_has_the_options():
    args = build_parser().parse_args(["chief", "--workers", "2"])
    assert (args.max_samples, args.max_update_norm, args.update_norm_mode) == (1e9, None, "clip")
    args = build_parser().parse_args(["chief", "--workers", "2", "--max-samples", "5e6",
                                      "--max-update-norm", "3", "--update-norm-mode", "refuse"])
    assert (args.max_samples, args.max_update_norm, args.update_norm_mode) == (5e6, 3.0,
                                                                              "refuse")


def test_refused_combined_update_stops_an_mpi_job_with_its_sentence():
    server = build_chief_server(RoundPolicy(workers=1, rounds=2), OutputOptions(),
                                initial=arrays(0), scheduler=BlockingScheduler(),
                                admission=AdmissionPolicy(max_samples=100))
    peer = _CollectivePeer()
    server.attach(peer, spec_of(arrays(0)), True)
    server.on_collective_update(peer, 0, 400, arrays(1), {}, updates=4)  # 100 per worker: fine
    assert peer.refused is None and server.chief.round == 1
    server.on_collective_update(peer, 1, 401, arrays(1), {}, updates=4)
    assert peer.refused is not None and "max_samples 400" in peer.refused


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("magnitude", [100.0, 10.0])
def test_clipping_holds_the_bound_exactly_after_rounding_into_the_dtype(dtype, magnitude):
    """Rounding the clipped change into float16 to nearest (ulp 0.0625 at 100, above the
    change's 0.06 a coordinate) used to land it up to ~0.75 % above C, in every one of these
    draws; the clipped update must be within C as stored, in every dtype. Where the change
    is above the ulp (weights near 10) clipping still keeps most of the bound."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        ref = (rng.normal(0, 1, 300) * magnitude).astype(dtype)
        up = (ref.astype(np.float64) + rng.normal(0, 1, 300)).astype(dtype)
        arrays = [up.copy()]
        assert clip_update(arrays, [ref], 1.0) > 1.0
        assert arrays[0].dtype == dtype
        assert update_norm(arrays, [ref]) <= 1.0
        if magnitude == 10.0:
            assert update_norm(arrays, [ref]) > 0.9
