"""The chief's admission policy: which updates reach the strategy, and which models are committed.

One object per chief, held by the round state machine (``chief.state.Chief``), because that is
the one place every update passes whatever carried it: TCP connections and in-process workers
(``ChiefServer.on_update``) and MPI rank 0's combined update (``on_collective_update``) all end
in ``Chief.update``, and only the state machine knows whether an update would count (its round,
not a repeat) before it is added. The runtime owns the state machine, so it owns the policy.

The wire protocol (``protocol/messages.py``) refuses sample counts that are not finite, <= 0 or
above 2**53: a sanity limit of the format. This is the trust policy on top of it:

* a sample count above ``max_samples`` is refused (a worker claiming 1e12 samples would own
  every round of a weighted mean);
* a sample count above ``max_sample_ratio`` times the median claim of earlier rounds is
  weighed as that cap (``Admission.cap_samples``; below);
* an update whose weighted contribution could take the strategy's running sum past the range of
  the type it is summed in (float32 for float32/float16 tensors) is refused *before* it is added,
  with a sentence naming the worker and the tensor; the bound is conservative (the sum of
  ``weight x max|value|`` of the round's admitted updates), so an admitted update cannot make the
  sum non-finite;
* optionally, the L2 norm of an update's change from the global model is bounded
  (``max_update_norm``): larger changes are scaled down to the bound (``clip``) or refused
  (``refuse``). Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?",
  2019, show that bounding the update norm defeats most model-replacement backdoors;
  ``clip_update`` is the same per-update clipping that differential privacy needs (McMahan,
  Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", 2018);
* the round's new global model is checked finite before it is committed (``check_model``).

A refusal is not fatal: the worker hears the sentence in a typed ERROR, the round goes on
without its update, and the worker gets the round's model like everyone else.

The relative sample bound. An absolute cap cannot tell a lie from a large shard: a worker that
claims 1e8 samples while the others claim 1e4 is within 1e9, and owns every round. So each
round also has a cap relative to the federation: ``max_sample_ratio`` (R, default 100) times the
lower median of the latest claim of every worker heard in EARLIER rounds and still in the
federation (ids that left do not vote: a token holder coming back under new ids would
otherwise outvote the honest workers with its dropped ones), and never below
``MIN_SAMPLE_CAP``. A claim above it is not refused (it may be an honest large shard) but
weighed as the cap, with one log line naming the worker, its claim and the cap. Why this shape:

* from earlier rounds, not this one: the chief adds updates to a running sum as they arrive
  (O(model) memory), so a weight must be known when its update comes; a cap fixed when the
  round opens is also the same whatever order the updates arrive in;
* the lower median: one liar (or any minority of them) moves it by one place at most, so it
  stays an honest claim while honest workers are a majority (with two workers, the smaller
  claim: a liar claiming 1 sample can at worst bring an honest worker down to equal weight);
* a clamp, not a refusal: a legitimately large shard still counts, with R times the median;
* R = 100: Dirichlet(alpha) label-skew partitions of a 10-class set (``data.partition``; alpha
  0.05 to 1, 3 to 100 workers, 20 seeds each) put the largest part at most 26.5x the lower
  median, so the default leaves them, and skews up to 100x, unchanged. The price: a liar at
  the cap among W workers of median claims still holds up to R / (R + W - 1) of a round's
  weight (92 % of 10 workers, 50 % of 100). Where shards are near-equal, a smaller R binds
  harder (R = 4: 31 % of 10); ``max_update_norm`` bounds what that weight can do.

It does not apply where it would mean nothing or break a rule: the first round (no history:
``max_samples`` alone), a federation that has heard fewer than two workers, an update that
stands for several workers (MPI's combined update is the total of every rank: rank 0 never sees
one rank's claim, and each rank is a process of the operator's own ``mpiexec`` job), and uniform
weights (differential privacy: a claim changes no weight). Under secure aggregation the cap
applies to the count each worker reports at its sync point, before the secure round: the
participants' counts the round weighs by (``weight_of``, ``min(n / scale, 1)`` with ``scale``
the largest count) are the capped ones, so a capped worker, which weighs itself by its own
claim, gets ``min(claim / cap, 1) = 1 = cap / scale``, exactly what the chief counts.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedberry.protocol.frames import ErrorCode, finite

# A real shard is nowhere near this: the largest public image data sets hold ~1e7 samples
# (ImageNet-21k ~1.4e7), and one worker training on 1e9 samples takes days per local epoch.
# Yet it leaves a float32 running sum room for values up to ~3e29 per update.
DEFAULT_MAX_SAMPLES = 1e9
# The relative bound's R (module docstring: measured partitions reach 26.5x the median).
DEFAULT_MAX_SAMPLE_RATIO = 100.0
# Workers whose latest claim the median is taken over (the most recently heard): a bound on
# the chief's memory whatever the number of ids; sorting 10,000 floats a round takes ~1 ms.
CLAIMS_KEPT = 10_000
# The cap never weighs a claim as less than this many samples: a federation of claims near 0
# (a liar claiming 1e-300 of two workers is the lower median) would otherwise weigh every
# honest update by ~1e-298, which vanishes in the float32 running sum (a non-finite model every
# round, none committed).
MIN_SAMPLE_CAP = 1.0
NORM_MODES = ("clip", "refuse")

log = logging.getLogger("fedberry.chief")


@dataclass(frozen=True)
class AdmissionPolicy:
    """Which updates the chief admits (see the module docstring).

    Parameters
    ----------
    max_samples : float
        The largest sample count an update may claim (``--max-samples``); default 1e9, which no
        real shard reaches. An MPI round's combined update may claim this much per worker.
    max_sample_ratio : float or None
        R of the relative bound (``--max-sample-ratio``, default 100): from the second round on,
        a claim above R x the lower median of the latest claims of earlier rounds is weighed as
        that cap (module docstring); at least 1; None: no relative bound.
    max_update_norm : float or None
        Bound on the L2 norm of an update's change from the round's global model, over all its
        floating-point tensors (``--max-update-norm``); None: no bound.
    update_norm_mode : str
        ``clip`` (scale the change down to the bound) or ``refuse`` (``--update-norm-mode``).
    uniform_weights : bool
        Every admitted update weighs the same (1 per worker it stands for), whatever sample
        count it claims: what differentially private FedAvg needs, since a worker's influence
        on the mean must be bounded (``--dp`` sets it; docs/privacy.md).
    """

    max_samples: float = DEFAULT_MAX_SAMPLES
    max_update_norm: float | None = None
    update_norm_mode: str = "clip"
    uniform_weights: bool = False
    max_sample_ratio: float | None = DEFAULT_MAX_SAMPLE_RATIO

    def __post_init__(self) -> None:
        if not (_is_number(self.max_samples) and 0 < self.max_samples <= 2 ** 53):
            raise ValueError(f"max_samples must be a number in (0, 2**53], not "
                             f"{self.max_samples!r}")
        if self.max_sample_ratio is not None and not (_is_number(self.max_sample_ratio)
                                                      and self.max_sample_ratio >= 1):
            raise ValueError(f"max_sample_ratio must be a number >= 1 (or None: no relative "
                             f"bound), not {self.max_sample_ratio!r}")
        if self.max_update_norm is not None and not (_is_number(self.max_update_norm)
                                                     and self.max_update_norm > 0):
            raise ValueError(f"max_update_norm must be a positive number, not "
                             f"{self.max_update_norm!r}")
        if self.update_norm_mode not in NORM_MODES:
            raise ValueError(f"update_norm_mode must be one of {', '.join(NORM_MODES)}, not "
                             f"{self.update_norm_mode!r}")

    def record(self) -> dict[str, Any]:
        """The policy as recorded in ``run_config`` (checkpoints, ``OUT/run.json``)."""
        out: dict[str, Any] = {"max_samples": self.max_samples,
                               "max_update_norm": self.max_update_norm,
                               "update_norm_mode": self.update_norm_mode,
                               "max_sample_ratio": self.max_sample_ratio}
        if self.uniform_weights:  # only under DP: records of runs without it stay as they were
            out["uniform_weights"] = True
        return out


@dataclass
class Refusal:
    """Why an update was not admitted: the ERROR frame's code, sentence and fatality."""

    code: ErrorCode
    message: str
    fatal: bool


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
            and math.isfinite(x))


