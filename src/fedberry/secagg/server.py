"""The server side of one SecAgg+ round: a sans-IO object that sees only masked vectors.

Bonawitz et al. 2017 Fig. 4 / Bell et al. 2020 Fig. 3. The caller feeds each client's message
to a ``receive_*`` method as it arrives and, when everyone expected has answered or its deadline
has passed, calls the matching ``close_*`` to get what to send next; every check on a message is
made once, on receipt. Memory is O(model): masked inputs are added into one running ring sum as
they arrive, and masks are removed from it in place, chunk by chunk.

Client sets, in the paper's notation: U1 advertised keys, U2 sent shares, U3 sent a masked
input (the survivors; U2 minus U3 are the dropouts), U4 answered the unmasking request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import keys, shamir
from .client import SEALED_BYTES, pair_sign
from .errors import MessageError, TamperedShare, TooFewSurvivors
from .messages import (
    AggregateResult,
    EncryptedShare,
    ForwardedShares,
    KeyAdvert,
    MaskedInput,
    RoundConfig,
    ShareBundle,
    UnmaskReply,
    UnmaskRequest,
)
from .prg import add_masks

_PHASES = ("adverts", "shares", "masked", "unmask", "done")


@dataclass
class Unmasking:
    """The last, costly part of a round: the running ring sum and the masks to take out of it
    (seed, sign), every secret already rebuilt and checked. ``run()`` may be called on any
    thread (the chief runs it off its event loop): the server has let go of the sum, so
    nothing else reads or writes it meanwhile."""

    survivors: tuple[int, ...]
    ring_sum: np.ndarray
    masks: list[tuple[bytes, int]]

    def run(self) -> AggregateResult:
        """Remove every mask from the sum, in place; the exact ring sum of the survivors'
        inputs. Only once."""
        masks, self.masks = self.masks, []
        add_masks(self.ring_sum, masks)
        return AggregateResult(self.survivors, self.ring_sum)


class SecAggServer:
    """The server in one round: collects, routes, sums, and unmasks only the sum."""

    def __init__(self, config: RoundConfig) -> None:
        self.config = config
        self._phase = 0
        self._adverts: dict[int, KeyAdvert] = {}
        self._bundles: dict[int, ShareBundle] = {}
        self._survivors: set[int] = set()
        self._sum = np.zeros(config.length, dtype=config.dtype)
        self._request: UnmaskRequest | None = None
        self._replies: dict[int, UnmaskReply] = {}
        # Lagrange coefficients per holder set: most secrets are rebuilt from the same holders.
        self._weights: dict[tuple[int, ...], dict[int, int]] = {}

    def _at(self, phase: str, sender: int | None = None) -> None:
        if _PHASES[self._phase] != phase:
            raise MessageError(f"the server is collecting '{_PHASES[self._phase]}', not "
                               f"'{phase}'" + (f" (from client {sender})" if sender else ""))

    def _graph(self, client: int) -> frozenset[int]:
        return self.config.graph[client]

    @property
    def phase(self) -> str:
        """What the server is collecting: adverts, shares, masked, unmask, or done."""
        return _PHASES[self._phase]

    @property
    def waiting_for(self) -> frozenset[int]:
        """The clients the current phase still expects (empty: close it now rather than at
        the deadline). Only those that took part in the previous phase are expected."""
        sent = {"adverts": (set(self.config.clients), self._adverts),
                "shares": (self._adverts, self._bundles),
                "masked": (self._bundles, self._survivors),
                "unmask": (self._survivors, self._replies)}.get(self.phase)
        return frozenset() if sent is None else frozenset(set(sent[0]) - set(sent[1]))

    @property
    def survivors(self) -> tuple[int, ...]:
        """U3: the clients whose masked input is in the sum (the unmasking request goes to
        them)."""
        return tuple(sorted(self._survivors))

    # ------------------------------------------------------------------ round 0
    def receive_advert(self, advert: KeyAdvert) -> None:
        """Round 0: a client's public keys."""
        self._at("adverts", advert.sender)
        if advert.sender not in self.config.graph:
            raise MessageError(f"client {advert.sender} is not selected for this round")
        if advert.sender in self._adverts:
            raise MessageError(f"client {advert.sender} advertised keys twice")
        if (advert.mask_public == advert.encryption_public
                or not keys.usable_public(advert.mask_public)
                or not keys.usable_public(advert.encryption_public)):
            raise MessageError(f"client {advert.sender} advertises a degenerate or repeated "
                               "public key, which its neighbours could not agree a secret with")
        self._adverts[advert.sender] = advert

    def close_adverts(self) -> dict[int, tuple[KeyAdvert, ...]]:
        """End round 0: for each client in U1, the adverts of its neighbours in U1."""
        self._at("adverts")
        self._need(len(self._adverts), "advertised keys")
        self._phase += 1
        return {c: tuple(self._adverts[p] for p in sorted(self._graph(c) & self._adverts.keys()))
                for c in sorted(self._adverts)}

    # ------------------------------------------------------------------ round 1
    def receive_shares(self, bundle: ShareBundle) -> None:
        """Round 1: a client's sealed shares, exactly one for each neighbour in U1."""
        self._at("shares", bundle.sender)
        sender = bundle.sender
        if sender not in self._adverts:
            raise MessageError(f"client {sender} sent shares without advertising keys")
        if sender in self._bundles:
            raise MessageError(f"client {sender} sent shares twice")
        expected = self._graph(sender) & self._adverts.keys()
        receivers = [s.receiver for s in bundle.shares]
        if len(set(receivers)) != len(receivers) or set(receivers) != expected:
            raise MessageError(f"client {sender} sent shares for {sorted(receivers)}, not for "
                               f"its neighbours that advertised, {sorted(expected)}")
        for share in bundle.shares:
            if share.sender != sender:
                raise MessageError(f"client {sender}'s bundle holds a share from client "
                                   f"{share.sender}")
            if len(share.sealed) != SEALED_BYTES:
                raise MessageError(f"client {sender}'s share for client {share.receiver} is "
                                   f"{len(share.sealed)} bytes, not {SEALED_BYTES}")
        self._bundles[sender] = bundle

    def close_shares(self) -> dict[int, ForwardedShares]:
        """End round 1: for each client in U2, the shares sealed for it by clients in U2."""
        self._at("shares")
        self._need(len(self._bundles), "sent key shares")
        self._phase += 1
        inbox: dict[int, list[EncryptedShare]] = {c: [] for c in self._bundles}
        for bundle in self._bundles.values():
            for share in bundle.shares:
                if share.receiver in inbox:
                    inbox[share.receiver].append(share)
        return {c: ForwardedShares(c, tuple(sorted(v, key=lambda s: s.sender)))
                for c, v in sorted(inbox.items())}

    # ------------------------------------------------------------------ round 2
    def receive_masked(self, masked: MaskedInput) -> None:
        """Round 2: a client's masked input, added into the running sum at once."""
        self._at("masked", masked.sender)
        cfg = self.config
        if masked.sender not in self._bundles:
            raise MessageError(f"client {masked.sender} sent a masked input without sharing keys")
        if masked.sender in self._survivors:
            raise MessageError(f"client {masked.sender} sent its masked input twice")
        if masked.vector.dtype != cfg.dtype or masked.vector.shape != (cfg.length,):
            raise MessageError(f"client {masked.sender}'s masked input is {masked.vector.dtype} "
                               f"of shape {masked.vector.shape}, not {cfg.dtype} of shape "
                               f"({cfg.length},)")
        np.add(self._sum, masked.vector, out=self._sum)
        self._survivors.add(masked.sender)

    def close_masked(self) -> UnmaskRequest:
        """End round 2: the request every survivor gets (survivors U3, dropouts U2 - U3)."""
        self._at("masked")
        self._need(len(self._survivors), "sent masked inputs")
        self._phase += 1
        self._request = UnmaskRequest(frozenset(self._survivors),
                                      frozenset(self._bundles.keys() - self._survivors))
        return self._request

    # ------------------------------------------------------------------ round 3
    def receive_unmask(self, reply: UnmaskReply) -> None:
        """Round 3: a survivor's shares; only those the request asked of it are accepted."""
        self._at("unmask", reply.sender)
        assert self._request is not None
        sender = reply.sender
        if sender not in self._survivors:
            raise MessageError(f"client {sender} answered the unmasking request but is not a "
                               "survivor")
        if sender in self._replies:
            raise MessageError(f"client {sender} answered the unmasking request twice")
        held = self._holdings(sender)
        bad_seed = set(reply.seed_shares) - (held & self._request.survivors | {sender})
        bad_key = set(reply.key_shares) - (held & self._request.dropouts)
        if bad_seed or bad_key:
            raise MessageError(f"client {sender} returned shares it was not asked for "
                               f"(seeds of {sorted(bad_seed)}, keys of {sorted(bad_key)})")
        self._replies[sender] = reply

    def _holdings(self, holder: int) -> set[int]:
        """The clients whose shares ``holder`` received: its neighbours in U2."""
        return set(self._graph(holder) & self._bundles.keys())

    def finish(self) -> AggregateResult:
        """End round 3: rebuild the survivors' seeds and the dropouts' mask keys, remove every
        mask from the sum, and return the exact ring sum of the survivors' inputs
        (:meth:`unmasking`, then its ``run``).

        Raises :class:`TooFewSurvivors` naming the first secret with fewer than ``threshold``
        shares; nothing is changed then, so more replies may still be received (before the
        caller's deadline) and ``finish`` called again. Nothing about any single input is
        revealed either way.
        """
        return self.unmasking().run()

    def unmasking(self) -> Unmasking:
        """End round 3's part that needs the server: rebuild every secret (milliseconds; the
        refusals of :meth:`finish`, with nothing changed) and hand over the sum with the masks
        to remove from it, the part whose cost grows with the model (its ``run``)."""
        self._at("unmask")
        assert self._request is not None
        cfg = self.config
        masks: list[tuple[bytes, int]] = []
        for v in sorted(self._request.survivors):
            shares = {h: r.seed_shares[v] for h, r in self._replies.items() if v in r.seed_shares}
            seed = self._combine(shares, f"client {v}'s self-mask seed")
            masks.append((seed, -1))
        for d in sorted(self._request.dropouts):
            shares = {h: r.key_shares[d] for h, r in self._replies.items() if d in r.key_shares}
            private = self._combine(shares, f"dropped client {d}'s mask key")
            if keys.public_from_private(private) != self._adverts[d].mask_public:
                raise TamperedShare(f"the shares of dropped client {d}'s mask key rebuild a key "
                                    "that does not match its advertised public key: a holder "
                                    "returned a wrong share")
            for v in sorted(self._graph(d) & self._survivors):
                pairwise = keys.agree(private, self._adverts[v].mask_public, purpose=b"mask",
                                      context=cfg.digest, pair=(d, v))
                # v added pair_sign(v, d) * PRG(s_vd); take it out.
                masks.append((pairwise, -pair_sign(v, d)))
        self._phase += 1  # every secret is rebuilt: from here on the sum is being unmasked
        return Unmasking(self.survivors, self._sum, masks)

    def _combine(self, shares: dict[int, bytes], what: str) -> bytes:
        holders = tuple(sorted(shares)[:self.config.threshold])
        if len(holders) == self.config.threshold and holders not in self._weights:
            self._weights[holders] = shamir.lagrange_at_zero(holders)
        return shamir.combine(shares, self.config.threshold, what=what,
                              weights=self._weights.get(holders))

    def _need(self, count: int, did: str) -> None:
        if count < self.config.threshold:
            raise TooFewSurvivors(f"only {count} client(s) {did}, fewer than the threshold "
                                  f"{self.config.threshold}: the round cannot finish")
