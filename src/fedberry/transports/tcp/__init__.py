"""TCP transport on asyncio: ``tcp_chief.TcpChief`` listens, ``tcp_worker.TcpSession`` dials.

Both read tensor bytes straight into numpy buffers (``asyncio.BufferedProtocol``) and send them
without copies (``stream._FrameWriter``); TLS wraps the same protocols. They move frames and run
the handshake; what a frame means for the round is ``server.ChiefServer``'s business.
"""

from fedberry.transports.tcp.chief import ListenOptions, TcpChief
from fedberry.transports.tcp.stream import PREAUTH_LIMITS, is_loopback, parse_address
from fedberry.transports.tcp.worker import TcpSession

__all__ = ["PREAUTH_LIMITS", "ListenOptions", "TcpChief", "TcpSession", "is_loopback",
           "parse_address"]
