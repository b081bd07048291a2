"""Real chiefs and workers as processes on loopback, for the robustness, TLS and fuzz tests.

Every wait is bounded; every process started through a :class:`Cluster` is killed when its
``with`` block ends, whatever happened; ports come from binding port 0.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedberry.protocol import auth
from fedberry.protocol.frames import Frame, FrameDecoder, MsgType, encode

TOKEN = "robustness-test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], Any], timeout: float, what: str, every: float = 0.05,
               logs: Callable[[], str] | None = None) -> Any:
    """Poll ``cond`` until true; past ``timeout``, fail saying what, with ``logs()`` if given."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n{logs()}" if logs is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(every)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Proc:
    """A process whose output goes to a log file (a pipe nobody reads could fill and block it)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout:.0f} s; its log:\n"
                                 f"{self.log()[-3000:]}") from None

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)  # a stopped process cannot die of SIGKILL until resumed
            self.popen.kill()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class Cluster:
    """Starts ``fedberry chief`` / ``fedberry worker`` processes in ``tmp``; kills them on exit."""

    def __init__(self, tmp: Path, *, sync_every: int = 50) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.sync_every = sync_every
        self.port = free_port()
        self.out = tmp / "chief"
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.procs: list[Proc] = []
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.env.pop("FEDBERRY_TOKEN", None)

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self, name: str, argv: list[str]) -> Proc:
        model = argv[argv.index("--model") + 1] if "--model" in argv else "mlp"
        if argv[0] == "worker" or (argv[0] == "chief" and model != "none"):
            # The demo's worker trains, and a chief with a --model evaluates, a torch model:
            # the core runs on extra Pythons have no torch (scripts/test-pythons.sh).
            pytest.importorskip("torch", reason="the demo worker and evaluator need torch")
        proc = Proc(name, [sys.executable, "-m", "fedberry", *argv],
                    self.tmp / f"{name}.log", self.env)
        self.procs.append(proc)
        return proc

    def python(self, name: str, argv: list[str]) -> Proc:
        """A plain Python process (``python ARGV``), e.g. a numpy-only worker script."""
        proc = Proc(name, [sys.executable, *argv], self.tmp / f"{name}.log", self.env)
        self.procs.append(proc)
        return proc

    def chief(self, *args: str, name: str = "chief", wait: bool = True) -> Proc:
        proc = self.start(name, ["chief", "--listen", f"127.0.0.1:{self.port}", "--out",
                                 str(self.out), "--token-file", str(self.token_file), *args])
        if wait:
            self.wait_listening(proc)
        return proc

    def wait_listening(self, proc: Proc, timeout: float = 60) -> None:
        def up() -> bool:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                                     f"{proc.log()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return True
            except OSError:
                return False

        wait_until(up, timeout, f"{proc.name} to listen on port {self.port}", every=0.1)

    def worker(self, index: int, count: int, *args: str, url: str | None = None,
               name: str | None = None) -> Proc:
        return self.start(name or f"worker{index}", [
            "worker", "--chief", url or self.url, "--partition", f"{index}/{count}",
            "--token-file", str(self.token_file), "--sync-every", str(self.sync_every),
            "--worker-id", f"w{index}", *args])

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.out)

    def wait_round(self, n: int, timeout: float = 90) -> list[dict[str, Any]]:
        def reached() -> list[dict[str, Any]]:
            for p in self.procs:
                if p.name.startswith("chief") and p.popen.poll() not in (None, 0):
                    raise AssertionError(f"{p.name} died:\n{p.log()[-3000:]}")
            got = self.metrics()
            return got if got and got[-1]["round"] >= n else []

        return wait_until(reached, timeout, f"round {n} to close", every=0.05)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log()[-2000:]}" for p in self.procs)


class Proxy:
    """A TCP relay on loopback between workers and a chief, on its own thread.

    ``record`` keeps every byte that crossed it (both directions), the way a capture on the wire
    would see them; ``drop_all()`` closes the connections it is relaying, as a network failure
    would, while it keeps accepting new ones.
    """

    def __init__(self, upstream_port: int, record: bool = False) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.record = record
        self.captured = bytearray()
        self.accepted = 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                socks = [self._listener] + [s for pair in self._pairs for s in pair]
            try:
                ready, _, _ = select.select(socks, [], [], 0.05)
            except (OSError, ValueError):
                continue  # a socket closed by drop_all() between the copy and select
            for s in ready:
                if s is self._listener:
                    self._accept()
                else:
                    self._relay(s)

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            server = socket.create_connection(self.upstream, 5)
        except OSError:
            client.close()
            return
        with self._lock:
            self._pairs.append((client, server))
            self.accepted += 1

    def _relay(self, s: socket.socket) -> None:
        with self._lock:
            pair = next((p for p in self._pairs if s in p), None)
        if pair is None:
            return
        other = pair[1] if s is pair[0] else pair[0]
        try:
            data = s.recv(1 << 16)
            if data:
                if self.record:
                    self.captured += data
                other.sendall(data)
                return
        except OSError:
            pass
        self._close(pair)

    def _close(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            if pair in self._pairs:
                self._pairs.remove(pair)
        for sock in pair:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def drop_all(self) -> int:
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair)
        return len(pairs)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.drop_all()
        self._listener.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RawClient:
    """A hand-driven connection to a chief, speaking frames byte by byte (blocking sockets).

    ``source`` picks the local address: any 127.x.y.z reaches a chief on 127.0.0.1, so tests can
    stand for many different machines.
    """

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0,
                 rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:  # before connecting, so that the window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.decoder = FrameDecoder()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self) -> Frame | None:
        """The next frame, or None when the chief closed the connection."""
        while True:
            buf = self.decoder.get_buffer()
            try:
                n = self.sock.recv_into(buf)
            except ConnectionResetError:
                return None
            if n == 0:
                return None
            frames = self.decoder.buffer_updated(n)
            if frames:
                return frames[0]

    def answer(self) -> Frame | None:
        """The chief's answer to what we sent, skipping heartbeats; None: it closed."""
        while True:
            f = self.frame()
            if f is None or f.type not in (MsgType.PING, MsgType.PONG):
                return f

    def handshake(self, token: str, spec: list, worker_id: str = "raw",
                  want_model: bool = False) -> Frame:
        """HELLO, CHALLENGE, AUTH; returns the chief's WELCOME (or the ERROR it sent)."""
        nonce = auth.new_nonce()
        self.send(encode(MsgType.HELLO, {"worker_id": worker_id, "nonce": nonce}).tobytes())
        challenge = self.answer()
        assert challenge is not None and challenge.type == MsgType.CHALLENGE, challenge
        self.send(encode(MsgType.AUTH, {
            "proof": auth.worker_proof(token, challenge.meta["nonce"], nonce), "spec": spec,
            "want_model": want_model}).tobytes())
        welcome = self.answer()
        assert welcome is not None
        return welcome

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mlp_spec() -> list:
    """The wire spec of the demo's MLP (784-200-200-10, float32), what real workers announce."""
    shapes = [[200, 784], [200], [200, 200], [200], [10, 200], [10]]
    return [["<f4", s] for s in shapes]
