"""The benchmark's processes: ``python -m fedberry.bench.procs ROLE SPEC_JSON``.

Roles: ``chief`` (our chief, for dsgd and fedavg), ``fed`` (a worker of dsgd or fedavg), ``ddp``
(one rank of torch.distributed), ``single``. Each loads its data, builds its model, prints
``{"ev": "ready"}`` and waits for ``go`` on stdin, so that imports and data loading (seconds, with
seven processes on two cores) are not part of anybody's training time. Then it prints one JSON
object per line as it goes; logs go to stderr. Timestamps are ``time.monotonic()``, which is
one clock for every process on the machine, namespaces or not.

Each role imports the torch it uses (the optional ``torch`` extra; ``ddp`` alone needs
``torch.distributed``) and the fedberry modules that import torch at load (``demo.models``,
``integrations.torch``) inside its function; the rest is imported here.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fedberry.bench.config import OptimConfig
from fedberry.bench.shaper import SharedLink
from fedberry.data.fashion_mnist import load_fashion_mnist
from fedberry.data.partition import partition
from fedberry.demo.torch_demo import initial_model, make_evaluator
from fedberry.serve import serve
from fedberry.transports.tcp import ListenOptions
from fedberry.worker import Worker


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def wait_go(iface: str | None = None) -> None:
    tx, rx = iface_bytes(iface)  # the baseline: counters run on across the benchmark's modes
    emit(ev="ready", tx=tx, rx=rx)
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)  # the harness gave up before starting


def iface_bytes(iface: str | None) -> tuple[int, int]:
    """(tx, rx) bytes of this namespace's interface, headers included; (0, 0) on loopback.

    ``ip netns exec`` remounts /sys for the namespace, so this is the worker's own eth0."""
    if not iface:
        return 0, 0
    base = Path("/sys/class/net") / iface / "statistics"
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def crc(arrays: list[np.ndarray]) -> int:
    c = 0
    for a in arrays:
        c = zlib.crc32(np.ascontiguousarray(a).view(np.uint8), c)
    return c


def batches(n: int, batch: int, seed: list[int], drop_last: bool) -> Iterator[np.ndarray]:
    """Index batches over ``n`` samples, reshuffled every epoch, forever. dsgd and ddp use the
    same stream per worker (drop_last: every worker contributes equally to every step)."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        stop = n - n % batch if drop_last and n >= batch else n
        for s in range(0, stop, batch):
            yield perm[s:s + batch]


def _setup(spec: dict[str, Any], shard: bool = True) -> tuple[Any, Any, Any]:
    import torch

    from fedberry.demo.models import build_model, model_input

    torch.set_num_threads(1)  # one thread per process: more collapses on shared cores
    data = load_fashion_mnist(spec.get("data_dir"))
    x, y = data.x_train, data.y_train
    if shard:
        idx = partition(y, spec["count"], "iid", seed=spec["seed"])[spec["index"] - 1]
        x, y = x[idx], y[idx]
    model = build_model(spec["model"], seed=spec["seed"])
    return model, model_input(spec["model"], x), torch.from_numpy(np.ascontiguousarray(y))


def _optim(spec: dict[str, Any], params: Any) -> Any:
    return OptimConfig(**spec["optim"]).build(params)


# ============================================================================================
def run_chief(spec: dict[str, Any]) -> None:
    """Our chief with the test-set evaluator. dsgd: the workers send gradients, so the "global
    model" is the mean gradient; the evaluator applies it to a shadow model with the workers'
    optimizer, which keeps it bit-identical to every worker's (the crc in each round says so)."""
    import torch

    from fedberry.demo.models import build_model, get_arrays, set_arrays

    torch.set_num_threads(1)
    base = make_evaluator(spec["model"], spec.get("data_dir"))
    initial = initial_model(spec["model"], spec["seed"])
    evaluate = base
    if spec["mode"] == "dsgd":
        shadow = build_model(spec["model"], seed=spec["seed"])
        set_arrays(shadow, initial)
        params = list(shadow.parameters())
        opt = _optim(spec, params)

        def evaluate(grads: list[np.ndarray]) -> dict[str, float]:
            for p, g in zip(params, grads, strict=True):
                p.grad = torch.tensor(g)
            opt.step()
            arrays = get_arrays(shadow)
            return {**base(arrays), "crc": crc(arrays)}
    else:
        def evaluate(arrays: list[np.ndarray]) -> dict[str, float]:
            return {**base(arrays), "crc": crc(arrays)}

    # The server keeps only accuracy and loss from the evaluator's dict, so the crc goes aside.
    # Evaluations run one at a time in round order and on_round follows that order: a FIFO.
    crcs: collections.deque[int | None] = collections.deque()

    def eval_keep_crc(arrays: list[np.ndarray]) -> dict[str, float]:
        try:
            out = evaluate(arrays)
        except BaseException:
            crcs.append(None)
            raise
        crcs.append(int(out.pop("crc")))
        return out

    handle: Any = None

    def on_round(rec: dict[str, Any]) -> None:
        t0 = handle.server.started_at  # when the first worker arrived
        emit(ev="round", round=rec["round"], workers=rec["workers"],
             acc=rec.get("test_accuracy"), loss=rec.get("test_loss"),
             t=(t0 + rec["wall_s"]) if t0 is not None else time.monotonic(),
             up=rec["bytes_up"], down=rec["bytes_down"], train_loss=rec.get("train_loss"),
             crc=crcs.popleft() if crcs else None)

    loopback = spec["host"] == "127.0.0.1"
    handle = serve(f"{spec['host']}:{spec['port']}", workers=spec["count"],
                   rounds=spec["max_rounds"], initial=initial, evaluate=eval_keep_crc,
                   insecure=not loopback, idle_timeout=120.0, finish_grace=5.0,
                   on_round=on_round, downlink=spec.get("downlink", "none"),
                   listen_options=ListenOptions(pacing=SharedLink.from_mbit(
                       spec["shaper_mbit"]).pacing()) if spec.get("shaper_mbit") else None)
    emit(ev="listening", port=handle.address[1])
    wait_go()
    try:
        while not handle.wait(1.0):
            pass
    finally:
        emit(ev="done", up=handle.server.bytes_up, down=handle.server.bytes_down)
        handle.stop()


