"""The conversation, driven by bytes alone: no socket, no event loop, no thread.

A chief-side and a worker-side connection object (protocol.connection) talk by handing each
other the bytes ``send`` returns; every test here is that, or raw bytes a hostile peer could
send. Covered: the whole handshake, the chief's and the worker's proofs, every message's field
checks, the state rules, the limits (before and after WELCOME, and the receiver's own ceiling),
the "unchanged" answer, q8's base round, and the zero-copy receive path with its memory wait.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedberry import codecs
from fedberry.protocol import auth
from fedberry.protocol.connection import (
    AUTH_FAILED_SENTENCE,
    ChiefConnection,
    ChiefState,
    LocalProtocolError,
    WorkerConnection,
    WorkerState,
    error_for,
)
from fedberry.protocol.frames import (
    HEADER,
    MAGIC,
    ErrorCode,
    FrameDecoder,
    MsgType,
    ProtocolError,
    TensorSpec,
    spec_of,
)
from fedberry.protocol.limits import (
    MAX_ERROR_MESSAGE,
    MAX_METRICS,
    MAX_PAYLOAD,
    PREAUTH_LIMITS,
    PREAUTH_META_BYTES,
    Limits,
    model_limits,
)
from fedberry.protocol.messages import (
    Auth,
    Bye,
    Challenge,
    Error,
    Global,
    Hello,
    Init,
    Ping,
    Pong,
    Update,
    Welcome,
    to_frame,
)

TOKEN = "the-shared-token"
MODEL = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64)]
SPEC = spec_of(MODEL)


def raw(msg_type: int, meta: dict | bytes, payload: bytes = b"", *, version: int = 1,
        payload_len: int | None = None) -> bytes:
    text = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    return HEADER.pack(MAGIC, version, msg_type, 0, len(text),
                       len(payload) if payload_len is None else payload_len) + text + payload


def tensors_meta(arrays: list[np.ndarray], **extra: object) -> dict:
    return {"tensors": [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays], **extra}


def deliver(sender: ChiefConnection | WorkerConnection, receiver: ChiefConnection |
            WorkerConnection, msg: object) -> list:
    return receiver.receive_data(sender.send(msg).tobytes())  # type: ignore[arg-type]


def joined(*, chief_token: str = TOKEN, worker_token: str = TOKEN, need_init: bool = False,
           have: str | None = None, round_: int = 0, downlink: str = "none"
           ) -> tuple[ChiefConnection, WorkerConnection]:
    c, w = ChiefConnection(chief_token), WorkerConnection(worker_token, SPEC)
    (hello,) = deliver(w, c, Hello("pi-1"))
    assert isinstance(hello, Hello) and c.worker_id == "pi-1" and c.state is ChiefState.CHALLENGE
    (challenge,) = deliver(c, w, Challenge())
    assert isinstance(challenge, Challenge) and w.state is WorkerState.AUTH
    (auth_msg,) = deliver(w, c, Auth(SPEC, want_model=True, have=have))
    assert isinstance(auth_msg, Auth) and auth_msg.spec == SPEC and c.state is ChiefState.WELCOME
    (welcome,) = deliver(c, w, Welcome(round_, need_init, downlink))
    assert isinstance(welcome, Welcome) and welcome.round == round_
    assert c.state is ChiefState.JOINED and w.state is WorkerState.JOINED
    return c, w


def refused(conn: ChiefConnection | WorkerConnection, data: bytes, code: ErrorCode,
            words: str = "") -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(data)
    assert info.value.code == code, info.value.message
    assert words in info.value.message
    assert conn.state.value == "closed"
    with pytest.raises(ProtocolError):  # and it stays closed
        conn.receive_data(to_frame(Ping()).tobytes())
    return info.value


# -- the honest conversation -----------------------------------------------------------------
def test_handshake_init_update_global_round_trip() -> None:
    c, w = joined(need_init=True)
    assert w.need_init
    (init,) = deliver(w, c, Init(MODEL))
    assert isinstance(init, Init)
    assert all(np.array_equal(a, b) for a, b in zip(init.tensors, MODEL))
    (up,) = deliver(w, c, Update(0, 12, [m + 1 for m in MODEL], {"loss": 0.5}))
    assert isinstance(up, Update) and (up.round, up.num_samples, up.metrics) == (0, 12.0,
                                                                                {"loss": 0.5})
    assert up.checked and up.non_finite is None  # looked at for NaN/Inf as the bytes came
    assert np.array_equal(up.tensors[0], MODEL[0] + 1)
    (g,) = deliver(c, w, Global(1, MODEL, done=True))
    assert isinstance(g, Global) and (g.round, g.done, c.sent_round, w.received_round) == (
        1, True, 1, 1)
    (ping,) = deliver(c, w, Ping())
    (pong,) = deliver(w, c, Pong())
    assert isinstance(ping, Ping) and isinstance(pong, Pong)
    (bye,) = deliver(w, c, Bye())
    assert isinstance(bye, Bye) and c.state is ChiefState.CLOSED and w.state is WorkerState.CLOSED


def test_the_token_never_crosses_the_wire_and_proofs_are_filled_in() -> None:
    c, w = ChiefConnection(TOKEN), WorkerConnection(TOKEN, SPEC)
    wire = b""
    for sender, receiver, msg in [(w, c, Hello("pi-1")), (c, w, Challenge()),
                                  (w, c, Auth(SPEC)), (c, w, Welcome(0))]:
        data = sender.send(msg).tobytes()
        receiver.receive_data(data)
        wire += data
    assert TOKEN.encode() not in wire
    assert w.state is WorkerState.JOINED


def test_pings_are_allowed_in_every_state() -> None:
    c, w = ChiefConnection(TOKEN), WorkerConnection(TOKEN, SPEC)
    assert isinstance(deliver(w, c, Ping())[0], Ping)
    assert isinstance(deliver(c, w, Ping())[0], Ping)
    assert c.state is ChiefState.HELLO and w.state is WorkerState.START


def test_a_pipelined_global_after_welcome_is_read_with_the_models_limits() -> None:
    """The worker can only learn the model's limits from WELCOME: a GLOBAL in the same chunk
    must be read with them, not with the tensor-free limits of before."""
    c, w = ChiefConnection(TOKEN), WorkerConnection(TOKEN, SPEC)
    deliver(w, c, Hello("pi-1"))
    deliver(c, w, Challenge())
    deliver(w, c, Auth(SPEC))
    data = c.send(Welcome(0)).tobytes() + c.send(Global(0, MODEL)).tobytes()
    welcome, g = w.receive_data(data)
    assert isinstance(welcome, Welcome) and isinstance(g, Global)
    assert np.array_equal(g.tensors[0], MODEL[0])


# -- version and proofs ----------------------------------------------------------------------
def test_another_protocol_version_is_refused_with_a_word_on_upgrading() -> None:
    hello = raw(MsgType.HELLO, Hello("pi-1").meta(), version=2)
    refused(ChiefConnection(TOKEN), hello, ErrorCode.VERSION, "upgrade")
    refused(WorkerConnection(TOKEN, SPEC), raw(MsgType.CHALLENGE, {}, version=0),
            ErrorCode.VERSION, "version 0")


def test_a_wrong_worker_token_is_refused_when_the_chief_answers() -> None:
    c, w = ChiefConnection(TOKEN), WorkerConnection("not-the-token", SPEC)
    deliver(w, c, Hello("pi-1"))
    deliver(c, w, Challenge())
    deliver(w, c, Auth(SPEC))
    with pytest.raises(ProtocolError) as info:
        c.send(Welcome(0))
    assert info.value.code == ErrorCode.AUTH_FAILED and info.value.message == AUTH_FAILED_SENTENCE
    assert c.state is ChiefState.CLOSED
    # What the transport then sends: the ERROR, which the worker reads as a fatal one.
    (err,) = deliver(c, w, error_for(info.value))
    assert isinstance(err, Error) and err.code == "auth_failed" and err.fatal
    assert w.state is WorkerState.CLOSED


def test_a_chief_that_cannot_prove_the_token_is_refused_by_the_worker() -> None:
    c, w = ChiefConnection(TOKEN), WorkerConnection(TOKEN, SPEC)
    deliver(w, c, Hello("pi-1"))
    deliver(c, w, Challenge())
    deliver(w, c, Auth(SPEC))
    forged = to_frame(Welcome(0, proof="0" * 64)).tobytes()
    refused(w, forged, ErrorCode.AUTH_FAILED, "could not prove it knows the token")


def test_a_replayed_proof_fails_against_a_fresh_challenge() -> None:
    c1, w = ChiefConnection(TOKEN), WorkerConnection(TOKEN, SPEC)
    deliver(w, c1, Hello("pi-1"))
    deliver(c1, w, Challenge())
    auth_bytes = w.send(Auth(SPEC)).tobytes()
    hello_bytes = to_frame(Hello("pi-1", nonce=w._worker_nonce)).tobytes()
    c2 = ChiefConnection(TOKEN)  # an eavesdropper replays HELLO and AUTH to another connection
    c2.receive_data(hello_bytes)
    c2.send(Challenge())  # a fresh chief nonce
    c2.receive_data(auth_bytes)
    with pytest.raises(ProtocolError) as info:
        c2.send(Welcome(0))
    assert info.value.code == ErrorCode.AUTH_FAILED


def test_a_worker_id_outside_the_client_certificate_is_refused() -> None:
    c = ChiefConnection(TOKEN, cert_names=["pi7", "pi7.lab.example"])
    refused(c, to_frame(Hello("pi8")).tobytes(), ErrorCode.AUTH_FAILED,
            "('pi7' or 'pi7.lab.example')")
    ok = ChiefConnection(TOKEN, cert_names=["pi7"])
    assert isinstance(ok.receive_data(to_frame(Hello("pi7")).tobytes())[0], Hello)


# -- field checks ----------------------------------------------------------------------------
NONCE = auth.new_nonce()


@pytest.mark.parametrize("meta, words", [
    ({"worker_id": 5, "nonce": NONCE}, "worker_id"),
    ({"worker_id": "", "nonce": NONCE}, "worker_id"),
    ({"worker_id": "x" * 129, "nonce": NONCE}, "1-128"),
    ({"worker_id": "a\nb", "nonce": NONCE}, "printable"),
    ({"worker_id": "pi", "nonce": "ab"}, "nonce"),
    ({"worker_id": "pi", "nonce": "Z" * 64}, "hex"),
    ({"worker_id": "pi"}, "nonce"),
])
def test_bad_hello_fields(meta: dict, words: str) -> None:
    refused(ChiefConnection(TOKEN), raw(MsgType.HELLO, meta), ErrorCode.BAD_FRAME, words)


def chief_awaiting_auth() -> ChiefConnection:
    c = ChiefConnection(TOKEN)
    c.receive_data(to_frame(Hello("pi-1")).tobytes())
    c.send(Challenge())
    return c


GOOD_AUTH = {"proof": "0" * 64, "spec": [["<f4", [2, 3]]], "want_model": True}


@pytest.mark.parametrize("change, words", [
    ({"proof": 7}, "proof"),
    ({"proof": None}, "proof"),
    ({"spec": "all of them"}, "spec"),
    ({"spec": [["<f4"]]}, "spec"),
    ({"spec": [["object", [1]]]}, "dtype"),
    ({"spec": [["<f4", [-1]]]}, "shape"),
    ({"spec": [["<f4", [2.5]]]}, "shape"),
    ({"want_model": "yes"}, "want_model"),
    ({"have": "abc"}, "SHA-256"),
    ({"have": 12}, "SHA-256"),
])
def test_bad_auth_fields(change: dict, words: str) -> None:
    refused(chief_awaiting_auth(), raw(MsgType.AUTH, {**GOOD_AUTH, **change}),
            ErrorCode.BAD_FRAME, words)


def update_bytes(meta: dict, arrays: list[np.ndarray] = MODEL) -> bytes:
    payload = b"".join(a.tobytes() for a in arrays)
    return raw(MsgType.UPDATE, tensors_meta(arrays, **meta), payload)


@pytest.mark.parametrize("meta, words", [
    ({"round": "0", "num_samples": 1}, "round"),
    ({"round": True, "num_samples": 1}, "round"),
    ({"round": 1.0, "num_samples": 1}, "round"),
    ({"round": -1, "num_samples": 1}, "round"),
    ({"num_samples": 1}, "round"),
    ({"round": 0}, "num_samples"),
    ({"round": 0, "num_samples": "12"}, "num_samples"),
    ({"round": 0, "num_samples": True}, "num_samples"),
    ({"round": 0, "num_samples": [3]}, "num_samples"),
    ({"round": 0, "num_samples": 0}, "positive"),
    ({"round": 0, "num_samples": -3}, "positive"),
    ({"round": 0, "num_samples": -0.0}, "positive"),
    ({"round": 0, "num_samples": 1e308}, "2**53"),  # absurd: no data set has that many
    ({"round": 0, "num_samples": 2 ** 53 + 2}, "2**53"),
    ({"round": 0, "num_samples": 10 ** 400}, "2**53"),  # valid JSON, no float holds it
    ({"round": 0, "num_samples": 1, "metrics": [1, 2]}, "metrics"),
    ({"round": 0, "num_samples": 1, "metrics": "loss"}, "metrics"),
])
def test_bad_update_fields(meta: dict, words: str) -> None:
    c, _ = joined()
    refused(c, update_bytes(meta), ErrorCode.BAD_FRAME, words)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinite_sample_counts_are_not_json(literal: bytes) -> None:
    c, _ = joined()
    meta = json.dumps(tensors_meta(MODEL, round=0)).encode()[:-1] + b',"num_samples":' + \
        literal + b"}"
    payload = b"".join(a.tobytes() for a in MODEL)
    refused(c, raw(MsgType.UPDATE, meta, payload), ErrorCode.BAD_FRAME, "JSON")


@pytest.mark.parametrize("n", [float("nan"), float("inf"), -1.0, 0, 2.0 ** 60])
def test_we_cannot_send_what_we_would_refuse(n: float) -> None:
    with pytest.raises(ProtocolError, match="num_samples"):
        Update(0, n, MODEL)


def test_the_largest_sample_count_is_2_to_the_53() -> None:
    c, _ = joined()
    (up,) = c.receive_data(update_bytes({"round": 0, "num_samples": 2 ** 53}))
    assert up.num_samples == 2.0 ** 53


def test_metrics_keep_a_few_finite_numbers_under_short_names() -> None:
    c, _ = joined()
    metrics = {"loss": 0.25, "acc": 1, "name": "resnet", "flag": True, "big": 10 ** 400,
               "x" * 100: 2.0, **{f"m{i}": i for i in range(40)}}
    (up,) = c.receive_data(update_bytes({"round": 0, "num_samples": 3, "metrics": metrics}))
    assert up.metrics["loss"] == 0.25 and up.metrics["acc"] == 1.0
    assert "name" not in up.metrics and "flag" not in up.metrics and "big" not in up.metrics
    assert "x" * 64 in up.metrics and len(up.metrics) <= MAX_METRICS


def test_non_finite_tensors_are_reported_for_admission_not_refused_here() -> None:
    c, _ = joined()
    bad = [MODEL[0].copy(), MODEL[1]]
    bad[0][1, 2] = np.nan
    (up,) = c.receive_data(update_bytes({"round": 0, "num_samples": 1}, bad))
    assert up.checked and up.non_finite == "tensor 0 contains NaN or Inf"


@pytest.mark.parametrize("meta, words", [
    ({"round": -2, "done": False}, "round"),
    ({"round": 1, "done": "no"}, "done"),
    ({"round": 1, "done": False, "codec": "q8"}, "base"),
    ({"round": 1, "done": False, "base": 0}, "only a q8"),
])
def test_bad_global_fields(meta: dict, words: str) -> None:
    _, w = joined()
    arrays = MODEL
    if meta.get("codec") == "q8":
        arrays = codecs.get("q8").encode(MODEL, [np.zeros_like(m) for m in MODEL])
    refused(w, raw(MsgType.GLOBAL, tensors_meta(arrays, **meta),
                   b"".join(a.tobytes() for a in arrays)), ErrorCode.BAD_FRAME, words)


@pytest.mark.parametrize("meta, words", [
    ({"round": "1", "need_init": False, "downlink": "none", "proof": ""}, "round"),
    ({"round": 1, "need_init": 1, "downlink": "none", "proof": ""}, "need_init"),
    ({"round": 1, "need_init": False, "downlink": "zip", "proof": ""}, "downlink"),
])
def test_bad_welcome_fields(meta: dict, words: str) -> None:
    c, w = ChiefConnection(TOKEN), WorkerConnection(TOKEN, SPEC)
    deliver(w, c, Hello("pi-1"))
    deliver(c, w, Challenge())
    w.send(Auth(SPEC))
    refused(w, raw(MsgType.WELCOME, meta), ErrorCode.BAD_FRAME, words)


def test_error_fields() -> None:
    _, w = joined()
    refused(w, raw(MsgType.ERROR, {"code": 3, "message": "x"}), ErrorCode.BAD_FRAME, "code")
    _, w = joined()
    refused(w, raw(MsgType.ERROR, {"code": "x", "message": None}), ErrorCode.BAD_FRAME, "message")
    _, w = joined()
    (err,) = w.receive_data(raw(MsgType.ERROR, {"code": "new_code", "message": "y" * 10 ** 5,
                                                "fatal": False}))
    assert err.code == "new_code" and len(err.message) <= MAX_ERROR_MESSAGE + 3
    assert w.state is WorkerState.JOINED  # not fatal: the conversation goes on
    assert Error(ErrorCode.STALE, "late").code == "stale_update"


# -- tensors: model, dtypes, shapes, codecs --------------------------------------------------
@pytest.mark.parametrize("arrays, words", [
    ([MODEL[0].reshape(3, 2), MODEL[1]], "tensor 0 is float32[3, 2]"),
    ([MODEL[0].astype(np.float16), MODEL[1]], "tensor 0 is float16[2, 3]"),
    ([MODEL[0]], "1 tensors"),
    ([MODEL[0], MODEL[1].astype(np.int32)], "tensor 1 is int32[2]"),
])
def test_updates_of_another_model_are_refused_before_allocating(arrays: list, words: str
                                                                ) -> None:
    c, _ = joined()
    refused(c, update_bytes({"round": 0, "num_samples": 1}, arrays), ErrorCode.SPEC_MISMATCH,
            words)


def test_codecs_in_the_wrong_place_or_of_the_wrong_shape() -> None:
    c, w = joined(need_init=True)
    fp16 = codecs.get("fp16").encode(MODEL)
    refused(c, raw(MsgType.INIT, tensors_meta(fp16, codec="fp16"),
                   b"".join(a.tobytes() for a in fp16)), ErrorCode.BAD_FRAME, "INIT frames")
    c, _ = joined()
    refused(c, update_bytes({"round": 0, "num_samples": 1, "codec": "zstd"}),
            ErrorCode.BAD_FRAME, "unknown codec")
    c, _ = joined()
    refused(c, update_bytes({"round": 0, "num_samples": 1, "codec": "unchanged"}),
            ErrorCode.BAD_FRAME, "cannot use codec 'unchanged'")
    c, _ = joined()
    # q8 of the model: int8 values and one scale per block for the float tensor; the model's
    # own tensors under the q8 label have the wrong shape.
    refused(c, update_bytes({"round": 0, "num_samples": 1, "codec": "q8"}),
            ErrorCode.SPEC_MISMATCH, "q8-encoded")
    c, _ = joined()
    q8 = codecs.get("q8").encode(MODEL, [np.zeros_like(m) for m in MODEL])
    (up,) = c.receive_data(update_bytes({"round": 0, "num_samples": 1, "codec": "q8"}, q8))
    assert up.codec == "q8" and [t.dtype for t in up.tensors] == [np.int8, np.float32, np.int64]


# -- states ----------------------------------------------------------------------------------
@pytest.mark.parametrize("frame, words", [
    (to_frame(Update(0, 1, MODEL)).tobytes(), "UPDATE is not allowed now (hello)"),
    (to_frame(Auth(SPEC)).tobytes(), "AUTH is not allowed now (hello)"),
    (to_frame(Bye()).tobytes(), "BYE is not allowed now (hello)"),
    (to_frame(Welcome(0)).tobytes(), "WELCOME is not allowed now (hello)"),
])
def test_chief_refuses_frames_before_hello(frame: bytes, words: str) -> None:
    # By type, before the limits: an UPDATE is refused as out of turn, not as too large.
    refused(ChiefConnection(TOKEN), frame, ErrorCode.PROTOCOL, words)


def test_frames_out_of_turn_are_refused_by_their_header_alone() -> None:
    """A type the state does not allow costs its 20 header bytes: no metadata buffer, no
    tensors (they had been read in full, into receive-budget memory, before the refusal)."""
    calls: list = []

    def allocate(specs):  # type: ignore[no-untyped-def]
        calls.append(specs)
        return [np.empty(s.shape, s.dtype) for s in specs]

    def chief_joined() -> ChiefConnection:
        c, w = ChiefConnection(TOKEN, allocate=allocate), WorkerConnection(TOKEN, SPEC)
        for sender, receiver, msg in [(w, c, Hello("pi-1")), (c, w, Challenge()),
                                      (w, c, Auth(SPEC)), (c, w, Welcome(0, False))]:
            deliver(sender, receiver, msg)
        return c

    header = {name: to_frame(msg).tobytes()[:20] for name, msg in [
        ("init", Init(MODEL)), ("global", Global(1, MODEL)), ("update", Update(0, 1, MODEL))]}
    refused(chief_joined(), header["init"], ErrorCode.PROTOCOL,
            "INIT is not allowed now (joined)")
    refused(chief_joined(), header["global"], ErrorCode.PROTOCOL,
            "GLOBAL is not allowed now (joined)")
    assert calls == []
    # Before authentication: an anonymous peer's tensor frame, whatever metadata it announces.
    many_empty = raw(MsgType.UPDATE, {"round": 0, "num_samples": 1, "tensors": [
        {"dtype": "<f4", "shape": [0]}] * 5000})
    refused(ChiefConnection(TOKEN), many_empty[:20], ErrorCode.PROTOCOL,
            "UPDATE is not allowed now (hello)")
    _, w = joined()
    refused(w, header["update"], ErrorCode.PROTOCOL, "UPDATE is not allowed now (joined)")
    w = WorkerConnection(TOKEN, SPEC)
    w.send(Hello("pi-1"))
    refused(w, header["global"], ErrorCode.PROTOCOL, "GLOBAL is not allowed now (challenge)")


def test_chief_refuses_out_of_order_frames() -> None:
    c = ChiefConnection(TOKEN)
    hello = to_frame(Hello("pi-1")).tobytes()
    c.receive_data(hello)
    refused(c, hello, ErrorCode.PROTOCOL, "HELLO is not allowed now (challenge)")
    c, _ = joined()
    refused(c, to_frame(Hello("pi-1")).tobytes(), ErrorCode.PROTOCOL, "(joined)")
    c, _ = joined()
    refused(c, to_frame(Error("x", "y")).tobytes(), ErrorCode.PROTOCOL, "ERROR")


def test_init_only_once_and_only_when_asked() -> None:
    c, _ = joined(need_init=False)
    refused(c, to_frame(Init(MODEL)).tobytes(), ErrorCode.PROTOCOL, "INIT is not allowed")
    c, _ = joined(need_init=True)
    c.receive_data(to_frame(Init(MODEL)).tobytes())
    refused(c, to_frame(Init(MODEL)).tobytes(), ErrorCode.PROTOCOL, "INIT is not allowed")


def test_worker_refuses_out_of_order_frames() -> None:
    w = WorkerConnection(TOKEN, SPEC)
    w.send(Hello("pi-1"))
    refused(w, to_frame(Welcome(0)).tobytes(), ErrorCode.PROTOCOL,
            "WELCOME is not allowed now (challenge)")
    _, w = joined()
    refused(w, to_frame(Challenge()).tobytes(), ErrorCode.PROTOCOL, "(joined)")
    _, w = joined()
    refused(w, to_frame(Hello("x")).tobytes(), ErrorCode.PROTOCOL, "HELLO")


def test_our_own_side_cannot_send_out_of_turn() -> None:
    c, w = ChiefConnection(TOKEN), WorkerConnection(TOKEN, SPEC)
    for conn, msg in [(c, Welcome(0)), (c, Challenge()), (c, Global(0, MODEL)),
                      (w, Auth(SPEC)), (w, Update(0, 1, MODEL)), (w, Init(MODEL))]:
        with pytest.raises(LocalProtocolError):
            conn.send(msg)  # type: ignore[arg-type]
    w = WorkerConnection(TOKEN, SPEC)
    w.send(Hello("pi-1"))
    w.receive_data(to_frame(Challenge()).tobytes())
    with pytest.raises(LocalProtocolError, match="announce the model"):
        w.send(Auth(SPEC[:1]))  # the chief's frames would be checked against another model
    c, w = joined(need_init=True)
    w.send(Init(MODEL))
    with pytest.raises(LocalProtocolError):
        w.send(Init(MODEL))  # once
    with pytest.raises(LocalProtocolError):
        c.send(Hello("pi-1"))  # type: ignore[arg-type]
    w.send(Bye())
    with pytest.raises(LocalProtocolError):
        w.send(Update(0, 1, MODEL))


def test_unchanged_only_after_offering_a_digest_and_only_once() -> None:
    digest = codecs.digest(MODEL)
    c, w = joined(have=digest)
    assert c.holds(lambda: digest)
    assert not c.holds(lambda: digest)  # asked once: later models are not the one it had
    (g,) = deliver(c, w, Global(0, codec="unchanged"))
    assert g.codec == "unchanged" and g.tensors == []
    refused(w, to_frame(Global(1, codec="unchanged")).tobytes(), ErrorCode.PROTOCOL,
            "did not offer")
    c, w = joined()
    called = []
    assert not c.holds(lambda: called.append(1) or digest)
    assert not called  # no digest offered: the model is not hashed for nothing
    refused(w, to_frame(Global(0, codec="unchanged")).tobytes(), ErrorCode.PROTOCOL,
            "did not offer")


def test_q8_globals_must_build_on_the_round_received_last() -> None:
    ref = [np.zeros_like(m) for m in MODEL]
    delta = codecs.get("q8").encode(MODEL, ref)
    _, w = joined(downlink="q8")
    refused(w, to_frame(Global(1, delta, codec="q8", base=0)).tobytes(), ErrorCode.PROTOCOL,
            "this connection holds round None")
    c, w = joined(downlink="q8")
    deliver(c, w, Global(3, MODEL))
    (g,) = deliver(c, w, Global(4, delta, codec="q8", base=3))
    assert g.base == 3 and w.received_round == 4
    refused(w, to_frame(Global(6, delta, codec="q8", base=3)).tobytes(), ErrorCode.PROTOCOL,
            "change since round 3")


# -- limits ----------------------------------------------------------------------------------
def test_before_welcome_no_tensors_and_little_metadata() -> None:
    update = raw(MsgType.UPDATE, tensors_meta(MODEL), b"x",
                 payload_len=MODEL[0].nbytes + MODEL[1].nbytes)
    # No tensor frame is allowed before WELCOME (refused by type: PROTOCOL); the limits refuse
    # a payload there too, should a type ever be let through.
    refused(ChiefConnection(TOKEN), update, ErrorCode.PROTOCOL, "not allowed now")
    with pytest.raises(ProtocolError, match="payload") as info:
        FrameDecoder(PREAUTH_LIMITS).receive_data(update[:20])
    assert info.value.code == ErrorCode.LIMIT
    huge_meta = raw(MsgType.HELLO, b"{" + b" " * PREAUTH_META_BYTES + b"}")[:20]  # header only
    refused(ChiefConnection(TOKEN), huge_meta, ErrorCode.LIMIT, "metadata")
    w = WorkerConnection(TOKEN, SPEC)
    w.send(Hello("pi-1"))
    refused(w, raw(MsgType.GLOBAL, tensors_meta(MODEL, round=0),
                   payload_len=10)[:20], ErrorCode.PROTOCOL, "not allowed now")


def test_after_welcome_frames_no_larger_than_the_model() -> None:
    """A too-big tensor frame of the wrong model is refused for what is wrong with it (read
    from its bounded metadata), before any of its payload is allocated or read."""
    c, _ = joined()
    frame = update_bytes({"round": 0, "num_samples": 1}, [MODEL[0].astype(np.float64), MODEL[1]])
    meta_end = len(frame) - 64
    assert c.receive_data(frame[:meta_end - 1]) == []  # the header alone refuses nothing
    err = refused(c, frame[meta_end - 1:meta_end], ErrorCode.SPEC_MISMATCH,
                  "tensor 0 is float64[2, 3], the federation's is float32[2, 3]")
    assert "bytes" not in err.message
    # Bigger than any change of dtype explains (here 60x the model): refused from the header.
    c, _ = joined()
    big = [np.zeros((200, 3), np.float32), MODEL[1]]
    frame = update_bytes({"round": 0, "num_samples": 1}, big)
    refused(c, frame[:20], ErrorCode.LIMIT, "exceeds the limit")
    _, w = joined()
    frame = to_frame(Global(1, big)).tobytes()
    refused(w, frame[:20], ErrorCode.LIMIT, "exceeds the limit")
    # Before the model is known, the header's payload length alone is checked against the limit.
    w = WorkerConnection(TOKEN, SPEC)
    w.send(Hello("pi-1"))
    refused(w, raw(MsgType.CHALLENGE, {"nonce": "00"}, payload_len=1 << 40)[:20],
            ErrorCode.LIMIT, "exceeds the limit")


def test_both_sides_clamp_at_their_ceiling() -> None:
    """One function derives both sides' limits (they had diverged: only the worker clamped)."""
    cap = Limits(max_payload=16)  # below this model's 40 bytes
    c = ChiefConnection(TOKEN, cap=cap)
    w = WorkerConnection(TOKEN, SPEC, cap=cap)
    for sender, receiver, msg in [(w, c, Hello("pi-1")), (c, w, Challenge()),
                                  (w, c, Auth(SPEC)), (c, w, Welcome(0))]:
        deliver(sender, receiver, msg)
    assert c.decoder.limits.max_payload == w.decoder.limits.max_payload == 16
    # The model is known: the (bounded) metadata is read, then the payload's size is refused.
    refused(c, to_frame(Update(0, 1, MODEL)).tobytes()[:-40], ErrorCode.LIMIT, "limit of 16")
    refused(w, to_frame(Global(1, MODEL)).tobytes()[:-40], ErrorCode.LIMIT, "limit of 16")
    assert model_limits(SPEC, ["none"]).max_payload == 40
    huge = (TensorSpec("<f4", (1 << 31,)),)  # 8 GiB: past the default ceiling of 4 GiB
    assert model_limits(huge, ["none"]).max_payload == MAX_PAYLOAD == 4 << 30
    chief = ChiefConnection(TOKEN)
    chief.expect_model(huge)
    assert chief.decoder.limits.max_payload == MAX_PAYLOAD


