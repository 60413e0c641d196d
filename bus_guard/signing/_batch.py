"""Batched artifacts: one Ed25519 signature per Merkle tree of artifacts (SPEC §6).

Per-message artifacts cost one Ed25519 signature each (~45 µs here), more than everything
else the gateway does for an intent. In batched mode the gateway collects the claims of a
short window of allowed intents, hashes each claims set as a leaf of an RFC 9162 Merkle
tree, signs the tree head once (:meth:`~bus_guard.signing._signer.Signer.sign_tree_head`) and
gives every message its own artifact: its leaf claims, the inclusion proof from that leaf
to the root, and the signed head. The format is documented in :mod:`bus_guard.verify._format`
and how it is verified in :mod:`bus_guard.verify._verifier`, which accepts both kinds
transparently. Trees are hashed with :mod:`bus_guard.verify._merkle`'s leaf and node
hashes, the ones the verifier checks proofs with.

:meth:`BatchSigner.sign_batch` is pure and synchronous; it fails closed: any failure
raises :class:`~bus_guard.errors.SigningError` and yields no artifact for any message of
the batch, so the caller forwards none of them.

Trade-off: a batch's messages wait for the batch to close (size or delay, the gateway's
window) and each artifact is larger (a proof of ⌈log2 n⌉ hashes and the head ride along,
~1.2 KiB for 256 leaves, against ~0.8 KiB); in exchange signing costs one signature per
batch and a verifier checks one signature per batch (the head is cached), hashes otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import msgspec

from bus_guard.errors import ConfigError, SigningError
from bus_guard.signing._signer import Signer
from bus_guard.verify import (
    BATCH_PREFIX,
    ArtifactClaims,
    b64url_encode,
    merkle_leaf_hash,
    merkle_node_hash,
)

__all__ = ("MAX_BATCH", "BatchSigner", "inclusion_proof", "merkle_levels")

# A proof of 32 hashes covers 2**32 leaves; batches are windows of milliseconds.
MAX_BATCH: Final = 1 << 20

# Same configuration as the signer's and the verifier's: the leaf bytes are exactly what a
# per-message artifact would carry as its claims segment.
_ENCODER: Final = msgspec.json.Encoder()


def merkle_levels(leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the RFC 9162 tree over *leaf_hashes*, leaves first, root last.

    Pairing left to right and carrying an odd last node up unchanged builds exactly the
    RFC's tree (the left subtree of n leaves holds the largest power of two below n).
    """
    if not leaf_hashes:
        raise ValueError("a Merkle tree needs at least one leaf")
    level = list(leaf_hashes)
    levels = [level]
    while len(level) > 1:
        # map over the even and odd slices pairs the nodes and stops at the shorter, leaving
        # an odd last node out. The call per node costs ~25 ns over an inlined hash (~2% of
        # sign_batch for 256 claims): the price of one definition of the hash.
        up = list(map(merkle_node_hash, level[0::2], level[1::2]))
        if len(level) & 1:
            up.append(level[-1])
        levels.append(up)
        level = up
    return levels


def inclusion_proof(levels: Sequence[Sequence[bytes]], index: int) -> bytes:
    """The RFC 9162 §2.1.3.1 audit path of leaf *index*: sibling hashes from the leaf up,
    concatenated. A node carried up without a sibling contributes nothing."""
    path = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            path.append(level[sibling])
        index >>= 1
    return b"".join(path)


class BatchSigner:
    """Signs batches of :class:`~bus_guard.verify.ArtifactClaims` with one signature each.

    >>> batcher = BatchSigner(signer)
    >>> artifacts = batcher.sign_batch(claims, now=time.time())  # one per claims, in order
    """

    __slots__ = ("_max_batch", "_signer")

    def __init__(self, signer: Signer, *, max_batch: int = MAX_BATCH) -> None:
        if not isinstance(signer, Signer):
            raise ConfigError(f"BatchSigner needs a Signer, got {type(signer).__name__}")
        if not 1 <= max_batch <= MAX_BATCH:
            raise ConfigError(f"max_batch must be within 1..{MAX_BATCH}, got {max_batch!r}")
        self._signer = signer
        self._max_batch = max_batch

    def __repr__(self) -> str:
        return f"BatchSigner({self._signer!r}, max_batch={self._max_batch})"

    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def issuer(self) -> str:
        return self._signer.issuer

    @property
    def kid(self) -> str:
        return self._signer.kid

    @property
    def ttl_s(self) -> float:
        return self._signer.ttl_s

    def sign_batch(self, claims: Sequence[ArtifactClaims], *, now: float) -> list[str]:
        """One ``Guard-Artifact`` value per claims set, in the same order.

        All or nothing: :class:`~bus_guard.errors.SigningError` if any claims set is not
        this signer's or anything fails; an empty batch gives an empty list.
        """
        n = len(claims)
        if n == 0:
            return []
        if n > self._max_batch:
            raise SigningError(f"batch of {n} exceeds max_batch {self._max_batch}")
        issuer = self._signer.issuer
        try:
            encode = _ENCODER.encode
            leaves = [encode(c) for c in claims]
            for c in claims:
                if c.iss != issuer:
                    raise SigningError(f"claims issuer {c.iss!r} is not this signer's")
            levels = merkle_levels(list(map(merkle_leaf_hash, leaves)))
            head = "~" + self._signer.sign_tree_head(root=levels[-1][0], size=n, now=now)
            return [
                f"{BATCH_PREFIX}{i}~{b64url_encode(leaf).decode('ascii')}~"
                f"{b64url_encode(inclusion_proof(levels, i)).decode('ascii')}{head}"
                for i, leaf in enumerate(leaves)
            ]
        except SigningError:
            raise
        # Synchronous code, so nothing here can be a cancellation; whatever went wrong,
        # the gateway must see SigningError and forward none of the batch.
        except Exception as exc:
            raise SigningError(f"cannot sign a batch of {n}: {exc!r}") from exc
