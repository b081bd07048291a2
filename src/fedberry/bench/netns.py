"""A slow, shared Wi-Fi-class link between a chief and n workers, built from network namespaces.

Topology (every box is a network namespace; the host's own namespace is not touched)::

       chief ns                    ap ns ("access point")                 worker ns i
    +------------+  veth   +----------------------------+  veth   +------------------+
    | eth0       |---------| c0 ---+              +-- w0 |---------| eth0  10.231.0.2 |
    | 10.231.0.1 |         |       +---- br0 -----+-- w1 |---------| eth0  10.231.0.3 |
    +------------+         |                      +-- .. |   ...   | ...              |
       |                   +----------------------------+         +------------------+
       downlink htb: egress of chief eth0     uplink htb: egress of c0 (toward the chief)

Why a separate "ap" namespace with a bridge and the chief in its own namespace: every packet between
the chief and any worker crosses the single veth pair chief:eth0 <-> ap:c0, so one htb qdisc at
each end of that pair is one bottleneck shared by all workers in that direction, with no ingress
shaping, no ifb and no filters (this kernel has htb, tbf, pfifo and bfifo but few classifiers).
Keeping the chief out of the root namespace also means nothing is routed or named in the host's
namespace: parallel runs may reuse the same subnet and interface names without colliding, and
deleting our namespaces removes every link we made.

`duplex="half"` instead redirects both directions (ingress and egress of c0) into one ifb device
in the ap namespace carrying a single htb, so upload and download compete for the same airtime
as on real Wi-Fi. It needs ifb, the u32 classifier and the mirred action; `available()` reports.

Latency needs the netem qdisc. When netem is missing (as on the kernel this was developed on), a
requested `delay_ms` is *not* applied: `delay_applied` is False and a RuntimeWarning is issued.
We do not fake a delay in user space.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from types import TracebackType
from typing import Any, Literal

from fedberry.bench.shaper import default_burst, mbit_to_bytes_per_s

__all__ = [
    "CHIEF",
    "LinkCapabilities",
    "SlowLink",
    "SlowLinkError",
    "available",
    "capabilities",
    "cleanup_stale",
]

CHIEF: Literal["chief"] = "chief"
"""Pass as the host index to `netns_cmd`/`spawn` to run in the chief's namespace."""

# Bounds every `ip`/`tc` call: they finish in milliseconds unless the kernel is wedged, and a
# benchmark that hangs forever on setup is worse than one that fails with a message.
CMD_TIMEOUT_S = 10.0

# Names are `<prefix>-<pid>-<seq>-<role>`: the pid keeps parallel runs apart and lets
# `cleanup_stale` tell a dead run's leftovers from a live one's.
_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,15}$")
_seq = itertools.count(1)  # next() is atomic under the GIL: safe from threads


class SlowLinkError(RuntimeError):
    """Setting up or tearing down the emulated link failed; the message carries tc/ip's stderr."""


def _run(argv: Sequence[str], timeout: float = CMD_TIMEOUT_S, check: bool = True) -> str:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SlowLinkError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    except OSError as exc:
        raise SlowLinkError(f"cannot run {argv[0]}: {exc}") from exc
    if check and proc.returncode != 0:
        raise SlowLinkError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _ip(ns: str, cmd: str) -> str:
    """`ip -n ns <cmd>`; cmd is split on whitespace (none of our names or values contain any)."""
    return _run(["ip", "-n", ns, *cmd.split()])


def _tc(ns: str, cmd: str) -> str:
    return _run(["tc", "-n", ns, *cmd.split()])


def _ok(step: Callable[[], object]) -> bool:
    try:
        step()
    except SlowLinkError:
        return False
    return True


# Every packet, whatever its protocol, into ifb0. `matchall` would be the obvious classifier but is
# missing from the kernel this was developed on; u32 matching zero bits of offset 0 is equivalent.
# The htb classes of the shaping queues: the default one (whatever no filter claims, and all
# traffic with queue="fifo"), and worker i's at _FIRST_CLASS + i with queue="fair".
_DEFAULT_CLASS = 0x10
_FIRST_CLASS = 0x100

_REDIRECT_TO_IFB0 = "protocol all u32 match u32 0 0 action mirred egress redirect dev ifb0"


def _ns_name(prefix: str, pid: int, seq: int, role: str) -> str:
    return f"{prefix}-{pid}-{seq}-{role}"


