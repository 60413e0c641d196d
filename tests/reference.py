"""The reference interpreter of SCENARIOS S16: a direct reading of SPEC §4-§5 and the README
("Decisions", "Conditions", "Approvals, taints and lineage constraints", "Limits") with its
own matching code: no index, no cache, no compiled closures.

:func:`reference` decides a request against plain bundle data (:class:`RefBundle`: the
groups, principal attributes, rules, approvers and schemas as written in YAML). The
differential test (``tests/test_differential.py``) compares ``PolicySet.evaluate`` with it
on random bundles; ``bench.decide`` checks every benchmark family against it before timing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bus_guard.decision import Effect, HoldTerms, LimitSpec, Reason, Request

__all__ = ("MISSING", "Outcome", "RefBundle", "reference")

Limits = tuple[tuple[LimitSpec, ...], ...]
# effect, reason, rule ids, taints (allow), hold terms (hold), limits (allow)
Outcome = tuple[Effect, Reason, tuple[str, ...], tuple[str, ...], HoldTerms | None, Limits]


MISSING: Any = object()


@dataclass(frozen=True)
class RefBundle:
    groups: Mapping[str, list[str]]
    principals: Mapping[str, Mapping[str, Any]]
    rules: list[dict[str, Any]]
    approvers: Mapping[str, Any] = field(default_factory=dict)
    schemas: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@functools.cache
def _glob_regex(pattern: str) -> re.Pattern[str]:
    # Compiled once per pattern: the benchmark families hold thousands of distinct globs,
    # more than the re module's own cache keeps.
    return re.compile(
        "".join("(?s:.*)" if c == "*" else "(?s:.)" if c == "?" else re.escape(c) for c in pattern)
    )


def glob_matches(pattern: str, value: str) -> bool:
    """``*`` any run of characters (newlines too), ``?`` one character, all else literal."""
    return _glob_regex(pattern).fullmatch(value) is not None


def action_matches(pattern: list[str], action: list[str]) -> bool:
    """NATS subjects: ``*`` exactly one token, ``>`` (last) one or more."""
    if not pattern:
        return not action
    if pattern[0] == ">":
        return len(action) >= 1
    return (
        bool(action) and pattern[0] in ("*", action[0]) and action_matches(pattern[1:], action[1:])
    )


def principal_matches(pattern: str, principal: str, bundle: RefBundle) -> bool:
    if pattern.startswith("group:"):
        return principal in bundle.groups[pattern.removeprefix("group:")]
    return glob_matches(pattern, principal)


def lookup(path: str, request: Request, bundle: RefBundle) -> Any:
    """The field's value, or MISSING (absent or null)."""
    root, _, rest = path.partition(".")
    value: Any
    if root == "params":
        value = request.params
        for key in rest.split("."):
            if not isinstance(value, dict) or key not in value:
                return MISSING
            value = value[key]
    elif path == "principal":
        value = request.principal
    elif root == "principal":
        value = bundle.principals.get(request.principal, {}).get(rest, MISSING)
    elif path == "resource":
        value = request.resource
    elif path == "action":
        value = request.action
    elif path == "lineage.depth":
        value = request.lineage_depth
    elif path == "lineage.root":
        value = request.lineage_root or MISSING  # no lineage root: absent
    elif path == "lineage.labels":
        value = sorted(request.labels)
    else:
        raise AssertionError(path)
    return MISSING if value is None else value


def kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"  # lists, mappings


def member(value: Any, listed: list[Any]) -> bool:
    return any(kind(value) == kind(x) and value == x for x in listed)


def holds(cond: dict[str, Any], request: Request, bundle: RefBundle) -> bool:
    if "all" in cond:
        return all(holds(c, request, bundle) for c in cond["all"])
    if "any" in cond:
        return any(holds(c, request, bundle) for c in cond["any"])
    if "not" in cond:
        return not holds(cond["not"], request, bundle)
    ((op, lit),) = ((k, v) for k, v in cond.items() if k != "field")
    value = lookup(cond["field"], request, bundle)
    if op == "exists":
        return (value is not MISSING) is lit
    if value is MISSING:
        return False
    if isinstance(value, list):  # list values: in = any element listed, not_in = none is
        if op == "in":
            return any(member(x, lit) for x in value)
        if op == "not_in":
            return not any(member(x, lit) for x in value)
        return False
    if op == "eq":
        return kind(value) == kind(lit) and value == lit
    if op == "ne":
        return kind(value) == kind(lit) and value != lit
    if op in ("lt", "le", "gt", "ge"):
        if kind(value) != "number":
            return False
        compared: dict[str, bool] = {
            "lt": value < lit,
            "le": value <= lit,
            "gt": value > lit,
            "ge": value >= lit,
        }
        return compared[op]
    if op == "in":
        return member(value, lit)
    if op == "not_in":
        return kind(value) in {kind(x) for x in lit} and not member(value, lit)
    assert op == "matches"
    return kind(value) == "string" and re.search(lit, value) is not None


def applies(rule: dict[str, Any], request: Request, bundle: RefBundle) -> bool:
    """Principal, action, resource and condition: everything but lineage constraints."""
    return (
        any(principal_matches(p, request.principal, bundle) for p in rule["principals"])
        and any(action_matches(a.split("."), request.action.split(".")) for a in rule["actions"])
        and any(glob_matches(r, request.resource) for r in rule["resources"])
        and ("when" not in rule or holds(rule["when"], request, bundle))
    )


