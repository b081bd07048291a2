"""The emulated slow link the benchmark's processes talk over, in one of two forms.

``netns`` (root): `netns.SlowLink` puts the chief and every worker in its own network namespace
behind one shaped access point; our processes really send their bytes through the kernel's htb
queues. We add one thing on top: the workers reach *each other* through the chief's namespace
(IP forwarding there, host routes in the workers). Station-to-station traffic on Wi-Fi also goes
through the access point, and without this the gloo ring of the ``ddp`` mode would talk over the
unshaped bridge and never touch the slow link.

``shaper`` (no root): everything on loopback; our TCP chief passes every byte through one token
bucket per direction shared by all its connections (the listener's pacing,
`ListenOptions(pacing=SharedLink.pacing())`, see transports/pacing.py). Only our transport
can be shaped this way: gloo's sockets cannot, so ``ddp`` then runs unshaped and says so.
"""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedberry.bench import netns

CHIEF_PORT = 7777  # inside the chief's namespace only: a fixed port cannot collide there
RELAY_PORT = 7778  # the latency relay's, beside the chief (relay.py)
DDP_PORT = 29500


def _sh(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, timeout=10)


def choose(kind: str) -> tuple[str, str]:
    """("netns" | "shaper", why) for ``--link auto|netns|shaper``."""
    ok, reason = netns.available()
    if kind == "netns" and not ok:
        raise RuntimeError(f"--link netns: network namespaces unavailable: {reason}")
    if kind == "auto":
        if ok:
            return "netns", reason
        return "shaper", f"network namespaces unavailable ({reason}): in-process token bucket"
    if kind not in ("netns", "shaper"):
        raise ValueError(f"unknown link {kind!r}: auto, netns or shaper")
    return kind, reason if kind == "netns" else "in-process token bucket (asked for)"


class BenchLink:
    """Where the chief and the workers run, and how to count what crossed the link."""

    def __init__(self, kind: str, workers: int, rate_mbit: float, delay_ms: float = 0.0,
                 duplex: str = "full", prefix: str = "fbbench", queue: str = "fair") -> None:
        self.kind = kind
        self.workers = workers
        self.rate_mbit = rate_mbit
        self.delay_ms = delay_ms
        self.duplex = duplex
        self.queue = queue  # netns: "fair" (a queue per worker, as the shaper) or "fifo"
        self.prefix = prefix
        self.slow: netns.SlowLink | None = None
        self.delay_applied = False

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> BenchLink:
        if self.kind == "netns":
            netns.cleanup_stale(self.prefix)  # namespaces of an earlier run that was killed
            self.slow = netns.SlowLink(self.workers, rate_mbit=self.rate_mbit,
                                       delay_ms=self.delay_ms, prefix=self.prefix,
                                       duplex=self.duplex,  # type: ignore[arg-type]
                                       queue=self.queue)  # type: ignore[arg-type]
            with warnings.catch_warnings():
                # reported via delay_applied and queue (describe())
                warnings.simplefilter("ignore", RuntimeWarning)
                self.slow.open()
            self.delay_applied = self.slow.delay_applied
            self.queue = self.slow.queue
            try:
                self._relay_via_chief()
            except BaseException:
                self.slow.close()
                raise
        return self

    def close(self) -> None:
        if self.slow is not None:
            self.slow.close()
            self.slow = None

    def __enter__(self) -> BenchLink:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _relay_via_chief(self) -> None:
        s = self.slow
        assert s is not None
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0"):
            _sh(s.netns_cmd(netns.CHIEF, ["sysctl", "-qw", key]))
        for i, ns in enumerate(s.ns_names):
            for j, ip in enumerate(s.worker_ips):
                if i != j:
                    _sh(["ip", "-n", ns, "route", "add", f"{ip}/32", "via", s.chief_ip,
                         "dev", "eth0"])

    # -- addresses and processes ---------------------------------------------------------------
    @property
    def chief_host(self) -> str:
        return self.slow.chief_ip if self.slow is not None else "127.0.0.1"

    def worker_host(self, i: int) -> str:
        return self.slow.worker_ips[i] if self.slow is not None else "127.0.0.1"

    @property
    def iface(self) -> str | None:
        """The interface whose counters are a worker's traffic on the link (None on loopback,
        where every process shares ``lo``)."""
        return "eth0" if self.slow is not None else None

    @property
    def shaper_mbit(self) -> float | None:
        """Rate for the chief's in-process token buckets, or None when the kernel shapes."""
        return self.rate_mbit if self.kind == "shaper" else None

    def spawn(self, host: int | str, argv: Sequence[str], **popen: Any) -> subprocess.Popen:
        """Start ``argv`` on worker ``host`` (0-based) or on the chief (``"chief"``)."""
        if self.slow is not None:
            return self.slow.spawn(host, argv, **popen)  # type: ignore[arg-type]
        return subprocess.Popen(list(argv), **popen)

    # -- counters ------------------------------------------------------------------------------
    def qdisc_bytes(self) -> dict[str, int] | None:
        """Bytes the shaping queues have passed so far, per direction (netns only)."""
        if self.slow is None:
            return None
        return {k: v["bytes"] for k, v in self.slow.qdisc_stats().items()}

    @staticmethod
    def loopback_bytes() -> int:
        # On loopback each byte is one tx on ``lo``; the counter is host-wide, so it also counts
        # whatever else this machine sends to itself meanwhile (an upper bound).
        return int(Path("/sys/class/net/lo/statistics/tx_bytes").read_text())

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "rate_mbit": self.rate_mbit,
                             "workers": self.workers}
        if self.kind == "netns":
            d.update(duplex=self.duplex, delay_ms=self.delay_ms,
                     delay_applied=self.delay_applied,
                     queue=self.queue,
                     shaping="tc htb on the chief<->access-point veth pair per direction, "
                             "shared by all workers, " + (
                                 "a queue per worker served in turn" if self.queue == "fair"
                                 else "one drop-tail queue") + "; worker<->worker via the chief",
                     netem=netns.capabilities().netem)
        else:
            d.update(duplex="full", delay_ms=0.0, delay_applied=False, queue="fair",
                     shaping="token bucket per direction in the chief's TCP transport, shared "
                             "by all connections (served in turn, 16 KiB at a time), at the TCP "
                             "payload rate of the same link")
        return d
