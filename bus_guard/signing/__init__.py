"""Signing: authorization artifacts (per message or per Merkle batch) and the keys.

``_signer`` signs one artifact (a compact JWS) or a tree head; ``_batch`` builds the RFC
9162 trees of batched mode; ``_keys`` makes, loads, rotates and revokes Ed25519 keys and
writes the JWKS executors verify with. What executors need lives in :mod:`bus_guard.verify`.
"""

from bus_guard.signing._batch import MAX_BATCH, BatchSigner
from bus_guard.signing._keys import (
    DEFAULT_GRACE_S,
    JWKS_FILENAME,
    KEY_FILENAME,
    Rotation,
    add_key_to_jwks,
    generate_key,
    kid_for,
    load_private_key,
    public_jwk,
    revoke_key,
    rotate_key,
)
from bus_guard.signing._signer import Signer

__all__ = (
    "DEFAULT_GRACE_S",
    "JWKS_FILENAME",
    "KEY_FILENAME",
    "MAX_BATCH",
    "BatchSigner",
    "Rotation",
    "Signer",
    "add_key_to_jwks",
    "generate_key",
    "kid_for",
    "load_private_key",
    "public_jwk",
    "revoke_key",
    "rotate_key",
)
