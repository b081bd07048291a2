"""At least 10,000 random or mutated frames thrown at a live chief process while two honest
workers train: no crash, no hang, every bad frame answered by an ERROR (or, for a frame cut short
and followed by end-of-stream, a close), and the honest workers unaffected.

The fuzzer works in the three states of a connection: before HELLO, after CHALLENGE (the AUTH
frame is the one fuzzed), and after WELCOME (a correct handshake, then the fuzzed frame). An
oracle written here, independent of the chief's code, says what each byte string is: complete
and bad (must be answered by an ERROR frame), cut short (sent with end-of-stream: must be answered
by an ERROR or a close), or valid (never sent: a valid update would change the honest model).

"Unaffected" is checked exactly: each honest worker sends a known function of the global model,
so every round's new global model must be precisely the mean of the two honest updates; a fuzzed
update counted anywhere, or a round closed without one of them, breaks that equality.
Connections come from random 127.x.y.z addresses: many machines, as far as the chief can tell.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from robustness_harness import TOKEN, Cluster

from fedberry import codecs
from fedberry.protocol import auth
from fedberry.protocol.frames import (
    HEADER,
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    Limits,
    MsgType,
    ProtocolError,
    encode,
    spec_of,
)

FRAMES = 10_000
CONCURRENCY = 24
ANSWER_TIMEOUT = 20.0  # the chief answers in milliseconds; this only bounds a hang
SHAPES = [(16, 8), (8,), (2, 3, 4)]
MODEL = [np.zeros(s, np.float32) for s in SHAPES]
SPEC = spec_of(MODEL)
SPEC_JSON = [[t.dtype, list(t.shape)] for t in SPEC]
MODEL_BYTES = sum(a.nbytes for a in MODEL)
# What the chief accepts in each state, as documented (transports/tcp.py): small tensor-free
# frames before WELCOME, then frames of exactly the federation's model.
PREAUTH = Limits(max_meta_bytes=256 << 10, max_tensors=10_000, max_payload=0)
# (A q8 update carries two tensors, values and scales, per float tensor.)
JOINED = Limits(max_meta_bytes=256 << 10, max_tensors=2 * len(SHAPES), max_payload=MODEL_BYTES)

HONEST = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from fedberry import Worker

    url, index, token_file, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    shapes = {shapes!r}
    rounds = 0
    with Worker(url, token_file=token_file, worker_id=f"honest-{{index}}") as w:
        g = w.join([np.full(s, 0.5, np.float32) for s in shapes])
        while not os.path.exists(stop):
            time.sleep(0.02)  # "training"
            sent = [a + np.float32(index * 1e-3) for a in g]
            new = w.sync(sent, index)
            if os.path.exists(stop):
                # The other may have left before this round closed, which then holds this
                # update alone: the test is over, and that is the one round not checked.
                break
            # The chief's mean of honest-1's and honest-2's updates, and nothing else:
            # g + (1 * 1e-3 * 1 + 2 * 2e-3) / 3 (each weighted by its sample count).
            want = [a.astype(np.float64) + 5e-3 / 3 for a in g]
            for a, b in zip(new, want):
                if not np.allclose(a, b, rtol=0, atol=1e-6):
                    sys.exit(f"round {{w.round}}: the global model is not the honest mean")
            g = new
            rounds += 1
    print(f"honest-{{index}} rounds {{rounds}}", flush=True)
""").format(shapes=SHAPES)


# -- the oracle ------------------------------------------------------------------------------
@dataclass
class Verdict:
    kind: str  # "bad": complete, must be refused; "cut": incomplete; "valid": not to be sent
    why: str


def finite_number(v: object) -> bool:
    if type(v) not in (int, float):
        return False
    try:
        return math.isfinite(float(v)) and float(v) > 0  # type: ignore[arg-type]
    except OverflowError:
        return False


