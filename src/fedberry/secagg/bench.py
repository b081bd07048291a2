"""Microbenchmark of one in-memory SecAgg+ round: time, bytes per client, server memory.

    python -m fedberry.secagg.bench                      # 8 and 100 clients, 100k and 1M params
    python -m fedberry.secagg.bench --clients 8 --params 100000 --dropouts 0.25

Clients and server are the real sans-IO objects run one after another in this process, so the
client time is per client (what one worker would spend), the server time is the whole round's,
and no network is involved. Bytes are the messages' payloads (keys, ciphertexts, vectors, ids),
framing excluded. Server memory is what the server's own calls allocate and keep (tracemalloc)
plus the messages it keeps (adverts, share bundles), at its peak.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
import tracemalloc
from collections import defaultdict

import numpy as np

from .client import SecAggClient
from .encoding import FixedPoint
from .messages import RoundConfig
from .prg import add_masks, expand
from .server import SecAggServer


class _ServerMeter:
    """Times the server's calls and tracks the memory they allocate and keep."""

    def __init__(self, trace: bool) -> None:
        self.trace = trace
        self.seconds: dict[str, float] = defaultdict(float)
        self.kept = 0
        self.kept_messages = 0
        self.peak = 0

    def __call__(self, phase: str, fn, *args):
        if not self.trace:
            t0 = time.perf_counter()
            out = fn(*args)
            self.seconds[phase] += time.perf_counter() - t0
            return out
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[phase] += time.perf_counter() - t0
        current, peak = tracemalloc.get_traced_memory()
        self.peak = max(self.peak, self.kept + self.kept_messages + peak - before)
        self.kept += current - before
        return out


