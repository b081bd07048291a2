"""README's "Installing without PyPI": the wheel built from this checkout installs into a fresh
virtual environment with ``[torch]`` next to a torch pin, keeps that torch, and works.

The fresh venv sees this interpreter's packages (``--system-site-packages``, or a ``.pth`` when
this interpreter is itself a venv; pip is this interpreter's, installing into the venv), and pip
runs with ``--no-index``: the test downloads nothing, and a resolver that wanted another torch
would fail it instead of quietly replacing the pin.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from fedberry_wheel import cached_wheel

torch = pytest.importorskip("torch", reason="the torch extra is not installed")


def _fresh_venv(where: Path) -> Path:
    # --without-pip: a venv's own pip and old setuptools would shadow this interpreter's, and
    # torch's requirement on a newer setuptools would then send pip to an index.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(where)], check=True, timeout=120)
    py = where / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # Inside a venv, --system-site-packages reaches the base Python's packages, not this
        # venv's (where torch is): point the new one at them with a .pth file.
        purelib = subprocess.run([str(py), "-c",
                                  "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True, timeout=60)
        Path(purelib.stdout.strip(), "outer.pth").write_text(
            "\n".join(site.getsitepackages() + [sysconfig.get_paths()["platlib"]]) + "\n")
    return py


@pytest.mark.heavy  # a build, a venv and a pip install: the same on every Python
def test_the_wheel_installs_beside_the_torch_pin_and_runs(tmp_path):
    wheel = cached_wheel()
    assert wheel.name.startswith("fedberry-") and wheel.name.endswith("-py3-none-any.whl")
    py = _fresh_venv(tmp_path / "venv")
    # The checkout's src/ must not shadow the installed wheel (conftest puts it on PYTHONPATH).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pin = f"torch=={torch.__version__.split('+')[0]}"  # the pin setup.sh and README give
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-index", f"{wheel}[torch]", pin],
                   check=True, timeout=300, env=env, cwd=tmp_path)

    check = ("import fedberry, torch; "
             "print(torch.__version__); print(fedberry.__file__); print(fedberry.Worker.__name__)")
    out = subprocess.run([str(py), "-c", check], check=True, capture_output=True, text=True,
                         timeout=120, env=env, cwd=tmp_path).stdout.split()
    assert out[0] == torch.__version__  # the pin was kept, not replaced
    assert Path(out[1]).is_relative_to(tmp_path / "venv")  # the wheel, not the checkout
    assert out[2] == "Worker"

    import fedberry
    version = subprocess.run([str(tmp_path / "venv" / "bin" / "fedberry"), "--version"],
                             check=True, capture_output=True, text=True, timeout=120, env=env,
                             cwd=tmp_path)
    assert version.stdout.strip() == f"fedberry {fedberry.__version__}"
