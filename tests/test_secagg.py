"""SecAgg+ rounds in memory: exact sums with dropouts, refusals, and masked vectors that look
uniform. Clients and server are the real sans-IO objects; only the transport is a dict."""

from __future__ import annotations

import random
from statistics import NormalDist

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

pytest.importorskip("cryptography", reason="secure aggregation needs the secagg extra")

from fedberry.secagg import (  # noqa: E402
    EncryptedShare,
    FixedPoint,
    ForwardedShares,
    MaskedInput,
    MessageError,
    RoundConfig,
    SecAggClient,
    SecAggServer,
    TamperedShare,
    TooFewSurvivors,
    UnmaskReply,
    UnmaskRequest,
    UnsafeRequest,
)

FP = FixedPoint(clip=1.0, bits=16, max_workers=256)


def _config(n: int = 5, length: int = 1000, **kw) -> RoundConfig:
    return RoundConfig(round_number=3, seed=b"public-round-seed".ljust(32, b"."),
                       clients=tuple(range(1, n + 1)), length=length, **kw)


def _clients(cfg: RoundConfig) -> dict[int, SecAggClient]:
    return {c: SecAggClient(cfg, c, entropy=random.Random(c).randbytes) for c in cfg.clients}


def _inputs(cfg: RoundConfig, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.uniform(-1.0, 1.0, cfg.length) for c in cfg.clients}


def _run(cfg, xs, *, gone_at_shares=(), gone_at_masked=(), gone_at_unmask=(), server=None,
         masked_seen=None):
    """One round; a client in gone_at_X sends nothing from round X on."""
    clients = _clients(cfg)
    server = server or SecAggServer(cfg)
    for c in clients.values():
        server.receive_advert(c.advertise())
    adverts = server.close_adverts()
    for c in adverts:
        if c not in gone_at_shares:
            server.receive_shares(clients[c].share_keys(adverts[c]))
    forwarded = server.close_shares()
    for c in forwarded:
        if c not in gone_at_masked:
            masked = clients[c].mask(forwarded[c], FP.encode(xs[c]))
            if masked_seen is not None:
                masked_seen[c] = masked.vector.copy()
            server.receive_masked(masked)
    request = server.close_masked()
    for c in server.survivors:
        if c not in gone_at_unmask:
            server.receive_unmask(clients[c].unmask(request))
    return server.finish()


def _ring_sum(xs, ids) -> np.ndarray:
    total = np.zeros(len(next(iter(xs.values()))), np.uint16)
    for c in ids:
        np.add(total, FP.encode(xs[c]), out=total)
    return total


def test_five_clients_the_ring_sum_is_exact_and_the_decoded_sum_within_the_bound() -> None:
    cfg = _config()
    assert (cfg.neighbors, cfg.threshold) == (4, 3)  # complete graph: Bonawitz et al. 2017
    xs = _inputs(cfg)
    result = _run(cfg, xs)
    assert result.survivors == (1, 2, 3, 4, 5)
    assert np.array_equal(result.ring_sum, _ring_sum(xs, cfg.clients))
    decoded = FP.decode_sum(result.ring_sum, len(result.survivors))
    error = np.max(np.abs(decoded - np.sum(list(xs.values()), axis=0)))
    assert 0 < error <= FP.sum_error_bound(5)


@pytest.mark.parametrize("early", ["gone_at_shares", "gone_at_masked"])
def test_one_drops_after_its_masked_input_and_one_before_the_sum_is_still_exact(early) -> None:
    cfg = _config()
    xs = _inputs(cfg, 1)
    # Client 4 sends its masked input, then dies (its seed is rebuilt from the others' shares);
    # client 5 dies earlier (during share keys, or after them: its mask key is rebuilt).
    result = _run(cfg, xs, gone_at_unmask=(4,), **{early: (5,)})
    assert result.survivors == (1, 2, 3, 4)
    assert np.array_equal(result.ring_sum, _ring_sum(xs, (1, 2, 3, 4)))


