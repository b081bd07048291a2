"""The secure-aggregation primitives: keys, masks, Shamir shares, sealed shares, encoding, graph."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("cryptography", reason="secure aggregation needs the secagg extra")

from fedberry.secagg import aead, keys, prg, shamir  # noqa: E402
from fedberry.secagg.encoding import FixedPoint, clip_l2  # noqa: E402
from fedberry.secagg.errors import (  # noqa: E402
    ConfigError,
    MessageError,
    TamperedShare,
    TooFewSurvivors,
)
from fedberry.secagg.graph import (  # noqa: E402
    default_neighbors,
    default_threshold,
    neighbour_graph,
)


def _entropy(seed: int):
    return random.Random(seed).randbytes


# ---------------------------------------------------------------------------- keys
def test_both_ends_agree_the_same_key_and_purpose_round_and_pair_separate_it() -> None:
    a, b = keys.generate_keypair(_entropy(1)), keys.generate_keypair(_entropy(2))
    ab = keys.agree(a.private, b.public, purpose=b"mask", context=b"r1", pair=(1, 2))
    assert ab == keys.agree(b.private, a.public, purpose=b"mask", context=b"r1", pair=(2, 1))
    others = {keys.agree(a.private, b.public, purpose=p, context=c, pair=q)
              for p, c, q in ((b"share-encryption", b"r1", (1, 2)), (b"mask", b"r2", (1, 2)),
                              (b"mask", b"r1", (1, 3)))}
    assert ab not in others and len(others) == 3
    assert "private" not in repr(a) and a.private.hex() not in repr(a)


def test_a_degenerate_public_key_is_refused_with_a_sentence() -> None:
    a = keys.generate_keypair(_entropy(1))
    with pytest.raises(MessageError, match="degenerate X25519 point"):
        keys.agree(a.private, bytes(32), purpose=b"mask", context=b"", pair=(1, 2))
    with pytest.raises(MessageError, match="a public key is 32 bytes, not 31"):
        keys.agree(a.private, bytes(31), purpose=b"mask", context=b"", pair=(1, 2))


# ---------------------------------------------------------------------------- masks
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_a_mask_is_the_chacha20_keystream_read_little_endian_across_chunk_edges(dtype) -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    seed = bytes(range(32))
    length = prg.CHUNK_BYTES // np.dtype(dtype).itemsize * 2 + 7  # three chunks, one partial
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(
        bytes(length * np.dtype(dtype).itemsize))
    expected = np.frombuffer(stream, dtype=np.dtype(dtype).newbyteorder("<"))
    assert np.array_equal(prg.expand(seed, length, dtype), expected)
    assert not np.array_equal(prg.expand(bytes(32), 64, dtype), prg.expand(seed, 64, dtype))


def test_masks_added_and_subtracted_cancel_exactly_mod_2k() -> None:
    x = np.arange(1000, dtype=np.uint16)
    y = x.copy()
    prg.add_masks(y, [(b"a" * 32, 1), (b"b" * 32, 1), (b"a" * 32, -1)])
    prg.add_masks(y, [(b"b" * 32, -1)])
    assert np.array_equal(x, y)


def test_a_mask_target_of_the_wrong_kind_is_refused() -> None:
    with pytest.raises(MessageError, match="uint16 or uint32, not float32"):
        prg.add_masks(np.zeros(4, np.float32), [(b"a" * 32, 1)])
    with pytest.raises(MessageError, match="a mask seed is 32 bytes, not 3"):
        prg.add_masks(np.zeros(4, np.uint16), [(b"abc", 1)])
    with pytest.raises(MessageError, match="contiguous 1-D"):
        prg.add_masks(np.zeros((2, 2), np.uint16), [(b"a" * 32, 1)])


# ---------------------------------------------------------------------------- Shamir
@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(2, 12), data=st.data())
def test_any_threshold_of_shares_rebuilds_the_secret_and_fewer_are_refused(secret, n,
                                                                            data) -> None:
    t = data.draw(st.integers(1, n))
    holders = data.draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n,
                                 unique=True))
    shares = shamir.split(secret, holders, t, _entropy(n))
    subset = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=n,
                                unique=True))
    assert shamir.combine({h: shares[h] for h in subset}, t) == secret
    if t > 1:
        with pytest.raises(TooFewSurvivors, match=rf"cannot reconstruct x: {t - 1} share\(s\) "
                                                  rf"arrived, the threshold is {t}"):
            shamir.combine({h: shares[h] for h in subset[:t - 1]}, t, what="x")


def test_two_of_three_shares_rebuild_neither_secret() -> None:
    # Shares of a 3-threshold sharing mixed and combined as if the threshold were 2 rebuild no
    # 32-byte secret: refused as inconsistent, not returned as a wrong secret.
    a = shamir.split(bytes(32), [1, 2, 3], 3, _entropy(5))
    b = shamir.split(b"\xff" * 32, [1, 2, 3], 3, _entropy(5))
    assert a[1] != b[1]
    with pytest.raises(TamperedShare, match="inconsistent"):
        shamir.combine({1: a[1], 2: b[2]}, 2)


def test_a_malformed_share_or_split_is_refused() -> None:
    with pytest.raises(MessageError, match="a shared secret is 32 bytes, not 5"):
        shamir.split(b"short", [1, 2], 2, _entropy(0))
    with pytest.raises(MessageError, match="positive client ids"):
        shamir.split(bytes(32), [0, 1], 2, _entropy(0))
    with pytest.raises(MessageError, match="a share is 66 bytes, not 3"):
        shamir.combine({1: b"abc"}, 1)


# ---------------------------------------------------------------------------- sealed shares
def test_a_sealed_share_opens_only_unaltered_for_its_pair_and_round() -> None:
    key = bytes(range(32))
    sealed = aead.seal(key, b"share", context=b"round-1", sender=1, receiver=2,
                       entropy=_entropy(0))
    assert aead.open_sealed(key, sealed, context=b"round-1", sender=1, receiver=2) == b"share"
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for blob, ctx, snd, rcv in ((flipped, b"round-1", 1, 2), (sealed, b"round-2", 1, 2),
                                (sealed, b"round-1", 2, 1), (sealed, b"round-1", 1, 3)):
        with pytest.raises(TamperedShare, match=rf"from client {snd} to client {rcv} fails its "
                                                "authentication tag"):
            aead.open_sealed(key, blob, context=ctx, sender=snd, receiver=rcv)
    with pytest.raises(MessageError, match="shorter than a nonce and a tag"):
        aead.open_sealed(key, b"x", context=b"", sender=1, receiver=2)


# ---------------------------------------------------------------------------- encoding
def test_the_documented_rings_8_bit_in_16_and_24_bit_in_32_for_256_workers() -> None:
    assert FixedPoint(clip=1.0, bits=16, max_workers=256).levels == 127
    assert FixedPoint(clip=1.0, bits=32, max_workers=256).levels == 2**23 - 1


@pytest.mark.parametrize("bits", [16, 32])
def test_the_sum_of_max_workers_extreme_updates_does_not_wrap(bits) -> None:
    fp = FixedPoint(clip=2.5, bits=bits, max_workers=256)
    for value in (2.5, -2.5):
        enc = fp.encode(np.full(3, value))
        ring = np.zeros(3, fp.dtype)
        for _ in range(256):
            np.add(ring, enc, out=ring)
        assert np.allclose(fp.decode_sum(ring, 256), 256 * value, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 256), bits=st.sampled_from([16, 32]), stochastic=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_the_decoded_sum_is_within_the_stated_bound(n, bits, stochastic, seed) -> None:
    fp = FixedPoint(clip=0.7, bits=bits, max_workers=256, stochastic=stochastic)
    rng = np.random.default_rng(seed)
    xs = rng.uniform(-0.7, 0.7, size=(n, 50))
    xs[0, :2] = (0.7, -0.7)
    ring = np.zeros(50, fp.dtype)
    for x in xs:
        np.add(ring, fp.encode(x, rng), out=ring)
    error = np.max(np.abs(fp.decode_sum(ring, n) - xs.sum(axis=0)))
    assert error <= fp.sum_error_bound(n) * (1 + 1e-9)


def test_stochastic_rounding_is_unbiased_and_rounding_to_nearest_is_not() -> None:
    x = np.full(200_000, 0.3 * FixedPoint(clip=1.0).step)  # 0.3 of a step
    rng = np.random.default_rng(0)
    sto = FixedPoint(clip=1.0, stochastic=True)
    det = FixedPoint(clip=1.0)
    mean_sto = sto.decode_sum(sto.encode(x, rng), 1).mean()
    assert abs(mean_sto - x[0]) < 0.01 * sto.step  # 0.3 +- 5 sigma (sigma ~ 0.001 step)
    assert det.decode_sum(det.encode(x), 1).mean() == 0.0


def test_an_update_the_encoding_cannot_hold_is_refused_with_a_sentence() -> None:
    fp = FixedPoint(clip=1.0)
    with pytest.raises(MessageError, match="exceeds the clip bound 1: clip the update first"):
        fp.encode(np.array([0.5, 1.5]))
    with pytest.raises(MessageError, match="non-finite"):
        fp.encode(np.array([np.nan]))
    with pytest.raises(MessageError, match="flat float vector, not int64"):
        fp.encode(np.array([1, 2]))
    with pytest.raises(MessageError, match="needs a numpy random Generator"):
        FixedPoint(clip=1.0, stochastic=True).encode(np.zeros(2))
    with pytest.raises(MessageError, match="may have wrapped: the encoding allows at most 256"):
        fp.decode_sum(np.zeros(2, np.uint16), 257)
    with pytest.raises(MessageError, match="a flat uint16 vector, not uint32"):
        fp.decode_sum(np.zeros(2, np.uint32), 1)
    with pytest.raises(ConfigError, match="Z_\\(2\\^16\\) or Z_\\(2\\^32\\), not Z_\\(2\\^8\\)"):
        FixedPoint(clip=1.0, bits=8)
    with pytest.raises(ConfigError, match="40000 workers cannot share a 16-bit ring"):
        FixedPoint(clip=1.0, max_workers=40000)
    assert np.linalg.norm(clip_l2(np.array([3.0, 4.0]), 1.0)) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- graph
@pytest.mark.parametrize("n,k", [(10, 4), (100, 14), (7, 6), (5, 8)])
def test_the_neighbour_graph_is_k_regular_symmetric_and_fixed_by_the_seed(n, k) -> None:
    clients = list(range(1, n + 1))
    graph = neighbour_graph(clients, k, b"s" * 32)
    degree = min(k, n - 1)
    assert all(len(graph[c]) == degree and c not in graph[c] for c in clients)
    assert all(c in graph[p] for c in clients for p in graph[c])
    assert graph == neighbour_graph(clients, k, b"s" * 32)
    if degree < n - 1:
        assert graph != neighbour_graph(clients, k, b"t" * 32)


def test_the_defaults_and_a_bad_degree() -> None:
    assert [default_neighbors(n) for n in (3, 5, 8, 100, 1000)] == [2, 4, 6, 14, 20]
    assert [default_threshold(k) for k in (4, 6, 14)] == [3, 4, 8]
    with pytest.raises(ConfigError, match="an even number >= 2"):
        neighbour_graph(list(range(1, 11)), 3, b"s" * 32)


# ---------------------------------------------------------------------------- options
def test_secagg_options_parse_and_make_rounds() -> None:
    from fedberry.secagg import SecAggOptions

    assert SecAggOptions.parse("") == SecAggOptions()
    opts = SecAggOptions.parse(" threshold=4, neighbors=6 ,bits=32,rounding=stochastic")
    assert opts == SecAggOptions(threshold=4, neighbors=6, bits=32, rounding="stochastic")
    cfg = opts.round_config(2, tuple(range(1, 11)), 100, seed=bytes(32))
    assert (cfg.neighbors, cfg.threshold, cfg.bits) == (6, 4, 32)
    assert opts.encoding(clip=0.5).stochastic and opts.encoding(clip=0.5).levels == 2**23 - 1
    complete = SecAggOptions.parse("neighbors=all").round_config(1, tuple(range(1, 31)), 10)
    assert complete.neighbors == 29 and complete.threshold == 16


@pytest.mark.parametrize("text,sentence", [
    ("threshold", "'threshold' is not key=value"),
    ("threshold=3,threshold=4", "'threshold' is given twice"),
    ("neighbours=4", "unknown secagg option 'neighbours': use threshold, neighbors"),
    ("threshold=x", "secagg threshold is an integer, not 'x'"),
    ("threshold=1", "at least 2, not 1"),
    ("neighbors=5", "an even integer of at least 2 \\(or 'all'\\), not 5"),
    ("bits=8", "not Z_\\(2\\^8\\)"),
    ("rounding=up", "'nearest' or 'stochastic', not 'up'"),
])
def test_bad_secagg_options_are_refused_with_a_sentence(text, sentence) -> None:
    from fedberry.secagg import SecAggOptions

    with pytest.raises(ConfigError, match=sentence):
        SecAggOptions.parse(text)


def test_a_round_with_more_clients_than_the_ring_allows_is_refused() -> None:
    from fedberry.secagg import SecAggOptions

    with pytest.raises(ConfigError, match="4 clients exceed secagg max_workers 3"):
        SecAggOptions(max_workers=3).round_config(1, (1, 2, 3, 4), 10)
