"""The Raspberry Pi path: an arm64 numpy-only ``fedberry.Worker``, emulated as a Pi 4
(qemu-user, ``-cpu cortex-a72``, Debian bookworm's Python, fedberry from the wheel built on x86),
trains with a native worker and a native chief, over plain TCP with a token, with q8 both ways,
and with TLS (the arm64 side holds only ``ca.pem``: no ``cryptography`` there).

Each round's global model, on the chief and on both workers, equals bit for bit the sample-
weighted mean numpy computes the way the chief does (float32 tensors summed in float32, float64
and integer tensors in float64, integers rounded back; q8 updates decoded on x86 from what the
arm64 worker sent, so its quantization must match x86's to the bit); float32 results are also
within float32 rounding of the float64 mean. The weights are 40 and 80: with a power-of-two ratio
the float32 sum does not depend on which update arrives first (the test checks that premise too).

The arm64 root is built once (about a minute, tests/aarch64_root.py) and cached outside the
repository; one emulated process runs all three variants, since an emulated Python start and
imports take seconds. The slower job (torch 2.9.1 and the real demo worker) is
``test_torch_demo_worker_under_emulation``, opt-in: ``FEDBERRY_AARCH64_TORCH=1``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from aarch64_root import (
    CPU,
    arm64_python,
    emulated_env,
    ensure_root,
    ensure_torch,
    install_wheel,
    missing_tools,
)
from fedberry_wheel import cached_wheel
from helpers import fedberry_env, processes

from fedberry import Worker, codecs
from fedberry.protocol.frames import spec_of
from fedberry.serve import Listening, serve

pytestmark = pytest.mark.heavy  # an emulated process; the same on every host Python

TOKEN = "aarch64-test-token"
ROUNDS = 2
WEIGHTS = {"x86": 40.0, "pi4": 80.0}  # a ratio of 2: the float32 sum is order-independent
SHAPES = [((64, 33), "float32"), ((300,), "float32"), ((5,), "float64"), ((3,), "int64")]
VARIANTS = ("plain", "q8", "tls")
EMULATED_TIMEOUT = 300.0  # a loaded machine: the start alone took 13 s once
TORCH_TIMEOUT = 1500.0  # importing torch under emulation took 2 min on a loaded machine

# What the arm64 process runs: numpy and fedberry only. Its updates come from its own seeded
# generator; it saves what it sent and what it got back, round by round, for the test to check.
PI_WORKER = textwrap.dedent("""
    import json, sys, time
    t0 = time.monotonic()
    import numpy as np
    import fedberry
    from fedberry import Worker
    imported = time.monotonic() - t0
    cfg = json.loads(sys.argv[1])
    times = {"import_s": round(imported, 2)}
    for v in cfg["variants"]:
        t = time.monotonic()
        rng = np.random.default_rng(v["seed"])
        out = {}
        with Worker(v["url"], worker_id="pi4", token=v["token"], ca=v["ca"], codec=v["codec"],
                    connect_timeout=60, reconnect_timeout=30) as w:
            got = w.join([np.zeros(s, d) for s, d in cfg["shapes"]])
            for r in range(cfg["rounds"]):
                mine = [(g + rng.standard_normal(g.shape)).astype(g.dtype) if g.dtype.kind == "f"
                        else g + rng.integers(0, 50, g.shape) for g in got]
                got = w.sync(mine, cfg["weight"])
                out.update({f"sent{r}_{i}": a for i, a in enumerate(mine)})
                out.update({f"got{r}_{i}": a for i, a in enumerate(got)})
            out["done"] = np.array(w.done)
        np.savez(v["out"], **out)
        times[v["name"] + "_s"] = round(time.monotonic() - t, 2)
    print(json.dumps({"machine": __import__("platform").machine(), "fedberry": fedberry.__file__,
                      "has_cryptography": __import__("importlib.util").util.find_spec(
                          "cryptography") is not None, **times}))
