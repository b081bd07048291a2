"""A Debian bookworm arm64 root to run fedberry in as on a Raspberry Pi 4, under qemu-user.

Built once and cached outside the repository (``~/.cache/fedberry/aarch64-bookworm``, or
``$FEDBERRY_AARCH64_ROOT``), reused by every later run. Also a command:
``python3 tests/aarch64_root.py [--torch]`` builds (or checks) the root and prints its path.

How, and why so (measured on this project's CI machines):

* No ``binfmt_misc`` there, so nothing inside the root can start another arm64 program: every
  arm64 program is run as ``qemu-aarch64-static -cpu cortex-a72 -L ROOT ROOT/usr/bin/python3``
  (``arm64_python``), and nothing is installed from inside (no dpkg configure, no pip there).
* ``debootstrap --foreign --variant=minbase`` downloads the packages and unpacks the first
  stage; the rest is unpacked here through ``tar --keep-directory-symlink``: ``dpkg-deb -x``
  would replace the ``lib -> usr/lib`` symlink and qemu would then not find
  ``/lib/ld-linux-aarch64.so.1``.
* The stdlib is byte-compiled once at build time (Debian does it in a maintainer script that
  never runs here); without it every emulated start compiles it again.
* numpy (and, with ``ensure_torch``, torch 2.9.1, the CPU build that runs on a Pi 4) come from
  the x86 side: ``pip install --target --platform ...aarch64 --only-binary=:all:``. fedberry is
  installed per run from a wheel built on x86 (``install_wheel``): pure Python, one wheel for
  every machine. A worker that holds only ``ca.pem`` needs no ``cryptography``, so the root has
  none, and the TLS tests prove it.
* ``-cpu cortex-a72``: qemu's default ``max`` CPU has instructions a Pi 4 lacks, and would not
  catch the "Illegal instruction" torch 2.10 dies with there.

A stamp file marks a complete root; a root without one (a build that was interrupted) is removed
and built again. A lock file makes a second test run wait for the first one's build.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUITE = "bookworm"
PYTHON_VERSION = "3.11"  # bookworm's python3, what Raspberry Pi OS bookworm has
TORCH = "torch==2.9.1"   # the aarch64 CPU build that runs on a Pi 4 (README, docs/raspberry-pi.md)
CPU = "cortex-a72"       # a Raspberry Pi 4; "cortex-a76" is a Pi 5
# Bump when the recipe below changes: a root stamped by another recipe is built again.
RECIPE = "1"
MIRROR = os.environ.get("FEDBERRY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
TOOLS = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap"}
LOCK_TIMEOUT = 1200.0   # another run's cold build (root and torch) takes a few minutes
STEP_TIMEOUT = 900.0    # one download or unpack step
_STAMP = ".fedberry-root-complete"
_TORCH_STAMP = ".fedberry-torch-complete"


def default_root() -> Path:
    """Where the root lives: ``$FEDBERRY_AARCH64_ROOT``, else ``~/.cache/fedberry/...``."""
    env = os.environ.get("FEDBERRY_AARCH64_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (cache / "fedberry" / f"aarch64-{SUITE}").resolve()


def missing_tools() -> str | None:
    """None when qemu-user-static and debootstrap are there (installing them with apt-get
    first when missing and this is root on a Debian-family machine); else why not, one
    sentence, for a skip."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"{' and '.join(missing)} not installed, and this is not root on a Debian-family "
                "machine, where the test would install them (apt-get install "
                f"{' '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    try:
        subprocess.run(["apt-get", *lock, "update", "-qq"], env=env, timeout=STEP_TIMEOUT,
                       capture_output=True)
        done = subprocess.run(["apt-get", *lock, "install", "-y", "-qq", *missing], env=env,
                              timeout=STEP_TIMEOUT, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return f"apt-get install {' '.join(missing)} did not finish in {STEP_TIMEOUT:.0f} s"
    still = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if still:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"apt-get could not install {' '.join(still)} here: {last}"
    return None


def arm64_python(root: Path, *args: str, cpu: str = CPU) -> list[str]:
    """The argv that runs the root's python3 as an arm64 process on ``cpu``."""
    return [shutil.which("qemu-aarch64-static") or "qemu-aarch64-static", "-cpu", cpu,
            "-L", str(root), str(root / "usr" / "bin" / "python3"), *args]


def emulated_env(*paths: Path, **extra: str) -> dict[str, str]:
    """An environment for an emulated process: ``paths`` (host directories, which qemu's
    ``-L`` falls back to since the root has no such path) are its whole PYTHONPATH, so the
    host's packages and this checkout's src/ never leak in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QEMU_"))}
    env.update(PYTHONPATH=os.pathsep.join(str(p) for p in paths), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@contextmanager
def _locked(root: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another run held {f.name} for {timeout:.0f} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stamp_ok(path: Path) -> bool:
    try:
        return path.read_text().split("\n", 1)[0] == f"recipe {RECIPE}"
    except OSError:
        return False


def _run(cmd: list[str], what: str, **kw) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=STEP_TIMEOUT, **kw)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {out.returncode}): {' '.join(cmd)}\n{tail}")


def _pip_arm64(args: list[str], *reqs: str) -> None:
    """pip ``args`` (install --target, download) for arm64 wheels of bookworm's Python, from the
    x86 side."""
    # pip does not widen a manylinux_2_X platform to older glibcs: name them all, up to
    # bookworm's glibc 2.36.
    platforms = [a for v in range(36, 16, -1) for a in ("--platform", f"manylinux_2_{v}_aarch64")]
    _run([sys.executable, "-m", "pip", *args[:1], "-q", "--disable-pip-version-check",
          *(["--no-warn-script-location", "--root-user-action=ignore"] if args[0] == "install"
            else []), *args[1:],
          *platforms, "--platform", "manylinux2014_aarch64", "--only-binary=:all:",
          "--python-version", PYTHON_VERSION, "--implementation", "cp", *reqs],
         f"pip {' '.join(args)} {' '.join(reqs)}")


def _numpy_requirement() -> str:
    """The host's numpy version (the same numerics on both sides), unless overridden."""
    override = os.environ.get("FEDBERRY_AARCH64_NUMPY")
    if override:
        return override
    try:
        return f"numpy=={importlib.metadata.version('numpy')}"
    except importlib.metadata.PackageNotFoundError:
        return "numpy"


def _build(root: Path) -> None:
    t0 = time.monotonic()
    _run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3",
          SUITE, str(root), MIRROR], f"debootstrap of {SUITE} arm64 into {root}")
    debs = sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    if not debs:
        raise RuntimeError(f"debootstrap left no packages in {root}/var/cache/apt/archives")
    for deb in debs:  # the second stage, by hand (see the module docstring)
        _run(["sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -x --keep-directory-symlink -C "$2"',
              "sh", str(deb), str(root)], f"unpacking {deb.name}")
    for deb in debs:
        deb.unlink()  # 60 MB of downloads the root no longer needs
    if not (root / "lib").is_symlink():
        raise RuntimeError(f"{root}/lib is not the usr/lib symlink: an unpack replaced it")
    _run(arm64_python(root, "-m", "compileall", "-q", "-j2",
                      "-x", "/(test|idlelib|lib2to3|tkinter|turtledemo)/",
                      str(root / "usr" / "lib" / f"python{PYTHON_VERSION}")),
         "byte-compiling the root's stdlib", env=emulated_env())
    numpy = _numpy_requirement()
    _pip_arm64(["install", "--target", str(root / "usr" / "lib" / "python3" / "dist-packages")],
               numpy)
    _run(arm64_python(root, "-c", "import numpy, ssl; print(numpy.__version__)"),
         "a first emulated numpy import", env=emulated_env())
    (root / _STAMP).write_text(f"recipe {RECIPE}\n{SUITE} arm64, {numpy}, built in "
                               f"{time.monotonic() - t0:.0f} s\n")


