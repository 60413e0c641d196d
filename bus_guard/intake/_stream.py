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

Steps 1-3, 4 and 5 run as three stages, one batch in each at most, so that waiting for
the ledger and for PubAcks overlaps with deciding the next batch. Only the recording stage
writes the chain (checkpoints included).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import anyio
import msgspec
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_guard.decision import Reason
from bus_guard.intake._decider import Decider
from bus_guard.intake._jetstream import Committed, Puller, find_msg_id
from bus_guard.intake._preflight import Streams
from bus_guard.intake._publisher import OutputPublisher
from bus_guard.intake._recorder import ChainInDoubt, Pending, Recorder
from bus_guard.ledger._records import CheckpointSigner, LedgerRecord
from bus_guard.pipeline import Output, PolicySetLike, outputs_of
from bus_guard.settings import Settings
from bus_guard.signing._signer import Signer

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
    internal_errors: int = 0  # recorded allows without artifact: denied, not forwarded


@dataclass(slots=True)
class _Batch:
    items: list[Pending]
    policies: PolicySetLike  # read once per batch: a swap cannot mix bundles
    now: float


@dataclass
class StreamIntake:
    nc: Client
    settings: Settings
    policies: Callable[[], PolicySetLike]
    signer: Signer
    checkpoint_signer: CheckpointSigner
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
        self.decider = Decider(s, self.recorder.parents)
        self.publisher = OutputPublisher(
            self.nc,
            self._js,
            name=f"{s.gateway_id}-{self.recorder.epoch}",
            timeout_s=self._s.publish_timeout_s,
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
        """Decide until *stop* is set; returns when every batch taken is finished."""
        to_record, recording = anyio.create_memory_object_stream[_Batch](1)
        to_publish, publishing = anyio.create_memory_object_stream[_Batch](1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._record_stage, recording, to_publish)
            tg.start_soon(self._output_stage, publishing)
            async with to_record:
                while not stop.is_set():
                    msgs = await self.puller.pull(self._s.fetch_batch, self._s.fetch_timeout_s)
                    if msgs:
                        batch = await self._decide_stage(msgs)
                        if batch is not None:
                            await to_record.send(batch)

    async def finish(self) -> None:
        """The final checkpoint: the chain is sealed until this gateway starts again."""
        await self.puller.stop()
        await self.recorder.checkpoint(final=True)

    # -- the stages ----------------------------------------------------------------------

    async def _decide_stage(self, msgs: list[Msg]) -> _Batch | None:
        """Decode, find what is decided already, evaluate the rest."""
        self.counters.received += len(msgs)
        try:
            batch = _Batch([self.decider.prepare(m) for m in msgs], self.policies(), self.clock())
            seen: set[str] = set()
            check = []
            for it in batch.items:
                it.repeat = it.decision_id in seen
                seen.add(it.decision_id)
                if not it.repeat and (it.delivered > 1 or self.recorder.seen(it.decision_id)):
                    check.append(it)
            await self._resolve(check, batch.policies)
            first = [it for it in batch.items if not it.repeat]
            await self.decider.evaluate(first, batch.policies, batch.now)
        except Exception:  # total: whatever went wrong, nothing undecided is acked
            log.exception("deciding %d intents failed; they will be redelivered", len(msgs))
            await self._nak(msgs)
            return None
        return batch

    async def _record_stage(
        self, batches: ObjectReceiveStream[_Batch], to_publish: ObjectSendStream[_Batch]
    ) -> None:
        """The chain's only writer: records batches in order, and the checkpoints."""
        async with batches, to_publish:
            while True:
                batch = None
                with anyio.move_on_after(self._s.fetch_timeout_s):
                    try:
                        batch = await batches.receive()
                    except anyio.EndOfStream:
                        return
                if batch is not None:
                    try:
                        await self._record(batch)
                    except ChainInDoubt:
                        raise
                    except Exception:
                        log.exception("recording %d intents failed", len(batch.items))
                        for it in batch.items:
                            it.failed = it.failed or it.record is None
                    await to_publish.send(batch)
                await self.recorder.checkpoint(due_only=True)

    async def _record(self, batch: _Batch) -> None:
        first = [it for it in batch.items if not it.repeat]
        await self._commit(first, batch.policies, batch.now)
        repeats = [it for it in batch.items if it.repeat]
        if repeats:  # after the first of each id is committed: they are replays now
            await self._resolve(repeats, batch.policies)
            await self.decider.evaluate(repeats, batch.policies, batch.now)
            await self._commit(repeats, batch.policies, batch.now)

    async def _output_stage(self, batches: ObjectReceiveStream[_Batch]) -> None:
        async with batches:
            async for batch in batches:
                try:
                    await self._publish_and_ack(batch.items, batch.now)
                except Exception:
                    log.exception("publishing for %d intents failed", len(batch.items))
                    await self._nak(it.msg for it in batch.items)
                adopted = sum(it.adopted for it in batch.items)
                if adopted:
                    log.info("%d redelivered intents adopted their recorded decisions", adopted)

    # -- deciding once -------------------------------------------------------------------

    async def _resolve(self, items: list[Pending], policies: PolicySetLike) -> int:
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
                    self.decider.replay(it, result, policies)
                    changed += 1
                    again.append(it)
                else:  # a message's own id taken by another message: cannot happen
                    log.error("decision %s is not %s's", it.decision_id, it.intake)
                    it.failed, changed = True, changed + 1
            pending = again
        return changed

    async def _commit(self, items: list[Pending], policies: PolicySetLike, now: float) -> None:
        todo = [it for it in items if it.record is None and not it.failed]
        for _ in range(_RESOLVE_ROUNDS):
            if not todo:
                return
            result = await self.recorder.record(todo, now)
            if isinstance(result, Committed):
                for it in todo:
                    if it.record is not None:
                        self.on_decided(it.record)
                return
            taken = await self._resolve(todo, policies)
            if not taken:
                log.error("ledger refused %d records with no id taken: %s", len(todo), result)
                break
            log.info("ledger refused a commit: %d decision ids taken (adopt / replay)", taken)
            await self.decider.evaluate(todo, policies, now)  # decided afresh if need be
            todo = [it for it in todo if it.record is None and not it.failed]
        for it in todo:
            it.failed = True

    # -- outputs and acks ----------------------------------------------------------------

    async def _publish_and_ack(self, items: list[Pending], now: float) -> None:
        s = self.settings
        decided: list[Pending] = []
        groups: list[list[Output]] = []
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
                log.error(
                    "decision %s is an allow without artifact: denied internal_error, not "
                    "forwarded",
                    it.record.decision_id,
                )
                self.counters.internal_errors += 1
                # Operators see it on the deny stream (same decision id, so de-duplicated
                # like any output); the ledger keeps what was recorded.
                outs = outputs_of(
                    msgspec.structs.replace(
                        it.record,
                        effect="deny",
                        reason=str(Reason.INTERNAL_ERROR),
                        message="recorded allow has no artifact: not forwarded",
                    ),
                    it.msg.data,
                    it.msg.headers,
                    prefix=s.prefix,
                    deny_payload_bytes=s.deny_payload_bytes,
                    max_payload_bytes=s.max_payload_bytes,
                )
            if it.adopted:
                self.counters.adopted += 1
                if now - it.record.ts > self._s.retry_horizon_s:
                    outs = await self._not_yet_published(it.record, outs)
            decided.append(it)
            groups.append(outs)
        published = await self.publisher.publish(groups)
        if published.duplicates:  # published before a crash or a lost PubAck: stored once
            self.counters.duplicate_outputs += published.duplicates
            log.info(
                "%d outputs were already stored (de-duplicated by decision id)",
                published.duplicates,
            )
        done = {id(it) for it, ok in zip(decided, published.stored, strict=True) if ok}
        for it in items:
            if id(it) in done:
                await it.msg.ack()
                self.counters.acks += 1
        await self._nak(it.msg for it in items if id(it) not in done)

    async def _not_yet_published(self, record: LedgerRecord, outs: list[Output]) -> list[Output]:
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
