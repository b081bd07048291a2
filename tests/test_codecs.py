"""Codecs: what they lose and keep, how the decoder checks them, and a federation over real
sockets that sends q8 updates, an fp16 global model and skips the model a worker already holds."""

import ast
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fedberry import Worker, codecs
from fedberry.protocol import encodings
from fedberry.protocol.frames import (
    ErrorCode,
    FrameDecoder,
    MsgType,
    ProtocolError,
    encode,
    spec_of,
)
from fedberry.serve import serve

RNG = np.random.default_rng(7)
MODEL = [RNG.normal(size=(40, 30)).astype(np.float32), RNG.normal(size=(300,)).astype(np.float32),
         np.array(5, np.int64), np.zeros((0, 4), np.float32), np.array(0.5, np.float64),
         RNG.normal(size=(7,)).astype(np.float16)]


def moved(arrays, scale=0.01, seed=1):
    rng = np.random.default_rng(seed)
    return [(a + scale * rng.normal(size=a.shape)).astype(a.dtype) if a.dtype.kind == "f"
            else a.copy() for a in arrays]


def residual_for(arrays):
    return [np.zeros(a.shape, np.result_type(a.dtype, np.float32)) if a.dtype.kind == "f"
            else np.zeros(0) for a in arrays]


def roundtrip(name, arrays, reference=None, residual=None):
    """Through a real frame and decoder that expects the model's spec."""
    codec = codecs.get(name)
    spec = spec_of(arrays)
    frame = encode(MsgType.UPDATE, {"round": 0, "num_samples": 1, "codec": name},
                   codec.encode(arrays, reference, residual))
    dec = FrameDecoder()
    dec.expected = spec
    (got,) = dec.receive_data(frame.tobytes())
    return codec.decode(got.tensors, spec, reference), frame.nbytes


def test_q8_keeps_dtypes_and_shapes_and_bounds_the_error():
    new = moved(MODEL)
    out, nbytes = roundtrip("q8", new, MODEL, residual_for(new))
    assert [(o.dtype, o.shape) for o in out] == [(a.dtype, a.shape) for a in new]
    assert out[2] == new[2]  # integers travel as they are
    for o, n, r in zip(out, new, MODEL):
        if n.dtype.kind == "f" and n.size:
            step = np.abs(n.astype(np.float64) - r).max() / 127
            tol = step / 2 + (1e-3 if n.dtype == np.float16 else 1e-6)
            assert np.abs(o.astype(np.float64) - n).max() <= tol
    raw = sum(a.nbytes for a in new)
    assert nbytes < 0.4 * raw  # about a quarter, plus scales and metadata


def test_q8_error_feedback_keeps_the_sum_of_updates():
    # The same small change sent ten times: without feedback each rounds the same way and the
    # error grows ten-fold; with it, what was lost goes out with the next update.
    ref = [np.zeros(1000, np.float32)]
    step = [np.linspace(-1, 1, 1000).astype(np.float32) * 1e-3]
    step[0][0] = 1.0  # one outlier makes the block's scale coarse for its neighbours
    res = residual_for(ref)
    total = np.zeros(1000, np.float64)
    for _ in range(10):
        out, _ = roundtrip("q8", [ref[0] + step[0]], ref, res)
        total += out[0] - ref[0]
    np.testing.assert_allclose(total + res[0], 10 * step[0].astype(np.float64), atol=1e-5)
    assert np.abs(res[0]).max() <= 1.0 / 254 + 1e-6  # bounded by half a quantization step


def test_fp16_halves_float_tensors_and_project_is_what_receivers_get():
    arrays = [a.copy() for a in MODEL]
    out, nbytes = roundtrip("fp16", arrays)
    fp16 = codecs.CODECS["fp16"]
    assert fp16.project(arrays)
    for o, a in zip(out, arrays):
        assert o.dtype == a.dtype
        np.testing.assert_array_equal(o, a)  # the projected model is exactly the decoded one
    assert fp16.project(arrays)  # idempotent
    big = [np.array([1e6, 1.0], np.float32)]
    assert not fp16.project(big) and big[0][0] == 1e6  # does not fit: left alone
    with pytest.raises(OverflowError):
        fp16.encode(big)


