"""Start a chief: ``fedberry.serve(...)`` in the background, or ``run_chief(...)`` to block.

The chief runs its event loop on its own thread, so the same process can also train as a worker
(``Worker(chief=handle)``, the original design's worker 0) while TCP workers connect.

The common case is one line, ``serve("0.0.0.0:3389", workers=6, rounds=50)``; the rest is in
four option objects: ``Listening`` (TCP, TLS and the connection limits), ``RoundPolicy`` (when
rounds close), ``OutputOptions`` (metrics, checkpoint, resume) and ``AdmissionPolicy`` (which
updates count, ``chief.admission``). Each of their fields may also be
given to ``serve()`` as a keyword of the same name, as in earlier versions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedberry.certs import server_context
from fedberry.chief.admission import AdmissionPolicy
from fedberry.chief.buffers import parse_size
from fedberry.chief.build import OutputOptions, RoundPolicy, build_chief_server
from fedberry.chief.round_config import RoundConfig
from fedberry.chief.runtime import ChiefServer, Evaluate
from fedberry.chief.secure_round import SecureRound
from fedberry.chief.state import Chief
from fedberry.privacy import DPConfig, as_config
from fedberry.privacy.chief import dp_chief, expected_count
from fedberry.protocol.auth import resolve_token
from fedberry.secagg.errors import CryptographyMissing
from fedberry.secagg.options import SecAggOptions
from fedberry.status import StatusBoard, StatusServer, check_exposure, require_extra
from fedberry.status.server import STATUS_TOKEN_ENV
from fedberry.strategies import Strategy
from fedberry.transports.local import LocalSession
from fedberry.transports.loop import LoopThread
from fedberry.transports.tcp import ListenOptions, TcpChief, parse_address
from fedberry.transports.tcp.accept import listen_socket
from fedberry.transports.tcp.stream import is_loopback

log = logging.getLogger("fedberry.chief")


@dataclass
class Listening:
    """How the chief listens on TCP: authentication, TLS and the connection limits.

    Parameters
    ----------
    token : str or None
        Shared secret workers prove they hold (HMAC challenge; it never crosses the wire).
    token_file : str or None
        File holding the token (else ``FEDBERRY_TOKEN``, else ``token``).
    tls_cert, tls_key : str or None
        The chief's certificate and key (PEM); both or neither.
    client_ca : str or None
        Require worker certificates signed by this CA (mutual TLS); needs ``tls_cert``.
    insecure : bool
        Allow plain TCP or no token on a non-loopback address.
    max_connections : int
        Connections at once; more are refused.
    idle_timeout : float
        Seconds of silence after which a connection is taken for dead (workers ping every few
        seconds).
    handshake_timeout : float
        Seconds from accept to the end of the handshake, TLS included.
    receive_memory : int or str
        How much of the updates is read at once, all workers together (at least one update);
        the others wait their turn in their sockets, so that the chief's memory does not grow
        with the number of workers sending at the same moment. An int is bytes; a string has a
        unit, ``"64MiB"``, ``"1GiB"`` (``chief.buffers.parse_size``, the same rule as
        ``--receive-memory``).
    update_deadline : float or None
        Seconds an update may take to arrive once the chief starts reading it; past it the
        worker is dropped with a sentence and the round goes on. None: 600 s
        (``ListenOptions.update_deadline``). A trickler is stopped sooner by the rate floor,
        ``ListenOptions.min_update_rate`` (8 KiB/s after a 10 s grace).
    receive_buffer : int or str or None
        Each connection's kernel receive buffer (``SO_RCVBUF``), as ``receive_memory`` (bytes
        or a size with a unit). None: the kernel's autotuning. A worker waiting its turn still
        fills its socket's buffer: with many workers of a large model, set this so that
        workers x buffer fits the chief's memory (docs/benchmarks.md, the swarm).
    """

    token: str | None = None
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None
    insecure: bool = False
    max_connections: int = 256
    idle_timeout: float = 60.0
    handshake_timeout: float = 15.0
    receive_memory: int | str = 64 << 20
    update_deadline: float | None = None
    receive_buffer: int | str | None = None


_GROUPS: dict[str, type] = {f.name: cls for cls in (Listening, RoundPolicy, OutputOptions,
                                                    AdmissionPolicy)
                            for f in dataclasses.fields(cls)}


class ChiefHandle:
    """A running chief, as ``serve()`` returns it.

    Attributes
    ----------
    server : ChiefServer
        The chief runtime.
    address : tuple of (str, int) or None
        Where it listens (None without TCP).
    """

    def __init__(self, server: ChiefServer, io: LoopThread, tcp: Any = None) -> None:
        self.server = server
        self.io = io
        self.tcp = tcp
        self.address: tuple[str, int] | None = None
        self.status: StatusServer | None = None  # serve(status=...): the status server
        self._task: Any = None

    @property
    def url(self) -> str:
        if self.address is None:  # AttributeError: getattr(handle, "url", handle) works
            raise AttributeError("this chief does not listen on TCP")
        return f"tcp://{self.address[0]}:{self.address[1]}"

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return list(self.server.metrics.records)

    @property
    def chief(self) -> Chief:
        return self.server.chief

    def local_session(self, worker_id: str) -> LocalSession:
        """A worker in this process (``Worker(chief=handle)``): no bytes, the same rounds."""
        if self.chief.secure is not None:
            # Its update would be the chief's own to read: nothing to hide, nothing to mask.
            raise ValueError("a chief with secure aggregation takes its workers over TCP only: "
                             "a worker in the chief's own process would hand it its update in "
                             "the clear (run it as a TCP worker of this chief: "
                             "Worker(chief=handle.url))")
        return LocalSession(self.server, self.io.loop, worker_id)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the chief has finished.

        Parameters
        ----------
        timeout : float or None
            Seconds to wait at most; None: as long as it takes.

        Returns
        -------
        bool
            True if the chief has finished, False if ``timeout`` passed first.

        Raises
        ------
        FederationError
            The chief stopped the run (``code`` ``"chief_failed"``): its checkpoint could not be
            written under ``on_checkpoint_error="stop"``; the message is the chief's sentence.
        """
        try:
            self._task.result(timeout)
            return True
        # Not the builtin TimeoutError: before Python 3.11 it is another class, and catching it
        # let the first timeout crash ``fedberry chief`` after one second.
        except concurrent.futures.TimeoutError:
            return False

    def stop(self) -> None:
        """Finish the chief (if it has not) and stop its thread."""
        if self.server.finished is not None:
            self.io.loop.call_soon_threadsafe(self.server.finish)
        try:
            self._task.result(15)
        except Exception as exc:
            log.debug("stop: %s", exc)
        self.io.stop()
        if self.status is not None:
            self.status.stop()

    def __enter__(self) -> ChiefHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def require_secagg() -> None:
    """Refuse, with the install line, a secure chief without the ``cryptography`` package."""
    try:
        import cryptography  # noqa: F401  (the secagg extra: keys, masks, sealed shares)
    except ImportError:
        raise CryptographyMissing("secure aggregation needs the cryptography package: "
                                  "pip install 'fedberry[secagg]'") from None


