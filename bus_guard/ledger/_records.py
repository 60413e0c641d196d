"""The ledger: one hash-chained record per decision, per gateway, with signed checkpoints.

Every gateway keeps one chain in the ledger stream (SPEC §7). A record names its gateway,
its position ``seq`` (0, 1, 2, ... over the gateway's whole life, across restarts) and
``prev``, the unpadded base64url SHA-256 of the exact bytes of the gateway's previous
record. Three kinds of record:

* ``decision``: one per decision (allow, deny, hold), on ``<prefix>.ledger.<gateway>.d.<id>``;
  it holds everything needed to publish the decision's outputs again byte for byte, the
  artifact included, so that a redelivered intent adopts it;
* ``chain_start``: written when a gateway process starts; it continues the chain from the
  last record the gateway's previous process left in the ledger;
* ``checkpoint``: every N records or T seconds, and at clean shutdown (``final``).

``chain_start`` and ``checkpoint`` records carry ``sig``, a compact JWS (``alg`` EdDSA,
``typ`` ``guard-checkpoint+jwt``, ``kid`` of the gateway's signing key) over
:class:`CheckpointClaims`; since ``prev`` commits to every earlier record, a valid
checkpoint vouches for the whole chain before it. Both are published on
``<prefix>.ledger.<gateway>.c``.

Decision ids are deterministic (:func:`intent_decision_id`): every gateway that decides the
same principal + intent id derives the same id, and a ledger record can be created for an
id only once (``Nats-Expected-Last-Subject-Sequence: 0`` over ``<prefix>.ledger.*.d.<id>``).
That is what makes a decision happen once, on any replica, beyond any de-dup window.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus_guard.decision import LimitUse, intent_decision_id, message_decision_id
from bus_guard.errors import ConfigError
from bus_guard.signing._keys import kid_for
from bus_guard.subjects import LedgerSubjects  # re-exported: where the records go
from bus_guard.verify import ALG, Jwks, b64url_decode, b64url_encode

__all__ = (
    "CHECKPOINT_TYP",
    "ChainBatch",
    "ChainHead",
    "CheckpointClaims",
    "CheckpointSigner",
    "LedgerRecord",
    "LedgerSubjects",
    "Stored",
    "check_signature",
    "decode_record",
    "encode_record",
    "intent_decision_id",
    "message_decision_id",
    "record_hash",
)

CHECKPOINT_TYP: Final = "guard-checkpoint+jwt"
DECISION: Final = "decision"
CHAIN_START: Final = "chain_start"
CHECKPOINT: Final = "checkpoint"
KINDS: Final = frozenset({DECISION, CHAIN_START, CHECKPOINT})


class LedgerRecord(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """One ledger record. Decision fields are empty on chain records, and vice versa."""

    kind: str
    gateway: str
    seq: int
    prev: str  # hash of the gateway's previous record; "" only for the very first
    ts: float
    # -- decisions
    decision_id: str = ""
    effect: str = ""
    reason: str = ""
    message: str = ""
    rules: tuple[str, ...] = ()
    policy_digest: str = ""
    policy_version: str = ""
    mode: str = ""
    would_deny: bool = False
    subject: str = ""  # the intake subject
    principal: str = ""
    action: str = ""
    resource: str = ""
    intent_id: str = ""
    payload_sha256: str = ""
    parents: tuple[str, ...] = ()
    lineage_depth: int = 0
    lineage_root: str = ""
    labels: tuple[str, ...] = ()
    intake: str = ""  # "<stream>/<stream seq>/<stored at, ns>" of the intent message decided
    artifact: str = ""  # allow: the Guard-Artifact forwarded to exec
    first_decision: str = ""  # replay: the decision the intent id already had
    taints: tuple[str, ...] = ()  # allow: labels its rules add for its children
    scope: dict[str, int | float] = {}  # allow: its numeric top-level params
    approvers: tuple[str, ...] = ()  # hold: who may approve it
    quorum: int = 0  # hold: how many distinct approvers release it
    expires: float = 0.0  # hold: unresolved at this time (unix s), it is denied ``expired``
    hold: str = ""  # a vote on a hold, or a hold's resolution: the hold's decision id
    approver: str = ""  # a vote: the approver
    approvals: tuple[str, ...] = ()  # a release: the votes (decision ids) counted
    # an allow: what it spent of its limits; rate_limited / budget_exceeded: the full one
    limits: tuple[LimitUse, ...] = ()
    traceparent: str = ""  # the agent's W3C trace context, if it sent a valid one
    # -- chain_start / checkpoint
    epoch: str = ""  # the gateway process that wrote it
    final: bool = False  # checkpoint written at clean shutdown
    sig: str = ""


class CheckpointClaims(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a checkpoint's (or chain start's) signature covers."""

    kind: str
    gateway: str
    seq: int
    prev: str
    ts: float
    epoch: str
    final: bool = False


_record_encoder: Final = msgspec.json.Encoder()
_record_decoder: Final = msgspec.json.Decoder(LedgerRecord)
_claims_decoder: Final = msgspec.json.Decoder(CheckpointClaims)


def encode_record(record: LedgerRecord) -> bytes:
    return _record_encoder.encode(record)


def decode_record(data: bytes) -> LedgerRecord:
    """Decode stored bytes; ``msgspec.DecodeError`` (a ``ValueError``) if not a record."""
    return _record_decoder.decode(data)


def record_hash(data: bytes) -> str:
    """What the next record's ``prev`` names: unpadded base64url SHA-256 of *data*."""
    return b64url_encode(hashlib.sha256(data).digest()).decode("ascii")