def decode_error(meta, tensors, msg_type=MsgType.UPDATE, expected=None):
    dec = FrameDecoder()
    dec.expected = spec_of(MODEL) if expected is None else expected
    with pytest.raises(ProtocolError) as err:
        dec.receive_data(encode(msg_type, meta, tensors).tobytes())
    return err.value


def test_decoder_refuses_unknown_misplaced_and_mismatched_codecs():
    meta = {"round": 0, "num_samples": 1}
    wire = codecs.CODECS["q8"].encode(moved(MODEL), MODEL)
    assert decode_error({**meta, "codec": "zstd"}, wire).code == ErrorCode.BAD_FRAME
    assert decode_error({**meta, "codec": ["q8"]}, wire).code == ErrorCode.BAD_FRAME
    # A worker's initial weights go as they are; 'unchanged' is the chief's word only.
    assert decode_error({"codec": "fp16"}, MODEL, MsgType.INIT).code == ErrorCode.BAD_FRAME
    assert decode_error({**meta, "codec": "unchanged"}, []).code == ErrorCode.BAD_FRAME
    # The model's own bytes labelled q8, and q8 of another model, are refused before allocating.
    err = decode_error({**meta, "codec": "q8"}, MODEL)
    assert err.code == ErrorCode.SPEC_MISMATCH and "q8" in err.message
    other = [np.zeros((40, 31), np.float32), *MODEL[1:]]
    wrong = codecs.CODECS["q8"].encode(other, other)
    assert decode_error({**meta, "codec": "q8"}, wrong).code == ErrorCode.SPEC_MISMATCH


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_q8_refuses_bad_scales(bad):
    wire = codecs.CODECS["q8"].encode(moved(MODEL), MODEL)
    wire[1] = wire[1].copy()
    wire[1][0] = bad
    with pytest.raises(ProtocolError) as err:
        codecs.CODECS["q8"].decode(wire, spec_of(MODEL), MODEL)
    assert err.value.code == ErrorCode.NON_FINITE


def test_digest_tells_models_apart():
    d = codecs.digest(MODEL)
    assert d == codecs.digest([a.copy() for a in MODEL])
    changed = [a.copy() for a in MODEL]
    changed[1][3] += 1e-7
    assert codecs.digest(changed) != d
    assert codecs.digest([MODEL[0].reshape(30, 40)]) != codecs.digest([MODEL[0]])
    assert codecs.digest([MODEL[0].astype(np.float64)]) != codecs.digest([MODEL[0]])
    assert codecs.digest([MODEL[0].T.copy().T]) == codecs.digest([MODEL[0]])  # layout aside


def test_unknown_codec_names_are_refused_at_the_api():
    with pytest.raises(ValueError, match="q8"):
        Worker("tcp://127.0.0.1:1", codec="q4")
    with pytest.raises(ValueError, match="downlink"):
        serve(None, downlink="unchanged")