""")


@pytest.fixture(scope="module")
def pi_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The cached arm64 root and this checkout's wheel unpacked for it."""
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    root = ensure_root()
    print(f"arm64 root ready in {time.monotonic() - t0:.1f} s: {root}")
    site = install_wheel(cached_wheel(),
                         tmp_path_factory.mktemp("pi-site"))
    return root, site


def _initial() -> list[np.ndarray]:
    rng = np.random.default_rng(2017)
    return [rng.standard_normal(s).astype(d) if d.startswith("float")
            else rng.integers(0, 1000, s).astype(d) for s, d in SHAPES]


def _chief_mean(updates: list[tuple[list[np.ndarray], float]]) -> list[np.ndarray]:
    """The chief's FedAvg, in numpy: float32 tensors summed in float32 (in units of the first
    update's weight), others in float64, scaled to the mean, integers rounded back."""
    (first, w0), *rest = updates
    total = w0 + sum(w for _, w in rest)
    out = []
    for t, a in enumerate(first):
        acc = a.astype(np.float32 if a.dtype == np.float32 else np.float64)
        for u, w in rest:
            acc = acc + (u[t] * (w / w0)).astype(acc.dtype)
        acc = acc * (w0 / total)
        out.append(np.rint(acc).astype(a.dtype) if a.dtype.kind == "i" else acc.astype(a.dtype))
    return out


def _check_round(sent: dict[str, list[np.ndarray]], got: list[np.ndarray], what: str,
                 downlink: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None) -> None:
    """``got`` is the chief's mean of ``sent`` (through the q8 downlink when given), bit for
    bit; without a lossy downlink also within float32 rounding of the float64 mean."""
    pairs = [(sent[k], WEIGHTS[k]) for k in ("x86", "pi4")]
    want = _chief_mean(pairs)
    for a, b in zip(want, _chief_mean(pairs[::-1])):
        np.testing.assert_array_equal(a, b, err_msg=f"{what}: the premise, order-independence")
    if downlink is not None:
        want = downlink(want)
    total = sum(WEIGHTS.values())
    for t, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}, tensor {t}"
        np.testing.assert_array_equal(g, w, err_msg=f"{what}, tensor {t}: not bit for bit")
        exact = sum(WEIGHTS[k] * sent[k][t].astype(np.float64) for k in sent) / total
        if g.dtype.kind == "i":
            np.testing.assert_array_equal(g, np.rint(exact).astype(g.dtype), err_msg=what)
        elif g.dtype == np.float32 and downlink is None:
            np.testing.assert_allclose(g, exact, rtol=4e-7, atol=1e-7, err_msg=what)


def _native_worker(url: str, codec: str, ca: str | None, result: dict) -> None:
    rng = np.random.default_rng(40)
    rounds = []
    try:
        with Worker(url, worker_id="x86", token=TOKEN, ca=ca, codec=codec, connect_timeout=30,
                    reconnect_timeout=10) as w:
            got = w.join([np.zeros(s, d) for s, d in SHAPES])
            for _ in range(ROUNDS):
                mine = [(g + rng.standard_normal(g.shape)).astype(g.dtype)
                        if g.dtype.kind == "f" else g + rng.integers(0, 50, g.shape) for g in got]
                new = w.sync(mine, WEIGHTS["x86"])
                rounds.append((mine, new))
                got = new
            result["done"] = w.done
    except BaseException as e:  # reported by the test, which joins this thread
        result["error"] = e
    result["rounds"] = rounds


def _decoded_q8(rounds_sent: list[list[np.ndarray]], rounds_start: list[list[np.ndarray]]):
    """What the chief decodes from a q8 worker's updates (x86 numerics), error feedback kept
    across rounds as the worker keeps it."""
    q8 = codecs.CODECS["q8"]
    residual = [np.zeros(a.shape, np.result_type(a.dtype, np.float32)) if a.dtype.kind == "f"
                else np.zeros(0) for a in rounds_sent[0]]
    out = []
    for sent, start in zip(rounds_sent, rounds_start):
        wire = q8.encode(sent, start, residual)
        out.append(q8.decode(wire, spec_of(sent), start))
    return out