@dataclass(frozen=True, slots=True)
class Stored:
    """A message as a stream stored it."""

    seq: int
    subject: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


# --- signing ------------------------------------------------------------------------------


class CheckpointSigner:
    """Signs :class:`CheckpointClaims` with the gateway's Ed25519 key (its JWKS verifies)."""

    __slots__ = ("_key", "_prefix", "kid")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self.rekey(private_key)

    def rekey(self, private_key: Ed25519PrivateKey) -> None:
        """Sign with *private_key* from now on (a rotation, in a running gateway)."""
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigError("checkpoint key must be Ed25519")
        kid = kid_for(private_key.public_key())
        header = msgspec.json.encode({"alg": ALG, "kid": kid, "typ": CHECKPOINT_TYP})
        self._prefix = b64url_encode(header) + b"."
        self._key = private_key
        self.kid = kid

    def sign(self, claims: CheckpointClaims) -> str:
        signing_input = self._prefix + b64url_encode(msgspec.json.encode(claims))
        return (signing_input + b"." + b64url_encode(self._key.sign(signing_input))).decode()


def _claims_of(record: LedgerRecord) -> CheckpointClaims:
    return CheckpointClaims(
        kind=record.kind,
        gateway=record.gateway,
        seq=record.seq,
        prev=record.prev,
        ts=record.ts,
        epoch=record.epoch,
        final=record.final,
    )


def check_signature(record: LedgerRecord, jwks: Jwks) -> str | None:
    """``None`` if *record*'s ``sig`` is a valid signature over its fields, else why not."""
    try:
        header_seg, claims_seg, sig_seg = record.sig.split(".")
        header = msgspec.json.decode(b64url_decode(header_seg))
        claims = _claims_decoder.decode(b64url_decode(claims_seg))
        signature = b64url_decode(sig_seg)
    except (ValueError, TypeError):
        return "signature is not a compact JWS"
    if not isinstance(header, dict) or header.get("typ") != CHECKPOINT_TYP:
        return f"signature is not a {CHECKPOINT_TYP}"
    if header.get("alg") != ALG:
        return f"signature alg is not {ALG}"
    entry = jwks.entry(str(header.get("kid")))
    if entry is None:
        return f"signed with unknown key {header.get('kid')!r}"
    try:
        entry.public_key.verify(signature, f"{header_seg}.{claims_seg}".encode())
    except InvalidSignature:
        return "bad signature"
    if claims != _claims_of(record):
        return "signature does not cover this record's fields"
    # A revoked key (compromised) vouches for nothing it signs from its revocation on; what
    # it signed before stays valid (the chain it sealed then is still the gateway's). A
    # thief can backdate ``ts``: the witness's countersignatures, made at its own time, are
    # what bounds that (``ledger verify --witness``). A rotation's ``not_after`` is not
    # applied: it ends a key's use for artifacts, not the ledger's history.
    if entry.revoked_at is not None and record.ts >= entry.revoked_at:
        return (
            f"signed with key {entry.kid!r} at ts {record.ts:.3f}, after its revocation at "
            f"{entry.revoked_at:.3f}"
        )
    return None


# --- the chain ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last record of a chain: its ``seq`` (-1 for an empty chain) and hash."""

    seq: int = -1
    hash: str = ""


@dataclass(slots=True)
class ChainBatch:
    """Records appended after *head*, in order, not yet committed.

    Build a record with ``seq=batch.next_seq, prev=batch.prev`` and :meth:`add` it; the
    batch's :attr:`head` is the chain head once the whole batch is stored.
    """

    base: ChainHead
    entries: list[tuple[str, bytes, LedgerRecord]] = field(default_factory=list)
    head: ChainHead = field(init=False)

    def __post_init__(self) -> None:
        self.head = self.base

    @property
    def next_seq(self) -> int:
        return self.head.seq + 1

    @property
    def prev(self) -> str:
        return self.head.hash

    def prefix(self, n: int) -> ChainBatch:
        """The batch of this one's first *n* records (its head: after the *n*-th)."""
        part = ChainBatch(self.base)
        for subject, data, record in self.entries[:n]:
            part.entries.append((subject, data, record))
            part.head = ChainHead(record.seq, record_hash(data))
        return part

    def entry(self, i: int) -> ChainBatch:
        """A batch of the *i*-th record alone, on the head before it."""
        if i == 0:
            before = self.base
        else:
            _, data, record = self.entries[i - 1]
            before = ChainHead(record.seq, record_hash(data))
        one = ChainBatch(before)
        subject, data, record = self.entries[i]
        one.entries.append((subject, data, record))
        one.head = ChainHead(record.seq, record_hash(data))
        return one

    def add(self, subject: str, record: LedgerRecord) -> bytes:
        if record.seq != self.next_seq or record.prev != self.prev:
            raise ValueError(f"record seq {record.seq} does not extend the chain")
        data = encode_record(record)
        self.entries.append((subject, data, record))
        self.head = ChainHead(record.seq, record_hash(data))
        return data

    def add_signed(
        self,
        subject: str,
        signer: CheckpointSigner,
        *,
        kind: str,
        gateway: str,
        ts: float,
        epoch: str,
        final: bool = False,
    ) -> bytes:
        """Append a ``chain_start`` or ``checkpoint`` record, signed."""
        unsigned = LedgerRecord(
            kind=kind,
            gateway=gateway,
            seq=self.next_seq,
            prev=self.prev,
            ts=ts,
            epoch=epoch,
            final=final,
        )
        record = msgspec.structs.replace(unsigned, sig=signer.sign(_claims_of(unsigned)))
        return self.add(subject, record)
