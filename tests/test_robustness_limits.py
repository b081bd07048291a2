"""The chief's defences against connections that take without giving: a connection cap, a cap on
handshakes per address, handshake and idle timeouts, heartbeats, peers that do not read, and
slower answers to addresses that keep failing authentication. A real chief on loopback (in this
process, so that its limits can be set small), raw sockets for the misbehaving peers.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from robustness_harness import TOKEN, RawClient, wait_until

from fedberry import Worker
from fedberry.protocol.frames import MsgType, encode, spec_of, spec_to_json
from fedberry.serve import ChiefHandle, serve
from fedberry.transports.tcp import ListenOptions, TcpChief

MODEL = [np.zeros((64, 32), np.float32), np.zeros(32, np.float32)]
SPEC = spec_to_json(spec_of(MODEL))


@pytest.fixture
def chief() -> Iterator[ChiefHandle]:
    handle = serve("127.0.0.1:0", workers=1, rounds=1000, initial=MODEL, token=TOKEN,
                   max_connections=6, handshake_timeout=1.0, idle_timeout=2.0)
    try:
        yield handle
    finally:
        handle.stop()


def port(handle: ChiefHandle) -> int:
    assert handle.address is not None
    return handle.address[1]


def refused(raw: RawClient, code: str) -> str:
    f = raw.answer()
    assert f is not None and f.type == MsgType.ERROR and f.meta["code"] == code, f
    assert raw.answer() is None
    return f.meta["message"]


def hello(raw: RawClient) -> MsgType:
    raw.send(encode(MsgType.HELLO, {"worker_id": "x", "nonce": "ab" * 32}).tobytes())
    f = raw.answer()
    assert f is not None
    return f.type


def test_connection_cap(chief: ChiefHandle) -> None:
    held = [RawClient(port(chief), source=f"127.0.1.{i}") for i in range(6)]
    try:
        wait_until(lambda: len(chief.tcp.connections) == 6, 10, "six connections")
        with RawClient(port(chief), source="127.0.2.1") as extra:
            assert "too many connections" in refused(extra, "busy")
        held.pop().close()
        wait_until(lambda: len(chief.tcp.connections) == 5, 10, "a slot to free up")
        with RawClient(port(chief), source="127.0.2.1") as extra:
            assert hello(extra) == MsgType.CHALLENGE
    finally:
        for raw in held:
            raw.close()


def test_handshakes_per_address_are_capped(chief: ChiefHandle) -> None:
    chief.tcp.options.max_pending_per_address = 2
    held = [RawClient(port(chief), source="127.0.3.1") for _ in range(2)]
    try:
        wait_until(lambda: len(chief.tcp.connections) == 2, 10, "two connections")
        with RawClient(port(chief), source="127.0.3.1") as third:
            assert "still handshaking" in refused(third, "busy")
        with RawClient(port(chief), source="127.0.3.2") as elsewhere:
            assert hello(elsewhere) == MsgType.CHALLENGE
    finally:
        for raw in held:
            raw.close()


def test_silent_and_slow_handshakes_time_out(chief: ChiefHandle) -> None:
    with RawClient(port(chief)) as silent, RawClient(port(chief)) as slow:
        # A header promising metadata that comes one byte at a time: never complete in time.
        frame = encode(MsgType.HELLO, {"worker_id": "slowloris", "nonce": "ab" * 32}).tobytes()
        t0 = time.monotonic()
        for b in frame[:40]:
            try:
                slow.send(bytes([b]))
            except OSError:
                break  # closed on us: that is the point
            time.sleep(0.05)
        assert "handshake not completed in time" in refused(slow, "timeout")
        assert "handshake not completed in time" in refused(silent, "timeout")
        assert time.monotonic() - t0 < 10  # the chief's 1 s limit, not the test's patience


def test_silent_worker_is_pinged_then_dropped_and_the_round_goes_on(chief: ChiefHandle) -> None:
    with RawClient(port(chief)) as mute:
        assert mute.handshake(TOKEN, SPEC, worker_id="mute").type == MsgType.WELCOME
        f = mute.frame()  # the chief's heartbeat comes after ~1 s of quiet (idle_timeout / 4)
        assert f is not None and f.type == MsgType.PING
        # an honest worker's round waits for the member that went quiet, until it is dropped
        done = threading.Event()

        def honest() -> None:
            with Worker(chief.url, token=TOKEN, worker_id="honest") as w:
                g = w.join(MODEL)
                w.sync([a + 1 for a in g], 1)
                done.set()

        t = threading.Thread(target=honest, daemon=True)
        t.start()
        assert "silent for 2 s" in refused(mute, "timeout")
        assert done.wait(10)
        t.join(10)
    assert chief.chief.round == 1


def test_peer_that_does_not_read_is_dropped() -> None:
    big = [np.zeros((1024, 1024), np.float32)]  # 4 MiB
    handle = serve("127.0.0.1:0", workers=2, rounds=10, initial=big, token=TOKEN)
    try:
        raw = RawClient(port(handle), rcvbuf=4096)  # it reads nothing, and holds little
        welcome = raw.handshake(TOKEN, spec_to_json(spec_of(big)), worker_id="hoarder")
        assert welcome.type == MsgType.WELCOME
        # Updates for a round the chief is not at: each is answered with the newest model,
        # which this peer never reads.
        update = encode(MsgType.UPDATE, {"round": 7, "num_samples": 1}, big).tobytes()
        for _ in range(40):
            try:
                raw.send(update)
            except OSError:
                break
            if "hoarder" not in handle.server.peers:
                break
        wait_until(lambda: "hoarder" not in handle.server.peers, 10, "the hoarder to be dropped")
        raw.close()
    finally:
        handle.stop()


def test_auth_delay_grows_per_address_and_is_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    tcp = TcpChief.__new__(TcpChief)
    tcp.options = ListenOptions(auth_failures_free=3, auth_delay_base=0.25, auth_delay_max=2,
                                auth_memory=60)
    tcp._failures = {}
    tcp._recent_failures = collections.deque(maxlen=tcp.options.auth_failures_global)
    now = [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    delays = []
    for _ in range(8):
        delays.append(tcp.auth_delay("198.51.100.7"))
        tcp.auth_failed("198.51.100.7")
    assert delays == [0, 0, 0, 0.25, 0.5, 1.0, 2.0, 2.0]
    assert tcp.auth_delay("198.51.100.8") == 0  # another address is not slowed
    now[0] += 61
    assert tcp.auth_delay("198.51.100.7") == 0  # quiet long enough: forgotten
    assert tcp.auth_failed("198.51.100.7") == 1
    for i in range(10_050):  # a spray of addresses cannot grow the table without bound
        tcp.auth_failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(tcp._failures) <= 10_000


def test_reconnect_replaces_the_old_connection_without_leaving() -> None:
    """A worker back on a new connection while the chief still holds its old one (a dead link
    not yet noticed) is the same member: the round does not close without it meanwhile."""
    handle = serve("127.0.0.1:0", workers=2, rounds=5, initial=MODEL, token=TOKEN)
    try:
        with RawClient(port(handle)) as x, RawClient(port(handle)) as old:
            assert x.handshake(TOKEN, SPEC, worker_id="x").type == MsgType.WELCOME
            assert old.handshake(TOKEN, SPEC, worker_id="w").type == MsgType.WELCOME
            x.send(encode(MsgType.UPDATE, {"round": 0, "num_samples": 1}, MODEL).tobytes())
            with RawClient(port(handle)) as new:
                assert new.handshake(TOKEN, SPEC, worker_id="w").type == MsgType.WELCOME
                assert old.answer() is None  # the old connection is closed ...
                assert handle.chief.round == 0 and "w" in handle.chief.members  # ... w stays
                new.send(encode(MsgType.UPDATE, {"round": 0, "num_samples": 1},
                                MODEL).tobytes())
                f = new.answer()
                assert f is not None and f.type == MsgType.GLOBAL and f.meta["round"] == 1
    finally:
        handle.stop()


def test_a_deadline_passed_without_quorum_leaves_the_loop_idle() -> None:
    """The deadline timer fires once; it is not re-armed at a past deadline (that spun the
    chief's loop at 100 Hz for as long as the quorum was missing), and the update that
    completes the quorum closes the round by itself."""
    handle = serve(None, workers=2, rounds=3, min_workers=2, round_timeout=0.2, initial=MODEL)
    ticks = []
    real_tick = handle.chief.tick
    handle.chief.tick = lambda now: ticks.append(now) or real_tick(now)  # type: ignore[method-assign]
    done = threading.Event()

    def worker(name: str, delay: float) -> None:
        with Worker(handle, worker_id=name) as w:
            g = w.join(MODEL)
            time.sleep(delay)
            w.sync([a + 1 for a in g], 1)
            if name == "late":
                done.set()

    try:
        threads = [threading.Thread(target=worker, args=a, daemon=True)
                   for a in (("early", 0.0), ("late", 1.0))]
        for t in threads:
            t.start()
        assert done.wait(10)
        assert handle.chief.round == 1
        assert len(ticks) <= 3, len(ticks)  # one per armed deadline, not one per 10 ms
    finally:
        handle.stop()


def test_a_finished_chief_does_not_wait_for_a_worker_it_refused_for_good() -> None:
    # A worker closed with a fatal error it does not retry after (here a protocol error) will
    # not dial again for the final model: the finished run ends at once, not after the 30 s
    # finish grace it keeps for workers whose connections broke (they do come back).
    handle = serve("127.0.0.1:0", workers=2, min_workers=1, round_timeout=0.5, rounds=2,
                   initial=MODEL, token=TOKEN)
    try:
        with RawClient(port(handle)) as bad:
            assert bad.handshake(TOKEN, SPEC, worker_id="bad").type == MsgType.WELCOME
            bad.send(encode(MsgType.HELLO, {"worker_id": "bad", "nonce": "ab" * 32}).tobytes())
            assert refused(bad, "protocol")
        with Worker(handle.url, token=TOKEN, worker_id="honest") as w:
            g = w.join(MODEL)
            while not w.done:
                g = w.sync([a + 1 for a in g], 1)
        t0 = time.monotonic()
        assert handle.wait(15), "the chief waited for the refused worker"
        assert time.monotonic() - t0 < 10
        assert handle.chief.round == 2
    finally:
        handle.stop()
