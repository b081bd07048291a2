"""The sans-IO wire format: round trips, every limit, and any split or coalescing of the bytes.

A limit test feeds only the bytes up to the offending field and checks that the decoder refuses
right there, before it has allocated anything for what follows (np.empty is watched).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from fedberry.protocol import frames as protocol
from fedberry.protocol.frames import (
    ALLOWED_DTYPES,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    ErrorCode,
    FrameDecoder,
    Limits,
    MsgType,
    ProtocolError,
    TensorSpec,
    encode,
    spec_from_json,
    spec_mismatch,
    spec_of,
    spec_to_json,
)


def model(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal(5),
            np.arange(6, dtype=np.int64).reshape(2, 3), np.array(3, dtype=np.int64),
            np.zeros((0, 4), np.float32), np.array([True, False])]


def raw_frame(msg_type: int, meta: dict | bytes, payload: bytes = b"", *,
              payload_len: int | None = None, magic: bytes = MAGIC, version: int = VERSION,
              meta_len: int | None = None) -> bytes:
    meta_bytes = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    header = HEADER.pack(magic, version, msg_type, 0,
                         len(meta_bytes) if meta_len is None else meta_len,
                         len(payload) if payload_len is None else payload_len)
    return header + meta_bytes + payload


def tensor_meta(*specs: tuple[str, list[int]], **extra: object) -> dict:
    return {"tensors": [{"dtype": d, "shape": s} for d, s in specs], **extra}


def refuse(data: bytes, code: ErrorCode, limits: Limits | None = None,
           expected: protocol.Spec | None = None) -> ProtocolError:
    decoder = FrameDecoder(limits)
    decoder.expected = expected
    with pytest.raises(ProtocolError) as info:
        decoder.receive_data(data)
    assert info.value.code == code, info.value.message
    assert decoder.broken
    return info.value


@pytest.fixture
def no_alloc(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Records every tensor the decoder allocates."""
    calls: list[tuple] = []
    real = np.empty

    def spy(shape, dtype=float, *a, **k):  # type: ignore[no-untyped-def]
        calls.append((shape, dtype))
        return real(shape, dtype, *a, **k)

    monkeypatch.setattr(protocol.np, "empty", spy)
    return calls


# -- round trips -----------------------------------------------------------------------------
def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_round_trip_keeps_meta_dtypes_shapes_and_bits() -> None:
    arrays = model()
    frame = encode(MsgType.UPDATE, {"round": 3, "num_samples": 12.5, "metrics": {"loss": 0.1}},
                   arrays)
    data = frame.tobytes()
    assert len(data) == frame.nbytes
    (got,) = FrameDecoder().receive_data(data)
    assert got.type == MsgType.UPDATE and got.nbytes == len(data)
    assert got.meta["round"] == 3 and got.meta["metrics"] == {"loss": 0.1}
    assert_same(got.tensors, arrays)
    assert got.tensors[3].shape == ()  # a 0-d tensor stays 0-d (BatchNorm's step counter)


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_every_allowed_dtype_round_trips(dtype: str) -> None:
    a = (np.arange(24) % 2 == 0) if dtype == "|b1" else np.arange(24).astype(dtype)
    a = a.reshape(2, 3, 4)
    (got,) = FrameDecoder().receive_data(encode(MsgType.GLOBAL, {"round": 0}, [a]).tobytes())
    assert_same(got.tensors, [a.astype(dtype)])


def test_big_endian_and_non_contiguous_input_travel_little_endian() -> None:
    a = np.arange(12, dtype=">f4").reshape(3, 4).T  # big-endian and transposed
    (got,) = FrameDecoder().receive_data(encode(MsgType.INIT, {}, [a]).tobytes())
    assert got.tensors[0].dtype.str == "<f4"
    np.testing.assert_array_equal(got.tensors[0], a)


def test_encode_refuses_dtypes_that_cannot_travel() -> None:
    for bad in (np.array(["x"], object), np.array([1 + 2j]), np.array(["ab"])):
        with pytest.raises(ValueError, match="cannot be sent"):
            encode(MsgType.UPDATE, {}, [bad])