def test_limits_cover_the_largest_encoding_a_frame_may_carry() -> None:
    """q8 of a one-value float tensor is 5 bytes (value + scale), more than its 4."""
    scalar = [np.array([1.5], np.float32)]
    spec = spec_of(scalar)
    lim = model_limits(spec, ("none", "fp16", "q8"))
    assert lim.max_payload == 5 and lim.max_tensors == 2
    c = ChiefConnection(TOKEN)
    w = WorkerConnection(TOKEN, spec)
    for sender, receiver, msg in [(w, c, Hello("pi-1")), (c, w, Challenge()),
                                  (w, c, Auth(spec)), (c, w, Welcome(0))]:
        deliver(sender, receiver, msg)
    q8 = codecs.get("q8").encode(scalar, [np.zeros(1, np.float32)])
    (up,) = deliver(w, c, Update(0, 1, q8, codec="q8"))
    assert up.codec == "q8"


# -- the zero-copy path and the memory wait --------------------------------------------------
def test_tensors_are_read_straight_into_the_allocated_arrays_after_a_wait() -> None:
    granted: list[list[np.ndarray]] = []
    answers = [None]  # first "not now", then memory

    def allocate(specs):  # type: ignore[no-untyped-def]
        if answers:
            return answers.pop()
        arrays = [np.empty(s.shape, s.dtype) for s in specs]
        granted.append(arrays)
        return arrays

    c = ChiefConnection(TOKEN, allocate=allocate)
    w = WorkerConnection(TOKEN, SPEC)
    for sender, receiver, msg in [(w, c, Hello("pi-1")), (c, w, Challenge()),
                                  (w, c, Auth(SPEC)), (c, w, Welcome(0))]:
        deliver(sender, receiver, msg)
    data = memoryview(w.send(Update(0, 4, MODEL)).tobytes())
    events: list = []
    while len(data):
        if c.waiting:
            assert c.retry()  # memory granted: the same frame carries on
            continue
        buf = c.get_buffer()  # what asyncio.BufferedProtocol writes into
        n = min(len(buf), len(data), 7)
        buf[:n] = data[:n]
        data = data[n:]
        events += c.buffer_updated(n)
    (up,) = events
    assert up.tensors is granted[0] or all(a is b for a, b in zip(up.tensors, granted[0]))
    assert np.array_equal(up.tensors[0], MODEL[0])