def within(child: str, parent: str) -> bool:
    return child == parent or child.startswith((parent + "/", parent + ":"))


def lineage_holds(rule: dict[str, Any], request: Request) -> bool:
    """README: every constraint holds; a root intent fails requires_parent and
    within_parent."""
    constraints = rule.get("lineage", {})
    parents = request.lineage_parents
    if "max_depth" in constraints and request.lineage_depth > constraints["max_depth"]:
        return False
    if "requires_parent" in constraints and not any(
        action_matches(pattern.split("."), p.action.split("."))
        for pattern in constraints["requires_parent"]
        for p in parents
    ):
        return False
    for name in constraints.get("within_parent", ()):
        if not parents:
            return False
        if name == "resource":
            if not all(within(request.resource, p.resource) for p in parents):
                return False
            continue
        value = request.params.get(name.removeprefix("params."), MISSING)
        if kind(value) != "number":
            return False
        for p in parents:
            limit = p.scope.get(name.removeprefix("params."), MISSING)
            if kind(limit) != "number" or not value <= limit:
                return False
    return True


DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(ttl: Any) -> float:
    if isinstance(ttl, str):
        return float(ttl[:-1]) * DURATIONS[ttl[-1]]
    return float(ttl)


def terms(rule: dict[str, Any], bundle: RefBundle) -> HoldTerms:
    """README: default every approver of the bundle, quorum 1, ttl 24 h."""
    members = bundle.approvers.get("members", {})
    groups = bundle.approvers.get("groups", {})
    approval = rule.get("approval", {})
    eligible: set[str] = set()
    for name in approval.get("approvers", list(members)):
        eligible.update(groups.get(name, [name]))
    return HoldTerms(
        tuple(sorted(eligible)), approval.get("quorum", 1), seconds(approval.get("ttl", "24h"))
    )


def limit_specs(rule: dict[str, Any]) -> tuple[LimitSpec, ...]:
    """README "Limits": default name <rule id>/<index>, per principal; a count's max is
    its count; per group names the rule's one group."""
    out = []
    for i, limit in enumerate(rule.get("limits", ())):
        per = limit.get("per", "principal")
        out.append(
            LimitSpec(
                rule=rule["id"],
                name=limit.get("name", f"{rule['id']}/{i}"),
                kind="count" if "count" in limit else "sum",
                max=float(limit["count"] if "count" in limit else limit["max"]),
                window_s=seconds(limit["window"]),
                per=per,
                group=rule["principals"][0].removeprefix("group:") if per == "group" else "",
                param=limit.get("sum", ""),
            )
        )
    return tuple(out)


def malformed(bundles: list[RefBundle], request: Request) -> bool:
    """A param of another type than a bundle declares (null is missing, not a type)."""
    for bundle in bundles:
        for pattern, declared in bundle.schemas.items():
            if not action_matches(pattern.split("."), request.action.split(".")):
                continue
            for name, declared_kind in declared.items():
                value = request.params.get(name)
                if declared_kind == "number" and value is not None and kind(value) != "number":
                    return True
    return False


def reference(bundles: list[RefBundle], request: Request) -> Outcome:
    if malformed(bundles, request):
        return Effect.DENY, Reason.MALFORMED, (), (), None, ()
    hits: dict[str, list[tuple[str, dict[str, Any], RefBundle]]] = {
        "allow": [],
        "deny": [],
        "escalate": [],
    }
    unmet: list[str] = []  # allow rules that apply but for their lineage constraints
    for bundle in bundles:
        for rule in bundle.rules:
            if applies(rule, request, bundle):
                if rule["effect"] == "allow" and not lineage_holds(rule, request):
                    unmet.append(rule["id"])
                else:
                    hits[rule["effect"]].append((rule["id"], rule, bundle))
    if hits["deny"]:
        return Effect.DENY, Reason.DENIED_BY_RULE, ids(hits["deny"]), (), None, ()
    if hits["escalate"]:
        # Several rules: every rule's terms must be met.
        each = [terms(rule, bundle) for _, rule, bundle in hits["escalate"]]
        approvers = set.intersection(*(set(t.approvers) for t in each))
        hold = HoldTerms(
            tuple(sorted(approvers)), max(t.quorum for t in each), min(t.ttl_s for t in each)
        )
        return Effect.HOLD, Reason.ESCALATED_BY_RULE, ids(hits["escalate"]), (), hold, ()
    if hits["allow"]:
        taints = sorted({label for _, rule, _ in hits["allow"] for label in rule.get("labels", ())})
        # One group per allowing rule, by rule id; an unlimited rule allows unlimited.
        groups = tuple(limit_specs(rule) for _, rule, _ in sorted(hits["allow"], key=by_id))
        limits = groups if all(groups) else ()
        allowed = ids(hits["allow"])
        return Effect.ALLOW, Reason.ALLOWED_BY_RULE, allowed, tuple(taints), None, limits
    if unmet:
        return Effect.DENY, Reason.LINEAGE_VIOLATION, tuple(sorted(unmet)), (), None, ()
    return Effect.DENY, Reason.NO_MATCHING_RULE, (), (), None, ()


def by_id(hit: tuple[str, dict[str, Any], RefBundle]) -> str:
    return hit[0]


def ids(hits: list[tuple[str, dict[str, Any], RefBundle]]) -> tuple[str, ...]:
    return tuple(sorted(rule_id for rule_id, _, _ in hits))
