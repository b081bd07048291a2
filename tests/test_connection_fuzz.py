"""Property-based: a chief-side and a worker-side connection object talk to each other through
random chunking, truncation and corruption, with bytes alone.

* Honest conversations succeed whatever the chunking: every event is the message sent.
* A flight cut short leaves the receiver waiting for more bytes: no event, no error.
* A corrupted flight ends in a ProtocolError (now or later in the conversation), or, when the
  damage happens to leave a valid frame (the protocol has no checksum of its own: TCP's and
  TLS's protect the bytes), is delivered as that frame. Never another exception; never a hang
  (every call returns).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedberry import codecs
from fedberry.protocol.connection import (
    ChiefConnection,
    ChiefState,
    LocalProtocolError,
    WorkerConnection,
)
from fedberry.protocol.frames import HEADER, ProtocolError, spec_of
from fedberry.protocol.limits import MAX_NUM_SAMPLES
from fedberry.protocol.messages import (
    Auth,
    Bye,
    Challenge,
    Global,
    Hello,
    Init,
    Message,
    Ping,
    Pong,
    Update,
    Welcome,
)

TOKEN = "fuzz-token"
MODEL = [np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), np.array(7, np.int64),
         np.zeros((0, 2), np.float32), np.arange(5, dtype=np.float16)]
SPEC = spec_of(MODEL)
ZEROS = [np.zeros_like(m) for m in MODEL]
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class Step:
    to_chief: bool  # worker -> chief, else chief -> worker
    make: Callable[[], Message]


def conversation(draw: st.DrawFn) -> list[Step]:
    """A random honest conversation: handshake, maybe INIT, rounds of UPDATE and GLOBAL,
    heartbeats anywhere, maybe BYE."""
    offer = draw(st.booleans())
    need_init = draw(st.booleans())
    up_codec = draw(st.sampled_from(["none", "fp16", "q8"]))
    down = draw(st.sampled_from(["none", "fp16", "q8"]))
    worker_id = draw(st.text(st.sampled_from("abcxyz0189-._ é漢"), min_size=1, max_size=20))
    steps = [Step(True, lambda: Hello(worker_id)),
             Step(False, Challenge),
             Step(True, lambda: Auth(SPEC, True, codecs.digest(MODEL) if offer else None)),
             Step(False, lambda: Welcome(0, need_init, down))]
    if need_init:
        steps.append(Step(True, lambda: Init(MODEL)))
    rounds = draw(st.integers(0, 3))
    sent_round: int | None = None
    for r in range(rounds):
        n = draw(st.one_of(st.integers(1, 10 ** 6), st.floats(1e-3, 1e9)))
        wire = MODEL if up_codec == "none" else codecs.get(up_codec).encode(MODEL, ZEROS)
        steps.append(Step(True, lambda r=r, n=n, wire=wire: Update(r, n, wire, {"loss": 0.5},
                                                                   up_codec)))
        if r == 0 and offer:
            g = Global(r + 1, codec="unchanged")
        elif down == "q8" and sent_round is not None:
            g = Global(r + 1, codecs.get("q8").encode(MODEL, ZEROS), codec="q8",
                       base=sent_round)
        elif down == "fp16":
            g = Global(r + 1, codecs.get("fp16").encode(MODEL), codec="fp16")
        else:
            g = Global(r + 1, MODEL, done=r == rounds - 1)
        sent_round = r + 1
        steps.append(Step(False, lambda g=g: g))
        if draw(st.booleans()):
            steps.append(Step(draw(st.booleans()), draw(st.sampled_from([Ping, Pong]))))
    if draw(st.booleans()):
        steps.append(Step(True, Bye))
    return steps


def same(a: Message, b: Message) -> bool:
    """``b`` (received) is ``a`` (sent), tensors bit for bit."""
    if type(a) is not type(b):
        return False
    for k, v in vars(a).items():
        w = getattr(b, k)
        if k == "tensors":
            if len(v) != len(w) or not all(x.dtype == y.dtype and x.shape == y.shape
                                           and x.tobytes() == y.tobytes()
                                           for x, y in zip(v, w)):
                return False
        elif k in ("proof", "checked"):
            continue  # filled in by the connection / set by the receiving decoder
        elif v != w:
            return False
    return True


def feed(receiver: ChiefConnection | WorkerConnection, data: bytes, cuts: list[int]
         ) -> list[Message]:
    events: list[Message] = []
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in zip(bounds, bounds[1:]):
        events += receiver.receive_data(data[a:b])
    return events


def run(steps: list[Step], data: st.DataObject, damage: Callable[[bytes], bytes] | None = None,
        at: int = -1) -> str:
    """Play ``steps``; ``damage`` alters the bytes of step ``at``. Returns how it ended:
    "done", "refused" (a ProtocolError), "waiting" (bytes missing) or "diverged" (a damaged
    flight delivered as another valid frame)."""
    chief, worker = ChiefConnection(TOKEN), WorkerConnection(TOKEN, SPEC)
    damaged = False
    for i, step in enumerate(steps):
        sender, receiver = (worker, chief) if step.to_chief else (chief, worker)
        msg = step.make()
        try:
            frame = sender.send(msg)  # type: ignore[arg-type]
        except ProtocolError:  # the chief's check of a worker proof a damage made wrong
            assert damaged and isinstance(msg, Welcome)
            return "refused"
        except LocalProtocolError:
            # Only after a damaged flight was delivered as another valid frame can our own
            # side be out of step.
            assert damaged
            return "diverged"
        raw = frame.tobytes()
        if i == at and damage is not None:
            raw, damaged = damage(raw), True
        cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=6), label=f"cuts {i}")
        try:
            events = feed(receiver, raw, cuts)
        except ProtocolError as exc:
            assert damaged, f"an honest {type(msg).__name__} was refused: {exc.message}"
            assert exc.code and exc.message
            assert receiver.state.value == "closed"
            return "refused"
        if not events:
            assert damaged, f"an honest {type(msg).__name__} was not delivered"
            return "waiting"
        if len(events) != 1 or not same(msg, events[0]):
            assert damaged, f"{msg} arrived as {events}"
            return "diverged"
    assert chief.state in (ChiefState.JOINED, ChiefState.CLOSED)
    return "done"


@given(st.data())
@SETTINGS
def test_honest_conversations_succeed_whatever_the_chunking(data: st.DataObject) -> None:
    steps = data.draw(st.composite(lambda draw: conversation(draw))())
    assert run(steps, data) == "done"


@given(st.data())
@SETTINGS
def test_a_flight_cut_short_waits_for_the_rest(data: st.DataObject) -> None:
    steps = data.draw(st.composite(lambda draw: conversation(draw))())
    at = data.draw(st.integers(0, len(steps) - 1))
    keep = data.draw(st.floats(0, 0.999))
    assert run(steps, data, lambda b: b[:int(len(b) * keep)], at) == "waiting"


def corruption(data: st.DataObject) -> Callable[[bytes], bytes]:
    kind = data.draw(st.sampled_from(["flip", "byte", "insert", "delete", "header"]))
    pos = data.draw(st.floats(0, 0.999))
    value = data.draw(st.integers(0, 255))
    junk = data.draw(st.binary(min_size=1, max_size=8))

    def damage(b: bytes) -> bytes:
        out = bytearray(b)
        p = int(len(out) * pos)
        if kind == "flip":
            out[p] ^= 1 << (value % 8)
        elif kind == "byte":
            out[p] = value if value != out[p] else (value + 1) % 256
        elif kind == "insert":
            out[p:p] = junk
        elif kind == "delete":
            del out[p:p + 1 + value % 8]
        else:  # a header field set to an extreme
            fields = list(HEADER.unpack(bytes(out[:HEADER.size])))
            i = 1 + value % 5
            bits = (8, 8, 16, 32, 64)[i - 1]
            extreme = [0, (1 << bits) - 1, 1 << (bits - 1), fields[i] + 1][value % 4]
            fields[i] = extreme % (1 << bits)
            out[:HEADER.size] = HEADER.pack(*fields)
        return bytes(out)

    return damage


@given(st.data())
@SETTINGS
def test_corrupted_conversations_end_in_a_protocol_error_or_a_valid_frame(
        data: st.DataObject) -> None:
    steps = data.draw(st.composite(lambda draw: conversation(draw))())
    at = data.draw(st.integers(0, len(steps) - 1))
    outcome = run(steps, data, corruption(data), at)
    event(outcome)
    assert outcome in ("done", "refused", "waiting", "diverged")


@given(st.data(), st.binary(max_size=400))
@SETTINGS
def test_random_bytes_in_any_state_are_refused_or_awaited(data: st.DataObject, junk: bytes
                                                          ) -> None:
    steps = data.draw(st.composite(lambda draw: conversation(draw))())
    chief, worker = ChiefConnection(TOKEN), WorkerConnection(TOKEN, SPEC)
    upto = data.draw(st.integers(0, len(steps)))
    for step in steps[:upto]:
        sender, receiver = (worker, chief) if step.to_chief else (chief, worker)
        receiver.receive_data(sender.send(step.make()).tobytes())  # type: ignore[arg-type]
    for receiver in (chief, worker):
        if receiver.state.value == "closed":
            continue
        try:
            feed(receiver, junk, data.draw(st.lists(st.integers(0, len(junk)), max_size=4)))
        except ProtocolError as exc:
            assert exc.message and receiver.state.value == "closed"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@given(round_=JSON, n=JSON, metrics=JSON)
@SETTINGS
def test_any_update_fields_give_a_checked_update_or_a_protocol_error(
        round_: object, n: object, metrics: object) -> None:
    chief, worker = ChiefConnection(TOKEN), WorkerConnection(TOKEN, SPEC)
    for sender, receiver, msg in [(worker, chief, Hello("pi")), (chief, worker, Challenge()),
                                  (worker, chief, Auth(SPEC)), (chief, worker, Welcome(0))]:
        receiver.receive_data(sender.send(msg).tobytes())  # type: ignore[arg-type]
    frame = worker.send(Update(0, 1, MODEL))
    meta = {"tensors": frame.meta["tensors"], "round": round_, "num_samples": n,  # type: ignore[index]
            "metrics": metrics}
    text = json.dumps(meta).encode()
    payload = b"".join(bytes(p) for p in frame.parts[1:])
    raw = HEADER.pack(b"FDBR", 1, 6, 0, len(text), len(payload)) + text + payload
    try:
        (up,) = chief.receive_data(raw)
    except ProtocolError as exc:
        assert exc.message
        return
    assert isinstance(up, Update)
    assert type(up.round) is int and up.round >= 0
    assert isinstance(up.num_samples, float) and 0 < up.num_samples <= MAX_NUM_SAMPLES
    assert all(isinstance(v, float) and np.isfinite(v) for v in up.metrics.values())


def test_the_fuzz_conversations_cover_every_kind_of_step() -> None:
    """The generator is not vacuous: across seeds it makes every message type."""
    seen: set[str] = set()

    @given(st.data())
    @settings(max_examples=60, deadline=None, database=None)
    def collect(data: st.DataObject) -> None:
        for step in data.draw(st.composite(lambda draw: conversation(draw))()):
            msg = step.make()
            seen.add(type(msg).__name__ + (f":{msg.codec}" if isinstance(msg, Global) else ""))

    collect()
    assert {"Hello", "Challenge", "Auth", "Welcome", "Init", "Update", "Ping", "Pong", "Bye",
            "Global:none", "Global:unchanged", "Global:q8", "Global:fp16"} <= seen
