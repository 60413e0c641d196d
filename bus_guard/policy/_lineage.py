"""Lineage constraints of allow rules: compiled once, checked against the parents the
ledger found (:class:`~bus_guard.decision.ParentView`), never against the agent's claims.

Semantics (all given constraints must hold for the rule to allow):

* ``max_depth: N``: the intent's lineage depth is at most N (a root has depth 0).
* ``requires_parent: [patterns]``: some parent's action matches one of the action patterns
  (NATS wildcards, as in ``actions``). A root intent has no parent: it fails.
* ``within_parent: [fields]``: the intent stays inside the scope of **every** parent.
  ``params.<name>``: the intent's param is a number (not a boolean) and at most the same
  param in the parent's scope (its numeric top-level params, recorded when it was
  allowed); a parent whose scope lacks the param fails. ``resource``: the intent's
  resource equals the parent's, or continues it after ``/`` or ``:`` (``account:a1``
  is within ``account``; ``account:a10`` is not within ``account:a1``). A root intent has
  no parent scope to stay within: it fails, or ``within_parent`` alone would be
  escaped by naming no parents.

An allow rule whose patterns and condition match but whose lineage constraints fail does
not allow; when no rule decides otherwise, the intent is denied ``lineage_violation``
naming that rule and the first constraint that failed (see
:mod:`bus_guard.policy._evaluator`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bus_guard.decision import ParentView, Request
from bus_guard.policy._patterns import Tokens, action_matches, parse_action_pattern

__all__ = ("ConstraintTrace", "LineageCheck", "compile_lineage", "within_resource")


@dataclass(frozen=True, slots=True)
class ConstraintTrace:
    """How one lineage constraint fared against one request, for ``explain``."""

    text: str  # "max_depth 3", "requires_parent [payments.approve-invoice]", ...
    held: bool
    actual: Any  # what the constraint looked at (depth, parents' actions, values)


def within_resource(child: str, parent: str) -> bool:
    """*child* is *parent*, or continues it after ``/`` or ``:``."""
    if not child.startswith(parent):
        return False
    rest = child[len(parent) :]
    return not rest or rest[0] in "/:"


def _number(value: object) -> bool:
    return type(value) is int or type(value) is float


@dataclass(frozen=True, slots=True)
class LineageCheck:
    """One rule's lineage constraints, as written and compiled."""

    max_depth: int | None
    requires_parent: tuple[str, ...]  # action patterns as written; () when not given
    within_params: tuple[str, ...]  # param names of ``within_parent: [params.<name>]``
    within_resource: bool
    parent_tokens: tuple[Tokens, ...] = dataclasses.field(repr=False, compare=False)
    holds: Callable[[Request], bool] = dataclasses.field(repr=False, compare=False)

    def _matches_parent(self, action: str) -> bool:
        tokens = tuple(action.split("."))
        return any(action_matches(p, tokens) for p in self.parent_tokens)

    def trace(self, request: Request) -> tuple[ConstraintTrace, ...]:
        """Every constraint, evaluated one by one with what it looked at (slow path)."""
        parents = request.lineage_parents
        out = []
        if self.max_depth is not None:
            depth = request.lineage_depth
            out.append(
                ConstraintTrace(f"max_depth {self.max_depth}", depth <= self.max_depth, depth)
            )
        if self.requires_parent:
            held = any(self._matches_parent(p.action) for p in parents)
            text = f"requires_parent [{', '.join(self.requires_parent)}]"
            out.append(ConstraintTrace(text, held, [p.action for p in parents]))
        for name in self.within_params:
            value = request.params.get(name)
            held = (
                bool(parents)
                and _number(value)
                and all(_within_scope(value, p, name) for p in parents)
            )
            seen = {"value": value, "parents": [p.scope.get(name) for p in parents]}
            out.append(ConstraintTrace(f"within_parent params.{name}", held, seen))
        if self.within_resource:
            held = bool(parents) and all(
                within_resource(request.resource, p.resource) for p in parents
            )
            seen = {"value": request.resource, "parents": [p.resource for p in parents]}
            out.append(ConstraintTrace("within_parent resource", held, seen))
        return tuple(out)

    def failure(self, request: Request) -> str | None:
        """Why the first failing constraint fails, for a ``lineage_violation`` message;
        ``None`` when every constraint holds. Names no agent-chosen strings, only the
        constraint, numbers and the parents' decision ids."""
        parents = request.lineage_parents
        if self.max_depth is not None and request.lineage_depth > self.max_depth:
            return f"max_depth {self.max_depth} (lineage depth {request.lineage_depth})"
        if self.requires_parent and not any(self._matches_parent(p.action) for p in parents):
            why = "a root intent has no parent" if not parents else "no parent's action matches"
            return f"requires_parent [{', '.join(self.requires_parent)}] ({why})"
        for name in self.within_params:
            if not parents:
                return f"within_parent params.{name} (a root intent has no parent scope)"
            value = request.params.get(name)
            if not _number(value):
                return f"within_parent params.{name} (params.{name} is not a number)"
            for p in parents:
                if not _within_scope(value, p, name):
                    limit = p.scope.get(name)
                    has = "has none" if limit is None else f"has {json.dumps(limit)}"
                    return (
                        f"within_parent params.{name} (params.{name} is {json.dumps(value)};"
                        f" parent {p.decision_id} {has})"
                    )
        if self.within_resource:
            if not parents:
                return "within_parent resource (a root intent has no parent scope)"
            for p in parents:
                if not within_resource(request.resource, p.resource):
                    return f"within_parent resource (not within parent {p.decision_id}'s)"
        return None


def _within_scope(value: Any, parent: ParentView, name: str) -> bool:
    limit = parent.scope.get(name)
    return _number(limit) and value <= limit


def _predicate(
    max_depth: int | None,
    parent_tokens: tuple[Tokens, ...],
    within_params: tuple[str, ...],
    resource: bool,
) -> Callable[[Request], bool]:
    """One closure testing every constraint, cheapest first."""

    def holds(request: Request) -> bool:
        if max_depth is not None and request.lineage_depth > max_depth:
            return False
        parents = request.lineage_parents
        if parent_tokens:
            for p in parents:
                tokens = tuple(p.action.split("."))
                if any(action_matches(t, tokens) for t in parent_tokens):
                    break
            else:
                return False
        if within_params or resource:
            if not parents:
                return False
            params = request.params
            for name in within_params:
                value = params.get(name)
                if not _number(value) or not all(_within_scope(value, p, name) for p in parents):
                    return False
            if resource:
                child = request.resource
                if not all(within_resource(child, p.resource) for p in parents):
                    return False
        return True

    return holds


def compile_lineage(
    max_depth: int | None, requires_parent: Sequence[str], within: Sequence[str]
) -> LineageCheck:
    """Compile validated constraints (``within``: ``params.<name>`` or ``resource``)."""
    tokens = tuple(parse_action_pattern(p) for p in requires_parent)
    params = tuple(field.removeprefix("params.") for field in within if field != "resource")
    resource = "resource" in within
    return LineageCheck(
        max_depth=max_depth,
        requires_parent=tuple(requires_parent),
        within_params=params,
        within_resource=resource,
        parent_tokens=tokens,
        holds=_predicate(max_depth, tokens, params, resource),
    )