def check_secure_start(secure: SecAggOptions, workers: int) -> None:
    """Refuse at start, with a sentence, what would make every secure round fail: fewer than
    3 workers, or a threshold below a strict majority of each worker's group (workers refuse
    it) for the federation's ``workers``."""
    if workers < 3:
        raise ValueError(f"secure aggregation needs at least 3 workers a round (--workers "
                         f"{workers}): with 2, each would learn the other's update from the sum")
    SecureRound.check_threshold(secure, workers)


def serve(listen: str | None = "127.0.0.1:0", *, workers: int | None = None,
          rounds: int | None = None, strategy: str | Strategy = "fedavg",
          initial: Sequence[np.ndarray] | None = None, evaluate: Evaluate | None = None,
          on_round: Callable[[dict[str, Any]], None] | None = None, downlink: str = "none",
          listening: Listening | None = None, policy: RoundPolicy | None = None,
          output: OutputOptions | None = None,
          admission: AdmissionPolicy | None = None,
          listen_options: ListenOptions | None = None, status: str | None = None,
          status_token: str | None = None, status_token_file: str | None = None,
          dp: DPConfig | str | None = None,
          round_config: RoundConfig | None = None,
          secure_aggregation: SecAggOptions | str | None = None,
          **options: Any) -> ChiefHandle:
    """Start a chief in the background and return once it accepts connections.

    Parameters
    ----------
    listen : str or None
        ``HOST:PORT`` to bind (port 0: any free one, see ``ChiefHandle.address``); None: no TCP,
        in-process workers only (``Worker(chief=handle)``).
    workers, rounds : int or None
        Shortcuts for ``RoundPolicy.workers`` (default 1) and ``RoundPolicy.rounds``.
    strategy : str or Strategy
        The aggregation rule: an object (``FedAdam(lr=0.05, tau=1e-4)``, or your own
        implementing ``fedberry.strategies.Strategy``) or ``--strategy`` text
        (``"fedadam:lr=0.05,tau=1e-4"``); see docs/strategies.md.
    initial : sequence of numpy arrays, optional
        The model to start from; None: the first worker's.
    evaluate : callable, optional
        ``evaluate(global_arrays) -> {"accuracy": .., "loss": ..}``, run after every round off
        the chief's loop; its numbers go into the metrics.
    on_round : callable, optional
        Called with each round's metrics line, in round order (on the chief's loop over TCP; on
        the chief's work thread under MPI). What it raises is logged and the run goes on
        (``chief.runtime``'s policy, for every transport).
    downlink : str
        How the global model travels to TCP workers: ``none``, ``fp16`` (half the bytes) or
        ``q8`` (the change since the previous round in 8 bits, a quarter; a worker that missed a
        round gets the whole model). The chief keeps the model exactly as the workers decode it
        (``chief.broadcast``).
    listening : Listening, optional
        Authentication, TLS and connection limits.
    policy : RoundPolicy, optional
        When rounds close and the run ends.
    output : OutputOptions, optional
        Metrics directory, checkpoint, resume, and what a checkpoint that cannot be written
        does (``on_checkpoint_error``: ``"stop"`` or ``"warn"``).
    admission : AdmissionPolicy, optional
        Which updates the chief admits: ``max_samples``, ``max_sample_ratio`` (from round 2
        on a claim above R x the median claim of earlier rounds is weighed as that cap;
        default 100, None: off), ``max_update_norm``, ``update_norm_mode``
        (``chief.admission``, docs/security.md).
    listen_options : transports.tcp.ListenOptions, optional
        The TCP listener's other settings (per-address handshake and authentication-delay
        limits, ``bind_worker_id``, ``pacing``: a benchmark's emulated link, docs/slow-link.md);
        the fields that ``listening`` sets come from it.
    status : str or None
        ``HOST:PORT`` of the status server (the ``status`` extra; docs/operations.md): a live
        page, ``/api/status`` and Prometheus ``/metrics``; ``ChiefHandle.status`` has its
        address. Beyond loopback it needs ``status_token`` (as a bearer header) and TLS or
        ``insecure``; None (the default): no status server.
    status_token, status_token_file : str or None
        The status server's read-only token (or a file holding it; else
        ``FEDBERRY_STATUS_TOKEN``), required beyond loopback. It must differ from ``token``:
        it lets a reader watch the run, never join it.
    dp : DPConfig or str, optional
        Differentially private FedAvg (``fedberry.DPConfig(clip=1.0, noise=1.1, delta=1e-5)``
        or ``--dp`` text): updates clipped to C, weighted uniformly, Gaussian noise on their
        mean, epsilon in every round's metrics; ``target_epsilon`` caps the rounds
        (docs/privacy.md).
    round_config : callable, optional
        ``config(round) -> dict`` of scalars sent with the model of each round (``round``:
        rounds completed, 0 first), e.g. ``Schedule({"lr": {0: 0.1, 10: 0.05}})`` from
        ``fedberry.chief.round_config``; workers read it as ``Worker.round_config`` and the
        torch and Keras drop-ins apply ``lr`` (docs/fleet.md).
    secure_aggregation : SecAggOptions or str, optional
        SecAgg+ (``fedberry.secagg.SecAggOptions(threshold=..., neighbors=...)`` or ``--secagg``
        text, "" for every default): the chief learns only the sum of each round's updates,
        even when workers drop out (docs/secure-aggregation.md). TCP workers only; needs the
        ``secagg`` extra; a strategy that needs every update (median) is refused.
    **options
        Any field of ``Listening``, ``RoundPolicy``, ``OutputOptions`` or ``AdmissionPolicy``
        by name (``token=``,
        ``min_workers=``, ``checkpoint=``, ``resume=``...): it replaces that field of the object
        given (or of the defaults).

    Returns
    -------
    ChiefHandle
        The running chief: ``wait()``, ``stop()``, ``metrics``, ``url``.

    Raises
    ------
    TypeError
        An option that is no field of the option objects.
    FileNotFoundError, ValueError
        ``resume`` without a checkpoint, a checkpoint of another strategy or model, TLS options
        that do not go together.
    OSError
        ``listen`` cannot be bound (``listen_socket``), or ``out_dir`` cannot be written. Both
        are found before any output file is made when the port is the problem.
    """
    groups: dict[type, dict[str, Any]] = {Listening: {}, RoundPolicy: {}, OutputOptions: {},
                                          AdmissionPolicy: {}}
    for key, value in options.items():
        if key not in _GROUPS:
            raise TypeError(f"serve() got an unknown option {key!r}; the options are "
                            f"{', '.join(sorted(_GROUPS))}")
        groups[_GROUPS[key]][key] = value
    if workers is not None:
        groups[RoundPolicy]["workers"] = workers
    if rounds is not None:
        groups[RoundPolicy]["rounds"] = rounds
    lis = dataclasses.replace(listening or Listening(), **groups[Listening])
    pol = dataclasses.replace(policy or RoundPolicy(), **groups[RoundPolicy])
    out = dataclasses.replace(output or OutputOptions(), **groups[OutputOptions])
    adm = dataclasses.replace(admission or AdmissionPolicy(), **groups[AdmissionPolicy])
    secure = (SecAggOptions.parse(secure_aggregation) if isinstance(secure_aggregation, str)
              else secure_aggregation)
    if secure is not None:
        if not listen:
            raise ValueError("secure aggregation needs TCP workers: give serve() an address to "
                             "listen on")
        require_secagg()
        check_secure_start(secure, pol.workers)
    dp = as_config(dp)
    if dp is not None and secure is not None and dp.adaptive:
        raise ValueError("adaptive clipping needs every update's norm, which secure "
                         "aggregation hides from the chief: use a fixed clip with --secagg")
    if dp is not None:
        strategy, adm, rounds_left = dp_chief(
            dp, strategy, adm, pol.rounds, expected_count(pol.workers, pol.sample, pol.fraction))
        pol = dataclasses.replace(pol, rounds=rounds_left)
        # With secure aggregation the noise is distributed: each worker adds a share before
        # masking (the chief never sees the sum without it).
        strategy.distributed = secure is not None
    # Everything that can refuse to start comes before the runtime makes its output files: a
    # chief that cannot start (a port taken by another chief with the same --out, a missing
    # certificate) must leave no files behind nor truncate another run's metrics.
    ctx = None
    if listen and lis.tls_cert:
        ctx = server_context(lis.tls_cert, lis.tls_key, lis.client_ca)
        if lis.client_ca:
            # The handshake may finish without a client certificate; the transport then
            # refuses the worker with an ERROR frame that says so (see ListenOptions).
            ctx.verify_mode = ssl.CERT_OPTIONAL
    elif listen and lis.client_ca:
        raise ValueError("--client-ca needs TLS: give --tls-cert and --tls-key too")
    token = resolve_token(lis.token, lis.token_file) if listen or status else None
    # Refused here, with a sentence, before any port is taken or file made.
    opened = open_status(status, status_token, status_token_file, lis.tls_cert, lis.tls_key,
                         lis.insecure, token) if status else None
    status_sock = opened.sock if opened is not None else None
    try:
        sock = listen_socket(*parse_address(listen)) if listen else None
    except BaseException:
        if status_sock is not None:
            status_sock.close()
        raise
    try:
        server = build_chief_server(pol, out, strategy=strategy, initial=initial,
                                    evaluate=evaluate, on_round=on_round, downlink=downlink,
                                    admission=adm, round_config=round_config, secure=secure)
        tcp = None
        if listen:
            host, port = parse_address(listen)
            base = listen_options or ListenOptions()
            tcp = TcpChief(server, host, port, sock=sock, options=dataclasses.replace(
                base, token=token, ssl_context=ctx,
                require_client_cert=bool(lis.tls_cert and lis.client_ca), insecure=lis.insecure,
                max_connections=lis.max_connections, idle_timeout=lis.idle_timeout,
                handshake_timeout=lis.handshake_timeout,
                receive_memory=parse_size(lis.receive_memory),
                update_deadline=lis.update_deadline,
                receive_buffer=(base.receive_buffer if lis.receive_buffer is None
                                else parse_size(lis.receive_buffer))))
    except BaseException:
        for s in (sock, status_sock):
            if s is not None:
                s.close()
        raise
    io = LoopThread("fedberry-chief")
    handle = ChiefHandle(server, io)
    if opened is not None:  # before any worker can join: the board sees every event
        handle.status = opened.start(server, pol.rounds, pol.workers, private=dp is not None)
    if tcp is not None:
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


