"""Flower's side of the round-time table (round_time.py), run by the Flower Python:
``python -m fedberry.bench.flower_round_time {server,client} ...``.

The same round as fedberry's: every client sends its float32 model of round_time.TENSORS
tensors, the server has them all (FedAvg's ``aggregate_fit``), every client has the model back;
nobody computes, nobody evaluates. Flower 1.42's legacy gRPC path (``start_server`` /
``start_client``, no TLS, on loopback). The time is taken at the server between the ends of
consecutive ``aggregate_fit`` calls after the warm-up rounds (round 1 also carries the initial
model down); the server prints it with its peak resident memory (VmHWM).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedberry.bench.round_time import model


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server(port: int, params: int, workers: int, rounds: int, warmup: int) -> None:
    import flwr as fl

    stamps: list[float] = []

    class Timed(fl.server.strategy.FedAvg):
        def aggregate_fit(self, *a: Any, **kw: Any) -> Any:
            out = super().aggregate_fit(*a, **kw)
            stamps.append(time.perf_counter())
            return out

    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=workers,
                     min_evaluate_clients=0, min_available_clients=workers,
                     initial_parameters=fl.common.ndarrays_to_parameters(model(params)))
    fl.server.start_server(server_address=f"127.0.0.1:{port}", strategy=strategy,
                           config=fl.server.ServerConfig(num_rounds=warmup + rounds))
    print(json.dumps({"round_s": (stamps[-1] - stamps[warmup - 1]) / rounds,
                      "peak_rss_mb": peak_rss_mb()}), flush=True)


def client(port: int, params: int, index: int) -> None:
    import flwr as fl

    arrays = model(params, index)

    class Echo(fl.client.NumPyClient):
        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return arrays

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            return parameters, 1, {}  # what came down goes back up, as fedberry's worker does

    fl.client.start_client(server_address=f"127.0.0.1:{port}", client=Echo().to_client(),
                           insecure=True, max_wait_time=60.0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "server" and len(argv) == 6:
        server(*map(int, argv[1:6]))
        return 0
    if argv and argv[0] == "client" and len(argv) == 4:
        client(*map(int, argv[1:4]))
        return 0
    print("usage: python -m fedberry.bench.flower_round_time server PORT PARAMS WORKERS ROUNDS "
          "WARMUP | client PORT PARAMS INDEX", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