def test_receive_data_keeps_what_follows_a_memory_wait_and_loses_no_event() -> None:
    """It raised, losing the PING decoded before the wait in the same call."""
    answers: list = [None]  # first "not now", then memory
    c = ChiefConnection(TOKEN, allocate=lambda specs: answers.pop() if answers else
                        [np.empty(s.shape, s.dtype) for s in specs])
    w = WorkerConnection(TOKEN, SPEC)
    for sender, receiver, msg in [(w, c, Hello("pi-1")), (c, w, Challenge()),
                                  (w, c, Auth(SPEC)), (c, w, Welcome(0))]:
        deliver(sender, receiver, msg)
    data = b"".join(w.send(m).tobytes() for m in (Ping(), Update(0, 3, MODEL), Ping()))
    assert c.receive_data(data) == [Ping()]
    assert c.waiting
    assert c.receive_data(to_frame(Pong()).tobytes()) == []  # kept, after the rest
    with pytest.raises(LocalProtocolError, match="still unread"):
        c.get_buffer()  # the kept bytes come first
    assert c.retry()
    up, ping, pong = c.receive_data()
    assert isinstance(up, Update) and up.num_samples == 3
    assert np.array_equal(up.tensors[0], MODEL[0])
    assert (ping, pong) == (Ping(), Pong())
    assert c.receive_data() == [] and not c.waiting
    c.get_buffer()  # nothing kept: the zero-copy path again


