"""Lineage: which decisions caused which, as the ledger records it.

An intent names its parents by decision id. The gateway looks each one up in the ledger
and computes the intent's place from what it finds, never from what the agent claims:

* a parent that is unknown, was denied (any reason) or is still held makes the intent a
  ``lineage_violation``; so does a depth beyond the gateway's cap (a bundle can cap lower
  with a condition on ``lineage.depth``);
* ``depth`` is one more than the deepest parent's; an intent without parents has depth 0;
* ``root`` is the first parent's root; an intent without parents is its own root (its
  principal);
* ``labels`` are inherited taint: the union over the parents of each parent's labels, the
  labels its allowing rules added (its ``taints``, from an allow rule's ``labels:``) and its
  action, so a policy can say ``{field: lineage.labels, not_in: [tools.http.get]}``
  ("nothing that descends from a web fetch") or ``{field: lineage.labels, in:
  [untrusted-input]}`` (whatever an allow rule labelled ``untrusted-input`` let through, and
  everything after it);
* ``parents`` are views of the parents' records (decision id, action, resource, scope) for
  the lineage constraints of allow rules (``requires_parent``, ``within_parent``).

:func:`show` prints a decision's ancestors and descendants as trees (``bus-guard lineage``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from bus_guard.decision import Lineage, ParentView
from bus_guard.ledger._records import DECISION, LedgerRecord

__all__ = ("MAX_LABELS", "lineage_of", "render_tree")

MAX_LABELS: Final = 64
"""The most inherited labels an intent may carry. Beyond it the intent is a
``lineage_violation``: a truncated set could drop the one label a deny rule (or an allow
rule's ``not_in``) looks for, and let a tainted descendant through."""


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
        labels.update(r.taints)
        labels.add(r.action)
    if len(labels) > MAX_LABELS:
        return Lineage(
            violation=f"lineage carries {len(labels)} inherited labels (at most {MAX_LABELS})"
        )
    first = records[0]
    return Lineage(
        depth=depth,
        root=first.lineage_root or first.principal,
        labels=frozenset(labels),
        parents=tuple(ParentView(r.decision_id, r.action, r.resource, r.scope) for r in records),
    )


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