def test_secagg_plus_on_a_sparse_graph_with_dropouts_is_exact() -> None:
    cfg = _config(n=12, length=500, neighbors=4)
    assert cfg.threshold == 3
    xs = _inputs(cfg, 2)
    result = _run(cfg, xs, gone_at_shares=(2,), gone_at_masked=(7,), gone_at_unmask=(11,))
    expected = tuple(c for c in cfg.clients if c not in (2, 7))
    assert result.survivors == expected
    assert np.array_equal(result.ring_sum, _ring_sum(xs, expected))


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_any_dropout_pattern_gives_the_exact_sum_or_a_sentence(data) -> None:
    n = data.draw(st.integers(4, 9))
    cfg = _config(n=n, length=64, neighbors=data.draw(st.sampled_from([2, 4, n])))
    xs = _inputs(cfg, n)
    stage = st.sampled_from(["stay", "gone_at_shares", "gone_at_masked", "gone_at_unmask"])
    fate = {c: data.draw(stage) for c in cfg.clients}
    gone = {k: tuple(c for c in cfg.clients if fate[c] == k) for k in set(fate.values())}
    gone.pop("stay", None)
    try:
        result = _run(cfg, xs, **gone)
    except (TooFewSurvivors, UnsafeRequest) as exc:
        assert "threshold" in str(exc)
        return
    survivors = tuple(c for c in cfg.clients if fate[c] in ("stay", "gone_at_unmask"))
    assert result.survivors == survivors
    assert np.array_equal(result.ring_sum, _ring_sum(xs, survivors))


def test_fewer_survivors_than_the_threshold_fails_the_round_with_a_sentence() -> None:
    cfg = _config()
    xs = _inputs(cfg)
    with pytest.raises(TooFewSurvivors, match=r"only 2 client\(s\) sent masked inputs, fewer "
                                              r"than the threshold 3: the round cannot finish"):
        _run(cfg, xs, gone_at_masked=(3, 4, 5))
    # Enough masked inputs, but only two holders answer: client 1's seed cannot be rebuilt.
    with pytest.raises(TooFewSurvivors, match=r"cannot reconstruct client 1's self-mask seed: "
                                              r"2 share\(s\) arrived, the threshold is 3"):
        _run(cfg, xs, gone_at_unmask=(3, 4, 5))
    # Late replies can still rescue a round whose first finish() found too few shares.
    clients, server, request = _to_unmask(cfg)
    for c in (1, 2):
        server.receive_unmask(clients[c].unmask(request))
    with pytest.raises(TooFewSurvivors, match="the threshold is 3"):
        server.finish()
    server.receive_unmask(clients[3].unmask(request))
    assert server.finish().survivors == cfg.clients
    # The next round is a fresh pair of objects and proceeds.
    assert _run(cfg, xs).survivors == cfg.clients


class _GreedyServer(SecAggServer):
    """A chief that pretends client 2 dropped while keeping its masked input in the sum."""

    def close_masked(self) -> UnmaskRequest:
        honest = super().close_masked()
        return UnmaskRequest(honest.survivors, honest.dropouts | {2})


def test_a_client_refuses_a_server_that_asks_for_both_shares_of_one_peer() -> None:
    cfg = _config()
    with pytest.raises(UnsafeRequest, match=r"client 1 refuses to unmask: the server asks for "
                                            r"both kinds of share of client\(s\) \[2\], which "
                                            "would reveal their inputs"):
        _run(cfg, _inputs(cfg), server=_GreedyServer(cfg))


def _to_unmask(cfg):
    clients = _clients(cfg)
    server = SecAggServer(cfg)
    for c in clients.values():
        server.receive_advert(c.advertise())
    adverts = server.close_adverts()
    for c in clients:
        server.receive_shares(clients[c].share_keys(adverts[c]))
    forwarded = server.close_shares()
    for c in clients:
        server.receive_masked(clients[c].mask(forwarded[c], FP.encode(np.zeros(cfg.length))))
    return clients, server, server.close_masked()


