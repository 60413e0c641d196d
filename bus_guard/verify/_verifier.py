"""The verifier: what an executor calls on every message it is about to act on.

The format it checks is :mod:`bus_guard.verify._format`'s. Verification procedure
(:meth:`Verifier.verify`); the first failing step decides the reason code of the
:class:`~bus_guard.errors.VerificationError`:

1. ``malformed``: the token must be a ``str`` of at most 64 KiB made of three
   non-empty base64url segments separated by ``.``; each segment is strict base64url
   (no padding, no characters outside ``A-Z a-z 0-9 - _``, zero trailing bits).
2. ``bad_header``: the header must be a JSON object without duplicate members (else
   ``malformed``) with exactly the members ``alg`` = ``EdDSA``, ``typ`` =
   ``guard-artifact+jwt`` and a string ``kid``; ``crit`` or any other member is refused.
3. ``unknown_kid``: ``kid`` must name a key of the JWKS.
4. ``revoked_kid``: the key must still be usable at the verification time: the
   ``revoked_at`` and ``not_after`` members of its JWK (unix seconds, extensions to
   RFC 7517) are both later than *now*. No leeway applies here.
5. ``bad_signature``: the signature must be 64 bytes and a valid Ed25519 signature of the
   ASCII bytes ``<header segment>.<claims segment>``. Nothing in the claims is looked at
   before this step.
6. ``malformed``: the claims must decode strictly into :class:`ArtifactClaims`: a JSON
   object, no unknown or duplicate members, exact types, integers within 0..2**53-1,
   ``payload_sha256`` a 43-character base64url string.
7. ``wrong_audience``: ``aud`` must equal the subject the message arrived on.
8. ``not_yet_valid``: ``nbf`` must be at most *now* + leeway.
9. ``expired``: *now* - leeway must be before ``exp`` (RFC 7519 §4.1.4: not accepted on or
   after ``exp``).
10. ``wrong_issuer``: ``iss`` must equal the expected gateway id, when one is configured.
11. ``payload_mismatch``: ``payload_sha256`` must equal the unpadded base64url SHA-256 of
    the received payload bytes (compared in constant time).
12. ``replay``: when the verifier was given a ``seen`` callable, it is called with the
    ``jti`` last, only for an otherwise valid artifact, and must return ``False``.

Consume once, across executor processes (:func:`verify_message_once`): after a message
verified, the intent it carries (principal and intent id: :func:`consume_key`) is created
in a NATS key-value bucket, create-only; if the key exists, the intent was executed before,
under this decision or another (an agent re-sending it), and the message is refused with
``replay``. The bucket's
TTL must exceed the artifact lifetime plus the leeway (an expired artifact is refused
before the bucket is asked). Any other exception from it means: do not execute now.

:func:`verify_message` adds two message-level reasons: ``missing_artifact`` (no
``Guard-Artifact`` header) and ``decision_mismatch`` (a ``Guard-Decision`` header that
differs from the ``jti``).

Batched artifacts: the steps above apply with these changes: the header checked in steps
2-5 is the tree head's (its ``typ`` must be ``guard-tree-head+jwt``); step 5 additionally
requires the inclusion proof to lead from the leaf hash at ``<leaf index>`` to the signed
``root_hash`` of a tree of ``tree_size`` leaves (RFC 9162 §2.1.3.2), else
``bad_signature``; the tree head's claims must decode strictly (``malformed``) and the
leaf's ``iss`` must equal the head's (``wrong_issuer``). A head whose signature verified
is cached (bounded, least recently used first out), so the Ed25519 verification runs once
per batch, not once per message; the key's revocation is still checked against *now* on
every message. For the last few trees, the proof walks that reached the root are
remembered (:func:`~bus_guard.verify._merkle.proof_leads_to`): leaves of one tree share
their upper path, so a proof usually meets a proven state after a hash or two, with
exactly the full walk's answer.

A token of the past (:meth:`Verifier.signed_claims`: the gateway checking the artifact of a
parent decision in its ledger) goes through steps 1-6 only, the key's revocation left to
the caller, who compares it with the token's ``iat``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bus_guard.errors import ConfigError, VerificationError
from bus_guard.verify._base64url import b64url_decode_checked, b64url_decode_or_none
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
from bus_guard.verify._jwks import Jwks, load_jwks
from bus_guard.verify._merkle import ProofMemo, merkle_leaf_hash, proof_leads_to
from bus_guard.verify._strict_json import strict_loads

__all__ = (
    "CreateOnly",
    "Verifier",
    "VerifierStatistics",
    "consume_key",
    "verify_message",
    "verify_message_once",
)

# Artifacts are a few hundred bytes; the bound keeps a hostile header from costing more
# than a regex scan.
MAX_TOKEN_CHARS: Final = 65_536

_T = TypeVar("_T", ArtifactClaims, TreeHead)

_CLAIMS_DECODER: Final = msgspec.json.Decoder(ArtifactClaims)
_HEAD_DECODER: Final = msgspec.json.Decoder(TreeHead)
# The signer encodes with an identical encoder, so re-encoding a decoded claims set gives
# back the signed bytes; only a token from some other encoder takes the slow path.
_CLAIMS_ENCODER: Final = msgspec.json.Encoder()

_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_HEADER_MEMBERS: Final = frozenset({"alg", "kid", "typ"})
# The leaf index of a batched artifact: canonical decimal, below 2**53.
_INDEX_RE: Final = re.compile(r"0|[1-9][0-9]{0,15}")
_MEMO_TREES: Final = 4  # trees whose proven proof states are kept (executors read in order)


def _fail(reason: VerifyReason, message: str) -> VerificationError:
    return VerificationError(reason, message)


@dataclass(frozen=True, slots=True)
class VerifierStatistics:
    """Counters of a :class:`Verifier` (a snapshot)."""

    heads_verified: int  # tree heads whose Ed25519 signature was checked (and held)
    head_cache_hits: int  # batched artifacts whose tree head came from the cache
    cached_heads: int  # tree heads in the cache now (at most ``max_cached_heads``)


# What the cache keeps of a verified tree head: root hash, tree size, issuer and the
# instant its key stops being usable.
_HeadEntry = tuple[bytes, int, str, float]


class Verifier:
    """Verifies artifacts against a JWKS. Build a new one when the JWKS changes.

    ``seen`` is the hook for consume-once replay protection at the executor: it is called
    with the ``jti`` of an otherwise valid artifact and must atomically record it and
    return whether it had been recorded before.

    The configuration is immutable; the only state is the cache of verified tree heads
    (at most ``max_cached_heads``, least recently used evicted first), the proven proof
    states of the last few trees and its counters.
    Its operations are single C-level dict operations, safe to share between threads.
    """

    __slots__ = (
        "_by_head_header",
        "_by_header",
        "_by_kid",
        "_head_hits",
        "_heads",
        "_heads_verified",
        "_issuer",
        "_leeway_s",
        "_max_heads",
        "_memos",
        "_seen",
        "jwks",
    )

    def __init__(
        self,
        jwks: Jwks | Mapping[str, Any] | str | os.PathLike[str] | bytes,
        *,
        leeway_s: float = 5.0,
        issuer: str | None = None,
        seen: Callable[[str], bool] | None = None,
        max_cached_heads: int = 1024,
    ) -> None:
        if not (math.isfinite(leeway_s) and leeway_s >= 0):
            raise ConfigError(f"leeway_s must be a finite number >= 0, got {leeway_s!r}")
        if type(max_cached_heads) is not int or max_cached_heads < 1:
            raise ConfigError(f"max_cached_heads must be an int >= 1, got {max_cached_heads!r}")
        self.jwks = load_jwks(jwks)
        self._leeway_s = float(leeway_s)
        self._issuer = issuer
        self._seen = seen
        self._by_kid = {e.kid: (e.public_key, e.refused_from) for e in self.jwks.entries}
        # The gateway writes one exact header per key, so a dict lookup on the raw segment
        # replaces base64 + JSON parsing for every genuine token; anything else is parsed
        # strictly by _parse_header.
        self._by_header = {protected_header(kid): v for kid, v in self._by_kid.items()}
        self._by_head_header = {
            protected_header(kid, TREE_HEAD_TYP): v for kid, v in self._by_kid.items()
        }
        self._max_heads = max_cached_heads
        self._heads: OrderedDict[str, _HeadEntry] = OrderedDict()
        self._memos: OrderedDict[str, ProofMemo] = OrderedDict()  # see proof_leads_to
        self._heads_verified = 0
        self._head_hits = 0

    def statistics(self) -> VerifierStatistics:
        return VerifierStatistics(self._heads_verified, self._head_hits, len(self._heads))

    def verify(
        self, token: str, *, subject: str, payload: bytes, now: float | None = None
    ) -> ArtifactClaims:
        """Verify *token* (per-message or batched) for a message received on *subject*
        carrying *payload*.

        Returns the claims, or raises :class:`~bus_guard.errors.VerificationError`; no
        other exception escapes for any *token* value.
        """
        if now is None:
            now = time.time()
        if type(token) is not str or len(token) > MAX_TOKEN_CHARS:
            raise _fail(VerifyReason.MALFORMED, "artifact is not a compact JWS string")
        if token.startswith(BATCH_PREFIX):
            claims, _ = self._verify_batched(token, now)
        else:
            claims, _ = self._verify_jws(token, now)
        return self._check_claims(claims, subject, payload, now)

    def signed_claims(self, token: str) -> tuple[ArtifactClaims, float]:
        """Steps 1-6 of :meth:`verify` and nothing else: the claims of *token* (per-message
        or batched) once its signature verified with a key of the JWKS (batched: the tree
        head's signature and the inclusion proof), and the instant from which that key is
        refused (``inf`` if never).

        Audience, time, issuer and payload are not checked, nor is the key's revocation:
        for a caller judging a token of the past itself, e.g. the gateway trusting a parent
        decision's artifact from the ledger (older than its ``exp``; signed before its key
        was refused: ``iat < refused_from``). Raises
        :class:`~bus_guard.errors.VerificationError`, and nothing else, for any *token*.
        """
        if type(token) is not str or len(token) > MAX_TOKEN_CHARS:
            raise _fail(VerifyReason.MALFORMED, "artifact is not a compact JWS string")
        if token.startswith(BATCH_PREFIX):
            return self._verify_batched(token, -math.inf)
        return self._verify_jws(token, -math.inf)

    def _verify_jws(self, token: str, now: float) -> tuple[ArtifactClaims, float]:
        claims_raw, refused_from = self._authenticate(token, now, TYP, self._by_header, "")
        # Only now, with the bytes authenticated, are the claims parsed.
        return self._decode(claims_raw, _CLAIMS_DECODER, "claims"), refused_from

    def _authenticate(
        self,
        token: str,
        now: float,
        typ: str,
        known_headers: Mapping[str, tuple[Ed25519PublicKey, float]],
        label: str,
    ) -> tuple[bytes, float]:
        """Check a compact JWS of *typ* (shape, header, kid, revocation, Ed25519 signature)
        and return its payload bytes, still unparsed, and when its key stops being valid.
        *label* names a tree head in messages ("" for an artifact)."""
        if not _TOKEN_RE.fullmatch(token):
            what = label or "artifact"
            raise _fail(VerifyReason.MALFORMED, f"{what} is not three base64url segments")
        header_seg, claims_seg, sig_seg = token.split(".")
        claims_raw = b64url_decode_checked(claims_seg)
        signature = b64url_decode_checked(sig_seg)
        if claims_raw is None or signature is None:
            where = f" in {label}" if label else ""
            raise _fail(VerifyReason.MALFORMED, f"non-canonical base64url segment{where}")
        known = known_headers.get(header_seg)
        public_key, refused_from = known or self._parse_header(header_seg, typ)
        if now >= refused_from:
            raise _fail(VerifyReason.REVOKED_KID, f"key revoked or retired at {refused_from}")
        if len(signature) != 64:
            raise _fail(VerifyReason.BAD_SIGNATURE, "Ed25519 signatures are 64 bytes")
        signing_input = token[: len(header_seg) + 1 + len(claims_seg)].encode("ascii")
        try:
            public_key.verify(signature, signing_input)
        except InvalidSignature:
            whose = f"{label} " if label else ""
            raise _fail(VerifyReason.BAD_SIGNATURE, f"{whose}signature does not verify") from None
        return claims_raw, refused_from

    def _verify_batched(self, token: str, now: float) -> tuple[ArtifactClaims, float]:
        parts = token.split("~")
        if len(parts) != 5:
            raise _fail(VerifyReason.MALFORMED, "not gb1~index~leaf~proof~head")
        _, index, leaf_seg, proof_seg, head = parts
        if not _INDEX_RE.fullmatch(index):
            raise _fail(VerifyReason.MALFORMED, "leaf index is not a canonical decimal")
        leaf_raw = b64url_decode_or_none(leaf_seg) if leaf_seg else None
        proof = b64url_decode_or_none(proof_seg)
        if leaf_raw is None or proof is None:
            raise _fail(VerifyReason.MALFORMED, "non-canonical base64url segment")
        entry = self._heads.get(head)
        if entry is None:
            entry = self._verify_head(head, now)
        else:
            self._head_hits += 1
            # Not contextlib.suppress: this runs per message. KeyError: another thread
            # evicted the head in between; it was verified all the same.
            try:  # noqa: SIM105
                self._heads.move_to_end(head)
            except KeyError:
                pass
        root, size, head_iss, refused_from = entry
        if now >= refused_from:
            raise _fail(VerifyReason.REVOKED_KID, f"key revoked or retired at {refused_from}")
        memo = self._memos.get(head)
        if memo is None:
            memo = self._memos[head] = {}
            while len(self._memos) > _MEMO_TREES:
                try:
                    self._memos.popitem(last=False)
                except KeyError:  # emptied by another thread
                    break
        if not proof_leads_to(merkle_leaf_hash(leaf_raw), int(index), size, proof, root, memo):
            raise _fail(
                VerifyReason.BAD_SIGNATURE, "inclusion proof does not lead to the signed root"
            )
        claims = self._decode(leaf_raw, _CLAIMS_DECODER, "claims")
        if claims.iss != head_iss:
            raise _fail(VerifyReason.WRONG_ISSUER, f"leaf issuer {claims.iss!r} is not the head's")
        return claims, refused_from

    def _verify_head(self, head: str, now: float) -> _HeadEntry:
        """Verify a signed tree head and cache it."""
        claims_raw, refused_from = self._authenticate(
            head, now, TREE_HEAD_TYP, self._by_head_header, "tree head"
        )
        tree = self._decode(claims_raw, _HEAD_DECODER, "tree head")
        root = b64url_decode_checked(tree.root_hash)
        if root is None:  # the pattern admits 43 characters with non-zero tail bits
            raise _fail(VerifyReason.MALFORMED, "tree head: non-canonical root_hash")
        entry = (root, tree.tree_size, tree.iss, refused_from)
        self._heads_verified += 1
        heads = self._heads
        heads[head] = entry
        while len(heads) > self._max_heads:
            try:
                heads.popitem(last=False)
            except KeyError:  # emptied by another thread
                break
        return entry

    def _check_claims(
        self, claims: ArtifactClaims, subject: str, payload: bytes, now: float
    ) -> ArtifactClaims:
        if claims.aud != subject:
            raise _fail(
                VerifyReason.WRONG_AUDIENCE, f"issued for {claims.aud!r}, received on {subject!r}"
            )
        if claims.nbf > now + self._leeway_s:
            raise _fail(VerifyReason.NOT_YET_VALID, f"nbf {claims.nbf} is after now {now:.0f}")
        if now - self._leeway_s >= claims.exp:
            raise _fail(VerifyReason.EXPIRED, f"exp {claims.exp} is before now {now:.0f}")
        if self._issuer is not None and claims.iss != self._issuer:
            raise _fail(
                VerifyReason.WRONG_ISSUER, f"issued by {claims.iss!r}, expected {self._issuer!r}"
            )
        if not hmac.compare_digest(claims.payload_sha256, payload_digest(payload)):
            raise _fail(VerifyReason.PAYLOAD_MISMATCH, "payload is not the authorized bytes")
        if self._seen is not None and self._seen(claims.jti):
            raise _fail(VerifyReason.REPLAY, f"decision {claims.jti!r} was already executed")
        return claims

    def _parse_header(self, seg: str, typ: str) -> tuple[Ed25519PublicKey, float]:
        raw = b64url_decode_checked(seg)
        if raw is None:
            raise _fail(VerifyReason.MALFORMED, "non-canonical base64url header")
        try:
            header = strict_loads(raw)
        except (ValueError, RecursionError):
            raise _fail(VerifyReason.MALFORMED, "header is not JSON") from None
        if not isinstance(header, dict):
            raise _fail(VerifyReason.MALFORMED, "header is not a JSON object")
        if "crit" in header:
            raise _fail(VerifyReason.BAD_HEADER, "critical header extensions are not supported")
        if header.get("alg") != ALG:
            raise _fail(VerifyReason.BAD_HEADER, f"alg must be {ALG}")
        if header.get("typ") != typ:
            raise _fail(VerifyReason.BAD_HEADER, f"typ must be {typ}")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _fail(VerifyReason.BAD_HEADER, "kid is missing")
        if header.keys() != _HEADER_MEMBERS:
            extra = sorted(header.keys() - _HEADER_MEMBERS)
            raise _fail(VerifyReason.BAD_HEADER, f"unexpected header members {extra}")
        key = self._by_kid.get(kid)
        if key is None:
            raise _fail(VerifyReason.UNKNOWN_KID, f"no key {kid!r} in the JWKS")
        return key

    @staticmethod
    def _decode(raw: bytes, decoder: msgspec.json.Decoder[_T], what: str) -> _T:
        try:
            value = decoder.decode(raw)
        # DecodeError (and its subclass ValidationError), but also UnicodeDecodeError,
        # which msgspec lets through for invalid UTF-8 inside strings: all ValueErrors.
        except ValueError as exc:
            raise _fail(VerifyReason.MALFORMED, f"{what}: {exc}") from None
        if _CLAIMS_ENCODER.encode(value) != raw:
            # Not our encoder's exact bytes: msgspec keeps the last of duplicate members,
            # so look for duplicates with a parser that can see them.
            try:
                strict_loads(raw)
            except (ValueError, RecursionError) as exc:
                raise _fail(VerifyReason.MALFORMED, f"{what}: {exc}") from None
        return value


def verify_message(
    verifier: Verifier,
    *,
    subject: str,
    headers: Mapping[str, str] | None,
    payload: bytes,
    now: float | None = None,
) -> ArtifactClaims:
    """Verify a message as an executor received it on *subject* (headers and payload)."""
    token = headers.get(ARTIFACT_HEADER) if headers else None
    if token is None:
        raise _fail(VerifyReason.MISSING_ARTIFACT, f"no {ARTIFACT_HEADER} header")
    claims = verifier.verify(token, subject=subject, payload=payload, now=now)
    decision = headers.get(DECISION_HEADER) if headers else None
    if decision is not None and decision != claims.jti:
        raise _fail(
            VerifyReason.DECISION_MISMATCH,
            f"{DECISION_HEADER} {decision!r} is not the artifact's jti {claims.jti!r}",
        )
    return claims


class CreateOnly(Protocol):
    """What :func:`verify_message_once` needs of a NATS KV bucket (nats-py ``KeyValue``)."""

    async def create(self, key: str, value: bytes) -> int: ...


async def verify_message_once(
    verifier: Verifier,
    executed: CreateOnly,
    *,
    subject: str,
    headers: Mapping[str, str] | None,
    payload: bytes,
    now: float | None = None,
    executor: str = "",
) -> ArtifactClaims:
    """:func:`verify_message`, then mark the *intent* executed in the *executed* KV bucket
    (create-only): a second delivery of it is refused with ``replay``, whatever decision
    forwarded it (an agent re-sending the same intent gets a new decision in core mode).

    The key is :func:`consume_key` of the principal and the intent id (the decision id
    for an intent without one), under *executor* if given: executors that each must run
    the same intent once keep their markers apart (and permissions can keep them from
    touching each other's: ``$KV.<bucket>.<executor>.>``)."""
    claims = verify_message(verifier, subject=subject, headers=headers, payload=payload, now=now)
    key = consume_key(claims, executor=executor)
    try:
        await executed.create(key, claims.jti.encode())
    except Exception as exc:
        # nats-py's KeyWrongLastSequenceError (the key exists), told by its class name so that
        # this package imports no NATS client: any create-only KV raising it fits.
        if any(c.__name__ == "KeyWrongLastSequenceError" for c in type(exc).__mro__):
            raise _fail(
                VerifyReason.REPLAY,
                f"intent {claims.intent_id or claims.jti!r} of {claims.sub!r} was already "
                f"executed (decision {claims.jti!r} forwards it again)",
            ) from None
        raise
    return claims


def consume_key(claims: ArtifactClaims, *, executor: str = "") -> str:
    """The consume-once key of the intent *claims* authorize: ``[<executor>.]i<sha256 hex
    of principal NUL intent id>`` (the decision id stands in for a missing intent id); a
    KV key whatever characters the ids hold. Other languages: the same hash."""
    what = f"{claims.sub}\x00{claims.intent_id}" if claims.intent_id else f"jti\x00{claims.jti}"
    digest = hashlib.sha256(what.encode()).hexdigest()
    return f"{executor}.i{digest}" if executor else f"i{digest}"
