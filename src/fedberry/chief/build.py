"""One way to assemble a chief, for every transport: round policy, output, resume.

``serve()`` (TCP and in-process workers) and the MPI transport's rank 0 both call
``build_chief_server``, so that resuming from a checkpoint, the check that the checkpoint fits
this run (``chief.resume.check_resumable``), the metrics file and the checkpoint policy are one
code path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedberry.chief import checkpoint as ckpt_io
from fedberry.chief.admission import AdmissionPolicy
from fedberry.chief.evaluation import FederatedEvaluation
from fedberry.chief.model_file import DEFAULT_SAVE_EVERY, FILE_NAME, ModelFile
from fedberry.chief.resume import check_resumable
from fedberry.chief.round_config import RoundConfig
from fedberry.chief.runtime import CHECKPOINT_ERROR_POLICIES, ChiefServer, Evaluate
from fedberry.chief.sampling import SamplingPolicy
from fedberry.chief.scheduler import Scheduler
from fedberry.chief.state import Chief, ChiefConfig
from fedberry.protocol.frames import spec_of
from fedberry.secagg.options import SecAggOptions
from fedberry.strategies import Strategy, make_strategy

log = logging.getLogger("fedberry.chief")


@dataclass
class RoundPolicy:
    """When rounds close and when the run ends.

    Parameters
    ----------
    workers : int
        Workers that must be connected at the same time before the first round (and the first
        round after a resume) can close.
    rounds : int or None
        Stop after this many rounds; None: run until every worker has left.
    min_workers : int
        Quorum: a round may close at its deadline with this many updates.
    round_timeout : float or None
        Seconds after a round opens at which it closes with the quorum; None: wait for every
        connected worker.
    finish_grace : float
        Seconds a finished chief waits for workers whose connection broke lately to reconnect
        and take the final model.
    sample, fraction, poisson, sample_seed
        Client sampling (``chief.sampling``): ``sample`` workers, or ``fraction`` of the
        connected ones, take part in each round (``poisson``: each independently with
        probability ``fraction``), drawn from ``sample_seed`` and the round; the others stay
        connected and idle. ``min_workers`` and the deadline apply to the drawn workers.
    evaluate_every : int or None
        Ask the workers that offer an evaluation (``Worker(evaluate=...)``) to evaluate the
        global model every this many rounds (and the final one); None: never
        (``chief.evaluation``).
    evaluate_timeout : float
        Seconds after a model goes out within which its evaluations must arrive; a later one
        is dropped, and the round's metrics line is written without it.
    """

    workers: int = 1
    rounds: int | None = None
    min_workers: int = 1
    round_timeout: float | None = None
    finish_grace: float = 30.0
    sample: int | None = None
    fraction: float | None = None
    poisson: bool = False
    sample_seed: int = 0
    evaluate_every: int | None = None
    evaluate_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.evaluate_every is not None and (type(self.evaluate_every) is not int
                                                or self.evaluate_every < 1):
            raise ValueError(f"evaluate_every must be a whole number of rounds >= 1, not "
                             f"{self.evaluate_every!r}")
        if not self.evaluate_timeout > 0:
            raise ValueError(f"evaluate_timeout must be positive, not {self.evaluate_timeout!r}")

    @property
    def sampling(self) -> SamplingPolicy | None:
        """The client sampling policy, or None when every connected worker takes part."""
        policy = SamplingPolicy(self.sample, self.fraction, self.poisson, self.sample_seed)
        return policy if policy.active else None

    def config(self) -> ChiefConfig:
        """The state machine's part of the policy (checks the numbers)."""
        return ChiefConfig(workers=self.workers, rounds=self.rounds,
                           min_workers=self.min_workers, round_timeout=self.round_timeout,
                           sampling=self.sampling)


@dataclass
class OutputOptions:
    """What the chief writes, and whether it continues a run it wrote before.

    Parameters
    ----------
    out_dir : str or os.PathLike or None
        ``metrics.jsonl`` (one line per round) goes here; None: kept in memory only.
    checkpoint : str or os.PathLike or None
        Checkpoint (global model, round, strategy state, run config) written atomically after
        every round; None: no checkpoint.
    resume : bool
        Continue from ``checkpoint``: its round, model and strategy state, after checking that
        it was written by a run of the same strategy and model. ``metrics.jsonl`` is appended to.
    run_config : dict
        Recorded in every checkpoint (the strategy's name is added).
    on_checkpoint_error : str
        A checkpoint that cannot be written (read-only or full disk, no file descriptor left):
        ``"stop"`` (default) ends the run with that sentence, sent to every worker in a fatal
        ERROR, and the chief fails with it; ``"warn"`` warns every round it happens, marks the
        round's metrics line ``"checkpoint": false`` and goes on (``chief.runtime``). A model
        file that cannot be written follows the same policy.
    save_every : int
        With ``out_dir``: the global model is written to ``out_dir/model.safetensors`` when the
        run finishes and every ``save_every`` rounds (default 10; 0: only at the end), named by
        the workers' tensor names (``chief.model_file``).
    """

    out_dir: str | os.PathLike | None = None
    checkpoint: str | os.PathLike | None = None
    resume: bool = False
    run_config: dict[str, Any] = field(default_factory=dict)
    on_checkpoint_error: str = "stop"
    save_every: int = DEFAULT_SAVE_EVERY

    def __post_init__(self) -> None:
        if self.on_checkpoint_error not in CHECKPOINT_ERROR_POLICIES:
            raise ValueError(f"on_checkpoint_error must be 'stop' or 'warn', not "
                             f"{self.on_checkpoint_error!r}")
        if type(self.save_every) is not int or self.save_every < 0:
            raise ValueError(f"save_every must be a whole number of rounds >= 0 (0: only at the "
                             f"end), not {self.save_every!r}")

    @property
    def model_path(self) -> Path | None:
        """Where the model file goes: ``out_dir/model.safetensors`` (None without ``out_dir``)."""
        return Path(self.out_dir) / FILE_NAME if self.out_dir else None


