"""Evaluation: Cedar precedence, every operator, order independence, index vs a naive scan,
and work per request that does not grow with the rule count."""

from __future__ import annotations

import functools
import gc
import random
import re
import sys
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bus_guard.decision import Decision, Effect, Reason, Request
from bus_guard.policy._evaluator import CACHE_SIZE, _resource_test
from bus_guard.policy._load import PolicySet, load_policy_sources
from bus_guard.policy._patterns import (
    ActionKeys,
    GlobIndex,
    action_matches,
    glob_matcher,
    parse_action_pattern,
)

TABLE = """\
bundle: table
version: "2.0.0"
groups:
  payments: [agent-7, agent-9]
principals:
  agent-7: {team: treasury, tier: 2, roles: [payer, viewer]}
  agent-9: {team: treasury, tier: 1}
  auditor-1: {team: audit, tier: 3}
rules:
  # precedence ladder
  - {id: ladder-allow, effect: allow, actions: [ladder.go]}
  - {id: ladder-allow-2, effect: allow, actions: [ladder.*]}
  - {id: ladder-escalate, effect: escalate, actions: [ladder.go],
     when: {field: params.escalate, eq: true}}
  - {id: ladder-deny, effect: deny, actions: [ladder.go], when: {field: params.deny, eq: true}}
  - {id: ladder-deny-2, effect: deny, actions: [ladder.>], when: {field: params.deny, eq: true}}
  # groups, globs, wildcards
  - {id: group-pay, effect: allow, principals: ["group:payments"], actions: [pay.send]}
  - {id: glob-bot, effect: allow, principals: ["bot-*"], actions: [tools.>],
     resources: ["repo:public/*"]}
  - {id: glob-q, effect: allow, principals: ["svc-?"], actions: ["*.read"], resources: ["doc:??"]}
  # one rule per operator, on action op.<name>
  - {id: op-eq, effect: allow, actions: [op.eq], when: {field: params.v, eq: x}}
  - {id: op-eq-num, effect: allow, actions: [op.eqnum], when: {field: params.v, eq: 1}}
  - {id: op-eq-bool, effect: allow, actions: [op.eqbool], when: {field: params.v, eq: true}}
  - {id: op-ne, effect: allow, actions: [op.ne], when: {field: params.v, ne: x}}
  - {id: op-lt, effect: allow, actions: [op.lt], when: {field: params.v, lt: 10}}
  - {id: op-le, effect: allow, actions: [op.le], when: {field: params.v, le: 10}}
  - {id: op-gt, effect: allow, actions: [op.gt], when: {field: params.v, gt: 10}}
  - {id: op-ge, effect: allow, actions: [op.ge], when: {field: params.v, ge: 10.5}}
  - {id: op-in, effect: allow, actions: [op.in], when: {field: params.v, in: [a, 1, true]}}
  - {id: op-not-in, effect: allow, actions: [op.notin], when: {field: params.v, not_in: [a, b]}}
  - {id: op-matches, effect: allow, actions: [op.matches],
     when: {field: params.v, matches: "^ab+c$"}}
  - {id: op-exists, effect: allow, actions: [op.exists], when: {field: params.v, exists: true}}
  - {id: op-absent, effect: allow, actions: [op.absent], when: {field: params.v, exists: false}}
  - {id: op-not, effect: allow, actions: [op.not], when: {not: {field: params.v, gt: 10}}}
  - {id: op-any, effect: allow, actions: [op.any],
     when: {any: [{field: params.v, eq: a}, {field: params.w, eq: b}]}}
  - {id: op-all, effect: allow, actions: [op.all],
     when: {all: [{field: params.v, eq: a}, {field: params.w, eq: b}]}}
  - {id: op-nested, effect: allow, actions: [op.nested],
     when: {field: params.meta.origin, eq: web}}
  - {id: attr-team, effect: allow, actions: [attr.team],
     when: {field: principal.team, eq: treasury}}
  - {id: attr-roles, effect: allow, actions: [attr.roles],
     when: {field: principal.roles, in: [payer]}}
  - {id: attr-tier, effect: allow, actions: [attr.tier], when: {field: principal.tier, ge: 2}}
  - {id: field-resource, effect: allow, actions: [field.resource],
     when: {field: resource, matches: "^doc:"}}
  - {id: field-principal, effect: allow, actions: [field.principal],
     when: {field: principal, eq: agent-7}}
  - {id: field-action, effect: allow, actions: [field.*], when: {field: action, eq: field.action}}
  - {id: lineage-depth, effect: allow, actions: [lineage.depth],
     when: {field: lineage.depth, le: 1}}
  - {id: lineage-labels, effect: allow, actions: [lineage.labels],
     when: {field: lineage.labels, not_in: [tainted]}}
  - {id: lineage-labels-in, effect: allow, actions: [lineage.marked],
     when: {field: lineage.labels, in: [reviewed]}}
  - {id: lineage-root, effect: allow, actions: [lineage.root],
     when: {field: lineage.root, eq: agent-1}}
"""


def compile_text(text: str, name: str = "t.yaml") -> PolicySet:
    return load_policy_sources({name: text.encode()})


@pytest.fixture(scope="module")
def table() -> PolicySet:
    return compile_text(TABLE)


def req(
    action: str,
    params: dict[str, Any] | None = None,
    principal: str = "agent-1",
    resource: str = "r",
    **extra: Any,
) -> Request:
    return Request(principal, action, resource, params or {}, **extra)