def judge(data: bytes, state: str, proof: str = "") -> Verdict:
    """What the chief must do with ``data`` arriving in ``state``."""
    decoder = FrameDecoder(JOINED if state == "joined" else PREAUTH)
    decoder.expected = SPEC if state == "joined" else None
    try:
        frames = decoder.receive_data(data)
    except ProtocolError as exc:
        return Verdict("bad", exc.message)
    if not frames:
        return Verdict("cut", "incomplete")
    f = frames[0]
    if f.type in (MsgType.PING, MsgType.PONG):
        return Verdict("valid", "heartbeat")
    if state == "hello":
        wid, nonce = f.meta.get("worker_id"), f.meta.get("nonce")
        ok = (f.type == MsgType.HELLO and isinstance(wid, str) and 0 < len(wid) <= 128
              and wid.isprintable() and isinstance(nonce, str) and len(nonce) == 64)
        return Verdict("valid" if ok else "bad", "HELLO")
    if state == "auth":
        if f.type != MsgType.AUTH or f.meta.get("proof") != proof:
            return Verdict("bad", "not an AUTH with the right proof")
        return Verdict("valid" if f.meta.get("spec") == SPEC_JSON else "bad", "AUTH spec")
    if f.type == MsgType.BYE:
        return Verdict("valid", "BYE")
    if f.type != MsgType.UPDATE:
        return Verdict("bad", f"{f.type.name} after WELCOME")
    if type(f.meta.get("round")) is not int or not finite_number(f.meta.get("num_samples")):
        return Verdict("bad", "UPDATE fields")
    if not all(np.isfinite(t).all() for t in f.tensors):
        return Verdict("bad", "non-finite")
    if f.meta.get("codec") == "q8" and any((t < 0).any() for t in f.tensors[1::2]):
        return Verdict("bad", "negative q8 scale")
    return Verdict("valid", "a real update")


# -- the fuzzer ------------------------------------------------------------------------------
def json_junk(rng: random.Random) -> object:
    return rng.choice([None, True, False, 0, -1, 1, 2**63, 10**400, 1e308, -0.0, 0.5, "", "x" * 200,
                       "\u0000", [], [1, 2], {}, {"a": [{}]}, "<f4", [[16, 8]], "NaN"])


def mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[pos] = rng.randrange(256)
        elif op == 2:
            b[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and b:
            del b[pos:pos + rng.randint(1, 8)]
        elif op == 4:
            del b[rng.randint(0, len(b)):]
        elif op == 5 and len(b) >= HEADER_SIZE:
            fields = list(HEADER.unpack(bytes(b[:HEADER_SIZE])))
            i = rng.randint(1, 5)
            bits = (8, 8, 16, 32, 64)[i - 1]
            fields[i] = rng.choice([0, 1, 7, 255, (1 << bits) - 1, 1 << (bits - 1),
                                    fields[i] + 1, max(fields[i] - 1, 0)]) % (1 << bits)
            b[:HEADER_SIZE] = HEADER.pack(*fields)
        elif op == 6:
            b[pos:pos] = bytes([rng.randrange(256)]) * rng.randint(1, 3)
    return bytes(b)


def with_meta(msg_type: MsgType, meta: dict, tensors: list[np.ndarray],
              rng: random.Random) -> bytes:
    """A frame whose metadata has one field replaced by junk, a key dropped or added."""
    meta = dict(meta)
    choice = rng.randrange(3)
    if choice == 0 and meta:
        meta[rng.choice(sorted(meta))] = json_junk(rng)
    elif choice == 1 and meta:
        meta.pop(rng.choice(sorted(meta)))
    else:
        meta[rng.choice(["tensors", "round", "x", "proof", "spec"])] = json_junk(rng)
    data = encode(msg_type, {}, tensors).tobytes()
    head = HEADER.unpack(data[:HEADER_SIZE])
    if "tensors" in meta or msg_type in (MsgType.UPDATE, MsgType.INIT, MsgType.GLOBAL):
        meta.setdefault("tensors", [{"dtype": a.dtype.str, "shape": list(a.shape)}
                                    for a in tensors])
    text = json.dumps(meta).encode()
    payload = b"".join(a.tobytes() for a in tensors)
    return HEADER.pack(head[0], head[1], head[2], head[3], len(text), len(payload)) + text + payload


def update_frame(rng: random.Random) -> tuple[MsgType, dict, list[np.ndarray]]:
    tensors = [np.full(s, rng.random(), np.float32) for s in SHAPES]
    if rng.random() < 0.3:
        t = rng.randrange(len(tensors))
        tensors[t].flat[rng.randrange(tensors[t].size)] = rng.choice([np.nan, np.inf, -np.inf])
    meta = {"round": rng.randrange(5), "num_samples": rng.choice([1, 10.5, 0, -3]),
            "metrics": {"loss": rng.random()}}
    if rng.random() < 0.3:  # compressed: values and scales, or half floats
        meta["codec"] = rng.choice(["q8", "fp16"])
        with np.errstate(invalid="ignore"):  # NaN and Inf stay (as NaN scales for q8)
            tensors = (codecs.get("q8").encode(tensors, MODEL) if meta["codec"] == "q8"
                       else [t.astype(np.float16) for t in tensors])
        if meta["codec"] == "q8" and rng.random() < 0.5:
            tensors[1] = tensors[1].copy()
            tensors[1][0] = rng.choice([np.nan, np.inf, -1.0])
    return MsgType.UPDATE, meta, tensors


def candidate(state: str, rng: random.Random, nonces: tuple[str, str]) -> tuple[bytes, str]:
    chief_nonce, worker_nonce = nonces
    proof = auth.worker_proof(TOKEN, chief_nonce, worker_nonce) if chief_nonce else ""
    if rng.random() < 0.05:
        return rng.randbytes(rng.randint(1, 64)), proof  # plain noise
    bases: list[tuple[MsgType, dict, list[np.ndarray]]] = [
        (MsgType.HELLO, {"worker_id": "fuzz", "nonce": worker_nonce}, []),
        (MsgType.AUTH, {"proof": proof, "spec": SPEC_JSON, "want_model": False}, []),
        update_frame(rng),
        (MsgType.INIT, {}, [np.zeros(s, np.float32) for s in SHAPES]),
        (MsgType.PING, {}, []),
        (MsgType.GLOBAL, {"round": 1, "done": False}, [np.zeros(s, np.float32) for s in SHAPES]),
        (MsgType.ERROR, {"code": "x", "message": "y", "fatal": True}, []),
        (MsgType.BYE, {}, []),
    ]
    weights = {"hello": [6, 2, 2, 1, 1, 1, 1, 1], "auth": [1, 8, 2, 1, 1, 1, 1, 1],
               "joined": [1, 1, 10, 2, 1, 1, 1, 1]}[state]
    t, meta, tensors = rng.choices(bases, weights)[0]
    if rng.random() < 0.4:
        return with_meta(t, meta, tensors, rng), proof
    return mutate(encode(t, meta, tensors).tobytes(), rng), proof


class Tally:
    def __init__(self) -> None:
        self.sent = collections.Counter()  # (state, verdict) -> frames
        self.answers = collections.Counter()  # error codes, "closed"
        self.failures: list[str] = []
        self.valid_skipped = 0


class Reader:
    """The chief's frames on one connection, in order."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.decoder = FrameDecoder()
        self.pending: collections.deque[Frame] = collections.deque()

    async def answer(self) -> Frame | None:
        """The next frame other than a heartbeat; None when the chief closed the connection."""
        while True:
            while self.pending:
                f = self.pending.popleft()
                if f.type not in (MsgType.PING, MsgType.PONG):
                    return f
            data = await self.reader.read(1 << 16)
            if not data:
                return None
            self.pending.extend(self.decoder.receive_data(data))


async def one_case(port: int, state: str, rng: random.Random, tally: Tally) -> None:
    source = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    chief = Reader(reader)
    try:
        worker_nonce, chief_nonce = auth.new_nonce(), ""
        if state in ("auth", "joined"):
            writer.write(encode(MsgType.HELLO, {"worker_id": f"fuzz-{source}",
                                                "nonce": worker_nonce}).tobytes())
            challenge = await chief.answer()
            assert challenge is not None and challenge.type == MsgType.CHALLENGE
            chief_nonce = challenge.meta["nonce"]
        if state == "joined":
            writer.write(encode(MsgType.AUTH, {
                "proof": auth.worker_proof(TOKEN, chief_nonce, worker_nonce),
                "spec": SPEC_JSON, "want_model": False}).tobytes())
            welcome = await chief.answer()
            assert welcome is not None and welcome.type == MsgType.WELCOME, welcome
        for _ in range(50):
            data, proof = candidate(state, rng, (chief_nonce, worker_nonce))
            verdict = judge(data, state, proof)
            if verdict.kind != "valid":
                break
            tally.valid_skipped += 1
        else:
            return
        writer.write(data)
        if verdict.kind == "cut":
            writer.write_eof()  # the rest never comes
        answer = await chief.answer()
        if (state == "auth" and answer is not None and answer.type == MsgType.WELCOME
                and verdict.why == "AUTH spec"):
            # The right proof: the chief welcomes, then finds the model spec wrong.
            answer = await chief.answer()
        tally.sent[(state, verdict.kind)] += 1
        if answer is None:
            tally.answers["closed"] += 1
            if verdict.kind == "bad":
                tally.failures.append(f"{state}: closed without an ERROR: {verdict.why}: "
                                      f"{data[:120]!r}")
            return
        if answer.type != MsgType.ERROR:
            tally.failures.append(f"{state}: answered {answer.type.name} to {verdict.why}: "
                                  f"{data[:120]!r}")
            return
        code = answer.meta.get("code")
        tally.answers[code] += 1
        if code == "internal":
            tally.failures.append(f"{state}: internal error {answer.meta}: {data[:120]!r}")
        if answer.meta.get("fatal") is not True:
            tally.failures.append(f"{state}: non-fatal answer {answer.meta} to {verdict.why}")
        if await chief.answer() is not None:  # and then it closes
            tally.failures.append(f"{state}: still talking after a fatal error")
    finally:
        writer.close()


async def fuzz(port: int, frames: int, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    gate = asyncio.Semaphore(CONCURRENCY)
    states = ["hello"] * 4 + ["auth"] * 2 + ["joined"] * 4

    async def guarded(case_rng: random.Random, state: str) -> None:
        async with gate:
            try:
                await asyncio.wait_for(one_case(port, state, case_rng, tally), ANSWER_TIMEOUT)
            except asyncio.TimeoutError:
                tally.failures.append(f"{state}: no answer within {ANSWER_TIMEOUT} s (a hang)")
            except (AssertionError, OSError) as exc:
                tally.failures.append(f"{state}: {type(exc).__name__}: {exc}")

    deadline = time.monotonic() + 300  # bounded even if the generator went astray
    while (sum(tally.sent.values()) < frames and len(tally.failures) < 20
           and time.monotonic() < deadline):
        batch = [guarded(random.Random(rng.random()), rng.choice(states))
                 for _ in range(min(500, frames - sum(tally.sent.values())) + 20)]
        await asyncio.gather(*batch)


@pytest.mark.heavy  # ~45 s: the extra Pythons' core runs leave it out (scripts/test-pythons.sh)
def test_ten_thousand_bad_frames_at_a_live_chief(tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    with Cluster(tmp_path) as c:
        # The fuzzers' dropped connections would hold the finished chief for the default 30 s
        # of --finish-grace (in case they come back for the final model): they do not.
        chief = c.chief("--workers", "2", "--model", "none", "--idle-timeout", "30",
                        "--finish-grace", "2")
        honest = [c.python(f"honest{i}", ["-c", HONEST, c.url, str(i), str(c.token_file),
                                           str(stop)]) for i in (1, 2)]
        c.wait_round(2)

        tally = Tally()
        t0 = time.monotonic()
        asyncio.run(fuzz(c.port, FRAMES, seed=20240601, tally=tally))
        elapsed = time.monotonic() - t0
        rounds_during = c.metrics()[-1]["round"]
        print(f"\nfuzz: {sum(tally.sent.values())} bad frames in {elapsed:.1f} s, "
              f"{tally.valid_skipped} valid candidates not sent; sent {dict(tally.sent)}; "
              f"answers {dict(tally.answers)}; rounds closed so far {rounds_during}")
        assert not tally.failures, "\n".join(tally.failures[:20])
        assert sum(tally.sent.values()) >= FRAMES
        assert chief.popen.poll() is None  # alive

        before = rounds_during
        c.wait_round(before + 3)  # and still closing rounds with the honest workers
        stop.write_text("")
        for h in honest:
            assert h.wait(60) == 0, c.logs()
            assert "rounds" in h.log()
        assert chief.wait(60) == 0, c.logs()
        metrics = c.metrics()
        # Each honest worker stops on its own: the last round may have closed with one.
        assert all(m["workers"] == 2 for m in metrics[:-1]) and metrics[-1]["workers"] >= 1
        log = chief.log()
        assert "Traceback" not in log and "error handling a frame" not in log
