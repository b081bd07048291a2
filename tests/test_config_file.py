"""``fedberry chief --config run.toml`` and ``--print-config`` (cli_config.py)."""

import subprocess
import sys

import pytest

from fedberry.cli import build_parser
from fedberry.cli_config import options, parse_args, tomllib

pytestmark = pytest.mark.skipif(tomllib is None, reason="Python 3.10 without tomli (the "
                                                        "config extra)")


def _chief_parser():
    parser = build_parser()
    return parser, next(a for a in parser._actions if hasattr(a, "choices")
                        and isinstance(a.choices, dict)).choices["chief"]


def _write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_file_sets_every_kind_of_option(tmp_path):
    path = _write(tmp_path, 'workers = 3\nrounds = 4\nmin_workers = 2\nround-timeout = 30.5\n'
                            'insecure = true\nstrategy = "fedadam:lr=0.05"\n'
                            'status = "127.0.0.1:9090"\ndownlink = "fp16"\n')
    args = parse_args(build_parser(), ["chief", "--config", path])  # no --workers: the file's
    assert (args.workers, args.rounds, args.min_workers, args.round_timeout) == (3, 4, 2, 30.5)
    assert args.insecure is True and args.strategy == "fedadam:lr=0.05"
    assert args.status == "127.0.0.1:9090" and args.downlink == "fp16"


def test_a_repeatable_option_takes_a_list_and_prints_back_as_one(tmp_path, capsys):
    path = _write(tmp_path, 'workers = 2\nround-config = ["lr=0.1@0,0.05@10", "epochs=2"]\n'
                            'dp = "clip=1.0,noise=0.0"\n')
    args = parse_args(build_parser(), ["chief", "--config", path, "--round-config", "mu=0.5"])
    # The file's items come first, the command line's after: each one repeat of the option.
    assert args.round_config == ["lr=0.1@0,0.05@10", "epochs=2", "mu=0.5"]
    assert args.dp == "clip=1.0,noise=0.0"
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["chief", "--config", path, "--print-config"])
    printed = capsys.readouterr().out
    assert 'round-config = ["lr=0.1@0,0.05@10", "epochs=2"]' in printed
    bad = _write(tmp_path, 'workers = 2\nround-config = ["lr"]\n', "bad.toml")
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["chief", "--config", bad])


def test_command_line_flags_override_the_file(tmp_path):
    path = _write(tmp_path, "workers = 3\nrounds = 4\nlisten = '127.0.0.1:1'\n")
    args = parse_args(build_parser(), ["-v", "chief", "--rounds", "9", f"--config={path}",
                                       "--listen", "127.0.0.1:2"])
    assert (args.workers, args.rounds, args.listen) == (3, 9, "127.0.0.1:2")


def test_unknown_keys_are_refused_with_the_valid_ones(tmp_path, capsys):
    path = _write(tmp_path, "workers = 3\nwrokers = 4\n")
    with pytest.raises(SystemExit) as exc:
        parse_args(build_parser(), ["chief", "--config", path])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'wrokers' is not an option of fedberry chief" in err
    # The list is the parser's own: every chief option, and nothing else.
    _, chief = _chief_parser()
    listed = err.split("the valid keys are ")[1].split(", ")
    assert listed == list(options(chief))
    assert {"workers", "min-workers", "status", "tls-cert", "downlink"} <= set(listed)
    assert not {"config", "print-config", "help"} & set(listed)


@pytest.mark.parametrize("text, why", [
    ("workers = 'three'", "workers = 'three': give an integer"),
    ("downlink = 'zip'", "downlink = 'zip': choose from none, fp16, q8"),
    ("insecure = 1", "insecure = 1: a flag takes true or false"),
    ("rounds = [1, 2]", "give a single number or string"),
    ("strategy = 'fedadam:nope=1'", "strategy = 'fedadam:nope=1': "),
    ("workers = ", "is not valid TOML"),
])
def test_bad_values_are_refused_with_a_sentence(tmp_path, capsys, text, why):
    path = _write(tmp_path, text + "\n")
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["chief", "--config", path])
    assert why in capsys.readouterr().err


def test_a_missing_file_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["chief", "--config", str(tmp_path / "nope.toml")])
    assert "nope.toml: no such file or directory" in capsys.readouterr().err


def test_print_config_writes_what_config_reads_back(tmp_path, capsys):
    path = _write(tmp_path, 'workers = 2\nmax-update-norm = 3.5\ntoken = "s3cret"\n'
                            'status-token = "r3ader"\nout = "runs/a \\"b\\" ü"\n')
    argv = ["chief", "--config", path, "--rounds", "6", "--insecure", "--print-config"]
    with pytest.raises(SystemExit) as exc:
        parse_args(build_parser(), argv)
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "s3cret" not in printed and "r3ader" not in printed  # secrets named, not written
    assert "# status-token = (hidden: give it with --status-token-file" in printed
    assert "# token = (hidden" in printed and "# round-timeout = (not set)" in printed
    data = tomllib.loads(printed)
    assert data["rounds"] == 6 and data["workers"] == 2 and data["insecure"] is True
    # Read back, the printed file gives the same options (but the token, kept out of it).
    again = parse_args(build_parser(), ["chief", "--config", _write(tmp_path, printed, "e.toml")])
    first = parse_args(build_parser(), argv[:-1])
    skip = {"config", "token", "status_token", "func"}
    assert ({k: v for k, v in vars(again).items() if k not in skip}
            == {k: v for k, v in vars(first).items() if k not in skip})


def test_print_config_from_the_command(tmp_path):
    path = _write(tmp_path, "workers = 5\n")
    out = subprocess.run([sys.executable, "-m", "fedberry", "chief", "--config", path,
                          "--print-config"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(out.stdout)["workers"] == 5
