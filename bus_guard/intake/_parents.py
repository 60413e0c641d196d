"""Parent decisions for lineage: looked up in the ledger, counted only once verified, cached.

A parent counts only if the gateway has verified its record (SPEC §10, "Trustworthy
lineage"). Whoever may publish on the ledger subjects can write any record there (a copy of
a denial turned into an allow, an allow for a decision that never happened), so a record is
taken for what it says only where a forgery could not gain anything by it:

* an **allow** counts only if its ``artifact`` verifies with a key of the gateway's trusted
  JWKS (:meth:`~bus_guard.verify.Verifier.signed_claims`: signature and ``kid``; a batched
  artifact through its signed tree head and inclusion proof; the key not refused,
  ``revoked_at`` / ``not_after``, at or before the artifact's ``iat``; expiry is not
  checked, parents are older than the artifact lifetime) and its claims are exactly what the
  gateway signs for such a record (:func:`~bus_guard.pipeline.claims_of`: ``jti`` = decision
  id, ``sub`` = principal, ``aud`` = the exec subject of the record's subject, action,
  resource, intent id, payload digest, policy, rules, mode, parents, lineage depth and root,
  labels, taints, scope, hold, approvals). A record this process recorded itself
  (:meth:`ParentLookup.remember`) is trusted as it is. An allow that does not verify is
  counted (``forged``), logged, and its decision is "not a known decision";
* a **denial** and a **hold** are taken as they read: they carry no signature, but the most
  a forged one can do is deny or delay a child (fail closed);
* a **hold** stands for its resolution once there is one
  (:func:`~bus_guard.decision.resolution_decision_id`): a verified release (an allow whose
  artifact's ``hold`` claim names the hold) is the record the child sees as its parent
  (its lineage fields are the held intent's); a denial (rejected, expired) denies.

Which record: the *first* one stored on ``<prefix>.ledger.*.d.<id>``. The ledger lets a
decision record be created only on an empty subject (``Nats-Expected-Last-Subject-
Sequence: 0`` over that wildcard, :mod:`bus_guard.ledger._records`), so the gateway's
record of a decision is always the first one for its id, and whatever comes after it is a
forgery (or a verbatim copy): a later record can neither break nor fool a child. A forgery
stored *before* any genuine record takes the id for good (the gateway can no longer record
that decision), so it is final too: a child then gets "not a known decision", or the
forged denial, never an allow. (The last record, which a forger can always add, is what the
ledger lookup used to read.)

Bounded cost: one direct get per parent (two for a hold) and at most one Ed25519
verification per allow (batched: per tree head, cached by the verifier); what is final
(allows, denials, forgeries, resolved holds) is cached, least recently used out first.
"""

from __future__ import annotations

import collections
import logging
from typing import Final, NamedTuple

import msgspec
from nats.js import JetStreamContext

from bus_guard.decision import resolution_decision_id
from bus_guard.errors import VerificationError
from bus_guard.intake._jetstream import first_by_subject
from bus_guard.ledger._records import DECISION, LedgerRecord, decode_record
from bus_guard.subjects import Subjects
from bus_guard.verify import ArtifactClaims, Jwks, Verifier

__all__ = ("Parent", "ParentLookup")

log = logging.getLogger(__name__)


class Parent(NamedTuple):
    """What a child sees of one parent decision.

    ``record`` is the record that counts for it (a verified allow, a denial, a hold, or the
    resolution of a hold), ``None`` if none does (no record yet, or a forged one).
    ``pending``: it may still change (not in the ledger yet, or held): a child may wait.
    """

    record: LedgerRecord | None
    pending: bool


_UNKNOWN: Final = Parent(None, pending=True)  # no record (yet)
_FORGED: Final = Parent(None, pending=False)  # a record that does not verify took the id


