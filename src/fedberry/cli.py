"""The ``fedberry`` command: chief, worker, demo, export, certs, bench."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from fedberry import __version__
from fedberry.chief.admission import (
    DEFAULT_MAX_SAMPLE_RATIO,
    DEFAULT_MAX_SAMPLES,
    NORM_MODES,
    AdmissionPolicy,
)
from fedberry.chief.model_file import DEFAULT_SAVE_EVERY, FILE_NAME
from fedberry.chief.round_config import parse_schedule
from fedberry.cli_config import add_config_options, parse_args
from fedberry.codecs import DOWNLINK_CODECS, UPLINK_CODECS
from fedberry.demo.torch_demo import TrainConfig
from fedberry.errors import FederationError
from fedberry.privacy import DPConfig, parse_dp
from fedberry.privacy.accountant import epsilon
from fedberry.secagg.options import SecAggOptions
from fedberry.strategies import STRATEGIES, parse

log = logging.getLogger("fedberry.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where there is none to show (None, off)
    or the help text already says what the default means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS
                or default == [] or "default" in text):
            return text
        return super()._get_help_string(action)


def _common_options(top: bool) -> argparse.ArgumentParser:
    """-v/-q/--log-file, for the top-level parser (``top``) and every subcommand (they are
    given before the subcommand or after it). The subcommand's have other dests and no
    defaults, so that a subparser does not overwrite what was given before it; ``main`` adds
    the two up."""
    suffix, default = ("0", 0) if top else ("", argparse.SUPPRESS)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="count", dest=f"verbose{suffix}",
                   default=default,
                   help="more log lines: -v debug lines from fedberry and an error's traceback, "
                        "-vv debug lines from every library (default: INFO, what is happening)")
    p.add_argument("-q", "--quiet", action="count", dest=f"quiet{suffix}", default=default,
                   help="fewer log lines: -q warnings and errors only, -qq errors only")
    p.add_argument("--log-file", metavar="PATH", dest=f"log_file{suffix}",
                   default=None if top else argparse.SUPPRESS,
                   help="also append the log lines to PATH (with dates)")
    return p


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: the common options, the help formatter. Subcommands defined
    elsewhere (certs, bench, ...) get both too, through ``add_subparsers(parser_class=)``; an
    option of theirs with the same name as a common one takes its place (bench's --quiet)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        # A parent of its own: "resolve" edits the parent's actions in place.
        kwargs["parents"] = [*kwargs.get("parents", ()), _common_options(top=False)]
        kwargs.setdefault("conflict_handler", "resolve")
        super().__init__(**kwargs)


def _add_train_options(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, choices=["mlp", "cnn"],
                   help="the demo's model")
    p.add_argument("--partition-scheme", default=d.partition_scheme,
                   help="iid, dirichlet:ALPHA (label skew) or shards[:K] (the FedAvg paper's)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the model, the partition and the batches")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="local batch size")
    p.add_argument("--lr", type=float, default=d.lr, help="local SGD learning rate")
    p.add_argument("--sync-every", type=int, default=None,
                   help="local steps between averagings (default: one pass over local data)")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist, "
                        "Debian package dataset-fashion-mnist)")
    p.add_argument("--framework", default=d.framework, choices=["torch", "keras"],
                   help="what the worker trains with (keras: set KERAS_BACKEND=torch or jax)")
    p.add_argument("--codec", default=d.codec, choices=list(UPLINK_CODECS),
                   help="how updates travel: none, fp16 (half the bytes) or q8 (the change since "
                        "the global model in 8 bits with error feedback: a quarter)")


def _add_downlink_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--downlink", default="none", choices=list(DOWNLINK_CODECS),
                   help="how the global model travels to the workers: none, fp16 (half the "
                        "bytes) or q8 (the change since the last round in 8 bits: a quarter); "
                        "the chief keeps the model exactly as the workers decode it")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _add_token_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="shared secret (prefer --token-file or FEDBERRY_TOKEN: "
                                   "arguments are visible in the process list)")
    p.add_argument("--token-file", help="file holding the shared secret")


def _add_chief_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chief", help="run a chief (aggregator) that workers dial")
    p.add_argument("--listen", default="0.0.0.0:7777",
                   help="address to bind, HOST:PORT (workers may dial another, public address); "
                        "mpi:// as rank 0 of an mpiexec launch")
    p.add_argument("--workers", type=int, required=True,
                   help="workers to wait for before the first round closes")
    p.add_argument("--rounds", type=int, default=None,
                   help="stop after this many rounds (default: none, the chief runs until "
                        "stopped: Ctrl-C or SIGTERM ends the run, telling the workers; "
                        "--resume continues it from the checkpoint)")
    p.add_argument("--min-workers", type=int, default=1,
                   help="quorum: a round may close at its deadline with this many updates")
    p.add_argument("--round-timeout", type=float, default=None,
                   help="seconds after which a round closes with the quorum")
    p.add_argument("--finish-grace", type=float, default=30.0, metavar="S",
                   help="seconds a finished chief waits for workers whose connection broke "
                        "lately to reconnect and take the final model")
    p.add_argument("--strategy", default="fedavg", type=_strategy_text, metavar="NAME[:K=V,...]",
                   help=f"aggregation rule ({', '.join(sorted(STRATEGIES))}) with its "
                        "hyperparameters, e.g. fedadam:lr=0.05,tau=1e-4 or trimmed_mean:trim=1: "
                        "fedavg (sample-weighted mean), fedavgm/fedadam (server momentum/Adam), "
                        "median/trimmed_mean (robust to poisoned updates, memory O(model x "
                        "workers)); see docs/strategies.md")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn", "none"],
                   help="the chief's initial model and test-set evaluation ('none': a pure "
                        "aggregator that adopts the first worker's model and evaluates nothing)")
    p.add_argument("--seed", type=int, default=0, help="seeds the chief's initial model")
    p.add_argument("--framework", default="torch", choices=["torch", "keras"],
                   help="the workers' framework: the model's tensor layout differs")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST IDX files for the evaluation (default "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default="runs/chief", help="metrics.jsonl and checkpoint go here")
    p.add_argument("--checkpoint", default=None, help="default: OUT/checkpoint.npz")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--save-every", type=int, default=DEFAULT_SAVE_EVERY, metavar="N",
                   help="write the model to OUT/model.safetensors every N rounds (default "
                        f"{DEFAULT_SAVE_EVERY}; 0: only at the end) and when the run finishes")
    p.add_argument("--on-checkpoint-error", choices=["stop", "warn"], default="stop",
                   help="when the checkpoint cannot be written: stop the run, telling every "
                        "worker why, and exit nonzero (default), or warn each round and go on "
                        "(a restart would then resume from an older round)")
    _add_token_options(p)
    p.add_argument("--tls-cert", help="chief certificate (PEM), from 'fedberry certs'")
    p.add_argument("--tls-key", help="chief private key (PEM)")
    p.add_argument("--client-ca", help="require worker certificates signed by this CA (mTLS)")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain TCP or no token on a non-loopback address")
    p.add_argument("--max-connections", type=int, default=256,
                   help="connections at once, handshaking or joined; more are refused")
    p.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                   help="seconds of silence after which a worker is taken for lost")
    p.add_argument("--update-deadline", type=float, default=None, metavar="S",
                   help="seconds an update may take to arrive once the chief reads it; past "
                        "it the worker is dropped and the round goes on (default 600; an "
                        "update arriving below 8 KiB/s after 10 s is dropped sooner)")
    p.add_argument("--receive-memory", type=_size_text, default="64MiB", metavar="SIZE",
                   help="how much of the updates is read at once, all workers together (at "
                        "least one update), with a unit: 64MiB, 1GiB (as serve()'s "
                        "receive_memory); others wait their turn in their sockets")
    p.add_argument("--receive-buffer", type=_size_text, default=None, metavar="SIZE",
                   help="each connection's kernel receive buffer (SO_RCVBUF), with a unit: "
                        "256KiB (default: the kernel's autotuning). Waiting workers fill "
                        "theirs: with many workers, workers x SIZE is kernel memory")
    p.add_argument("--max-samples", type=float, default=DEFAULT_MAX_SAMPLES, metavar="N",
                   help="refuse updates claiming more samples than this (default 1e9, which "
                        "no real shard reaches; docs/security.md)")
    p.add_argument("--max-sample-ratio", type=_ratio_text, default=DEFAULT_MAX_SAMPLE_RATIO,
                   metavar="R",
                   help="from round 2 on, weigh a claim above R x the median sample count of "
                        "earlier rounds as that cap, with a log line (default 100; 'none': no "
                        "relative bound; docs/security.md)")
    p.add_argument("--max-update-norm", type=float, default=None, metavar="BOUND",
                   help="bound on the L2 norm of each update's change from the global model "
                        "(default: none)")
    p.add_argument("--update-norm-mode", default="clip", choices=list(NORM_MODES),
                   help="an update beyond --max-update-norm is scaled down to it (clip) or "
                        "refused (refuse)")
    _add_downlink_option(p)
    _add_dp_options(p)
    p.add_argument("--secagg", type=_secagg_text, default=None, metavar="K=V,...",
                   help="secure aggregation (SecAgg+): the chief learns only the sum of each "
                        "round's updates, even when workers drop out; '' for the defaults, or "
                        "threshold=T,neighbors=K|all,bits=32|16,clip=C,timeout=S,"
                        "rounding=nearest|stochastic (docs/secure-aggregation.md)")
    add_config_options(p)  # --status, --config, --print-config (cli_config.py)
    _add_fleet_options(p)
    p.set_defaults(func=_run_chief)


def _size_text(text: str) -> str:
    """``--receive-memory``: a size with a unit (``chief.buffers.parse_size``). A bare number
    is the old spelling, MiB: still taken, with a warning when the chief starts."""
    from fedberry.chief.buffers import parse_size

    try:
        float(text)
        return text
    except ValueError:
        pass
    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _receive_memory(text: str) -> str:
    try:
        mib = float(text)
    except ValueError:
        return text
    log.warning("--receive-memory %s: a bare number is read as MiB (the old spelling); write "
                "the unit, --receive-memory %gMiB", text, mib)
    return f"{mib:g}MiB"


# -- differential privacy (docs/privacy.md) ----------------------------------------------------
def _add_dp_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dp", type=_dp_text, default=None, metavar="K=V,...",
                   help="differentially private FedAvg: clip=C (each update's L2 bound), "
                        "noise=Z (multiplier), delta=D, where=worker|chief, adaptive=true, "
                        "...; e.g. --dp clip=1.0,noise=1.1,delta=1e-5 (docs/privacy.md)")
    p.add_argument("--target-epsilon", type=float, default=None, metavar="EPS",
                   help="with --dp: stop at the last round whose epsilon is within EPS")


def _ratio_text(text: str) -> float | None:
    """``--max-sample-ratio``: a number >= 1, or ``none`` (no relative bound)."""
    if text.strip().lower() == "none":
        return None
    try:
        return AdmissionPolicy(max_sample_ratio=float(text)).max_sample_ratio
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _secagg_text(text: str) -> str:
    """``--secagg`` checked when the command line is read (unknown keys refused, listing them)."""
    try:
        SecAggOptions.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _dp_text(text: str) -> str:
    """``--dp`` checked when the command line is read (unknown keys refused, listing them)."""
    try:
        parse_dp(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _dp_config(args: argparse.Namespace) -> DPConfig | None:
    """The run's DPConfig from --dp and --target-epsilon (None without --dp)."""
    if args.dp is None:
        if args.target_epsilon is not None:
            raise ValueError("--target-epsilon needs --dp (the clip and noise that spend it)")
        return None
    dp = parse_dp(args.dp)
    if args.target_epsilon is not None:
        dp = replace(dp, target_epsilon=args.target_epsilon)
    if dp.noise > 0:
        try:
            epsilon(dp.noise, 1, dp.delta)  # the accountant is there
        except ImportError as exc:  # one sentence, not a traceback
            raise ValueError(str(exc)) from None
    return dp


