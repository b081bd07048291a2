"""The secure-aggregation messages as JSON objects, for the protocol's SECAGG frames.

The chief and a worker exchange one SECAGG frame per step (``protocol.messages.SecAgg``): its
``step`` names the message and its ``body`` is the message as JSON, bytes in base64. Decoding
checks every field (types, sizes, counts) and builds the typed message of ``messages``, which
checks its own fields again; who may send which step, and when, is the connection's rule and
the client's or server's.

Chief -> worker: ``begin`` (:class:`Begin`: the round's public parameters and this worker's
id), ``peers`` (its neighbours' key adverts), ``forward`` (the shares sealed for it), ``unmask``
(survivors and dropouts). Worker -> chief: ``advert``, ``shares``, ``reveal``. The masked
update itself is a tensor frame (MASKED), not JSON.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass
from typing import Any

from .errors import MessageError
from .graph import default_neighbors, default_threshold
from .keys import KEY_BYTES
from .messages import (
    EncryptedShare,
    ForwardedShares,
    KeyAdvert,
    RoundConfig,
    ShareBundle,
    UnmaskReply,
    UnmaskRequest,
)
from .shamir import SHARE_BYTES

FROM_CHIEF = ("begin", "peers", "forward", "unmask")
FROM_WORKER = ("advert", "shares", "reveal", "abstain")
STEPS = (*FROM_CHIEF, *FROM_WORKER)

# A round's clients: the most a 16-bit ring's encoding can sum without wrapping is 2^15 - 1
# (FixedPoint); a list past that is no round of ours. A sealed pair of shares is two Shamir
# shares, a nonce and a tag (~160 bytes): 1 KiB is far past it.
MAX_CLIENTS = (1 << 15) - 1
MAX_SEALED = 1024


@dataclass(frozen=True)
class Begin:
    """chief -> each worker of a secure round: its public parameters, and this worker's id.

    ``clip``: the L2 bound the worker clips its change to (the ring encodes coordinates in
    [-range, range]). ``scale`` and ``uniform``: how each worker weighs its clipped change,
    itself, from its own sample count (``weight_of``): by min(n / scale, 1), scale being the
    round's largest count, or by 1 under uniform weights (differential privacy); so the sum is
    the weighted sum FedAvg needs. ``max_workers`` and ``stochastic`` fix the encoding.
    ``noise``: the standard deviation of the Gaussian noise the worker adds to each coordinate
    (distributed differential privacy; 0: none).

    Everything here but ``you`` is bound into the round's digest (``round_context``): a chief
    that tells two workers different scales, clips or noises breaks their masks and sealed
    shares (the round fails) instead of weighing one worker's update above the others'.
    """

    config: RoundConfig
    you: int
    clip: float
    scale: float
    max_workers: int
    stochastic: bool = False
    noise: float = 0.0
    uniform: bool = False

    @property
    def range(self) -> float:
        """The coordinates the ring encodes (``encoding_range``)."""
        return encoding_range(self.clip, self.noise)

    def weight_of(self, num_samples: float) -> float:
        """What a worker of ``num_samples`` multiplies its clipped change by."""
        return weight_of(num_samples, self.scale, self.uniform)

    def __post_init__(self) -> None:
        for what, v in (("clip", self.clip), ("scale", self.scale)):
            if not (_is_number(v) and math.isfinite(v) and v > 0):
                raise MessageError(f"a secure round's {what} is a positive number, not "
                                   f"{v!r:.40}")
        if not (_is_number(self.noise) and math.isfinite(self.noise) and self.noise >= 0):
            raise MessageError(f"a secure round's noise is a number >= 0, not "
                               f"{self.noise!r:.40}")
        if self.you not in self.config.clients:
            raise MessageError(f"a secure round's begin names client {self.you}, which is not "
                               "among its clients")
        if not (type(self.max_workers) is int and len(self.config.clients) <= self.max_workers
                <= MAX_CLIENTS):
            raise MessageError(f"a secure round's max_workers is an integer from its client "
                               f"count to {MAX_CLIENTS}, not {self.max_workers!r:.40}")
        if type(self.stochastic) is not bool or type(self.uniform) is not bool:
            raise MessageError("a secure round's stochastic and uniform are true or false")
        if self.config.context != self.context:
            raise MessageError("a secure round's parameters are not the ones its digest binds")

    @property
    def context(self) -> bytes:
        return round_context(self.clip, self.scale, self.max_workers, self.stochastic,
                             self.noise, self.uniform)


def round_context(clip: float, scale: float, max_workers: int, stochastic: bool,
                  noise: float, uniform: bool) -> bytes:
    """The parameters every party of a round must see alike, as the bytes its digest binds
    (``RoundConfig.context``); floats by their exact ``repr``."""
    return (f"clip={float(clip)!r};scale={float(scale)!r};max_workers={int(max_workers)};"
            f"stochastic={bool(stochastic)};noise={float(noise)!r};"
            f"uniform={bool(uniform)}").encode()


def weight_of(num_samples: float, scale: float, uniform: bool) -> float:
    """A worker's weight in a secure round (``Begin``): 1 under uniform weights, else its
    sample count over the round's largest, at most 1 (so its weighted change stays within the
    clip). The one rule: each worker applies it to itself, the chief to the survivors' sum."""
    return 1.0 if uniform else min(float(num_samples) / float(scale), 1.0)