# -- over real sockets -----------------------------------------------------------------------
def run_workers(url, starts, updates, samples, codec):
    """Each worker joins with its start model, sends its update, returns what it got back."""
    results, errors = [None] * len(starts), []

    def one(i):
        try:
            with Worker(url, worker_id=f"codec-{i}", token="codec-token", codec=codec) as w:
                joined = w.join(starts[i])
                received = w.bytes_received
                new = w.sync(updates[i](joined), samples[i])
                results[i] = (joined, received, new, w.bytes_sent)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(starts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_q8_updates_fp16_model_and_no_download_of_a_model_the_worker_holds():
    initial = [RNG.normal(size=(64, 50)).astype(np.float32), RNG.normal(size=(50,)).astype(
        np.float32), np.array(3, np.int64)]
    raw = sum(a.nbytes for a in initial)
    stranger = [a + 1 if a.dtype.kind == "f" else a for a in initial]  # built another way
    samples = [10, 30]
    deltas = [moved(initial, 0.05, seed=s) for s in (11, 12)]
    handle = serve("127.0.0.1:0", workers=2, rounds=1, initial=initial, token="codec-token",
                   downlink="fp16")
    try:
        results = run_workers(handle.url, [initial, stranger], [
            lambda g, d=d: [x + (y - i) if x.dtype.kind == "f" else x
                            for x, y, i in zip(g, d, initial)] for d in deltas], samples, "q8")
        assert handle.wait(10)
        chief_model = handle.chief.global_arrays
    finally:
        handle.stop()
    (j0, rx0, new0, tx0), (j1, rx1, new1, _) = results
    for a, b, c in zip(j0, j1, initial):
        np.testing.assert_array_equal(a, c)  # both start from the chief's model...
        np.testing.assert_array_equal(b, c)
    assert rx0 < 1024 < raw < rx1  # ...but only the stranger downloaded it
    assert tx0 < 0.5 * raw  # the q8 update, the handshake and a heartbeat at most
    for a, b, c in zip(new0, new1, chief_model):
        np.testing.assert_array_equal(a, c)  # everyone holds exactly the chief's model
        np.testing.assert_array_equal(b, c)
        if c.dtype == np.float32:
            np.testing.assert_array_equal(c, c.astype(np.float16).astype(np.float32))
    # The average of what was sent, within q8's step and fp16's rounding.
    for t in (0, 1):
        want = sum(n * (initial[t] + d[t] - initial[t]).astype(np.float64)
                   for n, d in zip(samples, deltas)) / sum(samples)
        np.testing.assert_allclose(chief_model[t], want, atol=0.002 + 1e-3 * np.abs(want).max())
    assert chief_model[2] == 3


def test_q8_model_downlink_keeps_every_worker_on_the_chiefs_model_round_after_round():
    """Three rounds with the model sent as q8 changes: every worker decodes exactly the chief's
    model; a worker that joins late is sent the whole model, then changes; the model moves by
    the mean of the updates within the quantization steps of both directions."""
    initial = [RNG.normal(size=(64, 50)).astype(np.float32), np.array(3, np.int64)]
    raw = sum(a.nbytes for a in initial)
    rounds = 4
    handle = serve("127.0.0.1:0", workers=2, rounds=rounds, initial=initial,
                   token="codec-token", downlink="q8")
    seen: dict[str, list] = {}
    errors: list[Exception] = []
    late_joined = threading.Event()

    def work(name, shift, late):
        try:
            with Worker(handle.url, worker_id=name, token="codec-token", codec="q8") as w:
                if late:  # joins after round 1: not the chief's model any more
                    deadline = time.monotonic() + 30
                    while handle.chief.round < 1 and time.monotonic() < deadline:
                        time.sleep(0.01)
                g = w.join(initial)
                if late:
                    late_joined.set()
                log = seen.setdefault(name, [])
                while not w.done:
                    if w.round == 1 and not late:
                        late_joined.wait(30)  # round 2 waits for the late worker's update
                    before = w.bytes_received
                    sent = [g[0] + np.float32(shift), g[1]]
                    new = w.sync(sent, 1.0)
                    log.append((w.round, g, new, w.bytes_received - before))
                    g = new
        except Exception as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=a) for a in
               [("a", 0.01, False), ("b", 0.03, False), ("c", -0.02, True)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert handle.wait(10)
        chief_model = handle.chief.global_arrays
    finally:
        handle.stop()
    assert not errors, errors
    finals = [log[-1][2] for log in seen.values()]
    for f in finals:
        for a, c in zip(f, chief_model):
            np.testing.assert_array_equal(a, c)  # bit for bit
    assert chief_model[1] == 3
    # Round after round the model moved by the mean shift of the workers that took part.
    for name, log in seen.items():
        for _round, before, after, received in log[1:]:
            step = float(np.mean(after[0] - before[0]))
            assert -0.021 < step < 0.031, (name, step)
            assert received < 0.35 * raw  # a q8 change, not the model
    assert len(seen["c"]) >= 1 and handle.chief.round == rounds


def test_broadcast_forms_decode_to_the_chiefs_model_and_fall_back_when_they_must():
    """broadcast.Broadcast without sockets: the delta form only for a holder of the last round's
    model, the whole model otherwise, fp16 refused for values it cannot hold; the chief's model
    equals what a receiver decodes in every form."""
    from fedberry.chief.broadcast import Broadcast
    from fedberry.chief.state import Chief, ChiefConfig

    def decode(frame_bytes, reference):
        dec = FrameDecoder()
        dec.expected = spec_of(MODEL[:3])
        (f,) = dec.receive_data(frame_bytes)
        return f.meta, codecs.get(f.meta.get("codec", "none")).decode(
            f.tensors, spec_of(MODEL[:3]), reference)

    for downlink in ("q8", "fp16"):
        chief = Chief(ChiefConfig(workers=1, rounds=5), initial=[a.copy() for a in MODEL[:3]])
        cast = Broadcast(downlink)
        held = [a.copy() for a in MODEL[:3]]  # a worker built from the same seed
        assert cast.digest(chief) == codecs.digest(held)
        meta, _ = decode(cast.frame(chief, None).tobytes(), None)
        assert "codec" not in meta  # round 0 goes whole
        chief.join("w", spec_of(held), 0.0)
        for r in range(1, 4):
            chief.update("w", r - 1, 1.0, moved(held, 0.1, seed=r), {}, 0.0)
            cast.prepare(chief)
            meta, got = decode(cast.frame(chief, r - 1).tobytes(), held)
            assert meta.get("codec") == downlink and meta["round"] == r
            for g, c in zip(got, chief.global_arrays):
                np.testing.assert_array_equal(g, c)
            meta, whole = decode(cast.frame(chief, None).tobytes(), None)  # a newcomer
            assert meta.get("codec") == ("fp16" if downlink == "fp16" else None)
            for g, c in zip(whole, chief.global_arrays):
                np.testing.assert_array_equal(g, c)
            held = got
    chief = Chief(ChiefConfig(workers=1, rounds=2), initial=[np.zeros(3, np.float32)])
    cast = Broadcast("fp16")
    chief.join("w", spec_of([np.zeros(3, np.float32)]), 0.0)
    chief.update("w", 0, 1.0, [np.array([1e6, 1.0, 2.0], np.float32)], {}, 0.0)
    dec = FrameDecoder()
    (f,) = dec.receive_data(cast.frame(chief, 0).tobytes())
    assert "codec" not in f.meta and f.tensors[0][0] == 1e6  # too big for fp16: sent whole


def test_the_protocol_does_not_import_the_codecs() -> None:
    """codecs builds on the protocol's wire rules; the protocol needs none of its numerics (the
    circle codecs <-> protocol was kept open by a function-local import). Read from the source:
    importing any fedberry module runs fedberry/__init__, which imports everything."""
    package = Path(encodings.__file__).parent
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            fedberry = [n for n in names if n.startswith("fedberry.")]
            assert not any(n.startswith("fedberry.codecs") or n == "fedberry.codecs"
                           for n in fedberry), f"{path.name} imports the codecs"
            # Below the protocol only the secure-aggregation core, whose messages it carries.
            assert all(n.startswith(("fedberry.protocol.", "fedberry.secagg.", "fedberry.secagg"))
                       for n in fedberry), (
                f"{path.name} imports {fedberry}: only the secagg core is below the protocol")
            assert node.col_offset == 0, f"{path.name}:{node.lineno}: a function-local import"


@pytest.mark.parametrize("name", ["none", "fp16", "q8", "unchanged"])
def test_each_codec_sends_the_wire_spec_the_protocol_expects(name: str) -> None:
    spec = spec_of(MODEL)
    ref = [np.zeros_like(a) for a in MODEL]
    wire = [] if name == "unchanged" else codecs.get(name).encode(MODEL, ref)
    assert spec_of(wire) == encodings.wire_spec(name, spec) == codecs.get(name).wire_spec(spec)
    assert name in encodings.KNOWN_CODECS