def test_frames_without_tensors_and_error_frames() -> None:
    error = {"code": ErrorCode.STALE.value, "message": "late", "fatal": False}
    frames = FrameDecoder().receive_data(
        encode(MsgType.PING, {}).tobytes() + encode(MsgType.ERROR, error).tobytes()
        + encode(MsgType.UPDATE, {"round": 1}).tobytes())
    assert [f.type for f in frames] == [MsgType.PING, MsgType.ERROR, MsgType.UPDATE]
    assert frames[1].meta == {"code": "stale_update", "message": "late", "fatal": False}
    assert frames[2].tensors == [] and frames[2].meta["tensors"] == []


def test_encode_refuses_nan_in_metadata() -> None:
    with pytest.raises(ValueError):
        encode(MsgType.UPDATE, {"num_samples": float("nan")})


# -- byte feeding ----------------------------------------------------------------------------
def stream() -> tuple[bytes, list[list[np.ndarray]]]:
    models = [model(i) for i in range(3)]
    parts = [encode(MsgType.HELLO, {"worker_id": "w", "nonce": "0" * 64}).tobytes()]
    for i, m in enumerate(models):
        parts.append(encode(MsgType.UPDATE, {"round": i}, m).tobytes())
        parts.append(encode(MsgType.PING, {}).tobytes())
    return b"".join(parts), models


def check_stream(frames: list[protocol.Frame], models: list[list[np.ndarray]]) -> None:
    assert [f.type for f in frames] == [MsgType.HELLO] + [MsgType.UPDATE, MsgType.PING] * 3
    for i, m in enumerate(models):
        assert frames[1 + 2 * i].meta["round"] == i
        assert_same(frames[1 + 2 * i].tensors, m)


def test_one_byte_at_a_time() -> None:
    data, models = stream()
    decoder = FrameDecoder()
    frames = []
    for i in range(len(data)):
        frames += decoder.receive_data(data[i:i + 1])
    check_stream(frames, models)


def test_everything_in_one_chunk() -> None:
    data, models = stream()
    check_stream(FrameDecoder().receive_data(data), models)


@pytest.mark.parametrize("seed", range(5))
def test_random_splits(seed: int) -> None:
    data, models = stream()
    rng = np.random.default_rng(seed)
    cuts = sorted(set(rng.integers(0, len(data), 40).tolist()) | {0, len(data)})
    decoder = FrameDecoder()
    frames = []
    for a, b in zip(cuts, cuts[1:]):
        frames += decoder.receive_data(memoryview(data)[a:b])
    check_stream(frames, models)