@dataclasses.dataclass
class OpenedStatus:
    """The status server's socket, bound and checked, waiting for the runtime it shows."""

    sock: socket.socket
    ssl_context: ssl.SSLContext | None
    reader_token: str | None

    def start(self, server: ChiefServer, rounds: int | None, workers: int, *,
              private: bool) -> StatusServer:
        """Serve the page, ``/api/status`` and ``/metrics`` of ``server``'s events. Call it
        before any worker can join, so that the board sees every event."""
        board = StatusBoard(rounds, server.chief.round, workers, private=private)
        status = StatusServer(self.sock, server.events, board, self.reader_token,
                              self.ssl_context)
        log.info("status page at %s", status.url)
        return status


def open_status(address: str, status_token: str | None, status_token_file: str | None,
                tls_cert: str | None, tls_key: str | None, insecure: bool,
                worker_token: str | None) -> OpenedStatus:
    """Check and bind the status server's ``HOST:PORT`` (the ``status`` extra): the one rule
    for every chief, TCP or MPI rank 0. Loopback is open to this machine, like any local port;
    beyond it the page needs a read-only token (a bearer header) and TLS or ``insecure``.

    Raises
    ------
    ValueError
        The extra is missing, or the exposure is refused (``status.check_exposure``'s sentence).
    OSError
        The address cannot be bound.
    """
    require_extra()
    s_host, s_port = parse_address(address)
    reader_token = None if is_loopback(s_host) else resolve_token(
        status_token, status_token_file, env=STATUS_TOKEN_ENV)
    check_exposure(s_host, is_loopback(s_host), reader_token, bool(tls_cert), insecure,
                   worker_token=worker_token)
    ctx = server_context(tls_cert, tls_key, None) if tls_cert else None
    return OpenedStatus(listen_socket(s_host, s_port), ctx, reader_token)


def run_chief(**kwargs: Any) -> ChiefHandle:
    """``serve(**kwargs)`` and block until the chief has finished; returns its handle, or raises
    ``ChiefHandle.wait``'s ``FederationError`` when the chief stopped the run."""
    handle = serve(**kwargs)
    try:
        while not handle.wait(1.0):
            pass
    finally:
        handle.stop()
    return handle
