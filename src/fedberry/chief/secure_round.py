"""One round's secure aggregation on the chief: the SecAgg+ server behind deadlines, pure.

The round state machine (``chief.state``) opens one ``SecureRound`` when a secure round would
close (every expected worker has reached its sync point, or the quorum at the deadline): the
workers that reported are its participants, numbered 1..n in sorted order (Shamir's
x-coordinates). It then drives the four SecAgg+ steps (``secagg.server``) and returns what to
send as ``SendSecure`` actions; the runtime carries them out for every transport.

Each step closes as soon as every participant still connected has answered, or at its
deadline (``SecAggOptions.timeout`` after the step opened) with whoever has; a step that ends
with fewer answers than the threshold (or, for the masked updates, than ``--min-workers``)
fails the round with one sentence, and the state machine keeps the global model as it was. A
participant that leaves, or whose message is refused, is a dropout from then on: after its
masked update it stays in the sum (its self-mask is rebuilt from its neighbours' shares),
before it, out of it (its pairwise masks are removed with its rebuilt mask key).

What the chief learns is the ring sum of the survivors' encoded, clipped, sample-weighted
changes: ``result`` decodes it to their float sum and the sum of their weights, and nothing
about a single worker's change.

The unmasking's costly part (regenerating every survivor's self-mask and each dropout's
pairwise masks, a ChaCha20 stream as long as the model apiece: seconds for a large model and
many workers) is not done here: once every secret is rebuilt, the round returns an ``Unmask``
action whose ``work`` the runtime runs off the chief's thread, and hands its outcome back to
``unmasked``. Meanwhile the round takes no message, and its deadline still holds: a round
whose unmasking outlasts the step's timeout fails, and the outcome that comes later is dropped.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedberry.protocol.encodings import float_values
from fedberry.protocol.messages import SecAgg
from fedberry.protocol.spec import Spec
from fedberry.secagg import wire
from fedberry.secagg.errors import ConfigError, SecAggError, TooFewSurvivors
from fedberry.secagg.messages import (
    KeyAdvert,
    MaskedInput,
    RoundConfig,
    ShareBundle,
    UnmaskReply,
)
from fedberry.secagg.options import SecAggOptions
from fedberry.secagg.server import SecAggServer, Unmasking

log = logging.getLogger("fedberry.chief")


@dataclass
class SendSecure:
    """Send this secure-aggregation step to a worker."""

    worker_id: str
    message: SecAgg


@dataclass
class Unmask:
    """Run ``work()`` off the chief's thread (it returns a ``Sum``, or raises), then hand the
    outcome (or the exception) to the chief state's ``secure_unmasked`` with ``of``."""

    of: SecureRound
    work: Callable[[], Sum]


@dataclass
class Sum:
    """A secure round's outcome: the float64 sum of the survivors' weighted changes (flat, the
    model's float values in order), the sum of their weights, and who they are."""

    total: np.ndarray
    weight: float
    survivors: list[str]


#: What a secure round asks the runtime to do.
Step = SendSecure | Unmask


def majority_floor(config: object) -> int:
    """The smallest threshold a round may have (``wire.majority_threshold``)."""
    return wire.majority_threshold(config)  # type: ignore[arg-type]


