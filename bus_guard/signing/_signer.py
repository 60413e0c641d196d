"""Sign authorization artifacts: one compact JWS per forwarded message (SPEC §6).

This is on the gateway's hot path. Everything that does not depend on the claims (the
protected header segment, the encoder, the key object) is built once, so a signature
costs one msgspec encode, two base64 encodes and one Ed25519 signature.

Batched mode (:mod:`bus_guard.signing._batch`) signs one :class:`TreeHead` per batch instead, with
:meth:`Signer.sign_tree_head`; it is a JWS of its own ``typ`` so that neither kind of
token can be passed off as the other.

:class:`ArtifactClaims` lives in :mod:`bus_guard.verify`, so that executors import that
module alone; it is re-exported here.
"""

from __future__ import annotations

import binascii
import math
from typing import Any, Final

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bus_guard.errors import ConfigError, SigningError
from bus_guard.signing._keys import kid_for, public_jwk
from bus_guard.verify import (
    TREE_HEAD_TYP,
    ArtifactClaims,
    TreeHead,
    b64url_encode,
    payload_digest,
    protected_header,
)

__all__ = ("ArtifactClaims", "Signer", "TreeHead", "payload_digest")

# Same configuration as the verifier's, so that a verifier re-encoding decoded claims
# gets back the exact signed bytes (its fast path).
_CLAIMS_ENCODER: Final = msgspec.json.Encoder()
_B64URL: Final = bytes.maketrans(b"+/", b"-_")  # base64 to base64url (b64url_encode's table)


class Signer:
    """Signs :class:`ArtifactClaims` with one Ed25519 key as gateway *issuer*."""

    __slots__ = ("_encode", "_head_prefix", "_key", "_prefix", "issuer", "kid", "ttl_s")

    def __init__(self, private_key: Ed25519PrivateKey, *, issuer: str, ttl_s: float = 60.0) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigError(f"signing key must be Ed25519, got {type(private_key).__name__}")
        if not issuer:
            raise ConfigError("issuer (gateway id) must not be empty")
        if not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ConfigError(f"ttl_s must be a finite number > 0, got {ttl_s!r}")
        self._key = private_key
        self._encode = _CLAIMS_ENCODER.encode
        self.issuer = issuer
        self.ttl_s = float(ttl_s)
        self.kid = kid_for(private_key.public_key())
        self._prefix = protected_header(self.kid).encode("ascii") + b"."
        self._head_prefix = protected_header(self.kid, TREE_HEAD_TYP).encode("ascii") + b"."

    def __repr__(self) -> str:
        return f"Signer(kid={self.kid!r}, issuer={self.issuer!r}, ttl_s={self.ttl_s})"

    def rekey(self, private_key: Ed25519PrivateKey) -> None:
        """Sign with *private_key* from now on (a rotation, in a running gateway).

        Called on the event loop that signs: :meth:`sign` is synchronous, so no artifact
        is signed half with the old key's header and half with the new key."""
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigError(f"signing key must be Ed25519, got {type(private_key).__name__}")
        kid = kid_for(private_key.public_key())
        self._prefix = protected_header(kid).encode("ascii") + b"."
        self._head_prefix = protected_header(kid, TREE_HEAD_TYP).encode("ascii") + b"."
        self._key = private_key
        self.kid = kid

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def jwks(self) -> dict[str, Any]:
        """A JWKS holding this signer's public key."""
        return {"keys": [public_jwk(self._key)]}

    def sign(self, claims: ArtifactClaims) -> str:
        """The compact JWS of *claims*; :class:`~bus_guard.errors.SigningError` on failure."""
        if claims.iss != self.issuer:
            raise SigningError(f"claims issuer {claims.iss!r} is not this signer's")
        # b64url_encode twice, inline: two Python frames less per artifact (once per intent
        # in core per-message mode).
        b2a = binascii.b2a_base64
        try:
            body = b2a(self._encode(claims), newline=False).translate(_B64URL).rstrip(b"=")
            signing_input = self._prefix + body
            signature = self._key.sign(signing_input)
        # Synchronous code, so nothing here can be a cancellation; whatever went wrong,
        # the gateway must see SigningError and deny rather than forward unsigned.
        except Exception as exc:
            raise SigningError(f"cannot sign artifact {claims.jti!r}: {exc!r}") from exc
        tail = b2a(signature, newline=False).translate(_B64URL).rstrip(b"=")
        return (signing_input + b"." + tail).decode("ascii")

    def sign_tree_head(self, *, root: bytes, size: int, now: float) -> str:
        """The compact JWS (``typ`` ``guard-tree-head+jwt``) of a Merkle tree head: the
        RFC 9162 *root* hash of a tree of *size* leaves, signed at *now*.

        :class:`~bus_guard.errors.SigningError` on failure.
        """
        if len(root) != 32 or not 1 <= size <= 2**53 - 1:
            raise SigningError(f"not a tree head: {len(root)}-byte root, size {size}")
        try:
            head = TreeHead(
                iss=self.issuer,
                iat=int(now),
                tree_size=size,
                root_hash=b64url_encode(root).decode("ascii"),
            )
            signing_input = self._head_prefix + b64url_encode(self._encode(head))
            signature = self._key.sign(signing_input)
        except Exception as exc:  # synchronous: never a cancellation (see sign)
            raise SigningError(f"cannot sign tree head of {size} leaves: {exc!r}") from exc
        return (signing_input + b"." + b64url_encode(signature)).decode("ascii")

    def build_claims(
        self,
        *,
        now: float,
        sub: str,
        aud: str,
        jti: str,
        action: str,
        resource: str,
        intent_id: str,
        payload: bytes,
        policy_digest: str,
        policy_version: str,
        rules: tuple[str, ...],
        mode: str,
        would_deny: bool = False,
        parents: tuple[str, ...] = (),
        lineage_depth: int = 0,
        lineage_root: str = "",
        ledger_seq: int = 0,
    ) -> ArtifactClaims:
        """Claims for *payload* valid from ``int(now)`` for ``ttl_s`` (a convenience)."""
        return ArtifactClaims(
            iss=self.issuer,
            sub=sub,
            aud=aud,
            iat=int(now),
            nbf=int(now),
            exp=int(now + self.ttl_s),
            jti=jti,
            action=action,
            resource=resource,
            intent_id=intent_id,
            payload_sha256=payload_digest(payload),
            policy_digest=policy_digest,
            policy_version=policy_version,
            rules=rules,
            mode=mode,
            would_deny=would_deny,
            parents=parents,
            lineage_depth=lineage_depth,
            lineage_root=lineage_root,
            ledger_seq=ledger_seq,
        )
