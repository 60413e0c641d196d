"""The recorder: writes one gateway's chain of decision records into the ledger.

It continues the gateway's chain from the ledger at start-up (a signed ``chain_start``),
turns decisions into records (signing the artifact of each allow, with its ledger ``seq``),
commits them as atomic batches whose records can each be created only once, adds signed
checkpoints, and seals the chain at clean shutdown (a ``final`` checkpoint).

A batch is refused as a whole when a decision id is taken; the caller then finds out which
(:meth:`Recorder.lookup`) and records the rest again. A batch *in doubt* (a timeout, a lost
connection) is committed again *identically* until the answer is definite: committing a
different batch instead could fork the chain if the first attempt was stored late. If the
answer does not come within the retry horizon, :class:`ChainInDoubt` stops the gateway.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_guard.decision import Decision, Effect, Lineage, Reason, new_decision_id
from bus_guard.errors import GatewayError
from bus_guard.intake._jetstream import Committed, InDoubt, Rejected, commit, last_by_subject, read
from bus_guard.intake._parents import ParentLookup
from bus_guard.intake._preflight import Streams
from bus_guard.intent import Intent, Malformed, Subject
from bus_guard.ledger._records import (
    CHAIN_START,
    CHECKPOINT,
    ChainBatch,
    ChainHead,
    CheckpointSigner,
    LedgerRecord,
    LedgerSubjects,
    decode_record,
    record_hash,
)
from bus_guard.pipeline import HeaderValue, PolicySetLike, deny
from bus_guard.settings import Settings
from bus_guard.signing._batch import BatchSigner
from bus_guard.signing._signer import Signer, payload_digest
from bus_guard.verify import ArtifactClaims

__all__ = ("ChainInDoubt", "Pending", "Recorder")

log = logging.getLogger(__name__)

_ZERO: Final = HeaderValue("0")
_RECENT_IDS: Final = 100_000  # decision ids committed here, to catch repeats without a refusal


class ChainInDoubt(GatewayError):
    """A ledger commit stayed unanswered for the whole retry horizon: the gateway cannot
    know its own chain's head and must not write another record."""


@dataclass(slots=True)
class Pending:
    """One pulled intent on its way to a decision that stands."""

    msg: Msg
    intake: str  # "<stream>/<stream seq>/<stored at, ns>": which stored message this is
    delivered: int
    subject: Subject | None
    intent: Intent | Malformed | None
    decision_id: str
    keyed: bool  # the id derives from the intent (not from the message)
    decision: Decision | None = None
    lineage: Lineage | None = None
    record: LedgerRecord | None = None  # the decision that stands, once recorded or adopted
    adopted: bool = False
    first_decision: str = ""  # replay: the decision the intent id already had
    failed: bool = False  # undecided this time: nak, it comes back
    repeat: bool = False  # same decision id as an earlier intent of the batch


