"""``serve()``'s option objects, its keyword shortcuts, ``ChiefHandle.wait`` and the runtime's
side-effect policy over TCP (tests/test_mpi.py checks the same policy under MPI)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedberry import Worker
from fedberry.chief import checkpoint as ckpt_io
from fedberry.chief.build import OutputOptions, RoundPolicy
from fedberry.chief.metrics import read
from fedberry.serve import Listening, serve

MODEL = [np.zeros(3, np.float32)]


def _train(url_or_handle, rounds: int) -> None:  # type: ignore[no-untyped-def]
    with Worker(url_or_handle, worker_id="w") as w:
        model = w.join(MODEL)
        for _ in range(rounds):
            model = w.sync([model[0] + 1], 2, {"loss": 0.5})


def test_option_objects_and_keyword_shortcuts_make_the_same_chief(tmp_path: Path) -> None:
    h = serve(None, policy=RoundPolicy(workers=1, rounds=2),
              output=OutputOptions(out_dir=tmp_path / "a", checkpoint=tmp_path / "a.npz"),
              initial=MODEL)
    try:
        _train(h, 2)
        assert h.wait(10)
    finally:
        h.stop()
    assert [r["round"] for r in read(tmp_path / "a" / "metrics.jsonl")] == [1, 2]
    assert ckpt_io.load(tmp_path / "a.npz").round == 2
    # A keyword replaces that field of the object given.
    h = serve(None, rounds=1, policy=RoundPolicy(rounds=5, min_workers=1),
              out_dir=tmp_path / "b", initial=MODEL)
    try:
        assert h.chief.config.rounds == 1
        _train(h, 1)
        assert h.wait(10)
    finally:
        h.stop()
    assert len(read(tmp_path / "b" / "metrics.jsonl")) == 1


def test_an_unknown_option_is_refused_with_the_list() -> None:
    with pytest.raises(TypeError, match="unknown option 'round_time'; the options are .*"
                                        "round_timeout"):
        serve(None, round_time=3)


def test_listening_options_reach_the_transport() -> None:
    with pytest.raises(ValueError, match="--client-ca needs TLS"):
        serve("127.0.0.1:0", listening=Listening(client_ca="ca.pem"))
    h = serve("127.0.0.1:0", listening=Listening(max_connections=7, idle_timeout=9.0))
    try:
        assert h.tcp.options.max_connections == 7 and h.tcp.options.idle_timeout == 9.0
    finally:
        h.stop()


def test_wait_returns_false_on_timeout() -> None:
    """Before Python 3.11 the builtin TimeoutError is not what concurrent.futures raises: wait()
    caught the wrong one and `fedberry chief` crashed after one second."""
    h = serve(None, workers=1, rounds=1, initial=MODEL)
    try:
        assert h.wait(0.05) is False
        _train(h, 1)
        assert h.wait(10) is True
    finally:
        h.stop()


def test_a_raising_on_round_is_logged_and_every_round_still_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[int] = []

    def on_round(record: dict) -> None:
        seen.append(record["round"])
        raise RuntimeError(f"display broke at round {record['round']}")

    h = serve("127.0.0.1:0", workers=1, rounds=3, initial=MODEL, out_dir=tmp_path,
              on_round=on_round)
    try:
        with caplog.at_level(logging.ERROR, logger="fedberry.chief"):
            _train(h.url, 3)
            assert h.wait(20)
    finally:
        h.stop()
    assert seen == [1, 2, 3]
    assert [r["round"] for r in read(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert "round 1: the on_round callback failed; the run goes on" in caplog.text


def test_a_failing_evaluation_is_logged_and_the_run_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    def evaluate(arrays: list) -> dict:
        raise ValueError("no test set")

    h = serve(None, workers=1, rounds=2, initial=MODEL, evaluate=evaluate)
    try:
        with caplog.at_level(logging.ERROR, logger="fedberry.chief"):
            _train(h, 2)
            assert h.wait(10)
    finally:
        h.stop()
    assert [r["test_accuracy"] for r in h.metrics] == [None, None]
    assert "evaluation failed: no test set" in caplog.text
