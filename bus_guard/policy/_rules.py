"""Compiling one rule, and proving when one rule shadows another.

A :class:`CompiledRule` carries its patterns both as written (for messages and ``explain``)
and as matchers specialised once: a frozenset for exact principals and actions, prefix
checks or one regex for globs, a token matcher for action wildcards, and a closure for the
condition (and, for an allow rule with lineage constraints, the condition and the
constraints). What a decision by the rule carries is compiled once too: an escalate rule's
hold terms (:mod:`bus_guard.policy._approvers`), an allow rule's labels (taints) and its
limits (:class:`~bus_guard.decision.LimitSpec`, spent at run time by the intake).

Shadowing is proved, never guessed: an allow or escalate rule is reported unreachable only
when a single unconditional rule of a stronger effect covers every principal, action and
resource it could match (``*``/``>`` cover everything, ``payments.*`` covers
``payments.transfer``, ``account:*`` covers ``account:sanctioned-*``, groups are compared
by their members).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bus_guard.decision import HoldTerms, LimitSpec, Request
from bus_guard.policy._approvers import hold_terms
from bus_guard.policy._conditions import (
    ConditionNode,
    Predicate,
    Scope,
    compile_condition,
    predicate,
)
from bus_guard.policy._lineage import LineageCheck, compile_lineage
from bus_guard.policy._model import Bundle, Rule
from bus_guard.policy._patterns import (
    ActionIndex,
    Tokens,
    action_covers,
    action_matches,
    glob_covers,
    is_glob,
    parse_action_pattern,
    set_matcher,
)

__all__ = ("CompiledRule", "Problem", "compile_rule", "shadowed")

RuleEffect = Literal["allow", "deny", "escalate"]
Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One compile problem; :mod:`bus_guard.policy` formats it with the file's line."""

    file: str
    rule: str | None  # rule id; None for bundle-level problems
    rule_index: int | None  # position in the file's ``rules`` (to find the line)
    loc: Loc  # relative to the rule, or to the bundle when ``rule`` is None
    message: str


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    effect: RuleEffect
    bundle: str
    file: str
    description: str
    principals: tuple[str, ...]  # as written
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    any_principal: bool
    principal_ids: frozenset[str]  # ids and expanded group members
    principal_globs: tuple[str, ...]
    action_tokens: tuple[Tokens, ...]
    condition: ConditionNode | None
    hold: HoldTerms | None  # escalate rules: who may release the hold, how many, how long
    taints: tuple[str, ...]  # allow rules: the labels (sorted) its allowed intents carry on
    lineage: LineageCheck | None  # allow rules: constraints on the intent's lineage
    limits: tuple[LimitSpec, ...]  # allow rules: what an intent it allows spends, in order
    match_principal: Callable[[str], bool] = field(repr=False, compare=False)
    match_action: Callable[[str], bool] = field(repr=False, compare=False)
    match_resource: Callable[[str], bool] = field(repr=False, compare=False)
    # Whether the rule applies, beyond its patterns: the condition and the lineage
    # constraints (None: nothing to check). ``when`` is the condition alone.
    check: Callable[[Request], bool] | None = field(repr=False, compare=False)
    when: Callable[[Request], bool] | None = field(repr=False, compare=False)


def _action_matcher(patterns: Sequence[Tokens]) -> Callable[[str], bool]:
    exact = frozenset(".".join(t) for t in patterns if "*" not in t and ">" not in t)
    wild = tuple(t for t in patterns if "*" in t or ">" in t)
    if not wild:
        return exact.__contains__
    return lambda action: (
        action in exact or any(action_matches(w, tuple(action.split("."))) for w in wild)
    )


