"""Does the relay's bandwidth agree with the kernel's htb? ``python -m fedberry.bench.relay_check``.

The same bulk transfer (``--mb`` megabytes of TCP payload, split over ``--conns`` concurrent
connections, from one sender process per connection to one sink) goes once through the
namespace link (netns.SlowLink: htb at ``--rate-mbit`` of Ethernet frames, shared by all the
senders) and once through the relay on loopback (relay.py: one token bucket per direction shared
by all connections, at the payload rate of the same link, ``shaper.tcp_payload_fraction``). The
sink times the payload from its first byte to its last; the two rates must agree within 10 %.
Needs root (namespaces); prints one JSON object per configuration and a summary line.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from fedberry.bench import netns
from fedberry.bench.shaper import mbit_to_bytes_per_s, tcp_payload_fraction

SINK_PORT = 7790
TIMEOUT_S = 300.0


def sink(port: int, conns: int, host: str = "0.0.0.0") -> None:
    """Accept ``conns`` connections, read each to its end; print the payload rate."""
    srv = socket.create_server((host, port))
    srv.settimeout(TIMEOUT_S)
    print(json.dumps({"ev": "listening", "port": srv.getsockname()[1]}), flush=True)
    lock = threading.Lock()
    first: list[float] = []
    last: list[float] = []
    total = [0]

    def read(c: socket.socket) -> None:
        c.settimeout(TIMEOUT_S)
        buf = bytearray(1 << 16)
        n = 0
        while True:
            k = c.recv_into(buf)
            if not k:
                break
            now = time.monotonic()
            with lock:
                if not first:
                    first.append(now)
                last[:] = [now]
            n += k
        with lock:
            total[0] += n
        c.close()

    threads = []
    for _ in range(conns):
        c, _ = srv.accept()
        t = threading.Thread(target=read, args=(c,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(TIMEOUT_S)
    secs = last[0] - first[0] if first and last else 0.0
    print(json.dumps({"ev": "done", "bytes": total[0], "seconds": secs,
                      "payload_bytes_per_s": total[0] / secs if secs else None}), flush=True)


def send(to: str, nbytes: int) -> None:
    host, _, port = to.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as s:
        chunk = b"\0" * (1 << 16)
        left = nbytes
        while left > 0:
            s.sendall(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the sink closes once it has read everything


def _json_line(proc: subprocess.Popen[str], ev: str) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            e = json.loads(line)
            if e.get("ev") == ev:
                return e
    raise RuntimeError(f"no {ev!r} from {proc.args}")


def _me(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedberry.bench.relay_check", *args]


def through_htb(rate_mbit: float, nbytes: int, conns: int) -> dict[str, Any]:
    with netns.SlowLink(conns, rate_mbit=rate_mbit, prefix="fbrelchk") as link:
        sk = link.spawn(netns.CHIEF, _me("sink", "--port", str(SINK_PORT), "--conns",
                                          str(conns)), stdout=subprocess.PIPE, text=True)
        _json_line(sk, "listening")
        senders = [link.spawn(i, _me("send", "--to", f"{link.chief_ip}:{SINK_PORT}",
                                     "--bytes", str(nbytes // conns)))
                   for i in range(conns)]
        out = _json_line(sk, "done")
        for p in [*senders, sk]:
            p.wait(TIMEOUT_S)
        q = link.qdisc_stats()
    return {**out, "qdisc": q}


def through_relay(rate_mbit: float, nbytes: int, conns: int) -> dict[str, Any]:
    sk = subprocess.Popen(_me("sink", "--port", "0", "--host", "127.0.0.1", "--conns",
                              str(conns)), stdout=subprocess.PIPE, text=True)
    relay = None
    try:
        port = _json_line(sk, "listening")["port"]
        relay = subprocess.Popen([sys.executable, "-m", "fedberry.bench.relay", "--upstream",
                                  f"127.0.0.1:{port}", "--rate-mbit", str(rate_mbit),
                                  "--payload-rate"], stdout=subprocess.PIPE, text=True)
        rport = _json_line(relay, "listening")["port"]
        senders = [subprocess.Popen(_me("send", "--to", f"127.0.0.1:{rport}", "--bytes",
                                        str(nbytes // conns))) for _ in range(conns)]
        out = _json_line(sk, "done")
        for p in senders:
            p.wait(TIMEOUT_S)
        return out
    finally:
        for p in (relay, sk):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m fedberry.bench.relay_check",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    s1 = sub.add_parser("sink")
    s1.add_argument("--port", type=int, required=True)
    s1.add_argument("--host", default="0.0.0.0")
    s1.add_argument("--conns", type=int, default=1)
    s2 = sub.add_parser("send")
    s2.add_argument("--to", required=True)
    s2.add_argument("--bytes", type=int, required=True)
    p.add_argument("--rate-mbit", type=float, default=20.0)
    p.add_argument("--mb", type=float, default=15.0, help="payload per configuration")
    p.add_argument("--conns", default="1,6", help="comma-separated connection counts")
    args = p.parse_args(argv)
    if args.cmd == "sink":
        sink(args.port, args.conns, args.host)
        return 0
    if args.cmd == "send":
        send(args.to, args.bytes)
        return 0
    ok, why = netns.available()
    if not ok:
        print(f"relay_check needs network namespaces: {why}", file=sys.stderr)
        return 2
    nominal = mbit_to_bytes_per_s(args.rate_mbit) * tcp_payload_fraction()
    nbytes = int(args.mb * 1e6)
    verdicts = []
    for conns in (int(c) for c in args.conns.split(",")):
        htb = through_htb(args.rate_mbit, nbytes, conns)
        rel = through_relay(args.rate_mbit, nbytes, conns)
        ratio = rel["payload_bytes_per_s"] / htb["payload_bytes_per_s"]
        row = {"conns": conns, "mb": args.mb, "rate_mbit": args.rate_mbit,
               "nominal_payload_mbit": nominal * 8 / 1e6,
               "htb_payload_mbit": htb["payload_bytes_per_s"] * 8 / 1e6,
               "relay_payload_mbit": rel["payload_bytes_per_s"] * 8 / 1e6,
               "relay_over_htb": ratio, "agree_within_10pct": abs(ratio - 1) <= 0.10}
        verdicts.append(row["agree_within_10pct"])
        print(json.dumps(row), flush=True)
    print("relay vs htb: " + ("agree within 10%" if all(verdicts) else "DISAGREE"), flush=True)
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
