"""The chief's status server: ``/`` (a page that polls ``/api/status``), ``/api/status`` (JSON)
and ``/metrics`` (Prometheus), on the standard library's ``ThreadingHTTPServer`` in a thread of
its own, so that no request ever runs on the chief's event loop.

Why this web layer: three read-only routes need no framework, and a thread per request, capped
(``MAX_REQUESTS`` at once, ``MAX_PER_ADDRESS`` of them from one address; more are closed at
once) and with a deadline for the whole request (``REQUEST_TIMEOUT``: a client trickling a byte
at a time is cut off there, not merely at a pause), keeps a slow or hostile client from holding
the chief or every slot. The page polls rather than holding a server-sent-events
stream open, and each connection carries one request (HTTP/1.0), so an open browser tab holds
no thread between its polls.

Who may read: on a loopback address, anyone on the machine (as with any local port). Beyond
loopback the status token is required as ``Authorization: Bearer TOKEN`` on ``/api/status`` and
``/metrics``: a read-only token of its own (``--status-token``), never the workers' token, so
that who may watch the run (a dashboard, a Prometheus scrape) cannot join it and train (the
page itself is a static shell holding no data; it sends the token it is given
in the address's ``#token=`` fragment, which browsers never send to the server), over HTTPS
with the chief's certificate, or over plain HTTP only with ``insecure`` (the token would cross
the network readable). ``check_exposure`` says why in one sentence when that is not so.
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import logging
import socket
import ssl
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fedberry.chief.events import EventStream
from fedberry.status.board import StatusBoard

log = logging.getLogger("fedberry.status")

MAX_REQUESTS = 16  # requests served at once; more are closed without an answer
# Requests served at once for one client address: a page polls one request at a time, a
# Prometheus scrape is one more, so 4 leaves room for a few tabs while one address (a
# slow-loris client) can hold at most a quarter of MAX_REQUESTS.
MAX_PER_ADDRESS = 4
REQUEST_TIMEOUT = 10.0  # seconds for a whole request: TLS handshake, request, answer
STATUS_TOKEN_ENV = "FEDBERRY_STATUS_TOKEN"  # the status token, when not given as an option


def check_exposure(host: str, loopback: bool, token: str | None, tls: bool,
                   insecure: bool, worker_token: str | None = None) -> None:
    """Refuse, with one sentence, a status address that would show the run to anyone.
    ``loopback``: whether ``host`` is a loopback address (the TCP transport's rule decides);
    ``token``: the status token; ``worker_token``: the token workers join with.

    Raises
    ------
    ValueError
        ``host`` is not loopback and there is no status token, or it is the workers' token,
        or it would travel in plain HTTP without ``insecure``.
    """
    if loopback:
        return
    if not token:
        raise ValueError(f"refusing to serve the status page on {host} without a status token: "
                         "anyone who can reach it could read the run; give --status-token, "
                         "--status-token-file or FEDBERRY_STATUS_TOKEN (a read-only token, not "
                         "the workers' --token; readers then send 'Authorization: Bearer "
                         "TOKEN'), or use --status 127.0.0.1:PORT and an SSH tunnel")
    if worker_token and hmac.compare_digest(token.encode(), worker_token.encode()):
        raise ValueError("refusing a status token equal to the workers' token: whoever reads "
                         "the status page could then join the run and train; give "
                         "--status-token a secret of its own")
    if not tls and not insecure:
        raise ValueError(f"refusing to serve the status page on {host} over plain HTTP: the "
                         "bearer token would cross the network readable; give --tls-cert and "
                         "--tls-key (the page is then HTTPS), or pass --insecure on a network "
                         "you trust")


def require_extra() -> None:
    """Refuse with one sentence, before anything starts, when the status extra is missing."""
    if importlib.util.find_spec("prometheus_client") is None:
        raise ValueError("--status needs prometheus_client, which is not installed: "
                         "pip install 'fedberry[status]'")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, sock: socket.socket, app: StatusServer) -> None:
        self.app = app
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        self._per_address: dict[str, int] = {}  # requests being served, by client address
        self._per_address_lock = threading.Lock()
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        sock.listen(self.request_queue_size)

    def _take_address(self, host: str) -> bool:
        with self._per_address_lock:
            n = self._per_address.get(host, 0)
            if n >= MAX_PER_ADDRESS:
                return False
            self._per_address[host] = n + 1
            return True

    def _give_address(self, host: str) -> None:
        with self._per_address_lock:
            n = self._per_address.pop(host) - 1
            if n:
                self._per_address[host] = n

    def process_request(self, request: Any, client_address: Any) -> None:
        host = client_address[0]
        if not self._take_address(host):
            self.shutdown_request(request)  # this address is at its cap: closed at once
            return
        if not self._slots.acquire(blocking=False):
            self._give_address(host)
            self.shutdown_request(request)  # at the cap: closed at once, the client retries
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            self._give_address(host)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
            self._give_address(client_address[0])

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The socket timeout bounds one read; the whole request is bounded by a timer that
        # shuts the connection down at the deadline, which wakes any read or write blocked on
        # it. It shuts down a duplicate of the descriptor (the same connection), because
        # wrapping in TLS detaches ``request``, and the duplicate stays ours until the timer
        # is cancelled, so it can never name another connection.
        request.settimeout(REQUEST_TIMEOUT)
        guard = request.dup()
        timer = threading.Timer(REQUEST_TIMEOUT, _cut, (guard,))
        timer.daemon = True
        timer.start()
        try:
            self._finish(request, client_address)
        finally:
            timer.cancel()
            guard.close()

    def _finish(self, request: Any, client_address: Any) -> None:
        # TLS is set up here, on the request's own thread under the cap and the deadline,
        # not in the accept loop, where one slow handshake would hold every other client.
        ctx = self.app.ssl_context
        if ctx is None:
            super().finish_request(request, client_address)
            return
        try:
            tls = ctx.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            log.debug("status: TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


def _cut(sock: socket.socket) -> None:
    """Shut a connection down at its request's deadline (a timer's thread)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the client


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = REQUEST_TIMEOUT
    # HTTP/1.0: one request per connection, so that no open page (browsers keep connections
    # alive between polls) holds one of the MAX_REQUESTS threads between its requests.
    protocol_version = "HTTP/1.0"
    server_version = "fedberry-status"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        app = self.server.app
        url = urlsplit(self.path)
        if url.path == "/":
            self._send(HTTPStatus.OK, app.page, "text/html; charset=utf-8")
            return
        if url.path not in ("/api/status", "/metrics"):
            self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
            return
        if not app.authorized(self.headers.get("Authorization")):
            self._send(HTTPStatus.UNAUTHORIZED, b"this status server needs 'Authorization: "
                       b"Bearer TOKEN' (the chief's --status-token)\n", "text/plain",
                       {"WWW-Authenticate": 'Bearer realm="fedberry"'})
            return
        if url.path == "/metrics":
            self._send(HTTPStatus.OK, app.metrics.exposition(), app.metrics_type)
            return
        since = None
        try:
            since = int(parse_qs(url.query).get("since", [""])[0])
        except ValueError:
            pass
        body = json.dumps(app.board.snapshot(since), default=str).encode()
        self._send(HTTPStatus.OK, body, "application/json")

    def _send(self, status: HTTPStatus, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        log.debug("status: %s %s", self.address_string(), format % args)


class StatusServer:
    """A running status server (``start_status`` makes one); ``stop()`` ends it.

    Attributes
    ----------
    board : StatusBoard
        What ``/api/status`` shows.
    address : tuple of (str, int)
        Where it listens.
    """

    def __init__(self, sock: socket.socket, events: EventStream, board: StatusBoard,
                 token: str | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        # The status extra: prometheus_client is imported only when a status server starts
        # (require_extra says so in a sentence first), so that the core stays numpy-only.
        from fedberry.status.prom import CONTENT_TYPE, ChiefMetrics

        self.board = board
        self.metrics = ChiefMetrics(board)
        self.metrics_type = CONTENT_TYPE
        self.token = token or None
        self.ssl_context = ssl_context
        self.page = resources.files("fedberry.status").joinpath("page.html").read_bytes()
        self._events = events
        events.subscribe(board)
        events.subscribe(self.metrics)
        self._http = _HTTPServer(sock, self)
        self.address: tuple[str, int] = self._http.server_address  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={
            "poll_interval": 0.5}, name="fedberry-status", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self.address
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}/"

    def authorized(self, header: str | None) -> bool:
        """Whether a request with this ``Authorization`` header may read the run."""
        if self.token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  self.token.encode())

    def stop(self) -> None:
        """Stop serving and close the socket (waits for the accept loop, at most ~1 s)."""
        self._events.unsubscribe(self.board)
        self._events.unsubscribe(self.metrics)
        self._http.shutdown()
        self._http.server_close()
