"""Stream mode's work items: one pulled intent's states on its way to a decision that stands.

Each state is an immutable value; a stage takes items in one state and returns them in
the next, so following one intent means reading one stage after the other:

``Pulled`` (decoded, keyed) → ``Decided`` (a decision to record) → ``Recorded`` (the
decision that stands: recorded here, or *adopted* from the ledger) → outputs, ack.
``Undecided`` at any step: nothing is recorded for it this time; it is nak'd and comes back.
"""

from __future__ import annotations

from typing import NamedTuple

from nats.aio.msg import Msg

from bus_guard.decision import Decision, Lineage, intent_decision_id, message_decision_id
from bus_guard.intent import Intent
from bus_guard.ledger import LedgerRecord
from bus_guard.pipeline import Decoded, decode_message
from bus_guard.settings import Settings

__all__ = (
    "Decided",
    "Item",
    "Pulled",
    "Recorded",
    "Undecided",
    "intake_of",
    "pulled",
    "stored_at",
)


class Pulled(NamedTuple):
    """A pulled intent message, decoded, with the decision id it is recorded under."""

    msg: Msg
    intake: str  # "<stream>/<stream seq>/<stored at, ns>": which stored message this is
    delivered: int
    decoded: Decoded
    decision_id: str
    keyed: bool  # the id derives from principal + intent id (else from the message)


class Decided(NamedTuple):
    """A decision to record for *pulled*: not in the ledger yet."""

    pulled: Pulled
    decision_id: str  # the pulled one, or the message's own for a replay
    decision: Decision
    lineage: Lineage | None = None
    first_decision: str = ""  # replay: the decision the intent id already had


class Recorded(NamedTuple):
    """The decision that stands for *pulled*: its ledger record."""

    pulled: Pulled
    record: LedgerRecord
    adopted: bool  # recorded before (a redelivery), not by this attempt


class Undecided(NamedTuple):
    """Nothing could be recorded for *pulled* this time: nak it, it comes back (after
    *retry_in_s*; 0: the usual nak delay)."""

    pulled: Pulled
    why: str
    retry_in_s: float = 0.0  # a child waiting for its parent: the lineage nak delay


Item = Pulled | Decided | Recorded | Undecided


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


def stored_at(intake: str) -> float:
    """When the stream stored the message *intake* names (unix s; 0.0 if it does not say)."""
    try:
        return int(intake.rpartition("/")[2]) / 1e9
    except ValueError:
        return 0.0


def pulled(msg: Msg, settings: Settings) -> Pulled:
    """Decode *msg* and derive its decision id: from principal + intent id when it decodes
    to an intent, else from the stored message itself (malformed, bad subject)."""
    s = settings
    intake, delivered = intake_of(msg)
    decoded = decode_message(msg.subject, msg.data, msg.headers, s)
    subject, intent = decoded
    if subject is not None and isinstance(intent, Intent):
        return Pulled(
            msg,
            intake,
            delivered,
            decoded,
            intent_decision_id(s.prefix, subject.principal, intent.id),
            True,
        )
    return Pulled(msg, intake, delivered, decoded, message_decision_id(s.prefix, intake), False)
