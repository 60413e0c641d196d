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
from collections.abc import Callable, Sequence
from typing import Final

import anyio
import msgspec
from nats.aio.client import Client

from bus_guard.decision import new_decision_id
from bus_guard.errors import GatewayError
from bus_guard.intake._jetstream import (
    UNAVAILABLE,
    Committed,
    InDoubt,
    Rejected,
    commit,
    first_by_subject,
    last_by_subject,
    read,
)
from bus_guard.intake._parents import ParentLookup
from bus_guard.intake._publisher import ATOMIC_MIN
from bus_guard.intake._work import Decided
from bus_guard.ledger._records import (
    CHAIN_START,
    CHECKPOINT,
    DECISION,
    ChainBatch,
    ChainHead,
    CheckpointSigner,
    LedgerRecord,
    decode_record,
    record_hash,
)
from bus_guard.pipeline import (
    HeaderValue,
    Outcome,
    claims_of,
    failed,
    outcome_of,
    traceparent_of,
)
from bus_guard.settings import Settings
from bus_guard.signing._batch import BatchSigner
from bus_guard.signing._signer import Signer
from bus_guard.verify import ArtifactClaims, Jwks

__all__ = ("ChainInDoubt", "Recorder")

log = logging.getLogger(__name__)

_ZERO: Final = HeaderValue("0")
_RECENT_IDS: Final = 100_000  # decision ids committed here, to catch repeats without a refusal
# Records kept as possible parents (whole records, ~1-2 KiB with an artifact): beyond, a
# child's parent is read from the ledger. Bounded well below _RECENT_IDS so that a flood of
# decisions (SCENARIOS S13) holds the gateway at ~30 MiB of them, not ~200 MiB.
_PARENT_CACHE: Final = 16_384


def _no_fence() -> None:
    pass


def _unavailable(result: object) -> bool:
    return isinstance(result, Rejected) and result.code == UNAVAILABLE


class ChainInDoubt(GatewayError):
    """A ledger commit stayed unanswered for the whole retry horizon: the gateway cannot
    know its own chain's head and must not write another record."""


