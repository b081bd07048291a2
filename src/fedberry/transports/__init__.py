"""How bytes move between a worker and its chief; what they mean is the protocol's business.

``connect`` turns an address into a worker's session (``tcp://``, ``mpi://``, or an in-process
chief); ``loop`` is the event-loop thread the TCP side and the chief run on; ``local`` is the
in-process worker, ``tcp/`` the asyncio sockets (TLS optional), ``mpi`` the collectives under
mpiexec; ``pacing`` is how a caller (the benchmark) slows the TCP chief to an emulated link.
"""
