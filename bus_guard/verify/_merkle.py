"""RFC 9162 Merkle hashing: leaf and node hashes, and the inclusion-proof walk.

A leaf is ``SHA-256(0x00 || data)``, a node ``SHA-256(0x01 || left || right)``, and trees
of any size have the RFC's shape. The signer builds trees with these two functions
(:mod:`bus_guard.signing._batch`); the verifier walks inclusion proofs up to a signed
root with :func:`proof_leads_to`, which remembers the states of proofs that reached it.

There is one proof walk, ``_walk``: :func:`merkle_root_from_proof` is it with nothing
remembered, :func:`proof_leads_to` with a memo, so the shortcut cannot drift from the
full walk. The tests check the walk against the RFC's wording of the procedure.
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = (
    "ProofMemo",
    "merkle_leaf_hash",
    "merkle_node_hash",
    "merkle_root_from_proof",
    "proof_leads_to",
)

_HASH_BYTES: Final = 32
_sha256: Final = hashlib.sha256


def merkle_leaf_hash(data: bytes) -> bytes:
    """RFC 9162 §2.1.1: ``SHA-256(0x00 || data)``."""
    return _sha256(b"\x00" + data).digest()


def merkle_node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 §2.1.1: ``SHA-256(0x01 || left || right)``."""
    return _sha256(b"\x01" + left + right).digest()


def merkle_root_from_proof(leaf_hash: bytes, index: int, size: int, proof: bytes) -> bytes | None:
    """The root an inclusion proof leads to (RFC 9162 §2.1.3.2), or ``None`` if the proof
    cannot belong to leaf *index* of a tree of *size* leaves (wrong length or position).

    *proof* is the audit path: 32-byte hashes concatenated, from the leaf up.
    """
    # No root to meet and nothing remembered: the walk goes all the way up.
    return _walk(leaf_hash, index, size, proof, None, {})


# Proven path states of one tree: (node index, last index at its level) -> (node hash, the
# proof bytes from there up). Leaves of one tree share their upper path, so most proofs
# meet a proven state after a hash or two instead of ~log2(n).
ProofMemo = dict[tuple[int, int], tuple[bytes, bytes]]
_MEMO_STATES: Final = 4096  # states kept per tree (2 * 256 leaves fit)


def proof_leads_to(
    leaf_hash: bytes, index: int, size: int, proof: bytes, root: bytes, memo: ProofMemo
) -> bool:
    """``merkle_root_from_proof(leaf_hash, index, size, proof) == root``, remembering in
    *memo* the states of every proof that led to *root*.

    The rest of the walk depends only on its state (the node index ``fn``, the last
    index ``sn`` at its level, the hash ``r``) and the proof bytes still to come. So a
    state that already led to *root*, met again with the same hash and the same remaining
    proof bytes, leads there again: the walk stops, with exactly the answer the full walk
    gives (not merely "included": a proof differing in any byte is still refused).
    """
    return _walk(leaf_hash, index, size, proof, root, memo) == root


def _walk(
    leaf_hash: bytes, index: int, size: int, proof: bytes, root: bytes | None, memo: ProofMemo
) -> bytes | None:
    """The one proof walk, RFC 9162 §2.1.3.2: the root *proof* leads to, or ``None``.

    Every state in *memo* is known to lead to *root* (*memo* holds one tree's states), so
    meeting one ends the walk there; the states of a walk that ends at *root* are added.
    With ``root=None`` and an empty *memo* this is the plain walk: nothing is met, and
    nothing is added since no hash equals ``None``.
    """
    end = len(proof)
    if not 0 <= index < size or end % _HASH_BYTES:
        return None
    fn, sn, r = index, size - 1, leaf_hash
    sha256 = _sha256
    walked = []
    for offset in range(0, end, _HASH_BYTES):
        if sn == 0:
            return None  # a longer path than the tree is deep
        known = memo.get((fn, sn))
        if known is not None and known[0] == r and known[1] == proof[offset:]:
            reached = root
            break
        walked.append((fn, sn, r, offset))
        sibling = proof[offset : offset + _HASH_BYTES]
        # merkle_node_hash, inlined: a call per level costs more than the hash's concat.
        if fn & 1:
            r = sha256(b"\x01" + sibling + r).digest()
        elif fn == sn:
            r = sha256(b"\x01" + sibling + r).digest()
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = sha256(b"\x01" + r + sibling).digest()
        fn >>= 1
        sn >>= 1
    else:
        if sn != 0:
            return None  # a shorter path than the tree is deep
        reached = r
    if reached == root and len(memo) < _MEMO_STATES:
        for fn, sn, r, offset in walked:
            memo[(fn, sn)] = (r, proof[offset:])
    return reached
