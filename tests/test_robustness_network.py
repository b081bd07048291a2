"""Dropped connections, stragglers and hostile peers, with a real chief and real workers.

* A worker whose connection is cut (by a relay the test controls) reconnects by itself and
  finishes.
* A worker frozen with SIGSTOP is a straggler: rounds close at the deadline with the quorum; when
  it wakes up its late update is dropped, it is told so, and it goes on from the newest model.
* While two honest workers train: a worker with the wrong token is refused with a clear error;
  frames with a bad length, dtype or shape, NaN, a frame out of turn and garbage are each
  answered by an ERROR and a close; repeated authentication failures from one address are
  answered more and more slowly. The honest workers finish every round, unaffected.
"""

from __future__ import annotations

import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from robustness_harness import TOKEN, Cluster, Proxy, RawClient, mlp_spec, wait_until

from fedberry.protocol.frames import HEADER, HEADER_SIZE, MsgType, encode

# Float32 both ways, and fedberry's lean wire: a resent q8 update after a reconnect, and a late
# one encoded against a model the chief has moved past, must work out the same.
WIRES = {"f32": ((), ()), "q8": (("--downlink", "q8"), ("--codec", "q8"))}


@pytest.mark.parametrize("wire", list(WIRES))
def test_dropped_connection_reconnects_by_itself_and_finishes(tmp_path: Path, wire: str) -> None:
    # A round takes a tenth of a second here, and the chief goes on without a worker whose
    # connection broke: enough rounds that the relayed worker is back, and counted, before each
    # next cut, however long its backoff; the test waits for that instead of guessing a round.
    rounds = 40
    chief_args, worker_args = WIRES[wire]
    with Cluster(tmp_path) as c, Proxy(c.port) as relay:
        chief = c.chief("--workers", "2", "--rounds", str(rounds), *chief_args)
        direct = c.worker(1, 2, *worker_args)
        relayed = c.worker(2, 2, *worker_args, url=relay.url)

        def both_back_after(round_: int) -> None:
            """Both workers in a round after ``round_``: the relayed one came back by itself."""
            wait_until(lambda: any(m["round"] > round_ and m["workers"] == 2
                                   for m in c.metrics()), 60,
                       f"both workers in a round after round {round_}", logs=c.logs)

        cut_after = 0
        for _ in range(2):
            both_back_after(cut_after)
            wait_until(lambda: relay.connections() == 1, 60, "the relayed worker's connection",
                       logs=c.logs)
            cut_after = c.metrics()[-1]["round"]
            assert cut_after < rounds - 5, f"the run ended before the cut\n{c.logs()}"
            accepted = relay.accepted
            assert relay.drop_all() == 1  # cut, as a flaky Wi-Fi would
            wait_until(lambda: relay.accepted > accepted, 60,  # noqa: B023 - called at once
                       "the relayed worker to dial again", logs=c.logs)
        both_back_after(cut_after)
        assert chief.wait(90) == 0, c.logs()
        assert direct.wait(30) == 0 and relayed.wait(30) == 0, c.logs()
        assert relay.accepted >= 3  # connected once, came back after each cut
        assert f"'round': {rounds}" in relayed.log()
        assert [m["round"] for m in c.metrics()] == list(range(1, rounds + 1))


@pytest.mark.parametrize("wire", list(WIRES))
def test_straggler_is_left_behind_at_the_deadline_and_catches_up(tmp_path: Path,
                                                                 wire: str) -> None:
    # Enough rounds that a loaded machine (the third worker joining late, rounds at the
    # deadline) still leaves several after the thaw to catch up in.
    rounds = 20
    chief_args, worker_args = WIRES[wire]
    with Cluster(tmp_path) as c:
        chief = c.chief("--workers", "3", "--rounds", str(rounds), "--min-workers", "2",
                        "--round-timeout", "1", *chief_args)
        workers = [c.worker(i, 3, *worker_args) for i in (1, 2, 3)]
        wait_until(lambda: any(m["workers"] == 3 for m in c.metrics()), 60,
                   "a round with all three workers", logs=c.logs)
        workers[2].signal(signal.SIGSTOP)
        # The metrics lag the chief, and the frozen worker may have had an update in flight:
        # wait for what must come, three rounds in a row closed at the deadline without it.
        wait_until(lambda: [m["workers"] for m in c.metrics()[-3:]] == [2, 2, 2], 60,
                   "three rounds closed without the frozen worker", logs=c.logs)
        thawed_after = c.metrics()[-1]["round"]
        assert thawed_after < rounds - 3, f"too few rounds left to catch up\n{c.logs()}"
        workers[2].signal(signal.SIGCONT)
        assert chief.wait(90) == 0, c.logs()
        for w in workers:
            assert w.wait(30) == 0, c.logs()
        metrics = c.metrics()
        assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
        # told that its update came too late; then it went on from the newest model ...
        assert "arrived after it closed" in workers[2].log()
        assert "the newest model follows" in workers[2].log()
        # ... and took part again
        assert any(m["workers"] == 3 for m in metrics[thawed_after:]), c.logs()
        # Training went on: whatever the wire, the model learned (random is 0.1).
        assert metrics[-1]["test_accuracy"] > 0.6, metrics[-1]


