"""A userspace TCP link between the workers and the chief: latency, jitter, bandwidth, resets.

In the manner of Shopify's toxiproxy: the workers dial the relay, the relay dials the chief, and
every byte in each direction goes through a queue that holds it for the one-way delay (plus a
jitter, never reordering), then through a token bucket (the bandwidth), then out. Optionally a
connection is reset now and then (an exponential clock per connection, both ends aborted with
an RST), as a flaky access point does.

Why: this kernel has no ``netem``, so the namespaces' htb link (netns.py) has bandwidth but no
latency, and per-step protocols are flattered by microsecond round trips. The default one-way
delay of the bench, 12.5 ms (25 ms round trip), is Wi-Fi class: in a two-month study of 47
campus access points more than half of the TCP packets spent over 20 ms on the Wi-Fi hop alone
(Sui et al., "WiFi can be the weakest link of round trip network latency in the wild",
INFOCOM 2016).

What it is not: the relay's own sockets acknowledge at once, so the sender's TCP sees a short
round trip and grows its window freely; the delay is on the *data*, which is what a
request/response protocol (a sync, a gradient exchange) pays. Buffers are bounded
(``buffer_bytes`` per direction per connection): when a queue is full the relay stops reading,
and TCP's flow control pushes back on the sender.

Run it as a process: ``python -m fedberry.bench.relay --listen 127.0.0.1:0 --upstream
127.0.0.1:7777 --delay-ms 12.5 --rate-mbit 20``; it prints ``{"ev": "listening", "port": N}`` and,
on SIGTERM or SIGINT, ``{"ev": "done", "up": ..., "down": ...}`` (payload bytes each way).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass

from fedberry.bench.shaper import TokenBucket, default_burst, mbit_to_bytes_per_s

__all__ = ["Relay", "Toxics", "main"]

CHUNK = 16 * 1024  # read size: small enough that connections sharing a bucket interleave
CONNECT_TIMEOUT_S = 10.0


@dataclass
class Toxics:
    """What the link does to the bytes, per direction (both directions alike)."""

    delay_s: float = 0.0  # one way
    jitter_s: float = 0.0  # uniform in [-jitter, +jitter] around the delay, never reordering
    rate_bytes_per_s: float | None = None  # None: no bandwidth limit
    shared: bool = True  # one bucket per direction for all connections (one access point)
    reset_per_s: float = 0.0  # mean resets per second per connection (0: never)
    buffer_bytes: int = 1 << 20  # per direction per connection
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.jitter_s < 0 or self.reset_per_s < 0:
            raise ValueError("delay, jitter and reset rate must be non-negative")
        if self.jitter_s > self.delay_s:
            raise ValueError("jitter cannot exceed the delay (a packet cannot arrive early)")
        if self.rate_bytes_per_s is not None and self.rate_bytes_per_s <= 0:
            raise ValueError("the rate must be positive")
        if self.buffer_bytes < CHUNK:
            raise ValueError(f"buffer_bytes must be at least {CHUNK}")


def _bucket(rate: float | None) -> TokenBucket | None:
    # Deeper than the kernel's (shaper.default_burst, 1 ms): an event loop on a busy machine
    # wakes late, and every late wake-up beyond the burst is bandwidth lost for good (the
    # bucket is full meanwhile). 10 ms, and two reads, absorb that; over a transfer of
    # megabytes the rate is the rate either way.
    return None if rate is None else TokenBucket(rate, max(default_burst(rate), 2 * CHUNK,
                                                           int(rate * 0.01)))


class Relay:
    """Listens on ``listen``; every connection is relayed to ``upstream`` through ``toxics``.

    ``bytes_up`` (toward upstream) and ``bytes_down`` count payload delivered; ``resets`` the
    connections the relay reset on purpose.
    """

    def __init__(self, upstream: tuple[str, int], toxics: Toxics | None = None,
                 listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        self.upstream = upstream
        self.listen = listen
        self.toxics = toxics or Toxics()
        self.rng = random.Random(self.toxics.seed)
        t = self.toxics
        self._up = _bucket(t.rate_bytes_per_s) if t.shared else None
        self._down = _bucket(t.rate_bytes_per_s) if t.shared else None
        self.bytes_up = self.bytes_down = 0
        self.connections = self.resets = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, *self.listen)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- one connection ----------------------------------------------------------------------
    async def _serve(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream), CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError):
                _abort(down_w)
                return
            self.connections += 1
            t = self.toxics
            up_bucket = self._up if t.shared else _bucket(t.rate_bytes_per_s)
            down_bucket = self._down if t.shared else _bucket(t.rate_bytes_per_s)
            pipes = [asyncio.ensure_future(self._pipe(down_r, up_w, up_bucket, True)),
                     asyncio.ensure_future(self._pipe(up_r, down_w, down_bucket, False))]
            waiters = list(pipes)
            if t.reset_per_s > 0:
                waiters.append(asyncio.ensure_future(
                    asyncio.sleep(self.rng.expovariate(t.reset_per_s))))
            try:
                pending = set(waiters)
                while pending:
                    done, pending = await asyncio.wait(pending,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    if any(d not in pipes or d.exception() is not None for d in done):
                        if any(d not in pipes for d in done):
                            self.resets += 1
                        _abort(down_w)
                        _abort(up_w)
                        break
                    if all(p.done() for p in pipes):
                        break
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
                for w in (down_w, up_w):
                    with contextlib.suppress(Exception):
                        w.close()
        finally:
            self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    bucket: TokenBucket | None, up: bool) -> None:
        """One direction: read, hold for the delay, pay the bucket, write; EOF passes on."""
        t = self.toxics
        # Bounded: at most buffer_bytes waiting per direction (reads are at most CHUNK).
        q: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(
            maxsize=max(1, t.buffer_bytes // CHUNK))

        async def read() -> None:
            last = 0.0
            while True:
                data = await src.read(CHUNK)
                if not data:
                    await q.put(None)
                    return
                due = time.monotonic() + t.delay_s
                if t.jitter_s:
                    due += self.rng.uniform(-t.jitter_s, t.jitter_s)
                last = max(last, due)  # jitter never reorders a byte stream
                await q.put((last, data))

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await q.get()
                if item is None:
                    with contextlib.suppress(OSError):
                        if dst.can_write_eof():
                            dst.write_eof()
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if bucket is not None:
                    await bucket.acquire(len(data))
                dst.write(data)
                await dst.drain()
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
            await reader  # surfaces its exception, if any
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


def _abort(w: asyncio.StreamWriter) -> None:
    """Close with an RST, as a reset link does (SO_LINGER 0), not a FIN."""
    sock = w.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


# -- as a process --------------------------------------------------------------------------------
def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


def toxics_from(delay_ms: float = 0.0, jitter_ms: float = 0.0, rate_mbit: float | None = None,
                reset_per_s: float = 0.0, payload_only: bool = False) -> Toxics:
    """Toxics from link figures. ``payload_only``: the rate counts Ethernet frames, as tc
    does, so TCP payload gets ``shaper.tcp_payload_fraction`` of it (what the relay counts)."""
    from fedberry.bench.shaper import tcp_payload_fraction

    rate = None
    if rate_mbit:
        rate = mbit_to_bytes_per_s(rate_mbit) * (tcp_payload_fraction() if payload_only else 1)
    return Toxics(delay_ms / 1e3, jitter_ms / 1e3, rate, reset_per_s=reset_per_s)


async def _run(args: argparse.Namespace) -> None:
    relay = await Relay(args.upstream, toxics_from(args.delay_ms, args.jitter_ms,
                                                   args.rate_mbit, args.reset_per_s,
                                                   args.payload_rate),
                        listen=args.listen).start()
    print(json.dumps({"ev": "listening", "port": relay.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await relay.close()
    print(json.dumps({"ev": "done", "up": relay.bytes_up, "down": relay.bytes_down,
                      "connections": relay.connections, "resets": relay.resets}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedberry.bench.relay", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=_addr, default=("127.0.0.1", 0))
    p.add_argument("--upstream", type=_addr, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="one way, each direction")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--rate-mbit", type=float, default=None, help="each direction, shared")
    p.add_argument("--payload-rate", action="store_true",
                   help="--rate-mbit counts frames with headers, as tc does")
    p.add_argument("--reset-per-s", type=float, default=0.0)
    args = p.parse_args(argv)
    try:
        asyncio.run(_run(args))
    except ValueError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
