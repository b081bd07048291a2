"""What each secure-aggregation step costs the thread that runs it, and the event loop beside it.

    python -m fedberry.bench.secagg_steps                      # 1M and 10M values, k = 8 and 100
    python -m fedberry.bench.secagg_steps --params 1e6 --neighbors 8 --workers 100 --dropouts 1

Worker side: one worker's ``transports.secure_sync.SecureSync`` (what ``TcpSession`` runs for
each of the chief's steps), in a round of k + 1 workers on the complete graph so that it has k
neighbours, fed the real ``begin``/``peers``/``forward``/``unmask`` messages of the other
workers' real clients. The ``forward`` step is the costly one: the change (a float32 model of P
values against its reference), clipped, weighted and encoded in the 32-bit ring, then masked
with its own seed and one ChaCha20 stream per neighbour. It is timed twice: run on an asyncio
loop (as before this change) and handed to a thread with ``asyncio.to_thread`` (as
``TcpSession`` now does), each time with a 1 ms ticker on the loop whose longest gap is the
loop's stall (what a worker's pings wait).

Chief side: ``SecAggServer.finish`` (the unmask: every survivor's self-mask seed and every
dropped worker's mask key rebuilt from Shamir shares, then their masks regenerated and taken
out of the running ring sum) for W workers (k = 2 ceil(log2 W)), of which D dropped after
sharing keys. Only ``finish`` is timed; to set it up quickly the survivors' masking is skipped
(their masked vectors are zeros, so the sum is wrong, which ``finish`` does not look at: its cost
does not depend on the values).

Figures are medians of ``--repeat`` runs, on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from fedberry.protocol.messages import SecAgg
from fedberry.secagg import client as client_mod
from fedberry.secagg import wire
from fedberry.secagg.bench import measure_ciphers, measure_prg
from fedberry.secagg.client import SecAggClient
from fedberry.secagg.messages import MaskedInput, RoundConfig, UnmaskRequest
from fedberry.secagg.options import SecAggOptions
from fedberry.secagg.prg import add_masks
from fedberry.secagg.server import SecAggServer
from fedberry.transports.secure_sync import SecureSync

CLIP = 10.0


def _round(n: int, length: int, neighbors: int | None) -> tuple[RoundConfig, wire.Begin]:
    options = SecAggOptions(neighbors=neighbors, clip=CLIP)
    context = wire.round_context(CLIP, 1.0, options.max_workers, False, 0.0, False)
    cfg = options.round_config(0, tuple(range(1, n + 1)), length, context=context)
    return cfg, wire.Begin(cfg, 1, CLIP, 1.0, options.max_workers)


def _setup_worker(length: int, k: int) -> tuple[SecureSync, SecAgg, SecAgg]:
    """Worker 1 of a k + 1 round, past its ``peers`` step: its ``forward`` and ``unmask``."""
    cfg, begin = _round(k + 1, length, k)
    rng = np.random.default_rng(0)
    reference = [rng.standard_normal(length).astype(np.float32)]
    arrays = [reference[0] + rng.normal(0, 1e-3, length).astype(np.float32)]
    me = SecureSync(0, arrays, reference, 10.0)
    server = SecAggServer(cfg)
    others = {c: SecAggClient(cfg, c) for c in cfg.clients if c != 1}
    server.receive_advert(me.answer(SecAgg(0, begin)).payload)
    for c in others.values():
        server.receive_advert(c.advertise())
    adverts = server.close_adverts()
    server.receive_shares(me.answer(SecAgg(0, adverts[1])).payload)
    for c, cl in others.items():
        server.receive_shares(cl.share_keys(adverts[c]))
    forward = server.close_shares()
    unmask = SecAgg(0, UnmaskRequest(frozenset(cfg.clients), frozenset()))
    return me, SecAgg(0, forward[1]), unmask


async def _stall(work: Callable[[], Any], off_loop: bool) -> tuple[float, float]:
    """(seconds the work took, the longest gap between the loop's 1 ms ticks meanwhile)."""
    gaps = [0.0]
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps[0] = max(gaps[0], now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.01)
    gaps[0] = 0.0
    t0 = time.perf_counter()
    if off_loop:
        await asyncio.to_thread(work)
    else:
        work()
    took = time.perf_counter() - t0
    await asyncio.sleep(0.002)
    stop.set()
    await ticker
    return took, gaps[0]


def worker_mask(length: int, k: int, repeat: int) -> dict[str, float]:
    """Worker-side seconds: the ``peers`` step is in the setup; ``forward`` on and off the
    loop, with the loop's longest stall each way; ``unmask``."""
    out: dict[str, list[float]] = {"on_loop_s": [], "on_loop_stall_s": [], "off_loop_s": [],
                                   "off_loop_stall_s": [], "unmask_s": []}
    for off in (False, True):
        for _ in range(repeat):
            me, forward, unmask = _setup_worker(length, k)
            took, stall = asyncio.run(_stall(functools.partial(me.answer, forward), off))
            key = "off_loop" if off else "on_loop"
            out[f"{key}_s"].append(took)
            out[f"{key}_stall_s"].append(stall)
            t0 = time.perf_counter()
            me.answer(unmask)
            out["unmask_s"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def chief_unmask(workers: int, length: int, dropouts: int, repeat: int) -> dict[str, Any]:
    """Chief-side seconds of ``SecAggServer.finish``, D of W workers dropped after sharing:
    its secrets (``unmasking``, on the chief's thread) and its masks (``Unmasking.run``, on
    the runtime's work thread), the loop's longest stall with the masks on that thread."""
    out: dict[str, list[float]] = {"secrets_s": [], "masks_s": [], "stall_s": []}
    masks = 0
    for _ in range(repeat):
        cfg, _ = _round(workers, length, None)
        server = SecAggServer(cfg)
        clients = {c: SecAggClient(cfg, c) for c in cfg.clients}
        for c in clients.values():
            server.receive_advert(c.advertise())
        adverts = server.close_adverts()
        for c, cl in clients.items():
            server.receive_shares(cl.share_keys(adverts[c]))
        forwarded = server.close_shares()
        dropped = set(cfg.clients[-dropouts:]) if dropouts else set()
        zeros = np.zeros(length, cfg.dtype)
        real_add = client_mod.add_masks
        client_mod.add_masks = lambda target, seeds: None  # setup only: see the docstring
        try:
            for c, cl in clients.items():
                if c not in dropped:
                    server.receive_masked(MaskedInput(c, cl.mask(forwarded[c], zeros).vector))
        finally:
            client_mod.add_masks = real_add
        request = server.close_masked()
        for c in server.survivors:
            server.receive_unmask(clients[c].unmask(request))
        t0 = time.perf_counter()
        unmasking = server.unmasking()
        out["secrets_s"].append(time.perf_counter() - t0)
        masks = len(unmasking.masks)
        took, stall = asyncio.run(_stall(unmasking.run, True))
        out["masks_s"].append(took)
        out["stall_s"].append(stall)
    return {**{k: statistics.median(v) for k, v in out.items()}, "masks": masks,
            "neighbors": cfg.neighbors, "threshold": cfg.threshold}


def memory_add_rate(megabytes: int = 64) -> float:
    """GB/s of numpy's in-place uint32 add over a vector of ``megabytes`` (target bytes per
    second, as ``measure_prg`` counts): the memory-speed yardstick for the mask expansion."""
    a = np.ones(megabytes * (1 << 20) // 4, np.uint32)
    b = np.ones_like(a)
    np.add(a, b, out=a)  # pages touched before timing
    t0 = time.perf_counter()
    np.add(a, b, out=a)
    return a.nbytes / (time.perf_counter() - t0) / 1e9


def stream_rate(streams: int, length: int = 1 << 20) -> float:
    """GB/s of keystream that ``add_masks`` adds into a ``length`` uint32 vector from
    ``streams`` seeds at once (a worker's mask step), the chunk of the target staying in
    cache while every stream is added to it."""
    target = np.zeros(length, np.uint32)
    seeds = [(bytes([i % 256, i // 256]) * 16, 1) for i in range(streams)]
    add_masks(target, seeds[:1])
    t0 = time.perf_counter()
    add_masks(target, seeds)
    return streams * target.nbytes / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> None:
    """Print the mask speed, then the worker's and the chief's tables (markdown)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", default="1e6,1e7", help="comma-separated model sizes")
    p.add_argument("--neighbors", default="8,100", help="comma-separated worker neighbour counts")
    p.add_argument("--workers", default="100", help="comma-separated chief-side worker counts")
    p.add_argument("--dropouts", default="1,10", help="comma-separated chief-side dropouts")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    sizes = [int(float(x)) for x in args.params.split(",")]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} cores (load average {load}), Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    for bits, dtype in ((32, np.uint32), (16, np.uint16)):
        print(f"mask expansion (ChaCha20 keystream added into uint{bits}): "
              f"{measure_prg(64, dtype):.2f} GB/s")
    print(f"mask expansion, 9 and 101 streams into one 4 MB uint32 vector: "
          f"{stream_rate(9):.2f} and {stream_rate(101):.2f} GB/s of keystream")
    rates = measure_ciphers()
    print("raw keystream: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in rates.items()))
    print(f"memory yardstick: numpy in-place uint32 add over 64 MB: {memory_add_rate():.2f} "
          "GB/s")
    print(f"\nworker: one 32-bit secure step (median of {args.repeat})\n")
    print("| params | neighbours | forward (encode + mask) s | loop stall on the loop s | "
          "forward in a thread s | loop stall, thread s | unmask s |\n"
          "|---|---|---|---|---|---|---|")
    for m in sizes:
        for k in (int(x) for x in args.neighbors.split(",")):
            r = worker_mask(m, k, args.repeat)
            print(f"| {m:,} | {k} | {r['on_loop_s']:.3f} | {r['on_loop_stall_s']:.3f} | "
                  f"{r['off_loop_s']:.3f} | {r['off_loop_stall_s']:.4f} | {r['unmask_s']:.4f} |",
                  flush=True)
    print("\nchief: SecAggServer.finish = unmasking() + run(), 32-bit ring "
          f"(median of {args.repeat})\n")
    print("| workers | k | t | params | dropped | masks regenerated | secrets s (loop) | "
          "masks s (work thread) | loop stall s |\n|---|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.workers.split(",")):
        for m in sizes:
            for d in (int(x) for x in args.dropouts.split(",")):
                r = chief_unmask(n, m, d, args.repeat)
                print(f"| {n} | {r['neighbors']} | {r['threshold']} | {m:,} | {d} | "
                      f"{r['masks']} | {r['secrets_s']:.3f} | {r['masks_s']:.3f} | "
                      f"{r['stall_s']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