def bad_update(round_: int, mutate: str) -> bytes:
    """An UPDATE for the MLP, spoilt one way."""
    tensors = [np.zeros(s, np.float32) for _, s in mlp_spec()]
    meta = {"round": round_, "num_samples": 100, "metrics": {}}
    if mutate == "nan":
        tensors[2][5, 7] = np.nan
        return encode(MsgType.UPDATE, meta, tensors).tobytes()
    data = bytearray(encode(MsgType.UPDATE, meta, tensors).tobytes())
    magic, ver, t, flags, meta_len, payload_len = HEADER.unpack(data[:HEADER_SIZE])
    head = data[:HEADER_SIZE + meta_len]
    if mutate == "longer":
        struct.pack_into("<Q", head, 12, payload_len + 1)
        return bytes(head)
    if mutate == "shorter":
        struct.pack_into("<Q", head, 12, payload_len - 4)
        return bytes(head)
    text = head[HEADER_SIZE:].decode()
    if mutate == "object-dtype":
        text = text.replace('"<f4"', '"|O"', 1)
    elif mutate == "float16":
        text = text.replace('"<f4"', '"<f2"', 1)
        payload_len -= 200 * 784 * 2  # consistent with itself, only not the federation's model
    elif mutate == "transposed":
        text = text.replace("[200,784]", "[784,200]", 1)
    new_meta = text.encode()
    # Header and metadata only: the chief judges the frame before its payload.
    return HEADER.pack(magic, ver, t, flags, len(new_meta), payload_len) + new_meta


# what is wrong -> (how bad_update spoils it, the error code the chief must answer with)
SPOILT = {
    # With the model known the chief reads the (bounded) metadata first and names the mismatch
    # ("tensors need N bytes, the header says N+1") instead of a byte limit.
    "payload_len one too long": ("longer", "bad_frame"),
    "payload_len too short for the tensors": ("shorter", "bad_frame"),
    "object dtype": ("object-dtype", "bad_frame"),
    "float16 instead of float32": ("float16", "spec_mismatch"),
    "transposed shape": ("transposed", "spec_mismatch"),
    "NaN in the weights": ("nan", "non_finite"),
}


def test_hostile_peers_are_refused_while_honest_workers_train(tmp_path: Path) -> None:
    rounds = 40
    with Cluster(tmp_path, sync_every=40) as c:
        chief = c.chief("--workers", "2", "--rounds", str(rounds), "--finish-grace", "2")
        honest = [c.worker(i, 2) for i in (1, 2)]
        # A worker process with the wrong token, started with the honest ones (it takes as long
        # to start): refused, told why, no retrying.
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-token\n")
        intruder = c.start("intruder", ["worker", "--chief", c.url, "--partition", "1/2",
                                        "--token-file", str(wrong), "--worker-id", "intruder"])
        c.wait_round(1)
        # A member that never sends: no round closes while it is joined, so the chief is still
        # running for every check below, however quickly its rounds go. Closed at the end.
        holder = RawClient(c.port)
        assert holder.handshake(TOKEN, mlp_spec(), worker_id="holder").type == MsgType.WELCOME

        # Spoilt frames from authenticated peers, each answered by an ERROR, then a close.
        for name, (how, code) in SPOILT.items():
            with RawClient(c.port) as raw:
                welcome = raw.handshake(TOKEN, mlp_spec(), worker_id=f"raw-{how}")
                assert welcome.type == MsgType.WELCOME, (name, welcome.meta)
                raw.send(bad_update(welcome.meta["round"], how))
                err = raw.answer()
                assert err is not None and err.type == MsgType.ERROR, name
                assert err.meta["code"] == code and err.meta["fatal"] is True, (name, err.meta)
                assert raw.answer() is None, name  # and the chief closed the connection
        nan_message = err.meta["message"]
        assert "NaN or Inf" in nan_message and "tensor 2" in nan_message

        with RawClient(c.port) as raw:  # a frame out of turn
            raw.handshake(TOKEN, mlp_spec(), worker_id="raw-hello-twice")
            raw.send(encode(MsgType.HELLO, {"worker_id": "x", "nonce": "0" * 64}).tobytes())
            err = raw.answer()
            assert err.meta["code"] == "protocol" and raw.answer() is None
        with RawClient(c.port) as raw:  # not our protocol at all
            raw.send(b"GET / HTTP/1.1\r\nHost: chief\r\n\r\n")
            err = raw.answer()
            assert err.meta["code"] == "bad_frame" and "magic" in err.meta["message"]
            assert raw.answer() is None

        # Wrong tokens from one address: the first few are answered at once, then the chief
        # holds each answer longer. An honest worker elsewhere is not held back.
        held = []
        for attempt in range(1, 6):
            with RawClient(c.port, source="127.0.0.7") as raw:
                t0 = time.monotonic()
                err = raw.handshake("wrong", mlp_spec(), worker_id="guesser")
                held.append(time.monotonic() - t0)
                assert err.meta["code"] == "auth_failed"
                if attempt >= 3:
                    assert "failed attempts from 127.0.0.7" in err.meta["message"]
        assert held[3] >= 0.25 and held[4] >= 0.5, held  # 0.25 s, then doubling
        with RawClient(c.port, source="127.0.0.1") as raw:
            assert raw.handshake(TOKEN, mlp_spec(), worker_id="raw-ok").type == MsgType.WELCOME
        holder.close()

        assert intruder.wait(60) == 1
        assert "your token does not match the chief's" in intruder.log(), intruder.log()
        assert "Traceback" not in intruder.log()

        assert chief.wait(120) == 0, c.logs()
        for w in honest:
            assert w.wait(30) == 0, c.logs()
        metrics = c.metrics()
        assert [m["round"] for m in metrics] == list(range(1, rounds + 1))
        assert all(m["workers"] == 2 for m in metrics)  # nothing hostile was ever counted
        assert metrics[-1]["test_accuracy"] > 0.7
        log = chief.log()
        assert "Traceback" not in log
        # the honest workers trained on after the intruder was turned away
        refused_at = log.index("authentication failed for worker 'intruder'")
        assert f"\n{rounds:>5} " in log[refused_at:]
