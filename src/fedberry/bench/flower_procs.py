"""The ``flower`` mode's processes, run by a Python that has Flower 1.42 (the ``bench-flower``
extra, or the venv of scripts/flower-venv.sh):
``python -m fedberry.bench.flower_procs {flower_server,flower_client} SPEC_JSON``.

They train what the ``fedavg`` mode trains (procs.py: the same model and seed, the same IID
shards, batches, optimizer and local steps per round) through Flower's legacy gRPC path:
``flwr.server.start_server`` with ``FedAvg`` and server-side evaluation (``evaluate_fn``, the
same test set as our chief's evaluator), ``flwr.client.start_client`` with a ``NumPyClient``.
They speak the harness's protocol of procs.py: ``ready``, wait for ``go``, then JSON events, the
server's ``round`` like our chief's, the clients' ``sync`` like our workers'.

A client's report of round r is made when round r+1's instruction arrives, because that is when
round r's global model has been downloaded (our workers report after ``sync`` returns it); the
global model is the one the server evaluated, so worker 1's crc checks the same thing.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

from fedberry.bench.procs import (
    _optim,
    _setup,
    batches,
    crc,
    emit,
    iface_bytes,
    run_role,
    wait_go,
)
from fedberry.demo.torch_demo import initial_model, make_evaluator

LISTEN_TIMEOUT_S = 60.0


def _wait_listening(host: str, port: int, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"Flower's server did not listen on {host}:{port} in {deadline_s:.0f} s")


def run_server(spec: dict[str, Any]) -> None:
    """Flower's server: FedAvg over ``count`` clients, every round's model evaluated on it."""
    import flwr as fl
    import torch

    torch.set_num_threads(1)
    evaluate = make_evaluator(spec["model"], spec.get("data_dir"))
    initial = initial_model(spec["model"], spec["seed"])

    def evaluate_fn(server_round: int, arrays: list[np.ndarray],
                    config: dict[str, Any]) -> tuple[float, dict[str, Any]] | None:
        if server_round == 0:  # the initial model: not a round
            return None
        t = time.monotonic()  # the round's model exists: our chief's round close
        out = evaluate(arrays)
        emit(ev="round", round=server_round, workers=spec["count"], t=t,
             acc=out["accuracy"], loss=out["loss"], up=0, down=0, crc=crc(arrays))
        return float(out["loss"]), {"accuracy": float(out["accuracy"])}

    n = spec["count"]
    strategy = fl.server.strategy.FedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_evaluate_clients=0,
        min_available_clients=n, evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {"server_round": r},
        initial_parameters=fl.common.ndarrays_to_parameters(initial))
    address = f"{spec['host']}:{spec['port']}"

    def announce() -> None:
        # Listening before ``ready``, as our chief is: rounds start when the clients come,
        # after go. start_server must own the main thread (it installs signal handlers).
        _wait_listening(spec["host"], spec["port"], LISTEN_TIMEOUT_S)
        emit(ev="listening", port=spec["port"])
        emit(ev="ready", tx=0, rx=0)
        if sys.stdin.readline().strip() != "go":
            os._exit(0)  # the harness gave up before starting

    threading.Thread(target=announce, daemon=True).start()
    fl.server.start_server(server_address=address, strategy=strategy,
                           config=fl.server.ServerConfig(num_rounds=spec["max_rounds"]))
    emit(ev="done")


def run_client(spec: dict[str, Any]) -> None:
    """One Flower client: the fedavg worker's local training, between Flower's fit calls."""
    import flwr as fl
    import torch.nn.functional as F

    from fedberry.demo.models import get_arrays, set_arrays

    model, x, y = _setup(spec)
    opt = _optim(spec, model.parameters())  # kept across rounds, as FederatedOptimizer does
    iface = spec.get("iface")
    steps = spec["local_epochs"] * math.ceil(len(x) / spec["batch_size"])
    stream = batches(len(x), spec["batch_size"], [spec["seed"], spec["index"]], False)
    report_crc = spec["index"] == 1
    state = {"compute": 0.0, "cpu": 0.0, "seen": 0, "loss": None, "round": 0}

    def report(round_: int, arrays: list[np.ndarray] | None) -> None:
        tx, rx = iface_bytes(iface)
        emit(ev="sync", round=round_, t=time.monotonic(), tx=tx, rx=rx,
             compute=state["compute"], cpu=state["cpu"], samples=state["seen"], sent=0,
             received=0, loss=state["loss"],
             crc=crc(arrays) if arrays is not None and report_crc else None)

    class Client(fl.client.NumPyClient):
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return get_arrays(model)

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            r = int(config["server_round"])
            if r > 1:  # round r-1's global model is here now
                report(r - 1, parameters)
            set_arrays(model, parameters)
            losses = []
            c0, p0 = time.perf_counter(), time.thread_time()
            for _ in range(steps):
                b = next(stream)
                loss = F.cross_entropy(model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
                state["seen"] += len(b)
            state["compute"] += time.perf_counter() - c0
            state["cpu"] += time.thread_time() - p0
            state["loss"] = float(np.mean(losses))
            state["round"] = r
            return get_arrays(model), len(x), {"loss": state["loss"]}

    wait_go(iface)
    fl.client.start_client(server_address=spec["server"], client=Client().to_client(),
                           insecure=True, max_wait_time=60.0)
    # The last round's model is never sent back (Flower's server ends with a reconnect).
    report(state["round"], None)


ROLES = {"flower_server": run_server, "flower_client": run_client}


def main(argv: list[str] | None = None) -> int:
    return run_role(ROLES, "fedberry.bench.flower_procs", argv)


if __name__ == "__main__":
    sys.exit(main())
