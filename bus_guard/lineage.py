"""Lineage: which decisions caused which, as the ledger records it.

An intent names its parents by decision id. The gateway looks each one up in the ledger
and computes the intent's place from what it finds, never from what the agent claims:

* a parent that is unknown, was denied (any reason) or is still held makes the intent a
  ``lineage_violation``; so does a depth beyond the gateway's cap (a bundle can cap lower
  with a condition on ``lineage.depth``);
* ``depth`` is one more than the deepest parent's; an intent without parents has depth 0;
* ``root`` is the first parent's root; an intent without parents is its own root (its
  principal);
* ``labels`` are inherited taint: the union of the parents' labels and the parents' actions,
  so a policy can say ``{field: lineage.labels, not_in: [tools.http.get]}`` ("nothing that
  descends from a web fetch").

:func:`show` prints a decision's ancestors and descendants as trees (``bus-guard lineage``).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Final, TextIO

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from .decision import Lineage
from .jetstream import last_by_subject, read
from .ledger import DECISION, LedgerRecord, LedgerSubjects, decode_record

__all__ = ("MAX_LABELS", "ParentLookup", "lineage_of", "render_tree", "show")

MAX_LABELS: Final = 64  # inherited labels kept per decision (sorted, first ones)


def lineage_of(
    principal: str,
    parents: Sequence[str],
    found: Mapping[str, LedgerRecord | None],
    *,
    max_depth: int,
) -> Lineage:
    """The lineage of an intent by *principal* naming *parents*, given their records."""
    if not parents:
        return Lineage(depth=0, root=principal)
    records = []
    for parent in parents:
        record = found.get(parent)
        if record is None or record.kind != DECISION:
            return Lineage(violation=f"parent {parent} is not a known decision")
        if record.effect == "deny":
            return Lineage(violation=f"parent {parent} was denied ({record.reason})")
        if record.effect != "allow":
            return Lineage(violation=f"parent {parent} is {record.effect}, not allowed")
        records.append(record)
    depth = 1 + max(r.lineage_depth for r in records)
    if depth > max_depth:
        return Lineage(violation=f"lineage depth {depth} exceeds the limit {max_depth}")
    labels: set[str] = set()
    for r in records:
        labels.update(r.labels)
        labels.add(r.action)
    first = records[0]
    return Lineage(
        depth=depth,
        root=first.lineage_root or first.principal,
        labels=frozenset(sorted(labels)[:MAX_LABELS]),
    )


class ParentLookup:
    """Decision records by id, from the ledger; allows and denials are cached (they are
    final), holds are looked up again (an approval may follow)."""

    def __init__(
        self, js: JetStreamContext, stream: str, subjects: LedgerSubjects, *, cache_size: int
    ) -> None:
        self._js = js
        self._stream = stream
        self._subjects = subjects
        self._cache: collections.OrderedDict[str, LedgerRecord] = collections.OrderedDict()
        self._cache_size = cache_size

    def remember(self, record: LedgerRecord) -> None:
        if record.kind == DECISION and record.effect in ("allow", "deny"):
            self._cache[record.decision_id] = record
            self._cache.move_to_end(record.decision_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    async def get(self, decision_id: str) -> LedgerRecord | None:
        """The record of *decision_id*, ``None`` if there is none; raises if it cannot look."""
        cached = self._cache.get(decision_id)
        if cached is not None:
            return cached
        stored = await last_by_subject(
            self._js, self._stream, self._subjects.any_decision(decision_id)
        )
        if stored is None:
            return None
        try:
            record = decode_record(stored.data)
        except msgspec.DecodeError:
            return None  # not a record: as good as unknown, and the audit will say why
        if record.decision_id != decision_id:
            return None
        self.remember(record)
        return record


# --- the tree printer ---------------------------------------------------------------------


def _line(record: LedgerRecord) -> str:
    what = " ".join(x for x in (record.principal, record.action, record.resource) if x)
    text = f"{record.decision_id}  {record.effect:<5} {record.reason:<18} {what}"
    if record.effect != "allow" and record.message:
        text += f"  ({record.message})"
    return text + f"  depth {record.lineage_depth}"


def render_tree(
    root: str,
    children: Mapping[str, Sequence[str]],
    records: Mapping[str, LedgerRecord],
    *,
    max_nodes: int = 10_000,
) -> list[str]:
    """Lines of a tree from *root* along *children* (ids); unknown ids are marked."""
    lines: list[str] = []

    def label(node: str) -> str:
        record = records.get(node)
        return _line(record) if record is not None else f"{node}  (not in the ledger)"

    def walk(node: str, indent: str, seen: frozenset[str]) -> None:
        kids = children.get(node, ())
        for i, kid in enumerate(kids):
            if len(lines) >= max_nodes:
                return
            last = i == len(kids) - 1
            lines.append(f"{indent}{'└── ' if last else '├── '}{label(kid)}")
            if kid not in seen:  # a DAG can repeat a node; it cannot loop, but be safe
                walk(kid, indent + ("    " if last else "│   "), seen | {kid})

    lines.append(label(root))
    walk(root, "", frozenset({root}))
    return lines


async def show(nc: Client, stream: str, prefix: str, decision_id: str, *, out: TextIO) -> int:
    """Print the ancestors and descendants of *decision_id*; 1 if it is not in the ledger."""
    subjects = LedgerSubjects(prefix, "*")
    records: dict[str, LedgerRecord] = {}
    children: dict[str, list[str]] = collections.defaultdict(list)
    async for stored in read(nc, stream, f"{prefix}.ledger.*.d.*"):
        try:
            record = decode_record(stored.data)
        except msgspec.DecodeError:
            continue
        records[record.decision_id] = record
        for parent in record.parents:
            children[parent].append(record.decision_id)
    if decision_id not in records:
        print(f"{decision_id}: no such decision in {stream} ({subjects.all})", file=out)
        return 1
    ancestors = {rid: list(r.parents) for rid, r in records.items()}
    print("ancestors (caused by):", file=out)
    for line in render_tree(decision_id, ancestors, records):
        print(f"  {line}", file=out)
    print("descendants (caused):", file=out)
    for line in render_tree(decision_id, children, records):
        print(f"  {line}", file=out)
    return 0
