"""Approvers: who may release a hold, with which keys, how many of them, until when.

A bundle names its approvers (``approvers.members``: id → JWKS files of that person's
Ed25519 public keys) and groups of them (``approvers.groups``); an escalate rule's
``approval`` picks some (default: every approver of the bundle), a ``quorum`` of distinct
approvers (default 1) and a ``ttl`` (default 24 h). Compiled here:

* per escalate rule, its :class:`~bus_guard.decision.HoldTerms`, once: a hold decision
  costs nothing more than any other;
* per policy set, ``kid`` → (approver id, key): an approver id names one person across all
  bundles of the set (the same id with other key files is an error), and a key belongs to
  one approver only (the same ``kid`` for two ids is an error), so a signature names its
  approver unambiguously.

An escalate rule in a bundle without approvers holds with no approvers and quorum 1: such
a hold can only expire.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeAlias

from bus_guard.decision import HoldTerms
from bus_guard.policy._model import Approval, Bundle, Rule
from bus_guard.verify import JwkEntry, Jwks

__all__ = ("ApproverKeys", "KeyFiles", "approver_keys", "hold_terms")

Loc = tuple[str | int, ...]
Report = Callable[[Loc, str], None]

KeyFiles: TypeAlias = Mapping[tuple[str, str], tuple[str, "Jwks | str"]]
"""(policy file, key file as written) → (its path in the policy set, its keys or why they
could not be loaded): what the loader read for the compiler."""

ApproverKeys: TypeAlias = Mapping[str, tuple[str, JwkEntry]]
"""``kid`` → (approver id, key)."""


_DEFAULT = Approval.model_validate({})


def _names(values: Iterable[str]) -> str:
    return ", ".join(sorted(values)) or "none defined"


def hold_terms(rule: Rule, bundle: Bundle, problem: Report) -> HoldTerms | None:
    """The hold terms of an escalate rule (``None`` for other effects), reporting
    ``approval`` problems against the rule."""
    if rule.effect != "escalate":
        if rule.approval is not None:
            problem(
                ("approval",),
                f"approval is for escalate rules (who may release a hold); this rule's effect"
                f" is {rule.effect}",
            )
        return None
    approval = rule.approval or _DEFAULT
    members, groups = bundle.approvers.members, bundle.approvers.groups
    if approval.approvers is None:
        eligible = set(members)
    else:
        eligible = set()
        for i, name in enumerate(approval.approvers):
            if name in members:
                eligible.add(name)
            elif name in groups:
                eligible.update(a for a in groups[name] if a in members)
            else:
                problem(
                    ("approval", "approvers", i),
                    f"unknown approver or group {name!r} (approvers: {_names(members)};"
                    f" groups: {_names(groups)})",
                )
    quorum = 1 if approval.quorum is None else approval.quorum
    if (eligible or approval.quorum is not None) and quorum > len(eligible):
        who = f" ({_names(eligible)})" if eligible else ""
        problem(
            ("approval", "quorum"),
            f"quorum {quorum} needs more distinct approvers than the {len(eligible)} eligible{who}",
        )
    return HoldTerms(tuple(sorted(eligible)), quorum, approval.ttl)


def approver_keys(
    sources: Sequence[tuple[str, Bundle]],
    files: KeyFiles,
    problem: Callable[[str, Loc, str], None],
) -> dict[str, tuple[str, JwkEntry]]:
    """Every approver key of the set by ``kid``; bundle problems go to ``problem(file, loc,
    message)``."""
    keys: dict[str, tuple[str, JwkEntry, str]] = {}  # kid -> (approver, key, file)
    first: dict[str, tuple[str, tuple[str, ...]]] = {}  # approver -> (file, key paths)
    for file, bundle in sources:
        members, groups = bundle.approvers.members, bundle.approvers.groups
        for name, ids in groups.items():
            if name in members:
                message = f"{name!r} is both an approver and a group of approvers; rename one"
                problem(file, ("approvers", "groups", name), message)
            for i, approver in enumerate(ids):
                if approver not in members:
                    message = f"unknown approver {approver!r} (approvers: {_names(members)})"
                    problem(file, ("approvers", "groups", name, i), message)
        for approver, written in members.items():
            loaded: list[tuple[Loc, Jwks]] = []
            paths = set()
            for i, path in enumerate(written):
                loc: Loc = ("approvers", "members", approver)
                loc = (*loc, i) if len(written) > 1 else loc
                where, jwks = files[(file, path)]
                paths.add(where)
                if isinstance(jwks, str):
                    problem(file, loc, f"{path}: {jwks}")
                else:
                    loaded.append((loc, jwks))
            seen = first.setdefault(approver, (file, tuple(sorted(paths))))
            if seen[1] != tuple(sorted(paths)):
                problem(
                    file,
                    ("approvers", "members", approver),
                    f"approver {approver!r} has other key files in {seen[0]}"
                    f" ({', '.join(seen[1])}); an approver id names one person, with one set"
                    " of keys, across all bundles",
                )
                continue
            for loc, jwks in loaded:
                for entry in jwks.entries:
                    other = keys.setdefault(entry.kid, (approver, entry, file))
                    if other[0] != approver:
                        problem(
                            file,
                            loc,
                            f"key {entry.kid!r} is also a key of approver {other[0]!r}"
                            f" ({other[2]}); a key must name one approver",
                        )
                    elif other[1] != entry:
                        problem(
                            file,
                            loc,
                            f"key {entry.kid!r} of approver {approver!r} is given twice,"
                            " with different key material",
                        )
    return {kid: (approver, entry) for kid, (approver, entry, _) in keys.items()}
