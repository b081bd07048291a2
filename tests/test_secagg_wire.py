"""Secure aggregation over real TCP: the chief sees masked vectors and the sum, nothing else.

Workers are ``fedberry.Worker`` threads (or, where one must die, processes) against a real
``fedberry.serve`` chief on loopback. The model is small (1,025 float values), so each test
takes a second or two."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

pytest.importorskip("cryptography")

import fedberry  # noqa: E402
from fedberry.chief.runtime import ChiefServer  # noqa: E402
from fedberry.protocol import connection as conn_mod  # noqa: E402
from fedberry.protocol.connection import ChiefConnection, WorkerConnection  # noqa: E402
from fedberry.protocol.frames import ProtocolError, spec_of  # noqa: E402
from fedberry.protocol.messages import Auth, Challenge, Hello, SecAgg, Update, Welcome  # noqa: E402
from fedberry.secagg import (  # noqa: E402
    SecAggOptions,
    SecAggServer,
    UnmaskRequest,
    wire,  # noqa: E402
)
from fedberry.transports.tcp.worker import TcpSession  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import secagg_worker as sw  # noqa: E402
from helpers import fedberry_env, processes  # noqa: E402

N = 5


def _in_threads(work, indices) -> None:
    """``work(i)`` for each index, each in its own thread; none may hang."""
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in indices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a worker hung"


def _run_workers(url: str, indices: list[int], rounds: int = 1,
                 options: dict[int, dict] | None = None) -> dict[int, list]:
    """Each worker sends ``global + update_of(i)`` every round; returns what each got back,
    and the warnings each heard."""
    out: dict[int, list] = {}
    errors: list[BaseException] = []
    # Each round starts once every worker has the last one's model (one that lost its link
    # is back by then), so that a round is never opened without the workers still on their way.
    between = threading.Barrier(len(indices))

    def work(i: int) -> None:
        try:
            w = fedberry.Worker(chief=url, worker_id=f"w{i}", **(options or {}).get(i, {}))
            g = w.join(sw.initial())
            got = []
            for r in range(rounds):
                if r:
                    between.wait(30)
                g = w.sync([a + d for a, d in zip(g, sw.update_of(i))],
                           num_samples=sw.samples_of(i))
                got.append(g)
            out[i] = [got, list(w.session.warnings)]
            w.close()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    _in_threads(work, indices)
    assert not errors, errors
    return out


def _expected(indices: list[int]) -> list[np.ndarray]:
    """Plain sample-weighted FedAvg of these workers' changes, in float64."""
    n = {i: sw.samples_of(i) for i in indices}
    total = sum(n.values())
    return [g.astype(np.float64) + sum(n[i] * sw.update_of(i)[t] for i in indices) / total
            for t, g in enumerate(sw.initial())]


def _bound(options: SecAggOptions, survivors: list[int], participants: list[int],
           clip: float) -> float:
    """The quantization error bound of the mean, per coordinate (docs/secure-aggregation.md):
    each weighted, encoded change is within s/2 of its value (s = C / L), so the weighted sum
    of |S| changes is within |S| s / 2, and the mean (divided by the weights' sum W) within
    |S| s / (2 W); plus the last float32 rounding of the model."""
    levels = ((1 << (options.bits - 1)) - 1) // options.max_workers
    step = clip / levels
    top = max(sw.samples_of(i) for i in participants)
    weight = sum(sw.samples_of(i) / top for i in survivors)
    return len(survivors) * step / (2 * weight)