def measure_prg(megabytes: int = 64, dtype: type = np.uint16) -> float:
    """Mask expansion speed in GB/s (keystream added into a ``dtype`` vector, uint16 or
    uint32)."""
    item = np.dtype(dtype).itemsize
    target = np.ones(megabytes * (1 << 20) // item, dtype)  # pages touched before timing
    expand(b"s" * 32, 1 << 16, dtype)  # warm up
    t0 = time.perf_counter()
    add_masks(target, [(b"s" * 32, 1)])
    return target.nbytes / (time.perf_counter() - t0) / 1e9


def measure_ciphers(megabytes: int = 32) -> dict[str, float]:
    """Raw keystream speed in GB/s of ChaCha20 (the mask PRG) and, for comparison, AES-256-CTR
    (faster where the CPU has AES instructions; a Raspberry Pi 4 has none)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    chunk = 1 << 18
    zeros, buf = bytes(chunk), bytearray(chunk + 15)  # CTR mode may need a block of slack
    rates = {}
    for name, cipher in (
            ("ChaCha20", Cipher(algorithms.ChaCha20(b"k" * 32, bytes(16)), mode=None)),
            ("AES-256-CTR", Cipher(algorithms.AES(b"k" * 32), modes.CTR(bytes(16))))):
        enc = cipher.encryptor()
        t0 = time.perf_counter()
        for _ in range(megabytes * (1 << 20) // chunk):
            enc.update_into(zeros, buf)
        rates[name] = megabytes * (1 << 20) / (time.perf_counter() - t0) / 1e9
    return rates


def run_round(n: int, length: int, *, neighbors: int | None = None,
              dropout_fraction: float = 0.0, seed: int = 0, trace: bool = False) -> dict:
    """One round; ``ceil(dropout_fraction * n)`` clients drop after sharing keys (the costly
    case: the server rebuilds their keys and regenerates their pairwise masks).

    With ``trace`` the server's memory is measured with tracemalloc, which slows every Python
    allocation (Shamir's big integers most): its times are not reported, so :func:`measure`
    runs the round twice."""
    cfg = RoundConfig(round_number=1, seed=os.urandom(32), clients=tuple(range(1, n + 1)),
                      length=length, neighbors=neighbors)
    fp = FixedPoint(clip=1.0, bits=16, max_workers=256)
    rng = np.random.default_rng(seed)
    encoded = fp.encode(rng.uniform(-1, 1, length))  # every client the same input: cost only
    dropped = set(range(n, n - math.ceil(n * dropout_fraction), -1))
    client_s: dict[str, float] = defaultdict(float)
    sent: dict[str, int] = defaultdict(int)
    received: dict[str, int] = defaultdict(int)

    def timed(phase, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        client_s[phase] += time.perf_counter() - t0
        return out

    if trace:
        tracemalloc.start()
    meter = _ServerMeter(trace)
    server = meter("setup", SecAggServer, cfg)
    clients = {c: timed("advertise", SecAggClient, cfg, c) for c in cfg.clients}
    for c in clients.values():
        advert = timed("advertise", c.advertise)
        sent["advertise"] += advert.payload_bytes
        meter.kept_messages += advert.payload_bytes
        meter("advertise", server.receive_advert, advert)
    adverts = meter("advertise", server.close_adverts)
    for c in clients:
        received["advertise"] += sum(a.payload_bytes for a in adverts[c])
        bundle = timed("share_keys", clients[c].share_keys, adverts[c])
        sent["share_keys"] += bundle.payload_bytes
        meter.kept_messages += bundle.payload_bytes
        meter("share_keys", server.receive_shares, bundle)
    forwarded = meter("share_keys", server.close_shares)
    for c in clients:
        received["share_keys"] += forwarded[c].payload_bytes
        if c in dropped:
            continue
        masked = timed("mask", clients[c].mask, forwarded[c], encoded)
        sent["mask"] += masked.payload_bytes
        meter("mask", server.receive_masked, masked)
        del masked
    request = meter("mask", server.close_masked)
    for c in server.survivors:
        received["mask"] += request.payload_bytes
        reply = timed("unmask", clients[c].unmask, request)
        sent["unmask"] += reply.payload_bytes
        meter("unmask", server.receive_unmask, reply)
    result = meter("unmask", server.finish)
    if trace:
        tracemalloc.stop()
    expected = (encoded.astype(np.uint64) * len(result.survivors) % (1 << 16)).astype(np.uint16)
    if not np.array_equal(result.ring_sum, expected):
        raise AssertionError("the benchmark's round did not return the exact sum")
    active = {"advertise": n, "share_keys": n, "mask": n - len(dropped),
              "unmask": len(result.survivors)}
    return {"clients": n, "params": length, "neighbors": cfg.neighbors,
            "threshold": cfg.threshold, "dropped": len(dropped),
            "client_s": {k: v / active[k] for k, v in client_s.items()},
            "server_s": dict(meter.seconds),
            "sent_per_client": {k: v / active[k] for k, v in sent.items()},
            "received_per_client": {k: v / active[k] for k, v in received.items()},
            "server_peak_bytes": meter.peak, "plain_bytes": length * 4}


def plain_sum_seconds(n: int, length: int) -> float:
    """The same round without secure aggregation: the server adds n float32 updates in place."""
    update = np.random.default_rng(0).standard_normal(length).astype(np.float32)
    total = np.zeros(length, np.float32)
    t0 = time.perf_counter()
    for _ in range(n):
        np.add(total, update, out=total)
    return time.perf_counter() - t0


def measure(n: int, length: int, **kw) -> dict:
    """:func:`run_round` timed untraced, with the server memory of a traced second run."""
    timed = run_round(n, length, **kw)
    timed["server_peak_bytes"] = run_round(n, length, trace=True, **kw)["server_peak_bytes"]
    timed["plain_server_s"] = plain_sum_seconds(n, length)
    return timed


def _row(r: dict) -> str:
    cs, ss, up = r["client_s"], r["server_s"], r["sent_per_client"]
    client_total = sum(cs.values())
    server_total = sum(ss.values())
    return (f"| {r['clients']} | {r['params']:,} | {r['neighbors']} | {r['threshold']} | "
            f"{r['dropped']} | {client_total * 1e3:.0f} (mask {cs['mask'] * 1e3:.0f}) | "
            f"{server_total * 1e3:.0f} (unmask {ss['unmask'] * 1e3:.0f}) | "
            f"{up['advertise']:.0f} / {up['share_keys']:,.0f} / {up['mask']:,.0f} / "
            f"{up['unmask']:,.0f} | {r['server_peak_bytes'] / 2**20:.1f} | "
            f"{r['plain_bytes']:,} / {r['plain_server_s'] * 1e3:.1f} |")


HEADER = ("| clients | params | k | t | dropped | client ms/round (mask) | server ms/round "
          "(unmask) | bytes sent per client: adverts / shares / masked / unmask | server peak "
          "MiB | plain float32: bytes per client / server ms |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> None:
    """Run the grid and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", default="8,100", help="comma-separated client counts")
    p.add_argument("--params", default="100000,1000000", help="comma-separated vector lengths")
    p.add_argument("--dropouts", type=float, default=0.1,
                   help="fraction of clients that drop after sharing keys (default 0.1)")
    p.add_argument("--complete", action="store_true",
                   help="also run the complete graph (Bonawitz et al. 2017) for each size")
    p.add_argument("--prg-megabytes", type=int, default=64,
                   help="keystream made to time the mask expansion (default 64)")
    p.add_argument("--prg-only", action="store_true",
                   help="only the mask-expansion and raw cipher speeds")
    args = p.parse_args(argv)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
          f"{os.cpu_count()} cores (load average {load}), Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    rate = measure_prg(args.prg_megabytes)
    print(f"mask expansion (ChaCha20 keystream added into uint16): {rate:.2f} GB/s")
    rates = measure_ciphers(args.prg_megabytes)
    print("raw keystream: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in rates.items()))
    if args.prg_only:
        return
    print(HEADER)
    for n in (int(x) for x in args.clients.split(",")):
        for m in (int(x) for x in args.params.split(",")):
            for k in ([None, n - 1] if args.complete else [None]):
                if k == n - 1 and RoundConfig(1, bytes(32), tuple(range(1, n + 1)), 1).neighbors \
                        == n - 1:
                    continue  # the default already is the complete graph
                print(_row(measure(n, m, neighbors=k, dropout_fraction=args.dropouts)),
                      flush=True)


if __name__ == "__main__":
    main()
