"""The worker's side of differential privacy: clip before sending, and local DP's own noise.

``Worker.sync`` passes every update through ``LocalPrivacy.apply`` before the transport sees
it, so the clipping happens before any codec encodes the update:

* the chief's C (announced in WELCOME under ``--dp where=worker``, read from ``mpi://?dp=``
  under MPI): the update's change from the last global model is clipped to C (the chief's
  ``clip_update``, the same function its admission uses), so the chief never sees an
  unclipped update. A lossy codec's error feedback (q8, fp16) then works on the clipped
  update: the residue it carries to the next round is the rounding error of what it encoded,
  a function of clipped updates only, never the part clipping removed. Clipped plus residue
  may exceed C by that rounding error: the chief's admission clips the decoded update again;
* local DP (``Worker(local_dp=DPConfig(clip=..., noise=...))``): the worker clips to its own
  C (the smaller of its own and the chief's) and adds N(0, (noise C)^2) to every coordinate
  of the clipped change itself, for a chief it does not trust. Each sync is one Gaussian
  mechanism on this worker's data with sensitivity C, so its epsilon after k syncs is the
  accountant's for (noise, k, delta): ``epsilon``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from fedberry.chief.admission import clip_update
from fedberry.privacy.accountant import epsilon
from fedberry.privacy.config import DPConfig
from fedberry.privacy.dp_fedavg import make_rng

log = logging.getLogger("fedberry.privacy")


class LocalPrivacy:
    """One worker's clipping (and local noise): ``apply(update, reference)`` per sync."""

    def __init__(self, local: DPConfig | None = None) -> None:
        self.local = local
        self.chief_clip: float | None = None  # what the chief announced
        self.syncs = 0  # updates sent with local noise
        self._rng = make_rng(local.seed if local is not None else None)
        if local is not None and local.noise > 0:
            epsilon(local.noise, 1, local.delta)  # no accountant: refused now, not mid-run

    @property
    def active(self) -> bool:
        return self.local is not None or self.chief_clip is not None

    @property
    def clip(self) -> float | None:
        """The bound this worker clips to: the smaller of its own and the chief's."""
        bounds = [c for c in (self.chief_clip, self.local.clip if self.local else None)
                  if c is not None]
        return min(bounds) if bounds else None

    def apply(self, update: Sequence[np.ndarray], reference: Sequence[np.ndarray] | None
              ) -> list[np.ndarray]:
        """``update`` clipped (and noised, for local DP) against ``reference``, the global
        model it was trained from; the caller's arrays are not changed."""
        out = [np.array(a) for a in update]
        c = self.clip
        if c is None or reference is None:
            return out
        clip_update(out, reference, c)
        if self.local is not None and self.local.noise > 0:
            std = self.local.noise * c
            for i, a in enumerate(out):
                if np.issubdtype(a.dtype, np.floating):
                    out[i] = np.asarray(a + self._rng.normal(0.0, std, a.shape).astype(a.dtype))
            self.syncs += 1
            log.info("local DP: this worker's epsilon after %d updates is %.4g at delta %g",
                     self.syncs, self.epsilon, self.local.delta)
        return out

    @property
    def epsilon(self) -> float:
        """This worker's own epsilon under local DP after its syncs so far (inf without local
        noise)."""
        if self.local is None or self.local.noise <= 0:
            return math.inf
        return epsilon(self.local.noise, self.syncs, self.local.delta)
