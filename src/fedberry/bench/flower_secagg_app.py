"""Flower's side of secagg_round_time.py: a Flower App (``ServerApp`` + ``ClientApp``) run by
Flower 1.42's deployment runtime (flower-superlink, flower-supernode, ``flwr run``), in the
Flower Python (flower_python.py). Imported by the SuperLink's ``flwr-serverapp`` and the
SuperNodes' ``flwr-clientapp`` processes, never by fedberry itself.

The round is secagg_round_time's: no training, every client answers ``fit`` with a fixed random
float32 vector of ``params`` values (round_time.model, seeded by the client's partition), the
server averages. ``secure = true`` runs the fit through ``SecAggPlusWorkflow`` (inside
``DefaultWorkflow``) and the clients through ``secaggplus_mod``; ``secure = false`` is
``DefaultWorkflow``'s plain FedAvg. Evaluation is off (``fraction_evaluate=0``).

The server stamps each round when ``FedAvg.aggregate_fit`` returns (with SecAgg+ that is after
the unmask stage: the workflow hands the strategy the unmasked sum) and sends the stamp as one
UDP datagram (JSON) to the driver's ``report-port``, so the driver can read its byte counters
at the round's end; at the end it sends its own peak resident memory (VmHWM).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedberry.bench.round_time import model


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _report(port: int, **event: Any) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(json.dumps(event).encode(), ("127.0.0.1", port))


# -- the server --------------------------------------------------------------------------------
server_app = ServerApp()


@server_app.main()
def server_main(grid: Any, context: Context) -> None:
    port = int(context.run_config["report-port"])
    try:
        _serve(grid, context, port)
    except BaseException as exc:  # the driver waits for our datagrams: tell it, then fail
        _report(port, ev="error", error=f"{type(exc).__name__}: {exc}"[:500])
        raise


def _serve(grid: Any, context: Context, port: int) -> None:
    cfg = context.run_config
    n = int(cfg["clients"])

    class Timed(FedAvg):
        def aggregate_fit(self, server_round: int, *a: Any, **kw: Any) -> Any:
            out = super().aggregate_fit(server_round, *a, **kw)
            _report(port, ev="round", round=server_round, t=time.time(),
                    rss_mb=_peak_rss_mb())
            return out

    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                     min_evaluate_clients=0, min_available_clients=n,
                     initial_parameters=ndarrays_to_parameters(model(int(cfg["params"]))))
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=int(cfg["rounds"])),
                           strategy=strategy)
    if cfg["secure"]:
        fit = SecAggPlusWorkflow(num_shares=int(cfg["num-shares"]),
                                 reconstruction_threshold=int(cfg["threshold"]))
        workflow = DefaultWorkflow(fit_workflow=fit)
    else:
        workflow = DefaultWorkflow()
    workflow(grid, legacy)
    _report(port, ev="done", peak_rss_mb=_peak_rss_mb())


# -- the clients -------------------------------------------------------------------------------
class _Fixed(NumPyClient):
    """Answers every fit with the same vector: what a round costs without the training."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return self.arrays

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        return self.arrays, 1, {}


_cache: dict[tuple[int, int], list[np.ndarray]] = {}


def _client_fn(context: Context) -> Any:
    key = (int(context.run_config["params"]), int(context.node_config["partition-id"]))
    if key not in _cache:  # one vector per client for the whole run, made once
        _cache[key] = model(key[0], key[1] + 1)
    return _Fixed(_cache[key]).to_client()


def _secure_if_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """``secaggplus_mod`` when the run is secure: the same ClientApp serves both runs."""
    if context.run_config["secure"]:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


client_app = ClientApp(client_fn=_client_fn, mods=[_secure_if_asked])
