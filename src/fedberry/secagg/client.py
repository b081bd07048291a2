"""The client side of one SecAgg+ round: a sans-IO object, one method per round.

Bonawitz et al. 2017 Fig. 4 (the complete graph) and Bell et al. 2020 Fig. 3 (neighbours of a
random Harary graph). Each method takes what the server sent and returns what to send back; it
does no I/O, starts no thread and reads no clock (the caller owns deadlines). Methods must be
called in order, once each; anything else, and every unsafe request, is refused with a
sentence (a :class:`~fedberry.secagg.errors.SecAggError`). A step that refuses or fails ends the
client's part in the round (it never answers a step twice, nor goes on from a half-done one);
the next round is a fresh object with fresh keys.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Concatenate, ParamSpec, TypeVar

import numpy as np

from . import aead, keys, shamir
from .errors import MessageError, UnsafeRequest
from .messages import (
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

_PHASES = ("advertise", "share_keys", "mask", "unmask", "done")
_FAILED = -1
_T = TypeVar("_T")
_P = ParamSpec("_P")
_Method = Callable[Concatenate["SecAggClient", _P], _T]


def _round_step(phase: str) -> Callable[[_Method[_P, _T]], _Method[_P, _T]]:
    """Make a method one round step: in order, once; one that raises ends the client's round."""
    def decorate(method: _Method[_P, _T]) -> _Method[_P, _T]:
        @functools.wraps(method)
        def run(self: SecAggClient, *args: _P.args, **kwargs: _P.kwargs) -> _T:
            with self._step(phase):
                return method(self, *args, **kwargs)
        return run
    return decorate
PLAINTEXT_BYTES = 2 * shamir.SHARE_BYTES
SEALED_BYTES = aead.NONCE_BYTES + PLAINTEXT_BYTES + aead.TAG_BYTES


def pair_sign(me: int, peer: int) -> int:
    """+1 if ``me`` adds the pair's mask, -1 if it subtracts it (the lower id adds)."""
    return 1 if me < peer else -1


