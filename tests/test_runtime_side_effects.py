"""The chief runtime's side-effect policy, the same under both schedulers: what an evaluation
returns is written as numbers (numpy scalars included), and a metrics line that cannot be written
is logged while the run, its later lines and ``on_round`` go on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedberry.chief.build import OutputOptions, RoundPolicy, build_chief_server
from fedberry.chief.scheduler import BlockingScheduler
from fedberry.protocol.frames import spec_of

INIT = [np.zeros(3, np.float32)]


class _Peer:
    worker_id = "w"

    def __init__(self) -> None:
        self.globals = 0

    def send_global(self, server: Any) -> None:
        self.globals += 1

    def send_error(self, *args: Any) -> None:
        pass

    def request_init(self) -> None:
        pass

    def close(self) -> None:
        pass


def _run(out: Path, evaluate: Any, blocking: bool) -> tuple[list[dict[str, Any]], _Peer]:
    calls: list[dict[str, Any]] = []
    kw: dict[str, Any] = dict(initial=INIT, evaluate=evaluate, on_round=calls.append)
    peer = _Peer()
    if blocking:  # as MPI rank 0 runs it: between collectives
        s = build_chief_server(RoundPolicy(workers=1, rounds=3), OutputOptions(out),
                               scheduler=BlockingScheduler(), **kw)
        s.attach(peer, spec_of(INIT), True)
        for r in range(3):
            s.on_update(peer, r, 1.0, [np.ones(3, np.float32)], {})
            s.scheduler.run_ready()
        s.detach(peer)
        s.shutdown()
        return calls, peer

    async def main() -> None:
        s = build_chief_server(RoundPolicy(workers=1, rounds=3), OutputOptions(out), **kw)
        s.bind_loop()
        s.attach(peer, spec_of(INIT), True)
        for r in range(3):
            s.on_update(peer, r, 1.0, [np.ones(3, np.float32)], {})
            await asyncio.sleep(0.05)
        s.detach(peer)
        await asyncio.wait_for(s.wait_finished(), 30)

    asyncio.run(main())
    return calls, peer


@pytest.mark.parametrize("blocking", [False, True], ids=["asyncio", "blocking"])
def test_numpy_scores_are_written_as_numbers(tmp_path: Path, blocking: bool) -> None:
    calls, peer = _run(tmp_path, lambda a: {"accuracy": np.float32(0.5), "loss": np.float64(2)},
                       blocking)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3] == [r["round"] for r in calls]
    assert all(r["test_accuracy"] == 0.5 and r["test_loss"] == 2.0 for r in lines)
    assert peer.globals == 4  # the model at join, then one per round


@pytest.mark.parametrize("blocking", [False, True], ids=["asyncio", "blocking"])
def test_an_unwritable_line_is_logged_and_the_run_goes_on(
        tmp_path: Path, blocking: bool, caplog: pytest.LogCaptureFixture) -> None:
    calls, peer = _run(tmp_path, lambda a: {"accuracy": object()}, blocking)
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # no half-written line
    assert [r["round"] for r in calls] == [1, 2, 3]  # on_round still sees every round
    assert peer.globals == 4  # the model at join, then one per round
    assert caplog.text.count("cannot write the metrics line") == 3
