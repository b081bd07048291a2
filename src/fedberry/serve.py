"""Start a chief: ``fedberry.serve(...)`` in the background, or ``run_chief(...)`` to block.

The chief runs its event loop on its own thread, so the same process can also train as a worker
(``Worker(chief=handle)``, the original design's worker 0) while TCP workers connect.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedberry.certs import server_context
from fedberry.chief import checkpoint as ckpt_io
from fedberry.chief.runtime import ChiefServer, Evaluate
from fedberry.chief.state import Chief, ChiefConfig
from fedberry.protocol.auth import resolve_token
from fedberry.protocol.frames import spec_mismatch, spec_of
from fedberry.strategies import make_strategy
from fedberry.transports.local import LocalSession
from fedberry.transports.loop import LoopThread
from fedberry.transports.tcp import ListenOptions, TcpChief, parse_address

log = logging.getLogger("fedberry.chief")


class ChiefHandle:
    """A running chief. ``address`` is where it listens (None without TCP)."""

    def __init__(self, server: ChiefServer, io: LoopThread, tcp: Any = None) -> None:
        self.server = server
        self.io = io
        self.tcp = tcp
        self.address: tuple[str, int] | None = None
        self._task: Any = None

    @property
    def url(self) -> str:
        assert self.address is not None, "this chief does not listen on TCP"
        return f"tcp://{self.address[0]}:{self.address[1]}"

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return list(self.server.metrics.records)

    @property
    def chief(self) -> Chief:
        return self.server.chief

    def local_session(self, worker_id: str) -> LocalSession:
        """A worker in this process (``Worker(chief=handle)``): no bytes, the same rounds."""
        return LocalSession(self.server, self.io.loop, worker_id)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the chief has finished (True) or ``timeout`` passed (False)."""
        try:
            self._task.result(timeout)
            return True
        except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before 3.11
            return False

    def stop(self) -> None:
        if self.server.finished is not None:
            self.io.loop.call_soon_threadsafe(self.server.finished.set)
        try:
            self._task.result(15)
        except Exception as exc:
            log.debug("stop: %s", exc)
        self.io.stop()

    def __enter__(self) -> ChiefHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(listen: str | None = "127.0.0.1:0", *, workers: int = 1, rounds: int | None = None,
          min_workers: int = 1, round_timeout: float | None = None, strategy: str = "fedavg",
          initial: Sequence[np.ndarray] | None = None, evaluate: Evaluate | None = None,
          out_dir: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
          resume: bool = False, token: str | None = None, token_file: str | None = None,
          tls_cert: str | None = None, tls_key: str | None = None, client_ca: str | None = None,
          insecure: bool = False, max_connections: int = 256, idle_timeout: float = 60.0,
          handshake_timeout: float = 15.0, finish_grace: float = 30.0,
          run_config: dict[str, Any] | None = None,
          on_round: Callable[[dict[str, Any]], None] | None = None,
          downlink: str = "none", receive_memory: int = 64 << 20,
          listen_options: ListenOptions | None = None) -> ChiefHandle:
    """Start a chief in the background and return once it accepts connections.

    ``downlink``: how the global model travels to TCP workers: ``none``, ``fp16`` (half the
    bytes) or ``q8`` (the change since the previous round in 8 bits, a quarter; a worker that
    missed a round gets the whole model). The chief keeps the model exactly as the workers decode
    it (broadcast.py).

    ``receive_memory``: bytes of TCP updates read at once, all workers together (at least one
    update); the others wait their turn in their sockets, so that the chief's memory does not
    grow with the number of workers sending at the same moment.

    ``listen_options``: the TCP listener's other settings (``transports.tcp.ListenOptions``:
    per-address handshake and authentication-delay limits, ``bind_worker_id``, ``pacing`` for a
    benchmark's emulated link); the fields set by this function's own arguments come from them."""
    strat = make_strategy(strategy)
    start_round = 0
    append = False
    if resume:
        if not checkpoint or not Path(checkpoint).exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        ck = ckpt_io.load(checkpoint)
        _check_resumable(ck, checkpoint, strategy, initial)
        initial, start_round = ck.arrays, ck.round
        strat.load_state_dict(ck.strategy_state)
        append = True
        log.info("resuming from %s at round %d", checkpoint, start_round)
    # The strategy goes into every checkpoint, so that --resume can refuse a different one.
    run_config = {**(run_config or {}), "strategy": strategy}
    chief = Chief(ChiefConfig(workers=workers, rounds=rounds, min_workers=min_workers,
                              round_timeout=round_timeout),
                  strat, initial=initial, start_round=start_round)
    server = ChiefServer(chief, evaluate=evaluate, out_dir=str(out_dir) if out_dir else None,
                         checkpoint_path=str(checkpoint) if checkpoint else None,
                         run_config=run_config, finish_grace=finish_grace,
                         append_metrics=append, on_round=on_round, downlink=downlink)
    io = LoopThread("fedberry-chief")
    handle = ChiefHandle(server, io)
    tcp = None
    if listen:
        ctx = None
        if tls_cert:
            ctx = server_context(tls_cert, tls_key, client_ca)
            if client_ca:
                # The handshake may finish without a client certificate; the transport then
                # refuses the worker with an ERROR frame that says so (see ListenOptions).
                ctx.verify_mode = ssl.CERT_OPTIONAL
        elif client_ca:
            raise ValueError("--client-ca needs TLS: give --tls-cert and --tls-key too")
        host, port = parse_address(listen)
        tcp = TcpChief(server, host, port, dataclasses.replace(
            listen_options or ListenOptions(),
            token=resolve_token(token, token_file), ssl_context=ctx,
            require_client_cert=bool(tls_cert and client_ca), insecure=insecure,
            max_connections=max_connections, idle_timeout=idle_timeout,
            handshake_timeout=handshake_timeout, receive_memory=receive_memory))
        handle.tcp = tcp
        handle.address = io.run(tcp.start(), 30)
        handle._task = asyncio.run_coroutine_threadsafe(tcp.serve(), io.loop)
    else:
        async def bind_and_wait() -> None:
            server.bind_loop()
            await server.wait_finished()

        handle._task = asyncio.run_coroutine_threadsafe(bind_and_wait(), io.loop)
        io.run(asyncio.sleep(0.01))
    return handle


def _check_resumable(ck: ckpt_io.Checkpoint, path: str | os.PathLike, strategy: str,
                     initial: Sequence[np.ndarray] | None) -> None:
    """Refuse to resume a run with a different strategy or model: the state would not fit."""
    saved = ck.config.get("strategy")
    if saved is not None and saved != strategy:
        raise ValueError(f"--resume: {path} was written by a run with --strategy {saved}, not "
                         f"{strategy}")
    if initial is not None:
        why = spec_mismatch(spec_of(list(initial)), spec_of(ck.arrays))
        if why:
            raise ValueError(f"--resume: the model in {path} is not this run's model: {why}")


def run_chief(**kwargs: Any) -> ChiefHandle:
    """``serve(...)`` and block until the chief has finished."""
    handle = serve(**kwargs)
    try:
        while not handle.wait(1.0):
            pass
    finally:
        handle.stop()
    return handle