def _serve(**kw: object) -> fedberry.ChiefHandle:
    return fedberry.serve("127.0.0.1:0", workers=N, initial=sw.initial(), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits,clip", [(32, 10.0), (16, 2.0)])
def test_five_workers_get_plain_fedavg_up_to_the_stated_quantization_bound(bits, clip) -> None:
    options = SecAggOptions(bits=bits, clip=clip)
    plain = _serve(rounds=1)
    plain_out = _run_workers(plain.url, list(range(N)))
    assert plain.wait(30)
    secure = _serve(rounds=1, secure_aggregation=options)
    secure_out = _run_workers(secure.url, list(range(N)))
    assert secure.wait(30)
    assert secure.metrics[0]["workers"] == N
    bound = _bound(options, list(range(N)), list(range(N)), clip)
    for t, (p, s) in enumerate(zip(plain_out[0][0][0], secure_out[0][0][0])):
        err = np.abs(s.astype(np.float64) - p.astype(np.float64))
        ulp = 2 * np.spacing(np.abs(p).astype(np.float32)).astype(np.float64)
        assert np.all(err <= bound + ulp), f"tensor {t}: {err.max()} > {bound}"
    # Every worker got the same model: one sum, one broadcast.
    for i in range(1, N):
        for a, b in zip(secure_out[0][0][0], secure_out[i][0][0]):
            assert np.array_equal(a, b)
    if bits == 16:  # the coarse ring's error shows (so the bound is what is tested, not luck)
        diff = max(float(np.abs(s - p).max()) for p, s in zip(plain_out[0][0][0],
                                                              secure_out[0][0][0]))
        assert diff > 1e-4


def test_over_mutual_tls_too(tmp_path: Path) -> None:
    from fedberry import certs

    ca, ca_key = certs.create_ca(tmp_path)
    cert, key = certs.create_chief_cert(tmp_path, ca, ca_key, ["127.0.0.1"])
    clients = {i: certs.create_client_cert(tmp_path, ca, ca_key, f"w{i}") for i in range(N)}
    chief = _serve(rounds=1, secure_aggregation="", tls_cert=str(cert), tls_key=str(key),
                   client_ca=str(ca))
    out = _run_workers(chief.url, list(range(N)), options={
        i: {"ca": str(ca), "cert": str(c), "key": str(k)} for i, (c, k) in clients.items()})
    assert chief.wait(30)
    assert chief.metrics[0]["workers"] == N
    for e, m in zip(_expected(list(range(N))), out[0][0][0]):
        assert np.abs(m - e).max() < 1e-5


def test_differential_privacy_with_secure_aggregation_adds_the_noise_in_shares() -> None:
    """DP-FedAvg with the noise distributed: each of the 5 workers adds N(0, (z C)^2 / 5)
    (--min-workers 5) to its clipped change before masking, the chief adds none, so the mean
    (the noised sum over n_fixed = 5) is off the clipped mean by N(0, (z C / 5)^2) per
    coordinate: 0.2 here. Were the chief to add its own noise as well, it would be 0.28."""
    pytest.importorskip("dp_accounting", reason="the dp extra (the accountant)")
    z, c = 1.0, 1.0
    chief = _serve(rounds=1, min_workers=N, secure_aggregation="",
                   dp=f"clip={c},noise={z},delta=1e-5")
    out = _run_workers(chief.url, list(range(N)))
    assert chief.wait(30)
    record = chief.metrics[0]
    assert record["workers"] == N and 0 < record["epsilon"] < math.inf
    clipped = []
    for i in range(N):
        d = np.concatenate([u.ravel().astype(np.float64) for u in sw.update_of(i)])
        clipped.append(d * min(1.0, c / np.linalg.norm(d)))
    plain = np.concatenate([g.ravel() for g in sw.initial()]) + np.mean(clipped, axis=0)
    got = np.concatenate([a.ravel() for a in out[0][0][0]]).astype(np.float64)
    std = float(np.std(got - plain))
    assert 0.18 < std < 0.22, std  # 1,025 coordinates: the sample std within ~5% of 0.2


# Chi-square test of uniformity, as in tests/test_secagg.py: the top 16 bits of each 32-bit
# ring value of a masked vector into 2^16 bins; alpha = 1e-6 per vector.
def _chi2_critical(df: int, alpha: float) -> float:
    z = NormalDist().inv_cdf(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def _chi2_uniform(top16: np.ndarray) -> float:
    counts = np.bincount(top16, minlength=1 << 16).astype(np.float64)
    expected = top16.size / (1 << 16)
    return float(((counts - expected) ** 2).sum() / expected)


def test_what_the_chief_receives_from_each_worker_is_uniform_in_the_ring(monkeypatch) -> None:
    seen: dict[str, np.ndarray] = {}
    on_masked = ChiefServer.on_masked

    def spy(self: ChiefServer, peer, round_: int, vector: np.ndarray) -> None:
        seen[peer.worker_id] = vector.copy()  # before its buffer takes the next one
        on_masked(self, peer, round_, vector)

    monkeypatch.setattr(ChiefServer, "on_masked", spy)
    shapes = [(1 << 20,)]
    init = [np.zeros(shapes[0], np.float32)]
    rng = np.random.default_rng(5)
    changes = [rng.normal(0, 0.005, shapes[0]).astype(np.float32) for _ in range(N)]
    chief = fedberry.serve("127.0.0.1:0", workers=N, rounds=1, initial=init,
                           secure_aggregation=SecAggOptions())
    got: dict[int, list[np.ndarray]] = {}

    def work(i: int) -> None:
        w = fedberry.Worker(chief=chief.url, worker_id=f"w{i}")
        g = w.join(init)
        got[i] = w.sync([g[0] + changes[i]], num_samples=10)
        w.close()

    _in_threads(work, range(N))
    assert chief.wait(30)
    assert sorted(seen) == [f"w{i}" for i in range(N)]
    critical = _chi2_critical((1 << 16) - 1, 1e-6)
    # The control: the plain encoding of one change is far from uniform.
    plain = SecAggOptions().encoding(10.0).encode(changes[0].astype(np.float64))
    assert _chi2_uniform(plain >> 16) > 100 * critical
    for wid, vector in seen.items():
        assert vector.dtype == np.uint32 and vector.shape == shapes[0]
        assert _chi2_uniform(vector >> 16) < critical, f"{wid}'s masked update"
    mean = np.mean(changes, axis=0)  # equal weights: the plain mean
    assert np.abs(got[0][0] - mean).max() < 1e-5


def test_a_worker_dying_after_its_masked_update_and_one_before_still_give_the_exact_sum(
        tmp_path: Path) -> None:
    """w0 dies once its masked update is in the sum (at the unmask request), w1 after sharing
    its keys but before masking: the round's model is the weighted mean of w0, w2, w3, w4."""
    options = SecAggOptions(timeout=20.0)
    chief = _serve(rounds=1, secure_aggregation=options, out_dir=str(tmp_path),
                   finish_grace=1.0)  # the dead do not come back for the final model
    script = str(Path(__file__).parent / "secagg_worker.py")
    with processes() as procs:
        for i, die in ((0, "unmask"), (1, "forward")):
            procs.append(subprocess.Popen([sys.executable, script, chief.url, f"w{i}", str(i),
                                           die], env=fedberry_env()))
        out = _run_workers(chief.url, [2, 3, 4])
        assert chief.wait(60)
        assert [p.wait(30) for p in procs] == [17, 17]
    record = chief.metrics[0]
    assert record["workers"] == 4
    survivors = [0, 2, 3, 4]
    expected = _expected(survivors)
    bound = _bound(options, survivors, list(range(N)), options.clip)
    model = out[2][0][0]
    for e, m in zip(expected, model):
        assert np.all(np.abs(m - e) <= bound + 2 * np.spacing(np.abs(e).astype(np.float32)))
    # w1's change is really out: the mean with it differs by far more than the bound.
    with_w1 = _expected(list(range(N)))
    assert max(float(np.abs(m - e).max()) for e, m in zip(with_w1, model)) > 100 * bound


def test_fewer_survivors_than_the_threshold_fail_the_round_and_the_next_proceeds(
        monkeypatch) -> None:
    """Threshold 4 of 5: two workers lose their connection after sharing keys (and come
    back), so three masked updates come in; the round fails with its sentence, the model
    stays, and round 2, with all five, gives the plain mean."""
    dropped: set[str] = set()
    step = TcpSession._secure_step

    def flaky(self: TcpSession, steps, event) -> None:
        if event.step == "forward" and self.worker_id in ("w0", "w1") and \
                self.worker_id not in dropped:
            dropped.add(self.worker_id)
            self.drop_connection()
            return
        step(self, steps, event)

    monkeypatch.setattr(TcpSession, "_secure_step", flaky)
    chief = _serve(rounds=2, secure_aggregation=SecAggOptions(threshold=4, timeout=20.0))
    out = _run_workers(chief.url, list(range(N)), rounds=2)
    assert chief.wait(30)
    assert dropped == {"w0", "w1"}
    for a, b in zip(out[2][0][0], sw.initial()):  # the model stayed as it was ...
        assert np.array_equal(a, b)
    assert all(any("fewer than the threshold 4" in m for m in out[i][1]) for i in (2, 3, 4))
    assert chief.metrics[0]["workers"] == 0
    # ... and round 2 aggregated all five (their changes on top of the unchanged model).
    assert chief.metrics[1]["workers"] == N
    expected = _expected(list(range(N)))
    for e, m in zip(expected, out[2][0][1]):
        assert np.abs(m - e).max() < 1e-5


def test_a_chief_that_asks_for_both_shares_of_a_worker_is_refused(monkeypatch) -> None:
    """A modified chief says w0's masked update is in (a survivor) and also that w0 dropped,
    asking for its self-mask seed and its mask key at once: every worker refuses to reveal,
    no secret is rebuilt, and the round fails with the model unchanged."""
    close = SecAggServer.close_masked

    def cheat(self: SecAggServer) -> UnmaskRequest:
        honest = close(self)
        return UnmaskRequest(honest.survivors, frozenset({min(honest.survivors)}))

    monkeypatch.setattr(SecAggServer, "close_masked", cheat)
    chief = _serve(rounds=1, secure_aggregation=SecAggOptions(timeout=2.0))
    out = _run_workers(chief.url, list(range(N)))
    assert chief.wait(30)
    for i in range(N):
        assert any("refuses to unmask" in m and "both kinds of share" in m for m in out[i][1]), \
            out[i][1]
        for a, b in zip(out[i][0][0], sw.initial()):
            assert np.array_equal(a, b)
    assert chief.metrics[0]["workers"] == 0


def test_a_chief_that_weighs_workers_differently_learns_nothing(monkeypatch) -> None:
    """A modified chief tells w2 the round's scale is w2's own count (weight 1) and everyone
    else a scale of 1e12 (weights ~0), so that the sum would be w2's change alone. The scale
    is bound into each worker's round digest, so w2's view and the others' differ: their
    sealed shares fail to open and their masks do not cancel; the round fails, the model
    stays."""
    from fedberry.chief import secure_round

    start = secure_round.SecureRound.start

    def split(self: secure_round.SecureRound) -> list:
        honest = start(self)
        out = []
        for send in honest:
            b = send.message.payload
            scale = sw.samples_of(2) if send.worker_id == "w2" else 1e12
            body = dict(wire.to_json(b), scale=scale)
            out.append(secure_round.SendSecure(send.worker_id, SecAgg(self.round, wire.from_json(
                "begin", body))))
        return out

    monkeypatch.setattr(secure_round.SecureRound, "start", split)
    chief = _serve(rounds=1, secure_aggregation=SecAggOptions(timeout=5.0))
    out = _run_workers(chief.url, list(range(N)))
    assert chief.wait(30)
    assert chief.metrics[0]["workers"] == 0
    for a, b in zip(out[2][0][0], sw.initial()):
        assert np.array_equal(a, b)


def test_a_worker_that_puts_a_vector_outside_its_range_in_the_sum_is_caught(monkeypatch) -> None:
    """w4 adds 200 L to every ring value of its masked update (a shift of 200 clips a
    coordinate): the unmasked sum's norm is past what clipped updates can reach, so the sum
    is refused and the model stays."""
    from fedberry.transports import secure_sync

    answer = secure_sync.SecureSync.answer

    def biased(self, message):
        out = answer(self, message)
        if message.step == "forward" and self._you == 5:  # w4 is client 5 of w0..w4
            out.tensors[0][:] += np.uint32(200 * 8388607)
        return out

    monkeypatch.setattr(secure_sync.SecureSync, "answer", biased)
    chief = _serve(rounds=1, secure_aggregation=SecAggOptions(timeout=5.0))
    out = _run_workers(chief.url, list(range(N)))
    assert chief.wait(30)
    assert chief.metrics[0]["workers"] == 0
    assert any("outside its range" in m for m in out[0][1]), out[0][1]
    for a, b in zip(out[0][0][0], sw.initial()):
        assert np.array_equal(a, b)


def test_one_workers_degenerate_key_costs_only_that_worker(monkeypatch) -> None:
    """w4 advertises the all-zero X25519 point, which no neighbour could agree a secret with:
    the chief refuses that advert (w4 is a dropout), and the other four's round completes
    at once, without waiting for a deadline."""
    from fedberry.secagg import KeyAdvert
    from fedberry.transports import secure_sync

    answer = secure_sync.SecureSync.answer

    def degenerate(self, message):
        out = answer(self, message)
        if message.step == "begin" and self._you == 5:
            p = out.payload
            out = SecAgg(out.round, KeyAdvert(p.sender, p.mask_public, bytes(32)))
        return out

    monkeypatch.setattr(secure_sync.SecureSync, "answer", degenerate)
    chief = _serve(rounds=1, secure_aggregation=SecAggOptions(timeout=60.0))
    out = _run_workers(chief.url, list(range(N)))
    assert chief.wait(30)
    assert chief.metrics[0]["workers"] == 4
    assert chief.metrics[0]["wall_s"] < 30  # not the 60 s step deadline
    assert any("degenerate" in m for m in out[4][1]), out[4][1]
    for e, m in zip(_expected([0, 1, 2, 3]), out[0][0][0]):
        assert np.abs(m - e).max() < 1e-5


def test_a_negligible_sample_count_neither_crashes_the_chief_nor_costs_the_others() -> None:
    chief = _serve(rounds=1, secure_aggregation="")
    tiny = {}

    def work(i: int) -> None:
        w = fedberry.Worker(chief=chief.url, worker_id=f"w{i}")
        g = w.join(sw.initial())
        tiny[i] = w.sync([a + d for a, d in zip(g, sw.update_of(i))],
                         num_samples=5e-324 if i == 0 else 1e9)
        w.close()

    _in_threads(work, range(N))
    assert chief.wait(30) and chief.metrics[0]["workers"] == N
    mean = [sum(sw.update_of(i)[t] for i in range(1, N)) / (N - 1) for t in range(2)]
    for g, m, got in zip(sw.initial(), mean, tiny[1]):
        assert np.abs(got - (g + m)).max() < 1e-5


def test_workers_themselves_refuse_a_threshold_below_the_majority(monkeypatch) -> None:
    """The chief's own check taken out (a modified chief): every worker refuses the begin
    and says so at once (an abstention), so the round fails without waiting out the step."""
    from fedberry.chief import secure_round

    monkeypatch.setattr(secure_round, "majority_floor", lambda config: 2)
    chief = _serve(rounds=1, secure_aggregation=SecAggOptions(threshold=2, timeout=60.0))
    out = _run_workers(chief.url, list(range(N)))
    assert chief.wait(30)
    assert chief.metrics[0]["workers"] == 0 and chief.metrics[0]["wall_s"] < 30
    assert all(any("below a majority" in m for m in out[i][1]) for i in range(N))


def test_a_threshold_below_the_groups_majority_is_refused_at_start() -> None:
    """threshold=2 of 5 would let a chief tell half a group a peer survived and the other
    half it dropped: the chief refuses it when it starts, as it does 2 workers."""
    with pytest.raises(ValueError, match="below a majority of each worker's group"):
        _serve(rounds=1, secure_aggregation=SecAggOptions(threshold=2))
    with pytest.raises(ValueError, match="at least 3 workers"):
        fedberry.serve("127.0.0.1:0", workers=2, secure_aggregation="")


def test_secure_aggregation_is_refused_where_it_cannot_hold() -> None:
    from fedberry.transports.mpi_chief import query

    with pytest.raises(ValueError, match="not offered under MPI"):
        query("mpi://?secagg=threshold=3")
    with pytest.raises(ValueError, match="needs every update"):
        fedberry.serve("127.0.0.1:0", workers=3, strategy="median",
                       secure_aggregation=SecAggOptions())
    with pytest.raises(ValueError, match="needs TCP workers"):
        fedberry.serve(None, workers=3, secure_aggregation="")
    with pytest.raises(ValueError, match="adaptive clipping needs every update's norm"):
        fedberry.serve("127.0.0.1:0", workers=3, secure_aggregation="",
                       dp="clip=1,noise=1,where=chief,adaptive=true,count_noise=1")
    chief = fedberry.serve("127.0.0.1:0", workers=3, initial=sw.initial(),
                           secure_aggregation="")
    try:
        with pytest.raises(ValueError, match="over TCP only"):
            fedberry.Worker(chief=chief)
    finally:
        chief.stop()
    with pytest.raises(ValueError, match="unknown secagg option 'treshold'"):
        SecAggOptions.parse("treshold=3")


def test_a_worker_that_requires_secure_aggregation_refuses_a_plain_chief() -> None:
    from fedberry.errors import FederationError

    plain = _serve(rounds=1)
    try:
        w = fedberry.Worker(chief=plain.url, worker_id="w0", require_secure_aggregation=True)
        with pytest.raises(FederationError, match="does not aggregate securely"):
            w.join(sw.initial())
        w.close()
    finally:
        plain.stop()
    with pytest.raises(ValueError, match="over TCP only"):
        fedberry.Worker(chief="mpi://", require_secure_aggregation=True)


def _joined(secure: bool) -> tuple[ChiefConnection, WorkerConnection]:
    spec = spec_of(sw.initial())
    c, w = ChiefConnection("t"), WorkerConnection("t", spec)
    for msg in c.receive_data(w.send(Hello("w0")).tobytes()):
        assert isinstance(msg, Hello)
    w.receive_data(c.send(Challenge()).tobytes())
    c.receive_data(w.send(Auth(spec)).tobytes())
    w.receive_data(c.send(Welcome(0, secure=secure)).tobytes())
    return c, w


def test_a_secure_connection_takes_only_the_secure_steps_and_a_plain_one_none() -> None:
    c, w = _joined(secure=True)
    assert c.secure and w.secure
    with pytest.raises(conn_mod.LocalProtocolError, match="never in the clear"):
        w.send(Update(0, 10.0, sw.initial()))
    c2, _ = _joined(secure=True)
    plain = WorkerConnection("t", spec_of(sw.initial()))
    plain.state = conn_mod.WorkerState.JOINED  # a worker that ignores what WELCOME said
    with pytest.raises(ProtocolError, match="never in the clear"):
        c2.receive_data(plain.send(Update(0, 10.0, sw.initial())).tobytes())
    c3, w3 = _joined(secure=False)
    assert not w3.secure
    with pytest.raises(conn_mod.LocalProtocolError):
        w3.send(Update(0, 10.0, (), codec="secagg"))
    # A worker may not send the chief's steps.
    c4, w4 = _joined(secure=True)
    begin = SecAgg(0, wire.from_json("unmask", {"survivors": [1, 2, 3], "dropouts": []}))
    with pytest.raises(conn_mod.LocalProtocolError):
        w4.send(begin)


@pytest.mark.parametrize("step,body,sentence", [
    ("advert", {"sender": 1, "mask": "AA==", "enc": "AA=="}, "32 bytes"),
    ("advert", {"sender": 0, "mask": "", "enc": ""}, "sender is an integer"),
    ("shares", {"sender": 1, "shares": [[2, "!!"]]}, "not valid base64"),
    ("reveal", {"sender": 1, "seed": [[2, "AA=="], [2, "AA=="]], "key": []}, "66 bytes"),
    ("unmask", {"survivors": [1, 1], "dropouts": []}, "distinct"),
    ("begin", {"round_number": 0}, "clients is a list"),
    ("peers", {"adverts": [1]}, "JSON object"),
    ("nonsense", {}, "unknown secure-aggregation step"),
])
def test_every_field_of_a_secure_step_is_checked_as_it_is_decoded(step, body, sentence) -> None:
    from fedberry.secagg import MessageError

    with pytest.raises((MessageError, ValueError), match=sentence):
        wire.from_json(step, body)


def test_the_wire_form_of_every_step_round_trips() -> None:
    from fedberry.secagg import SecAggClient

    options = SecAggOptions()
    context = wire.round_context(10.0, 40.0, 256, False, 0.0, False)
    cfg = options.round_config(3, (1, 2, 3, 4), 10, context=context)
    server = SecAggServer(cfg)
    clients = {i: SecAggClient(cfg, i) for i in cfg.clients}
    begin = wire.Begin(cfg, 2, 10.0, 40.0, 256)
    again = wire.from_json("begin", wire.to_json(begin))
    assert again.config == cfg and again.config.digest == cfg.digest
    assert again.weight_of(20) == 0.5 and again.weight_of(80) == 1.0
    # The parameters are bound into the digest: a begin that says another scale than the one
    # its round's digest was made with is refused as it is built or decoded.
    with pytest.raises(ValueError, match="not the ones its digest binds"):
        wire.Begin(cfg, 2, 10.0, 41.0, 256)
    forged = dict(wire.to_json(begin), scale=1e12)
    assert wire.from_json("begin", forged).config.digest != cfg.digest
    for c in clients.values():
        advert = wire.from_json("advert", wire.to_json(c.advertise()))
        server.receive_advert(advert)
    peers = server.close_adverts()
    for i, c in clients.items():
        adverts = wire.from_json("peers", wire.to_json(peers[i]))
        server.receive_shares(wire.from_json("shares", wire.to_json(c.share_keys(adverts))))
    forwarded = server.close_shares()
    for i, c in clients.items():
        f = wire.from_json("forward", wire.to_json(forwarded[i]))
        server.receive_masked(c.mask(f, np.full(10, i, np.uint32)))
    request = wire.from_json("unmask", wire.to_json(server.close_masked()))
    for c in clients.values():
        server.receive_unmask(wire.from_json("reveal", wire.to_json(c.unmask(request))))
    assert np.array_equal(server.finish().ring_sum, np.full(10, 10, np.uint32))
    assert math.isfinite(float(begin.clip))
