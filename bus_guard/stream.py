"""Stream mode: pull intents from JetStream, decide each once, record, publish, then ack.

For every pulled batch (SPEC §7, SCENARIOS S3/S4/S8):

1. decode each intent and derive its decision id: from principal + intent id, or from the
   stored message when there is no intent to key on (:mod:`bus_guard.ledger`);
2. look up in the ledger the decision of every intent that may have one already
   (redeliveries, ids decided here recently, repeats within the batch): a redelivered
   intent *adopts* the decision recorded for it; a new message reusing an intent id is a
   ``replay`` denial;
3. look up the parents of the rest (lineage) and evaluate them (the pure core);
4. commit their ledger records, chained, as one atomic batch whose records can each be
   created only once. Refused: find which ids are taken, adopt or deny ``replay``, commit the
   rest again. In doubt (timeout, lost connection): commit the identical batch again until
   the answer is definite; a gateway that cannot find out stops (:class:`ChainInDoubt`);
5. publish the outputs (exec / deny / hold, ``Nats-Msg-Id`` = decision id) and wait for
   every PubAck; ack the intents whose outputs are all stored, ``nak`` the rest with a delay.

Nothing is acked before its decision record and its outputs are stored, and nothing is
forwarded that is not recorded as an allow with its artifact. A crash anywhere leaves
unacked intents that come back and adopt what was recorded, or are decided afresh if
nothing was.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from nats.aio.client import Client
from nats.aio.msg import Msg

from .artifacts import Signer, payload_digest
from .authorize import PolicySetLike, authorize, deny
from .decision import Decision, Reason
from .jetstream import (
    Committed,
    Puller,
    find_msg_id,
)
from .ledger import (
    CheckpointSigner,
    LedgerRecord,
    intent_decision_id,
    message_decision_id,
)
from .lineage import lineage_of
from .messages import Intent, Malformed, decode_intent, parse_subject
from .outputs import outputs_of
from .preflight import Streams
from .recorder import ChainInDoubt, Pending, Recorder
from .settings import Settings
from .state import State

__all__ = ("IntakeCounters", "StreamIntake")

log = logging.getLogger(__name__)

_RESOLVE_ROUNDS: Final = 4


@dataclass(slots=True)
class IntakeCounters:
    received: int = 0
    adopted: int = 0
    naks: int = 0
    acks: int = 0
    late_adoptions: int = 0
    duplicate_outputs: int = 0


def _intake_of(msg: Msg) -> tuple[str, int]:
    """``<stream>/<stream seq>/<stored at, ns>`` and the delivery count, from the ack subject."""
    md = msg.metadata
    tokens = (msg.reply or "").split(".")
    stored_ns = tokens[7] if len(tokens) == 9 else tokens[9]
    return f"{md.stream}/{md.sequence.stream}/{stored_ns}", md.num_delivered


@dataclass
class StreamIntake:
    nc: Client
    settings: Settings
    policies: Callable[[], PolicySetLike]
    signer: Signer
    checkpoint_signer: CheckpointSigner
    state: State
    clock: Callable[[], float]
    on_decided: Callable[[LedgerRecord], None]
    counters: IntakeCounters = field(default_factory=IntakeCounters)

    def __post_init__(self) -> None:
        s = self.settings
        self._s = s.stream
        self._js = self.nc.jetstream(timeout=self._s.publish_timeout_s)
        self._streams = Streams(s.prefix)
        self.recorder = Recorder(
            self.nc, s, self.policies, self.signer, self.checkpoint_signer, self.clock
        )
        self.puller = Puller(
            self.nc,
            self._streams.intake,
            s.queue,
            batch=self._s.fetch_batch,
            expires_s=self._s.fetch_timeout_s,
            heartbeat_s=self._s.heartbeat_s,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Continue this gateway's chain in the ledger, then start pulling."""
        await self.recorder.start()
        await self.puller.start()
        log.info(
            "ledger chain of %s continues at seq %d (epoch %s)",
            self.settings.gateway_id,
            self.recorder.head.seq,
            self.recorder.epoch,
        )

    async def run(self, stop: anyio.Event) -> None:
        """Decide until *stop* is set; returns after finishing the batch in hand."""
        while not stop.is_set():
            msgs = await self.puller.pull(self._s.fetch_batch, self._s.fetch_timeout_s)
            if msgs:
                await self.process(msgs)
            await self.recorder.checkpoint(due_only=True)

    async def finish(self) -> None:
        """The final checkpoint: the chain is sealed until this gateway starts again."""
        await self.puller.stop()
        await self.recorder.checkpoint(final=True)

    # -- one batch -----------------------------------------------------------------------

    async def process(self, msgs: list[Msg]) -> None:
        self.counters.received += len(msgs)
        try:
            now = self.clock()
            policies = self.policies()  # one read per batch: a swap cannot mix bundles
            items = [self._prepare(m) for m in msgs]
            seen: set[str] = set()
            check = []
            for it in items:
                it.repeat = it.decision_id in seen
                seen.add(it.decision_id)
                if not it.repeat and (it.delivered > 1 or self.recorder.seen(it.decision_id)):
                    check.append(it)
            await self._resolve(check, policies, now)
            first = [it for it in items if not it.repeat]
            await self._decide_and_commit(first, policies, now)
            repeats = [it for it in items if it.repeat]
            if repeats:  # after the first of each id is committed: they are replays now
                await self._resolve(repeats, policies, now)
                await self._decide_and_commit(repeats, policies, now)
            await self._publish_and_ack(items, now)
            adopted = sum(it.adopted for it in items)
            if adopted:
                log.info("%d redelivered intents adopted their recorded decisions", adopted)
        except ChainInDoubt:
            raise
        except Exception:  # total: whatever went wrong, nothing undecided is acked
            log.exception("batch of %d intents failed; they will be redelivered", len(msgs))
            await self._nak(m for m in msgs)

    def _prepare(self, msg: Msg) -> Pending:
        s = self.settings
        intake, delivered = _intake_of(msg)
        subject = parse_subject(msg.subject, s.prefix)
        intent: Intent | Malformed | None = None
        if subject is not None:
            ctype = next(
                (v for k, v in (msg.headers or {}).items() if k.lower() == "content-type"), None
            )
            intent = decode_intent(
                msg.data, ctype, max_bytes=s.max_payload_bytes, max_depth=s.max_nesting_depth
            )
        if subject is not None and isinstance(intent, Intent):
            did, keyed = intent_decision_id(s.prefix, subject.principal, intent.id), True
        else:
            did, keyed = message_decision_id(s.prefix, intake), False
        return Pending(msg, intake, delivered, subject, intent, did, keyed)

    async def _resolve(self, items: list[Pending], policies: PolicySetLike, now: float) -> int:
        """Look up each item's decision id; adopt, turn into a replay, or leave it fresh.
        Returns how many items changed."""
        changed = 0
        pending = [it for it in items if it.record is None and not it.failed]
        for _ in range(2):  # a replay's own id may be taken too (a redelivered replay)
            if not pending:
                break
            found = await asyncio.gather(
                *(self.recorder.lookup(it.decision_id) for it in pending), return_exceptions=True
            )
            again = []
            for it, result in zip(pending, found, strict=True):
                if isinstance(result, BaseException):
                    log.warning("ledger lookup of %s failed: %s", it.decision_id, result)
                    it.failed, changed = True, changed + 1
                elif result is None:
                    continue
                elif result.intake == it.intake:
                    it.record, it.adopted, changed = result, True, changed + 1
                elif it.keyed:
                    self._to_replay(it, result, policies)
                    changed += 1
                    again.append(it)
                else:  # a message id taken by another message: cannot happen
                    log.error(
                        "decision %s belongs to %s, not %s",
                        it.decision_id,
                        result.intake,
                        it.intake,
                    )
                    it.failed, changed = True, changed + 1
            pending = again
        return changed

    def _to_replay(self, it: Pending, first: LedgerRecord, policies: PolicySetLike) -> None:
        same = first.payload_sha256 == payload_digest(it.msg.data)
        intent_id = it.intent.id if isinstance(it.intent, Intent) else ""
        it.decision = deny(
            Reason.REPLAY,
            f"intent id {intent_id!r} was already decided: {first.decision_id} "
            f"({first.effect}); this message has {'the same' if same else 'different'} bytes",
            policies,
        )
        it.first_decision = first.decision_id
        it.decision_id, it.keyed = message_decision_id(self.settings.prefix, it.intake), False
        it.lineage = None

    async def _decide_and_commit(
        self, items: list[Pending], policies: PolicySetLike, now: float
    ) -> None:
        todo = [it for it in items if it.record is None and not it.failed]
        await self._find_lineage([it for it in todo if it.decision is None])
        for it in todo:
            if it.decision is None and not it.failed:
                it.decision = self._evaluate(it, policies, now)
        todo = [it for it in todo if not it.failed]
        for _ in range(_RESOLVE_ROUNDS):
            if not todo:
                return
            result = await self.recorder.record(todo, now)
            if isinstance(result, Committed):
                for it in todo:
                    if it.record is not None:
                        self.on_decided(it.record)
                return
            taken = await self._resolve(todo, policies, now)
            if not taken:
                log.error("ledger refused %d records with no id taken: %s", len(todo), result)
                break
            log.info("ledger refused a commit: %d decision ids taken (adopt / replay)", taken)
            todo = [it for it in todo if it.record is None and not it.failed]
        for it in todo:
            it.failed = True

    async def _find_lineage(self, items: list[Pending]) -> None:
        wanted = {p for it in items if isinstance(it.intent, Intent) for p in it.intent.parents}
        if not wanted:
            return
        ids = sorted(wanted)
        found = await asyncio.gather(
            *(self.recorder.parents.get(p) for p in ids), return_exceptions=True
        )
        if any(isinstance(r, BaseException) for r in found):
            log.warning("lineage lookup failed; %d intents will be redelivered", len(items))
            for it in items:
                if isinstance(it.intent, Intent) and it.intent.parents:
                    it.failed = True
            return
        records = {p: r for p, r in zip(ids, found, strict=True) if isinstance(r, LedgerRecord)}
        for it in items:
            if isinstance(it.intent, Intent) and it.subject is not None and it.intent.parents:
                it.lineage = lineage_of(
                    it.subject.principal,
                    it.intent.parents,
                    records,
                    max_depth=self._s.max_lineage_depth,
                )

    def _evaluate(self, it: Pending, policies: PolicySetLike, now: float) -> Decision:
        if it.delivered > self._s.max_deliveries:  # poison: bounded attempts, then a denial
            return deny(
                Reason.INTERNAL_ERROR,
                f"not decided after {it.delivered - 1} deliveries (poison intent)",
                policies,
            )
        if it.subject is None:
            return deny(Reason.BAD_SUBJECT, f"not an intent subject: {it.msg.subject!r}", policies)
        if isinstance(it.intent, Malformed):
            return deny(it.intent.reason, it.intent.message, policies)
        assert it.intent is not None
        return authorize(
            it.subject,
            it.intent,
            policies,
            self.state,
            now=now,
            checks=self.settings.checks,
            lineage=it.lineage,
        )

    # -- outputs and acks ----------------------------------------------------------------

    async def _publish_and_ack(self, items: list[Pending], now: float) -> None:
        s = self.settings
        pending: list[tuple[Pending, list[asyncio.Future[Any]]]] = []
        for it in items:
            if it.failed or it.record is None:
                continue
            try:
                outs = outputs_of(
                    it.record,
                    it.msg.data,
                    it.msg.headers,
                    prefix=s.prefix,
                    deny_payload_bytes=s.deny_payload_bytes,
                    max_payload_bytes=s.max_payload_bytes,
                )
            except ValueError:  # a recorded allow without artifact: never forward it
                log.error("decision %s is an allow without artifact", it.record.decision_id)
                outs = []
            if it.adopted:
                self.counters.adopted += 1
                if now - it.record.ts > self._s.retry_horizon_s:
                    outs = await self._not_yet_published(it.record, outs)
            futures = [
                await self._js.publish_async(out.subject, out.data, headers=dict(out.headers))
                for out in outs
            ]
            pending.append((it, futures))
        everything = [f for _, fs in pending for f in fs]
        if everything:
            with anyio.move_on_after(self._s.publish_timeout_s):
                await asyncio.gather(*everything, return_exceptions=True)
        for f in everything:
            if not f.done():
                f.cancel()
        done = {id(it) for it, fs in pending if all(_stored_ok(f) for f in fs)}
        duplicates = sum(1 for f in everything if _stored_ok(f) and f.result().duplicate)
        if duplicates:  # published before a crash or a lost PubAck: stored once
            self.counters.duplicate_outputs += duplicates
            log.info("%d outputs were already stored (de-duplicated by decision id)", duplicates)
        for it in items:
            if id(it) in done:
                await it.msg.ack()
                self.counters.acks += 1
        await self._nak(it.msg for it in items if id(it) not in done)

    async def _not_yet_published(self, record: LedgerRecord, outs: list[Any]) -> list[Any]:
        """Beyond the retry horizon de-duplication cannot tell: search the exec stream for
        a copy stored since the decision (allowing a minute of clock difference)."""
        self.counters.late_adoptions += 1
        kept = []
        for out in outs:
            if out.role == "exec" and await find_msg_id(
                self.nc,
                self._streams.exec,
                out.subject,
                record.decision_id,
                since=record.ts - 60.0,
                until=self.clock() + 60.0,
            ):
                continue
            kept.append(out)
        return kept

    async def _nak(self, msgs: Iterable[Msg]) -> None:
        for msg in msgs:
            try:
                await msg.nak(delay=self._s.nak_delay_s)
                self.counters.naks += 1
            except Exception as exc:  # it comes back after the ack wait anyway
                log.warning("nak failed: %s", exc)


def _stored_ok(future: asyncio.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