def test_zero_copy_interface_like_a_buffered_protocol() -> None:
    """get_buffer/buffer_updated as asyncio drives them: partial fills of the offered buffer."""
    data, models = stream()
    rng = np.random.default_rng(7)
    decoder = FrameDecoder()
    frames, pos = [], 0
    while pos < len(data):
        buf = decoder.get_buffer()
        assert len(buf) > 0
        n = min(len(buf), int(rng.integers(1, 5000)), len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        frames += decoder.buffer_updated(n)
    check_stream(frames, models)


def test_tensor_bytes_land_in_the_returned_arrays_without_a_copy() -> None:
    a = np.arange(1000, dtype=np.float32)
    data = encode(MsgType.GLOBAL, {"round": 0}, [a]).tobytes()
    decoder = FrameDecoder()
    decoder.receive_data(data[:HEADER_SIZE])
    decoder.receive_data(data[HEADER_SIZE:len(data) - a.nbytes])
    target = decoder.get_buffer()  # the tensor's own memory
    assert len(target) == a.nbytes
    (frame,) = decoder.receive_data(data[len(data) - a.nbytes:])
    assert np.shares_memory(np.frombuffer(target, np.float32), frame.tensors[0])


def test_a_frame_waits_for_memory_reading_nothing_then_arrives_whole() -> None:
    """``allocate`` may say "not now": the decoder stops before the tensor bytes, offers no
    buffer, and goes on where it was once ``retry()`` gets the arrays."""
    data, models = stream()
    asked: list[protocol.Spec] = []
    given: list[np.ndarray] = []

    def allocate(specs: protocol.Spec) -> list[np.ndarray] | None:
        asked.append(specs)
        if len(asked) % 2:  # the first time for each frame: not now; when retried: yes
            return None
        arrays = [np.empty(s.shape, np.dtype(s.dtype)) for s in specs]
        given.extend(arrays)
        return arrays

    decoder = FrameDecoder()
    decoder.allocate = allocate
    frames, pos, waits = [], 0, 0
    while pos < len(data):
        if decoder.waiting:
            with pytest.raises(RuntimeError, match="pause reading"):
                decoder.get_buffer()
            waits += 1
            assert decoder.retry() and not decoder.waiting
            continue
        buf = decoder.get_buffer()
        n = min(len(buf), 3000, len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        frames += decoder.buffer_updated(n)
    check_stream(frames, models)
    assert waits == 3 and len(asked) == 6
    assert all(any(t is g for g in given) for f in frames for t in f.tensors if t.size)


# -- limits and malformed frames -------------------------------------------------------------
def test_bad_magic() -> None:
    refuse(raw_frame(MsgType.PING, {}, magic=b"HTTP"), ErrorCode.BAD_FRAME)


def test_other_version_says_to_upgrade() -> None:
    exc = refuse(raw_frame(MsgType.PING, {}, version=VERSION + 1), ErrorCode.VERSION)
    assert "upgrade" in exc.message


@pytest.mark.parametrize("mtype", [0, max(MsgType) + 1, 255])
def test_unknown_message_type(mtype: int) -> None:
    refuse(raw_frame(mtype, {}), ErrorCode.BAD_FRAME)


def test_metadata_over_the_limit_is_refused_from_the_header_alone(no_alloc: list) -> None:
    header = raw_frame(MsgType.HELLO, b"", meta_len=(1 << 32) - 1)[:HEADER_SIZE]
    exc = refuse(header, ErrorCode.LIMIT)
    assert "metadata" in exc.message and no_alloc == []
    refuse(raw_frame(MsgType.HELLO, b"", meta_len=101)[:HEADER_SIZE], ErrorCode.LIMIT,
           Limits(max_meta_bytes=100))


def test_payload_over_the_limit_is_refused_from_the_header_alone(no_alloc: list) -> None:
    header = raw_frame(MsgType.UPDATE, b"{}", payload_len=(1 << 64) - 1)[:HEADER_SIZE]
    refuse(header, ErrorCode.LIMIT)
    refuse(raw_frame(MsgType.UPDATE, b"{}", payload_len=1001)[:HEADER_SIZE], ErrorCode.LIMIT,
           Limits(max_payload=1000))
    assert no_alloc == []


def test_a_zero_payload_limit_refuses_any_tensor_bytes() -> None:
    # What the chief uses before authentication.
    frame = encode(MsgType.UPDATE, {}, [np.zeros(2, np.float32)]).tobytes()
    refuse(frame[:HEADER_SIZE], ErrorCode.LIMIT, Limits(max_payload=0))


def test_payload_on_a_frame_type_without_tensors() -> None:
    refuse(raw_frame(MsgType.HELLO, b"{}", payload_len=8)[:HEADER_SIZE], ErrorCode.BAD_FRAME)


def test_tensor_list_on_a_frame_type_without_tensors() -> None:
    refuse(raw_frame(MsgType.PING, tensor_meta()), ErrorCode.BAD_FRAME)


def test_empty_metadata() -> None:
    refuse(raw_frame(MsgType.PING, b""), ErrorCode.BAD_FRAME)


@pytest.mark.parametrize("meta", [b"\xff\xfe", b"{", b"[1, 2]", b'"text"', b"null",
                                  b'{"round": NaN}', b'{"n": Infinity}', b"[" * 100_000])
def test_metadata_must_be_a_json_object(meta: bytes) -> None:
    refuse(raw_frame(MsgType.PING, meta), ErrorCode.BAD_FRAME)


def test_tensor_frame_without_a_tensor_list() -> None:
    refuse(raw_frame(MsgType.UPDATE, {"round": 0}), ErrorCode.BAD_FRAME)
    refuse(raw_frame(MsgType.UPDATE, {"tensors": {"dtype": "<f4"}}), ErrorCode.BAD_FRAME)


def test_too_many_tensors(no_alloc: list) -> None:
    meta = tensor_meta(*[("<f4", [0])] * 11)
    refuse(raw_frame(MsgType.UPDATE, meta), ErrorCode.LIMIT, Limits(max_tensors=10))
    assert no_alloc == []


@pytest.mark.parametrize("dtype", ["|O", ">f4", "<c8", "<U3", "|V8", "float32", "<f4 ", None, 4])
def test_dtypes_outside_the_allowed_set(dtype: object, no_alloc: list) -> None:
    refuse(raw_frame(MsgType.UPDATE, {"tensors": [{"dtype": dtype, "shape": [1]}]}, b"\0" * 4),
           ErrorCode.BAD_FRAME)
    assert no_alloc == []


@pytest.mark.parametrize("shape", [[-1], [1.0], [True], ["3"], [None], 3, None, [[2]],
                                   [1] * 9, [1 << 40]])
def test_shapes_that_are_not_lists_of_sizes(shape: object, no_alloc: list) -> None:
    refuse(raw_frame(MsgType.UPDATE, {"tensors": [{"dtype": "<f4", "shape": shape}]}),
           ErrorCode.BAD_FRAME)
    assert no_alloc == []


def test_tensor_descriptions_must_be_objects() -> None:
    refuse(raw_frame(MsgType.UPDATE, {"tensors": [["<f4", [1]]]}, b"\0" * 4), ErrorCode.BAD_FRAME)


def test_zero_size_tensor_with_enormous_other_dimensions(no_alloc: list) -> None:
    # Holds no bytes, but numpy refuses to build it: a limit, not a crash.
    shape = [0] + [(1 << 40) - 1] * 7
    refuse(raw_frame(MsgType.UPDATE, tensor_meta(("<f4", shape))), ErrorCode.LIMIT)
    assert no_alloc == []


@pytest.mark.parametrize("payload_len", [0, 15, 17, 1 << 20])
def test_tensor_sizes_must_add_up_to_the_payload(payload_len: int, no_alloc: list) -> None:
    meta = tensor_meta(("<f4", [2]), ("<f8", [1]))  # 16 bytes
    data = raw_frame(MsgType.UPDATE, meta, payload_len=payload_len)
    exc = refuse(data, ErrorCode.BAD_FRAME)
    assert "16 bytes" in exc.message and no_alloc == []


def test_frames_must_match_the_expected_model(no_alloc: list) -> None:
    expected = spec_of([np.zeros((2, 3), np.float32), np.zeros(3, np.float32)])
    wrong_shape = encode(MsgType.UPDATE, {}, [np.zeros((3, 2), np.float32),
                                              np.zeros(3, np.float32)]).tobytes()
    exc = refuse(wrong_shape, ErrorCode.SPEC_MISMATCH, expected=expected)
    assert "tensor 0" in exc.message
    wrong_dtype = encode(MsgType.UPDATE, {}, [np.zeros((2, 3), np.float64),
                                              np.zeros(3, np.float32)]).tobytes()
    refuse(wrong_dtype, ErrorCode.SPEC_MISMATCH, expected=expected)
    one_less = encode(MsgType.UPDATE, {}, [np.zeros((2, 3), np.float32)]).tobytes()
    exc = refuse(one_less, ErrorCode.SPEC_MISMATCH, expected=expected)
    assert "1 tensors" in exc.message
    assert no_alloc == []


def test_a_broken_decoder_stays_broken() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.receive_data(b"GARBAGE-GARBAGE-GARBAGE")
    good = encode(MsgType.PING, {}).tobytes()
    with pytest.raises(ProtocolError):
        decoder.receive_data(good)
    with pytest.raises(ProtocolError):
        decoder.get_buffer()
    with pytest.raises(ProtocolError):
        decoder.buffer_updated(1)


def test_limits_can_change_between_frames() -> None:
    decoder = FrameDecoder(Limits(max_payload=0))
    decoder.receive_data(encode(MsgType.PING, {}).tobytes())
    decoder.limits = Limits(max_payload=64)
    (f,) = decoder.receive_data(encode(MsgType.INIT, {}, [np.zeros(16, np.float32)]).tobytes())
    assert f.tensors[0].shape == (16,)


def test_header_layout_is_fixed() -> None:
    data = encode(MsgType.PING, {}).tobytes()
    magic, version, mtype, flags, meta_len, payload_len = struct.unpack("<4sBBHIQ", data[:20])
    assert (magic, version, mtype, flags, meta_len, payload_len) == (
        b"FDBR", 1, MsgType.PING, 0, 2, 0)


# -- model specs -----------------------------------------------------------------------------
def test_spec_json_round_trip_and_mismatch_sentences() -> None:
    spec = spec_of(model())
    assert spec_from_json(json.loads(json.dumps(spec_to_json(spec))), Limits()) == spec
    assert spec_mismatch(spec, spec) is None
    other = spec[:-1] + (TensorSpec("<f4", (9,)),)
    assert spec_mismatch(spec, other) == (
        "tensor 5 is float32[9], the federation's is bool[2]")
    assert "3 tensors" in spec_mismatch(spec, spec[:3])


@pytest.mark.parametrize("bad", [None, {}, [["<f4"]], [["<f4", [1], 3]], [[">f4", [1]]],
                                 [["<f4", [-2]]], "[]", [1]])
def test_spec_from_json_refuses(bad: object) -> None:
    with pytest.raises(ProtocolError):
        spec_from_json(bad, Limits())


def test_spec_from_json_limits_the_tensor_count() -> None:
    with pytest.raises(ProtocolError):
        spec_from_json([["<f4", [1]]] * 3, Limits(max_tensors=2))


def test_auth_verify_refuses_what_a_peer_may_put_in_a_proof():
    from fedberry.protocol import auth

    good = auth.worker_proof("t" * 32, "a" * 64, "b" * 64)
    assert auth.verify(good, good)
    for bad in [None, 1, [good], good[:-1], good[:-1] + "\u00e9", "\u0000" * len(good)]:
        assert not auth.verify(good, bad)  # refused, never raised (hmac raises on non-ASCII)


# -- receive buffers and the NaN check on arrival ----------------------------------------------
def test_allocate_is_asked_only_once_the_frame_has_passed_every_check() -> None:
    asked: list[protocol.Spec] = []
    mine = [np.full((2, 3), 7, np.float32), np.full(3, 7, np.float32)]

    def allocate(specs: protocol.Spec) -> list[np.ndarray]:
        asked.append(specs)
        return mine

    expected = spec_of(mine)
    decoder = FrameDecoder()
    decoder.expected, decoder.allocate = expected, allocate
    with pytest.raises(ProtocolError):
        decoder.receive_data(encode(MsgType.UPDATE, {}, [np.zeros((3, 2), np.float32),
                                                         np.zeros(3, np.float32)]).tobytes())
    assert asked == []
    decoder = FrameDecoder()
    decoder.expected, decoder.allocate = expected, allocate
    sent = [np.ones((2, 3), np.float32), np.arange(3, dtype=np.float32)]
    (f,) = decoder.receive_data(encode(MsgType.UPDATE, {}, sent).tobytes())
    assert asked == [expected] and f.tensors[0] is mine[0] and f.tensors[1] is mine[1]
    assert_same(f.tensors, sent)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_the_first_tensor_with_nan_or_inf(bad: float) -> None:
    sent = [np.zeros(4, np.float16), np.arange(5, dtype=np.int64), np.zeros(3, np.float32),
            np.zeros(0, np.float32), np.zeros(2, np.float64)]
    sent[2][1] = sent[4][0] = bad
    decoder = FrameDecoder()
    decoder.check_finite = True
    (f,) = decoder.receive_data(encode(MsgType.UPDATE, {}, sent).tobytes())
    assert f.checked and f.non_finite == "tensor 2 contains NaN or Inf"
    (f,) = decoder.receive_data(encode(MsgType.UPDATE, {}, model()).tobytes())
    assert f.checked and f.non_finite is None  # the next frame starts clean
    plain = FrameDecoder()
    (f,) = plain.receive_data(encode(MsgType.UPDATE, {}, sent).tobytes())
    assert not f.checked and f.non_finite is None


def test_finite_on_float16_does_not_overflow_and_on_integers_is_true() -> None:
    assert protocol.finite(np.full(1000, 60000, np.float16))
    assert protocol.finite(np.arange(5)) and protocol.finite(np.zeros(0, np.float32))
    assert not protocol.finite(np.array(np.nan, np.float32))
    assert not protocol.finite(np.array([1, complex(0, np.inf)]))
