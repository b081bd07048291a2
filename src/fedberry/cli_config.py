"""``fedberry chief --config run.toml`` and ``--print-config``: every chief option from a TOML
file, with the command line overriding it.

There is one list of options, the ``chief`` subcommand's argparse parser: a file's key is an
option's long name without its dashes (``min-workers = 2``; ``min_workers`` is read the same),
each value is checked by that option's own type and choices, and the file's options go in
front of the command line's, so that a flag given there wins (argparse keeps the last value).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the config extra: tomli, the same parser before it joined the standard library
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

# Options of the chief that a file cannot hold: the file itself, and what is not a setting.
_NOT_IN_FILE = {"help", "config", "print_config"}
# Printed by --print-config as a comment only: a secret belongs in --token-file or the
# environment, not in a file that gets shared.
# dest -> where to give it instead.
_SECRET = {"token": "--token-file or FEDBERRY_TOKEN",
           "status_token": "--status-token-file or FEDBERRY_STATUS_TOKEN"}


def add_config_options(p: argparse.ArgumentParser) -> None:
    """``--status``, ``--config`` and ``--print-config`` on the chief's parser."""
    p.add_argument("--status", metavar="HOST:PORT", default=None,
                   help="serve a live status page, /api/status (JSON) and Prometheus /metrics "
                        "here, e.g. 127.0.0.1:9090 (the status extra; beyond loopback it needs "
                        "--status-token and TLS or --insecure; docs/operations.md)")
    p.add_argument("--status-token", default=None,
                   help="the status page's read-only token, required beyond loopback: readers "
                        "send 'Authorization: Bearer TOKEN'; never the workers' --token (prefer "
                        "--status-token-file or FEDBERRY_STATUS_TOKEN: arguments are visible "
                        "in ps)")
    p.add_argument("--status-token-file", default=None,
                   help="file holding the status page's read-only token")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="read the chief's options from this TOML file (keys: the options' "
                        "names, e.g. min-workers = 2); flags on the command line win")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective options (file, then command line) as TOML and "
                        "exit")


def _chief_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser | None:
    for action in parser._actions:  # argparse keeps its subparsers here, and only here
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get("chief")
    return None


def options(chief: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options a file may hold: key (the long option without dashes) -> its action."""
    out: dict[str, argparse.Action] = {}
    for action in chief._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in _NOT_IN_FILE:
            out[longs[0][2:]] = action
    return out


def _config_path(args: Sequence[str]) -> str | None:
    path = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return path


def read_file(path: str, chief: argparse.ArgumentParser) -> list[str]:
    """The command-line words that ``path`` stands for, each value checked by its option.

    Raises
    ------
    ValueError
        The file cannot be read or parsed, or holds a key that is no chief option (the
        sentence lists the valid ones) or a value its option refuses.
    """
    if tomllib is None:
        raise ValueError("--config on Python 3.10 needs tomli: pip install 'fedberry[config]'")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"--config {path}: {(exc.strerror or str(exc)).lower()}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path} is not valid TOML: {exc}") from None
    valid = options(chief)
    words: list[str] = []
    for raw_key, value in data.items():
        key = raw_key.replace("_", "-")
        action = valid.get(key)
        if action is None:
            raise ValueError(f"--config {path}: {raw_key!r} is not an option of fedberry chief; "
                             f"the valid keys are {', '.join(valid)}")
        words += _words(path, key, action, value)
    return words


def _words(path: str, key: str, action: argparse.Action, value: Any) -> list[str]:
    where = f"--config {path}: {key} = {value!r}"
    if action.nargs == 0:  # a flag (store_true): true or false
        if not isinstance(value, bool):
            raise ValueError(f"{where}: a flag takes true or false")
        want = action.const if value else action.default
        return [f"--{key}"] if want != action.default else []
    if isinstance(action, argparse._AppendAction) and isinstance(value, list):
        # A repeatable option (--round-config): a list of its values, each checked alone.
        return [w for item in value for w in _words(path, key, action, item)]
    if isinstance(value, (bool, dict, list)) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: give a single number or string")
    text = str(value)
    try:
        checked = action.type(text) if callable(action.type) else text
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        kind = {int: "an integer", float: "a number"}.get(action.type, "another value")
        why = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"give {kind}"
        raise ValueError(f"{where}: {why}") from None
    if action.choices is not None and checked not in action.choices:
        raise ValueError(f"{where}: choose from {', '.join(map(str, action.choices))}")
    return [f"--{key}={text}"]


def parse_args(parser: argparse.ArgumentParser,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with ``fedberry chief``'s ``--config`` file read in front of
    the command line, and ``--print-config`` answered (it prints and exits 0)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chief = _chief_parser(parser)
    # The subcommand is the first word that is no option (the top-level options take no value).
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if chief is not None and at is not None and argv[at] == "chief":
        path = _config_path(argv[at + 1:])
        if path is not None:
            try:
                words = read_file(path, chief)
            except ValueError as exc:
                chief.error(str(exc))
            # A required option (--workers) the file gives must not be asked for again.
            given = {w.split("=", 1)[0] for w in words}
            for action in chief._actions:
                if action.required and set(action.option_strings) & given:
                    action.required = False
            argv = argv[:at + 1] + words + argv[at + 1:]
    args = parser.parse_args(argv)
    if chief is not None and getattr(args, "print_config", False):
        sys.stdout.write(effective_toml(args, chief))
        sys.exit(0)
    return args


def effective_toml(args: argparse.Namespace, chief: argparse.ArgumentParser) -> str:
    """The chief's options in ``args`` as a TOML file that ``--config`` reads back (options not
    set, and the token, as comments)."""
    lines = ["# fedberry chief: the effective options (the --config file, then the command "
             "line)"]
    for key, action in options(chief).items():
        value = getattr(args, action.dest, None)
        if action.dest in _SECRET:
            if value is not None:
                lines.append(f"# {key} = (hidden: give it with {_SECRET[action.dest]})")
            continue
        if value is None or value == []:
            lines.append(f"# {key} = (not set)")
            continue
        if isinstance(value, list):  # a repeatable option: a TOML array of its values
            lines.append(f"{key} = [{', '.join(_toml_value(v) for v in value)}]")
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    # JSON's string escapes are TOML's (basic strings), but for DEL, which TOML wants escaped.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