class _Q8Downlink:
    """The chief's q8 downlink (chief/broadcast.py) in x86 numerics: each round's mean goes out
    as its change since the previous round's model, error feedback kept across rounds."""

    def __init__(self, initial: list[np.ndarray]) -> None:
        self.prev = initial
        self.residual = [np.zeros(a.shape, np.result_type(a.dtype, np.float32))
                         if a.dtype.kind == "f" else np.zeros(0) for a in initial]

    def __call__(self, mean: list[np.ndarray]) -> list[np.ndarray]:
        q8 = codecs.CODECS["q8"]
        decoded = q8.decode(q8.encode(mean, self.prev, self.residual), spec_of(mean), self.prev)
        self.prev = [d if a.dtype.kind == "f" else a for a, d in zip(mean, decoded)]
        return self.prev


def test_an_emulated_pi4_worker_averages_bit_for_bit(pi_root, tmp_path):
    root, site = pi_root
    initial = _initial()
    tls = _tls_files(tmp_path)
    handles, configs, natives, threads = {}, [], {}, {}
    try:
        for i, name in enumerate(VARIANTS):
            listening = Listening(token=TOKEN, **({"tls_cert": tls[1], "tls_key": tls[2]}
                                                  if name == "tls" else {}))
            handles[name] = serve("127.0.0.1:0", workers=2, rounds=ROUNDS,
                                  initial=[a.copy() for a in initial], listening=listening,
                                  downlink="q8" if name == "q8" else "none")
            codec = "q8" if name == "q8" else "none"
            ca = tls[0] if name == "tls" else None
            natives[name] = result = {}
            threads[name] = threading.Thread(
                target=_native_worker, args=(handles[name].url, codec, ca, result), daemon=True,
                name=f"x86-{name}")
            threads[name].start()
            configs.append({"name": name, "url": handles[name].url, "token": TOKEN, "ca": ca,
                            "codec": codec, "seed": 80 + i, "out": str(tmp_path / f"{name}.npz")})
        cfg = {"variants": configs, "rounds": ROUNDS, "weight": WEIGHTS["pi4"],
               "shapes": [[list(s), d] for s, d in SHAPES]}
        with processes() as procs:
            procs.append(subprocess.Popen(
                arm64_python(root, "-c", PI_WORKER, json.dumps(cfg), cpu=CPU),
                env=emulated_env(site), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, cwd=tmp_path))
            out, err = procs[0].communicate(timeout=EMULATED_TIMEOUT)
            assert procs[0].returncode == 0, f"the emulated worker failed:\n{err[-3000:]}"
        report = json.loads(out.strip().splitlines()[-1])
        print("emulated Cortex-A72 worker:", report)
        assert report["machine"] == "aarch64"
        assert Path(report["fedberry"]).is_relative_to(site)  # the wheel, not the checkout
        assert not report["has_cryptography"]  # TLS worked with ca.pem alone
        for name in VARIANTS:
            assert handles[name].wait(30), f"{name}: the chief did not finish"
            threads[name].join(30)
            assert not threads[name].is_alive(), f"{name}: the native worker did not finish"
            _check_variant(name, tmp_path / f"{name}.npz", natives[name],
                           handles[name].chief.global_arrays, initial)
    finally:
        for h in handles.values():
            h.stop()


