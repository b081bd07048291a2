"""Per-round configuration: a schedule set on the chief reaches every worker with the round's
model (real loopback TCP and an in-process worker), the torch drop-in applies its ``lr`` to the
optimizer, and the protocol refuses a config that is no small dict of scalars."""

import threading

import numpy as np
import pytest

from fedberry import Worker, serve
from fedberry.chief.round_config import Schedule, parse_schedule
from fedberry.protocol.frames import FrameDecoder, ProtocolError
from fedberry.protocol.limits import MAX_CONFIG_KEYS
from fedberry.protocol.messages import Global, from_frame, to_frame


def test_schedule_holds_each_value_from_its_round_on():
    s = parse_schedule(["lr=0.1@0,0.05@10", "epochs=2", "warm=true@3", "opt=sgd"])
    assert s(0) == {"lr": 0.1, "epochs": 2, "opt": "sgd"}
    assert s(3) == {"lr": 0.1, "epochs": 2, "warm": True, "opt": "sgd"}
    assert s(10)["lr"] == 0.05 and s(99)["lr"] == 0.05
    # The plain Python form (what a config file's table maps onto) is the same schedule.
    assert Schedule(s.to_dict())(12) == s(12)
    with pytest.raises(ValueError, match="not a round number"):
        parse_schedule(["lr=0.1@x"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_schedule(["lr"])
    with pytest.raises(ValueError, match="a value must be"):
        Schedule({"lr": {0: [0.1]}})


def test_a_global_carries_its_config_and_refuses_what_is_no_scalar():
    g = Global(3, (np.zeros(2, np.float32),), config={"lr": 0.05, "epochs": 2, "tag": "a"})
    frame = to_frame(g)
    (decoded,) = FrameDecoder().receive_data(b"".join(bytes(p) for p in frame.parts))
    back = from_frame(decoded)
    assert back.config == {"lr": 0.05, "epochs": 2, "tag": "a"} and back.evaluate is False
    for bad, why in [({"lr": [1]}, "must be a string"), ({"lr": float("nan")}, "finite"),
                     ({"": 1}, "key must be"), ({"s": "x" * 300}, "at most"),
                     ({f"k{i}": i for i in range(MAX_CONFIG_KEYS + 1)}, "more than"),
                     ("lr=1", "object of scalars")]:
        with pytest.raises(ProtocolError, match=why):
            Global(0, config=bad)


def test_plain_workers_get_the_rounds_config_over_tcp_and_in_process():
    rounds = 3
    handle = serve("127.0.0.1:0", workers=2, rounds=rounds, token="t",
                   round_config=lambda r: {"lr": 1.0 / (r + 1), "round_seen": r})
    seen: dict[str, list] = {"tcp": [], "local": []}
    errors = []

    def run(name, chief):
        try:
            w = Worker(chief, token="t", worker_id=name)
            arrays = w.join([np.zeros(3, np.float32)])
            seen[name].append((w.round, dict(w.round_config)))
            while not w.done:
                arrays = w.sync([a + 1 for a in arrays], 1.0)
                seen[name].append((w.round, dict(w.round_config)))
            w.close()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("tcp", handle.url)),
               threading.Thread(target=run, args=("local", handle))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert handle.wait(10)
    finally:
        handle.stop()
    for name in seen:
        assert [r for r, _ in seen[name]] == list(range(rounds + 1))
        for r, cfg in seen[name]:
            assert cfg == {"lr": 1.0 / (r + 1), "round_seen": r}, (name, r, cfg)


def test_a_failing_config_callable_costs_the_config_not_the_round(caplog):
    def config(r):
        if r == 1:
            return {"lr": object()}  # not a scalar: refused by the protocol's check
        return {"lr": 0.5}

    handle = serve("127.0.0.1:0", workers=1, rounds=2, token="t", round_config=config)
    try:
        w = Worker(handle.url, token="t", worker_id="w")
        arrays = w.join([np.zeros(2, np.float32)])
        assert w.round_config == {"lr": 0.5}
        arrays = w.sync(arrays, 1.0)
        assert w.round == 1 and w.round_config == {}
        w.sync(arrays, 1.0)
        assert w.done and w.round_config == {"lr": 0.5}
        w.close()
        assert handle.wait(10)
    finally:
        handle.stop()
    assert any("round config failed" in r.getMessage() for r in caplog.records)


def test_an_lr_schedule_reaches_the_torch_workers_optimizers():
    torch = pytest.importorskip("torch", reason="the torch extra")
    from fedberry.torch import FederatedOptimizer

    rounds = 4
    schedule = Schedule({"lr": {0: 0.1, 2: 0.05, 3: 0.01}})
    handle = serve("127.0.0.1:0", workers=2, rounds=rounds, token="t", round_config=schedule)
    lrs: dict[int, list] = {0: [], 1: []}
    errors = []

    def run(i):
        try:
            torch.manual_seed(0)
            model = torch.nn.Linear(3, 1)
            base = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
            base.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 7.0})
            with FederatedOptimizer(base, model, chief=handle.url, sync_every=1, token="t",
                                    worker_id=f"torch-{i}") as opt:
                opt.join()
                lrs[i].append((opt.worker.round, [g["lr"] for g in opt.param_groups]))
                x = torch.randn(4, 3)
                while not opt.done:
                    opt.zero_grad()
                    model(x).pow(2).mean().backward()
                    opt.step()  # every step averages, and the next round's lr comes in
                    lrs[i].append((opt.worker.round, [g["lr"] for g in opt.param_groups]))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert handle.wait(10)
    finally:
        handle.stop()
    for i in lrs:
        assert [r for r, _ in lrs[i]] == list(range(rounds + 1))
        for r, groups in lrs[i]:
            assert groups == [schedule(r)["lr"]] * 2, (i, r, groups)


def test_the_chief_command_line_maps_onto_serve_keywords():
    from fedberry.cli import _fleet_options, build_parser

    args = build_parser().parse_args(
        ["chief", "--workers", "10", "--seed", "4", "--round-config", "lr=0.1@0,0.05@10",
         "--sample", "3", "--evaluate-every", "2"])
    got = _fleet_options(args)
    assert got["round_config"](10) == {"lr": 0.05}
    assert (got["sample"], got["fraction"], got["poisson"], got["sample_seed"]) == (3, None,
                                                                                  False, 4)
    assert got["evaluate_every"] == 2 and got["evaluate_timeout"] == 30.0
    assert _fleet_options(build_parser().parse_args(["chief", "--workers", "2"])) == {}


def test_fleet_options_under_mpi_are_refused_with_a_sentence(tmp_path, capsys):
    from fedberry.cli import main

    code = main(["chief", "--listen", "mpi://", "--workers", "2", "--model", "none",
                 "--sample", "1", "--out", str(tmp_path)])
    assert code == 2
    assert "not under MPI" in capsys.readouterr().err
