"""The SecAgg+ communication graph: a random k-regular (Harary) graph from a public seed.

Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead" (CCS'20),
§3-4: instead of every pair of clients masking and sharing (the complete graph of Bonawitz et al.
2017, O(n) work per client), each client does so with k = O(log n) neighbours of a random
Harary graph H(n, k): the clients are placed on a ring in a random order and each is joined to
the k/2 nearest on either side. The order comes from a public round seed (SHA-256 of seed and
id, sorted), so every client and the server derive the same graph without talking; k >= n - 1
gives the complete graph, i.e. Bonawitz et al. 2017.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

from .errors import ConfigError


def default_neighbors(n: int) -> int:
    """k = 2 * ceil(log2 n), capped at n - 1 (the complete graph for small n).

    Bell et al. 2020 prove k = O(log n) keeps the honest survivors of every neighbourhood
    connected with overwhelming probability; this constant is our choice, not the paper's table.
    """
    if n <= 2:
        return max(n - 1, 0)
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def default_threshold(neighbors: int) -> int:
    """A strict majority of a client's group (itself and its neighbours): floor((k+1)/2) + 1.

    Shares of a client's secrets go to its group; with a majority threshold a server that tells
    part of the group "it survived" and the rest "it dropped" can never collect enough of both
    kinds of share (Bonawitz et al. 2017 §6's argument, applied per neighbourhood as in Bell et
    al. 2020).
    """
    return (neighbors + 1) // 2 + 1


def neighbour_graph(clients: Sequence[int], neighbors: int,
                    seed: bytes) -> dict[int, frozenset[int]]:
    """client -> its neighbours in the random Harary graph H(len(clients), neighbors)."""
    n = len(clients)
    if neighbors >= n - 1:
        everyone = frozenset(clients)
        return {c: everyone - {c} for c in clients}
    if neighbors < 2 or neighbors % 2:
        raise ConfigError(f"neighbors is an even number >= 2 (each client joins neighbors/2 on "
                          f"either side of a random ring), or >= {n - 1} for the complete "
                          f"graph, not {neighbors}")
    ring = sorted(clients, key=lambda c: hashlib.sha256(seed + struct.pack("<I", c)).digest())
    half = neighbors // 2
    graph = {}
    for pos, c in enumerate(ring):
        graph[c] = frozenset(ring[(pos + d) % n] for d in range(-half, half + 1) if d)
    return graph