def compile_rule(
    rule: Rule,
    index: int,
    bundle: Bundle,
    file: str,
    schemas: Sequence[tuple[str, Tokens, Mapping[str, str]]],
    problems: list[Problem],
    shared: dict[Any, Predicate] | None = None,
) -> CompiledRule:
    """*shared*: the predicates of this compilation so far (see :func:`predicate`)."""

    def problem(loc: Loc, message: str) -> None:
        problems.append(Problem(file, rule.id, index, loc, message))

    ids: set[str] = set()
    globs: list[str] = []
    any_principal = False
    for i, pattern in enumerate(rule.principals):
        if pattern.startswith("group:"):
            name = pattern[len("group:") :]
            if name in bundle.groups:
                ids.update(bundle.groups[name])
            else:
                known = ", ".join(sorted(bundle.groups)) or "none defined"
                problem(("principals", i), f"unknown group {name!r} (groups: {known})")
        elif pattern.strip("*") == "":
            any_principal = True
        elif is_glob(pattern):
            globs.append(pattern)
        else:
            ids.add(pattern)
    tokens = tuple(parse_action_pattern(a) for a in rule.actions)
    covering = [
        (key, decl)
        for key, key_tokens, decl in schemas
        if any(action_covers(key_tokens, t) for t in tokens)
    ]
    complete = all(any(action_covers(k, t) for _, k, _ in schemas) for t in tokens)
    scope = Scope(bundle.principals, covering, complete)
    condition = None
    if rule.when is not None:
        cond_problems: list[tuple[Loc, str]] = []
        condition = compile_condition(rule.when, scope, ("when",), cond_problems)
        for loc, message in cond_problems:
            problem(loc, message)
    hold = hold_terms(rule, bundle, problem)
    what = {
        "labels": "labels taint",
        "lineage": "lineage constraints limit",
        "limits": "limits bound the rates and budgets of",
    }
    for key in ("labels", "lineage", "limits"):
        if getattr(rule, key) is not None and rule.effect != "allow":
            problem(
                (key,),
                f"{key} {'are' if key == 'limits' else 'is'} for allow rules ({what[key]} what"
                f" the rule allows); this rule's"
                f" effect is {rule.effect}",
            )
    lineage = None
    if rule.lineage is not None and rule.effect == "allow":
        within = rule.lineage.within_parent or []
        for i, name in enumerate(within):
            if name.startswith("params."):
                _numeric_param(
                    name.removeprefix("params."),
                    scope.schemas,
                    scope.complete,
                    ("lineage", "within_parent", i),
                    problem,
                    "within_parent compares numbers",
                )
        lineage = compile_lineage(
            rule.lineage.max_depth, rule.lineage.requires_parent or [], within
        )
    limits = _limits(rule, tokens, schemas, problem) if rule.effect == "allow" else ()
    when = None if condition is None else predicate(condition, shared)
    check = when
    if lineage is not None:
        holds = lineage.holds
        check = holds if when is None else _both(when, holds)
    return CompiledRule(
        id=rule.id,
        effect=rule.effect,
        bundle=bundle.bundle,
        file=file,
        description=rule.description,
        principals=tuple(rule.principals),
        actions=tuple(rule.actions),
        resources=tuple(rule.resources),
        any_principal=any_principal,
        principal_ids=frozenset(ids),
        principal_globs=tuple(globs),
        action_tokens=tokens,
        condition=condition,
        hold=hold,
        taints=tuple(sorted(set(rule.labels or ()))) if rule.effect == "allow" else (),
        lineage=lineage,
        limits=limits,
        match_principal=set_matcher(["*"] if any_principal else [*sorted(ids), *globs]),
        match_action=_action_matcher(tokens),
        match_resource=set_matcher(rule.resources),
        check=check,
        when=when,
    )


def _both(
    first: Callable[[Request], bool], second: Callable[[Request], bool]
) -> Callable[[Request], bool]:
    return lambda r: first(r) and second(r)


def _numeric_param(
    name: str,
    schemas: Sequence[tuple[str, Mapping[str, str]]],
    required: bool,
    loc: Loc,
    problem: Callable[[Loc, str], None],
    use: str,
) -> None:
    """A param the rule treats as a number (``within_parent: [params.<name>]``, a ``sum``
    limit): every schema of *schemas* (those covering the rule's actions) that declares it
    must declare a number or an integer; *required*: some schema must declare it."""
    declared = [(key, decl[name]) for key, decl in schemas if name in decl]
    if not declared and required:
        names = ", ".join(sorted({n for _, decl in schemas for n in decl})) or "none"
        problem(loc, f"param {name!r} is not declared in the schema (declared: {names})")
    for key, kind in declared:
        if kind not in ("number", "integer"):
            problem(loc, f"{use}, but params.{name} is declared {kind} in schema {key!r}")


