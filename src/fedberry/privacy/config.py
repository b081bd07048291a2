"""``DPConfig``: the differential-privacy options of a run, and ``--dp`` text <-> a config.

``--dp clip=1.0,noise=1.1,delta=1e-5`` is read by ``parse_dp``; an unknown key is refused with a
sentence listing the valid ones. The same object is ``serve(dp=...)``, ``mpi://?dp=...`` and a
worker's ``local_dp=...`` (docs/privacy.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

WHERE = ("worker", "chief")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _positive(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and x > 0)


@dataclass(frozen=True)
class DPConfig:
    """Differentially private FedAvg (McMahan et al. 2018), user-level: one worker's data.

    Parameters
    ----------
    clip : float
        C, the bound on the L2 norm of each update's change from the global model (with
        ``adaptive``, the initial bound).
    noise : float
        z, the noise multiplier: the chief adds Gaussian noise of std ``z * C / n`` to the
        mean of n clipped updates (for ``local_dp``: each worker adds std ``z * C`` to its own).
        0: clipping only, no guarantee (epsilon is infinite).
    delta : float
        The delta the accountant reports epsilon for (below 1 / the number of workers).
    where : str
        Who clips: ``"worker"`` (each worker clips before encoding, learning C from the chief
        at join; the chief never sees an unclipped update, and clips again all the same) or
        ``"chief"`` (the chief's admission clips each update as it arrives).
    adaptive : bool
        Adaptive clipping (Andrew et al. 2021): C follows the ``quantile`` of the update norms,
        estimated from the noised count of updates within the bound. Needs ``where="chief"``.
    quantile, clip_lr : float
        gamma (the target fraction of unclipped updates) and eta_C (the geometric step).
    count_noise : float
        sigma_b, the std of the noise on the clipped count (adaptive); must exceed noise / 2.
    target_epsilon : float or None
        Stop the run at the last round whose epsilon is within this budget.
    sampling_rate : float
        q, the fraction of workers in a round, for the accountant (1.0: every worker, every
        round; client sampling would lower it).
    seed : int or None
        Seed of the noise generator (tests); None: 128 bits from ``secrets`` (os.urandom).
    """

    clip: float
    noise: float = 0.0
    delta: float = 1e-5
    where: str = "worker"
    adaptive: bool = False
    quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float | None = None
    target_epsilon: float | None = None
    sampling_rate: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _positive(self.clip):
            raise ValueError(f"dp: clip must be a positive number, not {self.clip!r}")
        if not (_positive(self.noise) or self.noise == 0) or isinstance(self.noise, bool):
            raise ValueError(f"dp: noise must be a number >= 0, not {self.noise!r}")
        if not (_positive(self.delta) and self.delta < 1):
            raise ValueError(f"dp: delta must be a number in (0, 1), not {self.delta!r}")
        if self.where not in WHERE:
            raise ValueError(f"dp: where must be one of {', '.join(WHERE)}, not {self.where!r}")
        if not (_positive(self.sampling_rate) and self.sampling_rate <= 1):
            raise ValueError(f"dp: sampling_rate must be in (0, 1], not {self.sampling_rate!r}")
        if self.target_epsilon is not None and not _positive(self.target_epsilon):
            raise ValueError(f"dp: target_epsilon must be a positive number, not "
                             f"{self.target_epsilon!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise ValueError(f"dp: seed must be a whole number >= 0, not {self.seed!r}")
        if self.adaptive:
            if self.where != "chief":
                raise ValueError("dp: adaptive clipping needs where=chief (the bound changes "
                                 "every round, and only the chief's admission sees it)")
            if not (_positive(self.quantile) and self.quantile < 1):
                raise ValueError(f"dp: quantile must be in (0, 1), not {self.quantile!r}")
            if not _positive(self.clip_lr):
                raise ValueError(f"dp: clip_lr must be a positive number, not {self.clip_lr!r}")
            if self.noise > 0 and not (self.count_noise is not None
                                       and _positive(self.count_noise)
                                       and 2 * self.count_noise > self.noise):
                raise ValueError(f"dp: adaptive clipping with noise {self.noise:g} needs "
                                 f"count_noise above {self.noise / 2:g} (Andrew et al. 2021 "
                                 "split the budget between the model and the count: "
                                 "z_model = (z**-2 - (2 count_noise)**-2)**-0.5)")

    @property
    def model_noise(self) -> float:
        """The multiplier of the noise on the model: z, or with adaptive clipping what is left
        of it after the count's share (Andrew et al. 2021, section 3.1)."""
        if not self.adaptive or self.noise == 0 or self.count_noise is None:
            return float(self.noise)
        return (self.noise ** -2 - (2 * self.count_noise) ** -2) ** -0.5

    def record(self) -> dict[str, Any]:
        """As recorded in run_config and the strategy's params (JSON-able)."""
        return dataclasses.asdict(self)

    def text(self) -> str:
        """``--dp`` text that ``parse_dp`` reads back into an equal config."""
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) != f.default or f.name == "clip")


_FIELDS = {f.name: f for f in dataclasses.fields(DPConfig)}


def parse_dp(text: str) -> DPConfig:
    """The config ``--dp`` text names: ``clip=1.0,noise=1.1,delta=1e-5,where=chief``.

    Raises ValueError with one sentence for an unknown key (listing the valid ones), a key
    without a value or given twice, and a value of the wrong type or out of range.
    """
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in str(text).split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if key not in _FIELDS:
            raise ValueError(f"--dp has no key {key!r}; its keys are {', '.join(_FIELDS)}")
        if not eq or not value:
            raise ValueError(f"--dp: give {key} a value, as {key}=VALUE")
        if key in kwargs:
            raise ValueError(f"--dp: {key} is given twice")
        kwargs[key] = _typed(key, value)
    if "clip" not in kwargs:
        raise ValueError("--dp needs clip=C, the bound on each update's L2 norm (e.g. "
                         "--dp clip=1.0,noise=1.1,delta=1e-5)")
    return DPConfig(**kwargs)


def _typed(key: str, value: str) -> Any:
    if key == "where":
        return value
    if key == "adaptive":
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"--dp: adaptive must be true or false, not {value!r}")
    if key == "seed":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"--dp: seed must be a whole number, not {value!r}") from None
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise ValueError(f"--dp: {key} must be a finite number, not {value!r}")
    return x


def as_config(dp: DPConfig | str | None) -> DPConfig | None:
    """A ``DPConfig`` from itself or ``--dp`` text; None stays None."""
    if dp is None or isinstance(dp, DPConfig):
        return dp
    if isinstance(dp, str):
        return parse_dp(dp)
    raise TypeError(f"dp is a fedberry.DPConfig or --dp text, not {type(dp).__name__}")
