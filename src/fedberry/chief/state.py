"""The chief's round logic as a state machine that knows nothing of sockets.

Transports feed it events (a worker joined, sent its initial weights, sent an update, left, time
passed) and carry out the actions it returns (send the global model to these workers, send an
error, ask for initial weights). The same machine serves TCP, in-process and test workers.

Rounds: the chief collects updates for round ``round``. A round closes when

* every connected worker has sent its update, once the expected number of workers has been
  connected at the same time (the start barrier, so that round 0, or the first round after a
  resume, does not close with the first worker alone), or
* the deadline (``round_timeout`` after the round opened) has passed and at least
  ``min_workers`` updates are in.

Then the strategy's new global model is sent to the workers waiting for it. A worker that was
not waiting (still training, or joined late) gets the newest model when it next syncs: its update
for a closed round is dropped and it is told so. A worker is identified by its id, not its
connection, so a repeated update for a round (after a reconnect) counts once.

Client sampling (``chief.sampling``): with a ``SamplingPolicy``, each round draws its workers
among the connected ones when it opens (the first round once the start barrier is met). Only
they get the round's model; the others are parked, connected and idle, until a round draws them
(or the run is done: everyone gets the final model). "Every worker has sent" and the quorum then
count the sampled workers still connected; a round whose sampled workers have all left before
reporting is drawn again. A Poisson draw of nobody closes the round at once, model unchanged;
the next draw then waits as long as the last round with workers took, at most the round timeout
(``empty_draw_wait``): the machine asks for a tick at that time (``wake_at``), never sleeps.

Every update that would count passes the admission policy (``chief.admission``) first, and the
round's new model is committed only if it is finite: both live here because every transport's
updates end in ``Chief.update``. A refused update does not count, but its worker has reported
for the round (a round does not wait for it) and gets the round's model like the others.

Secure aggregation (``secure``, a ``SecAggOptions``): a worker's update is only its report that
it has reached its sync point (its sample count, no tensors). When the round would close, the
workers that reported become the participants of a ``chief.secure_round.SecureRound``, whose
steps the machine returns as ``SendSecure`` actions (and, to regenerate the masks off the
chief's thread, one ``Unmask``, whose outcome comes back in ``secure_unmasked``); what it
yields is the survivors' weighted sum, which enters the strategy as ONE update of their total
weight (exact for FedAvg, FedAvgM and FedAdam) and passes the admission like any other. A
secure round that fails keeps the model as it was, and the next round starts as usual.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedberry.chief.admission import Admission, AdmissionPolicy
from fedberry.chief.admission import non_finite as non_finite  # its home before admission.py
from fedberry.chief.sampling import SamplingPolicy
from fedberry.chief.secure_round import SecureRound, SendSecure, Sum, Unmask
from fedberry.protocol.frames import ErrorCode, Spec, spec_mismatch, spec_of
from fedberry.protocol.messages import SecAgg
from fedberry.secagg.errors import ConfigError as SecAggConfigError
from fedberry.secagg.errors import SecAggError
from fedberry.secagg.options import SecAggOptions
from fedberry.strategies import FedAvg, Strategy

# After a Poisson draw of nobody, the next draw waits as long as the last round that drew
# workers took (its draw to its close), at most the round timeout; before any such round, this
# many seconds (at most the round timeout). Without a wait, a tiny rate closes empty rounds in a
# tight loop: a run without --rounds wrote metrics lines as fast as the loop turned and held the
# event loop. Waiting the round timeout itself (as before) idled the whole federation for the
# worst case of a round, 10 minutes under a 600 s timeout, for each draw of nobody; at the pace
# of the real rounds, empty ones cost what a round costs, and their side effects (metrics
# lines, checkpoints, evaluations) come no faster than those of real ones.
EMPTY_DRAW_WAIT = 1.0
# ... and never less than this: rounds of in-process workers take milliseconds, and a tiny rate
# after one of them must still not close empty rounds faster than 20 a second.
MIN_EMPTY_DRAW_WAIT = 0.05


@dataclass
class ChiefConfig:
    workers: int = 1  # workers that must have joined before the first round can close
    rounds: int | None = None  # stop after this many rounds; None: until every worker has left
    min_workers: int = 1  # quorum for closing a round at its deadline
    round_timeout: float | None = None  # seconds; None: wait for every connected worker
    sampling: SamplingPolicy | None = None  # None: every connected worker takes part

    def __post_init__(self) -> None:
        if self.workers < 1 or self.min_workers < 1:
            raise ValueError("workers and min_workers must be at least 1")
        if self.min_workers > self.workers:
            raise ValueError("min_workers cannot exceed workers")
        if self.sampling is not None and not self.sampling.active:
            self.sampling = None
        if (self.sampling is not None and self.sampling.sample is not None
                and self.min_workers > self.sampling.sample):
            raise ValueError(f"min_workers ({self.min_workers}) cannot exceed --sample "
                             f"({self.sampling.sample}): no round could reach its quorum")
        if self.rounds is not None and self.rounds < 1:
            raise ValueError("rounds must be at least 1")


# -- actions ---------------------------------------------------------------------------------
@dataclass
class SendGlobal:
    """Send the current global model (round, done) to these workers."""

    worker_ids: list[str]


@dataclass
class SendError:
    worker_id: str
    code: ErrorCode
    message: str
    fatal: bool  # the transport closes the connection after a fatal error


@dataclass
class RequestInit:
    """The chief has no model yet: ask this worker for its initial weights."""

    worker_id: str


@dataclass
class RoundClosed:
    round: int  # rounds completed so far, 1 for the first
    workers: int  # updates aggregated
    num_samples: float
    train_loss: float | None
    worker_ids: list[str] = field(default_factory=list)
    sampled: int | None = None  # workers the round drew (None: no sampling)
    sample_rate: float | None = None  # the fraction of the connected workers it drew


@dataclass
class Finished:
    reason: str


@dataclass
class Recycle:
    """The strategy is done with these arrays of an update: their memory may take the next one."""

    arrays: list[np.ndarray]


Action = (SendGlobal | SendError | RequestInit | RoundClosed | Finished | Recycle | SendSecure
          | Unmask)

log = logging.getLogger("fedberry.chief")


def self_needs_all(strategy: Strategy | None) -> bool:
    """Whether ``strategy`` needs every update of a round (the median), not only their sum."""
    return bool(getattr(strategy, "needs_all_updates", False))


class Chief:
    def __init__(self, config: ChiefConfig, strategy: Strategy | None = None,
                 initial: Sequence[np.ndarray] | None = None, start_round: int = 0,
                 admission: Admission | AdmissionPolicy | None = None,
                 secure: SecAggOptions | None = None) -> None:
        self.config = config
        if secure is not None and self_needs_all(strategy):
            raise ValueError("secure aggregation gives the chief only the sum of the updates: a "
                             "strategy that needs every update (median, trimmed mean) cannot "
                             "run on it; use fedavg, fedavgm or fedadam")
        self.secure = secure
        self.secure_round: SecureRound | None = None
        self._ready: dict[str, float] = {}  # secure: worker -> its update's weight, this round
        self._ready_samples: dict[str, float] = {}  # ... and the samples it reported
        self.strategy: Strategy = strategy if strategy is not None else FedAvg()
        self.admission = (admission if isinstance(admission, Admission)
                          else Admission(admission))
        self.round = start_round
        self.global_arrays: list[np.ndarray] | None = None
        self.spec: Spec | None = None
        self.done = config.rounds is not None and start_round >= config.rounds
        self.members: set[str] = set()
        # Latched once ``workers`` are connected at the same time. Counting workers that ever
        # joined instead let one that came and went (a crash before the start, a probe after a
        # restart) stand in for a missing one, and the round closed with the first alone.
        self.started = False
        self._in_round: set[str] = set()
        self._refused: set[str] = set()  # reported this round, but the policy refused it
        self._waiting: set[str] = set()
        self._last_round_of: dict[str, int] = {}  # worker -> last round its update counted in
        self._loss_sum = 0.0
        self._loss_weight = 0.0
        self._samples = 0.0
        self._opened_at: float | None = None
        self._finished = False
        # Sampling (ChiefConfig.sampling): the workers of the open round (None: not drawn yet,
        # or no sampling), its rate, the workers held back from it, and redraws of the round.
        self.sampled: frozenset[str] | None = None
        self.sample_rate: float | None = None
        self._parked: set[str] = set()
        # Sent the open round's model when the last round closed, and not reconnected since:
        # a resent update that crossed that model needs no second one (``update``).
        self._served: set[str] = set()
        self._attempt = 0
        self._draw_at: float | None = None  # after an empty draw: when the next one may be
        self._pace: float | None = None  # seconds the last round that drew workers took
        if initial is not None:
            self._adopt(list(initial))

    # -- queries -----------------------------------------------------------------------------
    @property
    def idle(self) -> frozenset[str]:
        """Connected workers that client sampling left out: they wait, connected, for the
        model of a round that draws them (empty without sampling)."""
        return frozenset(self._parked & self.members)

    @property
    def deadline(self) -> float | None:
        if self.config.round_timeout is None or self._opened_at is None or self.done:
            return None
        return self._opened_at + self.config.round_timeout

    @property
    def empty_draw_wait(self) -> float:
        """Seconds from a Poisson draw of nobody to the next draw: the last round with workers'
        time, at most the round timeout (``EMPTY_DRAW_WAIT`` says why)."""
        wait = max(self._pace if self._pace is not None else EMPTY_DRAW_WAIT,
                   MIN_EMPTY_DRAW_WAIT)
        t = self.config.round_timeout
        return wait if t is None else min(wait, t)

    @property
    def wake_at(self) -> float | None:
        """When the machine next needs a ``tick`` (None: only on events): the next draw after
        an empty one, a secure round's step deadline, else the round's deadline."""
        if self.secure_round is not None:
            return self.secure_round.deadline
        if self._draw_at is not None and not self.done:
            return self._draw_at
        return self.deadline

    def pending(self) -> tuple[int, list[str]]:
        """This round so far: how many updates count, and the members it still waits for (the
        chief's progress line)."""
        if self.secure_round is not None:
            waiting = self.secure_round.waiting_for()
            return len(self.secure_round.ids) - len(waiting), waiting
        return len(self._in_round), sorted(self._expected() - self._in_round - self._refused)

    # -- events ------------------------------------------------------------------------------
    def join(self, worker_id: str, spec: Spec, now: float, want_model: bool = True) -> list[Action]:
        if self.spec is not None:
            why = spec_mismatch(self.spec, spec)
            if why:
                return [SendError(worker_id, ErrorCode.SPEC_MISMATCH,
                                  f"your model does not match the federation's: {why}", True)]
        self.members.add(worker_id)
        self._served.discard(worker_id)  # a new connection: what the old one got may be lost
        self.started = self.started or len(self.members) >= self.config.workers
        if self._opened_at is None:
            self._opened_at = now
        if self.global_arrays is None:
            return [RequestInit(worker_id)]
        if worker_id in self._in_round:
            self._waiting.add(worker_id)  # reconnected while waiting for this round's result
            return []
        if not (want_model or self.done):
            return []
        return [*self._give([worker_id]), *self._draw_if_due(now)]

    def init(self, worker_id: str, arrays: list[np.ndarray], now: float) -> list[Action]:
        if worker_id not in self.members:
            return [SendError(worker_id, ErrorCode.PROTOCOL,
                              "initial weights before joining", True)]
        if self.global_arrays is None:
            bad = non_finite(arrays)
            if bad:
                return [SendError(worker_id, ErrorCode.NON_FINITE,
                                  f"initial weights refused: {bad}", True)]
            self._adopt(arrays)
            # Everyone who joined while the chief had no model asked for one: answer them all.
            return [*self._give(sorted(self.members - self._in_round)),
                    *self._draw_if_due(now)]
        why = spec_mismatch(self.spec, spec_of(arrays))  # type: ignore[arg-type]
        if why:
            return [SendError(worker_id, ErrorCode.SPEC_MISMATCH,
                              f"your model does not match the federation's: {why}", True)]
        return []  # another worker's weights won; this one was already sent the global model

    def update(self, worker_id: str, round_: int, num_samples: float, arrays: list[np.ndarray],
               metrics: dict[str, Any], now: float, *, checked: bool = False,
               bad: str | None = None, stands_for: int = 1) -> list[Action]:
        """``checked``: the transport has already looked for NaN/Inf in these very arrays
        (``FrameDecoder.check_finite``), and ``bad`` is what it found. ``stands_for``: the
        workers a combined update sums (MPI), for the admission policy's sample bound."""
        if worker_id not in self.members or self.global_arrays is None:
            return [SendError(worker_id, ErrorCode.PROTOCOL, "update before joining", True)]
        if self.done:
            return [SendGlobal([worker_id])]
        # Bad numbers are refused whatever the round, so that the worker hears about them even
        # when its update was late anyway.
        refusal = self.admission.check_numbers(num_samples, arrays, checked=checked, bad=bad)
        if refusal:
            return [SendError(worker_id, refusal.code, refusal.message, refusal.fatal)]
        if self._last_round_of.get(worker_id) == round_:
            # A repeat after a reconnect: it counted once already.
            if round_ == self.round:
                self._waiting.add(worker_id)
                return []
            if worker_id in self._served:
                # It reconnected while waiting, the round closed and its model went out on
                # this connection, then the resend arrived: a second model would answer the
                # worker's NEXT update (it would skip a round).
                return []
            return self._give([worker_id])
        if round_ != self.round:
            when = ("arrived after it closed" if round_ < self.round else
                    "is ahead of the chief (did it restart from an older checkpoint?)")
            return [SendError(worker_id, ErrorCode.STALE,
                              f"update for round {round_} {when} (now round {self.round}); it "
                              "was dropped, the newest model follows", False),
                    *self._give([worker_id])]
        if not self._takes_part(worker_id):
            # Not drawn for this round (it was redrawn after its workers left, while this one
            # was reconnecting): counting it would break the sampling a privacy accountant
            # relies on. It waits, like the other idle workers, for a round that draws it.
            return [SendError(worker_id, ErrorCode.STALE,
                              f"update for round {round_} dropped: this worker is not among "
                              "the round's sampled workers; it gets the model of a round that "
                              "samples it", False),
                    *self._give([worker_id])]
        if self.secure is not None:
            return self._report(worker_id, round_, num_samples, metrics, now)
        # The relative sample bound (admission.cap_samples): the count it is weighed by.
        samples = self.admission.cap_samples(worker_id, num_samples, stands_for)
        refusal = self.admission.admit(worker_id, num_samples, arrays, stands_for=stands_for,
                                       weigh_as=samples)
        if refusal:
            self._refused.add(worker_id)
            self._waiting.add(worker_id)
            return [SendError(worker_id, refusal.code, refusal.message, refusal.fatal),
                    *self._maybe_close(now)]
        spare = self.strategy.add(arrays, self.admission.weight(samples, stands_for))
        self.admission.remember(worker_id, num_samples, stands_for)
        self._counts(worker_id, round_, samples, metrics)
        actions = self._maybe_close(now)
        if spare:  # a strategy of before returned None
            actions.append(Recycle(list(spare)))
        return actions

    def leave(self, worker_id: str, now: float) -> list[Action]:
        self.members.discard(worker_id)
        self._waiting.discard(worker_id)
        self._parked.discard(worker_id)
        if self.secure_round is not None:
            actions: list[Action] = [*self.secure_round.leave(worker_id, now),
                                     *self._secure_over(now)]
        else:
            actions = self._maybe_close(now)
        if not self.members and self.started and not self._finished:
            if self.done or self.config.rounds is None:
                self._finished = True
                actions.append(Finished("every worker has left"))
        return actions

    def tick(self, now: float) -> list[Action]:
        if self.secure_round is not None:
            return [*self.secure_round.tick(now), *self._secure_over(now)]
        if self._draw_at is not None and now >= self._draw_at:
            self._draw_at = None
            return self._draw_if_due(now)
        return self._maybe_close(now)

    # -- secure aggregation ------------------------------------------------------------------
    def secure_step(self, worker_id: str, message: SecAgg, now: float) -> list[Action]:
        """A worker's step of the open secure round (advert, shares, reveal)."""
        return self._secure_event(worker_id, now, lambda r: r.receive(worker_id, message, now))

    def masked(self, worker_id: str, round_: int, vector: Any, now: float) -> list[Action]:
        """A worker's masked update (one ring vector) for the open secure round."""
        return self._secure_event(worker_id, now,
                                  lambda r: r.receive_masked(worker_id, round_, vector, now))

    def secure_unmasked(self, of: SecureRound, outcome: Sum | BaseException,
                        now: float) -> list[Action]:
        """The outcome of secure round ``of``'s ``Unmask`` work (its sum, or the exception it
        raised); dropped if that round is over already (its deadline failed it)."""
        if self.secure_round is not of:
            return []
        of.unmasked(outcome)
        return self._secure_over(now)

    def _secure_event(self, worker_id: str, now: float, step: Any) -> list[Action]:
        if worker_id not in self.members:
            return [SendError(worker_id, ErrorCode.PROTOCOL, "a secure step before joining",
                              True)]
        if self.secure_round is None:
            # Late (the round has closed, and this worker had its model then): dropped, with
            # no answer: a worker that floods late steps must not become a flood of replies.
            log.debug("worker %s: a secure step after its round closed, dropped", worker_id)
            return []
        sends, refused = step(self.secure_round)
        actions: list[Action] = list(sends)
        if refused:
            actions.insert(0, SendError(worker_id, ErrorCode.SECAGG, refused, False))
        return actions + self._secure_over(now)

    def _report(self, worker_id: str, round_: int, num_samples: float, metrics: dict[str, Any],
                now: float) -> list[Action]:
        """Secure: a worker has reached its sync point of the open round."""
        too_many = self.admission.too_many_samples(num_samples)
        if too_many:
            self._refused.add(worker_id)
            self._waiting.add(worker_id)
            return [SendError(worker_id, ErrorCode.LIMIT, f"update of worker {worker_id} "
                              f"refused: {too_many}; the round goes on without it", False),
                    *self._maybe_close(now)]
        if self.secure_round is not None:
            self._waiting.add(worker_id)
            return [SendError(worker_id, ErrorCode.STALE, f"round {round_ + 1}'s secure "
                              "aggregation began without this worker; its update is not "
                              "counted, the newest model follows", False)]
        # Capped before the secure round: its weights (wire.weight_of) follow the capped counts.
        samples = self.admission.cap_samples(worker_id, num_samples)
        self.admission.remember(worker_id, num_samples)
        self._ready[worker_id] = self.admission.weight(samples)
        self._ready_samples[worker_id] = samples
        self._counts(worker_id, round_, samples, metrics)
        return self._maybe_close(now)

    def _counts(self, worker_id: str, round_: int, num_samples: float,
                metrics: dict[str, Any]) -> None:
        """``worker_id``'s update counts in this round (plain: it is in the strategy's sum;
        secure: it is a participant): the round's books."""
        self._refused.discard(worker_id)
        self._in_round.add(worker_id)
        self._waiting.add(worker_id)
        self._last_round_of[worker_id] = round_
        self._samples += num_samples
        loss = metrics.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            self._loss_sum += num_samples * loss
            self._loss_weight += num_samples

    @property
    def secure_clip(self) -> float:
        """The L2 bound every worker clips its weighted change to: the trust layer's
        ``max_update_norm`` when it has one (the chief cannot clip a masked update itself),
        else secure aggregation's ``clip``."""
        assert self.secure is not None
        bound = self.admission.norm_bound
        return float(bound) if bound is not None else self.secure.clip

    def _noise_share(self, quorum: int) -> float:
        """Distributed DP (a strategy whose noise the workers add: ``privacy.dp_fedavg``): the
        standard deviation of each worker's share, sized so that any ``quorum`` shares (the
        fewest a round may close with, its masked updates) sum to the noise of the sum."""
        std = getattr(self.strategy, "distributed_noise_std", None)
        return float(std) / math.sqrt(quorum) if std else 0.0

    def _open_secure(self, now: float) -> list[Action]:
        """The round would close: its reported workers become a secure round's participants."""
        assert self.secure is not None and self.spec is not None
        participants = {w: self._ready_samples[w] for w in sorted(self._in_round & self.members)}
        quorum = self.config.min_workers
        if self.config.sampling is not None and self.sampled is not None:
            quorum = min(quorum, max(1, len(self.sampled)))
        try:
            if len(participants) < 3:
                raise SecAggConfigError(
                    f"{len(participants)} worker(s) reported, and secure aggregation needs at "
                    "least 3 (with 2, each would learn the other's update from the sum)")
            secure = SecureRound(self.secure, self.round, participants, self.spec,
                                 self.secure_clip, quorum, now, noise=self._noise_share(quorum),
                                 uniform=self.admission.policy.uniform_weights)
            begins = secure.start()
        except SecAggError as exc:
            return self._secure_failed(f"round {self.round + 1}'s secure aggregation cannot "
                                       f"start: {exc}; the global model stays as it was", now)
        self.secure_round = secure
        return [*begins, *self._secure_over(now)]

    def _secure_over(self, now: float) -> list[Action]:
        """If the secure round has its sum (or has failed), fold it in and close the round."""
        r = self.secure_round
        if r is None or not r.over:
            return []
        self.secure_round = None
        if r.outcome is None:
            return self._secure_failed(r.failure or "failed", now, r.ids)
        assert self.global_arrays is not None
        out = r.outcome
        mean = out.total / out.weight
        new, at = [], 0
        for g in self.global_arrays:
            if g.dtype.kind == "f":
                change = mean[at:at + g.size].reshape(g.shape)
                new.append((g.astype(np.float64) + change).astype(g.dtype))
                at += g.size
            else:  # not aggregated securely (integer counters): the global model's stay
                new.append(g.copy())
        weight = sum(self._ready[w] for w in out.survivors)
        samples = sum(self._ready_samples[w] for w in out.survivors)
        refusal = self.admission.admit("(the secure sum)", samples, new,
                                       stands_for=len(out.survivors), clipped_apart=True)
        self._in_round = set(out.survivors)
        self._refused |= set(r.ids) - self._in_round
        if refusal:
            log.warning("round %d: the securely aggregated update is refused: %s",
                        self.round + 1, refusal.message)
            self._in_round = set()
        else:
            spare = self.strategy.add(new, weight)
            del spare  # fresh arrays: nothing to recycle
        log.info("round %d: secure sum of %d of %d workers unmasked", self.round + 1,
                 len(out.survivors), len(r.ids))
        return self._close(now)

    def _secure_failed(self, why: str, now: float, ids: Any = ()) -> list[Action]:
        log.warning("%s", why)
        told = sorted((set(ids) or self._in_round) & self.members)
        self._refused |= self._in_round
        self._in_round = set()
        self._loss_sum = self._loss_weight = 0.0
        return [*(SendError(w, ErrorCode.SECAGG, why, False) for w in told),
                *self._close(now, quiet=True)]

    # -- sampling ----------------------------------------------------------------------------
    def _takes_part(self, worker_id: str) -> bool:
        """Whether ``worker_id`` may have the open round's model: always without sampling and
        once the run is done; else when the round's draw chose it."""
        if self.config.sampling is None or self.done:
            return True
        return self.sampled is not None and worker_id in self.sampled

    def _give(self, worker_ids: list[str]) -> list[Action]:
        """The open round's model to those of ``worker_ids`` that take part; the others wait
        for the model of a round that draws them (parked, connected and idle)."""
        now_ids = [w for w in worker_ids if self._takes_part(w)]
        self._parked.update(w for w in worker_ids if w not in now_ids)
        return [SendGlobal(now_ids)] if now_ids else []

    def _draw_if_due(self, now: float) -> list[Action]:
        """Draw the open round's workers once the start barrier is met (the first round; or a
        round left with nobody connected to draw from) and send them its model."""
        if (self.config.sampling is None or self.sampled is not None or not self.started
                or self.done or self.global_arrays is None or not self.members
                or self._draw_at is not None):  # after an empty draw: a tick draws next
            return []
        return self._draw(now)

    def _draw(self, now: float) -> list[Action]:
        assert self.config.sampling is not None
        actions: list[Action] = []
        self._draw_at = None
        self.sampled, self.sample_rate = self.config.sampling.draw(
            self.members, self.round, self._attempt)
        self._opened_at = now  # the deadline runs from the draw
        log.info("round %d: sampled %d of %d connected workers", self.round + 1,
                 len(self.sampled), len(self.members))
        if not self.sampled:
            # Poisson drew nobody: the round closes at once, model unchanged, and the next
            # draw waits for a tick at ``wake_at`` (EMPTY_DRAW_WAIT says why).
            actions += self._close(now, draw_next=False)
            if not self.done:
                self._draw_at = now + self.empty_draw_wait
            return actions
        chosen = sorted(self._parked & self.sampled)
        self._parked -= self.sampled
        if chosen:
            actions.append(SendGlobal(chosen))
        return actions

    def _expected(self) -> set[str]:
        """The connected workers the open round waits for."""
        if self.config.sampling is None:
            return self.members
        return self.members & (self.sampled or frozenset())

    # -- internals ---------------------------------------------------------------------------
    def _adopt(self, arrays: list[np.ndarray]) -> None:
        self.global_arrays = arrays
        self.spec = spec_of(arrays)
        self.strategy.begin_round(arrays)
        self.admission.begin_round(arrays)

    def _maybe_close(self, now: float) -> list[Action]:
        n = len(self._in_round)
        sampling = self.config.sampling is not None
        if self.done:
            return []
        if not (self._in_round or self._refused):
            if (sampling and self.started and self.sampled and self.members
                    and not self._expected()):
                # Every sampled worker left before reporting: draw the round again among the
                # workers still here, so that it does not wait for nobody.
                self._attempt += 1
                return self._draw(now)
            return []
        # Refused workers have reported: the round waits for them no more than for the others.
        everyone = self.started and self._expected() <= (self._in_round | self._refused)
        quorum = self.config.min_workers
        if sampling and self.sampled is not None:
            quorum = min(quorum, max(1, len(self.sampled)))
        late = self.deadline is not None and now >= self.deadline and n >= quorum
        if not (everyone or late):
            return []
        if self.secure is not None:
            return [] if self.secure_round is not None else self._open_secure(now)
        return self._close(now)

    def _close(self, now: float, draw_next: bool = True, quiet: bool = False) -> list[Action]:
        if quiet:
            pass  # the caller has said why the model stays (a failed secure round)
        elif not self._in_round and self.sampled is not None and not self.sampled:
            log.info("round %d: no worker was sampled; the global model stays as it was",
                     self.round + 1)
        elif not self._in_round:
            log.warning("round %d: every update was refused; the global model stays as it was",
                        self.round + 1)
        else:
            new = self.strategy.result()
            bad = self.admission.check_model(new)
            if bad:
                # Not committed: a NaN model would be checkpointed and sent to everyone, and
                # no worker could train on from it. The strategies' own state (FedAvgM's
                # velocity, FedAdam's moments) is float64 and stays finite while the admitted
                # sum does: only the step's cast to the model's dtype can overflow.
                log.warning("round %d would make a non-finite global model (%s); it is not "
                            "committed, the previous model stays", self.round + 1, bad)
            else:
                self.global_arrays = new
        if self.sampled is None or self.sampled:  # a round that drew workers: the pace
            self._pace = None if self._opened_at is None else now - self._opened_at
        self.round += 1
        record = RoundClosed(self.round, len(self._in_round), self._samples,
                             self._loss_sum / self._loss_weight if self._loss_weight else None,
                             sorted(self._in_round),
                             None if self.sampled is None else len(self.sampled),
                             self.sample_rate)
        waiting = sorted(self._waiting & self.members)
        self.done = self.config.rounds is not None and self.round >= self.config.rounds
        self.strategy.begin_round(self.global_arrays)
        self.admission.begin_round(self.global_arrays, self.members)
        self._in_round, self._waiting, self._refused = set(), set(), set()
        self._ready, self._ready_samples = {}, {}
        self._loss_sum = self._loss_weight = self._samples = 0.0
        self._opened_at = now
        self._served = set()
        if self.config.sampling is None:
            actions: list[Action] = [record, SendGlobal(waiting)]
            self._served = set(waiting)
        elif self.done:  # the final model goes to everyone, idle or not
            everyone = sorted((self._parked | set(waiting)) & self.members)
            self._parked.clear()
            actions = [record, SendGlobal(everyone)]
        else:
            # The next round's workers: the waiting ones it did not draw join the idle.
            self._parked.update(waiting)
            self.sampled, self.sample_rate, self._attempt = None, None, 0
            actions = [record]
        if self.done and not self._finished:
            self._finished = True
            actions.append(Finished(f"{self.round} rounds done"))
        elif self.config.sampling is not None and draw_next:
            actions += self._draw_if_due(now)
        return actions
