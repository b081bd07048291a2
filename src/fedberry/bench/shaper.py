"""In-process token-bucket shaping: the slow shared link when network namespaces are unavailable.

`fedberry.bench.netns.SlowLink` shapes real packets with the kernel (htb) but needs root. Without
root, the chief's side of a benchmark wraps its socket reads and writes with a `TokenBucket`
instead. To model one shared access point, *one* bucket per direction is shared by every
connection on the chief's side (`SharedLink`): the workers then compete for the same bytes per
second, exactly as they do behind a single htb qdisc.

The bucket uses the "debt" (reservation) form of the algorithm: `acquire(n)` takes its `n` tokens
at once, possibly driving the level negative, and then sleeps until the debt would have been
repaid. This is what the kernel's htb does with a 64 KiB GSO super-packet that is larger than its
burst, it makes requests larger than the burst legal, and it serves concurrent callers in the order
they reserved (FIFO), so no caller starves however the threads are scheduled.

Dependency-free on purpose (no numpy). The transports never import it: a `SharedLink` hands the
chief's listener its buckets as `transports.pacing.Pacing` (`pacing()`), and a `TokenBucket` is a
`transports.pacing.Pacer` (it has `reserve`).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedberry.transports.pacing import Pacing

__all__ = [
    "SharedLink",
    "TokenBucket",
    "default_burst",
    "mbit_to_bytes_per_s",
    "send_shaped",
    "tcp_payload_fraction",
    "transfer_time",
    "write_shaped",
]

# Per full-size TCP segment on Ethernet, what the kernel's htb charges on top of the payload:
# Ethernet header 14 + IPv4 header 20 + TCP header 20 + timestamps option 12 (Linux enables
# timestamps by default). htb counts skb->len, which includes the Ethernet header but not the
# preamble, FCS or inter-frame gap, so those are deliberately left out.
_ETH_HDR = 14
_IPV4_HDR = 20
_TCP_HDR_WITH_TS = 32


def mbit_to_bytes_per_s(rate_mbit: float) -> float:
    """Megabits per second (10**6, as tc counts them) to bytes per second."""
    return rate_mbit * 1e6 / 8.0


def tcp_payload_fraction(mtu: int = 1500) -> float:
    """Fraction of an htb-shaped wire rate that reaches a TCP application as payload.

    The kernel shaper counts frames, the token bucket counts application bytes; multiply the
    kernel's rate by this to configure a bucket that models the same link (0.956 at MTU 1500).
    """
    if mtu <= _IPV4_HDR + _TCP_HDR_WITH_TS:
        raise ValueError(f"mtu {mtu} too small for TCP/IPv4")
    payload = mtu - _IPV4_HDR - _TCP_HDR_WITH_TS
    return payload / (mtu + _ETH_HDR)


def default_burst(rate_bytes_per_s: float) -> int:
    """Bucket depth used by both mechanisms: 1 ms at the rate, at least two full frames.

    Small on purpose: a deep bucket lets the start of every transfer through at line speed, which
    inflated short measurements by ~2% at 5 Mbit/s with a 32 KiB burst. htb needs at least one
    frame of burst; high-resolution timers make anything more unnecessary.
    """
    return max(2 * 1514, int(rate_bytes_per_s * 0.001))


def transfer_time(nbytes: float, rate_bytes_per_s: float, burst: float) -> float:
    """Seconds to pass `nbytes` through a bucket that starts full (`burst` tokens).

    The first `burst` bytes go at once; the rest at `rate_bytes_per_s`. Pure, for tests and for
    back-of-the-envelope predictions in the benchmark.
    """
    if rate_bytes_per_s <= 0:
        raise ValueError("rate_bytes_per_s must be positive")
    if nbytes < 0 or burst < 0:
        raise ValueError("nbytes and burst must be non-negative")
    return max(0.0, nbytes - burst) / rate_bytes_per_s


class TokenBucket:
    """A thread-safe, asyncio-friendly token bucket counting bytes.

    `rate_bytes_per_s` tokens accrue per second up to `burst_bytes`. The lock is held only for a
    few arithmetic operations and never across a sleep, so the same bucket can be shared by
    threads and by coroutines of one or several event loops at once.
    """

    def __init__(
        self,
        rate_bytes_per_s: float,
        burst_bytes: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError("rate_bytes_per_s must be positive")
        if burst_bytes < 0:
            raise ValueError("burst_bytes must be non-negative")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst_bytes)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._stamp = clock()
        self.total_bytes = 0  # bytes granted so far, for measurements

    def _refill(self, now: float) -> None:
        # Called with the lock held. A clock that goes backwards (a test's fake clock) must not
        # drain tokens, hence the max().
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)

    def reserve(self, n: int) -> float:
        """Take `n` tokens now; return how many seconds the caller must wait before sending."""
        if n < 0:
            raise ValueError("n must be non-negative")
        with self._lock:
            self._refill(self._clock())
            self._tokens -= n
            self.total_bytes += n
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def refund(self, n: int) -> None:
        """Give back tokens for bytes that were reserved but never sent (a cancelled send)."""
        with self._lock:
            self._refill(self._clock())
            self._tokens = min(self.burst, self._tokens + n)
            self.total_bytes -= n

    def tokens(self) -> float:
        """Current level (negative while callers are waiting out a debt)."""
        with self._lock:
            self._refill(self._clock())
            return self._tokens

    def acquire_blocking(self, n: int) -> None:
        """Block the calling thread until `n` bytes may pass."""
        wait = self.reserve(n)
        if wait > 0:
            time.sleep(wait)

    async def acquire(self, n: int) -> None:
        """Wait, without blocking the event loop, until `n` bytes may pass."""
        wait = self.reserve(n)
        if wait <= 0:
            return
        try:
            await asyncio.sleep(wait)
        except asyncio.CancelledError:
            # The bytes will not be sent; keeping the debt would slow every other connection.
            self.refund(n)
            raise


@dataclass
class SharedLink:
    """One shared access point: a bucket per direction, shared by all the chief's connections.

    `uplink` is workers -> chief (the chief acquires after each read), `downlink` is chief ->
    workers (the chief acquires before each write). Full duplex: the directions do not compete.
    """

    uplink: TokenBucket
    downlink: TokenBucket

    @classmethod
    def from_mbit(
        cls, rate_mbit: float, burst_bytes: int | None = None, *, payload_only: bool = True
    ) -> SharedLink:
        """Model a link of `rate_mbit`. With `payload_only`, subtract TCP/IP/Ethernet headers so
        the buckets match what `SlowLink` (which shapes whole frames) delivers to applications."""
        rate = mbit_to_bytes_per_s(rate_mbit)
        if payload_only:
            rate *= tcp_payload_fraction()
        if burst_bytes is None:
            burst_bytes = default_burst(rate)
        return cls(TokenBucket(rate, burst_bytes), TokenBucket(rate, burst_bytes))

    def pacing(self) -> Pacing:
        """These buckets as the TCP chief's pacing (``ListenOptions(pacing=...)``)."""
        return Pacing(uplink=self.uplink, downlink=self.downlink)


def send_shaped(sock: socket.socket, data: bytes, bucket: TokenBucket, chunk: int = 16384) -> None:
    """`sock.sendall(data)` at the bucket's pace; small chunks interleave concurrent senders."""
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        piece = view[start : start + chunk]
        bucket.acquire_blocking(len(piece))
        sock.sendall(piece)


async def write_shaped(
    writer: asyncio.StreamWriter, data: bytes, bucket: TokenBucket, chunk: int = 16384
) -> None:
    """Asyncio counterpart of `send_shaped`."""
    view = memoryview(data)
    for start in range(0, len(view), chunk):
        piece = view[start : start + chunk]
        await bucket.acquire(len(piece))
        writer.write(piece)
        await writer.drain()
