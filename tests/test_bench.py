"""`fedberry bench`: every mode produces a sane row, the files are written, the bounds are honest.

The end-to-end tests run the real thing (processes, link emulation) in its quick form and check
shape and sanity only, never speed: this machine may be busy with other tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedberry.bench import netns
from fedberry.bench.cli import apply_overrides
from fedberry.bench.config import MODES, BenchConfig, quick
from fedberry.bench.harness import ModeResult, Point
from fedberry.bench.report import ratio, ratios, table
from fedberry.bench.shaper import SharedLink
from fedberry.serve import serve
from fedberry.transports.tcp import ListenOptions
from fedberry.worker import Worker

# The modes train torch models; the rest (tables, configuration, the pacing hook) is numpy only.
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="the benchmark's modes need torch (the torch extra)")
DATA = Path(os.environ.get("FEDBERRY_DATA_DIR", "/usr/share/datasets/fashion-mnist"))
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"Fashion-MNIST not in {DATA}")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- pure parts
def test_ratio_bounds() -> None:
    assert ratio(400.0, False, 100.0, False) == (4.0, "=")
    # The reference missed the target: it took at least 400 s, so the speedup is at least 4.
    assert ratio(400.0, True, 100.0, False) == (4.0, ">=")
    # The mode itself missed it: its time is a lower bound, the speedup an upper one.
    assert ratio(400.0, False, 100.0, True) == (4.0, "<=")
    assert ratio(400.0, True, 100.0, True)[1] == "?"
    assert ratio(None, False, 1.0, False) == (None, "?")
    assert ratio(1.0, False, 0.0, False) == (None, "?")


def _result(mode: str, t: float, nbytes: int, reached: bool = True) -> ModeResult:
    r = ModeResult(mode, 6, "step", {}, reached=reached, time_to_target_s=t,
                   lower_bound=not reached, k_to_target=3, bytes_to_target=nbytes,
                   per_worker_to_target=nbytes / 6, final_acc=0.86 if reached else 0.8)
    r.points = [Point(t, 3, r.final_acc, None, nbytes, nbytes / 6)]
    return r


def test_table_marks_lower_bounds() -> None:
    res = {"single": _result("single", 2.0, 0), "dsgd": _result("dsgd", 420.0, 10**9, False),
           "fedavg": _result("fedavg", 20.0, 10**7)}
    rat = ratios(res)
    assert rat["fedavg"]["speedup_vs_dsgd"] == {"value": 21.0, "kind": ">="}
    assert rat["fedavg"]["fewer_bytes_vs_dsgd"]["kind"] == ">="
    assert rat["dsgd"]["speedup_vs_single"]["kind"] == "<="
    text = table(res, 0.85)
    assert ">=420.0 (not reached)" in text
    assert ">=21.0x" in text
    md = table(res, 0.85, markdown=True)
    assert md.count("\n") == 2 + len(res) - 1 and md.startswith("| mode |")


def test_overrides_and_quick() -> None:
    cfg = BenchConfig()
    apply_overrides(cfg, ["dsgd.lr=0.01", "dsgd.optim=sgd", "fedavg.local_epochs=3",
                          "ddp.time_cap_s=10"])
    assert cfg.per_mode["dsgd"].optim.lr == 0.01 and cfg.per_mode["dsgd"].optim.name == "sgd"
    assert cfg.per_mode["fedavg"].local_epochs == 3
    assert cfg.per_mode["ddp"].time_cap_s == 10.0
    for bad in ("dsgd.nope=1", "nomode.lr=1", "dsgd.lr"):
        with pytest.raises(ValueError):
            apply_overrides(cfg, [bad])
    q = quick(BenchConfig())
    assert q.workers < BenchConfig().workers and q.target < BenchConfig().target
    assert BenchConfig().per_mode["fedavg"].local_epochs != q.per_mode["fedavg"].local_epochs


# ---------------------------------------------------------------------------- the shaper hook
def test_chief_shaper_paces_a_round() -> None:
    """With the link's buckets as the listener's pacing, the chief's traffic goes through them:
    a round cannot finish faster than its bytes allow at the link rate, and the average is
    unchanged."""

    n, size, rate_mbit = 2, 100_000, 8.0  # 400 kB per model, 1 MB/s
    init = [np.zeros(size, np.float32)]
    link = SharedLink.from_mbit(rate_mbit)
    handle = serve("127.0.0.1:0", workers=n, rounds=2, initial=init, token="t" * 32,
                   listen_options=ListenOptions(pacing=link.pacing()))
    out: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        with Worker(handle.url, token="t" * 32, worker_id=f"w{i}") as w:
            a = w.join([np.ones(size, np.float32)])  # not the chief's model: downloaded
            while not w.done:
                a = w.sync([a[0] + i + 1], 1.0)
            out[i] = a[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    handle.stop()
    assert len(out) == n
    np.testing.assert_allclose(out[0], np.full(size, 3.0))  # (1+2)/2 per round, two rounds
    # Both directions went through the buckets, every byte of them.
    assert link.uplink.total_bytes >= handle.server.bytes_up > 2 * n * size * 4
    assert link.downlink.total_bytes >= handle.server.bytes_down > 3 * n * size * 4
    # A floor, not a speed assertion: 2 rounds x (n models up, then n down) + the join.
    floor = (5 * n * size * 4 - 2 * 32 * 1024) / link.uplink.rate
    assert elapsed >= 0.9 * floor


# ---------------------------------------------------------------------------- end to end
def _run_bench(tmp_path: Path, *args: str, timeout: float = 420) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "fedberry", "bench", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stdout


def _check_row(name: str, r: dict[str, Any], cap: float) -> None:
    assert r["mode"] == name
    assert r["points"], f"{name}: no evaluated model"
    for p in r["points"]:
        assert 0.0 <= p["acc"] <= 1.0
    ts = [p["t"] for p in r["points"]]
    assert ts == sorted(ts) and ts[0] >= 0
    assert 0.0 <= r["final_acc"] <= 1.0 and r["final_acc"] == r["points"][-1]["acc"]
    # Reached and lower bound are two sides of one coin, and the time matches the flag.
    assert r["reached"] != r["lower_bound"]
    assert r["time_to_target_s"] > 0 and r["k_to_target"] >= 1
    if r["reached"]:
        hit = next(p for p in r["points"] if p["acc"] >= r["target"])
        assert r["time_to_target_s"] == hit["t"]
    else:
        assert r["time_to_target_s"] >= r["points"][-1]["t"]
    if name != "single":
        assert r["bytes_to_target"] > 0 and r["per_worker_to_target"] > 0
        assert r["workers"] >= 2


@needs_torch
@needs_data
def test_quick_every_mode(tmp_path: Path) -> None:
    """`fedberry bench --quick`: namespaces when this runs as root, else the in-process shaper."""
    res, stdout = _run_bench(tmp_path, "--quick")
    assert res["status"] == "done"
    # flower runs when a Python with Flower is found (flower_python.py), else says why not.
    assert set(res["modes"]) | set(res["skipped"]) == set(MODES)
    assert set(res["skipped"]) <= {"flower"}
    if "flower" in res["skipped"]:
        assert "flower: skipped, no Python with Flower" in stdout
    target = res["config"]["target"]
    for name, r in res["modes"].items():
        r["target"] = target
        _check_row(name, r, res["config"]["per_mode"][name]["time_cap_s"])
        assert name in stdout
    # Our dsgd averages gradients through the chief as DDP does through gloo: with the same
    # data order they compute the same models. Only float rounding differs (gloo sums in float32
    # in ring order, our chief in float64), which training amplifies over tens of steps.
    dsgd = {p["k"]: p["acc"] for p in res["modes"]["dsgd"]["points"]}
    ddp = {p["k"]: p["acc"] for p in res["modes"]["ddp"]["points"]}
    first = [k for k in sorted(set(dsgd) & set(ddp)) if k <= 5]
    assert first and all(abs(dsgd[k] - ddp[k]) < 2e-3 for k in first)
    # What the chief evaluated is what worker 1 holds.
    assert res["modes"]["dsgd"]["crc_match"] is True
    assert res["modes"]["fedavg"]["crc_match"] is True
    if "flower" in res["modes"]:
        _check_flower(res, res["modes"]["flower"])
    # Our counters against the link's: payload <= what crossed the interfaces.
    if res["link"]["kind"] == "netns":
        for name in ("dsgd", "fedavg"):
            r = res["modes"][name]
            assert r["socket_bytes_to_target"] <= r["bytes_to_target"]
            assert r["bytes_to_target"] < 1.15 * r["socket_bytes_to_target"]
    # Emulated devices: every process but the chief under the quota (when cgroups allow), and
    # each mode's training speed per device reported.
    dev = res["devices"]
    for name in ("single", "dsgd", "fedavg"):
        r = res["modes"][name]
        assert r["samples_per_s"] > 0
        assert r["device_cpu"] == (dev["cores"] if dev["applied"] else None)
    # Latency: the relay sits between the workers and our chief, not on ddp's ring.
    if res["config"]["latency"] == "relay":
        assert res["link"]["latency"]["delay_ms"] == res["config"]["delay_ms"] > 0
        for name in ("dsgd", "fedavg"):
            assert any("relay" in n for n in res["modes"][name]["notes"])
        assert any("relay" in n for n in res["modes"]["ddp"]["notes"])
    for png in res["plots"]:
        assert Path(png).read_bytes()[:8] == PNG_MAGIC
    assert {Path(p).name for p in res["plots"]} == {"accuracy_vs_time.png",
                                                    "accuracy_vs_bytes.png"}
    assert "ratios" in res and "speedup_vs_dsgd" in res["ratios"]["fedavg"]
    check = res["check_shaper"]
    if res["link"]["kind"] == "netns":  # the check runs by default on namespaces
        assert check["s_per_step_netns"] > 0 and check["s_per_step_shaper"] > 0
        # The same steps move the same payload whichever emulation carries it.
        assert check["bytes_shaper_over_netns"] == pytest.approx(1.0, rel=0.01)
        # Like with like: both serve the workers in turn, full duplex; and the run says how
        # far apart the workers got each step's mean through each.
        assert res["link"]["queue"] == check["netns_queue"] == "fair"
        assert check["unlike"] is None
        assert check["mean_spread_s_netns"] >= 0 and check["mean_spread_s_shaper"] >= 0
    else:
        assert check is None


def _check_flower(res: dict[str, Any], fl: dict[str, Any]) -> None:
    """The flower row: fedavg's training through Flower, over the same link, counted alike."""
    fa = res["modes"]["fedavg"]
    assert fl["config"]["local_epochs"] == fa["config"]["local_epochs"]
    assert fl["config"]["optim"] == fa["config"]["optim"]
    assert fl["config"]["batch_size"] == fa["config"]["batch_size"]
    assert fl["workers"] == fa["workers"] and fl["unit"] == "round"
    assert fl["crc_match"] is True  # the server evaluated what client 1 then received
    assert any("Flower 1.42" in n for n in fl["notes"])
    if res["config"]["latency"] == "relay":
        assert any("relay" in n for n in fl["notes"])
    if res["link"]["kind"] == "netns":
        assert fl["bytes_source"] == fa["bytes_source"]  # the workers' interfaces
        # Flower sends float32 both ways and downloads the initial model: a round moves at
        # least three float32 models per client; fedavg's q8 both ways, at most about one.
        from fedberry.demo.torch_demo import initial_model

        model_bytes = sum(a.nbytes for a in initial_model(res["config"]["model"], 0))
        k = fl["k_to_target"]
        assert fl["bytes_to_target"] >= fl["workers"] * (2 * k + 1) * model_bytes * 0.9
        assert fl["bytes_to_target"] <= sum(fl["qdisc_bytes"].values()) * 1.05
    assert fl["samples_per_s"] > 0


