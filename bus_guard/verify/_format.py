"""The artifact format: header names, token types, the claims an artifact binds and the
reason codes a verifier answers with.

An artifact is a JWS in compact serialization (RFC 7515), signed with Ed25519
(``alg: EdDSA``, RFC 8037). The protected header is exactly
``{"alg":"EdDSA","kid":<kid>,"typ":"guard-artifact+jwt"}`` (:func:`protected_header`), the
payload is the JSON claims set :class:`ArtifactClaims`. The gateway attaches it to every
forwarded message as the ``Guard-Artifact`` header, next to ``Guard-Decision`` (the
decision id, also the ``jti``).

Batched artifacts (SPEC §6 batched mode) travel in the same ``Guard-Artifact`` header and
are told apart by their first characters: a compact JWS starts with ``eyJ``, a batched
artifact with ``gb1~``. It is five ``~``-separated fields::

    gb1~<leaf index>~<leaf claims>~<inclusion proof>~<signed tree head>

* ``<leaf index>``: the leaf's 0-based position in its tree, canonical decimal;
* ``<leaf claims>``: base64url of the claims JSON, exactly as in a per-message artifact;
* ``<inclusion proof>``: base64url of the RFC 9162 §2.1.3.1 audit path, the 32-byte
  sibling hashes concatenated from the leaf up (empty for a tree of one leaf);
* ``<signed tree head>``: a compact JWS like an artifact but with ``typ``
  ``guard-tree-head+jwt`` and the claims :class:`TreeHead` (``iss``, ``iat``,
  ``tree_size``, ``root_hash``).

Hashing is RFC 9162's (:mod:`bus_guard.verify._merkle`); how all of this is verified, step
by step and with which :class:`VerifyReason`, is in :mod:`bus_guard.verify._verifier`.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
from typing import Annotated, Final

import msgspec

from bus_guard.verify._base64url import _ENCODE_TABLE, b64url_encode

__all__ = (
    "ALG",
    "ARTIFACT_HEADER",
    "BATCH_PREFIX",
    "DECISION_HEADER",
    "TREE_HEAD_TYP",
    "TYP",
    "ArtifactClaims",
    "TreeHead",
    "VerifyReason",
    "payload_digest",
    "protected_header",
)

ALG: Final = "EdDSA"
TYP: Final = "guard-artifact+jwt"
TREE_HEAD_TYP: Final = "guard-tree-head+jwt"
BATCH_PREFIX: Final = "gb1~"
ARTIFACT_HEADER: Final = "Guard-Artifact"
DECISION_HEADER: Final = "Guard-Decision"


class VerifyReason(enum.StrEnum):
    """The closed set of :attr:`VerificationError.reason` codes (see
    :mod:`bus_guard.verify._verifier` for when each applies)."""

    MALFORMED = "malformed"
    BAD_HEADER = "bad_header"
    UNKNOWN_KID = "unknown_kid"
    REVOKED_KID = "revoked_kid"
    BAD_SIGNATURE = "bad_signature"
    WRONG_AUDIENCE = "wrong_audience"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    WRONG_ISSUER = "wrong_issuer"
    PAYLOAD_MISMATCH = "payload_mismatch"
    REPLAY = "replay"
    MISSING_ARTIFACT = "missing_artifact"
    DECISION_MISMATCH = "decision_mismatch"


# I-JSON (RFC 7493): integers beyond 2**53 do not survive every JSON parser an executor
# might use, so the verifier refuses them rather than disagree with one.
_JsonInt = Annotated[int, msgspec.Meta(ge=0, le=2**53 - 1)]
_Id = Annotated[str, msgspec.Meta(min_length=1)]
_Digest = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{43}$")]


class ArtifactClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """The claims an artifact binds (SPEC §6). Registered claims per RFC 7519.

    Claims at their default value are left out of the token (``omit_defaults``): an
    absent ``parents`` is no parents, an absent ``hold`` no hold."""

    iss: _Id  # gateway id
    sub: _Id  # principal
    aud: _Id  # the exec subject the message is published on
    iat: _JsonInt
    nbf: _JsonInt
    exp: _JsonInt
    jti: _Id  # decision id
    action: str
    resource: str
    intent_id: str
    payload_sha256: _Digest  # unpadded base64url SHA-256 of the forwarded bytes
    policy_digest: str
    policy_version: str
    rules: tuple[str, ...]  # ids of the rules that determined the decision
    mode: str  # "enforce" | "observe"
    would_deny: bool = False
    parents: tuple[str, ...] = ()
    lineage_depth: _JsonInt = 0
    lineage_root: str = ""
    ledger_seq: _JsonInt = 0
    # What the decision passes on to its children (bound, so a forged ledger record
    # cannot launder them): the labels it inherited, the ones its rules added, and its
    # numeric top-level params (a child's scope is compared with them).
    labels: tuple[str, ...] = ()
    taints: tuple[str, ...] = ()
    scope: dict[str, int | float] = {}
    # A released hold: the hold's decision id and the approvals (decision ids) counted.
    hold: str = ""
    approvals: tuple[str, ...] = ()
    # The agent's W3C trace context (its traceparent header), when it sent a valid one:
    # an executor can continue the agent's trace from its artifact. Not authority.
    traceparent: Annotated[str, msgspec.Meta(max_length=55)] = ""


class TreeHead(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The claims of a signed tree head (batched mode): one signature covers a whole tree."""

    iss: _Id  # gateway id; every leaf of the tree names the same
    iat: _JsonInt  # when the batch was signed
    tree_size: Annotated[int, msgspec.Meta(ge=1, le=2**53 - 1)]
    root_hash: _Digest  # unpadded base64url of the RFC 9162 root hash


def payload_digest(payload: bytes) -> str:
    """Unpadded base64url SHA-256 of *payload*: the ``payload_sha256`` claim."""
    # b64url_encode, inline: once per intent on the gateway's path, one Python frame less.
    digest = binascii.b2a_base64(hashlib.sha256(payload).digest(), newline=False)
    return digest.translate(_ENCODE_TABLE).rstrip(b"=").decode("ascii")


def protected_header(kid: str, typ: str = TYP) -> str:
    """The base64url protected header segment for *kid*, exactly as the signer writes it."""
    raw = msgspec.json.encode({"alg": ALG, "kid": kid, "typ": typ})
    return b64url_encode(raw).decode("ascii")