class SecureRound:
    """The chief's side of one secure round (module docstring).

    ``participants``: worker id -> the sample count it reported at its sync point; each worker
    weighs itself by ``wire.weight_of`` of it (1 each under ``uniform``). ``clip``: the L2
    bound every worker clips its change to. ``quorum``: the fewest masked updates the round may
    close with (``--min-workers``). ``noise``: the standard deviation of each worker's share of
    differential privacy's noise (0: none), which it adds before masking.
    """

    def __init__(self, options: SecAggOptions, round_: int, participants: dict[str, float],
                 spec: Spec, clip: float, quorum: int, now: float, noise: float = 0.0,
                 uniform: bool = False) -> None:
        self.options = options
        self.round = round_
        self.ids = {w: i + 1 for i, w in enumerate(sorted(participants))}
        self.workers = {i: w for w, i in self.ids.items()}
        self.scale = max(participants.values())
        self.uniform = uniform
        self.weights = {w: wire.weight_of(n, self.scale, uniform)
                        for w, n in participants.items()}
        self.clip = clip
        self.noise = noise
        self.stochastic = options.rounding == "stochastic"
        context = wire.round_context(clip, self.scale, options.max_workers, self.stochastic,
                                     noise, uniform)
        self.config = options.round_config(round_, tuple(sorted(self.workers)),
                                           float_values(spec), context=context)
        self._check_majority(self.config)
        self.encoding = options.encoding(wire.encoding_range(clip, noise))
        self.server = SecAggServer(self.config)
        self.quorum = quorum
        self.gone: set[int] = set()  # left, refused or abstained: no answer is awaited
        self.deadline = now + options.timeout
        self.failure: str | None = None
        self.outcome: Sum | None = None
        self.unmasking = False  # the Unmask work is out: no message is taken until it is back

    @staticmethod
    def _check_majority(config: RoundConfig) -> None:
        floor = majority_floor(config)
        if config.threshold is not None and config.threshold < floor:
            # The workers refuse it (transports.secure_sync): say so once, here.
            raise ConfigError(f"the threshold {config.threshold} is below a majority of each "
                              f"worker's group ({floor} of {config.neighbors + 1}), which "
                              "would let a chief unmask a single update; workers refuse it")

    @classmethod
    def check_threshold(cls, options: SecAggOptions, workers: int) -> None:
        """Refuse ``options`` whose threshold no round of ``workers`` could use (``serve``
        checks at start rather than failing every round)."""
        cls._check_majority(options.round_config(0, tuple(range(1, workers + 1)), 1))

    @property
    def over(self) -> bool:
        """The round has its sum, or has failed."""
        return self.outcome is not None or self.failure is not None

    @property
    def step(self) -> str:
        """What the round is collecting: adverts, shares, masked, unmask, or done."""
        return self.server.phase

    def waiting_for(self) -> list[str]:
        """The participants the current step still waits for."""
        return sorted(self.workers[i] for i in self.server.waiting_for - self.gone)

    # -- events ----------------------------------------------------------------------------------
    def start(self) -> list[SendSecure]:
        """Tell every participant the round's parameters and its id."""
        log.info("round %d: secure aggregation over %d workers (%d neighbours each, threshold "
                 "%d, %d-bit ring)", self.round + 1, len(self.ids), self.config.neighbors,
                 self.config.threshold, self.config.bits)
        return [self._send(w, wire.Begin(self.config, i, self.clip, self.scale,
                                         self.options.max_workers, self.stochastic, self.noise,
                                         self.uniform))
                for w, i in sorted(self.ids.items())]

    def receive(self, worker_id: str, message: SecAgg, now: float) -> tuple[list[Step],
                                                                            str | None]:
        """A participant's advert, shares or reveal. Returns what to send, and the sentence
        refusing this worker's message (its part in the round is then over) or None."""
        i = self.ids.get(worker_id)
        if i is None or self.over or i in self.gone or self.unmasking:
            # Not (or no longer) in the round: dropped without an answer (one refusal per
            # worker and round is said; a flood of steps is not answered one by one).
            return [], None
        payload = message.payload
        try:
            if message.round != self.round:
                raise SecAggError(f"the step is for round {message.round + 1}, this is round "
                                  f"{self.round + 1}")
            if getattr(payload, "sender", i) != i:
                raise SecAggError(f"it speaks for client {payload.sender}; this worker is client "
                                  f"{i} of the round")
            if isinstance(payload, wire.Abstain):
                log.info("round %d: worker %s takes no further part: %s", self.round + 1,
                         worker_id, payload.reason)
                self.gone.add(i)
            elif isinstance(payload, KeyAdvert):
                self.server.receive_advert(payload)
            elif isinstance(payload, ShareBundle):
                self.server.receive_shares(payload)
            elif isinstance(payload, UnmaskReply):
                self.server.receive_unmask(payload)
            else:  # the connection lets only the workers' steps through
                raise SecAggError(f"a worker cannot send {message.step}")
        except SecAggError as exc:
            self.gone.add(i)
            return self._advance(now), f"secure step refused: {exc}"
        return self._advance(now), None

    def receive_masked(self, worker_id: str, round_: int, vector: np.ndarray,
                       now: float) -> tuple[list[Step], str | None]:
        """A participant's masked update, added into the round's ring sum at once."""
        i = self.ids.get(worker_id)
        if i is None or self.over or i in self.gone or self.unmasking:
            return [], None  # as in receive: not in the round, not answered
        try:
            if round_ != self.round:
                raise SecAggError(f"it is for round {round_ + 1}, this is round {self.round + 1}")
            self.server.receive_masked(MaskedInput(i, vector))
        except SecAggError as exc:
            self.gone.add(i)
            return self._advance(now), f"masked update refused: {exc}"
        return self._advance(now), None

    def leave(self, worker_id: str, now: float) -> list[Step]:
        """A participant is gone: a dropout from now on."""
        i = self.ids.get(worker_id)
        if i is None or self.over:
            return []
        self.gone.add(i)
        return self._advance(now)

    def tick(self, now: float) -> list[Step]:
        """At the step's deadline: close it with whoever has answered."""
        if self.over or now < self.deadline:
            return []
        if self.unmasking:
            self._fail(f"its unmasking took longer than the step's timeout "
                       f"({self.options.timeout:g} s; it runs on the chief's work thread, "
                       "after the previous round's evaluation and checkpoint)")
            return []
        waiting = self.waiting_for()
        if waiting:
            log.warning("round %d: secure step '%s' closes at its deadline without %s",
                        self.round + 1, self.step, ", ".join(waiting[:8]) +
                        (f" and {len(waiting) - 8} more" if len(waiting) > 8 else ""))
        return self._advance(now, force=True)

    # -- internals -------------------------------------------------------------------------------
    def _send(self, worker_id: str, payload: object) -> SendSecure:
        return SendSecure(worker_id, SecAgg(self.round, payload))

    def _advance(self, now: float, force: bool = False) -> list[Step]:
        """Close every step whose answers are all in (or, ``force``, the current one at its
        deadline) and return what the next steps send."""
        out: list[Step] = []
        server = self.server
        while not self.over and not self.unmasking and \
                (force or not (server.waiting_for - self.gone)):
            force = False
            try:
                out += self._close_step()
            except TooFewSurvivors as exc:
                self._fail(str(exc))
            except SecAggError as exc:  # a holder's share that rebuilds nothing, or no key
                self._fail(f"the round's sum cannot be unmasked: {exc}")
            self.deadline = now + self.options.timeout
        return out

    def unmasked(self, outcome: Sum | BaseException) -> None:
        """The ``Unmask`` work's outcome: the round's sum, or why it has none."""
        if not self.unmasking or self.over:
            return  # failed meanwhile (its deadline): the late outcome is dropped
        self.unmasking = False
        if isinstance(outcome, Sum):
            self.outcome = outcome
        elif isinstance(outcome, SecAggError):
            self._fail(f"the round's sum cannot be unmasked: {outcome}")
        else:  # not a refusal: a fault, said with its type rather than lost on another thread
            log.error("round %d: the secure unmasking raised %r", self.round + 1, outcome)
            self._fail(f"its unmasking failed ({type(outcome).__name__}: {outcome})")

    def _close_step(self) -> list[Step]:
        server, live = self.server, lambda c: c not in self.gone
        step = server.phase
        if step == "adverts":
            peers = server.close_adverts()
            return [self._send(self.workers[c], adverts) for c, adverts in peers.items()
                    if live(c)]
        if step == "shares":
            forwarded = server.close_shares()
            return [self._send(self.workers[c], f) for c, f in forwarded.items() if live(c)]
        if step == "masked":
            count = len(server.survivors)
            if count < self.quorum:
                raise TooFewSurvivors(f"only {count} masked update(s) came in, fewer than "
                                      f"--min-workers {self.quorum}: the round cannot finish")
            request = server.close_masked()
            return [self._send(self.workers[c], request) for c in sorted(request.survivors)
                    if live(c)]
        # unmask: every secret rebuilt here (raises TooFewSurvivors with too few reveals), the
        # masks regenerated off the chief's thread (module docstring)
        unmasking = server.unmasking()
        self.unmasking = True
        return [Unmask(self, functools.partial(self._sum_of, unmasking))]

    def _sum_of(self, unmasking: Unmasking) -> Sum:
        """Off the chief's thread: the masks out of the ring sum, decoded and checked. Reads
        only what no event changes (the ids, weights, encoding and bounds of the round)."""
        result = unmasking.run()
        survivors = [self.workers[c] for c in result.survivors]
        total = self.encoding.decode_sum(result.ring_sum, len(survivors))
        weight = sum(self.weights[w] for w in survivors)
        if not weight > 0:
            raise SecAggError("the survivors' weights sum to nothing (their sample counts are "
                              "negligible next to the round's largest)")
        reach = self.reach(len(survivors), weight, total.size)
        norm = float(np.linalg.norm(total))
        if not norm <= reach:
            # A worker put a vector outside its range into its masked update (the chief
            # cannot see whose): what survivors clipped to C can sum to is bounded.
            raise SecAggError(f"the unmasked sum has norm {norm:.4g}, more than the "
                              f"survivors' clipped updates can reach ({reach:.4g}): a worker "
                              "sent a vector outside its range, and the sum is refused")
        return Sum(total, weight, survivors)

    def reach(self, count: int, weight: float, length: int) -> float:
        """The largest L2 norm the sum of ``count`` honest contributions of total weight
        ``weight`` can have: the weighted clips (triangle inequality), plus the ring's rounding
        (s/2 per coordinate and worker), plus their noise shares' sum beyond 8 standard
        deviations of its chi tail (probability below 1e-14)."""
        rounding = count * self.encoding.step / 2 * np.sqrt(length)
        noise = self.noise * np.sqrt(count) * (np.sqrt(length) + 8.0)
        return weight * self.clip + rounding + noise

    def _fail(self, why: str) -> None:
        self.failure = (f"round {self.round + 1}'s secure aggregation failed: {why}; the global "
                        "model stays as it was, and no single update was revealed")