def ensure_root(root: Path | None = None) -> Path:
    """The cached root, built first if it is missing or incomplete. Needs root (debootstrap),
    the tools of ``missing_tools`` and the network for the first build."""
    root = root or default_root()
    with _locked(root):
        if _stamp_ok(root / _STAMP):
            return root
        # No stamp: an interrupted or older build. Start again from nothing.
        if root.exists():
            shutil.rmtree(root)
        partial = root.with_name(root.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        _build(partial)
        partial.rename(root)
    return root


def _requirements_on_arm64(wheel: Path) -> list[str]:
    """The wheel's requirements as a Pi's pip sees them. pip's ``--platform`` does not apply to
    environment markers, which it evaluates for this x86 host: torch's
    ``platform_machine == "x86_64"`` CUDA packages (GBs of them) would come along."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip carries its own copy
        from pip._vendor.packaging.requirements import Requirement
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(name).decode().splitlines()
    env = {"platform_machine": "aarch64", "platform_system": "Linux", "sys_platform": "linux",
           "os_name": "posix", "python_version": PYTHON_VERSION,
           "python_full_version": f"{PYTHON_VERSION}.2", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "extra": ""}
    reqs = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                req.marker = None
                reqs.append(str(req))
    return reqs


def ensure_torch(root: Path) -> list[Path]:
    """torch 2.9.1 for arm64 (the CPU wheel, ~100 MB download) and its requirements, in
    directories of the root for PYTHONPATH; installed once, stamped like the root."""
    target = root / "opt" / "fedberry-torch"
    dirs = [target / "torch", target / "deps"]
    with _locked(root):
        if _stamp_ok(target / _TORCH_STAMP):
            return dirs
        if target.exists():
            shutil.rmtree(target)
        partial = target.with_name(target.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        t0 = time.monotonic()
        _pip_arm64(["download", "--no-deps", "-d", str(partial / "wheel")], TORCH)
        (wheel,) = (partial / "wheel").glob("torch-*.whl")
        _pip_arm64(["install", "--no-deps", "--target", str(partial / "torch")], str(wheel))
        _pip_arm64(["install", "--target", str(partial / "deps")], *_requirements_on_arm64(wheel))
        shutil.rmtree(partial / "wheel")
        (partial / _TORCH_STAMP).write_text(
            f"recipe {RECIPE}\n{TORCH} ({wheel.name}), installed in "
            f"{time.monotonic() - t0:.0f} s\n")
        partial.rename(target)
    return dirs


def install_wheel(wheel: Path, target: Path) -> Path:
    """fedberry's wheel (pure Python, built on x86) unpacked into ``target`` for PYTHONPATH."""
    _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "--root-user-action=ignore", "--no-deps", "--no-index", "--target", str(target),
          str(wheel)], f"pip install --target {target} {wheel.name}")
    return target


if __name__ == "__main__":
    reason = missing_tools()
    if reason:
        sys.exit(reason)
    built = ensure_root()
    print(built, (built / _STAMP).read_text().splitlines()[1])
    if "--torch" in sys.argv[1:]:
        print(*ensure_torch(built))
