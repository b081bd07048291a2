"""The connection objects behind real TCP sockets: what the protocol refuses reaches the sender
as one sentence, from either side, and the conversation goes on where it may."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import numpy as np
import pytest

from fedberry import Worker
from fedberry.errors import ChiefUnreachable
from fedberry.protocol.connection import ChiefConnection, WorkerConnection
from fedberry.protocol.frames import ErrorCode, Limits, spec_of
from fedberry.protocol.messages import Auth, Challenge, Error, Hello, Update, Welcome
from fedberry.serve import serve
from fedberry.transports.tcp import ListenOptions
from fedberry.transports.tcp.worker import TcpSession

TOKEN = "connection-tcp-token"
MODEL = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]


def test_an_absurd_sample_count_is_the_callers_error_and_the_worker_goes_on() -> None:
    handle = serve("127.0.0.1:0", workers=1, rounds=1, initial=MODEL, token=TOKEN)
    try:
        with Worker(handle.url, token=TOKEN, worker_id="w") as w:
            g = w.join([m.copy() for m in MODEL])
            with pytest.raises(ValueError, match="at most 2\\*\\*53"):
                w.sync([a + 1 for a in g], 1e18)
            new = w.sync([a + 1 for a in g], 3)
        assert np.array_equal(new[0], MODEL[0] + 1)
        assert handle.wait(10)
    finally:
        handle.stop()


def test_the_chief_refuses_a_bad_update_field_with_a_sentence_over_tcp() -> None:
    """A worker built from the connection object alone, over a plain socket, that sends an
    UPDATE whose num_samples is not a number: the chief's ERROR says so."""
    handle = serve("127.0.0.1:0", workers=2, rounds=1, initial=MODEL, token=TOKEN)
    try:
        host, port = handle.url.split("://")[1].rsplit(":", 1)
        conn = WorkerConnection(TOKEN, spec_of(MODEL))
        with socket.create_connection((host, int(port)), timeout=10) as s:
            def exchange(msg: object, want: type) -> object:
                s.sendall(conn.send(msg).tobytes())  # type: ignore[arg-type]
                while True:
                    events = conn.receive_data(s.recv(1 << 16))
                    if events:
                        assert isinstance(events[0], want), events
                        return events[0]

            exchange(Hello("raw"), Challenge)
            exchange(Auth(spec_of(MODEL), want_model=False), Welcome)
            frame = conn.send(Update(0, 1, MODEL))
            data = frame.tobytes().replace(b'"num_samples":1.0', b'"num_samples":"1"')
            s.sendall(data)
            err = None
            while err is None:
                events = conn.receive_data(s.recv(1 << 16))
                err = next((e for e in events if isinstance(e, Error)), None)
            assert err.code == ErrorCode.BAD_FRAME.value and "num_samples" in err.message
    finally:
        handle.stop()


@pytest.mark.parametrize("answers", ["nothing", "only the challenge"])
def test_join_gives_up_on_a_listener_that_accepts_and_falls_silent(answers: str) -> None:
    """join() waited forever: no deadline covered the handshake's answers (the heartbeat and
    its idle watchdog start only once WELCOME is in)."""
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def listener() -> None:  # accepts every attempt, then says nothing (or CHALLENGE only)
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                s, _ = srv.accept()
            except OSError:
                continue
            held.append(s)
            if answers == "only the challenge":
                conn = ChiefConnection(TOKEN)
                s.settimeout(5)
                while not conn.receive_data(s.recv(1 << 16)):
                    pass
                s.sendall(conn.send(Challenge()).tobytes())

    thread = threading.Thread(target=listener, daemon=True)
    thread.start()
    session = TcpSession("127.0.0.1", srv.getsockname()[1], token=TOKEN, worker_id="w",
                         connect_timeout=1.0, heartbeat=0.2, idle_timeout=0.5)
    try:
        start = time.monotonic()
        with pytest.raises(ChiefUnreachable) as info:
            # wait_for: should join() hang again, the test fails instead of hanging too.
            asyncio.run(asyncio.wait_for(session.join([m.copy() for m in MODEL]), 10))
        took = time.monotonic() - start
        assert took < 6, took
        said = "HELLO" if answers == "nothing" else "AUTH"
        assert f"accepted the connection but did not answer {said}" in str(info.value)
        assert "gave up after 1 s" in str(info.value)
        assert held  # it did reach the listener
    finally:
        stop.set()
        thread.join(5)
        for s in held:
            s.close()
        srv.close()


def test_the_chiefs_frame_ceiling_comes_from_its_listen_options() -> None:
    """ChiefConnection(cap=) was never passed by the TCP chief: its ceiling was fixed."""
    handle = serve("127.0.0.1:0", workers=1, rounds=1, initial=MODEL, token=TOKEN,
                   listen_options=ListenOptions(limits=Limits(max_payload=16)))
    try:
        host, port = handle.url.split("://")[1].rsplit(":", 1)
        conn = WorkerConnection(TOKEN, spec_of(MODEL))
        with socket.create_connection((host, int(port)), timeout=10) as s:
            def events_until(want: type) -> object:
                while True:
                    got = [e for e in conn.receive_data(s.recv(1 << 16)) if isinstance(e, want)]
                    if got:
                        return got[0]

            s.sendall(conn.send(Hello("capped")).tobytes())
            events_until(Challenge)
            s.sendall(conn.send(Auth(spec_of(MODEL), want_model=False)).tobytes())
            events_until(Welcome)
            s.sendall(conn.send(Update(0, 1, MODEL)).tobytes())  # 60 bytes of tensors
            err = events_until(Error)
            assert isinstance(err, Error) and err.code == ErrorCode.LIMIT.value
            assert "limit of 16" in err.message, err.message
    finally:
        handle.stop()