def non_finite(arrays: Sequence[np.ndarray]) -> str | None:
    """Which tensor of ``arrays`` holds NaN or Inf, as a phrase; None if none does."""
    for i, a in enumerate(arrays):
        if not finite(a):
            return f"tensor {i} contains NaN or Inf"
    return None


def max_abs(a: np.ndarray) -> float:
    """The largest magnitude in ``a`` (NaN if it holds one), without a temporary copy."""
    if not a.size:
        return 0.0
    if a.dtype == np.bool_:
        return float(a.any())
    return max(abs(float(a.max())), abs(float(a.min())))


def _float_indices(reference: Sequence[np.ndarray]) -> list[int]:
    # Only floating-point tensors move by training; integer ones (BatchNorm's step counters)
    # are neither measured nor clipped.
    return [i for i, r in enumerate(reference) if np.issubdtype(r.dtype, np.floating)]


def update_norm(update: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """The L2 norm of ``update - reference`` over the floating-point tensors, in float64."""
    total = 0.0
    for i in _float_indices(reference):
        d = (update[i].astype(np.float64) - reference[i]).ravel()
        # einsum, not np.dot: dot goes to OpenBLAS, whose thread pool on a busy machine (many
        # workers' threads clipping at once, other processes) took 25 ms for 157k values where
        # einsum takes 0.5 ms (measured on this project's shared 2-core test machine).
        total += float(np.einsum("i,i->", d, d))
    return math.sqrt(total)


def clip_update(update: list[np.ndarray], reference: Sequence[np.ndarray],
                max_norm: float) -> float:
    """Scale ``update``'s change from ``reference`` down, in place, so that its L2 norm (over
    the floating-point tensors) is at most ``max_norm``; return the norm it had.

    ``update = reference + (update - reference) * min(1, max_norm / norm)``: the per-update
    clipping of norm-bounding defences (Sun et al. 2019) and of differentially private FedAvg
    (McMahan et al. 2018), which then adds noise scaled to ``max_norm``. A read-only tensor is
    replaced in the list rather than written.
    """
    norm = update_norm(update, reference)
    if norm > max_norm:
        # The change is scaled in float64 and rounded into the update's dtype TOWARDS the
        # reference (never past the scaled value), so that no coordinate's change grows in
        # the rounding and the stored update is within the bound exactly, even in float16
        # (round-to-nearest landed it up to ~0.75 % above). The factor's 1e-12 covers the
        # float64 rounding of the norm itself.
        scale = max_norm / norm * (1 - 1e-12)
        for i in _float_indices(reference):
            ref = np.asarray(reference[i])
            target = (update[i].astype(np.float64) - ref) * scale + ref
            out = _toward(target, ref, update[i].dtype)
            if update[i].flags.writeable:
                update[i][...] = out
            else:
                update[i] = out
    return norm


def _toward(target: np.ndarray, ref: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``target`` in ``dtype``, rounded to the nearest value unless that lies further from
    ``ref`` than ``target`` does; then the neighbour on ``ref``'s side (``ref`` itself is
    representable, so that neighbour lies between the two)."""
    out = target.astype(dtype)
    if np.dtype(dtype) == np.float64:
        return out
    past = np.abs(out.astype(np.float64) - ref) > np.abs(target - ref)
    if past.any():
        out[past] = np.nextafter(out[past], np.asarray(ref, dtype)[past] if np.ndim(ref)
                                 else np.asarray(ref, dtype))
    return out


def update_weight(num_samples: float, stands_for: int = 1, uniform: bool = False) -> float:
    """The weight of an update: its sample count, or under ``uniform`` (differential privacy)
    the number of workers it stands for. The one rule: the chief's admission and each MPI
    rank (which weighs its own update before the collective sum) both call it."""
    return float(stands_for) if uniform else float(num_samples)


def _sum_limit(dtype: np.dtype) -> float:
    """The largest value the strategies' running sum holds for a tensor of ``dtype``
    (``strategies.running_mean``: float32 for float16/float32, float64 otherwise)."""
    if dtype in (np.float16, np.float32):
        return float(np.finfo(np.float32).max)
    return float(np.finfo(np.float64).max)


class Admission:
    """The policy applied to one chief's rounds: ``begin_round(global)``, ``admit`` per update
    that would count, ``check_model`` on the round's result."""

    def __init__(self, policy: AdmissionPolicy | None = None) -> None:
        self.policy = policy if policy is not None else AdmissionPolicy()
        self._reference: list[np.ndarray] = []
        self._bound: list[float] = []  # per tensor: sum of weight x max|value| admitted so far
        self._limit: list[float] = []
        # The norm bound in force: the policy's, or what differential privacy's adaptive
        # clipping sets between rounds (privacy.dp_fedavg); one bound, applied here only.
        self.norm_bound: float | None = self.policy.max_update_norm
        # The norms (before clipping) of the round's admitted updates, for adaptive clipping.
        self.norms: list[float] = []
        # The relative sample bound: worker -> its latest claim (oldest heard first, at most
        # CLAIMS_KEPT), and the open round's cap from them (None: no relative bound).
        self._claims: dict[str, float] = {}
        self.sample_cap: float | None = None

    def weight(self, num_samples: float, stands_for: int = 1) -> float:
        """The weight an admitted update gets in the strategy (``update_weight``)."""
        return update_weight(num_samples, stands_for, self.policy.uniform_weights)

    def begin_round(self, global_arrays: Sequence[np.ndarray],
                    members: Collection[str] | None = None) -> None:
        """A new round from this global model: the running-sum bounds start from zero.
        ``members``: the workers in the federation now; only their claims set the round's
        relative cap (None: every claim remembered)."""
        self._reference = list(global_arrays)
        self._bound = [0.0] * len(self._reference)
        self._limit = [_sum_limit(g.dtype) for g in self._reference]
        self.norms = []
        self.sample_cap = self._relative_cap(members)

    def _applies(self) -> bool:
        # Uniform weights (DP): a claim changes no weight, so there is nothing to bound.
        return self.policy.max_sample_ratio is not None and not self.policy.uniform_weights

    def _relative_cap(self, members: Collection[str] | None) -> float | None:
        # Only the workers still in the federation: worker ids are the workers' word, and a
        # token holder that comes back under new ids would otherwise leave a claim behind each
        # time, until its dropped ids are the majority the lower median relies on.
        claims = [c for w, c in self._claims.items() if members is None or w in members]
        if not self._applies() or len(claims) < 2:  # a median of one is no reference
            return None
        assert self.policy.max_sample_ratio is not None
        return max(self.policy.max_sample_ratio * statistics.median_low(claims),
                   MIN_SAMPLE_CAP)

    def cap_samples(self, worker_id: str, claim: float, stands_for: int = 1) -> float:
        """The sample count an update claiming ``claim`` is weighed by: the claim, or the open
        round's relative cap (``sample_cap``) if the claim is above it, with one log line. Not
        applied to an update standing for several workers (MPI's combined update), nor to a
        claim above ``max_samples`` (which ``admit`` refuses). The one relative rule: plain
        updates (``Chief.update``) and secure aggregation's reports (``Chief._report``) both
        call it."""
        cap = self.sample_cap
        if (cap is None or stands_for != 1 or claim <= cap
                or self.too_many_samples(claim, stands_for)):
            return claim
        log.warning("worker %s claims %g samples, more than %g x the median claim of earlier "
                    "rounds: its update is weighed as %g samples (max_sample_ratio)",
                    worker_id, claim, self.policy.max_sample_ratio, cap)
        return cap

    def remember(self, worker_id: str, claim: float, stands_for: int = 1) -> None:
        """``worker_id``'s update claiming ``claim`` counts in the open round: its claim (as
        claimed, not as capped) is its latest, for the caps of the rounds after this one."""
        if stands_for != 1 or not self._applies():
            return
        self._claims.pop(worker_id, None)
        self._claims[worker_id] = float(claim)
        if len(self._claims) > CLAIMS_KEPT:
            del self._claims[next(iter(self._claims))]  # the worker heard from longest ago

    def too_many_samples(self, count: float, stands_for: int = 1) -> str | None:
        """Why a claimed count of samples is above the policy's ``max_samples`` (None: it is
        not). The one sample bound: an update's ``num_samples`` and an evaluation's
        ``num_examples`` both weight a mean, so one worker's huge claim would own either."""
        cap = self.policy.max_samples * stands_for
        if count > cap:
            return (f"it claims {count:g} samples, more than the chief admits "
                    f"(max_samples {cap:g})")
        return None

    def check_numbers(self, num_samples: float, arrays: Sequence[np.ndarray], *,
                      checked: bool = False, bad: str | None = None) -> Refusal | None:
        """Refuse what no update may carry, whatever its round: a sample count that is not a
        positive number, NaN or Inf. Fatal: only a broken worker sends these (the worker API
        and the protocol refuse them on the way out). ``checked``/``bad``: the transport's own
        NaN/Inf check of these very arrays (``FrameDecoder.check_finite``)."""
        if not (isinstance(num_samples, (int, float)) and math.isfinite(num_samples)
                and num_samples > 0):
            return Refusal(ErrorCode.BAD_FRAME, "num_samples must be a positive number", True)
        if not checked:
            bad = non_finite(arrays)
        if bad:
            return Refusal(ErrorCode.NON_FINITE, f"update refused: {bad}", True)
        return None

    def admit(self, worker_id: str, num_samples: float, arrays: list[np.ndarray], *,
              stands_for: int = 1, clipped_apart: bool = False,
              weigh_as: float | None = None) -> Refusal | None:
        """Admit an update that would count in this round (clipping it in place if the policy
        says so), or say why not. ``stands_for``: the workers a combined update (MPI) sums.
        ``clipped_apart``: a securely aggregated mean, whose parts each worker clipped to the
        bound before masking: the norm bound is not applied to it again (it bounds one
        worker's change; the mean's distributed DP noise would be clipped away with it).
        ``weigh_as``: the sample count it will be weighed by, if not its claim
        ``num_samples`` (``cap_samples``)."""
        p = self.policy
        too_many = self.too_many_samples(num_samples, stands_for)
        if too_many:
            return Refusal(ErrorCode.LIMIT, f"update of worker {worker_id} refused: {too_many}; "
                           "the round goes on without it", False)
        if weigh_as is not None:
            num_samples = weigh_as
        max_norm = None if clipped_apart else self.norm_bound
        norm = None
        if max_norm is not None and self._reference:
            if p.update_norm_mode == "clip":
                norm = clip_update(arrays, self._reference, max_norm)
                if norm > max_norm:
                    log.info("worker %s: its update's change from the global model had norm "
                             "%.4g, clipped to max_update_norm %g", worker_id, norm, max_norm)
            else:
                norm = update_norm(arrays, self._reference)
                if norm > max_norm:
                    return Refusal(ErrorCode.LIMIT,
                                   f"update of worker {worker_id} refused: its change from the "
                                   f"global model has norm {norm:.4g}, above the bound "
                                   f"max_update_norm {max_norm:g}; the round goes on "
                                   "without it", False)
        adds = []
        for i, a in enumerate(arrays):
            m = max_abs(a)
            add = num_samples * m
            limit = self._limit[i] if i < len(self._limit) else _sum_limit(a.dtype)
            bound = self._bound[i] if i < len(self._bound) else 0.0
            if not math.isfinite(add) or bound + add > limit:
                return Refusal(ErrorCode.NON_FINITE,
                               f"update of worker {worker_id} refused: tensor {i} (largest "
                               f"magnitude {m:.3g}) weighted by its {num_samples:g} samples "
                               f"could take the round's running sum past {limit:.3g}, the "
                               "largest number it can hold; the round goes on without it",
                               False)
            adds.append(add)
        for i, add in enumerate(adds[:len(self._bound)]):
            self._bound[i] += add
        if norm is not None:
            self.norms.append(norm)
        return None

    def check_model(self, arrays: Sequence[np.ndarray]) -> str | None:
        """Why a round's new global model must not be committed (None: it may)."""
        return non_finite(arrays)