def _list_netns() -> list[str]:
    # `ip netns list` prints "name (id: N)" for namespaces with an assigned id.
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_pids(ns: str) -> None:
    # Processes inside a namespace keep it (and its shaped links) alive after `ip netns del`.
    # Everything in our uniquely named namespaces was started for this link, so it is ours to end.
    try:
        pids = [int(p) for p in _run(["ip", "netns", "pids", ns], check=False).split()]
    except SlowLinkError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                alive.append(pid)
        if not alive:
            return
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(_pid_alive(p) for p in alive):
            time.sleep(0.02)
        pids = [p for p in alive if _pid_alive(p)]


def _delete_ns(ns: str) -> None:
    _kill_ns_pids(ns)
    _run(["ip", "netns", "del", ns], check=False)


def cleanup_stale(prefix: str = "fb", *, include_live: bool = False) -> list[str]:
    """Delete namespaces left by runs with this prefix whose process is gone (a killed run).

    Namespaces of a live process are kept unless `include_live`. Returns the names deleted.
    """
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"bad prefix {prefix!r}")
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+-(?:chief|ap|w\d+|probe)$")
    removed = []
    for ns in _list_netns():
        m = pattern.match(ns)
        if not m:
            continue
        pid = int(m.group(1))
        if include_live or not _pid_alive(pid):
            _delete_ns(ns)
            removed.append(ns)
    return removed


@dataclass(frozen=True)
class LinkCapabilities:
    """What this host can do, found by trying it in a throw-away namespace."""

    ok: bool  # namespaces, veth, bridge and htb all work: SlowLink can run
    reason: str  # human sentence: why not, or what is missing
    netem: bool = False  # latency can be emulated
    half_duplex: bool = False  # ifb + u32 + mirred: duplex="half" can run
    fair_queue: bool = False  # u32 on htb: queue="fair" (a class per worker) can run