# ============================================================================================
def run_fed(spec: dict[str, Any]) -> None:
    """A dsgd or fedavg worker of our chief."""
    import torch
    import torch.nn.functional as F

    from fedberry.demo.models import get_arrays, set_arrays
    from fedberry.integrations.torch import FederatedOptimizer

    model, x, y = _setup(spec)
    opt = _optim(spec, model.parameters())
    iface = spec.get("iface")
    report_crc = spec["index"] == 1
    wait_go(iface)
    worker = Worker(spec["chief"], worker_id=f"bench-{spec['mode']}-{spec['index']}",
                    idle_timeout=120.0, codec=spec.get("codec", "none"))
    compute = cpu = 0.0  # seconds spent training, wall and this thread's CPU
    seen = 0  # samples trained on: with ``compute``, the device's training speed

    def report(round_: int, loss: float | None, arrays: list[np.ndarray] | None = None) -> None:
        tx, rx = iface_bytes(iface)
        emit(ev="sync", round=round_, t=time.monotonic(), tx=tx, rx=rx, compute=compute,
             cpu=cpu, samples=seen, sent=worker.bytes_sent, received=worker.bytes_received,
             loss=loss,             crc=crc(arrays) if arrays is not None and report_crc else None)

    if spec["mode"] == "dsgd":
        set_arrays(model, worker.join(get_arrays(model)))
        params = list(model.parameters())
        if len(params) != len(model.state_dict()):
            raise SystemExit("dsgd sends gradients: the model must have no buffers")
        for b in batches(len(x), spec["batch_size"], [spec["seed"], spec["index"]], True):
            c0, p0 = time.perf_counter(), time.thread_time()
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            grads = [p.grad.numpy() for p in params]
            seen += len(b)
            compute += time.perf_counter() - c0
            cpu += time.thread_time() - p0
            mean = worker.sync(grads, float(len(b)), {"loss": loss.item()})
            c0, p0 = time.perf_counter(), time.thread_time()
            for p, g in zip(params, mean, strict=True):
                p.grad.copy_(torch.tensor(g))
            opt.step()
            compute += time.perf_counter() - c0
            cpu += time.thread_time() - p0
            report(worker.round, loss.item(), get_arrays(model) if report_crc else None)
            if worker.done:
                break
    else:
        steps = spec["local_epochs"] * math.ceil(len(x) / spec["batch_size"])
        fopt = FederatedOptimizer(opt, model, worker=worker, sync_every=steps,
                                  num_samples=len(x))
        losses: list[float] = []
        # A round's local training is timed as one span, from its first batch to its last
        # step, so that a CPU quota's pauses count wherever they fall (timing each batch
        # alone missed those between batches: a quarter-core device measured 0.44 of a core).
        c0, p0 = time.perf_counter(), time.thread_time()
        for b in batches(len(x), spec["batch_size"], [spec["seed"], spec["index"]], False):
            loss = F.cross_entropy(model(x[b]), y[b])
            fopt.zero_grad()
            loss.backward()
            fopt.record_loss(loss.item())
            losses.append(loss.item())
            seen += len(b)
            syncing = (fopt.steps + 1) % steps == 0
            if syncing:  # the optimizer step is compute, the averaging that follows is not
                compute += time.perf_counter() - c0
                cpu += time.thread_time() - p0
                fopt.step()
                report(worker.round, float(np.mean(losses)),
                       get_arrays(model) if report_crc else None)
                losses = []
                c0, p0 = time.perf_counter(), time.thread_time()
            else:
                fopt.step()
            if fopt.done:
                break
    worker.close()