class ParentLookup:
    """Parent decisions by id, from the ledger (see the module doc for what counts)."""

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        trusted: Jwks,
        *,
        cache_size: int,
    ) -> None:
        self._js = js
        self._subjects = subjects
        self._stream = subjects.streams.ledger
        self._ledger = subjects.ledger()  # every gateway's records
        # leeway 0: nothing here compares times with it (signed_claims checks no time)
        self._verifier = Verifier(trusted, leeway_s=0.0)
        self._cache: collections.OrderedDict[str, Parent] = collections.OrderedDict()
        self._cache_size = cache_size
        self.forged = 0  # ledger records that claimed an allow (or a release) and did not verify

    def trust(self, trusted: Jwks) -> None:
        """Verify parents with *trusted* from now on (keys rotated or revoked while the
        gateway runs). What was verified and cached stays as it was judged."""
        self._verifier = Verifier(trusted, leeway_s=0.0)

    def remember(self, record: LedgerRecord) -> None:
        """A record this process committed: trusted as it is."""
        if record.kind != DECISION or record.effect not in ("allow", "deny"):
            return
        self._keep(record.decision_id, Parent(record, pending=False))
        hold = record.hold
        if hold and record.decision_id == resolution_decision_id(self._subjects.prefix, hold):
            self._keep(hold, Parent(record, pending=False))  # a hold's resolution

    async def get(self, decision_id: str) -> Parent:
        """What counts for the decision *decision_id*; raises if it cannot look."""
        cached = self._cache.get(decision_id)
        if cached is not None:
            self._cache.move_to_end(decision_id)
            return cached
        record = await self._first(decision_id)
        if record is None:
            return _UNKNOWN
        if isinstance(record, str):
            parent = self._forgery(decision_id, record)
        elif record.effect == "allow":
            why = self._unverified(record)
            parent = Parent(record, False) if why is None else self._forgery(decision_id, why)
        elif record.effect == "hold":
            parent = await self._held(record)
        else:  # a denial (or a vote, which is no allow either): final as it reads
            parent = Parent(record, pending=False)
        if not parent.pending:
            self._keep(decision_id, parent)
        return parent

    async def _held(self, hold: LedgerRecord) -> Parent:
        """A hold stands for its resolution: a verified release, or a denial; while there is
        none, the hold itself (pending)."""
        resolution_id = resolution_decision_id(self._subjects.prefix, hold.decision_id)
        cached = self._cache.get(resolution_id)
        if cached is not None:
            return cached if cached.record is not None else Parent(hold, pending=False)
        resolution = await self._first(resolution_id)
        if resolution is None:
            return Parent(hold, pending=True)
        if isinstance(resolution, str):
            self._forgery(resolution_id, resolution)
            return Parent(hold, pending=False)  # the id is taken: it can never be released
        if resolution.effect == "allow":
            why = self._unverified(resolution)
            if why is None and resolution.hold != hold.decision_id:
                why = f"it releases {resolution.hold!r}, not {hold.decision_id}"
            if why is not None:
                self._forgery(resolution_id, why)
                return Parent(hold, pending=False)
        return Parent(resolution, pending=False)

    async def _first(self, decision_id: str) -> LedgerRecord | str | None:
        """The first record stored for *decision_id* (the one that stands, see the module
        doc), ``None`` if there is none, or why what is stored there is no such record."""
        stored = await first_by_subject(
            self._js, self._stream, self._ledger.any_decision(decision_id)
        )
        if stored is None:
            return None
        try:
            record = decode_record(stored.data)
        except msgspec.DecodeError:
            return "not a ledger record"
        if record.kind != DECISION or record.decision_id != decision_id:
            return f"a {record.kind} record for {record.decision_id!r}"
        return record

    def unverified(self, record: LedgerRecord) -> str | None:
        """``None`` if the allow *record*'s artifact verifies with a trusted key and binds
        exactly its fields, else why not (a record this process committed is trusted)."""
        cached = self._cache.get(record.decision_id)
        if cached is not None and cached.record == record:
            return None
        return self._unverified(record)

    def _unverified(self, record: LedgerRecord) -> str | None:
        """``None`` if *record*'s artifact verifies and binds exactly its fields, else why not."""
        try:
            claims, refused_from = self._verifier.signed_claims(record.artifact)
        except VerificationError as exc:
            return f"artifact: {exc.reason}"
        if claims.iat >= refused_from:
            return f"artifact signed (iat {claims.iat}) after its key was refused"
        try:
            aud = self._subjects.output("exec", record.subject)
        except ValueError:
            return "not an intent subject"
        if claims != _claims_for(record, claims, aud):
            return "artifact claims do not match the record"
        return None

    def _forgery(self, decision_id: str, why: str) -> Parent:
        self.forged += 1
        log.warning(
            "ledger record of decision %s does not verify (%s): not a known decision",
            decision_id,
            why,
        )
        return _FORGED

    def _keep(self, decision_id: str, parent: Parent) -> None:
        self._cache[decision_id] = parent
        self._cache.move_to_end(decision_id)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)


def _claims_for(record: LedgerRecord, signed: ArtifactClaims, aud: str) -> ArtifactClaims:
    """The claims the gateway signs for *record* (as :func:`~bus_guard.pipeline.claims_of`
    builds them), with what a record does not hold (issuer, times, ledger seq) from
    *signed*."""
    return ArtifactClaims(
        signed.iss,
        record.principal,
        aud,
        signed.iat,
        signed.nbf,
        signed.exp,
        record.decision_id,
        record.action,
        record.resource,
        record.intent_id,
        record.payload_sha256,
        record.policy_digest,
        record.policy_version,
        record.rules,
        record.mode,
        record.would_deny,
        record.parents,
        record.lineage_depth,
        record.lineage_root,
        signed.ledger_seq,
        record.labels,
        record.taints,
        record.scope,
        record.hold,
        record.approvals,
    )