def _dp_summary(dp: DPConfig, records: list[dict]) -> str:
    """The run's privacy in one line, for the end of ``fedberry chief``."""
    last = records[-1] if records else {}
    eps = last.get("epsilon")
    shown = f"{eps:.4g}" if isinstance(eps, (int, float)) else "infinite (noise 0)"
    budget = ("" if dp.target_epsilon is None else
              f"; --target-epsilon {dp.target_epsilon:g} allowed no more rounds")
    return (f"privacy: epsilon {shown} at delta {dp.delta:g} after {last.get('round', 0)} "
            f"rounds (clip {dp.clip:g}, noise {dp.noise:g}){budget}")


# -- per-round configuration, client sampling, evaluation on the workers (docs/fleet.md) -----
def _add_fleet_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round-config", action="append", default=[], metavar="KEY=V[@R],...",
                   type=_round_config_text,
                   help="sent to every worker with each round's model, e.g. lr=0.1@0,0.05@10 "
                        "(0.1 from round 0, 0.05 from round 10); repeat for more keys; the "
                        "torch and Keras drop-ins apply lr")
    p.add_argument("--sample", type=int, default=None, metavar="K",
                   help="K of the connected workers take part in each round, drawn from --seed "
                        "and the round (reproducible); the others stay connected and idle")
    p.add_argument("--fraction", type=float, default=None, metavar="F",
                   help="a fraction F of the connected workers takes part in each round")
    p.add_argument("--poisson", action="store_true",
                   help="with --fraction: each worker takes part independently with "
                        "probability F (the sampling a privacy accountant assumes)")
    p.add_argument("--evaluate-every", type=int, default=None, metavar="R",
                   help="every R rounds (and for the final model) ask the workers that offer "
                        "an evaluation to evaluate the global model on their held-out data; "
                        "metrics.jsonl gets federated_eval, each key weighted by examples")
    p.add_argument("--evaluate-timeout", type=float, default=30.0, metavar="S",
                   help="seconds after the model goes out within which evaluations count; "
                        "later ones are dropped (default 30)")


