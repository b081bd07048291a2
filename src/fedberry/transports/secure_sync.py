"""A worker's side of one secure round, pure: the chief's steps in, the worker's answers out.

A transport that carries secure aggregation (TCP) makes one ``SecureSync`` per update, from the
weights the worker trained and the global model it trained from, and hands it each SECAGG step
the chief sends while the worker waits for the round's model: ``begin`` (the round's parameters)
is answered with the key advert, ``peers`` with the sealed shares, ``forward`` with the masked
update (a MASKED frame), ``unmask`` with the reveal. The worker's change never leaves in the
clear: it is clipped to the round's bound, weighted, encoded in the ring and masked here.

What a worker refuses, with a sentence (``SecAggError``; its part in the round is then over and
it waits for the model like the others): a round below the majority threshold of its group
(which would let the chief split the group), a request for both kinds of share of a peer, a
step out of order or for another round (``secagg.client``).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

from fedberry.protocol.messages import Masked, SecAgg
from fedberry.secagg import wire
from fedberry.secagg.client import SecAggClient
from fedberry.secagg.encoding import FixedPoint, clip_l2
from fedberry.secagg.errors import MessageError, SecAggError, UnsafeRequest
from fedberry.secagg.messages import ForwardedShares, UnmaskRequest


class SecureSync:
    """One secure update of a worker: ``answer(step)`` for each step the chief sends.

    ``arrays``: the weights after local training; ``reference``: the global model they were
    trained from (the change between them is what is aggregated, float tensors only);
    ``num_samples``: what the worker reported, from which it weighs its own change.

    Threads: ``answer`` (and ``abstain``) may run on any thread, one call at a time; the
    object touches only its own state and reads the arrays it was given, which must not be
    written until the round's model has come (``TcpSession`` answers on its secure-step
    thread while the worker's caller waits in ``sync``).
    """

    def __init__(self, round_: int, arrays: Sequence[np.ndarray],
                 reference: Sequence[np.ndarray], num_samples: float) -> None:
        self.round = round_
        self.num_samples = float(num_samples)
        self._you: int | None = None  # this worker's id in the round, once a begin named it
        # The change itself is taken in the mask step (``_encode``), which the transport runs
        # off its event loop: for a large model it is a pass over two float64 copies.
        self._floats = [(a, r) for a, r in zip(arrays, reference)
                        if np.dtype(a.dtype).kind == "f"]
        self._length = sum(int(np.size(a)) for a, _ in self._floats)
        self._client: SecAggClient | None = None
        self._begin: wire.Begin | None = None
        self.done = False  # its part is over: revealed, or refused

    def abstain(self, reason: str) -> SecAgg | None:
        """The step that tells the chief this worker takes no further part (after a refusal),
        so that the chief need not wait for the step's deadline; None before any begin."""
        if self._you is None:
            return None
        return SecAgg(self.round, wire.Abstain(self._you, reason[:wire.MAX_REASON]))

    def answer(self, message: SecAgg) -> SecAgg | Masked | None:
        """The answer to one of the chief's steps (None: nothing to send). Raises
        ``SecAggError`` with the sentence when the worker refuses; it answers nothing more."""
        try:
            return self._answer(message)
        except SecAggError:
            self.done = True
            raise

    def _answer(self, message: SecAgg) -> SecAgg | Masked | None:
        if self.done:
            raise MessageError("this worker's part in the secure round is over")
        if message.round != self.round:
            raise MessageError(f"a secure step for round {message.round + 1} while this worker "
                               f"sends its update of round {self.round + 1}")
        payload = message.payload
        if isinstance(payload, wire.Begin):
            return self._start(payload)
        client, begin = self._client, self._begin
        if client is None or begin is None:
            raise MessageError(f"the secure step '{message.step}' came before the round began")
        if isinstance(payload, tuple):  # the neighbours' adverts
            return SecAgg(self.round, client.share_keys(payload))
        if isinstance(payload, ForwardedShares):
            encoded = self._encode(begin)
            masked = client.mask(payload, encoded)
            return Masked(self.round, (masked.vector,), f"ring{begin.config.bits}")
        if isinstance(payload, UnmaskRequest):
            reply = client.unmask(payload)
            self.done = True
            return SecAgg(self.round, reply)
        raise MessageError(f"a worker does not answer the step '{message.step}'")

    def _start(self, begin: wire.Begin) -> SecAgg:
        if self._client is not None:
            raise MessageError("the secure round began twice")
        self._you = begin.you
        config = begin.config
        if config.length != self._length:
            raise MessageError(f"the round aggregates {config.length} values; this worker's "
                               f"model has {self._length} float values")
        floor = wire.majority_threshold(config)
        if config.threshold < floor:
            raise UnsafeRequest(f"the chief set the threshold to {config.threshold}, below a "
                                f"majority of this worker's group ({floor} of "
                                f"{config.neighbors + 1}): a chief could then unmask a single "
                                "worker's update; this worker does not take part")
        self._begin = begin
        self._client = SecAggClient(config, begin.you)
        return SecAgg(self.round, self._client.advertise())

    def _encode(self, begin: wire.Begin) -> np.ndarray:
        """The change, clipped to the round's bound, weighted, noised (distributed DP), in
        the ring."""
        change = (np.concatenate([(np.asarray(a, np.float64) - np.asarray(r, np.float64))
                                  .ravel() for a, r in self._floats]) if self._floats
                  else np.zeros(0))
        x = clip_l2(change, begin.clip) * begin.weight_of(self.num_samples)
        del change
        if begin.noise > 0:
            # This worker's share of the round's Gaussian noise: the survivors' shares sum to
            # at least the noise the accountant charges (privacy.dp_fedavg), and the chief
            # never sees the sum without them. Seeded from the OS, like the chief's own noise.
            x += np.random.default_rng(secrets.randbits(128)).normal(0.0, begin.noise, x.size)
        span = begin.range
        fp = FixedPoint(clip=span, bits=begin.config.bits, max_workers=begin.max_workers,
                        stochastic=begin.stochastic)
        rng = np.random.default_rng() if begin.stochastic else None
        # Weighted by at most 1 after clipping, every coordinate is within the clip, and its
        # noise within 8 standard deviations but once in 10^15 (wire.NOISE_TAILS); np.clip
        # guards that tail and the last ulp of float rounding.
        return fp.encode(np.clip(x, -span, span), rng)