class Recorder:
    def __init__(
        self,
        nc: Client,
        settings: Settings,
        policies: Callable[[], PolicySetLike],
        signer: Signer,
        checkpoint_signer: CheckpointSigner,
        clock: Callable[[], float],
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.policies = policies
        self.signer = signer
        self.checkpoint_signer = checkpoint_signer
        self.clock = clock
        self._batcher = (
            BatchSigner(signer, max_batch=settings.batch_max)
            if settings.artifacts == "batched"
            else None
        )
        self._s = settings.stream
        self._js = nc.jetstream(timeout=self._s.publish_timeout_s)
        self._streams = Streams(settings.prefix)
        self._subjects = LedgerSubjects(settings.prefix, settings.gateway_id)
        self.parents = ParentLookup(
            self._js, self._streams.ledger, self._subjects, cache_size=_RECENT_IDS
        )
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.epoch = new_decision_id()
        self._head = ChainHead()
        self._since_checkpoint = 0
        self._checkpoint_at = time.monotonic()
        self._batches = 0
        self.records = 0
        self.refusals = 0
        self.in_doubt = 0
        self.artifact_batches = 0  # batched artifacts: signed tree heads

    @property
    def head(self) -> ChainHead:
        return self._head

    async def start(self) -> None:
        """Continue this gateway's chain from the ledger with a signed chain start."""
        self._head = await self._find_tail()
        await self._commit_signed(CHAIN_START)

    async def checkpoint(self, *, final: bool = False, due_only: bool = False) -> None:
        """A signed checkpoint (``final`` at clean shutdown); with *due_only*, only if the
        checkpoint interval passed with records after the last one."""
        if due_only and not (
            self._since_checkpoint
            and time.monotonic() - self._checkpoint_at >= self._s.checkpoint_interval_s
        ):
            return
        await self._commit_signed(CHECKPOINT, final=final)

    def seen(self, decision_id: str) -> bool:
        """Whether this gateway recorded *decision_id* recently."""
        return decision_id in self._recent

    async def record(self, items: list[Pending], now: float) -> Committed | Rejected:
        """Record the decisions of *items* (all or none); sets ``record`` of each on success."""
        batch = self._build(items, now)
        result = await self._commit(batch)
        if isinstance(result, Committed):
            self._advance(batch)
            for it, (_, _, record) in zip(items, batch.entries, strict=False):
                it.record = record
        else:
            self.refusals += 1
        return result

    async def lookup(self, decision_id: str) -> LedgerRecord | None:
        stored = await last_by_subject(
            self._js, self._streams.ledger, self._subjects.any_decision(decision_id)
        )
        return decode_record(stored.data) if stored is not None else None

    async def _find_tail(self) -> ChainHead:
        marker = await last_by_subject(self._js, self._streams.ledger, self._subjects.chain)
        if marker is None:
            return ChainHead()
        last = marker
        async for stored in read(
            self.nc,
            self._streams.ledger,
            self._subjects.own,
            start_seq=marker.seq,
            timeout_s=self._s.publish_timeout_s,
        ):
            last = stored
        try:
            record = decode_record(last.data)
        except msgspec.DecodeError as exc:
            raise GatewayError(
                f"the last ledger record of {self.settings.gateway_id} (stream seq {last.seq}) "
                f"is not a record ({exc}); audit the ledger (bus-guard ledger verify)"
            ) from None
        return ChainHead(record.seq, record_hash(last.data))

    def _build(self, items: list[Pending], now: float) -> ChainBatch:
        batch = ChainBatch(self._head)
        # Batched: every record of the batch gets the next seq in turn, so the claims
        # (which name the seq) of all its allows are known, and signed, before any record.
        signed = self._sign_batch(items, batch.next_seq, now) if self._batcher else None
        for i, it in enumerate(items):
            artifact = signed[i] if signed is not None else None
            record = self._record(it, batch.next_seq, batch.prev, now, artifact)
            batch.add(self._subjects.decision(it.decision_id), record)
        if self._since_checkpoint + len(items) >= self._s.checkpoint_every:
            self._add_signed(batch, CHECKPOINT)
        return batch

    def _record(
        self, it: Pending, seq: int, prev: str, now: float, artifact: str | None = None
    ) -> LedgerRecord:
        """*artifact*: signed already (batched), ``""`` if that failed; ``None``: sign here."""
        decision = it.decision
        assert decision is not None
        intent = it.intent if isinstance(it.intent, Intent) else None
        principal = it.subject.principal if it.subject is not None else ""
        action = it.subject.action if it.subject is not None else ""
        lineage = it.lineage or Lineage(root=principal)
        if decision.effect is not Effect.ALLOW:
            artifact = ""
        else:
            if artifact is None:
                artifact = self._sign(it, decision, seq, lineage, now)
            if not artifact:
                decision = it.decision = deny(
                    Reason.INTERNAL_ERROR, "signing failed", self.policies()
                )
        return LedgerRecord(
            kind="decision",
            gateway=self.settings.gateway_id,
            seq=seq,
            prev=prev,
            ts=now,
            decision_id=it.decision_id,
            effect=str(decision.effect),
            reason=str(decision.reason),
            message=decision.message,
            rules=decision.rules,
            policy_digest=decision.policy_digest,
            policy_version=decision.policy_version,
            mode=decision.mode,
            would_deny=decision.would_deny,
            subject=it.msg.subject,
            principal=principal,
            action=action,
            resource=intent.resource if intent is not None else "",
            intent_id=intent.id if intent is not None else "",
            payload_sha256=payload_digest(it.msg.data),
            parents=intent.parents if intent is not None else (),
            lineage_depth=lineage.depth,
            lineage_root=lineage.root,
            labels=tuple(sorted(lineage.labels)),
            intake=it.intake,
            artifact=artifact,
            first_decision=it.first_decision,
        )

    def _sign_batch(self, items: list[Pending], first_seq: int, now: float) -> list[str]:
        """The artifact of every allow among *items* (record seq ``first_seq + i``), signed
        with one tree head per ``batch_max`` of them; ``""`` for the others, and for all
        of a chunk whose signing failed (they are recorded as denials: fail closed)."""
        assert self._batcher is not None
        out = [""] * len(items)
        todo: list[tuple[int, ArtifactClaims]] = []
        for i, it in enumerate(items):
            decision = it.decision
            if decision is None or decision.effect is not Effect.ALLOW:
                continue
            principal = it.subject.principal if it.subject is not None else ""
            lineage = it.lineage or Lineage(root=principal)
            try:
                todo.append((i, self._claims(it, decision, first_seq + i, lineage, now)))
            except Exception:  # synchronous: never a cancellation; deny rather than forward
                log.exception("no claims for intent %s", it.decision_id)
        step = self.settings.batch_max
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            try:
                tokens = self._batcher.sign_batch([c for _, c in chunk], now=now)
            except Exception:  # SigningError (sync): none of the chunk is forwarded
                log.exception("signing a batch of %d artifacts failed", len(chunk))
                continue
            self.artifact_batches += 1
            for (i, _), token in zip(chunk, tokens, strict=True):
                out[i] = token
        return out

    def _sign(self, it: Pending, decision: Decision, seq: int, lineage: Lineage, now: float) -> str:
        try:
            return self.signer.sign(self._claims(it, decision, seq, lineage, now))
        except Exception:  # synchronous: never a cancellation; deny rather than forward
            log.exception("signing failed for intent %s", it.decision_id)
            return ""

    def _claims(
        self, it: Pending, decision: Decision, seq: int, lineage: Lineage, now: float
    ) -> ArtifactClaims:
        assert it.subject is not None and isinstance(it.intent, Intent)
        p = self.settings.prefix
        return self.signer.build_claims(
            now=now,
            sub=it.subject.principal,
            aud=f"{p}.exec.{it.msg.subject[len(p) + 4 :]}",
            jti=it.decision_id,
            action=it.subject.action,
            resource=it.intent.resource,
            intent_id=it.intent.id,
            payload=it.msg.data,
            policy_digest=decision.policy_digest,
            policy_version=decision.policy_version,
            rules=decision.rules,
            mode=decision.mode,
            would_deny=decision.would_deny,
            parents=it.intent.parents,
            lineage_depth=lineage.depth,
            lineage_root=lineage.root,
            ledger_seq=seq,
        )

    def _add_signed(self, batch: ChainBatch, kind: str, *, final: bool = False) -> None:
        batch.add_signed(
            self._subjects.chain,
            self.checkpoint_signer,
            kind=kind,
            gateway=self.settings.gateway_id,
            ts=self.clock(),
            epoch=self.epoch,
            final=final,
        )

    def _advance(self, batch: ChainBatch) -> None:
        self._head = batch.head
        self.records += len(batch.entries)
        for _, _, record in batch.entries:
            if record.kind == CHECKPOINT or record.kind == CHAIN_START:
                self._since_checkpoint = 0
                self._checkpoint_at = time.monotonic()
                continue
            self._since_checkpoint += 1
            self.parents.remember(record)
            self._recent[record.decision_id] = None
            if len(self._recent) > _RECENT_IDS:
                self._recent.popitem(last=False)

    async def _commit_signed(self, kind: str, *, final: bool = False) -> None:
        batch = ChainBatch(self._head)
        self._add_signed(batch, kind, final=final)
        result = await self._commit(batch)
        if not isinstance(result, Committed):
            raise GatewayError(f"the ledger refused a {kind} record: {result}")
        self._advance(batch)

    async def _commit(self, batch: ChainBatch) -> Committed | Rejected:
        """Commit *batch*; while in doubt, the identical batch again (never a different
        one: a late commit of the first attempt must not fork the chain)."""
        entries = [(s, d, self._headers(r)) for s, d, r in batch.entries]
        deadline = time.monotonic() + self._s.retry_horizon_s
        self._batches += 1
        batch_id = f"{self.settings.gateway_id}-{self.epoch}-{self._batches}"
        result = await commit(
            self.nc, entries, batch_id=batch_id, timeout_s=self._s.publish_timeout_s
        )
        delay = 0.05
        while isinstance(result, InDoubt):
            self.in_doubt += 1
            log.warning("ledger commit in doubt (%s); retrying the same records", result.reason)
            if time.monotonic() > deadline or self.nc.is_closed:
                raise ChainInDoubt(f"ledger commit unanswered ({result.reason})")
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)
            self._batches += 1
            retry_id = f"{self.settings.gateway_id}-{self.epoch}-{self._batches}"
            result = await commit(
                self.nc, entries, batch_id=retry_id, timeout_s=self._s.publish_timeout_s
            )
            if isinstance(result, Rejected) and await self._stored(batch):
                return Committed(0)  # the attempt in doubt had been stored
        return result

    async def _stored(self, batch: ChainBatch) -> bool:
        subject, data, record = batch.entries[0]
        if record.kind == "decision":
            subject = self._subjects.any_decision(record.decision_id)
        try:
            stored = await last_by_subject(self._js, self._streams.ledger, subject)
        except Exception as exc:
            raise ChainInDoubt(f"cannot tell whether the ledger stored a batch: {exc}") from exc
        return stored is not None and stored.data == data

    def _headers(self, record: LedgerRecord) -> dict[str, str]:
        # HeaderValue: the same bytes, without nats-py's ~2 µs per value (see outputs).
        if record.kind == "decision":
            return {
                "Nats-Msg-Id": HeaderValue(record.decision_id),
                "Nats-Expected-Last-Subject-Sequence": _ZERO,
                "Nats-Expected-Last-Subject-Sequence-Subject": HeaderValue(
                    self._subjects.any_decision(record.decision_id)
                ),
            }
        return {
            "Nats-Msg-Id": HeaderValue(
                f"{record.kind}.{record.gateway}.{record.seq}.{record.epoch}"
            )
        }
