"""Property-based tests of the frame decoder: whatever bytes arrive, in whatever pieces, it
returns well-formed frames, waits for more, or raises ProtocolError; never anything else, and it
never allocates more than its limits allow."""

from __future__ import annotations

import json
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedberry.protocol import frames as protocol
from fedberry.protocol.frames import (
    ALLOWED_DTYPES,
    HEADER,
    MAGIC,
    VERSION,
    Frame,
    FrameDecoder,
    Limits,
    MsgType,
    ProtocolError,
    encode,
    spec_of,
)

LIMITS = Limits(max_meta_bytes=4096, max_tensors=16, max_payload=1 << 16)
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12)
metas = st.dictionaries(st.text(max_size=10).filter(lambda k: k != "tensors"), json_values,
                        max_size=5)
arrays = hnp.arrays(
    dtype=st.sampled_from(sorted(ALLOWED_DTYPES)).map(np.dtype),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
tensor_types = st.sampled_from([MsgType.INIT, MsgType.UPDATE, MsgType.GLOBAL])
other_types = st.sampled_from([t for t in MsgType if t not in protocol.TENSOR_TYPES])


@st.composite
def frames(draw: st.DrawFn) -> tuple[MsgType, dict, list[np.ndarray]]:
    if draw(st.booleans()):
        return draw(tensor_types), draw(metas), draw(st.lists(arrays, max_size=4))
    return draw(other_types), draw(metas), []


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def feed(decoder: FrameDecoder, pieces: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for piece in pieces:
        out += decoder.receive_data(piece)
    return out


def check_well_formed(frame: Frame, limits: Limits) -> None:
    assert isinstance(frame.type, MsgType) and isinstance(frame.meta, dict)
    if frame.type in protocol.TENSOR_TYPES:
        descr = frame.meta["tensors"]
        assert len(descr) == len(frame.tensors) <= limits.max_tensors
        for d, t in zip(descr, frame.tensors):
            assert t.dtype.str == d["dtype"] and list(t.shape) == d["shape"]
        assert sum(t.nbytes for t in frame.tensors) <= limits.max_payload
    else:
        assert frame.tensors == [] and "tensors" not in frame.meta


@FUZZ
@given(st.lists(frames(), min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=12))
def test_any_frames_round_trip_in_any_pieces(msgs: list, cuts: list[int]) -> None:
    data = b"".join(encode(t, m, ts).tobytes() for t, m, ts in msgs)
    got = feed(FrameDecoder(Limits()), chunked(data, cuts))
    assert len(got) == len(msgs)
    for frame, (t, meta, tensors) in zip(got, msgs):
        assert frame.type == t
        assert {k: v for k, v in frame.meta.items() if k != "tensors"} == json.loads(
            json.dumps(meta))
        assert len(frame.tensors) == len(tensors)
        for a, b in zip(frame.tensors, tensors):
            assert a.shape == b.shape and a.dtype == protocol.wire_dtype(b.dtype)
            assert a.tobytes() == np.ascontiguousarray(b, a.dtype).tobytes()


@FUZZ
@given(st.binary(max_size=3000), st.lists(st.integers(0, 5000), max_size=8))
def test_random_bytes(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(LIMITS)
    try:
        for frame in feed(decoder, chunked(data, cuts)):
            check_well_formed(frame, LIMITS)
    except ProtocolError as exc:
        assert decoder.broken and exc.code and exc.message


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    t, meta, tensors = draw(frames())
    data = bytearray(encode(t, meta, tensors).tobytes())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "header"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "header" and len(data) >= HEADER.size:
            # rewrite one header field (version, type, flags, lengths) with a boundary value
            fields = list(HEADER.unpack(bytes(data[:HEADER.size])))
            i = draw(st.integers(1, 5))
            fields[i] = _boundary(i, draw)
            data[:HEADER.size] = HEADER.pack(*fields)
    return bytes(data)


def _boundary(index: int, draw: st.DrawFn) -> int:
    bits = {1: 8, 2: 8, 3: 16, 4: 32, 5: 64}[index]
    near_limit = {4: [LIMITS.max_meta_bytes, LIMITS.max_meta_bytes + 1],
                  5: [LIMITS.max_payload, LIMITS.max_payload + 1]}.get(index, [])
    values = [0, 1, 7, 1000, 1 << (bits - 1), (1 << bits) - 1, *near_limit]
    return draw(st.sampled_from([v for v in values if v < 1 << bits]))


@FUZZ
@given(st.lists(mutated(), min_size=1, max_size=3), st.lists(st.integers(0, 10**6), max_size=8))
def test_mutated_frames(msgs: list[bytes], cuts: list[int]) -> None:
    decoder = FrameDecoder(LIMITS)
    try:
        for frame in feed(decoder, chunked(b"".join(msgs), cuts)):
            check_well_formed(frame, LIMITS)
    except ProtocolError as exc:
        assert decoder.broken and exc.code


@FUZZ
@given(st.lists(arrays, min_size=1, max_size=3), st.lists(arrays, min_size=0, max_size=3),
       tensor_types)
def test_expected_spec_is_enforced(expected: list, sent: list, t: MsgType) -> None:
    decoder = FrameDecoder(Limits())
    decoder.expected = spec_of(expected)
    data = encode(t, {}, sent).tobytes()
    try:
        (frame,) = decoder.receive_data(data)
    except ProtocolError:
        assert spec_of(sent) != spec_of(expected)
        return
    assert spec_of(frame.tensors) == spec_of(expected)


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 255))
def test_header_alone_never_allocates_past_the_limits(meta_len: int, payload_len: int,
                                                      mtype: int) -> None:
    decoder = FrameDecoder(LIMITS)
    header = HEADER.pack(MAGIC, VERSION, mtype, 0, meta_len, payload_len)
    try:
        assert decoder.receive_data(header) == []
    except ProtocolError:
        return
    # accepted so far: the only buffer it made is the metadata's, within the limit
    assert len(decoder.get_buffer()) == meta_len <= LIMITS.max_meta_bytes
    assert payload_len <= LIMITS.max_payload


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(sorted(ALLOWED_DTYPES) + ["|O", ">f4", "<c8", "x"]),
                          st.lists(st.integers(-2, 2**41), max_size=9)), max_size=20),
       st.integers(0, 2**20))
def test_hostile_tensor_descriptions_never_allocate_more_than_the_payload(
        descr: list, payload_len: int) -> None:
    meta = json.dumps({"tensors": [{"dtype": d, "shape": s} for d, s in descr]}).encode()
    header = HEADER.pack(MAGIC, VERSION, MsgType.UPDATE, 0, len(meta), payload_len)
    decoder = FrameDecoder(Limits(max_payload=1 << 20))
    try:
        decoder.receive_data(header + meta)
    except ProtocolError:
        return
    # accepted: the descriptions add up to exactly payload_len, within the limit
    total = sum(np.dtype(d).itemsize * math.prod(s) for d, s in descr)
    assert total == payload_len <= 1 << 20
