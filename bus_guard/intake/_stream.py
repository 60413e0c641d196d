"""Stream mode: pull intents from JetStream, decide each once, record, publish, then ack.

For every pulled batch (SPEC §7, SCENARIOS S3/S4/S8), each intent goes through the states
of :mod:`bus_guard.intake._work`:

1. **pulled**: decode each intent and derive its decision id: from principal + intent id,
   or from the stored message when there is no intent to key on;
2. **resolved**: look up in the ledger the decision of every intent that may have one
   already (redeliveries, ids decided here recently, repeats within the batch): a
   redelivered intent *adopts* the decision recorded for it (``Recorded``); a new message
   reusing an intent id is a ``replay`` denial (``Decided``);
3. **decided**: look up the parents of the rest (lineage, :mod:`bus_guard.intake._parents`:
   only verified records count) and judge them (the pure pipeline); a child whose parent
   is not decided yet or held *waits* (``Undecided``, nak'd with ``lineage_nak_delay_s``)
   until ``lineage_wait_s`` after it was stored, at most ``lineage_max_waiting`` at once;
   a poison intent delivered more than ``max_deliveries`` times (plus the deliveries a
   child may spend waiting) is denied;
4. **recorded**: commit their ledger records, chained, as one atomic batch whose records
   can each be created only once. Refused: find which ids are taken, adopt or deny
   ``replay``, commit the rest again. In doubt (timeout, lost connection): commit the
   identical batch again until the answer is definite; a gateway that cannot find out
   stops (:class:`~bus_guard.intake._recorder.ChainInDoubt`);
5. publish the outputs (:func:`~bus_guard.pipeline.outputs_of`, ``Nats-Msg-Id`` = decision
   id) and wait for every PubAck; ack the intents whose outputs are all stored, ``nak`` the
   rest (``Undecided`` ones too) with a delay.

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
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import anyio
import msgspec
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_guard.decision import Decision, Lineage, Reason, message_decision_id
from bus_guard.intake._jetstream import Puller
from bus_guard.intake._lease import Lease, LeaseLost
from bus_guard.intake._limits import Limited, LimitStore
from bus_guard.intake._parents import Parent
from bus_guard.intake._publisher import OutputPublisher, not_yet_published
from bus_guard.intake._recorder import ChainInDoubt, Recorder
from bus_guard.intake._retain import IntentRetainer, retain_batch
from bus_guard.intake._work import Decided, Item, Pulled, Recorded, Undecided, pulled, stored_at
from bus_guard.intent import Intent
from bus_guard.ledger import LedgerRecord, lineage_of
from bus_guard.ledger._records import CheckpointSigner
from bus_guard.pipeline import Output, PolicySetLike, deny, judge, outputs_of, unsigned_allow
from bus_guard.settings import Settings
from bus_guard.signing import Signer
from bus_guard.verify import Jwks, load_jwks, payload_digest

__all__ = ("IntakeCounters", "StreamIntake")

log = logging.getLogger(__name__)

_RESOLVE_ROUNDS: Final = 4


@dataclass(slots=True)
class IntakeCounters:
    received: int = 0
    batches: int = 0  # pulled batches decided (received / batches: their mean size)
    adopted: int = 0
    naks: int = 0
    acks: int = 0
    late_adoptions: int = 0
    duplicate_outputs: int = 0
    internal_errors: int = 0  # recorded allows without artifact: denied, not forwarded
    undeliverable: int = 0  # outputs refused for good max_deliveries times: terminated
    lineage_waits: int = 0  # naks of children waiting for a parent not decided yet or held


@dataclass(slots=True)
class _Batch:
    """One pulled batch on its way through the stages. ``items`` is replaced, item by
    item, by each stage (the items themselves are immutable); ``repeats`` are the indices
    of items whose decision id an earlier item of the batch has: they are resolved after
    the first ones are recorded (then they are replays)."""

    items: list[Item]
    repeats: frozenset[int]
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
    # The keys whose artifacts make a parent's ledger record count (the gateway's JWKS,
    # rotated keys included); the signer's own key is always one of them.
    trusted_keys: Jwks | None = None
    # Retains every decided intent's bytes with its outputs (README, "Replay"); None: off.
    retainer: IntentRetainer | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self._s = s.stream
        self._js = self.nc.jetstream(timeout=self._s.publish_timeout_s)
        self._streams = s.subjects.streams
        self.recorder = Recorder(
            self.nc, s, self.signer, self.checkpoint_signer, self.clock, self._trusted()
        )
        self.parents = self.recorder.parents
        self.lease = Lease(
            self._js,
            self._streams.gateways_bucket,
            s.gateway_id,
            self._s.lease_s,
            self.recorder.epoch,
        )
        self.recorder.fence = self.lease.check
        # Children waiting for a parent: decision id -> when the wait ends (stored + wait).
        self.waiting: dict[str, float] = {}
        # Deliveries a child may spend waiting: one per lineage_nak_delay_s (each nak delays
        # the next one at least that long), and the first.
        self._wait_deliveries = math.ceil(self._s.lineage_wait_s / self._s.lineage_nak_delay_s) + 1
        self.publisher = OutputPublisher(
            self.nc,
            self._js,
            name=f"{s.gateway_id}-{self.recorder.epoch}",
            timeout_s=self._s.publish_timeout_s,
        )
        self.limits = LimitStore(
            self._js,
            self._streams.limits_bucket,
            timeout_s=self._s.publish_timeout_s,
            replicas=self._s.replicas,
            ready=True,  # preflight (the gateway's start) created or checked it
        )
        self.puller = Puller(
            self.nc,
            self._streams.intake,
            s.queue,
            batch=self._s.fetch_batch,
            expires_s=self._s.fetch_timeout_s,
            heartbeat_s=self._s.heartbeat_s,
            subject_prefix=s.subjects.wildcard("in")[:-1],
            quantum=self._s.fair_quantum,
            read_ahead=self._s.read_ahead if self._s.fair_quantum else self._s.fetch_batch,
        )

    def _trusted(self) -> Jwks:
        own = load_jwks(self.signer.jwks())
        if self.trusted_keys is None:
            return own
        if self.signer.kid not in self.trusted_keys:
            log.warning(
                "the trusted JWKS does not hold the signing key %s: added (executors verifying "
                "with that JWKS refuse this gateway's artifacts)",
                self.signer.kid,
            )
            return self.trusted_keys.replace(own.entries[0])
        return self.trusted_keys

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Hold the gateway id's lease, continue its chain in the ledger, start pulling."""
        await self.lease.acquire()
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
        # Unbuffered: a batch is handed on only when the next stage takes it, so at most
        # one decided batch waits ahead of each stage (an intent arriving during a flood
        # waits behind one batch, not two: SCENARIOS S13); the stages still overlap.
        to_record, recording = anyio.create_memory_object_stream[_Batch](0)
        to_publish, publishing = anyio.create_memory_object_stream[_Batch](0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._record_stage, recording, to_publish)
            tg.start_soon(self._output_stage, publishing)
            keeping = anyio.CancelScope()

            async def keep_lease() -> None:
                with keeping:
                    await self.lease.keep()  # LeaseLost: stop everything, loudly

            tg.start_soon(keep_lease)
            async with to_record:
                while not stop.is_set():
                    msgs = await self.puller.pull(self._s.fetch_batch, self._s.fetch_timeout_s)
                    if msgs:
                        batch = await self._decide_stage(msgs)
                        if batch is not None:
                            await to_record.send(batch)
            keeping.cancel()

    async def finish(self) -> None:
        """The final checkpoint: the chain is sealed until this gateway starts again."""
        await self.puller.stop()
        await self.recorder.checkpoint(final=True)
        await self.lease.release()

    # -- the stages ----------------------------------------------------------------------

    async def _decide_stage(self, msgs: list[Msg]) -> _Batch | None:
        """Decode, find what is decided already, judge the rest."""
        self.counters.received += len(msgs)
        self.counters.batches += 1
        try:
            items: list[Item] = [pulled(m, self.settings) for m in msgs]
            seen: set[str] = set()
            repeats, check = set(), []
            for i, it in enumerate(items):
                assert isinstance(it, Pulled)
                if it.decision_id in seen:
                    repeats.add(i)
                    continue
                seen.add(it.decision_id)
                if it.delivered > 1 or self.recorder.seen(it.decision_id):
                    check.append(i)
            batch = _Batch(items, frozenset(repeats), self.policies(), self.clock())
            await self._resolve(batch, check)
            await self._judge(batch, [i for i in range(len(items)) if i not in batch.repeats])
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
                    except (ChainInDoubt, LeaseLost):
                        raise
                    except Exception:
                        log.exception("recording %d intents failed", len(batch.items))
                        batch.items = [
                            it if isinstance(it, Recorded | Undecided) else _undecided(it, "ledger")
                            for it in batch.items
                        ]
                    await to_publish.send(batch)
                await self.recorder.checkpoint(due_only=True)

    async def _record(self, batch: _Batch) -> None:
        firsts = [i for i in range(len(batch.items)) if i not in batch.repeats]
        await self._commit(batch, firsts)
        if batch.repeats:  # after the first of each id is committed: they are replays now
            repeats = sorted(batch.repeats)
            await self._resolve(batch, repeats)
            await self._judge(batch, repeats)
            await self._commit(batch, repeats)

    async def _output_stage(self, batches: ObjectReceiveStream[_Batch]) -> None:
        async with batches:
            async for batch in batches:
                try:
                    await self._publish_and_ack(batch)
                except Exception:
                    log.exception("publishing for %d intents failed", len(batch.items))
                    await self._nak(_msg(it) for it in batch.items)
                adopted = sum(isinstance(it, Recorded) and it.adopted for it in batch.items)
                if adopted:
                    log.info("%d redelivered intents adopted their recorded decisions", adopted)

    # -- deciding once -------------------------------------------------------------------

    async def _resolve(self, batch: _Batch, indices: Sequence[int]) -> int:
        """Look up the decision id of each item at *indices* that has no standing decision
        yet: adopt it, turn it into a replay, or leave it. Returns how many changed."""
        items, changed = batch.items, 0
        pending = [i for i in indices if isinstance(items[i], Pulled | Decided)]
        for _ in range(2):  # a replay's own id may be taken too (a redelivered replay)
            if not pending:
                break
            open_ = [(i, it) for i in pending if isinstance(it := items[i], Pulled | Decided)]
            ids = [it.decision_id for _, it in open_]
            found = await asyncio.gather(
                *(self.recorder.lookup(d) for d in ids), return_exceptions=True
            )
            again = []
            for (i, it), decision_id, result in zip(open_, ids, found, strict=True):
                p = it if isinstance(it, Pulled) else it.pulled
                if isinstance(result, BaseException):
                    log.warning("ledger lookup of %s failed: %s", decision_id, result)
                    items[i] = Undecided(p, f"ledger lookup failed: {result}")
                elif result is None:
                    continue
                elif result.intake == p.intake:
                    items[i] = Recorded(p, result, adopted=True)
                elif decision_id == p.decision_id and p.keyed:
                    items[i] = self._replay(p, result, batch.policies)
                    again.append(i)
                else:  # a message's own id taken by another message: cannot happen
                    log.error("decision %s is not %s's", decision_id, p.intake)
                    items[i] = Undecided(p, f"decision {decision_id} belongs to another message")
                changed += 1
            pending = again
        return changed

    def _replay(self, p: Pulled, first: LedgerRecord, policies: PolicySetLike) -> Decided:
        """*p* reuses the intent id that *first* decided: deny it ``replay``, keyed by its
        own message (so that a redelivery of it adopts this denial)."""
        same = first.payload_sha256 == payload_digest(p.msg.data)
        _, intent = p.decoded
        intent_id = intent.id if isinstance(intent, Intent) else ""
        decision = deny(
            Reason.REPLAY,
            f"intent id {intent_id!r} was already decided: {first.decision_id} "
            f"({first.effect}); this message has {'the same' if same else 'different'} bytes",
            policies,
        )
        own_id = message_decision_id(self.settings.prefix, p.intake)
        return Decided(p, own_id, decision, first_decision=first.decision_id)

    async def _judge(self, batch: _Batch, indices: Sequence[int]) -> None:
        """Decide every item at *indices* that is still only pulled (lineage first)."""
        items = batch.items
        todo = [i for i in indices if isinstance(items[i], Pulled)]
        pulled_ = [p for i in todo if isinstance(p := items[i], Pulled)]
        lineages = await self._lineage(pulled_, batch.now)
        for i, lineage in zip(todo, lineages, strict=True):
            p = items[i]
            assert isinstance(p, Pulled)
            if isinstance(lineage, Undecided):
                items[i] = lineage
                continue
            items[i] = Decided(p, p.decision_id, self._decide(p, batch, lineage), lineage)
        await self._spend(batch, todo)

    async def _spend(self, batch: _Batch, indices: Sequence[int]) -> None:
        """Spend the limits of every allow at *indices* that has some, in one round of
        the limit store for the batch: each becomes the decision that stands (the allow,
        or rate_limited, budget_exceeded, malformed, internal_error)."""
        items = batch.items
        todo = [i for i in indices if isinstance(it := items[i], Decided) and it.decision.limits]
        if not todo:
            return
        asks = []
        for i in todo:
            it = items[i]
            assert isinstance(it, Decided)
            subject, intent = it.pulled.decoded
            assert subject is not None and isinstance(intent, Intent)  # an allow has both
            fresh = it.pulled.delivered == 1
            asks.append(Limited(it.decision_id, it.decision, subject, intent, it.lineage, fresh))
        settled = await self.limits.settle(asks, batch.policies)
        for i, decision in zip(todo, settled, strict=True):
            it = items[i]
            assert isinstance(it, Decided)
            items[i] = it._replace(decision=decision)

    async def _lineage(self, todo: list[Pulled], now: float) -> list[Lineage | Undecided | None]:
        """Per item: its lineage (``None`` for a root), or ``Undecided``: its parents could
        not be looked up, or it waits for one."""
        wanted = {
            parent
            for _, intent in (p.decoded for p in todo)
            if isinstance(intent, Intent)
            for parent in intent.parents
        }
        if not wanted:
            return [None] * len(todo)
        ids = sorted(wanted)
        found = await asyncio.gather(*(self.parents.get(p) for p in ids), return_exceptions=True)
        failed = any(isinstance(r, BaseException) for r in found)
        if failed:
            log.warning("lineage lookup failed; intents with parents will be redelivered")
        parents = {p: r for p, r in zip(ids, found, strict=True) if isinstance(r, Parent)}
        if len(self.waiting) >= self._s.lineage_max_waiting:  # at most once per batch
            self.waiting = {d: end for d, end in self.waiting.items() if end > now}
        out: list[Lineage | Undecided | None] = []
        for p in todo:
            subject, intent = p.decoded
            if not isinstance(intent, Intent) or subject is None or not intent.parents:
                out.append(None)
            elif failed:
                out.append(Undecided(p, "lineage lookup failed"))
            else:
                out.append(self._place(p, subject.principal, intent.parents, parents, now))
        return out

    def _place(
        self,
        p: Pulled,
        principal: str,
        names: Sequence[str],
        parents: Mapping[str, Parent],
        now: float,
    ) -> Lineage | Undecided:
        """The lineage of *p*, a child of *names*; ``Undecided`` while it waits for a parent
        that is not decided yet or held, within the bounds of time and count."""
        s = self._s
        records = {n: parents[n].record for n in names}
        pending = [n for n in names if parents[n].pending]
        final_no = [n for n in names if not parents[n].pending and not _allows(parents[n])]
        if pending and not final_no:  # a denied or unknowable parent: no use waiting
            first = pending[0]
            state = "held" if records[first] is not None else "unknown"
            ends = stored_at(p.intake) + s.lineage_wait_s
            if now >= ends or p.delivered > self._max_deliveries(p):
                self.waiting.pop(p.decision_id, None)
                return Lineage(
                    violation=f"parent {first} is still {state} after {s.lineage_wait_s:g} s"
                )
            if p.decision_id not in self.waiting:
                if len(self.waiting) >= s.lineage_max_waiting:
                    return Lineage(
                        violation=f"parent {first} is {state}, and {len(self.waiting)} "
                        "intents wait for parents already"
                    )
                self.waiting[p.decision_id] = ends
            return Undecided(p, f"waits for parent {first} ({state})", s.lineage_nak_delay_s)
        self.waiting.pop(p.decision_id, None)
        # The first parent that cannot count is the one lineage_of names.
        ordered = sorted(names, key=lambda n: n not in final_no) if final_no else names
        return lineage_of(principal, ordered, records, max_depth=s.max_lineage_depth)

    def _max_deliveries(self, p: Pulled) -> int:
        """The poison bound of *p*: a child may spend deliveries waiting for its parents."""
        _, intent = p.decoded
        waits = isinstance(intent, Intent) and bool(intent.parents)
        return self._s.max_deliveries + (self._wait_deliveries if waits else 0)

    def _decide(self, p: Pulled, batch: _Batch, lineage: Lineage | None) -> Decision:
        if p.delivered > self._max_deliveries(p):  # poison: bounded attempts
            return deny(
                Reason.INTERNAL_ERROR,
                f"not decided after {p.delivered - 1} deliveries (poison intent)",
                batch.policies,
            )
        return judge(
            p.msg.subject,
            p.decoded,
            batch.policies,
            now=batch.now,
            checks=self.settings.checks,
            lineage=lineage,
        )

    async def _commit(self, batch: _Batch, indices: Sequence[int]) -> None:
        """Record the decided items at *indices*; refused, resolve the taken ids and
        record the rest again (a bounded number of rounds, then they come back)."""
        items = batch.items
        for _ in range(_RESOLVE_ROUNDS):
            todo = [i for i in indices if isinstance(items[i], Decided)]
            if not todo:
                return
            decided = [it for i in todo if isinstance(it := items[i], Decided)]
            result = await self.recorder.record(decided, batch.now)
            if isinstance(result, list):
                for i, it, record in zip(todo, decided, result, strict=True):
                    items[i] = Recorded(it.pulled, record, adopted=False)
                    self.on_decided(record)
                return
            taken = await self._resolve(batch, todo)
            gateway = self.settings.gateway_id
            for i in todo:
                it = items[i]
                if isinstance(it, Recorded) and it.adopted and it.record.gateway == gateway:
                    # Stored by this very commit, record by record, before the refused one
                    # (a record of an earlier life would have been found before judging).
                    items[i] = it._replace(adopted=False)
                    self.on_decided(it.record)
            if not taken:
                log.error("ledger refused %d records with no id taken: %s", len(todo), result)
                break
            log.info("ledger refused a commit: %d decision ids taken (adopt / replay)", taken)
        for i in indices:
            if isinstance(items[i], Decided):
                items[i] = _undecided(items[i], "ledger refused the records")

    # -- outputs and acks ----------------------------------------------------------------

    async def _publish_and_ack(self, batch: _Batch) -> None:
        s = self.settings
        decided: list[Recorded] = []
        groups: list[list[Output]] = []
        retained: list[Output] = []  # the decided intents' bytes (README, "Replay")
        for it in batch.items:
            if not isinstance(it, Recorded):
                continue
            record = it.record
            if unsigned_allow(record):  # never forwarded: outputs_of denies it instead
                log.error(
                    "decision %s is an allow without artifact: denied internal_error, not "
                    "forwarded",
                    record.decision_id,
                )
                self.counters.internal_errors += 1
            # Operators see such a denial on the deny stream (same decision id, so
            # de-duplicated like any output); the ledger keeps what was recorded.
            outs = outputs_of(
                record,
                it.pulled.msg.data,
                it.pulled.msg.headers,
                subjects=s.subjects,
                deny_payload_bytes=s.deny_payload_bytes,
                max_payload_bytes=s.max_payload_bytes,
            )
            if it.adopted:
                self.counters.adopted += 1
                if batch.now - record.ts > self._s.retry_horizon_s:
                    outs = await self._not_yet_published(record, outs)
            if self.retainer is not None:  # stored with the outputs, before the ack
                data, headers = it.pulled.msg.data, it.pulled.msg.headers
                out = self.retainer.retained(record, data, headers, batch.policies)
                if out is not None:
                    retained.append(out)
            decided.append(it)
            groups.append(outs)
        published, kept = await asyncio.gather(
            self.publisher.publish(groups),
            retain_batch(self.nc, self._js, retained, timeout_s=self._s.publish_timeout_s),
        )
        if not kept:  # not retained: not acked either (they come back and adopt)
            published = replace(published, stored=[False] * len(decided))
        if published.duplicates:  # published before a crash or a lost PubAck: stored once
            self.counters.duplicate_outputs += published.duplicates
            log.info(
                "%d outputs were already stored (de-duplicated by decision id)",
                published.duplicates,
            )
        done = {id(it) for it, ok in zip(decided, published.stored, strict=True) if ok}
        # Outputs the server refuses for good (not a timeout: an outage only delays) can
        # never be stored: after max_deliveries such an intent ends here, so that no
        # message loops forever, adopted decisions included.
        undeliverable = {
            id(it): it
            for it, ok, refused in zip(decided, published.stored, published.refused, strict=True)
            if not ok and refused and it.pulled.delivered >= self._max_deliveries(it.pulled)
        }
        for it in batch.items:
            if id(it) in done:
                await _msg(it).ack()
                self.counters.acks += 1
        for it in undeliverable.values():
            await self._give_up(it)
        for it in batch.items:
            if id(it) in done or id(it) in undeliverable:
                continue
            if isinstance(it, Undecided) and it.retry_in_s:  # a child waiting for a parent
                self.counters.lineage_waits += 1
                await self._nak([_msg(it)], delay_s=it.retry_in_s)
            else:
                await self._nak([_msg(it)])

    async def _give_up(self, it: Recorded) -> None:
        """End an intent whose recorded decision's outputs the server keeps refusing: its
        denial goes to the deny stream (best effort) and the message is terminated."""
        record, s = it.record, self.settings
        self.counters.undeliverable += 1
        log.error(
            "decision %s (%s): outputs refused %d times; the intent is terminated, not forwarded",
            record.decision_id,
            record.effect,
            it.pulled.delivered,
        )
        denial = msgspec.structs.replace(
            record,
            decision_id=f"{record.decision_id}-undeliverable",
            effect="deny",
            reason=Reason.INTERNAL_ERROR.value,
            message=f"its {record.effect} ({record.decision_id}) could not be published: "
            f"the server refused its outputs {it.pulled.delivered} times",
            would_deny=False,
            artifact="",
        )
        outs = outputs_of(
            denial,
            it.pulled.msg.data,
            None,
            subjects=s.subjects,
            deny_payload_bytes=s.deny_payload_bytes,
            max_payload_bytes=s.max_payload_bytes,
        )
        try:
            await self.publisher.publish([outs])
        except Exception as exc:
            log.warning("could not publish the denial of %s: %s", record.decision_id, exc)
        try:
            await it.pulled.msg.term()
        except Exception as exc:  # it comes back after the ack wait, and ends here again
            log.warning("term failed: %s", exc)

    async def _not_yet_published(self, record: LedgerRecord, outs: list[Output]) -> list[Output]:
        """Beyond the retry horizon de-duplication cannot tell: search the exec stream for
        a copy stored since the decision (allowing a minute of clock difference)."""
        self.counters.late_adoptions += 1
        return await not_yet_published(
            self.nc, self._streams.exec, record.decision_id, record.ts, outs, now=self.clock()
        )

    async def _nak(self, msgs: Iterable[Msg], delay_s: float | None = None) -> None:
        delay = self._s.nak_delay_s if delay_s is None else delay_s
        for msg in msgs:
            try:
                await msg.nak(delay=delay)
                self.counters.naks += 1
            except Exception as exc:  # it comes back after the ack wait anyway
                log.warning("nak failed: %s", exc)


def _msg(it: Item) -> Msg:
    return it.msg if isinstance(it, Pulled) else it.pulled.msg


def _allows(parent: Parent) -> bool:
    return parent.record is not None and parent.record.effect == "allow"


def _undecided(it: Item, why: str) -> Undecided:
    return Undecided(it if isinstance(it, Pulled) else it.pulled, why)
