"""Secure aggregation's costly steps run off the event loops: a worker's loop and the chief's
keep serving while a mask is being generated, and the step's deadline still holds.

Deterministic, not timed: the mask generation itself is held (a wrapper around the real
``add_masks`` waits on an event) until the test has seen the loop in question carry a real
PING/PONG round trip over the real socket. Were the masking on that loop, the round trip could
not happen until it was released, and the test fails at its bound instead."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography")

import fedberry  # noqa: E402
from fedberry.protocol.messages import Ping  # noqa: E402
from fedberry.secagg import SecAggOptions  # noqa: E402
from fedberry.secagg import client as client_mod  # noqa: E402
from fedberry.secagg import server as server_mod  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import secagg_worker as sw  # noqa: E402

N = 3
BOUND = 15.0  # seconds a held step waits for the test; only a failing run waits this long


class _Held:
    """Wraps ``add_masks``: each call waits until ``release`` (at most BOUND), then masks."""

    def __init__(self, real) -> None:
        self.real = real
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()
        self.threads: list[str] = []

    def __call__(self, target: np.ndarray, seeds) -> None:
        self.threads.append(threading.current_thread().name)
        self.entered.release()
        self.release.wait(BOUND)
        self.real(target, seeds)

    def wait_entered(self, count: int) -> None:
        for _ in range(count):
            assert self.entered.acquire(timeout=30), "no mask was generated"


def _start_workers(url: str) -> tuple[dict[int, fedberry.Worker], list[threading.Thread],
                                       dict[int, list[np.ndarray]], list[BaseException]]:
    workers = {i: fedberry.Worker(chief=url, worker_id=f"w{i}") for i in range(N)}
    out: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            g = workers[i].join(sw.initial())
            out[i] = workers[i].sync([a + d for a, d in zip(g, sw.update_of(i))],
                                     num_samples=sw.samples_of(i))
            workers[i].close()
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(N)]
    for t in threads:
        t.start()
    return workers, threads, out, errors


def _held_round(monkeypatch, module, timeout: float):  # type: ignore[no-untyped-def]
    """A secure round of N workers whose ``module.add_masks`` (the worker's or the chief's) is
    held on an event: the hold, the chief, and ``_start_workers``'s workers, threads, models
    out and errors."""
    held = _Held(module.add_masks)
    monkeypatch.setattr(module, "add_masks", held)
    chief = fedberry.serve("127.0.0.1:0", workers=N, initial=sw.initial(), rounds=1,
                           secure_aggregation=SecAggOptions(timeout=timeout))
    return (held, chief, *_start_workers(chief.url))


def _round_trip(w: fedberry.Worker) -> None:
    """From worker ``w``'s own loop: send a PING and wait until the chief's answer has been
    read (the connection's last_seen moves only when the loop reads bytes). Within BOUND."""
    session = w.session

    async def ping() -> None:
        proto = session._proto
        seen = proto.last_seen
        proto.send(Ping())
        while proto.last_seen == seen:
            await asyncio.sleep(0.005)

    assert w._io is not None
    asyncio.run_coroutine_threadsafe(ping(), w._io.loop).result(BOUND)


def _finish(held: _Held, threads, errors, chief) -> None:
    held.release.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors
    assert chief.wait(30)


def _check_mean(out: dict[int, list[np.ndarray]]) -> None:
    n = {i: sw.samples_of(i) for i in range(N)}
    for t, g in enumerate(sw.initial()):
        mean = g.astype(np.float64) + sum(n[i] * sw.update_of(i)[t] for i in range(N)) / sum(
            n.values())
        assert np.abs(out[0][t] - mean).max() < 1e-5


def test_a_worker_answers_pings_while_its_masks_are_being_generated(monkeypatch) -> None:
    held, chief, workers, threads, out, errors = _held_round(monkeypatch, client_mod, 60.0)
    try:
        held.wait_entered(N)  # every worker is inside its mask generation, held there
        t0 = time.monotonic()
        for w in workers.values():
            _round_trip(w)
        assert time.monotonic() - t0 < BOUND
        assert not held.release.is_set()
        assert all(name.startswith("fb-secagg-") for name in held.threads), held.threads
    finally:
        _finish(held, threads, errors, chief)
    _check_mean(out)  # held, then released: the round's mean is exact all the same


def test_the_chief_answers_pings_while_it_unmasks_the_sum(monkeypatch) -> None:
    held, chief, workers, threads, out, errors = _held_round(monkeypatch, server_mod, 60.0)
    try:
        held.wait_entered(1)  # the chief is regenerating the masks to take out of the sum
        for w in workers.values():
            _round_trip(w)  # every connection is still served meanwhile
        assert not held.release.is_set() and not out
    finally:
        _finish(held, threads, errors, chief)
    _check_mean(out)


def test_an_unmasking_that_outlasts_the_steps_timeout_fails_the_round(monkeypatch) -> None:
    """The step's deadline holds while the masks are regenerated off the chief's thread: the
    round fails with its sentence at the deadline, the model stays, and the outcome that comes
    after is dropped."""
    held, chief, workers, threads, out, errors = _held_round(monkeypatch, server_mod, 3.0)
    try:
        held.wait_entered(1)
        for t in threads:  # the round ends while the masks are still held
            t.join(BOUND)
        assert not held.release.is_set() and len(out) == N, "the deadline did not hold"
    finally:
        _finish(held, threads, errors, chief)
    for w in workers.values():
        assert any("unmasking took longer than the step's timeout" in m
                   for m in w.session.warnings), w.session.warnings
    for a, b in zip(out[0], sw.initial()):
        assert np.array_equal(a, b)
    assert chief.metrics[0]["workers"] == 0
