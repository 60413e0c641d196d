"""``bus-guard ledger verify`` and ``bus-guard lineage``: read the ledger stream, print."""

from __future__ import annotations

import collections
from typing import Final, TextIO

import anyio
import msgspec
from nats.aio.client import Client

from bus_guard.cli._safe import say
from bus_guard.intake._jetstream import read
from bus_guard.ledger._audit import Auditor
from bus_guard.ledger._lineage import render_tree
from bus_guard.ledger._records import LedgerRecord, decode_record
from bus_guard.ledger._witness import LedgerIndex, Witnessed
from bus_guard.subjects import Subjects
from bus_guard.verify import Jwks

__all__ = ("audit_stream", "show")

# Delays before re-reading a ledger that stopped short of its last_seq (about 1.5 s in all).
_CATCH_UP_S: Final = (0.05, 0.15, 0.3, 1.0)


async def audit_stream(
    nc: Client,
    stream: str,
    *,
    prefix: str,
    jwks: Jwks,
    require_sealed: bool,
    out: TextIO,
    witnessed: list[Witnessed] | None = None,
) -> int:
    """``bus-guard ledger verify``: audit the ledger stream (and, given what a witness
    countersigned, check the ledger still holds it), print, 0 if sound else 1."""
    info = await nc.jetstream().stream_info(stream)
    config = info.config
    last = info.state.last_seq
    auditor = Auditor(prefix, jwks, require_sealed=require_sealed)
    index = LedgerIndex()
    everything = Subjects(prefix).ledger().all
    fed = 0  # stream seq of the last record audited
    for attempt in range(len(_CATCH_UP_S) + 1):
        async for stored in read(nc, stream, everything, start_seq=fed + 1):
            if stored.seq > last:
                break  # written after we looked: the next audit covers it
            auditor.feed(stored)
            index.feed(stored)
            fed = stored.seq
        if fed >= last or attempt == len(_CATCH_UP_S):
            break
        # Short of the leader's last_seq: on a replicated ledger a direct get may be
        # answered by a replica a moment behind. Read the rest again before calling the
        # tail deleted (a real gap stays one: the retries only cost their bounded delay).
        await anyio.sleep(_CATCH_UP_S[attempt])
    report = auditor.finish(last_stream_seq=last)
    say(
        out,
        f"ledger {stream}: {report.messages} record(s), stream seq "
        f"{info.state.first_seq}..{info.state.last_seq}; deny_delete={config.deny_delete} "
        f"deny_purge={config.deny_purge}",
    )
    for chain in report.chains:
        say(out, f"  {chain}")
    if witnessed is not None:
        found = index.problems(witnessed)
        if found:
            say(out, f"FAIL: the witness countersigned {len(found)} head(s) this ledger lacks:")
            for line in found[:20]:
                say(out, f"  {line}")
            return 1
        say(out, f"witness: all {len(witnessed)} countersigned chain head(s) present")
    if report.ok:
        say(out, "OK: every chain is complete, linked and signed where it says so")
        return 0
    say(out, f"FAIL: {len(report.problems)} problem(s); the first bad record:")
    say(out, f"  {report.problems[0]}")
    for problem in report.problems[1:20]:
        say(out, f"  then: {problem}")
    return 1


async def show(nc: Client, stream: str, prefix: str, decision_id: str, *, out: TextIO) -> int:
    """Print the ancestors and descendants of *decision_id*; 1 if it is not in the ledger."""
    subjects = Subjects(prefix).ledger()
    records: dict[str, LedgerRecord] = {}
    children: dict[str, list[str]] = collections.defaultdict(list)
    async for stored in read(nc, stream, subjects.decision("*")):
        try:
            record = decode_record(stored.data)
        except msgspec.DecodeError:
            continue
        records[record.decision_id] = record
        for parent in _caused_by(record):
            children[parent].append(record.decision_id)
    if decision_id not in records:
        say(out, f"{decision_id}: no such decision in {stream} ({subjects.all})")
        return 1
    ancestors = {rid: _caused_by(r) for rid, r in records.items()}
    say(out, "ancestors (caused by):")
    for line in render_tree(decision_id, ancestors, records):
        say(out, f"  {line}")
    say(out, "descendants (caused):")
    for line in render_tree(decision_id, children, records):
        say(out, f"  {line}")
    return 0


def _caused_by(record: LedgerRecord) -> list[str]:
    """What caused *record*: its parents, and for a hold's release or denial the hold (a
    vote names the hold as its parent already)."""
    parents = list(record.parents)
    if record.hold and record.hold not in parents:
        parents.append(record.hold)
    return parents
