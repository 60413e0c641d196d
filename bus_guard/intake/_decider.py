"""Deciding pulled intents: decode, key, look up parents, evaluate (the pure core).

:meth:`Decider.prepare` turns a pulled message into a :class:`~bus_guard.intake._recorder.Pending`
with its decision id: derived from principal + intent id when the message decodes to an
intent, else from the stored message itself (malformed, bad subject). :meth:`evaluate`
looks up the parents of a batch's intents in the ledger (lineage) and decides each one.
:meth:`replay` turns an intent whose id was decided before into a ``replay`` denial.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from bus_guard.decision import Decision, Reason
from bus_guard.intake._parents import ParentLookup
from bus_guard.intake._recorder import Pending
from bus_guard.intent import Intent, Malformed, decode_intent, parse_subject
from bus_guard.ledger._lineage import lineage_of
from bus_guard.ledger._records import LedgerRecord, intent_decision_id, message_decision_id
from bus_guard.pipeline import PolicySetLike, authorize, deny
from bus_guard.settings import Settings
from bus_guard.signing._signer import payload_digest

__all__ = ("Decider", "intake_of")

log = logging.getLogger(__name__)


def intake_of(msg: Msg) -> tuple[str, int]:
    """``<stream>/<stream seq>/<stored at, ns>`` and the delivery count, from the ack subject.

    Read straight from the JetStream ack subject (``$JS.ACK.<stream>.<consumer>.<delivered>.
    <stream seq>.<consumer seq>.<ns>.<pending>``, or the v2 form with domain and account
    hash first): nats-py's ``msg.metadata`` would also build a datetime and two dataclasses
    per intent. Anything else takes ``msg.metadata``'s path (and its error)."""
    tokens = (msg.reply or "").split(".")
    if tokens[0] == "$JS" and tokens[1:2] == ["ACK"]:
        if len(tokens) == 9:
            return f"{tokens[2]}/{int(tokens[5])}/{tokens[7]}", int(tokens[4])
        if len(tokens) >= 11:
            return f"{tokens[4]}/{int(tokens[7])}/{tokens[9]}", int(tokens[6])
    md = msg.metadata
    stored_ns = tokens[7] if len(tokens) == 9 else tokens[9]
    return f"{md.stream}/{md.sequence.stream}/{stored_ns}", md.num_delivered


class Decider:
    def __init__(self, settings: Settings, parents: ParentLookup) -> None:
        self.settings = settings
        self.parents = parents

    def prepare(self, msg: Msg) -> Pending:
        s = self.settings
        intake, delivered = intake_of(msg)
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

    def replay(self, it: Pending, first: LedgerRecord, policies: PolicySetLike) -> None:
        """*it* reuses the intent id that *first* decided: deny it ``replay``, keyed by its
        own message (so that a redelivery of it adopts this denial)."""
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

    async def evaluate(self, items: list[Pending], policies: PolicySetLike, now: float) -> None:
        """Decide every item still without a decision or a record (lineage first)."""
        todo = [it for it in items if it.decision is None and it.record is None and not it.failed]
        await self._lineage(todo)
        for it in todo:
            if not it.failed:
                it.decision = self._decide(it, policies, now)

    async def _lineage(self, items: list[Pending]) -> None:
        wanted = {p for it in items if isinstance(it.intent, Intent) for p in it.intent.parents}
        if not wanted:
            return
        ids = sorted(wanted)
        found = await asyncio.gather(*(self.parents.get(p) for p in ids), return_exceptions=True)
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
                    max_depth=self.settings.stream.max_lineage_depth,
                )

    def _decide(self, it: Pending, policies: PolicySetLike, now: float) -> Decision:
        if it.delivered > self.settings.stream.max_deliveries:  # poison: bounded attempts
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
            now=now,
            checks=self.settings.checks,
            lineage=it.lineage,
        )