@dataclass(frozen=True)
class Abstain:
    """worker -> chief: this worker takes no further part in the round, and why (it refused a
    step, or could not do it): the chief counts it a dropout at once instead of waiting for the
    step's deadline."""

    sender: int
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON:
            raise MessageError(f"an abstention's reason is at most {MAX_REASON} characters")


MAX_REASON = 1000


# Noise tails the ring's range leaves room for: a Gaussian coordinate passes 8 standard
# deviations with probability 1.2e-15, so a noised coordinate is clamped (np.clip) about once in
# 10^15, and the sum of max_workers such ranges still cannot wrap.
NOISE_TAILS = 8.0


def encoding_range(clip: float, noise: float) -> float:
    """The range [-R, R] every coordinate of a worker's contribution is encoded in: the clip
    (a coordinate of an L2-clipped vector is within it), plus room for its noise share."""
    return clip + NOISE_TAILS * noise


def majority_threshold(config: RoundConfig) -> int:
    """The smallest threshold a worker accepts: a strict majority of its group (itself and
    its k neighbours), which defeats a chief that tells half a group a peer survived and the
    other half that it dropped (docs/secure-aggregation.md)."""
    return default_threshold(config.neighbors or default_neighbors(len(config.clients)))


# -- encode -----------------------------------------------------------------------------------
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def to_json(payload: Any) -> dict[str, Any]:
    """The JSON body of a SECAGG frame carrying ``payload``."""
    if isinstance(payload, Begin):
        c = payload.config
        return {"round_number": c.round_number, "seed": _b64(c.seed), "clients": list(c.clients),
                "length": c.length, "bits": c.bits, "neighbors": c.neighbors,
                "threshold": c.threshold, "you": payload.you, "clip": payload.clip,
                "scale": payload.scale, "max_workers": payload.max_workers,
                "stochastic": payload.stochastic, "noise": payload.noise,
                "uniform": payload.uniform}
    if isinstance(payload, Abstain):
        return {"sender": payload.sender, "reason": payload.reason}
    if isinstance(payload, KeyAdvert):
        return {"sender": payload.sender, "mask": _b64(payload.mask_public),
                "enc": _b64(payload.encryption_public)}
    if isinstance(payload, tuple):  # peers: the neighbours' adverts
        return {"adverts": [to_json(a) for a in payload]}
    if isinstance(payload, ShareBundle):
        return {"sender": payload.sender,
                "shares": [[s.receiver, _b64(s.sealed)] for s in payload.shares]}
    if isinstance(payload, ForwardedShares):
        return {"receiver": payload.receiver,
                "shares": [[s.sender, _b64(s.sealed)] for s in payload.shares]}
    if isinstance(payload, UnmaskRequest):
        return {"survivors": sorted(payload.survivors), "dropouts": sorted(payload.dropouts)}
    if isinstance(payload, UnmaskReply):
        return {"sender": payload.sender,
                "seed": [[o, _b64(s)] for o, s in sorted(payload.seed_shares.items())],
                "key": [[o, _b64(s)] for o, s in sorted(payload.key_shares.items())]}
    raise TypeError(f"not a secure-aggregation message: {type(payload).__name__}")


def step_of(payload: Any) -> str:
    """The step name a payload travels under."""
    for step, kind in _KINDS.items():
        if isinstance(payload, kind):
            return step
    raise TypeError(f"not a secure-aggregation message: {type(payload).__name__}")


# -- decode (everything the peer sent is checked) ---------------------------------------------
def from_json(step: str, body: object) -> Any:
    """The typed message of a SECAGG frame's ``step`` and ``body``; MessageError with one
    sentence if any field is wrong."""
    if step not in STEPS:
        raise MessageError(f"unknown secure-aggregation step {step!r:.40}")
    if not isinstance(body, dict):
        raise MessageError(f"a {step} body is a JSON object")
    return _DECODERS[step](body)


def _is_number(v: object) -> bool:
    return type(v) in (int, float)


def _int(body: dict[str, Any], key: str, lo: int = 0, hi: int = (1 << 32) - 1) -> int:
    v = body.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise MessageError(f"{key} is an integer from {lo} to {hi}, not {v!r:.40}")
    return v


def _bytes(v: object, what: str, size: int | None = None, most: int = MAX_SEALED) -> bytes:
    if not isinstance(v, str) or len(v) > 4 * most:
        raise MessageError(f"{what} is a base64 string")
    try:
        b = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise MessageError(f"{what} is not valid base64") from None
    if (size is not None and len(b) != size) or len(b) > most:
        raise MessageError(f"{what} is {size if size is not None else f'at most {most}'} bytes")
    return b


