"""The status server against slow clients, over real sockets: a whole request has a deadline
(a client trickling a byte at a time is cut off there), and one address cannot take every
slot (127.0.0.2 is another address on Linux's loopback)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("prometheus_client", reason="the status server needs fedberry[status]")

from fedberry.serve import serve  # noqa: E402
from fedberry.status import server as status_server  # noqa: E402


def _trickle(host: str, port: int, stop: threading.Event, every: float,
             source: str = "127.0.0.1") -> socket.socket | None:
    """A slow-loris client: open, then one byte of a request line every ``every`` seconds."""
    try:
        s = socket.create_connection((host, port), timeout=5, source_address=(source, 0))
    except OSError:
        return None

    def run() -> None:
        for b in b"GET /api/status HTTP/1.0\r\nX-Slow: " + b"a" * 1000:
            if stop.wait(every):
                return
            try:
                s.send(bytes([b]))
            except OSError:
                return

    threading.Thread(target=run, daemon=True).start()
    return s


def _get_from(source: str, url: str, timeout: float) -> int | None:
    """GET /api/status from ``source``: the status code, or None if closed unanswered."""
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=timeout,
                                    source_address=(source, 0))
    conn.sendall(b"GET /api/status HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    return int(data.split(b" ", 2)[1]) if data else None


def test_one_address_cannot_hold_every_slot() -> None:
    with serve("127.0.0.1:0", status="127.0.0.1:0") as handle:
        host, port = handle.status.address
        stop = threading.Event()
        slow = [_trickle(host, port, stop, 1.0) for _ in range(status_server.MAX_REQUESTS)]
        try:
            time.sleep(0.5)  # all accepted (or closed at once, past the address's cap)
            t0 = time.monotonic()
            assert _get_from("127.0.0.2", handle.status.url, timeout=3) == 200
            assert time.monotonic() - t0 < 3
        finally:
            stop.set()
            for s in slow:
                if s is not None:
                    s.close()


def test_a_trickling_request_is_cut_off_at_its_deadline(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(status_server, "REQUEST_TIMEOUT", 1.0)
    with serve("127.0.0.1:0", status="127.0.0.1:0") as handle:
        host, port = handle.status.address
        stop = threading.Event()
        s = _trickle(host, port, stop, 0.2)  # never a pause as long as the socket timeout
        assert s is not None
        try:
            s.settimeout(5)
            t0 = time.monotonic()
            try:
                closed = s.recv(1) == b""
            except ConnectionResetError:
                closed = True
            assert closed and time.monotonic() - t0 < 4
        finally:
            stop.set()
            s.close()


def test_slots_across_addresses_are_still_capped() -> None:
    with serve("127.0.0.1:0", status="127.0.0.1:0") as handle:
        host, port = handle.status.address
        per = status_server.MAX_PER_ADDRESS
        sources = [f"127.0.0.{2 + i}" for i in range(status_server.MAX_REQUESTS // per)]
        idle = [socket.create_connection((host, port), source_address=(src, 0))
                for src in sources for _ in range(per)]
        try:
            time.sleep(0.5)  # every slot held, by addresses each within their own cap
            try:
                answer = _get_from("127.0.0.1", handle.status.url, timeout=5)
            except ConnectionResetError:
                answer = None
            assert answer is None
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 5
        while _get_from("127.0.0.1", handle.status.url, timeout=5) != 200:  # slots come back
            assert time.monotonic() < deadline
            time.sleep(0.1)
