"""Audit the ledger: every chain complete, linked, in order, and signed where it says so.

:class:`Auditor` is fed the ledger stream's messages in stream order and checks, for each
gateway's chain (see :mod:`bus_guard.ledger`):

* the chain starts at seq 0 and goes up by one, record after record, in stream order: a gap
  is a deletion or truncation, a repeat or step back is a reordering, a replay or a fork;
* each record's ``prev`` is the hash of the exact bytes of the chain's previous record: a
  mismatch means that record (or this one) was modified, or records were reordered;
* ``chain_start`` and ``checkpoint`` records carry a valid signature by a key of the JWKS
  over their own fields; after a ``final`` checkpoint, only a ``chain_start`` may follow;
* every message is a well-formed record on the subject its kind and id say;
* a decision id appears once, and an intent (principal + intent id) has one decision
  besides ``replay`` denials;

and, for the stream, that no message is missing between the first and the last (JetStream
deletes leave gaps in the stream sequence).

What it cannot see: the tail of a chain after its last checkpoint can be cut off without a
trace while the gateway runs (or after it crashed) -- at most N records or T seconds, the
checkpoint settings. A restart pins it (the next ``chain_start`` names the last record), a
clean shutdown seals it (``final``), and ``require_sealed`` makes any open chain a problem.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import msgspec

from bus_guard.ledger._records import (
    CHAIN_START,
    CHECKPOINT,
    DECISION,
    LedgerRecord,
    Stored,
    check_signature,
    decode_record,
    record_hash,
)
from bus_guard.subjects import LedgerSubjects
from bus_guard.verify import Jwks

__all__ = ("AuditReport", "Auditor", "ChainSummary", "Problem", "audit")

_REPLAY: Final = "replay"


@dataclass(frozen=True, slots=True)
class Problem:
    stream_seq: int
    gateway: str
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"gateway {self.gateway} seq {self.seq}" if self.seq is not None else "stream"
        if self.seq is None and self.gateway:
            where = f"gateway {self.gateway}"
        return f"{where} (stream seq {self.stream_seq}): {self.message}"


@dataclass(frozen=True, slots=True)
class ChainSummary:
    gateway: str
    first_seq: int
    last_seq: int
    records: int
    decisions: int
    last_checkpoint_seq: int | None
    sealed: bool

    def __str__(self) -> str:
        state = (
            f"sealed at seq {self.last_seq}"
            if self.sealed
            else f"open: {self.last_seq - (self.last_checkpoint_seq or -1)} record(s) after "
            + (
                f"the checkpoint at seq {self.last_checkpoint_seq}"
                if self.last_checkpoint_seq is not None
                else "the start, no checkpoint yet"
            )
        )
        return (
            f"{self.gateway}: seq {self.first_seq}..{self.last_seq}, "
            f"{self.decisions} decision(s), {state}"
        )


@dataclass(frozen=True, slots=True)
class AuditReport:
    messages: int
    chains: tuple[ChainSummary, ...]
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(slots=True)
class _Chain:
    gateway: str
    first_seq: int
    last_seq: int = -1
    last_hash: str = ""
    last_stream_seq: int = 0
    records: int = 0
    decisions: int = 0
    last_checkpoint_seq: int | None = None
    final: bool = False
    broken: bool = False
    gaps: dict[int, int] = field(default_factory=dict)  # missing seq -> index of its problem


@dataclass(slots=True)
class Auditor:
    """Checks ledger messages fed in stream order; :meth:`finish` reports."""

    prefix: str
    jwks: Jwks
    require_sealed: bool = False
    _chains: dict[str, _Chain] = field(default_factory=dict)
    _problems: list[Problem] = field(default_factory=list)
    _decisions: dict[str, int] = field(default_factory=dict)
    _intents: dict[tuple[str, str], str] = field(default_factory=dict)
    _next_stream_seq: int = 1
    _messages: int = 0
    _subject_re: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        # The inverse of LedgerSubjects.chain / .decision(id): gateway, chain?, decision id.
        ledger = LedgerSubjects(self.prefix, "")
        gateway, decision_id = r"([A-Za-z0-9_-]{1,64})", r"([0-9A-Z]{26})"
        chain, decision = re.escape(ledger.CHAIN), re.escape(ledger.DECISION)
        self._subject_re = re.compile(
            rf"{re.escape(ledger.root)}\.{gateway}\.(?:({chain})|{decision}\.{decision_id})"
        )

    def _problem(self, stored: Stored, gateway: str, seq: int | None, message: str) -> None:
        self._problems.append(Problem(stored.seq, gateway, seq, message))

    def feed(self, stored: Stored) -> None:
        self._messages += 1
        if stored.seq > self._next_stream_seq:
            first, last = self._next_stream_seq, stored.seq - 1
            gone = f"{first}" if first == last else f"{first}..{last}"
            self._problem(stored, "", None, f"stream message(s) {gone} deleted or purged")
        self._next_stream_seq = stored.seq + 1
        m = self._subject_re.fullmatch(stored.subject)
        if m is None:
            self._problem(stored, "", None, f"unexpected subject {stored.subject!r}")
            return
        gateway, is_chain, subject_id = m.group(1), m.group(2) is not None, m.group(3)
        try:
            record = decode_record(stored.data)
        except msgspec.DecodeError as exc:
            self._problem(stored, gateway, None, f"not a ledger record (modified?): {exc}")
            self._advance_blind(gateway, stored)
            return
        if record.gateway != gateway:
            self._problem(stored, gateway, record.seq, f"record names gateway {record.gateway!r}")
        if is_chain != (record.kind in (CHAIN_START, CHECKPOINT)) or (
            not is_chain and (record.kind != DECISION or record.decision_id != subject_id)
        ):
            self._problem(stored, gateway, record.seq, "record kind or id does not match subject")
        self._link(gateway, stored, record)
        if record.kind == DECISION:
            self._decision(stored, record)
        elif (why := check_signature(record, self.jwks)) is not None:
            self._problem(stored, gateway, record.seq, f"{record.kind}: {why}")

    def _advance_blind(self, gateway: str, stored: Stored) -> None:
        chain = self._chains.get(gateway)
        if chain is not None:  # assume it took the next slot; the next link says the rest
            chain.last_seq += 1
            chain.last_hash = record_hash(stored.data)
            chain.broken = True

    def _link(self, gateway: str, stored: Stored, record: LedgerRecord) -> None:
        chain = self._chains.get(gateway)
        seq = record.seq
        if chain is None:
            chain = self._chains[gateway] = _Chain(gateway, first_seq=seq)
            if seq != 0 or record.prev:
                self._problem(
                    stored, gateway, seq, f"the chain starts at seq {seq}: earlier records missing"
                )
                chain.broken = True
        else:
            expected = chain.last_seq + 1
            if seq > expected:
                gone = f"{expected}" if seq == expected + 1 else f"{expected}..{seq - 1}"
                self._problem(stored, gateway, seq, f"seq {gone} missing (deleted or truncated)")
                chain.gaps.update(dict.fromkeys(range(expected, seq), len(self._problems) - 1))
                chain.broken = True
            elif seq < expected:
                gap = chain.gaps.pop(seq, None)
                if gap is not None:  # not missing after all: stored later, out of order
                    earlier = self._problems[gap]
                    self._problems[gap] = Problem(
                        earlier.stream_seq,
                        earlier.gateway,
                        earlier.seq,
                        f"seq {seq} is out of place (reordered): it is stored later, at "
                        f"stream seq {stored.seq}",
                    )
                self._problem(
                    stored,
                    gateway,
                    seq,
                    f"seq {seq} after seq {chain.last_seq}: reordered, replayed or forked",
                )
                chain.broken = True
            elif record.prev != chain.last_hash:
                self._problem(
                    stored,
                    gateway,
                    seq,
                    f"does not follow seq {chain.last_seq} (stream seq {chain.last_stream_seq}):"
                    " one of the two was modified, or records were reordered",
                )
                chain.broken = True
            if chain.final and record.kind != CHAIN_START:
                self._problem(stored, gateway, seq, "a record after the final checkpoint")
        chain.last_seq = seq
        chain.last_hash = record_hash(stored.data)
        chain.last_stream_seq = stored.seq
        chain.records += 1
        chain.final = record.kind == CHECKPOINT and record.final
        if record.kind == DECISION:
            chain.decisions += 1
        elif record.kind == CHECKPOINT:
            chain.last_checkpoint_seq = seq

    def _decision(self, stored: Stored, record: LedgerRecord) -> None:
        earlier = self._decisions.setdefault(record.decision_id, stored.seq)
        if earlier != stored.seq:
            self._problem(
                stored,
                record.gateway,
                record.seq,
                f"decision {record.decision_id} recorded twice (first at stream seq {earlier})",
            )
        # Votes on a hold and its resolution name the held intent too (``hold`` is set):
        # they are decisions about the hold, not further decisions of the intent.
        if record.intent_id and record.reason != _REPLAY and not record.hold:
            key = (record.principal, record.intent_id)
            first = self._intents.setdefault(key, record.decision_id)
            if first != record.decision_id:
                self._problem(
                    stored,
                    record.gateway,
                    record.seq,
                    f"intent {record.principal}/{record.intent_id} decided twice "
                    f"({first} and {record.decision_id})",
                )

    def finish(self, *, last_stream_seq: int = 0) -> AuditReport:
        if last_stream_seq >= self._next_stream_seq:
            tail = Stored(last_stream_seq, "", b"")
            gone = f"{self._next_stream_seq}..{last_stream_seq}"
            self._problem(tail, "", None, f"stream message(s) {gone} deleted")
        chains = []
        for chain in self._chains.values():
            summary = ChainSummary(
                gateway=chain.gateway,
                first_seq=chain.first_seq,
                last_seq=chain.last_seq,
                records=chain.records,
                decisions=chain.decisions,
                last_checkpoint_seq=chain.last_checkpoint_seq,
                sealed=chain.final,
            )
            chains.append(summary)
            if self.require_sealed and not chain.final:
                tail = Stored(chain.last_stream_seq, "", b"")
                self._problem(
                    tail,
                    chain.gateway,
                    chain.last_seq,
                    "not sealed by a final checkpoint: truncated, or the gateway is running "
                    "or crashed",
                )
        problems = sorted(self._problems, key=lambda p: p.stream_seq)
        return AuditReport(self._messages, tuple(chains), tuple(problems))


def audit(
    messages: Iterable[Stored], *, prefix: str, jwks: Jwks, require_sealed: bool = False
) -> AuditReport:
    """Audit a whole ledger given as stored messages in stream order (pure)."""
    auditor = Auditor(prefix, jwks, require_sealed=require_sealed)
    for stored in messages:
        auditor.feed(stored)
    return auditor.finish()