def _list(body: dict[str, Any], key: str) -> list[Any]:
    v = body.get(key)
    if not isinstance(v, list) or len(v) > MAX_CLIENTS:
        raise MessageError(f"{key} is a list of at most {MAX_CLIENTS} entries")
    return v


def _pairs(body: dict[str, Any], key: str) -> list[tuple[int, str]]:
    out = []
    for item in _list(body, key):
        if (not isinstance(item, list) or len(item) != 2 or type(item[0]) is not int
                or not isinstance(item[1], str)):
            raise MessageError(f"each entry of {key} is [client id, base64]")
        out.append((item[0], item[1]))
    return out


def _ids(body: dict[str, Any], key: str) -> tuple[int, ...]:
    ids = _list(body, key)
    if not all(type(i) is int for i in ids) or len(set(ids)) != len(ids):
        raise MessageError(f"{key} is a list of distinct client ids")
    return tuple(ids)


def _begin(body: dict[str, Any]) -> Begin:
    clients = _ids(body, "clients")
    neighbors = _int(body, "neighbors", 1, MAX_CLIENTS)
    threshold = _int(body, "threshold", 2, MAX_CLIENTS)
    clip, scale, noise = body.get("clip"), body.get("scale"), body.get("noise", 0.0)
    max_workers = _int(body, "max_workers", 1, MAX_CLIENTS)
    stochastic, uniform = body.get("stochastic", False), body.get("uniform", False)
    for what, v in (("clip", clip), ("scale", scale), ("noise", noise)):
        if not (_is_number(v) and math.isfinite(v)):  # type: ignore[arg-type]
            raise MessageError(f"a secure round's {what} is a finite number, not {v!r:.40}")
    if type(stochastic) is not bool or type(uniform) is not bool:
        raise MessageError("a secure round's stochastic and uniform are true or false")
    config = RoundConfig(round_number=_int(body, "round_number"),
                         seed=_bytes(body.get("seed"), "the round seed", 32),
                         clients=clients, length=_int(body, "length", 1, (1 << 40)),
                         bits=_int(body, "bits", 16, 32), neighbors=neighbors,
                         threshold=threshold,
                         context=round_context(clip, scale, max_workers, stochastic,  # type: ignore[arg-type]
                                               noise, uniform))  # type: ignore[arg-type]
    if config.neighbors != neighbors:
        raise MessageError(f"a round of {len(clients)} clients cannot have {neighbors} "
                           "neighbours each")
    return Begin(config, _int(body, "you", 1), clip, scale, max_workers,  # type: ignore[arg-type]
                 stochastic, noise, uniform)  # type: ignore[arg-type]


def _abstain(body: dict[str, Any]) -> Abstain:
    reason = body.get("reason")
    if not isinstance(reason, str):
        raise MessageError("an abstention's reason is a string")
    clean = "".join(c if c.isprintable() else "?" for c in reason[:MAX_REASON])
    return Abstain(_int(body, "sender", 1), clean)


def _advert(body: dict[str, Any]) -> KeyAdvert:
    return KeyAdvert(_int(body, "sender", 1), _bytes(body.get("mask"), "a mask key", KEY_BYTES),
                     _bytes(body.get("enc"), "an encryption key", KEY_BYTES))


def _peers(body: dict[str, Any]) -> tuple[KeyAdvert, ...]:
    adverts = _list(body, "adverts")
    if not all(isinstance(a, dict) for a in adverts):
        raise MessageError("each advert is a JSON object")
    return tuple(_advert(a) for a in adverts)


def _shares(body: dict[str, Any]) -> ShareBundle:
    sender = _int(body, "sender", 1)
    return ShareBundle(sender, tuple(EncryptedShare(sender, r, _bytes(s, "a sealed share"))
                                     for r, s in _pairs(body, "shares")))


def _forward(body: dict[str, Any]) -> ForwardedShares:
    receiver = _int(body, "receiver", 1)
    return ForwardedShares(receiver, tuple(EncryptedShare(s, receiver, _bytes(b, "a sealed share"))
                                           for s, b in _pairs(body, "shares")))


def _unmask(body: dict[str, Any]) -> UnmaskRequest:
    return UnmaskRequest(frozenset(_ids(body, "survivors")), frozenset(_ids(body, "dropouts")))


def _reveal(body: dict[str, Any]) -> UnmaskReply:
    def shares(key: str) -> dict[int, bytes]:
        pairs = _pairs(body, key)
        out = {o: _bytes(s, "a share", SHARE_BYTES) for o, s in pairs}
        if len(out) != len(pairs):
            raise MessageError(f"{key} names a client twice")
        return out
    return UnmaskReply(_int(body, "sender", 1), shares("seed"), shares("key"))


_DECODERS = {"begin": _begin, "peers": _peers, "forward": _forward, "unmask": _unmask,
             "advert": _advert, "shares": _shares, "reveal": _reveal, "abstain": _abstain}
_KINDS: dict[str, Any] = {"begin": Begin, "peers": tuple, "forward": ForwardedShares,
                          "unmask": UnmaskRequest, "advert": KeyAdvert, "shares": ShareBundle,
                          "reveal": UnmaskReply, "abstain": Abstain}