@needs_torch
@needs_data
def test_in_process_shaper_fallback(tmp_path: Path) -> None:
    """The path a machine without root takes: our chief shapes, nothing needs privileges."""
    res, _ = _run_bench(tmp_path, "--quick", "--link", "shaper", "--modes", "dsgd,fedavg",
                        "--workers", "2", "--target", "0.7", "--no-plots")
    assert res["link"]["kind"] == "shaper"
    for name in ("dsgd", "fedavg"):
        r = res["modes"][name]
        r["target"] = 0.7
        _check_row(name, r, 60.0)
        assert r["bytes_source"].startswith("chief's sockets")
    assert "plots" not in res


def test_flower_skipped_without_python(tmp_path: Path) -> None:
    """No Flower Python: the flower mode is skipped with one sentence, the run goes on."""
    res, stdout = _run_bench(tmp_path, "--modes", "flower", "--flower-python",
                             str(tmp_path / "no-python"), "--no-plots", "--no-check-shaper",
                             "--link", "shaper", "--device-cpu", "0", timeout=120)
    assert res["modes"] == {} and list(res["skipped"]) == ["flower"]
    assert "no-python" in res["skipped"]["flower"]
    assert stdout.count("flower: skipped") == 1


def test_cli_refuses_nonsense(tmp_path: Path) -> None:
    for args in (["--modes", "warp"], ["--target", "2"], ["--set", "dsgd.lr"]):
        proc = subprocess.run([sys.executable, "-m", "fedberry", "bench", "--out",
                               str(tmp_path), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, args
        assert "error" in proc.stderr


@pytest.mark.skipif(netns.available()[0], reason="only where namespaces are unavailable")
def test_check_shaper_needs_namespaces(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedberry", "bench", "--check-shaper",
                           "--link", "shaper", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "namespaces" in proc.stderr
