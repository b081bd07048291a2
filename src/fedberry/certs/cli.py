"""``fedberry certs``: make the CA, the chief's and the workers' certificates."""

from __future__ import annotations

import argparse
import ipaddress
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedberry.certs.files import CA_CERT, CA_KEY, MissingTLSExtraError
from fedberry.certs.issue import (
    _check_client_name,
    _parse_name,
    create_ca,
    create_chief_cert,
    create_client_cert,
)

if TYPE_CHECKING:
    pass




def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of days, got {text}")
    return value


def add_certs_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fedberry certs`` on the CLI's subparsers; its handler is :func:`run_certs`."""
    parser = subparsers.add_parser(
        "certs",
        help="make a private CA and TLS certificates for the chief and workers",
        description="Make (or reuse) a CA in DIR, a certificate for the chief, and optional "
        "client certificates for workers (mutual TLS). Keep ca.key off the workers.",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory for the files; an existing ca.pem/ca.key there is reused",
    )
    parser.add_argument(
        "--name",
        required=True,
        action="append",
        dest="names",
        metavar="HOST",
        help="DNS name or IP address workers dial to reach the chief (repeat for "
        "each: the public address, not the one the chief binds)",
    )
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        dest="clients",
        metavar="NAME",
        help="also make NAME.pem/NAME.key for the worker NAME (its id); the chief then "
        "requires client certificates (repeat for each worker)",
    )
    parser.add_argument(
        "--days",
        type=_positive_int,
        default=825,
        help="validity of the chief and worker certificates (default: 825)",
    )
    parser.set_defaults(func=run_certs)
    return parser


def run_certs(args: argparse.Namespace) -> int:
    """Carry out ``fedberry certs``; returns the process exit code."""
    try:
        _check_request(args.names, args.clients)
        ca, ca_key, ca_is_new = _ensure_ca(args.out)
        chief = create_chief_cert(args.out, ca, ca_key, args.names, args.days)
        clients = [
            create_client_cert(args.out, ca, ca_key, name, args.days) for name in args.clients
        ]
    except (ValueError, OSError, MissingTLSExtraError) as exc:
        print(f"fedberry certs: error: {_sentence(exc)}", file=sys.stderr)
        return 1
    print(_summary(ca, ca_key, ca_is_new, chief, clients, args.names))
    return 0


def _sentence(exc: Exception) -> str:
    """``[Errno 13] Permission denied: 'x'`` said as ``x: permission denied``."""
    if isinstance(exc, OSError) and exc.filename is not None:
        why = exc.strerror or str(exc)
        return f"{exc.filename}: {why[:1].lower()}{why[1:]}"
    return str(exc)


def _check_request(names: Sequence[str], clients: Sequence[str]) -> None:
    """Check every name before writing anything, so that a typo leaves no half-made directory."""
    for name in names:
        _parse_name(name)
    for client in clients:
        _check_client_name(client)
    if len(set(clients)) != len(clients):
        raise ValueError("the same --client name is given twice")


def _ensure_ca(out: Path) -> tuple[Path, Path, bool]:
    cert, key = out / CA_CERT, out / CA_KEY
    if cert.exists() and key.exists():
        # Not loaded here: create_chief_cert loads and checks the pair before it writes anything.
        return cert, key, False
    if cert.exists() or key.exists():
        present, missing = (cert, key) if cert.exists() else (key, cert)
        raise ValueError(
            f"{present} exists but {missing} does not: restore it, or remove {present} to make "
            "a new CA (every existing certificate then has to be remade)"
        )
    return (*create_ca(out), True)


def _dial_example(name: str) -> str:
    parsed = _parse_name(name)
    host = f"[{parsed}]" if isinstance(parsed, ipaddress.IPv6Address) else str(parsed)
    return f"tcp://{host}:PORT"


def _summary(
    ca: Path,
    ca_key: Path,
    ca_is_new: bool,
    chief: tuple[Path, Path],
    clients: Sequence[tuple[Path, Path]],
    names: Sequence[str],
) -> str:
    q = shlex.quote
    chief_flags = f"--tls-cert {q(str(chief[0]))} --tls-key {q(str(chief[1]))}"
    if clients:
        chief_flags += f" --client-ca {q(str(ca))}"
    lines = [
        f"CA     {ca} {ca_key} ({'new' if ca_is_new else 'reused'}; keep {ca_key.name} off the "
        "workers: it can sign certificates)",
        f"chief  {chief[0]} {chief[1]} (for {', '.join(names)})",
        *(f"client {cert} {key}" for cert, key in clients),
        "",
        "On the chief:",
        f"  fedberry chief ... {chief_flags}",
        f"On the workers (copy {ca.name}{', and each its own .pem/.key,' if clients else ''} "
        f"there; dial one of: {', '.join(names)}):",
    ]
    worker = f"  fedberry worker --chief {_dial_example(names[0])} --ca {q(str(ca))}"
    if not clients:
        lines.append(worker)
    for cert, key in clients:
        lines.append(f"{worker} --cert {q(str(cert))} --key {q(str(key))}")
    return "\n".join(lines)
