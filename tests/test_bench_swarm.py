"""The swarm benchmark (bench/swarm.py) in miniature: many protocol-level workers in two
processes against one chief, full rounds, and the chief's figures reported. Shape, not speed."""

from __future__ import annotations

import pytest

from fedberry.bench.swarm import model, raise_nofile, run, source_address


def test_model_and_addresses() -> None:
    arrays = model(10, 3)
    assert [a.size for a in arrays] == [4, 3, 3] and all(a.dtype == "float32" for a in arrays)
    assert source_address(0) == "127.1.0.1" and source_address(250) == "127.1.1.1"
    soft, hard = raise_nofile()
    assert soft == hard


@pytest.mark.heavy
def test_swarm_runs_full_rounds() -> None:
    res = run(workers=24, params=5000, rounds=3, procs=2, tensors=2, timeout_s=120, quiet=True)
    assert res["errors"] == {}
    assert res["joined"] == 24
    assert res["full_rounds"] == res["rounds_closed"] == 3
    assert len(res["round_s"]) == 2 and all(t > 0 for t in res["round_s"])
    assert res["socket_floor_s"] > 0 and res["round_over_floor"] > 0
    # One connection per worker at the chief, and no more: nothing leaks between rounds.
    assert all(res["chief_fds_start"] + 24 <= f <= res["chief_fds_start"] + 24 + 8
               for f in res["chief_fds"])
    assert res["chief_cpu_ms_per_update"] > 0