ALLOW, DENY, HOLD = Effect.ALLOW, Effect.DENY, Effect.HOLD
NO_MATCH = (DENY, Reason.NO_MATCHING_RULE, ())


def allowed(*rules: str) -> tuple[Effect, Reason, tuple[str, ...]]:
    return (ALLOW, Reason.ALLOWED_BY_RULE, rules)


CASES: list[tuple[str, Request, tuple[Effect, Reason, tuple[str, ...]]]] = [
    # precedence: deny > escalate > allow > default deny; all ids of the deciding effect
    ("allow", req("ladder.go"), allowed("ladder-allow", "ladder-allow-2")),
    (
        "escalate beats allow",
        req("ladder.go", {"escalate": True}),
        (HOLD, Reason.ESCALATED_BY_RULE, ("ladder-escalate",)),
    ),
    (
        "deny beats escalate",
        req("ladder.go", {"escalate": True, "deny": True}),
        (DENY, Reason.DENIED_BY_RULE, ("ladder-deny", "ladder-deny-2")),
    ),
    ("wildcard one token", req("ladder.stop"), allowed("ladder-allow-2")),
    (
        "'>' many tokens",
        req("ladder.go.far", {"deny": True}),
        (DENY, Reason.DENIED_BY_RULE, ("ladder-deny-2",)),
    ),
    ("'*' is one token only", req("ladder.go.far"), NO_MATCH),
    ("'>' needs a token", req("ladder", {"deny": True}), NO_MATCH),
    # groups and globs
    ("group member", req("pay.send", principal="agent-9"), allowed("group-pay")),
    ("not a group member", req("pay.send", principal="agent-8"), NO_MATCH),
    (
        "principal + resource glob",
        req("tools.git.clone", principal="bot-12", resource="repo:public/x"),
        allowed("glob-bot"),
    ),
    (
        "resource glob misses",
        req("tools.git.clone", principal="bot-12", resource="repo:private/x"),
        NO_MATCH,
    ),
    (
        "principal glob misses",
        req("tools.git", principal="robot-1", resource="repo:public/x"),
        NO_MATCH,
    ),
    ("? globs", req("db.read", principal="svc-1", resource="doc:ab"), allowed("glob-q")),
    ("? is one char", req("db.read", principal="svc-12", resource="doc:ab"), NO_MATCH),
    ("? resource", req("db.read", principal="svc-1", resource="doc:abc"), NO_MATCH),
    ("leading '*' token", req("db.read.x", principal="svc-1", resource="doc:ab"), NO_MATCH),
    # operators
    ("eq", req("op.eq", {"v": "x"}), allowed("op-eq")),
    ("eq other", req("op.eq", {"v": "y"}), NO_MATCH),
    ("eq 1 == 1.0", req("op.eqnum", {"v": 1.0}), allowed("op-eq-num")),
    ("eq 1 != true", req("op.eqnum", {"v": True}), NO_MATCH),
    ("eq true != 1", req("op.eqbool", {"v": 1}), NO_MATCH),
    ("eq true", req("op.eqbool", {"v": True}), allowed("op-eq-bool")),
    ("ne", req("op.ne", {"v": "y"}), allowed("op-ne")),
    ("ne equal", req("op.ne", {"v": "x"}), NO_MATCH),
    ("ne missing", req("op.ne"), NO_MATCH),
    ("ne other type", req("op.ne", {"v": 3}), NO_MATCH),
    ("lt", req("op.lt", {"v": 9.99}), allowed("op-lt")),
    ("lt boundary", req("op.lt", {"v": 10}), NO_MATCH),
    ("le boundary", req("op.le", {"v": 10}), allowed("op-le")),
    ("le string", req("op.le", {"v": "1"}), NO_MATCH),
    ("le bool", req("op.le", {"v": False}), NO_MATCH),
    ("le null", req("op.le", {"v": None}), NO_MATCH),
    ("gt", req("op.gt", {"v": 11}), allowed("op-gt")),
    ("gt boundary", req("op.gt", {"v": 10}), NO_MATCH),
    ("ge float", req("op.ge", {"v": 10.5}), allowed("op-ge")),
    ("ge below", req("op.ge", {"v": 10}), NO_MATCH),
    ("in string", req("op.in", {"v": "a"}), allowed("op-in")),
    ("in number", req("op.in", {"v": 1.0}), allowed("op-in")),
    ("in bool", req("op.in", {"v": True}), allowed("op-in")),
    ("in: 1 is not true", req("op.in", {"v": False}), NO_MATCH),
    ("in list value", req("op.in", {"v": ["z", "a"]}), allowed("op-in")),
    ("in missing", req("op.in"), NO_MATCH),
    ("not_in", req("op.notin", {"v": "c"}), allowed("op-not-in")),
    ("not_in member", req("op.notin", {"v": "a"}), NO_MATCH),
    ("not_in missing", req("op.notin"), NO_MATCH),
    ("not_in other type", req("op.notin", {"v": 5}), NO_MATCH),
    ("not_in list", req("op.notin", {"v": ["c", "d"]}), allowed("op-not-in")),
    ("matches", req("op.matches", {"v": "abbbc"}), allowed("op-matches")),
    ("matches anchored", req("op.matches", {"v": "xabc"}), NO_MATCH),
    ("matches non-string", req("op.matches", {"v": 5}), NO_MATCH),
    ("exists", req("op.exists", {"v": 0}), allowed("op-exists")),
    ("exists null", req("op.exists", {"v": None}), NO_MATCH),
    ("exists false", req("op.absent"), allowed("op-absent")),
    ("exists false null", req("op.absent", {"v": None}), allowed("op-absent")),
    ("exists false present", req("op.absent", {"v": False}), NO_MATCH),
    ("not", req("op.not", {"v": 3}), allowed("op-not")),
    ("not holds", req("op.not", {"v": 30}), NO_MATCH),
    ("not of missing holds", req("op.not"), allowed("op-not")),
    ("not of wrong type holds", req("op.not", {"v": "30"}), allowed("op-not")),
    ("any first", req("op.any", {"v": "a"}), allowed("op-any")),
    ("any second", req("op.any", {"w": "b"}), allowed("op-any")),
    ("any none", req("op.any", {"v": "b", "w": "a"}), NO_MATCH),
    ("all", req("op.all", {"v": "a", "w": "b"}), allowed("op-all")),
    ("all but one", req("op.all", {"v": "a"}), NO_MATCH),
    ("nested", req("op.nested", {"meta": {"origin": "web"}}), allowed("op-nested")),
    ("nested through non-dict", req("op.nested", {"meta": "web"}), NO_MATCH),
    # fields other than params
    ("attr", req("attr.team", principal="agent-9"), allowed("attr-team")),
    ("attr other", req("attr.team", principal="auditor-1"), NO_MATCH),
    ("attr none", req("attr.team", principal="agent-5"), NO_MATCH),
    ("attr list", req("attr.roles", principal="agent-7"), allowed("attr-roles")),
    ("attr list missing", req("attr.roles", principal="agent-9"), NO_MATCH),
    ("attr number", req("attr.tier", principal="auditor-1"), allowed("attr-tier")),
    ("attr number low", req("attr.tier", principal="agent-9"), NO_MATCH),
    ("resource", req("field.resource", resource="doc:1"), allowed("field-resource")),
    ("principal", req("field.principal", principal="agent-7"), allowed("field-principal")),
    ("action", req("field.action"), allowed("field-action")),
    ("depth", req("lineage.depth", lineage_depth=1), allowed("lineage-depth")),
    ("depth deep", req("lineage.depth", lineage_depth=2), NO_MATCH),
    ("labels clean", req("lineage.labels", labels=frozenset({"x"})), allowed("lineage-labels")),
    ("labels none", req("lineage.labels"), allowed("lineage-labels")),
    ("labels tainted", req("lineage.labels", labels=frozenset({"x", "tainted"})), NO_MATCH),
    (
        "labels in",
        req("lineage.marked", labels=frozenset({"reviewed"})),
        allowed("lineage-labels-in"),
    ),
    ("labels in none", req("lineage.marked"), NO_MATCH),
    ("root", req("lineage.root", lineage_root="agent-1"), allowed("lineage-root")),
    ("root unset", req("lineage.root"), NO_MATCH),
    # nothing at all
    ("unknown action", req("nothing.here"), NO_MATCH),
]


