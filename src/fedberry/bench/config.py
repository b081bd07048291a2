"""What `fedberry bench` runs: the modes, their hyperparameters, the link, the caps.

Every mode is tuned for its own best wall time to the target accuracy on this setup, not for a
flattering ratio (the sweeps behind these numbers are in docs/benchmarks.md):

* ``single``: one process with all 60k images; Adam, batch 256 (0.9 s of training here; SGD
  with momentum at batch 128 takes 1.3 s).
* ``dsgd`` and ``ddp``: synchronous data parallel. A step costs a model-sized exchange whatever
  the batch, so the best time to target comes from few, large steps: 1024 images per worker per
  step and Adam, 62-64 steps to 0.85 where the best SGD with momentum needs about 136. Both modes
  average *gradients*, so they compute the same models and differ only in how the bytes move
  (through our chief vs gloo's ring).
* ``flower``: fedavg's settings through Flower 1.42's legacy gRPC path, float32 both ways.
* ``fedavg``: local SGD with momentum, batch 64, 10 local epochs per round: on this link a round
  costs seconds of transfer, so the fewest rounds win as long as the average still generalises;
  with 10 epochs the first round is already past 0.85 (8 epochs: 0.850, a coin toss).
  It runs as fedberry is meant to be run on a slow link: updates and the global model as q8
  changes. dsgd sends float32 both ways, as DDP does; ``--set dsgd.codec=q8`` and
  ``--set dsgd.downlink=q8`` give it the same codecs (docs/benchmarks.md has both runs).

Every mode through our chief skips the download of the initial model: workers build it from the
same seed and prove it by its digest (codecs.py, "unchanged").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

MODES = ("single", "dsgd", "ddp", "flower", "fedavg")


@dataclass
class OptimConfig:
    """A torch optimizer by name; the same spec builds the workers' and the evaluator's."""

    name: str = "sgd"  # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9  # sgd: momentum; adam: beta1

    def build(self, params: Any) -> Any:
        import torch  # the torch extra: `fedberry bench --help` must not need it

        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=(self.momentum, 0.999))
        raise ValueError(f"unknown optimizer {self.name!r}: sgd or adam")


@dataclass
class ModeConfig:
    batch_size: int  # per process
    optim: OptimConfig
    time_cap_s: float  # after this much wall time the mode stops and reports a lower bound
    local_epochs: int = 1  # fedavg: local epochs per round
    max_steps: int = 100_000  # dsgd/ddp steps, fedavg rounds: a backstop behind the time cap
    eval_every: int = 4096  # single: evaluate after this many more training samples
    # dsgd/fedavg through our chief: how updates and the global model travel (codecs.py).
    codec: str = "none"
    downlink: str = "none"


def default_modes() -> dict[str, ModeConfig]:
    return {
        "single": ModeConfig(256, OptimConfig("adam", 0.004, 0.9), time_cap_s=120.0),
        "dsgd": ModeConfig(1024, OptimConfig("adam", 0.008, 0.9), time_cap_s=420.0, max_steps=2000),
        "ddp": ModeConfig(1024, OptimConfig("adam", 0.008, 0.9), time_cap_s=420.0, max_steps=2000),
        "fedavg": ModeConfig(64, OptimConfig("sgd", 0.04, 0.9), time_cap_s=180.0,
                             local_epochs=10, max_steps=100, codec="q8", downlink="q8"),
        # fedavg's training through Flower 1.42 (mode_flower.py): float32 both ways, Flower's
        # protocol has no codecs; set its fields beside fedavg's when changing them.
        "flower": ModeConfig(64, OptimConfig("sgd", 0.04, 0.9), time_cap_s=180.0,
                             local_epochs=10, max_steps=100),
    }


@dataclass
class BenchConfig:
    modes: list[str] = field(default_factory=lambda: list(MODES))
    workers: int = 6
    target: float = 0.85
    model: str = "mlp"
    seed: int = 0
    data_dir: str | None = None
    # The link: one access point shared by every worker, per direction (full duplex) or for
    # both directions together (half, like Wi-Fi airtime).
    link: str = "auto"  # auto | netns | shaper
    rate_mbit: float = 20.0
    # Latency, one way per direction: 12.5 ms (a 25 ms round trip, Wi-Fi class: relay.py says
    # why), jittered by +-2.5 ms. "relay": our userspace link between the workers and the chief
    # (relay.py; it does not reach ddp's gloo ring, which then runs without latency and says
    # so); "netem": the kernel's, on the namespace link (many kernels, this one too, lack it).
    delay_ms: float = 12.5
    jitter_ms: float = 2.5
    latency: str = "relay"  # relay | netem
    reset_per_s: float = 0.0  # relay: mean connection resets per second per connection
    duplex: str = "full"
    # How the namespace link's access point shares each direction among the workers: "fair", a
    # queue per worker served in turn (as the in-process shaper does, and Wi-Fi access points
    # with per-station queues); "fifo", one drop-tail queue (netns.py says more).
    ap_queue: str = "fair"
    # Emulated devices: each worker and the single node under this CPU quota, in cores
    # (cpu_quota.py). None: 0.25, cut to what fits this machine beside the chief (fit_quota);
    # 0: no quota (every process at the machine's full speed).
    device_cpu: float | None = None
    stop_at_target: bool = True  # False: every mode trains until its cap
    # Also time dsgd steps through both link emulations (None: whenever namespaces are used).
    check_shaper: bool | None = None
    check_steps: int = 12
    out: str = "runs/bench"
    plots: bool = True
    per_mode: dict[str, ModeConfig] = field(default_factory=default_modes)
    # The Python with Flower for the flower mode (flower_python.find: None looks for one).
    flower_python: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def quick(cfg: BenchConfig) -> BenchConfig:
    """A few minutes: 3 workers, a faster link, an easier target, short caps.

    For checking that every mode runs and produces its row (the test uses it), not for figures.
    The link is 200 Mbit/s: at 50, dsgd's and ddp's ~32 steps to 0.80 were almost all transfer
    (0.75 s a step of 0.77 s on the wire), and checking rows needs no slow link.
    """
    modes = default_modes()
    for m in modes.values():
        m.time_cap_s = 60.0
    modes["single"].time_cap_s = 30.0
    modes["fedavg"].local_epochs = 1
    modes["flower"].local_epochs = 1
    # Half a core a device (3 x 0.5 beside the chief on 2 cores) unless told: the quotas are
    # still exercised, in half the time 0.25 takes.
    device_cpu = 0.5 if cfg.device_cpu is None else cfg.device_cpu
    return replace(cfg, workers=3, target=0.80, rate_mbit=200.0, check_steps=4, per_mode=modes,
                   device_cpu=device_cpu)
