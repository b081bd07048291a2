"""The ``fedberry`` command: chief, worker, demo, export, certs, bench."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from fedberry import __version__
from fedberry.chief.admission import DEFAULT_MAX_SAMPLES, NORM_MODES, AdmissionPolicy
from fedberry.chief.model_file import DEFAULT_SAVE_EVERY, FILE_NAME
from fedberry.codecs import DOWNLINK_CODECS, UPLINK_CODECS
from fedberry.demo.torch_demo import TrainConfig
from fedberry.errors import FederationError
from fedberry.strategies import STRATEGIES, parse


def _add_train_options(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--model", default=d.model, choices=["mlp", "cnn"])
    p.add_argument("--partition-scheme", default=d.partition_scheme,
                   help="iid, dirichlet:ALPHA (label skew) or shards[:K] (the FedAvg paper's)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--sync-every", type=int, default=None,
                   help="local steps between averagings (default: one pass over local data)")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist, "
                        "Debian package dataset-fashion-mnist)")
    p.add_argument("--framework", default=d.framework, choices=["torch", "keras"])
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
    p.add_argument("--rounds", type=int, default=None, help="stop after this many rounds")
    p.add_argument("--min-workers", type=int, default=1,
                   help="quorum: a round may close at its deadline with this many updates")
    p.add_argument("--round-timeout", type=float, default=None,
                   help="seconds after which a round closes with the quorum")
    p.add_argument("--strategy", default="fedavg", type=_strategy_text, metavar="NAME[:K=V,...]",
                   help=f"aggregation rule ({', '.join(sorted(STRATEGIES))}) with its "
                        "hyperparameters, e.g. fedadam:lr=0.05,tau=1e-4 or trimmed_mean:trim=1: "
                        "fedavg (sample-weighted mean), fedavgm/fedadam (server momentum/Adam), "
                        "median/trimmed_mean (robust to poisoned updates, memory O(model x "
                        "workers)); see docs/strategies.md")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn", "none"],
                   help="the chief's initial model and test-set evaluation ('none': a pure "
                        "aggregator that adopts the first worker's model and evaluates nothing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--framework", default="torch", choices=["torch", "keras"],
                   help="the workers' framework: the model's tensor layout differs")
    p.add_argument("--data-dir", default=None)
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
    p.add_argument("--max-connections", type=int, default=256)
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--update-deadline", type=float, default=None, metavar="S",
                   help="seconds an update may take to arrive once the chief reads it; past "
                        "it the worker is dropped and the round goes on (default 600; an "
                        "update arriving below 8 KiB/s after 10 s is dropped sooner)")
    p.add_argument("--receive-memory", type=float, default=64.0, metavar="MIB",
                   help="MiB of updates read at once, all workers together (at least one "
                        "update); others wait their turn in their sockets (default 64)")
    p.add_argument("--max-samples", type=float, default=DEFAULT_MAX_SAMPLES, metavar="N",
                   help="refuse updates claiming more samples than this (default 1e9, which "
                        "no real shard reaches; docs/security.md)")
    p.add_argument("--max-update-norm", type=float, default=None, metavar="BOUND",
                   help="bound on the L2 norm of each update's change from the global model "
                        "(default: none)")
    p.add_argument("--update-norm-mode", default="clip", choices=list(NORM_MODES),
                   help="an update beyond --max-update-norm is scaled down to it (clip) or "
                        "refused (refuse)")
    _add_downlink_option(p)
    p.set_defaults(func=_run_chief)


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

    _check_files(args, "tls_cert", "tls_key", "client_ca", "token_file")
    initial = evaluate = None
    if args.model != "none":
        initial = initial_model(args.model, args.seed, args.framework)
        evaluate = make_evaluator(args.model, args.data_dir, args.framework)
    checkpoint = args.checkpoint or str(Path(args.out) / "checkpoint.npz")
    run_config = {k: v for k, v in vars(args).items()
                  if k not in ("func", "token") and not callable(v)}
    header = [TABLE_HEADER]  # printed with the first round, not before a refusal to start

    def show(record: dict) -> None:
        while header:
            print(header.pop(), flush=True)
        print(format_row(record), flush=True)

    started = time.time()
    with _out_errors(args.out):
        if args.listen.startswith("mpi://"):  # rank 0 of an mpiexec launch (transports/mpi.py)
            from fedberry.transports.mpi import run_mpi_chief

            run_mpi_chief(rounds=args.rounds, strategy=args.strategy, initial=initial,
                          evaluate=evaluate, out_dir=args.out, checkpoint=checkpoint,
                          resume=args.resume, workers=args.workers, run_config=run_config,
                          on_round=show, on_checkpoint_error=args.on_checkpoint_error,
                          admission=AdmissionPolicy(max_samples=args.max_samples,
                                                    max_update_norm=args.max_update_norm,
                                                    update_norm_mode=args.update_norm_mode),
                          save_every=args.save_every)
            print_model_line(args.out, started)
            return 0
        run_chief(listen=args.listen, workers=args.workers, rounds=args.rounds,
                  min_workers=args.min_workers, round_timeout=args.round_timeout,
                  strategy=args.strategy, initial=initial, evaluate=evaluate, out_dir=args.out,
                  checkpoint=checkpoint, resume=args.resume,
                  on_checkpoint_error=args.on_checkpoint_error, token=args.token,
                  token_file=args.token_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
                  client_ca=args.client_ca, insecure=args.insecure,
                  max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                  update_deadline=args.update_deadline,
                  run_config=run_config, on_round=show, downlink=args.downlink,
                  receive_memory=int(args.receive_memory * 2**20), max_samples=args.max_samples,
                  max_update_norm=args.max_update_norm, update_norm_mode=args.update_norm_mode,
                  save_every=args.save_every)
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
    p.add_argument("--partition", default="1/1", help="INDEX/COUNT, 1-based, e.g. 3/6")
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
    p.set_defaults(func=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    from fedberry.data.partition import parse_partition_spec
    from fedberry.demo.torch_demo import run_worker

    _check_files(args, "ca", "cert", "key", "token_file")
    part = parse_partition_spec(args.partition)
    options = {k: getattr(args, k) for k in ("token", "token_file", "ca", "cert", "key",
                                             "server_hostname", "worker_id")
               if getattr(args, k) is not None}
    result = run_worker(args.chief, part.index, part.count, _train_config(args), **options)
    print(f"worker {part.index}/{part.count} finished: {result}", flush=True)
    return 0


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="chief + N workers on loopback, Fashion-MNIST")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--transport", default="tcp", choices=["tcp", "mpi"])
    p.add_argument("--timeout", type=float, default=1800.0)
    _add_train_options(p)
    _add_downlink_option(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if args.transport == "mpi":
        from fedberry.demo.mpi_demo import run_mpi_demo

        with _out_errors(args.out):
            return run_mpi_demo(args.workers, args.rounds, args.out, _train_config(args),
                                timeout=args.timeout)
    from fedberry.demo.torch_demo import run_demo

    with _out_errors(args.out):
        return run_demo(args.workers, args.rounds, args.out, _train_config(args), args.timeout,
                        downlink=args.downlink)


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
        prog="fedberry", description="Federated averaging for small, badly connected machines.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log lines (-vv: debug); an error is shown with its traceback")
    parser.add_argument("--version", action="version", version=f"fedberry {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    if args.command == "chief":
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # options that do not go together, a checkpoint of another run
        return _refused(args, str(exc), 2)
    except FederationError as exc:  # refused by, or lost, the chief: the sentence says why
        return _refused(args, str(exc), 1)
    except OSError as exc:  # a port, a file or a directory that cannot be used
        return _refused(args, _os_sentence(exc), 2)


def _refused(args: argparse.Namespace, sentence: str, code: int) -> int:
    """Print why the command stopped, as one line (with -v, the traceback before it)."""
    if args.verbose:
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
