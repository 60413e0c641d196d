"""The approval token: an approver's signed vote on one hold (SPEC §10, "Approvals").

A compact JWS (RFC 7515), ``alg`` EdDSA (Ed25519), ``typ`` ``guard-approval+jwt``, ``kid``
of the approver's key, over :class:`ApprovalClaims`: the hold's decision id, the held
intent's payload digest (so a vote cannot be replayed onto other bytes), the approver's
id, the verdict, a reason and the time. It is published, as the whole message body, on
``<prefix>.approve.<hold decision id>``; any standard JOSE library can check it with the
approvers' JWKS.

:func:`sign_approval` makes one (``bus-guard approve`` / ``reject``); :func:`read_approval`
parses one strictly (size, segments, base64url, JSON, claims) without checking the
signature, and :func:`check_signature` checks it against a public key. Pure: no NATS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from bus_guard.verify import ALG, b64url_decode, b64url_encode
from bus_guard.verify._strict_json import strict_loads

__all__ = (
    "APPROVAL_TYP",
    "MAX_APPROVAL_BYTES",
    "MAX_REASON_CHARS",
    "ApprovalClaims",
    "ApprovalError",
    "ReadApproval",
    "Verdict",
    "check_signature",
    "read_approval",
    "sign_approval",
)

APPROVAL_TYP: Final = "guard-approval+jwt"
MAX_APPROVAL_BYTES: Final = 4096  # a whole token; larger bodies are refused unread
MAX_REASON_CHARS: Final = 512

Verdict = Literal["approve", "reject"]
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@-]+$")]
_Digest = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{43}$")]
_Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_CHARS)]
_Time = Annotated[float, msgspec.Meta(ge=0, le=2**53 - 1)]


class ApprovalClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What an approver signs."""

    hold: _Id  # the hold's decision id
    payload_sha256: _Digest  # the held intent's payload digest (unpadded base64url SHA-256)
    approver: _Id  # the approver's id, as the policy names them
    verdict: Verdict
    iat: _Time  # when it was signed (unix seconds)
    reason: _Reason = ""


class ApprovalError(ValueError):
    """A body that is not a well-formed approval token; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class ReadApproval:
    """A parsed token, signature not yet checked."""

    kid: str
    claims: ApprovalClaims
    signing_input: bytes
    signature: bytes


_claims_decoder: Final = msgspec.json.Decoder(ApprovalClaims)


def sign_approval(key: Ed25519PrivateKey, kid: str, claims: ApprovalClaims) -> str:
    """The compact JWS of *claims*, signed with the approver's *key* (whose JWKS ``kid``
    is *kid*)."""
    header = msgspec.json.encode({"alg": ALG, "kid": kid, "typ": APPROVAL_TYP})
    signing_input = b64url_encode(header) + b"." + b64url_encode(msgspec.json.encode(claims))
    return (signing_input + b"." + b64url_encode(key.sign(signing_input))).decode("ascii")


def read_approval(body: bytes) -> ReadApproval:
    """Parse *body* as an approval token; :class:`ApprovalError` says what is wrong."""
    if len(body) > MAX_APPROVAL_BYTES:
        raise ApprovalError(f"approval is {len(body)} bytes, more than {MAX_APPROVAL_BYTES}")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise ApprovalError("approval is not a compact JWS (not ASCII)") from None
    parts = text.strip().split(".")
    if len(parts) != 3:
        raise ApprovalError("approval is not a compact JWS (three base64url segments)")
    try:
        header = strict_loads(b64url_decode(parts[0]))
        raw_claims = b64url_decode(parts[1])
        signature = b64url_decode(parts[2])
    except (ValueError, RecursionError) as exc:
        raise ApprovalError(f"approval is not a compact JWS: {exc!r}"[:200]) from None
    if not isinstance(header, dict) or set(header) != {"alg", "kid", "typ"}:
        raise ApprovalError("approval header must have exactly alg, kid and typ")
    if header["typ"] != APPROVAL_TYP:
        raise ApprovalError(f"approval typ is not {APPROVAL_TYP}")
    if header["alg"] != ALG:
        raise ApprovalError(f"approval alg is not {ALG}")
    kid = header["kid"]
    if not isinstance(kid, str) or not 0 < len(kid) <= 128:
        raise ApprovalError("approval kid is not a short string")
    try:
        strict_loads(raw_claims)  # duplicate members, NaN: refused before msgspec reads it
        claims = _claims_decoder.decode(raw_claims)
    except (ValueError, RecursionError) as exc:  # msgspec.DecodeError is a ValueError
        raise ApprovalError(f"approval claims: {exc}"[:200]) from None
    if len(signature) != 64:
        raise ApprovalError("approval signature is not 64 bytes (Ed25519)")
    return ReadApproval(kid, claims, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)


def check_signature(token: ReadApproval, public_key: Ed25519PublicKey) -> bool:
    """Whether *token* was signed by the key of *public_key*."""
    try:
        public_key.verify(token.signature, token.signing_input)
    except InvalidSignature:
        return False
    return True