def _limits(
    rule: Rule,
    tokens: Sequence[Tokens],
    schemas: Sequence[tuple[str, Tokens, Mapping[str, str]]],
    problem: Callable[[Loc, str], None],
) -> tuple[LimitSpec, ...]:
    """An allow rule's limits as :class:`LimitSpec` values (names unique across the set
    are the set compiler's check)."""
    specs = []
    groups = [p.removeprefix("group:") for p in rule.principals if p.startswith("group:")]
    for i, limit in enumerate(rule.limits or ()):
        group = ""
        if limit.per == "group":
            if len(rule.principals) == 1 and len(groups) == 1:
                group = groups[0]
            else:
                problem(
                    ("limits", i, "per"),
                    "per: group needs the rule's principals to be exactly one"
                    f" group:<name> (whose members share the limit), not {rule.principals}",
                )
        param = limit.sum or ""
        if param:
            # Every action the rule names: a sum of what no schema declares a number
            # could be a string, or anything.
            for j, pattern in enumerate(tokens):
                covering = [(k, decl) for k, kt, decl in schemas if action_covers(kt, pattern)]
                action = rule.actions[j]
                missing = not any(param in decl for _, decl in covering)
                if missing:
                    problem(
                        ("limits", i, "sum"),
                        f"sum adds up params.{param}, which must be declared number or"
                        f" integer in schemas for every action of the rule; no schema"
                        f" covering {action!r} declares it",
                    )
                _numeric_param(
                    param, covering, False, ("limits", i, "sum"), problem, "sum adds numbers"
                )
        count = limit.count
        specs.append(
            LimitSpec(
                rule=rule.id,
                name=limit.name or f"{rule.id}/{i}",
                kind="count" if count is not None else "sum",
                max=float(count) if count is not None else float(limit.max or 0.0),
                window_s=limit.window,
                per=limit.per,
                group=group,
                param=param,
            )
        )
    return tuple(specs)


def _principals_cover(outer: CompiledRule, inner: CompiledRule) -> bool:
    if outer.any_principal:
        return True
    if inner.any_principal:
        return False
    return all(
        pid in outer.principal_ids or any(glob_covers(g, pid) for g in outer.principal_globs)
        for pid in inner.principal_ids
    ) and all(
        any(glob_covers(g, ig) for g in outer.principal_globs) for ig in inner.principal_globs
    )


def shadowed(rules: Sequence[CompiledRule]) -> Iterable[tuple[CompiledRule, CompiledRule]]:
    """(rule, unconditional rule of a stronger effect covering all it could match)."""
    stronger: dict[str, tuple[str, ...]] = {"allow": ("deny", "escalate"), "escalate": ("deny",)}
    pools = {
        effect: [r for r in rules if r.effect == effect and r.condition is None]
        for effect in ("deny", "escalate")
    }
    indexes = {
        effect: ActionIndex((t, i) for i, r in enumerate(pool) for t in r.action_tokens)
        for effect, pool in pools.items()
    }

    def cover(rule: CompiledRule, effect: str) -> CompiledRule | None:
        # Only rules whose action patterns cover all of this rule's, found via the trie.
        common = set.intersection(*(indexes[effect].covering(t) for t in rule.action_tokens))
        for i in sorted(common):
            outer = pools[effect][i]
            if all(
                any(glob_covers(o, r) for o in outer.resources) for r in rule.resources
            ) and _principals_cover(outer, rule):
                return outer
        return None

    for rule in rules:
        for effect in stronger.get(rule.effect, ()):
            if (outer := cover(rule, effect)) is not None:
                yield rule, outer
                break