def test_only_frames_encoded_once_may_be_sent_encoded() -> None:
    """A WELCOME sent as an encoded frame skipped the worker's proof and joined a worker with
    the wrong token."""
    c, w = ChiefConnection(TOKEN), WorkerConnection("a-wrong-token", SPEC)
    for sender, receiver, msg in [(w, c, Hello("pi-1")), (c, w, Challenge()),
                                  (w, c, Auth(SPEC))]:
        deliver(sender, receiver, msg)
    with pytest.raises(LocalProtocolError, match="send WELCOME as a message"):
        c.send(to_frame(Welcome(0, False)))
    assert c.state is ChiefState.WELCOME
    with pytest.raises(ProtocolError) as info:
        c.send(Welcome(0, False))
    assert info.value.code == ErrorCode.AUTH_FAILED and c.state is ChiefState.CLOSED
    w = WorkerConnection(TOKEN, SPEC)
    w.send(Hello("pi-1"))
    w.receive_data(to_frame(Challenge()).tobytes())
    with pytest.raises(LocalProtocolError, match="send AUTH as a message"):
        w.send(to_frame(Auth(SPEC)))
    c, w = joined()
    c.send(to_frame(Global(4, MODEL)))  # the broadcast's frame, encoded once per round
    assert c.sent_round == 4
    w.send(to_frame(Update(0, 1, MODEL)))  # a worker's update, encoded once for resends
    with pytest.raises(LocalProtocolError):
        c.send(to_frame(Error("x", "y")))