def build_chief_server(policy: RoundPolicy, output: OutputOptions, *,
                       strategy: str | Strategy = "fedavg",
                       initial: Sequence[np.ndarray] | None = None,
                       evaluate: Evaluate | None = None,
                       on_round: Callable[[dict[str, Any]], None] | None = None,
                       downlink: str = "none",
                       scheduler: Scheduler | None = None,
                       admission: AdmissionPolicy | None = None,
                       round_config: RoundConfig | None = None,
                       secure: SecAggOptions | None = None) -> ChiefServer:
    """The chief runtime for a run, resumed from its checkpoint if asked.

    Parameters
    ----------
    policy : RoundPolicy
        When rounds close and the run ends.
    output : OutputOptions
        Metrics, checkpoint, resume.
    strategy : str or Strategy
        The aggregation rule: an object (``FedAdam(lr=0.05, tau=1e-4)``, or one of your own
        implementing ``fedberry.strategies.Strategy``) or ``--strategy`` text
        (``"fedadam:lr=0.05,tau=1e-4"``; docs/strategies.md). Its name and hyperparameters go
        into every checkpoint and ``OUT/run.json``; ``resume`` refuses a checkpoint of another.
    initial : sequence of numpy arrays, optional
        The model to start from; None: the first worker's. On resume, the checkpoint's model
        replaces it (after checking that their tensors match).
    evaluate, on_round, downlink, scheduler
        As for ``ChiefServer``.
    admission : AdmissionPolicy, optional
        Which updates are admitted (``chief.admission``); None: the defaults (sample counts up
        to 1e9, no norm bound). Recorded in ``run_config`` under ``"admission"``.
    round_config : callable, optional
        ``config(round) -> dict`` sent with each round's model (``chief.round_config``).
    secure : SecAggOptions, optional
        Aggregate securely (docs/secure-aggregation.md): the chief sees only the sum of each
        round's updates. Recorded in ``run_config`` under ``"secure_aggregation"``.

    Returns
    -------
    ChiefServer
        Not yet bound to a loop or attached to a transport.

    Raises
    ------
    FileNotFoundError
        ``resume`` without a checkpoint file.
    ValueError
        The checkpoint was written by a run with another strategy or model, or the policy's
        numbers are out of range.
    """
    strat = make_strategy(strategy)
    config = policy.config()
    start_round = 0
    checkpoint = output.checkpoint
    if output.resume:
        if not checkpoint or not Path(checkpoint).exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        ck = ckpt_io.load(checkpoint)
        check_resumable(ck, checkpoint, strat,
                        spec_of(list(initial)) if initial is not None else None)
        initial, start_round = ck.arrays, ck.round
        strat.load_state_dict(ck.strategy_state)
        log.info("resuming from %s at round %d", checkpoint, start_round)
    # The strategy goes into every checkpoint, so that --resume can refuse a different one.
    admission = admission if admission is not None else AdmissionPolicy()
    run_config = {**output.run_config, "strategy": strat.name,
                  "admission": admission.record()}
    if config.sampling is not None:
        run_config["sampling"] = config.sampling.record()
    if secure is not None:
        run_config["secure_aggregation"] = dataclasses.asdict(secure)
    chief = Chief(config, strat, initial=initial, start_round=start_round, admission=admission,
                  secure=secure)
    # Differential privacy's strategy (privacy.dp_fedavg) sets the admission's norm bound each
    # round and reads its record of the norms: it is given the chief's one Admission.
    bind = getattr(strat, "bind_admission", None)
    if bind is not None:
        bind(chief.admission)
    return ChiefServer(chief, evaluate=evaluate,
                       out_dir=str(output.out_dir) if output.out_dir else None,
                       checkpoint_path=str(checkpoint) if checkpoint else None,
                       run_config=run_config, finish_grace=policy.finish_grace,
                       append_metrics=output.resume, on_round=on_round, downlink=downlink,
                       scheduler=scheduler, on_checkpoint_error=output.on_checkpoint_error,
                       model_file=(ModelFile(output.model_path, output.save_every)
                                   if output.model_path else None),
                       round_config=round_config,
                       worker_evaluation=FederatedEvaluation(policy.evaluate_every,
                                                             policy.evaluate_timeout)
                       if policy.evaluate_every else None)