def test_a_client_answers_one_unmasking_request_only() -> None:
    cfg = _config()
    clients, _server, request = _to_unmask(cfg)
    clients[1].unmask(request)
    with pytest.raises(MessageError, match="client 1 is at 'done', not 'unmask'"):
        clients[1].unmask(UnmaskRequest(request.survivors - {2}, frozenset({2})))


EVERYONE = frozenset(range(1, 6))


@pytest.mark.parametrize("request_,sentence", [
    (UnmaskRequest(EVERYONE - {2}, frozenset({2})), "does not list it as a survivor"),
    (UnmaskRequest(EVERYONE - {4}, frozenset()), r"neither survivor nor dropout for "
                                                 r"client\(s\) \[4\]"),
    (UnmaskRequest(frozenset({1, 2}), EVERYONE - {1, 2}), "only 2 of its group survived, fewer "
                                                          "than the threshold 3"),
])
def test_a_client_refuses_an_inconsistent_unmasking_request(request_, sentence) -> None:
    clients, _server, _ = _to_unmask(_config())
    with pytest.raises(UnsafeRequest, match=f"client 2 refuses to unmask: .*{sentence}"):
        clients[2].unmask(request_)


def _to_unmask_without_5(cfg):
    clients = _clients(cfg)
    server = SecAggServer(cfg)
    for c in clients.values():
        server.receive_advert(c.advertise())
    adverts = server.close_adverts()
    for c in clients:
        server.receive_shares(clients[c].share_keys(adverts[c]))
    forwarded = server.close_shares()
    for c in (1, 2, 3, 4):  # client 5 drops after sharing keys: its mask key is rebuilt
        server.receive_masked(clients[c].mask(forwarded[c], FP.encode(np.zeros(cfg.length))))
    return clients, server, server.close_masked()


def test_holders_returning_wrong_key_shares_are_caught() -> None:
    cfg = _config()
    # One holder lies: the shares no longer lie on one polynomial of a 32-byte secret.
    clients, server, request = _to_unmask_without_5(cfg)
    reply = clients[1].unmask(request)
    server.receive_unmask(UnmaskReply(1, reply.seed_shares, {5: bytes(65) + b"\x01"}))
    for c in (2, 3):
        server.receive_unmask(clients[c].unmask(request))
    with pytest.raises(TamperedShare, match="the shares of dropped client 5's mask key are "
                                            "inconsistent"):
        server.finish()
    # All holders lie alike (each sends its share of 5's self-mask seed instead): a valid
    # secret, but not the key 5 advertised.
    clients, server, request = _to_unmask_without_5(cfg)
    for c in (1, 2, 3):
        reply = clients[c].unmask(request)
        server.receive_unmask(UnmaskReply(c, reply.seed_shares,
                                          {5: clients[c]._seed_shares[5]}))
    with pytest.raises(TamperedShare, match="rebuild a key that does not match its advertised "
                                            "public key"):
        server.finish()


def test_a_tampered_share_is_detected_with_a_sentence() -> None:
    cfg = _config()
    clients = _clients(cfg)
    server = SecAggServer(cfg)
    for c in clients.values():
        server.receive_advert(c.advertise())
    adverts = server.close_adverts()
    for c in clients:
        server.receive_shares(clients[c].share_keys(adverts[c]))
    forwarded = server.close_shares()[1]
    first = forwarded.shares[0]
    bad = EncryptedShare(first.sender, 1, first.sealed[:-1] + bytes([first.sealed[-1] ^ 0x80]))
    with pytest.raises(TamperedShare, match=f"the encrypted share from client {first.sender} to "
                                            "client 1 fails its authentication tag"):
        clients[1].mask(ForwardedShares(1, (bad, *forwarded.shares[1:])),
                        FP.encode(np.zeros(cfg.length)))
    # The failed step ends client 1's round: it answers nothing more.
    with pytest.raises(MessageError, match="client 1 refused or failed an earlier step of round "
                                           "3: it takes no further part in it"):
        clients[1].unmask(UnmaskRequest(EVERYONE, frozenset()))