def _round_config_text(text: str) -> str:
    """One ``--round-config`` item, checked when the command line (or --config) is read."""
    try:
        parse_schedule([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _fleet_options(args: argparse.Namespace) -> dict:
    """serve()'s keywords for the options of ``_add_fleet_options``."""
    out: dict = {}
    if args.round_config:
        out["round_config"] = parse_schedule(args.round_config)
    if args.sample is not None or args.fraction is not None or args.poisson:
        out.update(sample=args.sample, fraction=args.fraction, poisson=args.poisson,
                   sample_seed=args.seed)
    if args.evaluate_every is not None:
        out.update(evaluate_every=args.evaluate_every, evaluate_timeout=args.evaluate_timeout)
    return out


def _strategy_text(text: str) -> str:
    """``--strategy`` checked when the command line is read; the text itself goes on (into
    run_config and serve(), which parses it again), so that it is recorded as typed."""
    try:
        parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _run_chief(args: argparse.Namespace) -> int:
    from fedberry.demo.torch_demo import TABLE_HEADER, format_row, initial_model, make_evaluator
    from fedberry.serve import run_chief

    _check_files(args, "tls_cert", "tls_key", "client_ca", "token_file", "status_token_file")
    initial = evaluate = None
    if args.model != "none":
        initial = initial_model(args.model, args.seed, args.framework)
        evaluate = make_evaluator(args.model, args.data_dir, args.framework)
    checkpoint = args.checkpoint or str(Path(args.out) / "checkpoint.npz")
    run_config = {k: v for k, v in vars(args).items()
                  if k not in ("func", "token", "status_token") and not callable(v)}
    header = [TABLE_HEADER]  # printed with the first round, not before a refusal to start
    dp = _dp_config(args)
    if dp is not None:
        header = [TABLE_HEADER + f" {'epsilon':>8}"]
    records: list[dict] = []

    def show(record: dict) -> None:
        while header:
            print(header.pop(), flush=True)
        row = format_row(record)
        if dp is not None:
            eps = record.get("epsilon")
            row += f" {eps:>8.3f}" if isinstance(eps, (int, float)) else f" {'inf':>8}"
        records.append(record)
        print(row, flush=True)

    fleet = _fleet_options(args)
    started = time.time()
    with _out_errors(args.out):
        if args.listen.startswith("mpi://"):  # rank 0 of an mpiexec launch (transports/mpi.py)
            if fleet:
                raise ValueError("--round-config, --sample, --fraction and --evaluate-every "
                                 "work with TCP and in-process workers, not under MPI (its "
                                 "rounds are one Allreduce of every rank); see docs/fleet.md")
            from fedberry.serve import open_status
            from fedberry.transports.mpi import run_mpi_chief
            from fedberry.transports.mpi_chief import MPI_SECAGG_REFUSED

            if args.secagg is not None:
                raise ValueError(MPI_SECAGG_REFUSED)

            # The status server watches rank 0's runtime as it watches a TCP chief's: the
            # training ranks are its one worker, "mpi" (their rounds are one collective).
            status = (open_status(args.status, args.status_token, args.status_token_file,
                                  args.tls_cert, args.tls_key, args.insecure, None)
                      if args.status else None)
            watching: list[Any] = []

            def watch(server: Any) -> None:
                if status is not None:
                    watching.append(status.start(server, args.rounds, 1,
                                                 private=dp is not None))

            try:
                run_mpi_chief(rounds=args.rounds, strategy=args.strategy, initial=initial,
                              evaluate=evaluate, out_dir=args.out, checkpoint=checkpoint,
                              resume=args.resume, workers=args.workers, run_config=run_config,
                              on_round=show, on_checkpoint_error=args.on_checkpoint_error,
                              admission=AdmissionPolicy(max_samples=args.max_samples,
                                                        max_update_norm=args.max_update_norm,
                                                        update_norm_mode=args.update_norm_mode,
                                                        max_sample_ratio=args.max_sample_ratio),
                              dp=dp, save_every=args.save_every, on_server=watch)
            finally:
                for w in watching:
                    w.stop()
                if status is not None and not watching:
                    status.sock.close()
            if dp is not None:
                print(_dp_summary(dp, records), flush=True)
            print_model_line(args.out, started)
            return 0
        run_chief(listen=args.listen, workers=args.workers, rounds=args.rounds,
                  min_workers=args.min_workers, round_timeout=args.round_timeout,
                  finish_grace=args.finish_grace,
                  strategy=args.strategy, initial=initial, evaluate=evaluate, out_dir=args.out,
                  checkpoint=checkpoint, resume=args.resume,
                  on_checkpoint_error=args.on_checkpoint_error, token=args.token,
                  token_file=args.token_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
                  client_ca=args.client_ca, insecure=args.insecure,
                  max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                  update_deadline=args.update_deadline,
                  run_config=run_config, on_round=show, downlink=args.downlink,
                  receive_memory=_receive_memory(args.receive_memory),
                  receive_buffer=args.receive_buffer,
                  max_samples=args.max_samples, max_sample_ratio=args.max_sample_ratio,
                  max_update_norm=args.max_update_norm, update_norm_mode=args.update_norm_mode,
                  status=args.status, status_token=args.status_token,
                  status_token_file=args.status_token_file, dp=dp, save_every=args.save_every,
                  secure_aggregation=args.secagg, **fleet)
        if dp is not None:
            print(_dp_summary(dp, records), flush=True)
    print_model_line(args.out, started)
    return 0


def print_model_line(out: str | Path, since: float) -> None:
    """The chief's last line: where the trained model is (when this run wrote one)."""
    path = Path(out) / FILE_NAME
    try:
        if path.stat().st_mtime >= since - 1:  # written by this run, not left by another
            print(f"model: {path}", flush=True)
    except OSError:
        pass


def _check_files(args: argparse.Namespace, *names: str) -> None:
    """Each file option given names a file (ssl's own error names none)."""
    for name in names:
        path = getattr(args, name, None)
        if path is not None and not Path(path).is_file():
            why = "is a directory" if Path(path).is_dir() else "no such file"
            raise ValueError(f"--{name.replace('_', '-')} {path}: {why}")


@contextmanager
def _out_errors(out: str) -> Iterator[None]:
    """An OSError about a path at or under ``--out`` (it cannot be made or written) becomes one
    sentence that names the option."""
    try:
        yield
    except OSError as exc:
        name = exc.filename
        if name is None or not (Path(name) == Path(out) or Path(out) in Path(name).parents):
            raise
        why = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot write to --out {out}: {why[:1].lower()}{why[1:]} "
                                 f"({name}); give --out a directory this user can write to"
                      ) from exc  # -v shows where it came from


def _add_worker_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", aliases=["demo-worker"], help="a Fashion-MNIST training worker")
    p.add_argument("--chief", required=True, help="tcp://HOST:PORT (the public address) "
                                                  "or mpi://")
    p.add_argument("--partition", default="1/1",
                   help="this worker's share of the data: INDEX/COUNT, 1-based, e.g. 3/6")
    _add_train_options(p)
    _add_token_options(p)
    p.add_argument("--ca", help="CA certificate to verify the chief (enables TLS)")
    p.add_argument("--cert", help="this worker's certificate, for mTLS")
    p.add_argument("--key", help="this worker's private key, for mTLS")
    p.add_argument("--server-hostname", help="name to check the chief's certificate against "
                                             "(default: the host in --chief)")
    p.add_argument("--worker-id", help="stable name (default: host-pid-random; with --cert, the "
                                        "certificate's name, which a chief with --client-ca "
                                        "requires)")
    p.add_argument("--local-dp", type=_dp_text, default=None, metavar="K=V,...",
                   help="local differential privacy: clip this worker's updates to clip=C and "
                        "add its own noise=Z (delta=D for its epsilon, logged with -v); "
                        "docs/privacy.md")
    p.add_argument("--require-secagg", action="store_true", default=None,
                   help="send updates only to a chief that aggregates securely (--secagg): "
                        "refuse to join one that would see them in the clear")
    p.set_defaults(func=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    from fedberry.data.partition import parse_partition_spec
    from fedberry.demo.torch_demo import run_worker

    _check_files(args, "ca", "cert", "key", "token_file")
    part = parse_partition_spec(args.partition)
    options = {k: getattr(args, k) for k in ("token", "token_file", "ca", "cert", "key",
                                             "server_hostname", "worker_id", "local_dp")
               if getattr(args, k) is not None}
    if args.require_secagg:
        options["require_secure_aggregation"] = True
    result = run_worker(args.chief, part.index, part.count, _train_config(args), **options)
    log.info("worker %d/%d finished: %s", part.index, part.count, result)
    return 0


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="chief + N workers on loopback, Fashion-MNIST")
    p.add_argument("--workers", type=int, default=4, help="worker processes to start")
    p.add_argument("--rounds", type=int, default=10, help="rounds to run")
    p.add_argument("--out", default="runs/demo",
                   help="metrics.jsonl, the checkpoint and the workers' logs go here")
    p.add_argument("--transport", default="tcp", choices=["tcp", "mpi"],
                   help="tcp: a chief and worker processes on loopback; mpi: one mpiexec job")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="S",
                   help="give up after this many seconds")
    _add_train_options(p)
    _add_downlink_option(p)
    p.add_argument("--secagg", type=_secagg_text, default=None, metavar="K=V,...",
                   help="secure aggregation ('' for the defaults; TCP only): the chief learns "
                        "only the sum of each round's updates (docs/secure-aggregation.md)")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if args.transport == "mpi":
        from fedberry.demo.mpi_demo import run_mpi_demo

        if args.secagg is not None:
            from fedberry.transports.mpi_chief import MPI_SECAGG_REFUSED

            raise ValueError(MPI_SECAGG_REFUSED)
        with _out_errors(args.out):
            return run_mpi_demo(args.workers, args.rounds, args.out, _train_config(args),
                                timeout=args.timeout)
    from fedberry.demo.torch_demo import run_demo

    with _out_errors(args.out):
        return run_demo(args.workers, args.rounds, args.out, _train_config(args), args.timeout,
                        downlink=args.downlink, secure_aggregation=args.secagg)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint's model as model.safetensors",
                       description="Convert a chief's checkpoint.npz (tensors global.0..N) to "
                                   "the safetensors model file that chiefs now write "
                                   "themselves (OUT/model.safetensors).")
    p.add_argument("checkpoint", help="a checkpoint.npz written by a fedberry chief")
    p.add_argument("-o", "--output", default=None, metavar="OUT.safetensors",
                   help="where to write it (default: model.safetensors beside the checkpoint)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from fedberry.chief.export import export_checkpoint

    print(f"model: {export_checkpoint(args.checkpoint, args.output)}", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedberry", description="Federated averaging for small, badly connected machines.",
        formatter_class=HelpFormatter, parents=[_common_options(top=True)])
    parser.add_argument("--version", action="version", version=f"fedberry {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    _add_chief_parser(sub)
    _add_worker_parser(sub)
    _add_demo_parser(sub)
    _add_export_parser(sub)
    try:
        from fedberry.certs import add_certs_parser

        add_certs_parser(sub)
    except ImportError:
        pass
    try:
        from fedberry.bench.cli import add_bench_parser

        add_bench_parser(sub)
    except ImportError:
        pass
    return parser


def verbosity(args: argparse.Namespace) -> int:
    """-v minus -q, counting those before the subcommand and after it."""
    return (args.verbose0 + getattr(args, "verbose", 0)
            - args.quiet0 - int(getattr(args, "quiet", 0)))


def setup_logging(args: argparse.Namespace) -> None:
    """The CLI's log lines on stderr (and in --log-file): fedberry's at INFO unless -v/-q say
    otherwise; other libraries' at WARNING (-vv: DEBUG)."""
    v = verbosity(args)
    if args.command == "bench":  # it prints its own progress; its chiefs' lines would bury it
        v -= 1
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(v, logging.DEBUG)
    if v < -2:
        level = logging.CRITICAL
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handlers: list[logging.Handler] = [stderr]
    path = getattr(args, "log_file", None) or args.log_file0
    if path:
        try:
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ValueError(f"--log-file {path}: {why[:1].lower()}{why[1:]}") from None
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(handler)
    logging.basicConfig(level=logging.DEBUG if v >= 2 else logging.WARNING, handlers=handlers,
                        force=True)
    logging.getLogger("fedberry").setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)  # with chief's --config file (cli_config.py)
    try:
        setup_logging(args)
    except ValueError as exc:
        return _refused(args, str(exc), 2)
    # SIGTERM (systemd, docker stop, kill) ends a run as Ctrl-C does: the chief tells its
    # workers and keeps its checkpoint, a worker says goodbye.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log.warning("fedberry %s: stopped", args.command)
        return 130
    except ValueError as exc:  # options that do not go together, a checkpoint of another run
        return _refused(args, str(exc), 2)
    except FederationError as exc:  # refused by, or lost, the chief: the sentence says why
        return _refused(args, str(exc), 1)
    except OSError as exc:  # a port, a file or a directory that cannot be used
        return _refused(args, _os_sentence(exc), 2)
    except ImportError as exc:  # an extra that is not installed, a Keras backend that is not
        return _refused(args, str(exc), 2)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _refused(args: argparse.Namespace, sentence: str, code: int) -> int:
    """Print why the command stopped, as one line (with -v, the traceback before it)."""
    if verbosity(args) > 0:
        traceback.print_exc()
    print(f"fedberry {args.command}: error: {sentence}", file=sys.stderr)
    return code


def _os_sentence(exc: OSError) -> str:
    """``[Errno 2] No such file or directory: 'x'`` said as ``x: no such file or directory``;
    an OSError raised with a sentence of ours (``errno``, text) keeps its text."""
    why = exc.strerror or str(exc)
    if exc.filename is None:
        return why
    return f"{exc.filename}: {why[:1].lower()}{why[1:]}"


if __name__ == "__main__":
    sys.exit(main())
