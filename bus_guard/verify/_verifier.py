"""Verify authorization artifacts: the one module an executor imports.

It depends on the standard library, ``cryptography``, ``msgspec`` and
:mod:`bus_guard.errors` only, so importing it pulls in no NATS client, no policy engine
and no YAML.

An artifact is a JWS in compact serialization (RFC 7515), signed with Ed25519
(``alg: EdDSA``, RFC 8037). The protected header is exactly
``{"alg":"EdDSA","kid":<kid>,"typ":"guard-artifact+jwt"}``, the payload is the JSON claims
set :class:`ArtifactClaims`. The gateway attaches it to every forwarded message as the
``Guard-Artifact`` header, next to ``Guard-Decision`` (the decision id, also the ``jti``).

Verification procedure (:meth:`Verifier.verify`); the first failing step decides the
reason code of the :class:`~bus_guard.errors.VerificationError`:

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
verified, its ``jti`` is created in a NATS key-value bucket, create-only; if the key exists,
the decision was executed before and the message is refused with ``replay``. The bucket's
TTL must exceed the artifact lifetime plus the leeway (an expired artifact is refused
before the bucket is asked). Any other exception from it means: do not execute now.

:func:`verify_message` adds two message-level reasons: ``missing_artifact`` (no
``Guard-Artifact`` header) and ``decision_mismatch`` (a ``Guard-Decision`` header that
differs from the ``jti``).

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

Hashing is RFC 9162's: a leaf is ``SHA-256(0x00 || claims JSON)``, a node
``SHA-256(0x01 || left || right)``, and trees of any size have the RFC's shape. The steps
above apply with these changes: the header checked in steps 2-5 is the tree head's (its
``typ`` must be ``guard-tree-head+jwt``); step 5 additionally requires the inclusion proof
to lead from the leaf hash at ``<leaf index>`` to the signed ``root_hash`` of a tree of
``tree_size`` leaves (RFC 9162 §2.1.3.2), else ``bad_signature``; the tree head's claims
must decode strictly (``malformed``) and the leaf's ``iss`` must equal the head's
(``wrong_issuer``). A head whose signature verified is cached (bounded, least recently
used first out), so the Ed25519 verification runs once per batch, not once per message;
the key's revocation is still checked against *now* on every message. For the last few
trees, the proof walks that reached the root are remembered (:func:`proof_leads_to`):
leaves of one tree share their upper path, so a proof usually meets a proven state after
a hash or two, with exactly the full walk's answer.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import json
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Final, Protocol, TypeVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bus_guard.errors import ConfigError, VerificationError

__all__ = (
    "ALG",
    "ARTIFACT_HEADER",
    "BATCH_PREFIX",
    "DECISION_HEADER",
    "TREE_HEAD_TYP",
    "TYP",
    "ArtifactClaims",
    "CreateOnly",
    "JwkEntry",
    "Jwks",
    "TreeHead",
    "Verifier",
    "VerifierStatistics",
    "VerifyReason",
    "b64url_decode",
    "b64url_encode",
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

ALG: Final = "EdDSA"
TYP: Final = "guard-artifact+jwt"
TREE_HEAD_TYP: Final = "guard-tree-head+jwt"
BATCH_PREFIX: Final = "gb1~"
ARTIFACT_HEADER: Final = "Guard-Artifact"
DECISION_HEADER: Final = "Guard-Decision"

# Artifacts are a few hundred bytes; the bound keeps a hostile header from costing more
# than a regex scan.
MAX_TOKEN_CHARS: Final = 65_536


class VerifyReason(enum.StrEnum):
    """The closed set of :attr:`VerificationError.reason` codes (see the module docstring)."""

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


class ArtifactClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The claims an artifact binds (SPEC §6). Registered claims per RFC 7519."""

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