def test_wrong_lengths_dtypes_senders_and_phases_are_refused() -> None:
    cfg = _config(length=10)
    clients = _clients(cfg)
    server = SecAggServer(cfg)
    advert = clients[1].advertise()
    with pytest.raises(MessageError, match="collecting 'adverts', not 'shares'"):
        server.close_shares()
    server.receive_advert(advert)
    with pytest.raises(MessageError, match="client 1 advertised keys twice"):
        server.receive_advert(advert)
    for c in (2, 3, 4, 5):
        server.receive_advert(clients[c].advertise())
    adverts = server.close_adverts()
    bundle = clients[1].share_keys(adverts[1])
    with pytest.raises(MessageError, match=r"client 1 sent shares for \[2, 3, 4\], not for its "
                                           r"neighbours that advertised, \[2, 3, 4, 5\]"):
        server.receive_shares(type(bundle)(1, bundle.shares[:3]))
    server.receive_shares(bundle)
    for c in (2, 3, 4, 5):
        server.receive_shares(clients[c].share_keys(adverts[c]))
    forwarded = server.close_shares()
    with pytest.raises(MessageError, match="shares for client 2 were sent to client 1"):
        clients[1].mask(forwarded[2], FP.encode(np.zeros(10)))
    with pytest.raises(MessageError, match=r"client 1's masked input is uint32 of shape \(10,\), "
                                           r"not uint16 of shape \(10,\)"):
        server.receive_masked(MaskedInput(1, np.zeros(10, np.uint32)))
    with pytest.raises(MessageError, match="client 9 is not selected for round 3"):
        SecAggClient(cfg, 9)


@pytest.mark.parametrize("wrong,sentence", [
    (np.zeros(10, np.float32), r"is uint16 of shape \(10,\), not float32 of shape \(10,\)"),
    (np.zeros(9, np.uint16), r"not uint16 of shape \(9,\)"),
    ([0] * 10, "not list of shape"),
])
def test_a_client_refuses_an_encoded_input_of_the_wrong_kind(wrong, sentence) -> None:
    cfg = _config(length=10)
    clients = _clients(cfg)
    server = SecAggServer(cfg)
    for c in clients.values():
        server.receive_advert(c.advertise())
    adverts = server.close_adverts()
    for c in clients:
        server.receive_shares(clients[c].share_keys(adverts[c]))
    with pytest.raises(MessageError, match=sentence):
        clients[1].mask(server.close_shares()[1], wrong)


@pytest.mark.parametrize("kw,sentence", [
    ({"n": 2}, "at least 3 clients, not 2"),
    ({"threshold": 1}, "the threshold is from 2 to 5 .* not 1"),
    ({"threshold": 6}, "the threshold is from 2 to 5 .* not 6"),
    ({"bits": 8}, "not Z_\\(2\\^8\\)"),
    ({"length": 0}, "a positive integer, not 0"),
])
def test_an_unusable_round_configuration_is_refused(kw, sentence) -> None:
    from fedberry.secagg import ConfigError

    with pytest.raises(ConfigError, match=sentence):
        _config(**kw)


# Chi-square test of uniformity on Z_(2^16): 2^20 coordinates into 2^16 bins (16 expected per
# bin), df = 2^16 - 1, significance level alpha = 1e-6 per vector (Wilson-Hilferty quantile).
# The clients' randomness is seeded, so the outcome is fixed; the control shows the statistic
# rejects a plain encoded update by a wide margin.
ALPHA = 1e-6
BINS = 1 << 16