class Recorder:
    def __init__(
        self,
        nc: Client,
        settings: Settings,
        signer: Signer,
        checkpoint_signer: CheckpointSigner,
        clock: Callable[[], float],
        trusted: Jwks,
    ) -> None:
        """*trusted*: the keys whose artifacts make a parent decision's record count."""
        self.nc = nc
        self.settings = settings
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
        self._streams = settings.subjects.streams
        self._subjects = settings.subjects.ledger(settings.gateway_id)
        self.parents = ParentLookup(self._js, settings.subjects, trusted, cache_size=_PARENT_CACHE)
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.epoch = new_decision_id()
        # The chain has one writer at a time: the intake's record stage, approvals, and
        # checkpoints each build on the head the previous commit left.
        self._lock = anyio.Lock()
        self._head = ChainHead()
        self._since_checkpoint = 0
        self._checkpoint_at = time.monotonic()
        self._batches = 0
        self.records = 0
        self.refusals = 0
        self.in_doubt = 0
        self.unavailable = 0  # commits answered 503 (retried)
        self.artifact_batches = 0  # batched artifacts: signed tree heads
        # Called before every commit; raises if this process may not write the chain (the
        # gateway id's lease: one writer per chain).
        self.fence: Callable[[], None] = _no_fence

    @property
    def head(self) -> ChainHead:
        return self._head

    async def start(self) -> None:
        """Continue this gateway's chain from the ledger with a signed chain start."""
        async with self._lock:
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
        async with self._lock:
            await self._commit_signed(CHECKPOINT, final=final)

    def seen(self, decision_id: str) -> bool:
        """Whether this gateway recorded *decision_id* recently."""
        return decision_id in self._recent

    async def record(self, items: Sequence[Decided], now: float) -> list[LedgerRecord] | Rejected:
        """Record the decisions of *items*, all or none: their records, in order, once
        stored (allows with their artifacts signed), or why the ledger refused them."""
        outcomes = [self._outcome(it, now) for it in items]
        intakes = [it.pulled.intake for it in items]
        return await self.record_outcomes(outcomes, intakes, now, one_by_one=True)

    async def record_outcomes(
        self,
        outcomes: Sequence[Outcome],
        intakes: Sequence[str],
        now: float,
        *,
        one_by_one: bool = False,
    ) -> list[LedgerRecord] | Rejected:
        """Record *outcomes* (the message each decides: *intakes*), all or none, as
        :meth:`record` does: approvals record their votes and resolutions through here.

        *one_by_one* (the stream intake): a batch of fewer than :data:`ATOMIC_MIN` records
        is committed record by record, in order, each create-only, rather than as one
        atomic batch (which costs the server a staging store and three fsyncs, ~2.6 ms,
        whatever its size: the latency of every small batch, SCENARIOS S13). Refused
        midway, the records before the refused one are stored and the chain continues
        after them; the refusal is returned as for an atomic batch, and the caller's
        lookup finds those records as its own (adopted)."""
        async with self._lock:
            batch = self._build(outcomes, intakes, now)
            if one_by_one and 1 < len(batch.entries) < ATOMIC_MIN:
                stored, result = await self._commit_each(batch)
                if stored:
                    self._advance(batch.prefix(stored))
            else:
                result = await self._commit(batch)
                if isinstance(result, Committed):
                    self._advance(batch)
            if not isinstance(result, Committed):
                self.refusals += 1
                return result
        return [record for _, _, record in batch.entries[: len(outcomes)]]

    async def lookup(self, decision_id: str, *, direct: bool = True) -> LedgerRecord | None:
        """The record that stands for *decision_id*: the first one stored (a decision record
        is created only on an empty subject; anything after it is not the gateway's).
        ``direct=False`` asks the stream leader (a read that sees every commit acknowledged
        before it: what counting votes needs)."""
        stored = await first_by_subject(
            self._js, self._streams.ledger, self._subjects.any_decision(decision_id), direct=direct
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

    def _build(self, outcomes: Sequence[Outcome], intakes: Sequence[str], now: float) -> ChainBatch:
        batch = ChainBatch(self._head)
        first_seq = batch.next_seq
        # Every record of the batch gets the next seq in turn, so the claims (which name
        # the seq) of all its allows are known, and signed, before any record.
        artifacts = self._sign(outcomes, first_seq, now)
        for intake, outcome, artifact in zip(intakes, outcomes, artifacts, strict=True):
            if outcome.effect == "allow":
                outcome = (
                    msgspec.structs.replace(outcome, artifact=artifact)
                    if artifact
                    else failed(outcome, "signing failed")
                )
            record = LedgerRecord(
                kind=DECISION,
                seq=batch.next_seq,
                prev=batch.prev,
                intake=intake,
                **msgspec.structs.asdict(outcome),
            )
            batch.add(self._subjects.decision(record.decision_id), record)
        if self._since_checkpoint + len(outcomes) >= self._s.checkpoint_every:
            self._add_signed(batch, CHECKPOINT)
        return batch

    def _outcome(self, it: Decided, now: float) -> Outcome:
        msg = it.pulled.msg
        return outcome_of(
            it.decision_id,
            msg.subject,
            msg.data,
            it.pulled.decoded,
            it.decision,
            gateway=self.settings.gateway_id,
            now=now,
            lineage=it.lineage,
            first_decision=it.first_decision,
            traceparent=traceparent_of(msg.headers) if msg.headers else "",
        )

    def _sign(self, outcomes: Sequence[Outcome], first_seq: int, now: float) -> list[str]:
        """The artifact of every allow among *outcomes* (record seq ``first_seq + i``);
        ``""`` for the others, and for every allow whose signing failed (they are recorded
        as denials: fail closed). Batched: one tree head per ``batch_max`` allows."""
        out = [""] * len(outcomes)
        todo: list[tuple[int, ArtifactClaims]] = []
        signer, subjects = self.signer, self.settings.subjects
        for i, outcome in enumerate(outcomes):
            if outcome.effect != "allow":
                continue
            try:
                claims = claims_of(
                    outcome,
                    issuer=signer.issuer,
                    ttl_s=signer.ttl_s,
                    subjects=subjects,
                    ledger_seq=first_seq + i,
                )
                if self._batcher is None:
                    out[i] = signer.sign(claims)
                else:
                    todo.append((i, claims))
            except Exception:  # synchronous: never a cancellation; deny rather than forward
                log.exception("signing failed for decision %s", outcome.decision_id)
        if self._batcher is None:
            return out
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
        one: a late commit of the first attempt must not fork the chain), and while no
        stream leader answers (503: an election, a node restarting) too, with backoff,
        for at most the retry horizon."""
        self.fence()
        entries = [(s, d, self._headers(r)) for s, d, r in batch.entries]
        deadline = time.monotonic() + self._s.retry_horizon_s
        self._batches += 1
        batch_id = f"{self.settings.gateway_id}-{self.epoch}-{self._batches}"
        result = await commit(
            self.nc, entries, batch_id=batch_id, timeout_s=self._s.publish_timeout_s
        )
        delay, doubted = 0.05, False
        while isinstance(result, InDoubt) or _unavailable(result):
            if isinstance(result, InDoubt):
                doubted = True
                self.in_doubt += 1
                log.warning("ledger commit in doubt (%s); retrying the same records", result.reason)
            else:
                self.unavailable += 1
                if self.unavailable % 50 == 1:  # an election: a line now and then, not a flood
                    log.warning("ledger unavailable (%s); retrying", result)
            if time.monotonic() > deadline or self.nc.is_closed:
                raise ChainInDoubt(f"ledger commit unanswered ({result})")
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)
            self._batches += 1
            retry_id = f"{self.settings.gateway_id}-{self.epoch}-{self._batches}"
            result = await commit(
                self.nc, entries, batch_id=retry_id, timeout_s=self._s.publish_timeout_s
            )
            settled = isinstance(result, Rejected) and not _unavailable(result)
            if doubted and settled and await self._stored(batch):
                return Committed(0)  # the attempt in doubt had been stored
        assert not isinstance(result, InDoubt)
        return result

    async def _commit_each(self, batch: ChainBatch) -> tuple[int, Committed | Rejected]:
        """Commit *batch*'s records one after the other (each as :meth:`_commit` commits a
        batch: while in doubt, the same record again); how many were stored, in order, and
        the answer for the first that was not (or the last one's)."""
        result: Committed | Rejected = Committed(0)
        for i in range(len(batch.entries)):
            result = await self._commit(batch.entry(i))
            if not isinstance(result, Committed):
                return i, result
        return len(batch.entries), result

    async def _stored(self, batch: ChainBatch) -> bool:
        subject, data, record = batch.entries[0]
        get = last_by_subject
        if record.kind == "decision":  # the one that stands is the first (see lookup)
            subject, get = self._subjects.any_decision(record.decision_id), first_by_subject
        try:
            stored = await get(self._js, self._streams.ledger, subject)
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
