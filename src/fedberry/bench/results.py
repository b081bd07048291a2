"""A mode's figures: its evaluated models (points) and what they add up to at the target.

A mode's clock starts when every one of its processes has loaded its data and said it is ready
(``go``), and stops at the first model that reaches the target (or at the mode's time cap, which
is then reported as a lower bound). Bytes are counted where they cross the link:

* on network namespaces, at each worker's interface (``/sys/class/net/eth0``, headers and ACKs
  included). Total = every byte once, at its sender: for dsgd/fedavg what the workers sent plus
  what they received (the chief sent it); for ddp what the workers sent (the access point relays
  each of those bytes to another worker). Per worker = what crossed that worker's own link, both
  directions. Our chief's own socket counts (payload only) and the shaping queues' counters are
  recorded beside them as cross-checks.
* on the in-process shaper (loopback), our chief's socket counts; for ddp the host's loopback
  counter, which is approximate and unshaped, and flagged so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedberry.bench.config import ModeConfig


@dataclass
class Point:
    """One evaluated model of a mode's run."""

    t: float  # seconds since go
    k: int  # step, round or (single) optimizer step that produced it
    acc: float
    loss: float | None
    bytes: int | None  # total on the wire so far (see the module docstring)
    per_worker: float | None
    socket_bytes: int | None = None  # our chief's count, payload only


@dataclass
class ModeResult:
    mode: str
    workers: int
    unit: str  # "step" | "round"
    config: dict[str, Any]
    reached: bool = False
    time_to_target_s: float | None = None
    lower_bound: bool = False  # time/bytes/k to target are lower bounds (target not reached)
    k_to_target: int | None = None
    bytes_to_target: int | None = None
    per_worker_to_target: float | None = None
    socket_bytes_to_target: int | None = None
    final_acc: float | None = None
    best_acc: float | None = None
    run_s: float = 0.0
    stop_reason: str = ""
    bytes_source: str = ""
    link_shaped: bool = True
    compute_cpu_s: float | None = None  # mean worker CPU seconds spent training, to target
    compute_wall_s: float | None = None  # the same in wall time on the shared cores
    # Training speed of one device: samples per second of training wall time, mean over the
    # workers, to target (under --device-cpu this is the emulated device's speed).
    samples_per_s: float | None = None
    device_cpu: float | None = None  # the CPU quota each process of this mode ran under
    qdisc_bytes: dict[str, int] | None = None  # whole run, from the shaping queues
    iface_bytes_run: int | None = None  # whole run, total by interface counters
    socket_bytes_run: int | None = None
    crc_match: bool | None = None  # dsgd/fedavg: worker 1's model == the one evaluated
    # 1-minute load average when the mode started and ended: other jobs on the machine show
    # up here (ours alone are about workers + 1 at most).
    loadavg: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def finish(res: ModeResult, mc: ModeConfig, target: float, time_note: str = "") -> None:
    """Fills in the figures to target from the points of a run that has ended."""
    if time_note:
        res.notes.append(f"time = {time_note}")
    if not res.points:
        res.notes.append("no model was evaluated")
        res.lower_bound = True
        res.time_to_target_s = max(res.run_s, mc.time_cap_s)
        return
    res.final_acc = res.points[-1].acc
    res.best_acc = max(p.acc for p in res.points)
    hit = next((p for p in res.points if p.acc >= target), None)
    if hit is not None:
        res.reached = True
        at = hit
        res.time_to_target_s = hit.t
    else:
        # Not reached: the cap (or the time it ran, if it stopped earlier) is a lower bound,
        # and so are the bytes and steps spent until then.
        at = res.points[-1]
        res.lower_bound = True
        stopped_by_cap = res.stop_reason.startswith("time cap")
        res.time_to_target_s = max(mc.time_cap_s if stopped_by_cap else at.t, at.t)
    res.k_to_target = at.k
    res.bytes_to_target = at.bytes
    res.per_worker_to_target = at.per_worker
    res.socket_bytes_to_target = at.socket_bytes
    if not res.stop_reason:
        res.stop_reason = "target reached" if res.reached else "ended"
