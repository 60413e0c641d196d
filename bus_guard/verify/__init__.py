"""Verify authorization artifacts: what an executor imports, and nothing else.

No NATS client, YAML or pydantic: ``import bus_guard.verify`` pulls in msgspec and
cryptography only. The modules, read in the order the data flows:

* ``_format``: the artifact format: header names, token types, :class:`ArtifactClaims`,
  :class:`TreeHead`, the :class:`VerifyReason` codes, :func:`protected_header` and
  :func:`payload_digest`;
* ``_base64url``: unpadded base64url, decoded strictly (one encoding per byte string);
* ``_strict_json``: the standard JSON parser refusing duplicate members and NaN/Infinity;
* ``_merkle``: RFC 9162 leaf and node hashes and the inclusion-proof walk;
* ``_jwks``: the JWKS model: :class:`JwkEntry`, :class:`Jwks`, :func:`load_jwks`;
* ``_verifier``: :class:`Verifier` and the verification procedure, step by step, with
  :func:`verify_message` and :func:`verify_message_once` around it;
* ``_live``: :class:`LiveVerifier`: the gateways' JWKS from their key-value bucket,
  refreshed (rotations and revocations without a file copy).
"""

from bus_guard.verify._base64url import b64url_decode, b64url_encode
from bus_guard.verify._format import (
    ALG,
    ARTIFACT_HEADER,
    BATCH_PREFIX,
    DECISION_HEADER,
    TREE_HEAD_TYP,
    TYP,
    ArtifactClaims,
    TreeHead,
    VerifyReason,
    payload_digest,
    protected_header,
)
from bus_guard.verify._jwks import JwkEntry, Jwks, load_jwks
from bus_guard.verify._live import JWKS_KEY, JwksBucket, LiveStatistics, LiveVerifier
from bus_guard.verify._merkle import (
    merkle_leaf_hash,
    merkle_node_hash,
    merkle_root_from_proof,
    proof_leads_to,
)
from bus_guard.verify._verifier import (
    CreateOnly,
    Verifier,
    VerifierStatistics,
    consume_key,
    verify_message,
    verify_message_once,
)

__all__ = (
    "ALG",
    "ARTIFACT_HEADER",
    "BATCH_PREFIX",
    "DECISION_HEADER",
    "JWKS_KEY",
    "TREE_HEAD_TYP",
    "TYP",
    "ArtifactClaims",
    "CreateOnly",
    "JwkEntry",
    "Jwks",
    "JwksBucket",
    "LiveStatistics",
    "LiveVerifier",
    "TreeHead",
    "Verifier",
    "VerifierStatistics",
    "VerifyReason",
    "b64url_decode",
    "b64url_encode",
    "consume_key",
    "load_jwks",
    "merkle_leaf_hash",
    "merkle_node_hash",
    "merkle_root_from_proof",
    "payload_digest",
    "proof_leads_to",
    "protected_header",
    "verify_message",
    "verify_message_once",
)