class TreeHead(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The claims of a signed tree head (batched mode): one signature covers a whole tree."""

    iss: _Id  # gateway id; every leaf of the tree names the same
    iat: _JsonInt  # when the batch was signed
    tree_size: Annotated[int, msgspec.Meta(ge=1, le=2**53 - 1)]
    root_hash: _Digest  # unpadded base64url of the RFC 9162 root hash


_T = TypeVar("_T", ArtifactClaims, TreeHead)

_CLAIMS_DECODER: Final = msgspec.json.Decoder(ArtifactClaims)
_HEAD_DECODER: Final = msgspec.json.Decoder(TreeHead)
# The signer encodes with an identical encoder, so re-encoding a decoded claims set gives
# back the signed bytes; only a token from some other encoder takes the slow path.
_CLAIMS_ENCODER: Final = msgspec.json.Encoder()

_B64_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64_INDEX: Final = {c: i for i, c in enumerate(_B64_ALPHABET)}
# Bits of the last character that carry no data, by ``len % 4``; they must be zero so that
# every byte string has exactly one encoding (no malleable tokens).
_B64_TAIL_MASK: Final = (0, 0, 0x0F, 0x03)
_B64_PAD: Final = (b"", b"", b"==", b"=")
_B64_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9_-]*")
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_ENCODE_TABLE: Final = bytes.maketrans(b"+/", b"-_")
_DECODE_TABLE: Final = bytes.maketrans(b"-_", b"+/")
_HEADER_MEMBERS: Final = frozenset({"alg", "kid", "typ"})
# The leaf index of a batched artifact: canonical decimal, below 2**53.
_INDEX_RE: Final = re.compile(r"0|[1-9][0-9]{0,15}")
_HASH_BYTES: Final = 32
_sha256: Final = hashlib.sha256


def b64url_encode(data: bytes) -> bytes:
    """Unpadded base64url (RFC 7515 §2)."""
    return binascii.b2a_base64(data, newline=False).translate(_ENCODE_TABLE).rstrip(b"=")


def _b64decode_checked(seg: str) -> bytes | None:
    """Decode a segment already known to use only the base64url alphabet; None if invalid."""
    rem = len(seg) & 3
    if rem == 1 or (rem and _B64_INDEX[seg[-1]] & _B64_TAIL_MASK[rem]):
        return None
    # binascii directly: base64.urlsafe_b64decode adds two Python-level passes.
    return binascii.a2b_base64(seg.encode("ascii").translate(_DECODE_TABLE) + _B64_PAD[rem])


# For segments not yet checked against the alphabet: '-' and '_' become '+' and '/', and
# a '+', '/' or '=' in the input becomes '!', which strict decoding refuses like any other
# character outside the alphabet. One C pass instead of a regex scan.
_STRICT_TABLE: Final = bytes.maketrans(b"-_+/=", b"+/!!!")


def _b64decode_strict(seg: str) -> bytes | None:
    """Strict unpadded base64url of a segment of unknown content; None if not canonical.

    Same acceptance as :func:`b64url_decode` (the tests compare them), at a fraction of
    the cost for the kilobyte-long segments of batched artifacts.
    """
    rem = len(seg) & 3
    if rem == 1 or not seg.isascii():
        return None
    try:
        out = binascii.a2b_base64(
            seg.encode("ascii").translate(_STRICT_TABLE) + _B64_PAD[rem], strict_mode=True
        )
    except binascii.Error:
        return None
    if rem and _B64_INDEX[seg[-1]] & _B64_TAIL_MASK[rem]:
        return None
    return out


def b64url_decode(value: str) -> bytes:
    """Strict unpadded base64url decoding; ``ValueError`` on anything non-canonical."""
    if not _B64_SEGMENT_RE.fullmatch(value):
        raise ValueError("not unpadded base64url")
    out = _b64decode_checked(value)
    if out is None:
        raise ValueError("not canonical base64url")
    return out


def payload_digest(payload: bytes) -> str:
    """Unpadded base64url SHA-256 of *payload*: the ``payload_sha256`` claim."""
    return b64url_encode(hashlib.sha256(payload).digest()).decode("ascii")


def protected_header(kid: str, typ: str = TYP) -> str:
    """The base64url protected header segment for *kid*, exactly as the signer writes it."""
    raw = msgspec.json.encode({"alg": ALG, "kid": kid, "typ": typ})
    return b64url_encode(raw).decode("ascii")


# --- RFC 9162 Merkle hashing ----------------------------------------------------------


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
    end = len(proof)
    if not 0 <= index < size or end % _HASH_BYTES:
        return None
    fn, sn, r = index, size - 1, leaf_hash
    sha256 = _sha256
    for offset in range(0, end, _HASH_BYTES):
        if sn == 0:
            return None  # a longer path than the tree is deep
        if fn & 1:
            r = sha256(b"\x01" + proof[offset : offset + _HASH_BYTES] + r).digest()
        elif fn == sn:
            r = sha256(b"\x01" + proof[offset : offset + _HASH_BYTES] + r).digest()
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = sha256(b"\x01" + r + proof[offset : offset + _HASH_BYTES]).digest()
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


# Proven path states of the most recent trees: (node index, last index at its level) ->
# (node hash, the proof bytes from there up). Leaves of one tree share their upper path,
# so most proofs meet a proven state after a hash or two instead of ~log2(n).
_Memo = dict[tuple[int, int], tuple[bytes, bytes]]
_MEMO_TREES: Final = 4  # trees whose proven states are kept (executors read in order)
_MEMO_STATES: Final = 4096  # states kept per tree (2 * 256 leaves fit)


def proof_leads_to(
    leaf_hash: bytes, index: int, size: int, proof: bytes, root: bytes, memo: _Memo
) -> bool:
    """``merkle_root_from_proof(leaf_hash, index, size, proof) == root``, remembering in
    *memo* the states of every proof that led to *root*.

    The rest of the walk depends only on its state (the node index ``fn``, the last
    index ``sn`` at its level, the hash ``r``) and the proof bytes still to come. So a
    state that already led to *root*, met again with the same hash and the same remaining
    proof bytes, leads there again: the walk stops, with exactly the answer the full walk
    gives (not merely "included": a proof differing in any byte is still refused).
    """
    end = len(proof)
    if not 0 <= index < size or end % _HASH_BYTES:
        return False
    fn, sn, r = index, size - 1, leaf_hash
    sha256 = _sha256
    walked = []
    for offset in range(0, end, _HASH_BYTES):
        if sn == 0:
            return False  # a longer path than the tree is deep
        known = memo.get((fn, sn))
        if known is not None and known[0] == r and known[1] == proof[offset:]:
            break
        walked.append((fn, sn, r, offset))
        sibling = proof[offset : offset + _HASH_BYTES]
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
        if sn != 0 or r != root:
            return False
    if len(memo) < _MEMO_STATES:
        for fn, sn, r, offset in walked:
            memo[(fn, sn)] = (r, proof[offset:])
    return True


def _strict_json(raw: bytes | str) -> Any:
    """``json.loads`` that refuses duplicate members and NaN/Infinity."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate member")
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