def _chi2_critical(df: int, alpha: float) -> float:
    z = NormalDist().inv_cdf(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def _chi2_uniform(values: np.ndarray) -> float:
    counts = np.bincount(values, minlength=BINS).astype(np.float64)
    expected = values.size / BINS
    return float(((counts - expected) ** 2).sum() / expected)


def test_every_masked_vector_the_server_receives_is_indistinguishable_from_uniform() -> None:
    cfg = _config(length=1 << 20)
    xs = {c: np.random.default_rng(c).normal(0, 0.2, cfg.length).clip(-1, 1)
          for c in cfg.clients}
    seen: dict[int, np.ndarray] = {}
    _run(cfg, xs, masked_seen=seen)
    critical = _chi2_critical(BINS - 1, ALPHA)
    assert _chi2_uniform(FP.encode(xs[1])) > 100 * critical  # the control: plain is not uniform
    for c, vector in seen.items():
        assert vector.dtype == np.uint16
        assert _chi2_uniform(vector) < critical, f"client {c}'s masked input"


def test_a_server_splitting_a_group_into_survived_and_dropped_cannot_reach_both_thresholds(
        ) -> None:
    # The server tells clients 1-2 that client 5 survived and clients 3-4 that it dropped (and
    # asks 5 itself as a survivor), hoping to rebuild both 5's seed and its mask key. With a
    # majority threshold (3 of 5) each half is too small: both rebuilds fail.
    cfg = _config()
    clients, server, _ = _to_unmask(cfg)
    survived = UnmaskRequest(EVERYONE, frozenset())
    dropped = UnmaskRequest(EVERYONE - {5}, frozenset({5}))
    seeds, keys_ = {}, {}
    for c, req in ((1, survived), (2, survived), (5, survived), (3, dropped), (4, dropped)):
        reply = clients[c].unmask(req)
        seeds.update({c: reply.seed_shares[5]} if 5 in reply.seed_shares else {})
        keys_.update({c: reply.key_shares[5]} if 5 in reply.key_shares else {})
    from fedberry.secagg import shamir

    assert len(seeds) == 3 and len(keys_) == 2  # 5 itself hands over its own seed share
    with pytest.raises(TooFewSurvivors, match="threshold is 3"):
        shamir.combine(keys_, cfg.threshold)


def test_the_server_keeps_one_ring_sum_not_every_masked_input() -> None:
    import tracemalloc

    cfg = _config(n=6, length=200_000)
    clients = _clients(cfg)
    tracemalloc.start()
    try:
        server = SecAggServer(cfg)
        for c in clients.values():
            server.receive_advert(c.advertise())
        adverts = server.close_adverts()
        for c in clients:
            server.receive_shares(clients[c].share_keys(adverts[c]))
        forwarded = server.close_shares()
        kept_before = tracemalloc.get_traced_memory()[0]
        for c in clients:
            masked = clients[c].mask(forwarded[c], FP.encode(np.zeros(cfg.length)))
            server.receive_masked(masked)
            del masked
        kept = tracemalloc.get_traced_memory()[0] - kept_before
    finally:
        tracemalloc.stop()
    one_vector = cfg.length * 2
    assert kept < one_vector, f"the server kept {kept} bytes for six {one_vector}-byte inputs"


@pytest.mark.parametrize("missing_from", ["advertise", "share_keys"])
def test_a_client_whose_neighbours_vanish_refuses_to_go_on(missing_from) -> None:
    # 12 clients, 4 neighbours each, threshold 3: client 1 keeps only one neighbour, so its
    # secrets could not be rebuilt and its input would be masked by one pair only.
    cfg = _config(n=12, length=50, neighbors=4)
    gone = sorted(cfg.graph[1])[:3]
    clients = _clients(cfg)
    server = SecAggServer(cfg)
    for c in clients:
        if not (missing_from == "advertise" and c in gone):
            server.receive_advert(clients[c].advertise())
    adverts = server.close_adverts()
    if missing_from == "advertise":
        with pytest.raises(UnsafeRequest, match="only 1 of client 1's 4 neighbours advertised "
                                                "keys: with itself that is below the threshold "
                                                "of 3 holders"):
            clients[1].share_keys(adverts[1])
        return
    for c in adverts:
        if c not in gone:
            server.receive_shares(clients[c].share_keys(adverts[c]))
    with pytest.raises(UnsafeRequest, match="only 1 of client 1's neighbours sent key shares: "
                                            "masking with so few would expose its input"):
        clients[1].mask(server.close_shares()[1], FP.encode(np.zeros(cfg.length)))


@settings(max_examples=25, deadline=None)
@given(survivors=st.sets(st.integers(1, 6)), dropouts=st.sets(st.integers(1, 6)))
@example(survivors={1, 2, 3}, dropouts={4, 5})  # valid requests: the reply is checked
@example(survivors={1, 2, 3, 4, 5}, dropouts=set())
def test_no_unmasking_request_gets_both_shares_of_any_peer(survivors, dropouts) -> None:
    clients, _server, _ = _to_unmask(_config(length=8))
    try:
        reply = clients[1].unmask(UnmaskRequest(frozenset(survivors), frozenset(dropouts)))
    except UnsafeRequest:
        return
    assert not set(reply.seed_shares) & set(reply.key_shares)
    assert set(reply.seed_shares) <= survivors and set(reply.key_shares) <= dropouts
    assert not survivors & dropouts


def test_the_benchmark_runs_a_small_round_and_prints_its_row(capsys) -> None:
    from fedberry.secagg import bench

    bench.main(["--clients", "5", "--params", "3000", "--prg-megabytes", "1", "--complete"])
    out = capsys.readouterr().out
    assert "mask expansion" in out and "raw keystream: ChaCha20" in out
    assert "| 5 | 3,000 | 4 | 3 | 1 |" in out  # 5 clients: the default is the complete graph


def test_the_32_bit_ring_gives_the_exact_sum_and_its_finer_bound() -> None:
    cfg = _config(length=300, bits=32)
    fp32 = FixedPoint(clip=1.0, bits=32, max_workers=256)
    xs = _inputs(cfg, 4)
    clients = _clients(cfg)
    server = SecAggServer(cfg)
    for c in clients.values():
        server.receive_advert(c.advertise())
    adverts = server.close_adverts()
    for c in clients:
        server.receive_shares(clients[c].share_keys(adverts[c]))
    forwarded = server.close_shares()
    for c in clients:
        server.receive_masked(clients[c].mask(forwarded[c], fp32.encode(xs[c])))
    request = server.close_masked()
    for c in (1, 2, 3):  # 4 and 5 drop after their masked inputs
        server.receive_unmask(clients[c].unmask(request))
    result = server.finish()
    assert result.ring_sum.dtype == np.uint32
    expected = np.zeros(cfg.length, np.uint32)
    for c in cfg.clients:
        np.add(expected, fp32.encode(xs[c]), out=expected)
    assert np.array_equal(result.ring_sum, expected)
    error = np.max(np.abs(fp32.decode_sum(result.ring_sum, 5) - sum(xs.values())))
    assert error <= fp32.sum_error_bound(5) < FP.sum_error_bound(5) / 1000


def test_the_server_says_whom_each_phase_still_waits_for() -> None:
    cfg = _config()
    clients = _clients(cfg)
    server = SecAggServer(cfg)
    assert server.phase == "adverts" and server.waiting_for == EVERYONE
    for c in (1, 2, 3, 4):
        server.receive_advert(clients[c].advertise())
    assert server.waiting_for == {5}
    adverts = server.close_adverts()  # the deadline: 5 never advertised
    assert server.phase == "shares" and server.waiting_for == {1, 2, 3, 4}
    for c in (1, 2, 3, 4):
        server.receive_shares(clients[c].share_keys(adverts[c]))
    assert server.waiting_for == frozenset()
    forwarded = server.close_shares()
    server.receive_masked(clients[1].mask(forwarded[1], FP.encode(np.zeros(cfg.length))))
    assert server.phase == "masked" and server.waiting_for == {2, 3, 4}
