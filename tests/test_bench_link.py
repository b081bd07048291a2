"""The namespace link's access point serves the workers in turn (``SlowLink(queue="fair")``, the
default): each worker's traffic lands in its own htb class, and workers downloading at once
finish together, as through the in-process token bucket. Needs root; skips otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fedberry.bench import netns

N = 3
PER_WORKER = 600_000  # bytes down to each worker: about 0.75 s for all three at 20 Mbit/s
PORT = 5301  # inside the namespaces only

# The chief's side: accept N connections, then send each its bytes at once, from a thread each.
SOURCE = """
import socket, sys, threading
n, per = int(sys.argv[2]), int(sys.argv[3])
srv = socket.create_server((sys.argv[1], int(sys.argv[4])))
print("ready", flush=True)
conns = [srv.accept()[0] for _ in range(n)]
def send(c):
    c.sendall(bytes(per))
    c.close()
threads = [threading.Thread(target=send, args=(c,)) for c in conns]
for t in threads: t.start()
for t in threads: t.join()
"""

# A worker's side: read to the end, print how many bytes and when the last one came.
SINK = """
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
got = 0
while True:
    b = s.recv(1 << 16)
    if not b: break
    got += len(b)
print(json.dumps({"bytes": got, "t": time.monotonic()}), flush=True)
"""


@pytest.fixture
def link() -> Iterator[netns.SlowLink]:
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces unavailable: {why}")
    if not netns.capabilities().fair_queue:
        pytest.skip(f"no per-worker queues here: {netns.capabilities().reason}")
    netns.cleanup_stale("fbtlink")
    with netns.SlowLink(N, rate_mbit=20.0, prefix="fbtlink") as slow:
        yield slow


def _class_bytes(link: netns.SlowLink) -> dict[str, int]:
    """Bytes sent by each htb class of the downlink (tc prints classes as text only here)."""
    out = subprocess.run(["tc", "-n", link.chief_ns, "-s", "class", "show", "dev", "eth0"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    found, handle = {}, None
    for line in out.splitlines():
        words = line.split()
        if words[:2] == ["class", "htb"]:
            handle = words[2]
        elif words[:1] == ["Sent"] and handle is not None:
            found[handle] = int(words[1])
    return found


@pytest.mark.heavy  # kernel shaping, the same on every Python: main run only
def test_fair_link_serves_the_workers_in_turn(link: netns.SlowLink) -> None:
    assert link.queue == "fair"
    src = link.spawn(netns.CHIEF, [sys.executable, "-c", SOURCE, link.chief_ip, str(N),
                                   str(PER_WORKER), str(PORT)],
                     stdout=subprocess.PIPE, text=True)
    assert src.stdout is not None and src.stdout.readline().strip() == "ready"
    before = _class_bytes(link)
    sinks = [link.spawn(i, [sys.executable, "-c", SINK, link.chief_ip, str(PORT)],
                        stdout=subprocess.PIPE, text=True) for i in range(N)]
    got = [json.loads(s.communicate(timeout=60)[0]) for s in sinks]
    assert src.wait(timeout=30) == 0
    assert [g["bytes"] for g in got] == [PER_WORKER] * N
    # Every worker's bytes went through its own class (headers included, so a little more).
    after = _class_bytes(link)
    for i in range(N):
        cls = f"1:{0x100 + i:x}"
        sent = after[cls] - before.get(cls, 0)
        assert PER_WORKER <= sent < 1.1 * PER_WORKER, (cls, sent)
    # In turn: they finish together, within 2-3 % of the transfer time here (one drop-tail
    # queue, queue="fifo": 19-21 %); the bound leaves room for a busy machine (a late sink).
    ends = sorted(g["t"] for g in got)
    total = N * PER_WORKER / (20e6 / 8)
    assert ends[-1] - ends[0] < 0.1 * total, ends