# --- JWKS -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JwkEntry:
    """One Ed25519 public key of a JWKS, with its rotation window.

    ``revoked_at`` (key compromised or withdrawn) and ``not_after`` (end of a rotation
    grace period) are unix seconds; from the earlier of them on, the key is refused.
    ``members`` keeps every member of the JWK as loaded, so that rewriting a JWKS keeps
    members this module does not interpret (RFC 7517 §4: ignore, don't drop).
    """

    kid: str
    public_key: Ed25519PublicKey = field(compare=False)
    x: str
    revoked_at: float | None = None
    not_after: float | None = None
    members: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def refused_from(self) -> float:
        """The first instant at which the key is no longer usable (``inf`` if never)."""
        ends = [t for t in (self.revoked_at, self.not_after) if t is not None]
        return min(ends, default=math.inf)

    def usable_at(self, now: float) -> bool:
        return now < self.refused_from

    def to_jwk(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.x,
            "kid": self.kid,
            "alg": ALG,
            "use": "sig",
        }
        out.update(
            (k, v)
            for k, v in self.members.items()
            if k not in out and k not in ("revoked_at", "not_after")
        )
        if self.not_after is not None:
            out["not_after"] = _json_time(self.not_after)
        if self.revoked_at is not None:
            out["revoked_at"] = _json_time(self.revoked_at)
        return out


