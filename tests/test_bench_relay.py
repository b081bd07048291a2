"""The bench's userspace link (bench/relay.py) over real sockets: it delays, it paces, it resets,
and it passes every byte in order. Floors and shapes only, never speed."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from fedberry.bench.relay import Relay, Toxics, toxics_from


async def _sink(counts: list[int]) -> asyncio.AbstractServer:
    """Reads everything, echoes lines, records how much arrived."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        total = 0
        while True:
            data = await r.read(65536)
            if not data:
                break
            total += len(data)
            if data.endswith(b"\n") and total < 1000:
                w.write(data)
                await w.drain()
        counts.append(total)
        w.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def _port(server: asyncio.AbstractServer) -> int:
    return int(server.sockets[0].getsockname()[1])


def test_delay_on_each_direction() -> None:
    async def main() -> float:
        counts: list[int] = []
        sink = await _sink(counts)
        relay = await Relay(("127.0.0.1", _port(sink)), Toxics(delay_s=0.06, jitter_s=0.01,
                                                                seed=1)).start()
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)
        t0 = time.monotonic()
        w.write(b"ping\n")
        line = await asyncio.wait_for(r.readline(), 10)
        rtt = time.monotonic() - t0
        assert line == b"ping\n"
        w.close()
        await relay.close()
        sink.close()
        return rtt

    rtt = asyncio.run(main())
    # Two one-way delays of 60 +- 10 ms: a round trip can never be shorter than 100 ms.
    assert rtt >= 0.1 - 0.005, rtt


def test_bandwidth_floor_and_every_byte_in_order() -> None:
    payload = os.urandom(1_000_000)

    async def main() -> tuple[float, bytes, Relay]:
        got = bytearray()

        async def collect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                got.extend(data)
            w.close()

        sink = await asyncio.start_server(collect, "127.0.0.1", 0)
        relay = await Relay(("127.0.0.1", _port(sink)), toxics_from(rate_mbit=8.0)).start()
        _, w = await asyncio.open_connection("127.0.0.1", relay.port)
        t0 = time.monotonic()
        w.write(payload)
        await w.drain()
        w.write_eof()
        deadline = time.monotonic() + 30
        while len(got) < len(payload) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - t0
        w.close()
        await relay.close()
        sink.close()
        return elapsed, bytes(got), relay

    elapsed, got, relay = asyncio.run(main())
    assert got == payload  # nothing lost, nothing reordered
    assert relay.bytes_up == len(payload) and relay.bytes_down == 0
    # 1 MB at 8 Mbit/s (1 MB/s) cannot take less than ~1 s (less the bucket's 2-frame burst).
    assert elapsed >= 0.9, elapsed


def test_resets_abort_both_ends() -> None:
    async def main() -> tuple[type[BaseException] | None, int]:
        counts: list[int] = []
        sink = await _sink(counts)
        relay = await Relay(("127.0.0.1", _port(sink)),
                            Toxics(reset_per_s=20.0, seed=3)).start()
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)
        err: type[BaseException] | None = None
        try:
            for _ in range(200):  # a reset comes after 50 ms on average
                w.write(b"x" * 1000)
                await w.drain()
                try:
                    if await asyncio.wait_for(r.read(1), 0.02) == b"":
                        err = EOFError  # the reset reached us as an end of stream
                        break
                except asyncio.TimeoutError:
                    continue
        except (ConnectionResetError, BrokenPipeError) as exc:
            err = type(exc)
        w.close()
        await relay.close()
        sink.close()
        return err, relay.resets

    err, resets = asyncio.run(main())
    assert resets >= 1
    assert err is not None


def test_bad_toxics() -> None:
    for kw in ({"delay_s": -1.0}, {"delay_s": 0.01, "jitter_s": 0.02},
               {"rate_bytes_per_s": 0.0}, {"buffer_bytes": 10}):
        with pytest.raises(ValueError):
            Toxics(**kw)  # type: ignore[arg-type]