# ============================================================================================
def run_ddp(spec: dict[str, Any]) -> None:
    """One rank of PyTorch DistributedDataParallel (gloo), the same steps as dsgd."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    model, x, y = _setup(spec)
    rank, world = spec["index"] - 1, spec["count"]
    os.environ["GLOO_SOCKET_IFNAME"] = spec.get("iface") or "lo"
    iface = spec.get("iface")
    snap = Path(spec["snapshots"]) if rank == 0 else None
    wait_go(iface)
    dist.init_process_group("gloo", init_method=f"tcp://{spec['master']}:{spec['port']}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=300))
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's weights: the same start as ours
    opt = _optim(spec, ddp.parameters())
    params = list(model.parameters())
    cpu = 0.0
    step = 0
    for b in batches(len(x), spec["batch_size"], [spec["seed"], spec["index"]], True):
        p0 = time.thread_time()  # gloo works on its own threads: this is the compute
        loss = F.cross_entropy(ddp(x[b]), y[b])
        opt.zero_grad()
        loss.backward()  # the gradient allreduce runs here, overlapped with backward
        opt.step()
        cpu += time.thread_time() - p0
        step += 1
        t = time.monotonic()
        tx, rx = iface_bytes(iface)
        if snap is not None:
            # The harness evaluates these while training goes on; rank 0 only writes them.
            flat = np.concatenate([p.detach().numpy().ravel() for p in params])
            tmp = snap / f".step-{step:06d}.npy"
            np.save(tmp, flat)
            os.replace(tmp, snap / f"step-{step:06d}.npy")
        emit(ev="step", step=step, t=t, tx=tx, rx=rx, cpu=cpu, loss=loss.item())
        if step >= spec["max_steps"]:
            break
    dist.destroy_process_group()


# ============================================================================================
def run_single(spec: dict[str, Any]) -> None:
    """All the data in one process. Evaluation pauses the clock: in the other modes it runs
    beside training (on the chief or in the harness), not in its way."""
    import torch.nn.functional as F

    from fedberry.demo.models import evaluate, model_input

    model, x, y = _setup(spec, shard=False)
    test = load_fashion_mnist(spec.get("data_dir"))
    xt, yt = model_input(spec["model"], test.x_test), test.y_test
    opt = _optim(spec, model.parameters())
    wait_go()
    elapsed = cpu = 0.0
    seen = steps = 0
    next_eval = spec["eval_every"]
    for b in batches(len(x), spec["batch_size"], [spec["seed"], 0], False):
        c0, p0 = time.perf_counter(), time.thread_time()
        loss = F.cross_entropy(model(x[b]), y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        elapsed += time.perf_counter() - c0
        cpu += time.thread_time() - p0
        seen += len(b)
        steps += 1
        if seen >= next_eval:
            next_eval += spec["eval_every"]
            acc, tloss = evaluate(model, xt, yt)
            emit(ev="eval", elapsed=elapsed, cpu=cpu, samples=seen, steps=steps, acc=acc,
                 loss=tloss)
            if (acc >= spec["target"] and spec["stop_at_target"]) \
                    or elapsed >= spec["time_cap_s"]:
                break


# ============================================================================================
def run_relay(spec: dict[str, Any]) -> None:
    """The latency link between the workers and the chief (relay.py)."""
    from fedberry.bench import relay

    argv = ["--listen", f"{spec['host']}:{spec['port']}", "--upstream", spec["upstream"],
            "--delay-ms", str(spec["delay_ms"]), "--jitter-ms", str(spec["jitter_ms"]),
            "--reset-per-s", str(spec["reset_per_s"])]
    if spec.get("rate_mbit"):  # the flower mode off the namespaces: the relay is its shaper
        argv += ["--rate-mbit", str(spec["rate_mbit"]), "--payload-rate"]
    sys.exit(relay.main(argv))


ROLES = {"relay": run_relay, "chief": run_chief, "fed": run_fed, "ddp": run_ddp,
         "single": run_single}


def run_role(roles: dict[str, Callable[[dict[str, Any]], None]], module: str,
             argv: list[str] | None = None) -> int:
    """``python -m MODULE ROLE SPEC_JSON``: run ``roles[ROLE]`` with the spec, logging to
    stderr. The entry point of this module's processes and of flower_procs.py's."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in roles:
        print(f"usage: python -m {module} {{{','.join(roles)}}} SPEC_JSON", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    roles[argv[0]](json.loads(argv[1]))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_role(ROLES, "fedberry.bench.procs", argv)


if __name__ == "__main__":
    sys.exit(main())