def _json_time(t: float) -> int | float:
    return int(t) if float(t).is_integer() else t


class Jwks(Mapping[str, Ed25519PublicKey]):
    """An immutable JWKS: ``kid`` → Ed25519 public key, plus each key's rotation window."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[JwkEntry]) -> None:
        by_kid: dict[str, JwkEntry] = {}
        for entry in entries:
            if entry.kid in by_kid:
                raise ConfigError(f"JWKS: duplicate kid {entry.kid!r}")
            by_kid[entry.kid] = entry
        self._entries: Mapping[str, JwkEntry] = MappingProxyType(by_kid)

    def __getitem__(self, kid: str) -> Ed25519PublicKey:
        return self._entries[kid].public_key

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Jwks({list(self._entries)!r})"

    @property
    def entries(self) -> tuple[JwkEntry, ...]:
        return tuple(self._entries.values())

    def entry(self, kid: str) -> JwkEntry | None:
        return self._entries.get(kid)

    def usable_at(self, now: float) -> Jwks:
        """The keys still usable at *now*: what to hand a generic JOSE verifier, which
        ignores ``revoked_at`` / ``not_after``."""
        return Jwks(e for e in self._entries.values() if e.usable_at(now))

    def replace(self, entry: JwkEntry) -> Jwks:
        """A copy with *entry* added, or replacing the entry with the same ``kid``."""
        return Jwks([*(e for e in self._entries.values() if e.kid != entry.kid), entry])

    def to_dict(self) -> dict[str, Any]:
        return {"keys": [e.to_jwk() for e in self._entries.values()]}

    def to_json(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self.to_dict()), indent=2) + b"\n"


def _jwk_time(jwk: Mapping[str, Any], name: str, where: str) -> float | None:
    value = jwk.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(f"{where}: {name} must be unix seconds, got {value!r}")
    return float(value)


def _parse_jwk(jwk: Any, where: str) -> JwkEntry:
    if not isinstance(jwk, Mapping):
        raise ConfigError(f"{where}: not a JSON object")
    if "d" in jwk:
        # A JWKS is published to every verifier; refuse to handle private material.
        raise ConfigError(f"{where}: contains a private key (member 'd')")
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ConfigError(f"{where}: not an Ed25519 key (kty/crv must be OKP/Ed25519)")
    if jwk.get("alg", ALG) != ALG:
        raise ConfigError(f"{where}: alg must be {ALG}, got {jwk.get('alg')!r}")
    if jwk.get("use", "sig") != "sig":
        raise ConfigError(f"{where}: use must be 'sig', got {jwk.get('use')!r}")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ConfigError(f"{where}: key_ops does not allow 'verify'")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ConfigError(f"{where}: missing kid (artifacts always name their key)")
    x = jwk.get("x")
    try:
        raw = b64url_decode(x) if isinstance(x, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{where}: x must be 32 bytes of unpadded base64url")
    return JwkEntry(
        kid=kid,
        public_key=Ed25519PublicKey.from_public_bytes(raw),
        x=x if isinstance(x, str) else "",
        revoked_at=_jwk_time(jwk, "revoked_at", where),
        not_after=_jwk_time(jwk, "not_after", where),
        members=MappingProxyType(dict(jwk)),
    )


def load_jwks(source: Jwks | Mapping[str, Any] | str | os.PathLike[str] | bytes) -> Jwks:
    """Load and validate a JWKS from a file path, raw JSON bytes or a decoded dict.

    Every key must be an Ed25519 public JWK with a ``kid``; anything else is a
    :class:`~bus_guard.errors.ConfigError` naming the source and the key.
    """
    if isinstance(source, Jwks):
        return source
    where = "JWKS"
    doc: Any
    if isinstance(source, Mapping):
        doc = source
    else:
        if isinstance(source, bytes):
            data = source
        else:
            where = os.fspath(source)
            try:
                data = Path(source).read_bytes()
            except FileNotFoundError:
                raise ConfigError(f"{where}: JWKS file not found") from None
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read JWKS: {exc.strerror}") from exc
        try:
            doc = _strict_json(data)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc}") from exc
    keys = doc.get("keys") if isinstance(doc, Mapping) else None
    if not isinstance(keys, list):
        raise ConfigError(f"{where}: not a JWKS (expected an object with a 'keys' array)")
    if not keys:
        raise ConfigError(f"{where}: JWKS has no keys")
    entries = [_parse_jwk(jwk, f"{where}: keys[{i}]") for i, jwk in enumerate(keys)]
    kids = [e.kid for e in entries]
    dups = sorted({k for k in kids if kids.count(k) > 1})
    if dups:
        raise ConfigError(f"{where}: duplicate kid {dups[0]!r}")
    return Jwks(entries)


# --- verification -----------------------------------------------------------------------


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
        self._memos: OrderedDict[str, _Memo] = OrderedDict()  # see proof_leads_to
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
            claims = self._verify_batched(token, now)
        else:
            claims = self._verify_jws(token, now)
        return self._check_claims(claims, subject, payload, now)

    def _verify_jws(self, token: str, now: float) -> ArtifactClaims:
        claims_raw, _ = self._authenticate(token, now, TYP, self._by_header, "")
        # Only now, with the bytes authenticated, are the claims parsed.
        return self._decode(claims_raw, _CLAIMS_DECODER, "claims")

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
        claims_raw = _b64decode_checked(claims_seg)
        signature = _b64decode_checked(sig_seg)
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

    def _verify_batched(self, token: str, now: float) -> ArtifactClaims:
        parts = token.split("~")
        if len(parts) != 5:
            raise _fail(VerifyReason.MALFORMED, "not gb1~index~leaf~proof~head")
        _, index, leaf_seg, proof_seg, head = parts
        if not _INDEX_RE.fullmatch(index):
            raise _fail(VerifyReason.MALFORMED, "leaf index is not a canonical decimal")
        leaf_raw = _b64decode_strict(leaf_seg) if leaf_seg else None
        proof = _b64decode_strict(proof_seg)
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
        return claims

    def _verify_head(self, head: str, now: float) -> _HeadEntry:
        """Verify a signed tree head and cache it."""
        claims_raw, refused_from = self._authenticate(
            head, now, TREE_HEAD_TYP, self._by_head_header, "tree head"
        )
        tree = self._decode(claims_raw, _HEAD_DECODER, "tree head")
        root = _b64decode_checked(tree.root_hash)
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
        raw = _b64decode_checked(seg)
        if raw is None:
            raise _fail(VerifyReason.MALFORMED, "non-canonical base64url header")
        try:
            header = _strict_json(raw)
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
                _strict_json(raw)
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
) -> ArtifactClaims:
    """:func:`verify_message`, then record the ``jti`` in the *executed* KV bucket
    (create-only): a second delivery of the same decision is refused with ``replay``."""
    from nats.js.errors import KeyWrongLastSequenceError  # executors with a bus have nats-py

    claims = verify_message(verifier, subject=subject, headers=headers, payload=payload, now=now)
    try:
        await executed.create(claims.jti, subject.encode())
    except KeyWrongLastSequenceError:
        raise _fail(VerifyReason.REPLAY, f"decision {claims.jti!r} was already executed") from None
    return claims