@pytest.mark.parametrize(
    ("request_", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_authorization_table(
    table: PolicySet, request_: Request, expected: tuple[Effect, Reason, tuple[str, ...]]
) -> None:
    decision = table.evaluate(request_)
    assert (decision.effect, decision.reason, decision.rules) == expected
    assert decision.policy_digest == table.digest
    assert decision.policy_version == "table@2.0.0"
    assert decision.mode == "enforce"
    assert decision.would_deny is False
    if expected[2]:
        assert ", ".join(expected[2]) in decision.message
    else:
        assert decision.message.startswith(f"no rule allows {request_.principal} {request_.action}")
    # explain decides the same way
    assert table.explain(request_).decision == decision


def test_messages(table: PolicySet) -> None:
    deny = table.evaluate(req("ladder.go", {"deny": True}))
    assert deny.message == "denied by rules ladder-deny, ladder-deny-2"
    hold = table.evaluate(req("ladder.go", {"escalate": True}))
    assert hold.message == "held for approval by rule ladder-escalate"
    allow = table.evaluate(req("pay.send", principal="agent-7"))
    assert allow.message == "allowed by rule group-pay"


def test_no_match_messages_say_whether_an_allow_rule_was_close(table: PolicySet) -> None:
    stranger = table.evaluate(req("pay.send", principal="agent-8"))
    assert stranger.message == "no rule allows agent-8 pay.send"
    failed = table.evaluate(req("op.eq", {"v": "y"}))
    assert failed.message == "no rule allows agent-1 op.eq with this resource and params"
    assert table.explain(req("op.eq", {"v": "y"})).decision == failed


def test_observe_mode_is_reported_not_applied() -> None:
    policies = compile_text(
        'bundle: o\nversion: "1"\nmode: observe\nrules:\n  - {id: d, effect: deny, actions: [a]}\n'
    )
    decision = policies.evaluate(req("a"))
    assert (decision.effect, decision.reason, decision.rules) == (
        DENY,
        Reason.DENIED_BY_RULE,
        ("d",),
    )
    assert decision.mode == "observe"
    assert decision.would_deny is False  # authorize() rewrites, not the policy set
    assert policies.evaluate(req("b")).effect is DENY


def test_explain_reports_each_rule_and_failed_condition(table: PolicySet) -> None:
    explanation = table.explain(req("op.all", {"v": "a", "w": "c"}, principal="agent-7"))
    by_id = {t.rule.id: t for t in explanation.rules}
    assert "op-all" in by_id
    assert "group-pay" in by_id  # names agent-7 (through its group), though not op.all
    trace = by_id["op-all"]
    assert trace.principal and trace.action and trace.resource and not trace.applies
    assert trace.condition is not None and not trace.condition.held
    leaves = {c.text: c for c in trace.condition.children}
    assert leaves['params.v eq "a"'].held and leaves['params.v eq "a"'].actual == "a"
    failed = leaves['params.w eq "b"']
    assert not failed.held and failed.present and failed.actual == "c"
    assert "ladder-allow" not in by_id  # neither its action nor its principal matched
    assert explanation.decision.reason is Reason.NO_MATCHING_RULE


def test_explain_lists_rules_naming_the_principal(table: PolicySet) -> None:
    explanation = table.explain(req("nothing.here", principal="agent-9"))
    traces = {t.rule.id: t for t in explanation.rules}
    assert set(traces) == {"group-pay"}
    assert traces["group-pay"].principal and not traces["group-pay"].action


def test_missing_value_trace(table: PolicySet) -> None:
    (trace,) = [t for t in table.explain(req("op.lt")).rules if t.rule.id == "op-lt"]
    assert trace.condition is not None
    assert not trace.condition.present and trace.condition.actual is None


def test_deterministic_and_keeps_no_state_per_request(table: PolicySet) -> None:
    request = req("ladder.go", {"deny": True})
    first = table.evaluate(request)
    assert all(table.evaluate(request) == first for _ in range(50))
    memo = len(table._decisions)
    for i in range(CACHE_SIZE + 100):  # nothing is kept per (principal, action)
        table.evaluate(req(f"x{i}.y", principal=f"p{i}"))
    assert len(table._decisions) == memo <= CACHE_SIZE
    assert table.evaluate(request) == first


# ---------------------------------------------------------------- generated policies

PRINCIPALS = [f"agent-{i}" for i in range(12)] + ["bot-1", "bot-22", "svc-a"]
GROUPS = {"g0": ["agent-1", "agent-2"], "g1": ["agent-3", "bot-1"], "g2": ["agent-10", "svc-a"]}
ATTRS = {"agent-1": {"team": "red"}, "agent-2": {"team": "blue"}, "bot-1": {"team": "red"}}
SERVICES = ["pay", "tools", "db", "mail"]
OPS = ["read", "write", "send", "run"]


def random_condition(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    roll = rng.random()
    if depth < 2 and roll < 0.12:
        return {"not": random_condition(rng, depth + 1)}
    if depth < 2 and roll < 0.3:
        kind = rng.choice(["all", "any"])
        return {kind: [random_condition(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    letters = ["a", "b", "c", "d"]
    return rng.choice(
        [
            {
                "field": "params.n",
                rng.choice(["lt", "le", "gt", "ge", "eq", "ne"]): rng.randint(0, 10),
            },
            {"field": "params.s", "in": rng.sample(letters, rng.randint(1, 3))},
            {"field": "params.s", "not_in": rng.sample(letters, rng.randint(1, 2))},
            {"field": "params.s", "matches": rng.choice(["^[ab]", "c$", "^d+$"])},
            {"field": "params.s", "exists": rng.random() < 0.5},
            {"field": "params.s", rng.choice(["eq", "ne"]): rng.choice(letters)},
            {"field": "principal.team", "eq": rng.choice(["red", "blue"])},
            {"field": "resource", "matches": "^res:1"},
        ]
    )


def random_rule(rng: random.Random, i: int, services: list[str], broad: float) -> dict[str, Any]:
    """One rule; ``broad`` is the chance of a pattern that matches across services."""
    s, o = rng.choice(services), rng.choice(OPS)
    effect = rng.choices(["allow", "deny", "escalate"], [6, 2, 2])[0]
    wide = rng.random() < broad
    principals = [rng.choice(PRINCIPALS), f"group:{rng.choice(list(GROUPS))}", "agent-1*", "bot-?"]
    actions = [f"{s}.{o}", f"{s}.*", f"{s}.>", f"{s}.{o}.x", f"{s}.*.y"]
    rule: dict[str, Any] = {
        "id": f"r{i:05d}",
        "effect": effect,
        "principals": rng.sample([*principals, "*"] if wide else principals, rng.randint(1, 2)),
        "actions": rng.sample([*actions, f"*.{o}", ">"] if wide else actions, rng.randint(1, 2)),
        "resources": rng.sample(
            [f"res:{rng.randrange(20)}", "res:1*", "res:?", "*", "doc:*"], rng.randint(1, 2)
        ),
    }
    if effect == "allow":
        if rng.random() < 0.6:
            rule["when"] = random_condition(rng)
    elif rng.random() < 0.85:
        rule["when"] = random_condition(rng)
    else:
        # Unconditional denies/escalates get their own resources, so they never provably
        # shadow a generated rule (which would be a compile error).
        rule["resources"] = [f"res:{effect}-{rng.randrange(5)}"]
    return rule


def random_bundle(
    rng: random.Random, count: int, services: list[str] = SERVICES, broad: float = 0.3
) -> dict[str, Any]:
    return {
        "bundle": "gen",
        "version": "1",
        "groups": GROUPS,
        "principals": ATTRS,
        "rules": [random_rule(rng, i, services, broad) for i in range(count)],
    }


def random_request(rng: random.Random, services: list[str] = SERVICES) -> Request:
    s, o = rng.choice(services), rng.choice(OPS)
    params: dict[str, Any] = {}
    n = rng.choice([None, "missing", 0, 3, 5, 7.5, 10, 11, "5", True])
    if n != "missing":
        params["n"] = n
    s_value = rng.choice(["missing", None, "a", "b", "c", "d", "dd", "ab", 3])
    if s_value != "missing":
        params["s"] = s_value
    return Request(
        principal=rng.choice([*PRINCIPALS, "stranger"]),
        action=rng.choice([f"{s}.{o}", f"{s}.{o}.x", f"{s}.{o}.y", s, "other.thing"]),
        resource=rng.choice(
            [f"res:{rng.randrange(25)}", "res:deny-1", "res:escalate-2", "doc:7", ""]
        ),
        params=params,
    )


def compile_bundle(data: dict[str, Any]) -> PolicySet:
    text = yaml.dump(data, Dumper=yaml.CSafeDumper, sort_keys=False)
    return load_policy_sources({"gen.yaml": text.encode()})


# A deliberately naive reference: a linear scan, its own matching code, no compilation.

MISSING = object()


@functools.cache
def glob_regex(pattern: str) -> re.Pattern[str]:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.DOTALL)


def ref_principal(pattern: str, principal: str) -> bool:
    """Principal and resource patterns alike."""
    if pattern.startswith("group:"):
        return principal in GROUPS[pattern[6:]]
    return glob_regex(pattern).fullmatch(principal) is not None


def ref_action(pattern: list[str], action: list[str]) -> bool:
    if not pattern:
        return not action
    if pattern[0] == ">":
        return len(action) >= 1
    if not action:
        return False
    return (pattern[0] in ("*", action[0])) and ref_action(pattern[1:], action[1:])


def ref_value(field: str, request: Request) -> Any:
    if field.startswith("params."):
        value = request.params.get(field[7:], MISSING)
        return MISSING if value is None else value
    if field == "resource":
        return request.resource
    return ATTRS.get(request.principal, {}).get(field.split(".")[1], MISSING)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def same_kind(a: Any, b: Any) -> bool:
    return (is_number(a) and is_number(b)) or (type(a) is type(b) and not is_number(a))


def ref_holds(cond: dict[str, Any], request: Request) -> bool:
    if "not" in cond:
        return not ref_holds(cond["not"], request)
    if "all" in cond:
        return all(ref_holds(c, request) for c in cond["all"])
    if "any" in cond:
        return any(ref_holds(c, request) for c in cond["any"])
    ((op, lit),) = [(k, v) for k, v in cond.items() if k != "field"]
    value = ref_value(cond["field"], request)
    if op == "exists":
        wanted: bool = lit
        return (value is not MISSING) == wanted
    if value is MISSING:
        return False
    if op in ("lt", "le", "gt", "ge"):
        compare: dict[str, Callable[[Any, Any], bool]] = {
            "lt": lambda a, b: a < b,
            "le": lambda a, b: a <= b,
            "gt": lambda a, b: a > b,
            "ge": lambda a, b: a >= b,
        }
        return is_number(value) and compare[op](value, lit)
    if op == "eq":
        return same_kind(value, lit) and value == lit
    if op == "ne":
        return same_kind(value, lit) and value != lit
    member = (
        any(same_kind(value, x) and value == x for x in lit) if op in ("in", "not_in") else None
    )
    if op == "in":
        return bool(member)
    if op == "not_in":
        return any(same_kind(value, x) for x in lit) and not member
    return isinstance(value, str) and re.search(lit, value) is not None


def reference(
    rules: list[dict[str, Any]], request: Request
) -> tuple[Effect, Reason, tuple[str, ...]]:
    applicable: dict[str, list[str]] = {"allow": [], "deny": [], "escalate": []}
    for rule in rules:
        if (
            any(ref_principal(p, request.principal) for p in rule["principals"])
            and any(ref_action(a.split("."), request.action.split(".")) for a in rule["actions"])
            and any(ref_principal(r, request.resource) for r in rule["resources"])
            and ("when" not in rule or ref_holds(rule["when"], request))
        ):
            applicable[rule["effect"]].append(rule["id"])
    if applicable["deny"]:
        return DENY, Reason.DENIED_BY_RULE, tuple(sorted(applicable["deny"]))
    if applicable["escalate"]:
        return HOLD, Reason.ESCALATED_BY_RULE, tuple(sorted(applicable["escalate"]))
    if applicable["allow"]:
        return ALLOW, Reason.ALLOWED_BY_RULE, tuple(sorted(applicable["allow"]))
    return NO_MATCH


def outcome(decision: Decision) -> tuple[Effect, Reason, tuple[str, ...]]:
    return decision.effect, decision.reason, decision.rules


def test_index_agrees_with_a_linear_scan_over_thousands_of_rules() -> None:
    rng = random.Random(20241126)
    services = [f"svc{i}" for i in range(150)]  # ~5 rules per action: realistic density
    data = random_bundle(rng, 3000, services, broad=0.002)
    policies = compile_bundle(data)
    assert policies.rule_count == 3000
    seen: set[Reason] = set()
    for i in range(1500):
        request = random_request(rng, services)
        expected = reference(data["rules"], request)
        assert outcome(policies.evaluate(request)) == expected, request
        if i % 15 == 0:
            assert outcome(policies.explain(request).decision) == expected
        seen.add(expected[1])
    # the generated data exercised every outcome
    assert seen == {
        Reason.ALLOWED_BY_RULE,
        Reason.DENIED_BY_RULE,
        Reason.ESCALATED_BY_RULE,
        Reason.NO_MATCHING_RULE,
    }


def test_candidates_do_not_grow_with_the_rule_count() -> None:
    rules = [
        {
            "id": f"r{i}",
            "effect": "allow",
            "principals": [f"agent-{i % 50}"],
            "actions": [f"svc{i}.run"],
        }
        for i in range(5000)
    ]
    rules.append({"id": "all-read", "effect": "allow", "actions": ["*.read"]})
    rules.append({"id": "ops", "effect": "allow", "principals": ["ops-*"], "actions": [">"]})
    policies = compile_bundle({"bundle": "big", "version": "1", "rules": rules})
    assert policies.candidates("agent-3", "svc3.run") == ("r3",)
    assert policies.candidates("agent-4", "svc3.run") == ()
    assert policies.candidates("agent-4", "svc3.read") == ("all-read",)
    assert policies.candidates("ops-1", "svc3.run") == ("ops",)
    assert policies.evaluate(req("svc3.run", principal="agent-3")).rules == ("r3",)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_rule_order_never_changes_a_decision(seed: int, order: int, count: int) -> None:
    rng = random.Random(seed)
    data = random_bundle(rng, count)
    shuffled = {**data, "rules": random.Random(order).sample(data["rules"], len(data["rules"]))}
    first, second = compile_bundle(data), compile_bundle(shuffled)
    assert first.rule_count == second.rule_count == count
    for _ in range(40):
        request = random_request(rng)
        a, b = first.evaluate(request), second.evaluate(request)
        assert outcome(a) == outcome(b)
        assert a.message == b.message


def test_rules_with_the_same_condition_share_one_predicate() -> None:
    # Hash-consed conditions: 10,000 rules with a few distinct limits keep a few closures
    # hot in the CPU cache. Sharing must never merge conditions that differ: 1, 1.0 and
    # true are equal in Python but not to a policy.
    limits = [{"field": "params.amount", "le": 100 + 10 * (i % 3)} for i in range(30)]
    flags: list[Any] = [1, 1.0, True, 1, True]
    rules = [
        {
            "id": f"r{i:02}",
            "effect": "allow",
            "principals": [f"a{i}"],
            "actions": ["pay"],
            "when": when,
        }
        for i, when in enumerate(limits)
    ] + [
        {
            "id": f"f{i}",
            "effect": "allow",
            "principals": [f"f{i}"],
            "actions": ["pay"],
            "when": {"all": [{"field": "params.flag", "eq": v}, {"field": "params.n", "gt": 0}]},
        }
        for i, v in enumerate(flags)
    ]
    policies = compile_bundle({"bundle": "shared", "version": "1", "rules": rules})
    check = {r.id: r.check for r in policies.rules}
    assert len({id(check[f"r{i:02}"]) for i in range(30)}) == 3
    assert check["r00"] is check["r03"] is check["r27"]
    assert check["f0"] is check["f3"] and check["f2"] is check["f4"]
    assert len({id(check[f"f{i}"]) for i in range(3)}) == 3  # 1, 1.0, true: apart
    for i, v in enumerate(flags):
        for sent in (1, 1.0, True):
            decision = policies.evaluate(req("pay", {"flag": sent, "n": 1}, f"f{i}"))
            same_type = type(sent) is bool if type(v) is bool else type(sent) is not bool
            assert (decision.effect is ALLOW) == same_type, (v, sent)
    # Shared closures still read each request's own values.
    assert policies.evaluate(req("pay", {"amount": 110}, "a1")).effect is ALLOW
    assert policies.evaluate(req("pay", {"amount": 110}, "a0")).effect is DENY


@settings(max_examples=50)
@given(st.text(max_size=8), st.dictionaries(st.text(max_size=3), st.integers(), max_size=3))
def test_request_is_frozen(principal: str, params: dict[str, int]) -> None:
    request = Request(principal, "a.b", "r", params)
    with pytest.raises(AttributeError):
        request.principal = "other"  # type: ignore[misc]


# ---------------------------------------------------------------- work per request


def calls_during(work: Callable[[], object]) -> int:
    """Python and C function calls made by *work* (``sys.setprofile``): how much work a
    request costs, exactly, on any machine."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        work()
    finally:
        sys.setprofile(None)
    return count


def _shape_rules(shape: str, n: int) -> list[dict[str, Any]]:
    """*n* rules of one shape the index must not scan one by one."""
    rules: list[dict[str, Any]] = [{"id": "search", "effect": "allow", "actions": ["tools.>"]}]
    for i in range(n):
        rule: dict[str, Any] = {"id": f"r{i:05}"}
        match shape:
            case "prefix denies for anyone":
                rule |= {"effect": "deny", "actions": [">"], "resources": [f"zone{i}/*"]}
            case "exact deny-list":
                rule |= {"effect": "deny", "actions": ["files.>"], "resources": [f"file:{i}"]}
            case "suffix escalations with attributes":
                rule |= {
                    "effect": "escalate",
                    "actions": [f"svc{i % 7}.>"],
                    "resources": [f"*-x{i}-env"],
                    "when": {"field": "principal.clearance", "lt": 3},
                }
            case "allows keyed by an attribute":
                rule |= {
                    "effect": "allow",
                    "actions": ["docs.read"],
                    "resources": ["*"],
                    "when": {
                        "all": [
                            {"field": "principal.dept", "eq": f"d{i}"},
                            {"field": "params.n", "le": 5},
                        ]
                    },
                }
            case "deny-list by param":
                rule |= {
                    "effect": "deny",
                    "actions": ["payments.>"],
                    "when": {"field": "params.to", "in": [f"acct-{i}", f"iban-{i}"]},
                }
            case "roles":
                rule |= {
                    "effect": "allow",
                    "principals": [f"group:role{i}"],
                    "actions": ["app.read"],
                }
            case _:
                rule |= {
                    "effect": "allow",
                    "principals": [f"agent-{i}"],
                    "actions": [f"svc{i % 50}.read"],
                    "resources": [f"doc:{i}/*"],
                }
        rules.append(rule)
    return rules


SHAPES = [
    "prefix denies for anyone",
    "exact deny-list",
    "suffix escalations with attributes",
    "allows keyed by an attribute",
    "deny-list by param",
    "roles",
    "per principal",
]
SHAPE_REQUESTS = [
    req("svc3.read", {"n": 1}, "agent-3", "zone3/a"),
    req("svc3.read", {"n": 1}, "agent-3", "doc:3/a"),
    req("files.get", {"n": 1}, "user7", "file:7"),
    req("svc1.write", {"n": 9}, "emp8", "app-x8-env"),
    req("docs.read", {"n": 1}, "emp4", "x"),
    req("app.read", {}, "user12", "x"),
    req("payments.send", {"to": "acct-9"}, "user12", "x"),
    req("payments.send", {"to": ["x", "iban-11"]}, "user12", "x"),
    req("payments.send", {"to": 9}, "user12", "x"),
    req("tools.search", {}, "stranger", "zone12/x"),
    req("nothing.here", {}, "stranger", "nowhere"),
]


def shape_policy(shape: str, n: int) -> PolicySet:
    people = range(20)
    return compile_bundle(
        {
            "bundle": "shape",
            "version": "1",
            "groups": {f"role{i}": [f"user{i}", f"user{i + 1}"] for i in range(n)},
            "principals": {f"emp{i}": {"dept": f"d{i}", "clearance": i % 5} for i in people},
            "rules": _shape_rules(shape, n),
        }
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_work_per_request_does_not_grow_with_the_rules(shape: str) -> None:
    # The same requests against 20 and 2,000 rules of one shape make the same function
    # calls, give or take a dict lookup per distinct prefix length; the evaluator this
    # replaces made one call per rule of a wildcard-principal shape (2,000 here), and
    # rebuilt its candidates for every (principal, action) pair it had not cached.
    small, large = shape_policy(shape, 20), shape_policy(shape, 2000)
    for request in SHAPE_REQUESTS:
        few = calls_during(lambda: small.evaluate(request))  # noqa: B023
        many = calls_during(lambda: large.evaluate(request))  # noqa: B023
        assert many <= few + 8, (shape, request, few, many)
        assert outcome(large.evaluate(request)) == outcome(large.explain(request).decision)


def test_a_rule_for_anyone_keyed_by_an_attribute_still_names_itself_in_no_match() -> None:
    # Filed under department d1, the rule is not looked at for emp2 (department d2) or a
    # stranger; but its principal ("*") and action match them, so their denial says a
    # rule covered them, exactly as explain's linear scan does.
    policies = compile_bundle(
        {
            "bundle": "attr",
            "version": "1",
            "principals": {"emp1": {"dept": "d1"}, "emp2": {"dept": "d2"}},
            "rules": [
                {
                    "id": "d1-read",
                    "effect": "allow",
                    "actions": ["docs.read"],
                    "when": {"field": "principal.dept", "eq": "d1"},
                }
            ],
        }
    )
    assert policies.evaluate(req("docs.read", principal="emp1")).rules == ("d1-read",)
    for who in ("emp2", "stranger"):
        denied = policies.evaluate(req("docs.read", principal=who))
        assert denied.message == f"no rule allows {who} docs.read with this resource and params"
        assert denied == policies.explain(req("docs.read", principal=who)).decision
        assert policies.candidates(who, "docs.read") == ()  # not looked at
    assert policies.candidates("emp1", "docs.read") == ("d1-read",)
    assert policies.evaluate(req("docs.write", principal="emp1")).message == (
        "no rule allows emp1 docs.write"
    )


def test_rules_naming_many_principals_and_actions_are_filed_under_one_side() -> None:
    # 12 ids x 12 actions would be 144 (class, action) entries; filed under the actions
    # alone (or the principals), the other side is checked when the rule is found.
    ids = [f"agent-{i}" for i in range(12)]
    acts = [f"a.x{i}" for i in range(12)]
    policies = compile_bundle(
        {
            "bundle": "wide",
            "version": "1",
            "rules": [
                {
                    "id": "wide",
                    "effect": "allow",
                    "principals": ids,
                    "actions": acts,
                    "resources": ["r*"],
                },
                {
                    "id": "wide-deny",
                    "effect": "deny",
                    "principals": [*ids, "bot-*"],
                    "actions": [*acts, "b.>"],
                    "resources": ["secret"],
                },
            ],
        }
    )
    entries = sum(len(by_action) for by_action in policies._index.values())
    assert entries <= 12 + 14
    assert policies.evaluate(req("a.x3", principal="agent-4")).rules == ("wide",)
    assert policies.evaluate(req("a.x3", principal="agent-4", resource="secret")).rules == (
        "wide-deny",
    )
    assert policies.evaluate(req("b.c", principal="bot-1", resource="secret")).rules == (
        "wide-deny",
    )
    assert policies.evaluate(req("a.x3", principal="agent-12")).reason is Reason.NO_MATCHING_RULE
    assert policies.evaluate(req("a.y", principal="agent-4")).reason is Reason.NO_MATCHING_RULE
    missed = policies.evaluate(req("a.x3", principal="agent-4", resource="x"))
    assert missed.message.endswith("with this resource and params")  # wide allow matched
    assert policies.evaluate(req("a.x3", principal="agent-12")).message == (
        "no rule allows agent-12 a.x3"
    )


def test_conditions_on_a_principal_attribute_share_their_table_and_closure() -> None:
    rule = {"effect": "allow", "actions": ["a"], "when": {"field": "principal.team", "eq": "t"}}
    policies = load_policy_sources(
        {
            f"{name}.yaml": yaml.safe_dump(
                {
                    "bundle": name,
                    "version": "1",
                    "principals": {"p1": {"team": team}, "p2": {"team": "t"}},
                    "rules": [{"id": f"{name}-{i}", **rule} for i in range(2)],
                }
            ).encode()
            for name, team in (("one", "t"), ("two", "u"))
        }
    )
    check = {r.id: r.check for r in policies.rules}
    assert check["one-0"] is check["one-1"] and check["two-0"] is check["two-1"]
    assert check["one-0"] is not check["two-0"]  # each bundle's own attributes
    assert policies.evaluate(req("a", principal="p1")).rules == ("one-0", "one-1")
    assert policies.evaluate(req("a", principal="p2")).rules == (
        "one-0",
        "one-1",
        "two-0",
        "two-1",
    )


def test_rules_naming_one_group_share_its_members() -> None:
    members = [f"m{i}" for i in range(500)]
    policies = compile_bundle(
        {
            "bundle": "g",
            "version": "1",
            "groups": {"big": members},
            "rules": [
                {
                    "id": f"r{i}",
                    "effect": "allow",
                    "principals": ["group:big"],
                    "actions": [f"a{i}"],
                }
                for i in range(3)
            ],
        }
    )
    first, *rest = policies.rules
    assert all(r.principal_ids is first.principal_ids for r in rest)
    assert policies.evaluate(req("a2", principal="m499")).rules == ("r2",)


@pytest.mark.parametrize("enabled", [True, False])
def test_compiling_leaves_the_garbage_collector_as_it_was(enabled: bool) -> None:
    (gc.enable if enabled else gc.disable)()
    try:
        shape_policy("roles", 50)
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


globs = st.text(alphabet="ab*?:", max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(globs, max_size=8), st.lists(st.text(alphabet="ab:", max_size=7), max_size=8))
def test_glob_index_finds_exactly_the_matching_globs(
    patterns: list[str], values: list[str]
) -> None:
    index = GlobIndex((p, i) for i, p in enumerate(patterns))
    assert sorted(index.payloads()) == list(range(len(patterns))) == sorted(range(len(index)))
    for value in [*values, *patterns]:
        expected = sorted(i for i, p in enumerate(patterns) if glob_matcher(p)(value))
        assert sorted(index.match(value)) == expected, (patterns, value)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(globs.filter(bool), min_size=1, max_size=2),
    st.lists(st.text("ab:", max_size=7), max_size=8),
)
def test_inline_resource_tests_agree_with_the_matcher(
    patterns: list[str], values: list[str]
) -> None:
    # A bucket tests one p*, *s or p*s resource pattern inline (startswith / endswith)
    # instead of calling the rule's matcher: both must agree on every value.
    policies = compile_bundle(
        {
            "bundle": "r",
            "version": "1",
            "rules": [{"id": "r", "effect": "allow", "actions": ["a"], "resources": patterns}],
        }
    )
    (rule,) = policies.rules
    head, tail, start, res = _resource_test(rule)
    for value in [*values, *patterns]:
        inline = (not head or value.startswith(head)) and (not tail or value.endswith(tail, start))
        assert (res(value) if res is not None else inline) == rule.match_resource(value), (
            patterns,
            value,
        )


action_pattern = st.lists(st.sampled_from(["a", "b", "*"]), max_size=2).flatmap(
    lambda head: st.sampled_from(["a", "b", "*", ">"]).map(lambda last: ".".join([*head, last]))
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(action_pattern, max_size=8),
    st.lists(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4), max_size=6),
)
def test_action_keys_are_the_patterns_an_action_matches(
    patterns: list[str], actions: list[list[str]]
) -> None:
    keys = ActionKeys(patterns)
    for tokens in [*actions, *(p.split(".") for p in patterns if "*" not in p and ">" not in p)]:
        action = ".".join(tokens)
        found = keys.keys(action)
        assert found[0] == action
        expected = {p for p in patterns if action_matches(parse_action_pattern(p), tuple(tokens))}
        assert set(found[1:]) | ({action} & set(patterns)) == expected | (
            {action} & set(found[1:])
        ), (patterns, action)
