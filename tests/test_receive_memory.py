"""The chief reads at most ``receive_memory`` bytes of updates at once, whatever the number of
workers sending: the others wait in their sockets, and nothing is lost on the way, not even when
the worker being read dies halfway through its update. Real sockets to a real chief."""

from __future__ import annotations

from typing import Any

import numpy as np
from robustness_harness import TOKEN, RawClient, wait_until

from fedberry.protocol.frames import MsgType, encode
from fedberry.serve import ChiefHandle, serve

SHAPES = [(256, 128), (128,), (64, 64)]
MODEL_BYTES = sum(int(np.prod(s)) * 4 for s in SHAPES)
SPEC = [["<f4", list(s)] for s in SHAPES]


def update(seed: int) -> tuple[list[np.ndarray], bytes]:
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    return arrays, encode(MsgType.UPDATE, {"round": 0, "num_samples": 10 * seed}, arrays).tobytes()


def on_loop(handle: ChiefHandle, fn: Any) -> Any:
    """``fn()`` on the chief's event loop, where the state it reads is changed."""
    async def call() -> Any:
        return fn()
    return handle.io.run(call(), 10)


def test_updates_beyond_the_budget_wait_their_turn_and_all_count() -> None:
    initial = [np.zeros(s, np.float32) for s in SHAPES]
    handle = serve("127.0.0.1:0", workers=3, rounds=1, initial=initial, token=TOKEN,
                   receive_memory=MODEL_BYTES)  # one update at a time
    port = handle.address[1]
    budget = handle.tcp.budget
    try:
        dying, slow, queued = (RawClient(port) for _ in range(3))
        for i, raw in enumerate((dying, slow, queued)):
            assert raw.handshake(TOKEN, SPEC, worker_id=f"w{i}").type == MsgType.WELCOME
        _, dying_bytes = update(1)
        slow_arrays, slow_bytes = update(2)
        queued_arrays, queued_bytes = update(3)
        half = len(dying_bytes) // 2

        # The first update is let in and stops halfway; the next two must wait.
        dying.send(dying_bytes[:half])
        wait_until(lambda: on_loop(handle, lambda: budget.in_flight) == MODEL_BYTES, 10,
                   "the first update to be let in")
        slow.send(slow_bytes[:half])
        queued.send(queued_bytes)
        wait_until(lambda: on_loop(handle, lambda: budget.queued) == 2, 10,
                   "the other two to queue")
        assert on_loop(handle, lambda: handle.chief.round) == 0

        # The worker being read dies mid-update: its memory goes to the next in line.
        dying.close()
        wait_until(lambda: on_loop(handle, lambda: budget.queued) == 1, 10,
                   "the dead worker's memory to go to the next")
        slow.send(slow_bytes[half:])
        wait_until(lambda: handle.metrics, 30, "the round to close")
        assert budget.peak <= MODEL_BYTES and budget.in_flight == 0 and budget.queued == 0
        assert budget.waited == 2

        # Both waiting updates counted, whole: the sample-weighted mean of the two.
        record = handle.metrics[0]
        assert record["workers"] == 2
        for t, (a, b) in enumerate(zip(slow_arrays, queued_arrays)):
            want = (20 * a.astype(np.float64) + 30 * b) / 50
            np.testing.assert_allclose(handle.chief.global_arrays[t], want, rtol=1e-6,
                                       atol=1e-6)
        for raw in (slow, queued):
            got = raw.answer()
            assert got is not None and got.type == MsgType.GLOBAL
            np.testing.assert_array_equal(got.tensors[0], handle.chief.global_arrays[0])
            raw.close()
    finally:
        handle.stop()


def test_a_budget_smaller_than_one_update_still_lets_each_in() -> None:
    initial = [np.zeros(s, np.float32) for s in SHAPES]
    handle = serve("127.0.0.1:0", workers=2, rounds=1, initial=initial, token=TOKEN,
                   receive_memory=1)
    try:
        raws = [RawClient(handle.address[1]) for _ in range(2)]
        for i, raw in enumerate(raws):
            assert raw.handshake(TOKEN, SPEC, worker_id=f"w{i}").type == MsgType.WELCOME
        for i, raw in enumerate(raws):
            raw.send(update(i + 1)[1])
        wait_until(lambda: handle.metrics, 30, "the round to close")
        assert handle.metrics[0]["workers"] == 2
        assert handle.tcp.budget.peak == MODEL_BYTES
        for raw in raws:
            raw.close()
    finally:
        handle.stop()


def test_waiting_its_turn_is_not_silence() -> None:
    """The worker being read goes silent and is dropped; the one waiting behind it, silent for
    longer than the idle timeout only because the chief is not reading it, is not."""
    initial = [np.zeros(s, np.float32) for s in SHAPES]
    # What drops the stalled upload is the update deadline (3 s here; else the rate floor's
    # 10 s grace): three idle timeouts for the waiting worker to be wrongly taken for dead.
    handle = serve("127.0.0.1:0", workers=2, rounds=1, initial=initial, token=TOKEN,
                   receive_memory=MODEL_BYTES, idle_timeout=1.0, update_deadline=3.0)
    try:
        stalled, waiting = RawClient(handle.address[1]), RawClient(handle.address[1])
        for i, raw in enumerate((stalled, waiting)):
            assert raw.handshake(TOKEN, SPEC, worker_id=f"w{i}").type == MsgType.WELCOME
        stalled_bytes = update(1)[1]
        stalled.send(stalled_bytes[:len(stalled_bytes) // 2])
        wait_until(lambda: on_loop(handle, lambda: handle.tcp.budget.in_flight), 10,
                   "the first update to be let in")
        waiting_arrays, waiting_bytes = update(2)
        waiting.send(waiting_bytes)
        wait_until(lambda: handle.metrics, 30, "the round to close")
        assert handle.metrics[0]["workers"] == 1
        got = waiting.answer()
        while got is not None and got.type != MsgType.GLOBAL:  # pings while it waited
            got = waiting.answer()
        assert got is not None, "the waiting worker was dropped"
        np.testing.assert_allclose(got.tensors[0], waiting_arrays[0], rtol=1e-6)
        stalled.close()
        waiting.close()
    finally:
        handle.stop()