class SecAggClient:
    """One client in one round. ``entropy`` (default ``os.urandom``) makes keys, seeds, shares
    and nonces; tests pass a seeded source to be reproducible."""

    def __init__(self, config: RoundConfig, client_id: int, *,
                 entropy: Callable[[int], bytes] = os.urandom) -> None:
        if client_id not in config.graph:
            raise MessageError(f"client {client_id} is not selected for round "
                               f"{config.round_number}")
        self.config = config
        self.id = client_id
        self._entropy = entropy
        self._mask_keys = keys.generate_keypair(entropy)
        self._enc_keys = keys.generate_keypair(entropy)
        self._phase = 0
        self._peers: dict[int, KeyAdvert] = {}      # neighbours that advertised (round 0)
        self._own_seed_share = b""                 # this client's share of its own seed b
        self._seed_shares: dict[int, bytes] = {}    # peer -> share of its self-mask seed
        self._key_shares: dict[int, bytes] = {}     # peer -> share of its mask private key

    @property
    def neighbours(self) -> frozenset[int]:
        """This client's neighbours in the round's graph."""
        return self.config.graph[self.id]

    @contextmanager
    def _step(self, phase: str) -> Iterator[None]:
        if self._phase == _FAILED:
            raise MessageError(f"client {self.id} refused or failed an earlier step of round "
                               f"{self.config.round_number}: it takes no further part in it")
        expected = _PHASES[self._phase]
        if phase != expected:
            raise MessageError(f"client {self.id} is at '{expected}', not '{phase}': each round "
                               "step runs once, in order")
        try:
            yield
        except BaseException:
            self._phase = _FAILED
            raise
        self._phase += 1

    # ------------------------------------------------------------------ round 0
    @_round_step("advertise")
    def advertise(self) -> KeyAdvert:
        """Round 0: this client's two public keys."""
        return KeyAdvert(self.id, self._mask_keys.public, self._enc_keys.public)

    # ------------------------------------------------------------------ round 1
    @_round_step("share_keys")
    def share_keys(self, adverts: Iterable[KeyAdvert]) -> ShareBundle:
        """Round 1: Shamir-share the self-mask seed b and the mask private key among this
        client and its neighbours that advertised, each share sealed for its holder."""
        cfg = self.config
        seen = {self._mask_keys.public, self._enc_keys.public}
        for advert in adverts:
            if advert.sender not in self.neighbours:
                raise MessageError(f"client {advert.sender}'s keys were sent to client "
                                   f"{self.id}, which is not its neighbour")
            if advert.sender in self._peers:
                raise MessageError(f"client {advert.sender}'s keys arrived twice")
            if {advert.mask_public, advert.encryption_public} & seen or \
                    advert.mask_public == advert.encryption_public:
                raise MessageError(f"client {advert.sender} advertises a public key already "
                                   "in use this round (a replayed key)")
            seen |= {advert.mask_public, advert.encryption_public}
            self._peers[advert.sender] = advert
        if len(self._peers) + 1 < cfg.threshold:
            raise UnsafeRequest(f"only {len(self._peers)} of client {self.id}'s "
                                f"{len(self.neighbours)} neighbours advertised keys: with itself "
                                f"that is below the threshold of {cfg.threshold} holders")
        holders = [self.id, *self._peers]
        self._seed = self._entropy(shamir.SECRET_BYTES)
        seed_shares = shamir.split(self._seed, holders, cfg.threshold, self._entropy)
        key_shares = shamir.split(self._mask_keys.private, holders, cfg.threshold,
                                  self._entropy)
        self._own_seed_share = seed_shares[self.id]
        sealed = []
        for peer, advert in sorted(self._peers.items()):
            key = keys.agree(self._enc_keys.private, advert.encryption_public,
                             purpose=b"share-encryption", context=cfg.digest,
                             pair=(self.id, peer))
            sealed.append(EncryptedShare(self.id, peer, aead.seal(
                key, seed_shares[peer] + key_shares[peer], context=cfg.digest,
                sender=self.id, receiver=peer, entropy=self._entropy)))
        return ShareBundle(self.id, tuple(sealed))

    # ------------------------------------------------------------------ round 2
    @_round_step("mask")
    def mask(self, forwarded: ForwardedShares, encoded: np.ndarray) -> MaskedInput:
        """Round 2: open the neighbours' shares, then mask the encoded input with the self
        mask and one pairwise mask per neighbour that sent shares."""
        cfg = self.config
        if forwarded.receiver != self.id:
            raise MessageError(f"shares for client {forwarded.receiver} were sent to client "
                               f"{self.id}")
        if not isinstance(encoded, np.ndarray) or encoded.dtype != cfg.dtype or \
                encoded.shape != (cfg.length,):
            got = getattr(encoded, "dtype", type(encoded).__name__)
            shape = getattr(encoded, "shape", "?")
            raise MessageError(f"the encoded input is {cfg.dtype} of shape ({cfg.length},), "
                               f"not {got} of shape {shape}")
        senders: set[int] = set()
        for share in forwarded.shares:
            if share.receiver != self.id:
                raise MessageError(f"a share for client {share.receiver} was forwarded to "
                                   f"client {self.id}")
            if share.sender not in self._peers:
                raise MessageError(f"client {share.sender} sent client {self.id} a share but did "
                                   "not advertise keys to it")
            if share.sender in senders:
                raise MessageError(f"client {share.sender}'s share arrived twice")
            if len(share.sealed) != SEALED_BYTES:
                raise MessageError(f"the encrypted share from client {share.sender} is "
                                   f"{len(share.sealed)} bytes, not {SEALED_BYTES}")
            key = keys.agree(self._enc_keys.private, self._peers[share.sender].encryption_public,
                             purpose=b"share-encryption", context=cfg.digest,
                             pair=(self.id, share.sender))
            plain = aead.open_sealed(key, share.sealed, context=cfg.digest,
                                     sender=share.sender, receiver=self.id)
            senders.add(share.sender)
            self._seed_shares[share.sender] = plain[:shamir.SHARE_BYTES]
            self._key_shares[share.sender] = plain[shamir.SHARE_BYTES:]
        if len(senders) + 1 < cfg.threshold:
            raise UnsafeRequest(f"only {len(senders)} of client {self.id}'s neighbours sent key "
                                f"shares: masking with so few would expose its input "
                                f"(threshold {cfg.threshold})")
        masks = [(self._seed, 1)]
        for peer in sorted(senders):
            pairwise = keys.agree(self._mask_keys.private, self._peers[peer].mask_public,
                                  purpose=b"mask", context=cfg.digest, pair=(self.id, peer))
            masks.append((pairwise, pair_sign(self.id, peer)))
        masked = encoded.copy()
        add_masks(masked, masks)
        return MaskedInput(self.id, masked)

    # ------------------------------------------------------------------ round 3
    @_round_step("unmask")
    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Round 3: shares of survivors' self-mask seeds and of dropouts' mask keys.

        Refuses (:class:`UnsafeRequest`) a request that names a peer both survivor and
        dropout (both shares would unmask that peer's input), that calls this client a dropout
        or leaves it out, that leaves a peer it holds shares of unnamed, or that names fewer
        than ``threshold`` survivors in its group. Only one request is answered per round.
        """
        survivors, dropouts = request.survivors, request.dropouts
        both = survivors & dropouts
        if both:
            raise UnsafeRequest(f"client {self.id} refuses to unmask: the server asks for both "
                                f"kinds of share of client(s) {sorted(both)}, which would reveal "
                                "their inputs")
        if self.id not in survivors:
            raise UnsafeRequest(f"client {self.id} refuses to unmask: the request does not list "
                                "it as a survivor, yet it sent its masked input")
        holding = set(self._seed_shares)
        unnamed = holding - survivors - dropouts
        if unnamed:
            raise UnsafeRequest(f"client {self.id} refuses to unmask: the request names neither "
                                f"survivor nor dropout for client(s) {sorted(unnamed)}, whose "
                                "shares it holds")
        group = survivors & (holding | {self.id})
        if len(group) < self.config.threshold:
            raise UnsafeRequest(f"client {self.id} refuses to unmask: only {len(group)} of its "
                                f"group survived, fewer than the threshold "
                                f"{self.config.threshold}")
        seed_shares = {p: self._seed_shares[p] for p in sorted(holding & survivors)}
        seed_shares[self.id] = self._own_seed_share
        key_shares = {p: self._key_shares[p] for p in sorted(holding & dropouts)}
        return UnmaskReply(self.id, seed_shares, key_shares)
