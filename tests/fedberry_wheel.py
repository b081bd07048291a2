"""Build fedberry's wheel from this checkout, the way README's "Installing without PyPI" says
(``pip wheel --no-deps``), without writing into the checkout.

Used by tests/test_wheel.py (install in a fresh venv) and tests/aarch64_root.py (install into an
arm64 root: a pure-Python wheel built on x86 installs on a Pi unchanged).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the build reads: pyproject.toml names README.md as the long description.
_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "src")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")


def _needed() -> int:
    """The major version of setuptools pyproject.toml's build-system requires."""
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'"setuptools>=([0-9]+)', text)
    assert found, "pyproject.toml's [build-system] names no setuptools>=N"
    return int(found.group(1))


def _setuptools_is_enough() -> bool:
    """Whether this Python can build without fetching a build backend: the setuptools that
    pyproject's ``[build-system]`` requires is installed. Then pip builds with
    ``--no-build-isolation`` (offline, seconds); else pip fetches setuptools into an isolated
    build environment as usual."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    out = subprocess.run([sys.executable, "-c", "import setuptools; print(setuptools.__version__)"],
                         capture_output=True, text=True, timeout=60)
    try:
        return out.returncode == 0 and int(out.stdout.strip().split(".")[0]) >= _needed()
    except ValueError:
        return False


def build_wheel(dest: Path, *, timeout: float = 300.0) -> Path:
    """Build ``fedberry-*.whl`` into ``dest`` and return its path.

    The sources are copied to a temporary directory first: pip builds in the source tree, and
    its ``build/`` and ``*.egg-info`` must not land in the checkout (two test runs at once would
    also share them)."""
    dest = Path(dest).resolve()  # pip runs in the copied sources
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedberry-src-") as tmp:
        src = Path(tmp)
        for name in _SOURCES:
            p = ROOT / name
            if p.is_dir():
                shutil.copytree(p, src / name, ignore=_IGNORE)
            else:
                shutil.copy2(p, src / name)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
               "-q", str(src), "-w", str(dest)]
        if _setuptools_is_enough():
            cmd.insert(4, "--no-build-isolation")
        subprocess.run(cmd, check=True, timeout=timeout, cwd=src)
    wheels = sorted(dest.glob("fedberry-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise RuntimeError(f"pip wheel built no fedberry wheel in {dest}")
    return wheels[-1]


@functools.cache
def cached_wheel() -> Path:
    """One wheel per test process (several tests install it), removed when the process ends."""
    where = Path(tempfile.mkdtemp(prefix="fedberry-dist-"))
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    return build_wheel(where)


if __name__ == "__main__":
    print(build_wheel(Path(sys.argv[1] if len(sys.argv) > 1 else "dist")))
