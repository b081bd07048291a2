"""Every way a connection to a TLS chief can end gives its accepted socket back to the acceptor
(transports/tcp/accept.py) exactly once: after silent connections swept at the handshake
deadline, refusals past the cap, HTTP spoken to the TLS port, peers that close or reset in
the middle of the handshake and TLS sessions that close or stay silent, the chief holds no
socket and a worker still joins. Real sockets on loopback, a chief from ``fedberry.serve``."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedberry
from fedberry.transports.tcp.chief import ListenOptions

pytest.importorskip("cryptography", reason="making certificates needs fedberry[tls]")
from fedberry import certs  # noqa: E402

TOKEN = "accept-endings"
CAP, REFUSING = 4, 2


def _held(handle: Any) -> tuple[int, int]:
    """(accepted sockets not given back, connections the chief knows), read on its loop."""
    tcp = handle.tcp

    async def read() -> tuple[int, int]:
        return tcp._acceptor.open, len(tcp.connections)
    return asyncio.run_coroutine_threadsafe(read(), handle.io.loop).result(5)


def _settle(handle: Any, want: tuple[int, int], within: float) -> tuple[int, int]:
    deadline = time.monotonic() + within
    while (got := _held(handle)) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def test_every_ending_gives_the_socket_back_once(tmp_path: Path, caplog) -> None:
    ca, ca_key = certs.create_ca(tmp_path)
    cert, key = certs.create_chief_cert(tmp_path, ca, ca_key, ["127.0.0.1"])
    handle = fedberry.serve("127.0.0.1:0", workers=1, rounds=1, token=TOKEN, tls_cert=str(cert),
                            tls_key=str(key), max_connections=CAP, handshake_timeout=0.5,
                            listen_options=ListenOptions(max_refusing=REFUSING),
                            initial=[np.zeros(3, np.float32)])
    port = handle.address[1]
    held: list[socket.socket] = []
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            # Silent: CAP admitted (swept at the deadline), the rest refused or in the backlog.
            held += [socket.create_connection(("127.0.0.1", port)) for _ in range(3 * CAP)]
            time.sleep(1.5)
            for i in range(3 * CAP):
                s = socket.create_connection(("127.0.0.1", port))
                if i % 3 == 0:  # HTTP to the TLS port: a failed handshake
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    held.append(s)
                elif i % 3 == 1:  # the start of a ClientHello, then gone
                    s.sendall(b"\x16\x03\x01\x02\x00\x01")
                    s.close()
                else:  # a reset
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
            ctx = ssl.create_default_context(cafile=str(ca))
            for i in range(2 * CAP):
                raw = socket.create_connection(("127.0.0.1", port))
                try:
                    tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                except OSError:  # refused past the cap: reset
                    raw.close()
                    continue
                if i % 2:
                    tls.close()
                else:
                    held.append(tls)  # silent after TLS: swept at the deadline
            assert _settle(handle, (0, 0), 10) == (0, 0)
            for s in held:
                s.close()
            w = fedberry.Worker(handle.url, token=TOKEN, worker_id="after", ca=str(ca))
            w.join([np.zeros(3, np.float32)])
            w.sync([np.ones(3, np.float32)], 1)
            w.close()
            assert handle.wait(30)
        # A handshake the sweep ended is one rate-limited line, not a task's traceback each.
        assert "exception was never retrieved" not in caplog.text
    finally:
        for s in held:
            s.close()
        handle.stop()


def test_a_tls_handshake_ended_by_the_chief_leaves_no_traceback(tmp_path: Path,
                                                                 caplog) -> None:
    # What the sweep does at the handshake deadline (or a limit, or stop()), done at once:
    # start_tls then returns None instead of raising, and the connection is already gone.
    from fedberry.protocol.frames import ErrorCode

    ca, ca_key = certs.create_ca(tmp_path)
    cert, key = certs.create_chief_cert(tmp_path, ca, ca_key, ["127.0.0.1"])
    handle = fedberry.serve("127.0.0.1:0", workers=1, rounds=1, token=TOKEN, tls_cert=str(cert),
                            tls_key=str(key), initial=[np.zeros(3, np.float32)])
    silent = [socket.create_connection(("127.0.0.1", handle.address[1])) for _ in range(3)]
    try:
        assert _settle(handle, (3, 3), 5) == (3, 3)

        async def end_handshakes() -> None:
            for conn in list(handle.tcp.connections):
                assert conn.state == "tls"
                conn.fail(ErrorCode.TIMEOUT, "handshake not completed in time")
            await asyncio.sleep(0.2)  # the _start_tls tasks finish
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            asyncio.run_coroutine_threadsafe(end_handshakes(), handle.io.loop).result(5)
        assert _held(handle) == (0, 0)
        assert "exception was never retrieved" not in caplog.text
    finally:
        for s in silent:
            s.close()
        handle.stop()