def _check_variant(name: str, npz: Path, native: dict, final: list[np.ndarray],
                   initial: list[np.ndarray]) -> None:
    assert "error" not in native, f"{name}: the native worker failed: {native.get('error')!r}"
    assert native.get("done"), f"{name}: the native worker did not finish"
    k = len(SHAPES)
    with np.load(npz) as z:
        assert bool(z["done"])
        pi = [([z[f"sent{r}_{i}"] for i in range(k)], [z[f"got{r}_{i}"] for i in range(k)])
              for r in range(ROUNDS)]
    x86 = native["rounds"]
    starts = [initial] + [got for _, got in x86[:-1]]
    sent = {"x86": [s for s, _ in x86], "pi4": [s for s, _ in pi]}
    downlink = None
    if name == "q8":
        sent = {who: _decoded_q8(s, starts) for who, s in sent.items()}
        downlink = _Q8Downlink(initial)
    for r in range(ROUNDS):
        what = f"{name}, round {r + 1}"
        _check_round({who: s[r] for who, s in sent.items()}, x86[r][1], what, downlink)
        for t, (a, b) in enumerate(zip(pi[r][1], x86[r][1])):
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: the Pi's model, tensor {t}")
    for a, b in zip(final, x86[-1][1]):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: the chief's final model")


def _tls_files(where: Path) -> tuple[str, str, str]:
    certs = pytest.importorskip("fedberry.certs")
    pytest.importorskip("cryptography", reason="making the chief's certificate needs fedberry[tls]")
    ca, ca_key = certs.create_ca(where / "pki")
    cert, key = certs.create_chief_cert(where / "pki", ca, ca_key, ["127.0.0.1"])
    return str(ca), str(cert), str(key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, chief: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert chief.poll() is None, f"the chief exited early ({chief.returncode})"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"the chief was not listening on port {port} after {timeout:.0f} s")


@pytest.mark.aarch64_torch
@pytest.mark.skipif(os.environ.get("FEDBERRY_AARCH64_TORCH") != "1",
                    reason="opt-in (FEDBERRY_AARCH64_TORCH=1): installs torch 2.9.1 for arm64 "
                           "(~100 MB, once) and trains under emulation for minutes")
def test_torch_demo_worker_under_emulation(pi_root, tmp_path):
    """The real ``fedberry worker`` (torch 2.9.1, the Fashion-MNIST MLP) as a Pi 4, two rounds
    with a native ``fedberry chief``."""
    pytest.importorskip("torch", reason="the native chief evaluates with torch")
    root, site = pi_root
    t0 = time.monotonic()
    torch_dirs = ensure_torch(root)
    print(f"torch for arm64 ready in {time.monotonic() - t0:.1f} s")
    assert any(p.name.startswith("torch-2.9.1") for p in torch_dirs[0].glob("*.dist-info"))
    token = tmp_path / "fedberry.token"
    token.write_text(TOKEN + "\n")
    port = _free_port()
    out = tmp_path / "chief"
    with processes() as procs:
        procs.append(chief := subprocess.Popen(
            [sys.executable, "-m", "fedberry", "chief", "--listen", f"127.0.0.1:{port}",
             "--workers", "1", "--rounds", "2", "--out", str(out), "--token-file", str(token)],
            env=fedberry_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        _wait_listening(port, chief, 120)
        t1 = time.monotonic()
        procs.append(pi := subprocess.Popen(
            arm64_python(root, "-m", "fedberry", "worker", "--chief", f"tcp://127.0.0.1:{port}",
                         "--partition", "1/60", "--sync-every", "10", "--token-file", str(token),
                         "--worker-id", "pi4", cpu=CPU),
            env=emulated_env(site, *torch_dirs), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=tmp_path))
        pi_out, _ = pi.communicate(timeout=TORCH_TIMEOUT)
        print(f"emulated torch worker: {time.monotonic() - t1:.1f} s")
        assert pi.returncode == 0, f"the emulated torch worker failed:\n{pi_out[-3000:]}"
        chief_out, _ = chief.communicate(timeout=120)
        assert chief.returncode == 0, f"the chief failed:\n{chief_out[-3000:]}"
    assert "finished" in pi_out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["workers"] == 1 for r in rows)
    # Ten classes: a model that learned anything beats chance on the 10k test set.
    assert all(r["test_accuracy"] > 0.1 for r in rows)