@cache
def capabilities() -> LinkCapabilities:
    """Probe once per process: root, `ip`, `tc`, and kernel support for what SlowLink uses."""
    if sys.platform != "linux":
        return LinkCapabilities(False, f"network namespaces need Linux, not {sys.platform}")
    if os.geteuid() != 0:
        return LinkCapabilities(False, "network namespaces need root (CAP_SYS_ADMIN+NET_ADMIN)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return LinkCapabilities(False, f"`{tool}` (iproute2) is not installed")
    ns = _ns_name("fb", os.getpid(), next(_seq), "probe")
    try:
        _run(["ip", "netns", "add", ns])
    except SlowLinkError as exc:
        return LinkCapabilities(False, f"cannot create a network namespace: {exc}")
    try:
        try:
            _ip(ns, "link add a0 type veth peer name a1")
            _ip(ns, "link add br0 type bridge")
            _ip(ns, "link set a1 master br0")
            _ip(ns, "link set a0 addrgenmode none gso_max_segs 1")
        except SlowLinkError as exc:
            return LinkCapabilities(False, f"veth, bridge or `ip link` options unsupported: {exc}")
        try:
            _tc(ns, "qdisc add dev a0 root handle 1: htb default 10")
            _tc(ns, "class add dev a0 parent 1: classid 1:10 htb rate 1mbit")
            _tc(ns, "qdisc add dev a0 parent 1:10 bfifo limit 100000")
        except SlowLinkError as exc:
            return LinkCapabilities(False, f"htb/bfifo qdisc unsupported: {exc}")
        netem = _ok(lambda: _tc(ns, "qdisc add dev a1 root netem delay 1ms"))
        fair = _ok(lambda: _tc(ns, "filter add dev a0 parent 1: protocol ip prio 1 u32 match ip "
                                   "dst 10.0.0.1/32 flowid 1:10"))

        def redirect_into_ifb() -> None:
            _ip(ns, "link add ifb0 type ifb")
            _tc(ns, "qdisc add dev a1 ingress")
            _tc(ns, f"filter add dev a1 parent ffff: {_REDIRECT_TO_IFB0}")

        half = _ok(redirect_into_ifb)
        missing = [
            what
            for what, have in (
                ("netem: no latency", netem),
                ("ifb/u32/mirred: no half duplex", half),
                ("u32: no fair queueing, one drop-tail queue", fair),
            )
            if not have
        ]
        reason = "ok" + (f" (missing {'; '.join(missing)})" if missing else "")
        return LinkCapabilities(True, reason, netem=netem, half_duplex=half, fair_queue=fair)
    finally:
        _run(["ip", "netns", "del", ns], check=False)


def available() -> tuple[bool, str]:
    """(True, "ok...") if SlowLink can run here, else (False, why)."""
    caps = capabilities()
    return caps.ok, caps.reason


class SlowLink:
    """Context manager: chief + `n_hosts` workers behind one shared, rate-limited access point.

    `rate_mbit` is the rate of Ethernet frames in each direction (headers included, as tc counts;
    TCP payload gets ~95.6% of it at MTU 1500, see `shaper.tcp_payload_fraction`). `delay_ms` is
    one-way per direction (RTT = 2 * delay_ms) and needs netem. `queue_ms` sizes the bottleneck
    queue in time at `rate_mbit`, like an access point's buffer. `queue` is how the workers share
    each direction: "fair" (default), a queue per worker served in turn, as an access point with
    per-station queues (Linux mac80211's, with airtime fairness) serves its stations and as the
    in-process token bucket serves its connections; "fifo", one drop-tail queue, where TCP
    flows share the rate unevenly. Without the u32 classifier "fair" falls back to "fifo" with a
    RuntimeWarning (`queue` then says "fifo": what ran).

    Workers are indexed 0..n_hosts-1; `CHIEF` addresses the chief. Attributes: `chief_ip`,
    `worker_ips[i]`, `ns_names[i]` (worker namespaces), `chief_ns`, `ap_ns`, `delay_applied`.
    Setup failures, exceptions in the body and interpreter exit all tear everything down;
    `cleanup_stale` handles a SIGKILLed run.
    """

    def __init__(
        self,
        n_hosts: int,
        rate_mbit: float = 20.0,
        delay_ms: float = 0.0,
        prefix: str = "fb",
        *,
        duplex: Literal["full", "half"] = "full",
        queue_ms: float = 200.0,
        queue: Literal["fair", "fifo"] = "fair",
        burst_bytes: int | None = None,
        subnet: str = "10.231.0",
    ) -> None:
        if not 1 <= n_hosts <= 250:
            raise ValueError("n_hosts must be in 1..250 (one /24)")
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be positive")
        if delay_ms < 0:
            raise ValueError("delay_ms must be non-negative")
        if duplex not in ("full", "half"):
            raise ValueError("duplex must be 'full' or 'half'")
        if queue not in ("fair", "fifo"):
            raise ValueError("queue must be 'fair' or 'fifo'")
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must match {_PREFIX_RE.pattern}")
        self.n_hosts = n_hosts
        self.rate_mbit = float(rate_mbit)
        self.delay_ms = float(delay_ms)
        self.prefix = prefix
        self.duplex = duplex
        self.queue_ms = float(queue_ms)
        self.queue_asked = queue
        self.queue: Literal["fair", "fifo"] = queue  # what runs: "fifo" without u32 (open())
        rate_bytes = mbit_to_bytes_per_s(rate_mbit)
        self.burst_bytes = default_burst(rate_bytes) if burst_bytes is None else int(burst_bytes)
        self.delay_applied = False
        pid, seq = os.getpid(), next(_seq)
        self.chief_ns = _ns_name(prefix, pid, seq, "chief")
        self.ap_ns = _ns_name(prefix, pid, seq, "ap")
        self.ns_names = [_ns_name(prefix, pid, seq, f"w{i}") for i in range(n_hosts)]
        self.chief_ip = f"{subnet}.1"
        self.worker_ips = [f"{subnet}.{i + 2}" for i in range(n_hosts)]
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._open = False

    # The module functions, also reachable from the class for callers that only import SlowLink.
    available = staticmethod(available)
    cleanup_stale = staticmethod(cleanup_stale)

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> SlowLink:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> None:
        caps = capabilities()
        if not caps.ok:
            raise SlowLinkError(f"SlowLink unavailable: {caps.reason}")
        if self.duplex == "half" and not caps.half_duplex:
            raise SlowLinkError(f"duplex='half' unavailable: {caps.reason}")
        if self.delay_ms > 0 and not caps.netem:
            warnings.warn(
                f"netem is not available in this kernel: delay_ms={self.delay_ms} is NOT applied; "
                "the link is rate-limited only",
                RuntimeWarning,
                stacklevel=3,
            )
        self.queue = self.queue_asked
        if self.queue == "fair" and not caps.fair_queue:
            warnings.warn(
                f"no u32 classifier in this kernel: queue='fair' is NOT applied; the workers "
                f"share one drop-tail queue ({caps.reason})",
                RuntimeWarning,
                stacklevel=3,
            )
            self.queue = "fifo"
        self._open = True
        atexit.register(self.close)
        try:
            self._build(netem=caps.netem)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill our processes, delete our namespaces (and with them every veth). Idempotent.

        Processes started with `netns_cmd` rather than `spawn` are found with `ip netns pids` and
        killed too: a process left inside would keep its namespace, and our qdiscs, alive."""
        if not self._open:
            return
        self._open = False
        atexit.unregister(self.close)
        for proc in self._procs:
            _terminate(proc)
        self._procs.clear()
        for ns in reversed(self._created):
            _delete_ns(ns)
        self._created.clear()

    # ----------------------------------------------------------------- building

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._created.append(ns)
        # Loopback up so a process in the namespace may still bind 127.0.0.1.
        _ip(ns, "link set lo up")

    def _attach(self, port: str, ns: str, ip: str) -> None:
        """veth `port` in the ap bridge <-> `eth0` with `ip` in `ns`."""
        _ip(self.ap_ns, f"link add {port} type veth peer name eth0 netns {ns}")
        # addrgenmode none: no IPv6 link-local addresses, whose router solicitations and MLD
        # reports would be the only unsolicited traffic on the shaped link.
        _ip(self.ap_ns, f"link set {port} addrgenmode none master br0 up")
        # gso_max_segs 1: TCP hands the shaper wire-sized frames, not 64 KiB GSO super-packets.
        # With super-packets a byte-limited queue holds only a few of them and, at 5 Mbit/s,
        # throughput collapsed to a third of the rate from drops (measured on this kernel).
        _ip(ns, "link set eth0 addrgenmode none gso_max_segs 1")
        _ip(ns, f"addr add {ip}/24 dev eth0")
        _ip(ns, "link set eth0 up")

    def _shape(self, ns: str, dev: str, netem: bool, by: tuple[str, ...]) -> None:
        """htb at `rate_mbit` as the root of `dev`'s egress, shared by every worker.

        ``queue="fair"``: one child class per worker, classified by its address (``by``: the
        header fields that name the worker, "dst" on the downlink, "src" on the uplink, both in
        the half-duplex ifb), each assured 0.99 ``rate/n`` and borrowing up to the whole rate,
        so the link serves the busy workers in turn, as an access point with per-station queues
        does.
        ``queue="fifo"``: one class, one drop-tail queue for everyone, where TCP flows share
        the rate as their windows happen to grow (unevenly, and differently every run).
        """
        rate, burst = self.rate_mbit, self.burst_bytes
        n = self.n_hosts if self.queue == "fair" else 1
        _tc(ns, f"qdisc replace dev {dev} root handle 1: htb default {_DEFAULT_CLASS:x}")
        _tc(ns, f"class add dev {dev} parent 1: classid 1:1 htb rate {rate}mbit ceil {rate}mbit "
                f"burst {burst} cburst {burst}")
        # A byte limit, not packets: it is a buffer measured in time at the link rate whatever
        # the mix of full frames and ACKs. Each worker's queue gets all of it, as one queue had:
        # split n ways, six dsgd uploads at once overflowed them (2.5x the drops, 3 % of the
        # bytes retransmitted). The floor keeps a few frames at low rates.
        limit = max(16 * 1514, int(mbit_to_bytes_per_s(rate) * self.queue_ms / 1e3))
        # Quantum: what a class sends per turn when classes share; one frame keeps the turns
        # as fine as the token bucket's (which interleaves 16 KiB chunks at 20 Mbit/s, 7 ms).
        leaves = [_DEFAULT_CLASS] if n == 1 else [_DEFAULT_CLASS, *range(_FIRST_CLASS,
                                                                           _FIRST_CLASS + n)]
        for cid in leaves:
            # The default class takes what no filter claims (ARP, and everything in "fifo").
            # Assured rates must not add up to more than the parent's (htb lets a class under
            # its own rate send whatever the parent has left): the workers share 99 %.
            share = (rate if n == 1 else rate * 0.01 if cid == _DEFAULT_CLASS
                     else rate * 0.99 / n)
            _tc(ns, f"class add dev {dev} parent 1:1 classid 1:{cid:x} htb rate {share:.6g}mbit "
                    f"ceil {rate}mbit burst {burst} cburst {burst} quantum 1514")
            self._leaf(ns, dev, cid, limit, netem)
        if n == 1:
            return
        for prio, field in enumerate(by, start=1):
            for i, ip in enumerate(self.worker_ips):
                _tc(ns, f"filter add dev {dev} parent 1: protocol ip prio {prio} u32 match ip "
                        f"{field} {ip}/32 flowid 1:{_FIRST_CLASS + i:x}")

    def _leaf(self, ns: str, dev: str, cid: int, limit: int, netem: bool) -> None:
        if netem and self.delay_ms > 0:
            # netem's own limit is in packets; size it from the byte budget at full-size frames
            # plus what is in flight during the delay.
            packets = limit // 1514 + int(self.rate_mbit * 1e6 / 8 * self.delay_ms / 1e3 / 1514)
            _tc(
                ns,
                f"qdisc add dev {dev} parent 1:{cid:x} handle {cid:x}: netem delay "
                f"{self.delay_ms}ms limit {max(100, packets)}",
            )
            self.delay_applied = True
        else:
            _tc(ns, f"qdisc add dev {dev} parent 1:{cid:x} handle {cid:x}: bfifo limit {limit}")

    def _build(self, netem: bool) -> None:
        for ns in (self.ap_ns, self.chief_ns, *self.ns_names):
            self._add_ns(ns)
        _ip(self.ap_ns, "link add br0 type bridge")
        _ip(self.ap_ns, "link set br0 addrgenmode none up")
        self._attach("c0", self.chief_ns, self.chief_ip)
        for i, ns in enumerate(self.ns_names):
            self._attach(f"w{i}", ns, self.worker_ips[i])
        if self.duplex == "full":
            self._shape(self.chief_ns, "eth0", netem, ("dst",))  # downlink: chief -> workers
            self._shape(self.ap_ns, "c0", netem, ("src",))  # uplink: workers -> chief
            return
        # Half duplex: c0's ingress (from the chief: downlink) and c0's egress (toward the chief:
        # uplink) both redirect into ifb0, whose single htb class is the shared airtime.
        _ip(self.ap_ns, "link add ifb0 type ifb")
        _ip(self.ap_ns, "link set ifb0 up")
        # A packet to a worker is its airtime, one from a worker too (dst first: worker to
        # worker through the chief counts for the receiver on both legs).
        self._shape(self.ap_ns, "ifb0", netem, ("dst", "src"))
        _tc(self.ap_ns, "qdisc add dev c0 ingress")
        _tc(self.ap_ns, f"filter add dev c0 parent ffff: {_REDIRECT_TO_IFB0}")
        # An egress filter needs a classful root to hang on; this htb never queues anything
        # because the filter steals every packet first.
        _tc(self.ap_ns, "qdisc add dev c0 root handle 1: htb")
        _tc(self.ap_ns, f"filter add dev c0 parent 1: {_REDIRECT_TO_IFB0}")

    # ----------------------------------------------------------------- running things

    def _ns_for(self, i: int | Literal["chief"]) -> str:
        if i == CHIEF:
            return self.chief_ns
        if isinstance(i, int) and 0 <= i < self.n_hosts:
            return self.ns_names[i]
        raise IndexError(f"host {i!r}: expected 0..{self.n_hosts - 1} or {CHIEF!r}")

    def ip_of(self, i: int | Literal["chief"]) -> str:
        self._ns_for(i)  # validates i
        return self.chief_ip if i == CHIEF else self.worker_ips[int(i)]

    def netns_cmd(self, i: int | Literal["chief"], argv: Sequence[str]) -> list[str]:
        """argv prefixed to run in worker `i`'s namespace (or the chief's, with `CHIEF`)."""
        return ["ip", "netns", "exec", self._ns_for(i), *argv]

    def spawn(
        self, i: int | Literal["chief"], argv: Sequence[str], **popen_kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start argv in host `i`'s namespace; it is killed when the link closes."""
        if not self._open:
            raise SlowLinkError("link is not open")
        proc: subprocess.Popen[Any] = subprocess.Popen(self.netns_cmd(i, argv), **popen_kwargs)
        self._procs.append(proc)
        return proc

    def qdisc_stats(self) -> dict[str, dict[str, int]]:
        """Bytes, packets and drops seen by the shaping qdiscs, per direction, from `tc -s -j`.

        Evidence that traffic really went through the shaper (and which way)."""
        if self.duplex == "full":
            where = {"downlink": (self.chief_ns, "eth0"), "uplink": (self.ap_ns, "c0")}
        else:
            where = {"both": (self.ap_ns, "ifb0")}
        out: dict[str, dict[str, int]] = {}
        for direction, (ns, dev) in where.items():
            qdiscs = json.loads(_tc(ns, f"-s -j qdisc show dev {dev}"))
            root = next(q for q in qdiscs if q.get("root") or q.get("parent") is None)
            out[direction] = {
                "bytes": int(root.get("bytes", 0)),
                "packets": int(root.get("packets", 0)),
                "drops": int(root.get("drops", 0)),
            }
        return out


def _terminate(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2.0)
