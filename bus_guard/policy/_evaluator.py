"""Compiling validated bundles into an immutable, indexed :class:`PolicySet`.

Evaluation is Cedar's: default deny; any applicable ``deny`` rule decides (naming every
applicable deny rule); else any applicable ``escalate`` rule holds; else any applicable
``allow`` rule allows; else ``deny no_matching_rule``. A rule applies when the principal,
the action and the resource each match one of its patterns, its condition holds and (allow
rules) its lineage constraints hold. Rule order never matters: every applicable rule of
the deciding effect is named, sorted.

An allow rule that matches in everything but its lineage constraints does not allow; if
nothing else decides, the denial is ``lineage_violation`` naming those rules and the
constraint each failed, rather than ``no_matching_rule``: a rule was written for this
intent, and its lineage is what is wrong.

What a decision carries besides its rules is fixed at compile time: a hold's terms (one
escalate rule: its approvers, quorum and ttl; several: the approvers all of them accept,
the largest quorum, the shortest ttl), an allow's taints (the sorted union of the
allowing rules' ``labels``) and its limits (one group per allowing rule, by rule id; none
when one allowing rule has no limits: it allows unlimited). Decisions are cached per
(reason, rules), so none of them costs anything per request. The evaluator never denies
for a limit: spending them is the intake's, at run time.

Cost per request does not grow with the rule count: the rules that can apply to a
(principal, action) pair come from a dict + token trie over actions and a dict over
principal ids (groups expanded), intersected from the smaller side and cached; only those
candidates' resource patterns and conditions are then tested.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from bus_guard.decision import Decision, Effect, HoldTerms, LimitSpec, Mode, Reason, Request
from bus_guard.policy._approvers import ApproverKeys, KeyFiles, approver_keys
from bus_guard.policy._conditions import ConditionTrace, Predicate, trace
from bus_guard.policy._lineage import ConstraintTrace
from bus_guard.policy._model import Bundle
from bus_guard.policy._patterns import ActionIndex, only_prefix, parse_action_pattern
from bus_guard.policy._rules import CompiledRule, Problem, compile_rule, shadowed
from bus_guard.verify import JwkEntry

__all__ = (
    "BundleInfo",
    "CompiledRule",
    "Explanation",
    "PolicySet",
    "Problem",
    "RuleTrace",
    "compile_policy_set",
)

log = logging.getLogger(__name__)

# Bounds of the two memo tables (cleared when full): (principal, action) -> candidates and
# (reason, rule ids) -> Decision. An entry is well under 1 KiB; 16384 holds the working set
# of a 10,000-rule bundle whose rules name a principal each (bench/decide.py).
CACHE_SIZE: Final = 16384
# A principal named by at most this many rules is resolved from its own rules; beyond it,
# from the rules of the action (whichever side is smaller does the filtering).
_FEW_NAMED: Final = 32


@dataclass(frozen=True, slots=True)
class BundleInfo:
    name: str
    version: str
    file: str
    rule_count: int
    description: str


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """How one rule fared against a request."""

    rule: CompiledRule
    principal: bool
    action: bool
    resource: bool
    condition: ConditionTrace | None  # None: the rule has no condition
    lineage: tuple[ConstraintTrace, ...] | None = None  # None: no lineage constraints

    @property
    def matches(self) -> bool:
        """Patterns and condition hold: the rule applies unless its lineage fails."""
        held = self.condition is None or self.condition.held
        return self.principal and self.action and self.resource and held

    @property
    def applies(self) -> bool:
        return self.matches and (self.lineage is None or all(c.held for c in self.lineage))


@dataclass(frozen=True, slots=True)
class Explanation:
    """Every rule whose action matched or which names the principal, and the decision."""

    request: Request
    decision: Decision
    rules: tuple[RuleTrace, ...]


class _Step(NamedTuple):
    """One non-empty effect group of a (principal, action) pair, in precedence order.

    A group of one rule (the common case) carries that rule's matchers and the decision
    it makes, prebuilt and inline: evaluating it follows no pointer to the rule, and
    costs no list, tuple or memo lookup. At 10,000 rules the pairs' entries are spread
    over megabytes, so every indirection saved is a cache miss saved.
    """

    match_resource: Callable[[str], bool] | None  # the single rule's, else None
    # The single rule's resources as one prefix (``p*``; "" for ``*``), tested inline with
    # ``str.startswith``: no call, no matcher object to fetch. None: call match_resource.
    prefix: str | None
    check: Callable[[Request], bool] | None  # the single rule's condition, if any
    single: Decision | None  # the single rule's decision, else None
    reason: Reason
    rules: tuple[CompiledRule, ...]  # the group, sorted by id


# What evaluating one (principal, action) pair needs, computed once and cached: its
# steps, then a last one that always decides (no rule applied), prebuilt as decisions are
# immutable values. A plain tuple of steps: one object fewer to fetch per evaluation.
_Candidates = tuple[_Step, ...]


def _anything(_: str) -> bool:
    return True


_PRECEDENCE: Final = (
    ("deny", Reason.DENIED_BY_RULE),
    ("escalate", Reason.ESCALATED_BY_RULE),
    ("allow", Reason.ALLOWED_BY_RULE),
)
_EFFECTS: Final = {
    Reason.DENIED_BY_RULE: Effect.DENY,
    Reason.ESCALATED_BY_RULE: Effect.HOLD,
    Reason.ALLOWED_BY_RULE: Effect.ALLOW,
    Reason.NO_MATCHING_RULE: Effect.DENY,
    Reason.LINEAGE_VIOLATION: Effect.DENY,  # allow rules matched, their lineage did not
    Reason.MALFORMED: Effect.DENY,  # params of a type their schema does not declare
}
_MESSAGES: Final = {
    Reason.DENIED_BY_RULE: "denied by rule",
    Reason.ESCALATED_BY_RULE: "held for approval by rule",
    Reason.ALLOWED_BY_RULE: "allowed by rule",
}


class PolicySet:
    """The compiled, immutable policy: ``evaluate`` is the hot path, ``explain`` the slow one."""

    __slots__ = (
        "_any_principal",
        "_approver_keys",
        "_by_action",
        "_by_action_wild",
        "_by_id",
        "_by_principal",
        "_cache",
        "_decisions",
        "_glob_principal",
        "_infos",
        "_rules",
        "_schema_decls",
        "_schema_index",
        "_schemas",
        "_steps",
        "digest",
        "mode",
        "version",
    )

    digest: str
    version: str
    mode: Mode
    _rules: tuple[CompiledRule, ...]
    _by_id: dict[str, CompiledRule]
    _approver_keys: ApproverKeys
    _infos: tuple[BundleInfo, ...]
    _by_principal: dict[str, tuple[int, ...]]
    _any_principal: frozenset[int]
    _glob_principal: tuple[int, ...]
    _by_action: ActionIndex
    _by_action_wild: ActionIndex
    _cache: dict[tuple[str, str], _Candidates]
    _decisions: dict[tuple[Reason, tuple[str, ...]], Decision]
    _steps: dict[tuple[Reason, tuple[str, ...]], _Step]
    _schema_decls: tuple[tuple[tuple[str, str, str], ...], ...]
    _schema_index: ActionIndex
    _schemas: dict[str, tuple[tuple[str, str, str], ...]]

    def __init__(
        self,
        rules: Sequence[CompiledRule],
        infos: Sequence[BundleInfo],
        digest: str,
        mode: Mode,
        schemas: Sequence[tuple[str, Mapping[str, str]]] = (),
        approver_keys: ApproverKeys | None = None,
    ) -> None:
        ordered = tuple(sorted(rules, key=lambda r: r.id))  # index order = id order
        typed = [(key, decl) for key, decl in schemas if any(k != "any" for k in decl.values())]
        decls = tuple(tuple((key, n, k) for n, k in decl.items()) for key, decl in typed)
        infos_ = tuple(sorted(infos, key=lambda b: b.name))
        by_principal: dict[str, list[int]] = {}
        for i, rule in enumerate(ordered):
            if not rule.any_principal:
                for pid in rule.principal_ids:
                    by_principal.setdefault(pid, []).append(i)
        fields = {
            "digest": digest,
            "mode": mode,
            "version": ",".join(f"{b.name}@{b.version}" for b in infos_),
            "_rules": ordered,
            "_by_id": {r.id: r for r in ordered},
            "_approver_keys": dict(approver_keys or {}),
            "_infos": infos_,
            "_by_principal": {k: tuple(v) for k, v in by_principal.items()},
            "_any_principal": frozenset(i for i, r in enumerate(ordered) if r.any_principal),
            "_glob_principal": tuple(
                i for i, r in enumerate(ordered) if r.principal_globs and not r.any_principal
            ),
            "_by_action": ActionIndex(
                (tokens, i) for i, r in enumerate(ordered) for tokens in r.action_tokens
            ),
            # Only the rules that do not name every principal they cover: wildcards, globs.
            "_by_action_wild": ActionIndex(
                (tokens, i)
                for i, r in enumerate(ordered)
                if r.any_principal or r.principal_globs
                for tokens in r.action_tokens
            ),
            # (principal, action) -> candidates, cleared when full. Plain dict operations
            # are atomic under the GIL, and a lost insert only costs a recomputation.
            "_cache": {},
            "_decisions": {},  # (reason, rule ids) -> Decision, same bound
            # (reason, rule ids) -> _Step, same bound: pairs whose groups hold the same
            # rules (every pair meets a wildcard-principal deny) share one step object.
            "_steps": {},
            # Declared param types: (schema key, param, type) per schema; per action, the
            # declarations that cover it (computed once per action, bounded like _cache).
            "_schema_decls": decls,
            "_schema_index": ActionIndex(
                (parse_action_pattern(key), i) for i, (key, _) in enumerate(typed)
            ),
            "_schemas": {},
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"PolicySet is immutable; cannot set {name!r}")

    def __repr__(self) -> str:
        return f"PolicySet({self.version!r}, rules={self.rule_count}, {self.digest[:19]}…)"

    @property
    def rule_count(self) -> int:
        return len(self._rules)

    @property
    def bundles(self) -> tuple[str, ...]:
        return tuple(b.name for b in self._infos)

    @property
    def bundle_info(self) -> tuple[BundleInfo, ...]:
        return self._infos

    @property
    def rules(self) -> tuple[CompiledRule, ...]:
        """Every rule, sorted by id."""
        return self._rules

    @property
    def approvers(self) -> tuple[str, ...]:
        """The ids of every approver with a key in the set, sorted."""
        return tuple(sorted({approver for approver, _ in self._approver_keys.values()}))

    def approver_key(self, kid: str) -> tuple[str, JwkEntry] | None:
        """The approver whose key has id *kid*, and the key; ``None`` for an unknown kid.
        Whether the key may still be used is the caller's check (``entry.usable_at(now)``:
        a JWKS file may mark a key revoked or retired)."""
        return self._approver_keys.get(kid)

    def candidates(self, principal: str, action: str) -> tuple[str, ...]:
        """Ids of the rules that match ``principal`` and ``action`` (before resource and
        condition), i.e. all that ``evaluate`` will look at."""
        steps = self._candidates(principal, action)
        # A set: a lineage-constrained allow rule is in its allow step and in the last.
        return tuple(sorted({r.id for step in steps for r in step.rules}))

    def evaluate(self, request: Request) -> Decision:
        declared = self._schemas.get(request.action)
        if declared is None:
            declared = self._declared(request.action)
        if declared and (wrong := _wrong_type(declared, request.params)) is not None:
            return self._decision(Reason.MALFORMED, (), wrong)
        found = self._cache.get((request.principal, request.action))
        if found is None:
            found = self._candidates(request.principal, request.action)
        resource = request.resource
        for match, prefix, check, single, reason, rules in found:
            if match is not None:  # one rule (or the last step): matchers and decision inline
                if (resource.startswith(prefix) if prefix is not None else match(resource)) and (
                    check is None or check(request)
                ):
                    return single  # type: ignore[return-value]  # set with match
                continue
            if single is not None:  # the last step of a pair with lineage-constrained rules
                return self._unmet(request, rules, single)
            hits = [
                r.id
                for r in rules  # sorted by id already
                if r.match_resource(resource) and (r.check is None or r.check(request))
            ]
            if hits:
                return self._ruled(reason, tuple(hits))
        raise AssertionError("the last step always decides")  # the caller denies

    def explain(self, request: Request) -> Explanation:
        """Trace every rule that matches the action or names the principal (a linear scan:
        a debugging tool, not the hot path) and decide exactly as ``evaluate`` does."""
        traces = []
        for rule in self._rules:
            by_principal = rule.match_principal(request.principal)
            by_action = rule.match_action(request.action)
            if not (by_action or (by_principal and not rule.any_principal)):
                continue
            cond = None if rule.condition is None else trace(rule.condition, request)
            lineage = None if rule.lineage is None else rule.lineage.trace(request)
            resource = rule.match_resource(request.resource)
            traces.append(RuleTrace(rule, by_principal, by_action, resource, cond, lineage))
        matched = any(t.principal and t.action and t.rule.effect == "allow" for t in traces)
        decision = self._no_match(request.principal, request.action, matched)
        for effect, reason in _PRECEDENCE:
            hits = tuple(t.rule.id for t in traces if t.applies and t.rule.effect == effect)
            if hits:
                decision = self._ruled(reason, hits)
                break
        else:
            unmet = tuple(t.rule for t in traces if t.matches and t.rule.lineage is not None)
            decision = self._unmet(request, unmet, decision)
        wrong = _wrong_type(self._declared(request.action), request.params)
        if wrong is not None:  # as evaluate: a declared type is checked before any rule
            decision = self._decision(Reason.MALFORMED, (), wrong)
        return Explanation(request, decision, tuple(traces))

    def _ruled(self, reason: Reason, rules: tuple[str, ...]) -> Decision:
        # Building a frozen dataclass costs more than the rest of an evaluation, and the
        # same rule set decides over and over: reuse the (immutable) value.
        decision = self._decisions.get((reason, rules))
        if decision is None:
            plural = "s" if len(rules) > 1 else ""
            hold: HoldTerms | None = None
            taints: tuple[str, ...] = ()
            limits: tuple[tuple[LimitSpec, ...], ...] = ()
            if reason is Reason.ESCALATED_BY_RULE:
                hold = _combined([self._by_id[r].hold for r in rules])
            elif reason is Reason.ALLOWED_BY_RULE:
                taints = tuple(sorted({t for r in rules for t in self._by_id[r].taints}))
                groups = tuple(self._by_id[r].limits for r in rules)  # rules: sorted by id
                # One unlimited rule allows without spending anything.
                limits = groups if all(groups) else ()
            decision = self._decision(
                reason,
                rules,
                f"{_MESSAGES[reason]}{plural} {', '.join(rules)}",
                hold=hold,
                taints=taints,
                limits=limits,
            )
            if len(self._decisions) >= CACHE_SIZE:
                self._decisions.clear()
            self._decisions[(reason, rules)] = decision
        return decision

    def _no_match(self, principal: str, action: str, allow_rules: bool) -> Decision:
        message = f"no rule allows {principal} {action}"
        if allow_rules:  # some allow rule covers the pair: its resource or condition failed
            message += " with this resource and params"
        return self._decision(Reason.NO_MATCHING_RULE, (), message)

    def _unmet(
        self, request: Request, rules: Sequence[CompiledRule], no_match: Decision
    ) -> Decision:
        """The decision when no rule applied: ``lineage_violation`` naming the allow rules
        that matched in all but their lineage constraints (and the first constraint each
        failed), else *no_match*. The slow path: a denial."""
        failed = []
        resource = request.resource
        for rule in rules:
            lineage = rule.lineage
            if (
                lineage is not None
                and rule.match_resource(resource)
                and (rule.when is None or rule.when(request))
                and (why := lineage.failure(request)) is not None
            ):
                failed.append((rule.id, why))
        if not failed:
            return no_match
        failed.sort()
        message = "lineage constraints not met: " + "; ".join(
            f"rule {rule}: {why}" for rule, why in failed
        )
        ids = tuple(rule for rule, _ in failed)
        return self._decision(Reason.LINEAGE_VIOLATION, ids, message)

    def _decision(
        self,
        reason: Reason,
        rules: tuple[str, ...],
        message: str,
        *,
        hold: HoldTerms | None = None,
        taints: tuple[str, ...] = (),
        limits: tuple[tuple[LimitSpec, ...], ...] = (),
    ) -> Decision:
        return Decision(
            _EFFECTS[reason],
            reason,
            rules=rules,
            message=message,
            policy_digest=self.digest,
            policy_version=self.version,
            mode=self.mode,
            taints=taints,
            hold=hold,
            limits=limits,
        )

    def _step(self, reason: Reason, group: tuple[CompiledRule, ...]) -> _Step:
        key = (reason, tuple(r.id for r in group))
        step = self._steps.get(key)
        if step is None:
            if len(group) == 1:
                (rule,) = group
                step = _Step(
                    rule.match_resource,
                    only_prefix(rule.resources),
                    rule.check,
                    self._ruled(*key),
                    reason,
                    group,
                )
            else:
                step = _Step(None, None, None, None, reason, group)
            if len(self._steps) >= CACHE_SIZE:
                self._steps.clear()
            self._steps[key] = step
        return step

    def _declared(self, action: str) -> tuple[tuple[str, str, str], ...]:
        """Every (schema, param, type) the bundles declare for *action*."""
        decls = self._schema_decls
        found = tuple(d for i in sorted(self._schema_index.match(action)) for d in decls[i])
        if len(self._schemas) >= CACHE_SIZE:
            self._schemas.clear()
        self._schemas[action] = found
        return found

    def _candidates(self, principal: str, action: str) -> _Candidates:
        rules = self._rules
        named = self._by_principal.get(principal, ())
        if len(named) <= _FEW_NAMED:
            # The usual case: the principal's own rules, plus the wildcard-principal rules
            # of the action, without materialising every rule of a busy action.
            pool = {i for i in named if rules[i].match_action(action)}
            pool.update(
                i for i in self._by_action_wild.match(action) if rules[i].match_principal(principal)
            )
            ids = sorted(pool)
        else:
            by_action = self._by_action.match(action)
            # Intersect from the smaller side so neither many wildcard-principal rules nor
            # many wildcard-action rules make one lookup linear.
            if len(by_action) <= len(named) + len(self._any_principal) + len(self._glob_principal):
                ids = sorted(i for i in by_action if rules[i].match_principal(principal))
            else:
                pool = set(named) | self._any_principal
                pool.update(i for i in self._glob_principal if rules[i].match_principal(principal))
                ids = sorted(i for i in pool if rules[i].match_action(action))
        found_rules = tuple(rules[i] for i in ids)
        groups = (
            (reason, tuple(r for r in found_rules if r.effect == effect))
            for effect, reason in _PRECEDENCE
        )
        no_match = self._no_match(principal, action, any(r.effect == "allow" for r in found_rules))
        constrained = tuple(r for r in found_rules if r.lineage is not None)
        last = (
            # Not ruled out yet: a lineage_violation. A multi-rule step (match None) whose
            # ``single`` is set: evaluate() hands it to _unmet.
            _Step(None, None, None, no_match, Reason.LINEAGE_VIOLATION, constrained)
            if constrained
            else _Step(_anything, "", None, no_match, no_match.reason, ())
        )
        found = (*(self._step(reason, g) for reason, g in groups if g), last)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[(principal, action)] = found
        return found


def compile_policy_set(
    sources: Sequence[tuple[str, Bundle]], digest: str, key_files: KeyFiles | None = None
) -> tuple[PolicySet | None, list[Problem]]:
    """Compile validated bundles (``(file, bundle)`` pairs, in file order) together.

    *key_files*: the approvers' JWKS files the loader read (see
    :data:`~bus_guard.policy._approvers.KeyFiles`); every file a bundle names must be in it.
    """
    problems: list[Problem] = []

    def bundle_problem(file: str, loc: tuple[str | int, ...], message: str) -> None:
        problems.append(Problem(file, None, None, loc, message))

    keys = approver_keys(sources, key_files or {}, bundle_problem)
    rules: list[CompiledRule] = []
    where: dict[str, tuple[str, int]] = {}  # rule id -> (file, index) where first seen
    bundle_files: dict[str, str] = {}
    shared: dict[Any, Predicate] = {}  # rules with the same condition share its closure
    infos = []
    declared: list[tuple[str, Mapping[str, str]]] = []
    for file, bundle in sources:
        if (other := bundle_files.setdefault(bundle.bundle, file)) != file:
            message = f"bundle name {bundle.bundle!r} is also used by {other}"
            problems.append(Problem(file, None, None, ("bundle",), message))
        schemas = [(k, parse_action_pattern(k), decl) for k, decl in bundle.schemas.items()]
        declared += bundle.schemas.items()
        for index, rule in enumerate(bundle.rules):
            if rule.id in where:
                message = f"duplicate rule id, first defined in {where[rule.id][0]}"
                problems.append(Problem(file, rule.id, index, ("id",), message))
                continue
            where[rule.id] = (file, index)
            rules.append(compile_rule(rule, index, bundle, file, schemas, problems, shared))
        infos.append(
            BundleInfo(bundle.bundle, bundle.version, file, len(bundle.rules), bundle.description)
        )
    first_file, first = sources[0] if sources else ("", None)
    for file, bundle in sources:
        if first is not None and bundle.mode != first.mode:
            message = (
                f"mode {bundle.mode!r} differs from {first.mode!r} in {first_file};"
                " bundles loaded together must share one mode"
            )
            problems.append(Problem(file, None, None, ("mode",), message))
    _duplicate_limit_names(rules, where, problems)
    for dead, outer in shadowed(rules):
        message = (
            f"unreachable: {outer.effect} rule {outer.id!r} ({outer.file}) applies without"
            " condition to every principal, action and resource this rule matches"
        )
        problems.append(Problem(dead.file, dead.id, where[dead.id][1], (), message))
    if problems:
        return None, problems
    mode = first.mode if first is not None else "enforce"
    policy_set = PolicySet(rules, infos, digest, mode, declared, keys)
    log.debug("compiled %s: %d rules, %s", policy_set.version, policy_set.rule_count, digest)
    return policy_set, []


def _duplicate_limit_names(
    rules: Sequence[CompiledRule], where: Mapping[str, tuple[str, int]], problems: list[Problem]
) -> None:
    """Limit names are unique in the policy set: the intake keys its counters by them."""
    named: dict[str, CompiledRule] = {}  # limit name -> the first rule that has it
    for rule in rules:
        for i, spec in enumerate(rule.limits):
            first = named.setdefault(spec.name, rule)
            if first is rule and all(s.name != spec.name for s in rule.limits[:i]):
                continue
            other = "this rule" if first is rule else f"rule {first.id!r} ({first.file})"
            message = (
                f"duplicate limit name {spec.name!r}, also used by {other};"
                " limit names are unique in the policy set"
            )
            given = spec.name != f"{rule.id}/{i}"  # named in the rule, not by default
            loc: tuple[str | int, ...] = ("limits", i, "name") if given else ("limits", i)
            problems.append(Problem(rule.file, rule.id, where[rule.id][1], loc, message))


def _combined(terms: Sequence[HoldTerms | None]) -> HoldTerms:
    """The terms of a hold by several escalate rules: every rule's terms must be met, so
    the approvers all of them accept, the largest quorum, the shortest ttl. (When fewer
    approvers remain than the quorum, the hold can only expire.)"""
    given = [t for t in terms if t is not None]  # every escalate rule has terms
    if len(given) == 1:
        return given[0]
    approvers = set(given[0].approvers).intersection(*(t.approvers for t in given[1:]))
    return HoldTerms(
        tuple(sorted(approvers)), max(t.quorum for t in given), min(t.ttl_s for t in given)
    )


def _fits(value: object, kind: str) -> bool:
    """Whether *value* (a decoded JSON / msgpack value) is of the declared *kind*."""
    match kind:
        case "number":
            return type(value) is int or type(value) is float
        case "integer":
            return type(value) is int or (type(value) is float and value.is_integer())
        case "string":
            return type(value) is str
        case "boolean":
            return type(value) is bool
        case "list":
            return type(value) is list or type(value) is tuple
        case "object":
            return type(value) is dict
    return True  # "any"


def _wrong_type(declared: tuple[tuple[str, str, str], ...], params: dict[str, Any]) -> str | None:
    """Why *params* break a declared type; ``None`` if they do not.

    Conditions never hold on a value of the wrong type (a string is not ``gt 10000``), so
    a deny rule would not apply to ``"amount": "99999"``: where a bundle declares a param's
    type, an intent that sends another type is malformed, whatever the rules say. A
    missing or null param is for the rules to judge (``exists``)."""
    for schema, name, kind in declared:
        value = params.get(name)
        if value is not None and not _fits(value, kind):
            got = type(value).__name__
            return f"params.{name} is {got}, but schema {schema!r} declares {kind}"
    return None
