"""TCP transport on asyncio: ``chief.TcpChief`` listens, ``worker.TcpSession`` dials.

Both read tensor bytes straight into numpy buffers (``asyncio.BufferedProtocol``) and send them
without copies (``stream._FrameWriter``); TLS wraps the same protocols. They move bytes and run
timers around the protocol's connection objects (``protocol.connection``), which hold the
handshake and every check; what a message means for the round is ``chief.runtime``'s business.
"""

from fedberry.transports.tcp.chief import ListenOptions, TcpChief
from fedberry.transports.tcp.stream import PREAUTH_LIMITS, is_loopback, parse_address
from fedberry.transports.tcp.worker import TcpSession

__all__ = ["PREAUTH_LIMITS", "ListenOptions", "TcpChief", "TcpSession", "is_loopback",
           "parse_address"]
