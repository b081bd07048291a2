"""The chief's "listening on ..." line: where it listens, how workers are let in, and which
address they dial (a chief binds a private address; workers dial the one they can reach)."""

from __future__ import annotations

import ipaddress
import socket

from fedberry.transports.tcp.stream import is_loopback

_ANY = ("0.0.0.0", "::", "")


def listening_line(host: str, port: int, *, tls: bool, token: bool, client_certs: bool) -> str:
    """One sentence for the operator: the bound address, the security, and what to give the
    workers' ``--chief``."""
    how = "TLS" if tls else "plain TCP"
    who = ("client certificates" if client_certs else "a token" if token
           else "no token: anyone who reaches the port may join")
    if is_loopback(host):
        dial = f"workers on this machine dial tcp://{_hostport(host, port)}"
    elif host in _ANY:
        guess = _this_machines_address()
        example = f"tcp://{_hostport(guess, port)}" if guess else f"tcp://THIS-HOST:{port}"
        dial = (f"workers dial an address of this machine they can reach, e.g. {example} "
                "(or the public address that forwards to it)")
    else:
        dial = (f"workers dial tcp://{_hostport(host, port)} (or the public address that "
                "forwards to it)")
    if tls:
        dial += ", with --ca; the name they dial must be in the chief's certificate"
    return f"listening on {_hostport(host, port)} ({how}, {who}): {dial}"


def _hostport(host: str, port: int) -> str:
    try:
        if isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def _this_machines_address() -> str | None:
    """The address this machine's default route leaves from (a UDP "connect" sends nothing),
    as a likely one for workers on the same network to dial; None when there is no route."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith(("0.", "127.")) else address
