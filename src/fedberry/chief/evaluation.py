"""Evaluation on the workers: the chief asks, the workers evaluate the global model on their own
held-out data, the chief averages what they report.

Every ``evaluate_every`` rounds (and for the final model), the round's GLOBAL asks for an
evaluation (``evaluate: true`` in its metadata, the same bytes for every worker). A worker that
offers one (its AUTH said ``evaluates``: ``Worker(evaluate=fn)``) answers with an EVAL_RESULT of
``num_examples`` and its metrics (at most ``MAX_METRICS`` finite numbers, checked by the
protocol). Workers that offer none are not waited for.

The chief collects the answers for each such round until every worker it asked has answered (or
left), or ``timeout`` seconds after the model went out; a later answer is dropped. The round's
metrics line waits for that (lines stay in round order) and carries the result as
``federated_eval``: ``{"workers": k, "num_examples": N, <key>: mean, ...}``, each key the mean
weighted by the examples of the workers that reported it (a key only some report is averaged
over those).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

log = logging.getLogger("fedberry.chief")


def weighted_means(reports: Iterable[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """Each metric key's mean over the reports that have it, weighted by their examples."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in reports:
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + n * value
            weights[key] = weights.get(key, 0.0) + n
    return {k: sums[k] / weights[k] for k in sums}


@dataclass
class RoundEvaluation:
    """The answers for one round's model."""

    round: int
    deadline: float  # time.monotonic() after which answers are dropped
    asked: set[str] = field(default_factory=set)
    reports: dict[str, tuple[float, dict[str, float]]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.asked <= self.reports.keys()

    def summary(self) -> dict[str, float] | None:
        """``federated_eval`` for the metrics line, or None if nobody answered."""
        if not self.reports:
            return None
        total = sum(n for n, _ in self.reports.values())
        return {"workers": len(self.reports), "num_examples": total,
                **weighted_means(self.reports.values())}


class FederatedEvaluation:
    """The chief's record of evaluations asked and answered (module docstring).

    ``every``: ask every this many rounds (rounds >= 1; and always for the final model).
    ``timeout``: seconds after a model goes out within which answers count.
    """

    # Rounds whose answers are awaited at once: the metrics line of a round waits at most
    # ``timeout`` for its answers, so a few are open at a time; bounded all the same.
    MAX_OPEN = 16

    def __init__(self, every: int, timeout: float) -> None:
        if every < 1 or not timeout > 0:
            raise ValueError("evaluate_every must be >= 1 and evaluate_timeout positive")
        self.every = every
        self.timeout = timeout
        self.open: dict[int, RoundEvaluation] = {}

    def asks(self, round_: int, done: bool) -> bool:
        """Whether the GLOBAL of ``round_`` asks for evaluations."""
        return round_ >= 1 and (done or round_ % self.every == 0)

    def sent(self, round_: int, worker_ids: Iterable[str], now: float) -> None:
        """The model of ``round_`` went to these workers, which evaluate: await their answers."""
        ids = set(worker_ids)
        if not ids:
            return
        ev = self.open.get(round_)
        if ev is None:
            if len(self.open) >= self.MAX_OPEN:
                oldest = min(self.open)
                log.warning("round %d: its evaluations are dropped: too many rounds await "
                            "theirs", oldest)
                del self.open[oldest]
            ev = self.open[round_] = RoundEvaluation(round_, now + self.timeout)
        ev.asked |= ids

    def report(self, worker_id: str, round_: int, num_examples: float,
               metrics: dict[str, float], now: float) -> bool:
        """An answer; False (dropped) when its round is not awaited any more."""
        ev = self.open.get(round_)
        if ev is None or now > ev.deadline:
            log.info("worker %s: its evaluation of round %d came too late and is dropped",
                     worker_id, round_)
            return False
        ev.reports[worker_id] = (num_examples, dict(metrics))
        ev.asked.add(worker_id)  # a worker that joined after the broadcast may answer too
        return True

    def refused(self, worker_id: str, round_: int) -> None:
        """The answer of ``worker_id`` for ``round_`` was refused: not counted, not waited for."""
        ev = self.open.get(round_)
        if ev is not None:
            ev.reports.pop(worker_id, None)
            ev.asked.discard(worker_id)

    def left(self, worker_id: str) -> None:
        """A worker left: the rounds it was asked for wait for it no more (what it sent
        counts)."""
        for ev in self.open.values():
            if worker_id not in ev.reports:
                ev.asked.discard(worker_id)

    def pending(self, round_: int, now: float) -> bool:
        """Whether the metrics line of ``round_`` should still wait for answers."""
        ev = self.open.get(round_)
        return ev is not None and not ev.complete and now <= ev.deadline

    def take(self, round_: int) -> dict[str, float] | None:
        """Close ``round_``'s evaluation, and any of earlier rounds still open (a worker that
        joined after their lines were written was asked too): the summary of ``round_``
        (None if nobody answered)."""
        for r in [r for r in self.open if r < round_]:
            del self.open[r]
        ev = self.open.pop(round_, None)
        return None if ev is None else ev.summary()

    def deadline(self, round_: int) -> float | None:
        """When the answers for ``round_`` stop counting (None: none awaited)."""
        ev = self.open.get(round_)
        return None if ev is None else ev.deadline
