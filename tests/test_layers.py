"""The layers at run time: importing fedberry loads no optional extra, and `connect` dispatches.

pyproject.toml's import-linter contracts check the import graph (`lint-imports`, run by
scripts/test.sh); this checks what a fresh interpreter actually loads, which the graph cannot
tell apart (a function-local import of torch is fine, a module-level one is not).
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

import fedberry
from fedberry.errors import FederationError
from fedberry.serve import serve
from fedberry.transports import connect as connect_mod
from fedberry.transports.connect import InProcessChief, connect, register, schemes
from fedberry.transports.local import LocalSession
from fedberry.transports.pacing import Pacer, Pacing
from fedberry.worker import Worker

EXTRAS = ("torch", "keras", "jax", "tensorflow", "mpi4py", "matplotlib", "cryptography",
          "lightning", "safetensors", "prometheus_client", "dp_accounting", "playwright", "flwr")
# These exist to bridge a framework and import it at load, as a user's `import fedberry.torch`
# should (status.prom: prometheus_client, loaded by the status server only when one starts):
# everything else imports without any extra.
FRAMEWORK_MODULES = {"fedberry.torch", "fedberry.keras", "fedberry.integrations.torch",
                     "fedberry.integrations.keras", "fedberry.demo.models",
                     "fedberry.lightning", "fedberry.integrations.lightning",
                     "fedberry.status.prom",
                     # A Flower App (ServerApp + ClientApp): only the Flower Python of the
                     # secure-aggregation benchmark loads it, never fedberry itself.
                     "fedberry.bench.flower_secagg_app"}


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(fedberry.__path__, "fedberry.")
                  if m.name not in FRAMEWORK_MODULES and not m.name.endswith("__main__"))


def test_importing_fedberry_loads_no_optional_extra() -> None:
    modules = _all_modules()
    assert "fedberry.transports.mpi" in modules and "fedberry.cli" in modules
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted(e for e in {EXTRAS!r} if e in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], f"loaded at import: {proc.stdout}"


# ---------------------------------------------------------------------------- connect
def test_connect_refuses_an_unknown_scheme_and_a_non_address() -> None:
    with pytest.raises(FederationError, match=r"unknown chief address 'udp://x:1': use mpi:// "
                                              r"or tcp://"):
        connect("udp://x:1", worker_id="w")
    with pytest.raises(TypeError, match="chief must be an address"):
        connect(7777, worker_id="w")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a scheme is a word"):
        register("tcp+tls", lambda address, **kw: None)  # type: ignore[arg-type,return-value]


def test_a_registered_scheme_is_dialled_with_the_worker_options() -> None:
    seen: dict[str, Any] = {}

    class Echo:  # a session that averages with nobody: it returns what it was given
        bytes_sent = bytes_received = 0

        def join(self, arrays: Any) -> Any:
            return 0, list(arrays), False

        def sync(self, round_: int, arrays: Any, num_samples: float, metrics: Any) -> Any:
            return round_ + 1, list(arrays), True

        def close(self) -> None:
            seen["closed"] = True

    def dial(address: str, *, worker_id: str, **options: Any) -> Echo:
        seen.update(address=address, worker_id=worker_id, options=options)
        return Echo()

    register("echo", dial)
    try:
        assert "echo" in schemes()
        with Worker("echo://here", worker_id="w1", heartbeat=2.0) as w:
            out = w.sync([np.ones(3, np.float32)], 1.0)
            assert w.done and w.round == 1
        np.testing.assert_array_equal(out[0], np.ones(3, np.float32))
        assert seen["address"] == "echo://here" and seen["worker_id"] == "w1"
        assert seen["options"]["heartbeat"] == 2.0 and seen["closed"]
    finally:
        del connect_mod._DIALERS["echo"]


def test_an_in_process_chief_hands_out_a_local_session() -> None:
    initial = [np.zeros(4, np.float32)]
    handle = serve(None, workers=1, rounds=1, initial=initial)
    try:
        assert isinstance(handle, InProcessChief)
        with Worker(handle, worker_id="local") as w:
            assert isinstance(w.session, LocalSession)
            out = w.sync([np.full(4, 2.0, np.float32)], 1.0)
        np.testing.assert_array_equal(out[0], np.full(4, 2.0, np.float32))
        assert w.done
    finally:
        handle.stop()


def test_pacing_takes_any_pacer_and_refuses_an_empty_chunk() -> None:
    class Fixed:
        def reserve(self, nbytes: int) -> float:
            return 0.0

    assert isinstance(Fixed(), Pacer)
    assert Pacing(uplink=Fixed()).downlink is None
    with pytest.raises(ValueError, match="chunk must be a positive"):
        Pacing(chunk=0)
