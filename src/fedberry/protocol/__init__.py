"""The fedberry wire protocol, sans-IO, in the manner of h11.

Nothing in this package touches a socket, a thread, a clock or an event loop; transports move
the bytes and run the timers. From the bottom up (each module imports only those above it):

* ``encodings``: wire rules of the tensor codecs (which codec on which frame, the tensors a
  codec implies); imports nothing of fedberry's.
* ``limits``: every limit, with where its value comes from; ``model_limits`` for a joined
  connection, used by both sides.
* ``spec``: frame types, error codes, ``ProtocolError``, tensor specs.
* ``auth``: the challenge + HMAC arithmetic.
* ``frames``: bytes <-> frames (``FrameDecoder``, zero-copy for ``asyncio.BufferedProtocol``).
* ``messages``: typed messages, every field's checks once.
* ``connection``: ``ChiefConnection`` and ``WorkerConnection``, the conversation's states.
"""
