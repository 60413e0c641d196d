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
when one allowing rule has no limits: it allows unlimited). Every rule's own decision is
built when the set compiles; decisions of several rules are memoised per (reason, rules).
The evaluator never denies for a limit: spending them is the intake's, at run time.

**Cost per request depends on neither the rule count nor what was asked before.** There
is no per-(principal, action) cache: every request walks one index, three levels deep.

1. *Principal classes.* A rule is filed under what its principals name: ``*`` (one class
   every principal is in), a principal id, a group (of its bundle) or a glob. A rule for
   any principal whose condition requires a principal attribute's value (``all`` of
   ``principal.dept eq d7``, or ``in [...]``) is filed under that value instead: as far
   as the index goes, a department is a group. Each principal's classes are resolved at
   compile time (its id, its groups, its attribute values, the globs it matches, ``*``);
   a principal no policy names is in ``*`` and the globs it matches.
2. *Action keys.* Under a class, rules are filed by their action patterns as written;
   a request looks up each pattern its action matches (:class:`ActionKeys`: itself, its
   ``p.>`` prefixes, ``>``, the ``*`` patterns from a trie).
3. *Resources.* A (class, action pattern) bucket of a few rules is a short tuple tested
   in order; a larger one (:class:`_Big`) is a :class:`GlobIndex` over the rules'
   resource patterns (exact values, literal starts, literal ends), so ten thousand
   ``zone<i>/*`` denies for anyone cost a few dict lookups; its rules for any resource
   whose condition requires a param's value (``params.to eq acct-7``) are found by the
   request's value of that param.

Only the rules found that way have their condition tested; rules of one bucket with the
same resources and the same (hash-consed) condition are one entry, tested once. A rule
naming many principal classes and many actions (their product over
:data:`PRODUCT_LIMIT`) is filed under one side only and checks the other.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from bus_guard.decision import Decision, Effect, HoldTerms, LimitSpec, Mode, Reason, Request
from bus_guard.policy._approvers import ApproverKeys, KeyFiles, approver_keys
from bus_guard.policy._conditions import (
    Attributes,
    ConditionTrace,
    Getter,
    LeafNode,
    Predicate,
    conjuncts,
    trace,
)
from bus_guard.policy._lineage import ConstraintTrace
from bus_guard.policy._model import Bundle
from bus_guard.policy._patterns import (
    ActionIndex,
    ActionKeys,
    GlobIndex,
    is_glob,
    parse_action_pattern,
)
from bus_guard.policy._rules import (
    BundleContext,
    CompiledRule,
    Problem,
    compile_rule,
    shadowed,
)
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

# Bound of the memo of decisions naming several rules, (reason, rule ids) -> Decision
# (cleared when full); an entry is well under 1 KiB.
CACHE_SIZE: Final = 16384
# A (class, action) bucket of at most this many entries is a tuple tested in order; a
# larger one indexes its resource patterns.
SMALL_BUCKET: Final = 4
# A rule is filed under (principal class x action pattern) pairs; one naming more pairs
# than this is filed under its classes (or its actions, if fewer) and checks the other
# side when found, so a rule listing 1,000 principals and 1,000 actions is not a million
# entries.
PRODUCT_LIMIT: Final = 64

Key = tuple[Any, ...]  # a principal class: ("*",), ("i", id), ("g", bundle, group), ...
# (literal start and end the resource must have, "" for none, and where the end may
# begin; or its matcher instead of them; check or None; rule positions; lineage or None)
Entry = tuple[
    str,
    str,
    int,
    Callable[[str], bool] | None,
    Predicate | None,
    tuple[int, ...],
    Predicate | None,
]
Bucket: TypeAlias = "tuple[Entry, ...] | _Big"
ByAction = dict[str, Bucket]
_ANY: Final[Key] = ("*",)
_NO_BUCKETS: Final[ByAction] = {}


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


_RANK: Final = {"deny": 0, "escalate": 1, "allow": 2}
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


def _tag(value: object) -> str | None:
    """The kind a typed comparison tells apart (``1`` equals ``1.0``, never ``true``)."""
    kind = type(value)
    if kind is str:
        return "s"
    if kind is bool:
        return "b"
    if kind is int or kind is float:
        return "n"
    return None


def _value_classes(bundle: str, name: str, value: object) -> list[Key]:
    """The attribute classes of a principal whose attribute *name* is *value*: ``v`` for a
    scalar (what ``eq`` and ``in`` test), ``e`` for each scalar of a list (``in`` only)."""
    return [(kind, bundle, name, *rest) for kind, *rest in _value_keys(value)]


def _equal_keys(leaf: LeafNode) -> list[Key] | None:
    """The keys of the values for which *leaf* (``eq`` or ``in``) can hold: ``v`` for a
    scalar value (what ``eq`` and ``in`` test), ``e`` for a scalar in a list value (what
    ``in`` tests); ``None`` for another operator."""
    if leaf.op == "eq" and (tag := _tag(leaf.value)) is not None:
        return [("v", tag, leaf.value)]
    if leaf.op == "in":
        tagged = [(t, x) for x in leaf.value if (t := _tag(x)) is not None]
        return [(kind, t, x) for t, x in tagged for kind in ("v", "e")]
    return None


def _value_keys(value: object) -> list[Key]:
    """The keys under which :func:`_equal_keys` files the comparisons *value* meets."""
    if (tag := _tag(value)) is not None:
        return [("v", tag, value)]
    if type(value) is list:
        return [("e", t, x) for x in value if (t := _tag(x)) is not None]
    return []


def _leaf_classes(bundle: str, leaf: LeafNode) -> list[Key] | None:
    """The attribute classes a principal must be in for *leaf* (``principal.<a> eq`` or
    ``in``) to hold; ``None`` when it is not such a comparison."""
    name = leaf.field.removeprefix("principal.")
    if name == leaf.field or "." in name or (keys := _equal_keys(leaf)) is None:
        return None
    return [(kind, bundle, name, *rest) for kind, *rest in keys]


def _class_counts(attributes: Attributes, bundle: str, name: str) -> dict[Key, int]:
    """How many principals are in each attribute class of attribute *name*."""
    counts: dict[Key, int] = {}
    for value in attributes.table(name).values():
        for key in _value_classes(bundle, name, value):
            counts[key] = counts.get(key, 0) + 1
    return counts


class _Index:
    """The three-level index under construction (see the module docstring)."""

    def __init__(
        self, order: Sequence[CompiledRule], contexts: Mapping[str, BundleContext]
    ) -> None:
        self.contexts = contexts
        self.counts: dict[tuple[str, str], dict[Key, int]] = {}  # (bundle, attribute) -> ...
        # class -> action pattern -> [(position, rule, check, lineage)]
        self.placed: dict[Key, dict[str, list[tuple[int, CompiledRule, Predicate | None]]]] = {}
        self.allow_keys: dict[Key, set[str]] = {}  # class -> actions of its allow rules
        self.wide_allows: list[CompiledRule] = []  # allow rules filed under one side only
        for position, rule in enumerate(order):
            self._place(position, rule)

    def _place(self, position: int, rule: CompiledRule) -> None:
        pattern_classes = self._pattern_classes(rule)
        classes = pattern_classes
        if rule.any_principal and (narrow := self._attribute_classes(rule)) is not None:
            classes = narrow
        actions = list(dict.fromkeys(rule.actions))
        check = rule.when
        if len(classes) * len(actions) > PRODUCT_LIMIT:
            if len(actions) >= len(classes):
                match_action = rule.match_action
                check = _gated(lambda r: match_action(r.action), check)
                actions = [">"]
            else:
                match_principal = rule.match_principal
                check = _gated(lambda r: match_principal(r.principal), check)
                classes = [_ANY]
            if rule.effect == "allow":
                self.wide_allows.append(rule)
        elif rule.effect == "allow":
            for key in pattern_classes:
                self.allow_keys.setdefault(key, set()).update(actions)
        for key in classes:
            by_action = self.placed.setdefault(key, {})
            for action in actions:
                by_action.setdefault(action, []).append((position, rule, check))

    def _pattern_classes(self, rule: CompiledRule) -> list[Key]:
        if rule.any_principal:
            return [_ANY]
        globs = [("p", glob) for glob in rule.principal_globs]
        if rule.bundle not in self.contexts:  # groups unknown: each member is its own class
            return list(dict.fromkeys([*(("i", p) for p in sorted(rule.principal_ids)), *globs]))
        ids = [
            ("i", p)
            for p in rule.principals
            if not p.startswith("group:") and not is_glob(p) and p.strip("*")
        ]
        groups = [("g", rule.bundle, name) for name in rule.groups]
        return list(dict.fromkeys([*ids, *groups, *globs]))

    def _attribute_classes(self, rule: CompiledRule) -> list[Key] | None:
        """For a rule of any principal, the classes of its narrowest top-level
        ``principal.<a> eq / in`` comparison, if it has one."""
        context = self.contexts.get(rule.bundle)
        if context is None:
            return None
        options: list[list[Key]] = [
            found
            for leaf in conjuncts(rule.condition)
            if (found := _leaf_classes(rule.bundle, leaf))
        ]
        if not options:
            return None

        def holders(classes: list[Key]) -> int:
            _, bundle, name, _, _ = classes[0]
            counts = self.counts.get((bundle, name))
            if counts is None:
                counts = _class_counts(context.attributes, bundle, name)
                self.counts[(bundle, name)] = counts
            return sum(counts.get(key, 0) for key in classes)

        narrowest = sorted((holders(found), i) for i, found in enumerate(options))[0][1]
        return list(dict.fromkeys(options[narrowest]))

    def buckets(self) -> dict[Key, ByAction]:
        return {
            key: {action: _bucket(placed) for action, placed in by_action.items()}
            for key, by_action in self.placed.items()
        }


def _gated(gate: Predicate, check: Predicate | None) -> Predicate:
    if check is None:
        return gate
    return lambda r: gate(r) and check(r)


def _bucket(placed: Sequence[tuple[int, CompiledRule, Predicate | None]]) -> Bucket:
    """Rules of one (class, action pattern): rules with the same resources, check and no
    lineage constraints are one entry; a few entries are a tuple, more a GlobIndex."""
    grouped: dict[tuple[Any, ...], list[int]] = {}
    rules: dict[tuple[Any, ...], tuple[CompiledRule, Predicate | None]] = {}
    for position, rule, check in placed:
        # Lineage-constrained rules are their own entries: their constraints differ.
        key = (rule.resources, id(check), rule.id if rule.lineage is not None else None)
        grouped.setdefault(key, []).append(position)
        rules.setdefault(key, (rule, check))
    entries = []
    for key, positions in grouped.items():
        rule, check = rules[key]
        lineage = rule.lineage.holds if rule.lineage is not None else None
        entries.append((rule, check, tuple(sorted(set(positions))), lineage))
    if len(entries) <= SMALL_BUCKET:
        return tuple(
            (*_resource_test(rule), check, ids, lineage) for rule, check, ids, lineage in entries
        )
    # Many entries: by resource, except those for any resource that require a param's
    # value (a deny-list written a rule per value), which are found by that value.
    by_param: dict[str, tuple[Getter, dict[Key, list[Entry]]]] = {}
    by_resource = []
    for rule, check, ids, lineage in entries:
        entry: Entry = ("", "", 0, None, check, ids, lineage)
        if any(p.strip("*") == "" for p in rule.resources):
            for leaf in conjuncts(rule.condition):
                if leaf.field.startswith("params.") and (keys := _equal_keys(leaf)):
                    table = by_param.setdefault(leaf.field, (leaf.get, {}))[1]
                    for key in dict.fromkeys(keys):
                        table.setdefault(key, []).append(entry)
                    break
            else:
                by_resource += [(p, entry) for p in dict.fromkeys(rule.resources)]
        else:
            by_resource += [(p, entry) for p in dict.fromkeys(rule.resources)]
    return _Big(
        GlobIndex(by_resource),
        tuple((get, {k: tuple(v) for k, v in table.items()}) for get, table in by_param.values()),
    )


def _resource_test(rule: CompiledRule) -> tuple[str, str, int, Callable[[str], bool] | None]:
    """How a bucket tests a rule's resources: one ``p*``, ``*s`` or ``p*s`` inline, with
    ``str.startswith`` and ``endswith`` from ``len(p)`` (the start and end never share
    characters, as :func:`~bus_guard.policy._patterns.glob_matcher` has it; no call to a
    matcher for the common patterns, once per entry a request meets), ``*`` not at all,
    else the rule's matcher."""
    if any(p.strip("*") == "" for p in rule.resources):
        return "", "", 0, None
    if len(rule.resources) == 1:
        (pattern,) = rule.resources
        if pattern.count("*") == 1 and "?" not in pattern:
            head, _, tail = pattern.partition("*")
            return head, tail, len(head), None
    return "", "", 0, rule.match_resource


class _Big:
    """A bucket of many entries: found by resource (:class:`GlobIndex`) and, for entries
    of any resource whose condition requires a param's value (``all`` of ``params.<p> eq``
    or ``in``), by the request's value of that param."""

    __slots__ = ("by_param", "resources")

    def __init__(
        self,
        resources: GlobIndex[Entry],
        by_param: tuple[tuple[Getter, dict[Key, tuple[Entry, ...]]], ...],
    ) -> None:
        self.resources = resources
        self.by_param = by_param

    def find(self, request: Request) -> list[Entry]:
        """Every entry that may apply: the rest of its check decides."""
        found = self.resources.match(request.resource)
        for get, table in self.by_param:
            for key in _value_keys(get(request)):
                hit = table.get(key)
                if hit is not None:
                    found += hit
        return found

    def entries(self) -> list[Entry]:
        return [
            *self.resources.payloads(),
            *{id(e): e for _, t in self.by_param for es in t.values() for e in es}.values(),
        ]


def _entries(bucket: Bucket) -> Sequence[Entry]:
    return bucket if type(bucket) is tuple else bucket.entries()  # type: ignore[union-attr]


class PolicySet:
    """The compiled, immutable policy: ``evaluate`` is the hot path, ``explain`` the slow one."""

    __slots__ = (
        "_actions",
        "_allow_keys",
        "_any",
        "_approver_keys",
        "_by_id",
        "_by_positions",
        "_decisions",
        "_deny_end",
        "_escalate_end",
        "_glob_flags",
        "_globs",
        "_index",
        "_infos",
        "_named_actions",
        "_order",
        "_principals",
        "_rules",
        "_schema_decls",
        "_schema_index",
        "_schema_named",
        "_schema_wild",
        "_single",
        "_wide_allows",
        "digest",
        "mode",
        "version",
    )

    digest: str
    version: str
    mode: Mode
    _rules: tuple[CompiledRule, ...]  # by id
    _order: tuple[CompiledRule, ...]  # by (effect: deny, escalate, allow; id): positions
    _deny_end: int  # positions below it are deny rules
    _escalate_end: int  # ... below it (and not deny), escalate rules; the rest allow
    _by_id: dict[str, CompiledRule]
    _approver_keys: ApproverKeys
    _infos: tuple[BundleInfo, ...]
    _index: dict[Key, ByAction]
    _actions: ActionKeys
    _named_actions: Mapping[str, Sequence[str]]  # the keys of the actions rules name exactly
    # principal id -> (its classes' buckets, its pattern classes' allow actions)
    _principals: dict[str, tuple[tuple[ByAction, ...], tuple[frozenset[str], ...]]]
    _any: tuple[tuple[ByAction, ...], tuple[frozenset[str], ...]]  # ("*",): everyone's
    _globs: GlobIndex[ByAction] | None  # principal globs rules are filed under
    _glob_flags: GlobIndex[frozenset[str]] | None  # ... and their allow rules' actions
    _allow_keys: dict[Key, frozenset[str]]
    _wide_allows: tuple[CompiledRule, ...]
    _single: tuple[Decision, ...]  # by position: the decision of that rule alone
    _decisions: dict[tuple[Reason, tuple[str, ...]], Decision]
    _by_positions: dict[tuple[int, ...], Decision]  # the same, by the rules' positions
    _schema_decls: tuple[tuple[tuple[str, str, str], ...], ...]
    _schema_index: ActionIndex
    _schema_named: dict[str, tuple[tuple[str, str, str], ...]]
    _schema_wild: bool

    def __init__(
        self,
        rules: Sequence[CompiledRule],
        infos: Sequence[BundleInfo],
        digest: str,
        mode: Mode,
        schemas: Sequence[tuple[str, Mapping[str, str]]] = (),
        approver_keys: ApproverKeys | None = None,
        contexts: Mapping[str, BundleContext] | None = None,
        version_affixes: tuple[str, str] = ("", ""),
    ) -> None:
        """*contexts*: each bundle's groups and principal attributes (by bundle name), to
        file rules under groups and attribute values; without them a rule is filed under
        each member of its groups, and never under attribute values. *version_affixes*:
        put before and after the bundles' versions in ``version`` (a constitution's
        ``constitution/``, a bundle's ``;rev=N``), which every decision names."""
        by_id = tuple(sorted(rules, key=lambda r: r.id))
        order = tuple(sorted(rules, key=lambda r: (_RANK[r.effect], r.id)))
        typed = [(key, decl) for key, decl in schemas if any(k != "any" for k in decl.values())]
        decls = tuple(tuple((key, n, k) for n, k in decl.items()) for key, decl in typed)
        infos_ = tuple(sorted(infos, key=lambda b: b.name))
        ends = [sum(1 for r in order if _RANK[r.effect] <= rank) for rank in (0, 1)]
        contexts = contexts or {}
        index = _Index(order, contexts)
        buckets = index.buckets()
        actions = ActionKeys(a for by_action in buckets.values() for a in by_action)
        allow_keys = {k: frozenset(v) for k, v in index.allow_keys.items()}
        fields: dict[str, object] = {
            "digest": digest,
            "mode": mode,
            "version": version_affixes[0]
            + ",".join(f"{b.name}@{b.version}" for b in infos_)
            + version_affixes[1],
            "_rules": by_id,
            "_order": order,
            "_deny_end": ends[0],
            "_escalate_end": ends[1],
            "_by_id": {r.id: r for r in by_id},
            "_approver_keys": dict(approver_keys or {}),
            "_infos": infos_,
            "_index": buckets,
            "_actions": actions,
            "_named_actions": actions.named,
            "_allow_keys": allow_keys,
            "_wide_allows": tuple(index.wide_allows),
            "_decisions": {},  # (reason, rule ids) -> Decision, bounded by CACHE_SIZE
            "_by_positions": {},  # (positions) -> Decision, the same bound
            # Declared param types: (schema key, param, type) per schema; the declarations
            # covering each action a schema names exactly, computed here; others (only if
            # some schema key is a wildcard) on each request, from the trie.
            "_schema_decls": decls,
            "_schema_index": ActionIndex(
                (parse_action_pattern(key), i) for i, (key, _) in enumerate(typed)
            ),
            "_schema_wild": any("*" in key or ">" in key for key, _ in typed),
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)
        named = {key: self._declared(key) for key, _ in typed if "*" not in key and ">" not in key}
        object.__setattr__(self, "_schema_named", named)
        object.__setattr__(
            self, "_single", tuple(self._ruled_once(_reason(r), (r.id,)) for r in order)
        )
        self._resolve_principals(contexts)

    def _resolve_principals(self, contexts: Mapping[str, BundleContext]) -> None:
        """Each principal a rule can single out, with its classes; and the classes of the
        rest (``*`` and the globs they match)."""
        index, allow_keys = self._index, self._allow_keys
        globs = [key for key in index if key[0] == "p"]
        glob_index = GlobIndex((key[1], key) for key in globs) if globs else None
        classes: dict[str, list[Key]] = {}
        for key in dict.fromkeys([*index, *allow_keys]):
            if key[0] == "i":
                classes.setdefault(key[1], []).append(key)
            elif key[0] == "g":
                for pid in contexts[key[1]].groups[key[2]]:
                    classes.setdefault(pid, []).append(key)
        wanted: dict[tuple[str, str], set[Key]] = {}
        for key in index:
            if key[0] in ("v", "e"):
                wanted.setdefault((key[1], key[2]), set()).add(key)
        for (bundle, name), keys in wanted.items():
            for pid, value in contexts[bundle].attributes.table(name).items():
                for key in _value_classes(bundle, name, value):
                    if key in keys:
                        classes.setdefault(pid, []).append(key)

        def resolve(keys: Iterable[Key]) -> tuple[tuple[ByAction, ...], tuple[frozenset[str], ...]]:
            keys = list(dict.fromkeys(keys))
            return (
                tuple(index[k] for k in keys if k in index),
                tuple(allow_keys[k] for k in keys if k in allow_keys),
            )

        tail = [_ANY]
        principals = {
            pid: resolve([*keys, *(glob_index.match(pid) if glob_index is not None else ()), *tail])
            for pid, keys in classes.items()
        }
        object.__setattr__(self, "_principals", principals)
        object.__setattr__(self, "_any", resolve(tail))
        # Principals no rule names: the globs they match, looked up on each request.
        object.__setattr__(
            self, "_globs", GlobIndex((key[1], index[key]) for key in globs) if globs else None
        )
        flags = [key for key in allow_keys if key[0] == "p"]
        object.__setattr__(
            self,
            "_glob_flags",
            GlobIndex((key[1], allow_keys[key]) for key in flags) if flags else None,
        )

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

    def _classes(self, principal: str) -> tuple[ByAction, ...]:
        """The buckets of every class *principal* is in."""
        found = self._principals.get(principal)
        if found is not None:
            return found[0]
        if self._globs is None:
            return self._any[0]
        return (*self._globs.match(principal), *self._any[0])

    def _flags(self, principal: str) -> tuple[frozenset[str], ...]:
        """For each class *principal* is in, the action patterns of its allow rules."""
        found = self._principals.get(principal)
        if found is not None:
            return found[1]
        if self._glob_flags is None:
            return self._any[1]
        return (*self._glob_flags.match(principal), *self._any[1])

    def candidates(self, principal: str, action: str) -> tuple[str, ...]:
        """Ids of the rules whose principal and action patterns match (before resource
        and condition) among those ``evaluate`` looks at: a rule for any principal that
        requires an attribute value the principal lacks is not looked at."""
        keys = self._actions.keys(action)
        found: set[int] = set()
        for by_action in self._classes(principal):
            for key in keys:
                bucket = by_action.get(key)
                if bucket is not None:
                    found.update(i for entry in _entries(bucket) for i in entry[5])
        rules = (self._order[i] for i in found)
        return tuple(
            sorted(r.id for r in rules if r.match_principal(principal) and r.match_action(action))
        )

    def evaluate(self, request: Request) -> Decision:
        action = request.action
        if self._schema_decls:
            declared = self._schema_named.get(action)
            if declared is None:
                declared = self._declared(action) if self._schema_wild else ()
            if declared and (wrong := _wrong_type(declared, request.params)) is not None:
                return self._decision(Reason.MALFORMED, (), wrong)
        principal = request.principal
        found = self._principals.get(principal)
        if found is None and self._globs is None:
            found = self._any  # a principal no rule names: in "*" only
        classes = found[0] if found is not None else self._classes(principal)
        keys = self._named_actions.get(action)
        if keys is None:
            keys = self._actions.keys(action)
        resource = request.resource
        hits: list[int] = []
        unmet: list[int] | None = None  # allow rules that failed their lineage alone
        for by_action in classes:
            for key in keys:
                bucket = by_action.get(key)
                if bucket is None:
                    continue
                for head, tail, start, res, check, ids, lineage in (
                    bucket if type(bucket) is tuple else bucket.find(request)  # type: ignore[union-attr]
                ):
                    if res is not None:
                        if not res(resource):
                            continue
                    elif (head and not resource.startswith(head)) or (
                        tail and not resource.endswith(tail, start)
                    ):
                        continue
                    if check is None or check(request):
                        if lineage is None or lineage(request):
                            hits += ids
                        elif unmet is None:
                            unmet = list(ids)
                        else:
                            unmet += ids
        if hits:
            if len(hits) == 1:
                return self._single[hits[0]]
            return self._many(hits)
        # Whether some allow rule's principal and action patterns matched (its resource,
        # condition or lineage did not): the denial says so.
        for actions in found[1] if found is not None else self._flags(principal):
            if not actions.isdisjoint(keys):
                allow = True
                break
        else:
            allow = bool(self._wide_allows) and self._wide_allowed(principal, action)
        no_match = self._no_match(principal, action, allow)
        if unmet:
            order = self._order
            return self._unmet(request, [order[i] for i in sorted(set(unmet))], no_match)
        return no_match

    def _many(self, hits: list[int]) -> Decision:
        """The decision of several hits (maybe one rule found twice): the strongest
        effect's rules, by id."""
        first = min(hits)
        if first < self._deny_end:
            end, reason = self._deny_end, Reason.DENIED_BY_RULE
        elif first < self._escalate_end:
            end, reason = self._escalate_end, Reason.ESCALATED_BY_RULE
        else:
            end, reason = len(self._order), Reason.ALLOWED_BY_RULE
        group = [i for i in hits if i < end]
        if len(group) == 1 or len(group := sorted(set(group))) == 1:  # a deny over allows
            return self._single[first]
        key = tuple(group)
        decision = self._by_positions.get(key)
        if decision is None:
            order = self._order
            decision = self._ruled(reason, tuple(order[i].id for i in group))
            if len(self._by_positions) >= CACHE_SIZE:
                self._by_positions.clear()
            self._by_positions[key] = decision
        return decision

    def _wide_allowed(self, principal: str, action: str) -> bool:
        """Whether an allow rule filed under one side only matches both."""
        return any(
            r.match_principal(principal) and r.match_action(action) for r in self._wide_allows
        )

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
        # Building a decision costs more than the rest of an evaluation, and the same
        # rule set decides over and over: reuse the (immutable) value.
        if len(rules) == 1 and reason is _reason(rule := self._by_id[rules[0]]):
            return self._single[self._position(rule)]
        decision = self._decisions.get((reason, rules))
        if decision is None:
            decision = self._ruled_once(reason, rules)
            if len(self._decisions) >= CACHE_SIZE:
                self._decisions.clear()
            self._decisions[(reason, rules)] = decision
        return decision

    def _position(self, rule: CompiledRule) -> int:
        low, high = 0, len(self._order)
        key = (_RANK[rule.effect], rule.id)
        while low < high:  # binary search: explain's path, not evaluate's
            mid = (low + high) // 2
            other = self._order[mid]
            if (_RANK[other.effect], other.id) < key:
                low = mid + 1
            else:
                high = mid
        return low

    def _ruled_once(self, reason: Reason, rules: tuple[str, ...]) -> Decision:
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
        return self._decision(
            reason,
            rules,
            f"{_MESSAGES[reason]}{plural} {', '.join(rules)}",
            hold=hold,
            taints=taints,
            limits=limits,
        )

    def _no_match(self, principal: str, action: str, allow_rules: bool) -> Decision:
        message = f"no rule allows {principal} {action}"
        if allow_rules:  # some allow rule covers the pair: its resource or condition failed
            message += " with this resource and params"
        # Positional, in Decision's field order: a fraction of the keyword cost.
        return Decision(
            Effect.DENY,
            Reason.NO_MATCHING_RULE,
            (),
            message,
            self.digest,
            self.version,
            self.mode,
        )

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

    def _declared(self, action: str) -> tuple[tuple[str, str, str], ...]:
        """Every (schema, param, type) the bundles declare for *action*."""
        decls = self._schema_decls
        return tuple(d for i in sorted(self._schema_index.match(action)) for d in decls[i])


_REASONS: Final = dict(_PRECEDENCE)


def _reason(rule: CompiledRule) -> Reason:
    return _REASONS[rule.effect]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a policy set compiles, then one collection of
    the young objects it made.

    Compiling 10,000 rules allocates about a million objects, none of them garbage in a
    cycle; the collector, triggered every 700 allocations, walked the growing heap over
    and over: 35-40 % of the compile time. Paused and paid once at the end (a pass over
    what is new), 0.68 s became 0.52 s for 10,000 rules (``bench.decide``'s tenants).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect(0)


def compile_policy_set(
    sources: Sequence[tuple[str, Bundle]],
    digest: str,
    key_files: KeyFiles | None = None,
    version_affixes: tuple[str, str] = ("", ""),
) -> tuple[PolicySet | None, list[Problem]]:
    """Compile validated bundles (``(file, bundle)`` pairs, in file order) together.

    *key_files*: the approvers' JWKS files the loader read (see
    :data:`~bus_guard.policy._approvers.KeyFiles`); every file a bundle names must be in it.
    *version_affixes*: see :class:`PolicySet`.
    """
    with _collector_paused():
        return _compile(sources, digest, key_files, version_affixes)


def _compile(
    sources: Sequence[tuple[str, Bundle]],
    digest: str,
    key_files: KeyFiles | None,
    version_affixes: tuple[str, str] = ("", ""),
) -> tuple[PolicySet | None, list[Problem]]:
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
    contexts: dict[str, BundleContext] = {}
    for file, bundle in sources:
        if (other := bundle_files.setdefault(bundle.bundle, file)) != file:
            message = f"bundle name {bundle.bundle!r} is also used by {other}"
            problems.append(Problem(file, None, None, ("bundle",), message))
        schemas = [(k, parse_action_pattern(k), decl) for k, decl in bundle.schemas.items()]
        declared += bundle.schemas.items()
        context = contexts[bundle.bundle] = BundleContext.of(bundle, schemas)
        for index, rule in enumerate(bundle.rules):
            if rule.id in where:
                message = f"duplicate rule id, first defined in {where[rule.id][0]}"
                problems.append(Problem(file, rule.id, index, ("id",), message))
                continue
            where[rule.id] = (file, index)
            rules.append(
                compile_rule(rule, index, bundle, file, schemas, problems, shared, context)
            )
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
    policy_set = PolicySet(
        rules, infos, digest, mode, declared, keys, contexts, version_affixes=version_affixes
    )
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
