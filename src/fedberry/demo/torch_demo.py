"""The Fashion-MNIST demo: a torch training worker, the chief's evaluator, and a launcher that
runs a chief and N worker processes on loopback and prints a table as rounds close.

The worker, initial model and evaluator dispatch on ``TrainConfig.framework``: ``keras`` goes to
``keras_demo``, which needs nothing from here (shared pieces are in ``common``).

torch is the optional ``torch`` extra: it and the modules that import it at load (``models``,
``fedberry.torch``) are imported where a torch worker or evaluator starts, so that a Keras
federation on another backend does not need it.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fedberry.data.fashion_mnist import load_fashion_mnist
from fedberry.demo.common import TrainConfig, local_data
from fedberry.demo.keras_demo import initial_arrays, make_keras_evaluator, run_keras_worker
from fedberry.demo.table import TABLE_HEADER, format_row
from fedberry.protocol.auth import TOKEN_ENV, new_token
from fedberry.serve import serve

log = logging.getLogger("fedberry.demo")


def run_torch_worker(chief: Any, index: int, count: int, cfg: TrainConfig,
                     **worker_options: Any) -> dict[str, Any]:
    """Train on partition ``index``/``count`` until the chief says the run is done."""
    import torch  # the torch extra: see the module docstring
    import torch.nn.functional as F

    from fedberry.demo.models import build_model, model_input
    from fedberry.torch import FederatedOptimizer

    torch.set_num_threads(1)  # one thread per worker process: more collapses on shared cores
    log.info("worker %d/%d: loading its part of Fashion-MNIST (%s)", index, count,
             cfg.partition_scheme)
    x_np, y_np = local_data(cfg, index, count)
    x, y = model_input(cfg.model, x_np), torch.from_numpy(y_np)
    model = build_model(cfg.model, seed=cfg.seed)
    sync_every = cfg.sync_every or math.ceil(len(x) / cfg.batch_size)
    log.info("worker %d/%d: %d samples, %s %s, averaging every %d steps; joining %s at the "
             "first", index, count, len(x), "torch", cfg.model, sync_every,
             getattr(chief, "url", chief))
    if not worker_options.get("cert"):  # with one, the id is the certificate's name
        worker_options.setdefault("worker_id", f"worker-{index}of{count}-{os.getpid()}")
    worker_options.setdefault("codec", cfg.codec)
    opt = FederatedOptimizer(torch.optim.SGD(model.parameters(), lr=cfg.lr), model, chief=chief,
                             sync_every=sync_every, num_samples=len(x), **worker_options)
    # Batches come from a generator seeded per worker: the same seed gives the same run.
    rng = np.random.default_rng([cfg.seed, index])
    with opt:
        while not opt.done:
            perm = torch.from_numpy(rng.permutation(len(x)))
            for start in range(0, len(perm), cfg.batch_size):
                b = perm[start:start + cfg.batch_size]
                loss = F.cross_entropy(model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.record_loss(loss.item())
                opt.step()
                if opt.done:
                    break
        return {"steps": opt.steps, "round": opt.worker.round,
                "bytes_sent": opt.worker.bytes_sent, "bytes_received": opt.worker.bytes_received}


def run_worker(chief: Any, index: int, count: int, cfg: TrainConfig,
               **worker_options: Any) -> dict[str, Any]:
    """A demo worker of ``cfg.framework`` (torch or keras); returns what it did."""
    if cfg.framework == "torch":
        return run_torch_worker(chief, index, count, cfg, **worker_options)
    if cfg.framework == "keras":
        return run_keras_worker(chief, index, count, cfg, **worker_options)
    raise ValueError(f"unknown framework {cfg.framework!r}: torch or keras")


def initial_model(model: str, seed: int, framework: str = "torch") -> list[np.ndarray]:
    """The chief's initial model: ``framework``'s layout of ``model`` built from ``seed``."""
    if framework == "keras":  # Keras layout (Dense kernels are (in, out)): a Keras federation
        return initial_arrays(model, seed)
    from fedberry.demo.models import build_model, get_arrays  # the torch extra

    return get_arrays(build_model(model, seed=seed))


def make_evaluator(model_name: str, data_dir: str | None = None,
                   framework: str = "torch") -> Any:
    """``evaluate(arrays) -> {"accuracy", "loss"}`` of a global model on the 10k test set."""
    if framework == "keras":
        return make_keras_evaluator(model_name, data_dir)
    import torch  # the torch extra: see the module docstring

    from fedberry.demo.models import build_model, evaluate, model_input, set_arrays

    torch.set_num_threads(1)
    data = load_fashion_mnist(data_dir)
    x, y = model_input(model_name, data.x_test), torch.from_numpy(data.y_test)
    model = build_model(model_name)

    def evaluate_arrays(arrays: list[np.ndarray]) -> dict[str, float]:
        set_arrays(model, arrays)
        acc, loss = evaluate(model, x, y)
        return {"accuracy": acc, "loss": loss}

    return evaluate_arrays


def run_demo(workers: int = 4, rounds: int = 10, out: str = "runs/demo",
             cfg: TrainConfig | None = None, timeout: float = 1800.0,
             quiet: bool = False, downlink: str = "none",
             secure_aggregation: str | None = None) -> int:
    """Chief in this process, ``workers`` worker processes on loopback. Returns an exit code.
    ``secure_aggregation``: ``--secagg`` text (None: plain rounds)."""
    cfg = cfg or TrainConfig()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    token = new_token()
    say(f"fedberry demo: {workers} workers x {rounds} rounds, {cfg.model} on Fashion-MNIST "
        f"({cfg.partition_scheme}), chief on loopback, metrics in {out_dir / 'metrics.jsonl'}")
    say(f"loading {cfg.framework} and the Fashion-MNIST test set for the chief ...")
    handle = serve("127.0.0.1:0", workers=workers, rounds=rounds,
                   initial=initial_model(cfg.model, cfg.seed, cfg.framework),
                   evaluate=make_evaluator(cfg.model, cfg.data_dir, cfg.framework),
                   out_dir=out_dir,
                   token=token, run_config={"demo": asdict(cfg), "workers": workers},
                   on_round=lambda r: say(format_row(r)), downlink=downlink,
                   secure_aggregation=secure_aggregation)
    env = dict(os.environ, **{TOKEN_ENV: token})
    say(f"starting {workers} worker processes (each loads its data first; their lines go to "
        f"{out_dir}/worker-N.log); the chief says as each joins")
    procs = []
    logs = []
    try:
        for i in range(1, workers + 1):
            log_file = open(out_dir / f"worker-{i}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log_file)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedberry", "worker", "--chief", handle.url,
                 "--partition", f"{i}/{workers}", *cfg.argv()],
                env=env, stdout=log_file, stderr=subprocess.STDOUT))
        say(TABLE_HEADER)
        deadline = time.monotonic() + timeout
        while not handle.wait(0.5):
            dead = [(i + 1, p.returncode) for i, p in enumerate(procs)
                    if p.poll() not in (None, 0)]
            if dead and len(dead) == len(procs):
                say(f"all workers failed (exit codes {dead}); see {out_dir}/worker-*.log")
                return 1
            if time.monotonic() > deadline:
                say(f"timed out after {timeout:.0f} s")
                return 1
        failed = []
        for i, p in enumerate(procs, 1):
            try:
                code = p.wait(max(5.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                code = p.wait()
            if code != 0:
                failed.append(i)
        records = handle.metrics
        if records:
            last = records[-1]
            say(f"done: round {last['round']}, test accuracy {last['test_accuracy']:.4f}, "
                f"{sum(r['bytes_up'] + r['bytes_down'] for r in records) / 2**20:.1f} MiB on "
                f"the wire, {last['wall_s']:.1f} s")
        model_file = handle.server.model_file
        if model_file is not None and model_file.written is not None:
            say(f"model: {model_file.path}")
        if failed:
            say(f"workers {failed} exited with an error; see {out_dir}/worker-N.log")
            return 1
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
        handle.stop()
