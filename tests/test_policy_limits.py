"""``limits:`` on allow rules: the model, the compile checks, what allow decisions carry,
``limit_key`` / ``limit_amount`` (the intake's) and what ``policy explain`` / ``policy
test`` show. Spending limits is the intake's; here a limited rule's decision is allow."""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import bus_guard.policy
from bus_guard.cli._policy import DEFAULT_NOW, explain, run_policy_tests
from bus_guard.decision import Effect, LimitSpec, Reason, Request
from bus_guard.errors import PolicyError
from bus_guard.policy import limit_amount, limit_key
from bus_guard.policy._load import PolicySet, load_policies, load_policy_sources, policy_json_schema

from .conftest import POLICIES

HEAD = """\
bundle: {name}
version: "1"
groups:
  payers: [agent-1, agent-2]
  ops: [agent-3]
schemas:
  pay.transfer: {{amount: number, count: integer, currency: string, any: any}}
  "pay.*": {{amount: number}}
  pay.refund: {{amount: number}}
rules:
"""


def bundle(rules: str, name: str = "b") -> str:
    return HEAD.format(name=name) + textwrap.indent(textwrap.dedent(rules), "  ")


def compiled(rules: str) -> PolicySet:
    return load_policy_sources({"b.yaml": bundle(rules).encode()})


def problems_of(files: dict[str, str]) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy_sources({name: text.encode() for name, text in files.items()})
    return info.value.problems


def only_problem(rules: str) -> str:
    problems = problems_of({"b.yaml": bundle(rules)})
    assert len(problems) == 1, problems
    return problems[0]


def allow(limits: str, *, rule_id: str = "r1", extra: str = "") -> str:
    return f"- {{id: {rule_id}, effect: allow, actions: [pay.transfer]{extra}, limits: {limits}}}"


# ----------------------------------------------------------------------- compile errors

BAD = [
    pytest.param(
        "- {id: r1, effect: deny, actions: [a], limits: [{count: 1, window: 1}]}",
        "b.yaml: rule r1: limits: limits are for allow rules (limits bound the rates and"
        " budgets of what the rule allows); this rule's effect is deny (line 11)",
        id="on-deny",
    ),
    pytest.param(
        "- {id: r1, effect: escalate, actions: [a], limits: [{count: 1, window: 1}]}",
        "b.yaml: rule r1: limits: limits are for allow rules (limits bound the rates and"
        " budgets of what the rule allows); this rule's effect is escalate (line 11)",
        id="on-escalate",
    ),
    pytest.param(
        allow("[]"),
        "b.yaml: rule r1: limits: must not be empty (line 11)",
        id="empty",
    ),
    pytest.param(
        allow("{count: 1, window: 1}"),
        "b.yaml: rule r1: limits: expected a list, got a mapping (line 11)",
        id="not-a-list",
    ),
    pytest.param(
        allow("[{count: 1, sum: amount, max: 5, window: 1}]"),
        "b.yaml: rule r1: limits[0]: give exactly one of count: <intents per window> or"
        " sum: <param name> (with max:) (line 11)",
        id="count-and-sum",
    ),
    pytest.param(
        allow("[{window: 1}]"),
        "b.yaml: rule r1: limits[0]: give exactly one of count: <intents per window> or"
        " sum: <param name> (with max:) (line 11)",
        id="neither",
    ),
    pytest.param(
        allow("[{sum: amount, window: 1}]"),
        "b.yaml: rule r1: limits[0]: a sum limit needs max: the most params.amount may add"
        " up to (line 11)",
        id="sum-without-max",
    ),
    pytest.param(
        allow("[{count: 5, max: 5, window: 1}]"),
        "b.yaml: rule r1: limits[0]: max is for sum limits; a count limit's max is its count"
        " (line 11)",
        id="count-with-max",
    ),
    pytest.param(
        allow("[{count: 0, window: 1}]"),
        "b.yaml: rule r1: limits[0].count: must be at least 1, got 0 (line 11)",
        id="count-zero",
    ),
    pytest.param(
        allow("[{count: -3, window: 1}]"),
        "b.yaml: rule r1: limits[0].count: must be at least 1, got -3 (line 11)",
        id="count-negative",
    ),
    pytest.param(
        allow("[{count: 2.5, window: 1}]"),
        "b.yaml: rule r1: limits[0].count: expected a whole number, got number 2.5 (line 11)",
        id="count-fraction",
    ),
    pytest.param(
        allow("[{count: 5.0, window: 1}]"),
        "b.yaml: rule r1: limits[0].count: expected a whole number, got number 5.0 (line 11)",
        id="count-float",
    ),
    pytest.param(
        allow("[{count: '5', window: 1}]"),
        "b.yaml: rule r1: limits[0].count: expected a whole number, got string '5'"
        " (quoted numbers are strings) (line 11)",
        id="count-quoted",
    ),
    pytest.param(
        allow("[{count: true, window: 1}]"),
        "b.yaml: rule r1: limits[0].count: expected a whole number, got boolean true (line 11)",
        id="count-bool",
    ),
    pytest.param(
        allow(f"[{{count: {2**53 + 1}, window: 1}}]"),
        f"b.yaml: rule r1: limits[0].count: must be at most 2**53, got {2**53 + 1} (line 11)",
        id="count-huge",
    ),
    pytest.param(
        allow("[{sum: amount, max: 0, window: 1}]"),
        "b.yaml: rule r1: limits[0].max: expected a finite number above 0, got number 0 (line 11)",
        id="max-zero",
    ),
    pytest.param(
        allow("[{sum: amount, max: -5, window: 1}]"),
        "b.yaml: rule r1: limits[0].max: expected a finite number above 0, got number -5 (line 11)",
        id="max-negative",
    ),
    pytest.param(
        allow("[{sum: amount, max: .nan, window: 1}]"),
        "b.yaml: rule r1: limits[0].max: expected a finite number above 0, got number nan"
        " (line 11)",
        id="max-nan",
    ),
    pytest.param(
        allow("[{sum: amount, max: .inf, window: 1}]"),
        "b.yaml: rule r1: limits[0].max: expected a finite number above 0, got number inf"
        " (line 11)",
        id="max-inf",
    ),
    pytest.param(
        allow("[{sum: amount, max: '100', window: 1}]"),
        "b.yaml: rule r1: limits[0].max: expected a finite number above 0, got string '100'"
        " (quoted numbers are strings) (line 11)",
        id="max-quoted",
    ),
    pytest.param(
        allow("[{sum: amount, max: true, window: 1}]"),
        "b.yaml: rule r1: limits[0].max: expected a finite number above 0, got boolean true"
        " (line 11)",
        id="max-bool",
    ),
    pytest.param(
        allow("[{count: 1, window: 0}]"),
        "b.yaml: rule r1: limits[0].window: must be more than 0 and at most 31 days, got"
        " number 0 (line 11)",
        id="window-zero",
    ),
    pytest.param(
        allow("[{count: 1, window: 32d}]"),
        "b.yaml: rule r1: limits[0].window: must be more than 0 and at most 31 days, got"
        " string '32d' (line 11)",
        id="window-too-long",
    ),
    pytest.param(
        allow("[{count: 1, window: 10x}]"),
        'b.yaml: rule r1: limits[0].window: expected seconds or a duration like "90s",'
        ' "15m", "24h", "7d", got string \'10x\' (line 11)',
        id="window-unit",
    ),
    pytest.param(
        allow("[{count: 1}]"),
        "b.yaml: rule r1: limits[0]: missing required key 'window' (line 11)",
        id="window-missing",
    ),
    pytest.param(
        allow("[{count: 1, window: 1, per: tenant}]"),
        "b.yaml: rule r1: limits[0].per: expected 'principal', 'group', 'resource' or"
        " 'lineage_root', got string 'tenant' (line 11)",
        id="per-unknown",
    ),
    pytest.param(
        allow("[{count: 1, window: 1, rate: 5}]"),
        "b.yaml: rule r1: limits[0]: unknown key 'rate' (line 11)",
        id="unknown-key",
    ),
    pytest.param(
        allow("[{count: 1, window: 1, name: 'a b'}]"),
        "b.yaml: rule r1: limits[0].name: 'a b' is not a valid limit name (1-128 of A-Z a-z"
        " 0-9 - _ . /, beginning and ending with a letter or digit) (line 11)",
        id="name-charset",
    ),
    pytest.param(
        allow("[{count: 1, window: 1, name: 'x/'}]"),
        "b.yaml: rule r1: limits[0].name: 'x/' is not a valid limit name (1-128 of A-Z a-z"
        " 0-9 - _ . /, beginning and ending with a letter or digit) (line 11)",
        id="name-trailing-slash",
    ),
    pytest.param(
        allow("[" + ", ".join(["{count: 1, window: 1}"] * 17) + "]"),
        "b.yaml: rule r1: limits: List should have at most 16 items after validation, not 17"
        " (line 11)",
        id="too-many",
    ),
    pytest.param(
        allow("[{sum: params.amount, max: 5, window: 1}]"),
        "b.yaml: rule r1: limits[0].sum: write the param's name alone: 'amount' (line 11)",
        id="sum-params-prefix",
    ),
    pytest.param(
        allow("[{sum: o.k, max: 5, window: 1}]"),
        "b.yaml: rule r1: limits[0].sum: 'o.k' is not a top-level param name (1-64 of A-Z a-z"
        " 0-9 _ -) (line 11)",
        id="sum-nested",
    ),
    pytest.param(
        allow("[{sum: currency, max: 5, window: 1}]"),
        "b.yaml: rule r1: limits[0].sum: sum adds numbers, but params.currency is declared"
        " string in schema 'pay.transfer' (line 11)",
        id="sum-of-a-string",
    ),
    pytest.param(
        allow("[{sum: any, max: 5, window: 1}]"),
        "b.yaml: rule r1: limits[0].sum: sum adds numbers, but params.any is declared any in"
        " schema 'pay.transfer' (line 11)",
        id="sum-of-any",
    ),
    pytest.param(
        allow("[{sum: fee, max: 5, window: 1}]"),
        "b.yaml: rule r1: limits[0].sum: sum adds up params.fee, which must be declared number"
        " or integer in schemas for every action of the rule; no schema covering"
        " 'pay.transfer' declares it (line 11)",
        id="sum-undeclared",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [pay.transfer, tools.search],"
        " limits: [{sum: amount, max: 5, window: 1}]}",
        "b.yaml: rule r1: limits[0].sum: sum adds up params.amount, which must be declared"
        " number or integer in schemas for every action of the rule; no schema covering"
        " 'tools.search' declares it (line 11)",
        id="sum-one-action-without-schema",
    ),
    pytest.param(
        # pay.* covers pay.refund and pay.transfer, but pay.> also matches pay.a.b
        "- {id: r1, effect: allow, actions: ['pay.>'], limits: [{sum: amount, max: 5, window: 1}]}",
        "b.yaml: rule r1: limits[0].sum: sum adds up params.amount, which must be declared"
        " number or integer in schemas for every action of the rule; no schema covering"
        " 'pay.>' declares it (line 11)",
        id="sum-wildcard-wider-than-schemas",
    ),
    pytest.param(
        allow("[{count: 1, window: 1, per: group}]"),
        "b.yaml: rule r1: limits[0].per: per: group needs the rule's principals to be exactly"
        " one group:<name> (whose members share the limit), not ['*'] (line 11)",
        id="per-group-any-principal",
    ),
    pytest.param(
        allow("[{count: 1, window: 1, per: group}]", extra=", principals: [group:payers, agent-9]"),
        "b.yaml: rule r1: limits[0].per: per: group needs the rule's principals to be exactly"
        " one group:<name> (whose members share the limit), not ['group:payers', 'agent-9']"
        " (line 11)",
        id="per-group-two-principals",
    ),
    pytest.param(
        allow(
            "[{count: 1, window: 1, per: group}]", extra=", principals: [group:payers, group:ops]"
        ),
        "b.yaml: rule r1: limits[0].per: per: group needs the rule's principals to be exactly"
        " one group:<name> (whose members share the limit), not ['group:payers', 'group:ops']"
        " (line 11)",
        id="per-group-two-groups",
    ),
    pytest.param(
        allow("[{count: 1, window: 1, per: group}]", extra=", principals: [agent-1]"),
        "b.yaml: rule r1: limits[0].per: per: group needs the rule's principals to be exactly"
        " one group:<name> (whose members share the limit), not ['agent-1'] (line 11)",
        id="per-group-an-id",
    ),
    pytest.param(
        allow("[{count: 1, window: 1, name: x}, {count: 2, window: 1, name: x}]"),
        "b.yaml: rule r1: limits[1].name: duplicate limit name 'x', also used by this rule;"
        " limit names are unique in the policy set (line 11)",
        id="duplicate-name-in-a-rule",
    ),
    pytest.param(
        allow("[{count: 1, window: 1}, {count: 2, window: 1, name: r1/0}]"),
        "b.yaml: rule r1: limits[1].name: duplicate limit name 'r1/0', also used by this rule;"
        " limit names are unique in the policy set (line 11)",
        id="name-equal-to-a-default",
    ),
]


@pytest.mark.parametrize(("rules", "expected"), BAD)
def test_compile_errors_name_file_rule_and_field(rules: str, expected: str) -> None:
    assert only_problem(rules) == expected


def test_duplicate_names_across_files_name_both() -> None:
    problems = problems_of(
        {
            "a.yaml": bundle(allow("[{count: 1, window: 1, name: shared}]"), "a"),
            "b.yaml": bundle(allow("[{count: 1, window: 1, name: shared}]", rule_id="r2"), "b"),
        }
    )
    assert problems == [
        "b.yaml: rule r2: limits[0].name: duplicate limit name 'shared', also used by rule"
        " 'r1' (a.yaml); limit names are unique in the policy set (line 11)"
    ]


def test_every_problem_at_once() -> None:
    rules = """\
    - id: r1
      effect: allow
      principals: ["*"]
      actions: [pay.transfer]
      limits:
        - {sum: currency, max: 5, window: 1h, per: group}
    - {id: r0, effect: allow, actions: [a], limits: [{count: 0, window: 1}]}
    - {id: r2, effect: deny, actions: [x], limits: [{count: 1, window: 1}]}
    """
    problems = problems_of({"b.yaml": bundle(rules)})
    assert [p.split(": ", 2)[1:] for p in problems] == [
        [
            "rule r1",
            "limits[0].per: per: group needs the rule's principals to be exactly one"
            " group:<name> (whose members share the limit), not ['*'] (line 16)",
        ],
        [
            "rule r1",
            "limits[0].sum: sum adds numbers, but params.currency is declared string in"
            " schema 'pay.transfer' (line 16)",
        ],
        ["rule r0", "limits[0].count: must be at least 1, got 0 (line 17)"],
        [
            "rule r2",
            "limits: limits are for allow rules (limits bound the rates and budgets of what"
            " the rule allows); this rule's effect is deny (line 18)",
        ],
    ]


# ------------------------------------------------------------------ what compiles, how


def test_specs_with_their_defaults_and_given_values() -> None:
    policies = compiled(
        """\
        - id: r1
          effect: allow
          principals: [group:payers]
          actions: [pay.transfer, pay.refund]
          limits:
            - {count: 5, window: 10s}
            - {sum: amount, max: 1000.5, window: 1h, per: group, name: payers/hourly}
            - {sum: amount, max: 3, window: 1.5d, per: resource}
            - {count: 2, window: 90, per: lineage_root}
        """
    )
    (rule,) = policies.rules
    assert rule.limits == (
        LimitSpec("r1", "r1/0", "count", 5.0, 10.0, "principal"),
        LimitSpec("r1", "payers/hourly", "sum", 1000.5, 3600.0, "group", "payers", "amount"),
        LimitSpec("r1", "r1/2", "sum", 3.0, 129600.0, "resource", param="amount"),
        LimitSpec("r1", "r1/3", "count", 2.0, 90.0, "lineage_root"),
    )
    assert all(type(spec.max) is float and type(spec.window_s) is float for spec in rule.limits)


def test_a_sum_over_wildcard_actions_needs_a_schema_covering_them() -> None:
    policies = compiled(
        "- {id: r1, effect: allow, actions: ['pay.*'], limits: [{sum: amount, max: 5,"
        " window: 31d}]}"
    )
    assert policies.rules[0].limits[0].window_s == 31 * 86400.0


def test_json_schema_describes_limits() -> None:
    schema = policy_json_schema()
    limit = schema["$defs"]["Limit"]
    assert limit["additionalProperties"] is False
    assert set(limit["properties"]) == {"count", "sum", "max", "window", "per", "name"}
    assert limit["required"] == ["window"]
    assert limit["properties"]["per"]["enum"] == ["principal", "group", "resource", "lineage_root"]
    assert limit["properties"]["count"]["minimum"] == 1
    assert limit["properties"]["max"]["exclusiveMinimum"] == 0
    assert [option["required"] for option in limit["oneOf"]] == [["count"], ["sum", "max"]]
    limits = schema["$defs"]["Rule"]["properties"]["limits"]
    assert (limits["minItems"], limits["maxItems"]) == (1, 16)


# ------------------------------------------------------------------------ decisions

LIMITED = """\
- id: z-count
  effect: allow
  principals: [group:payers]
  actions: [pay.transfer]
  limits: [{count: 5, window: 10s, name: z}]
- id: a-budget
  effect: allow
  actions: [pay.transfer]
  when: {field: params.amount, le: 100}
  limits:
    - {sum: amount, max: 1000, window: 1h}
    - {count: 50, window: 1d, per: resource}
- id: m-free
  effect: allow
  actions: [pay.transfer]
  resources: ["free:*"]
- id: no-x
  effect: deny
  actions: [pay.transfer]
  resources: ["x:*"]
- id: hold-big
  effect: escalate
  actions: [pay.transfer]
  when: {field: params.amount, gt: 100000}
"""


def req(principal: str = "agent-1", resource: str = "acct:1", **params: Any) -> Request:
    return Request(principal, "pay.transfer", resource, dict(params))


@pytest.fixture(scope="module")
def limited() -> PolicySet:
    return compiled(LIMITED)


def test_one_limited_rule_carries_its_limits(limited: PolicySet) -> None:
    decision = limited.evaluate(req("agent-9", amount=10))
    assert (decision.effect, decision.rules) == (Effect.ALLOW, ("a-budget",))
    assert decision.limits == (
        (
            LimitSpec("a-budget", "a-budget/0", "sum", 1000.0, 3600.0, "principal", "", "amount"),
            LimitSpec("a-budget", "a-budget/1", "count", 50.0, 86400.0, "resource"),
        ),
    )


def test_several_limited_rules_one_group_each_sorted_by_rule_id(limited: PolicySet) -> None:
    decision = limited.evaluate(req("agent-1", amount=10))
    assert decision.rules == ("a-budget", "z-count")
    assert [[spec.name for spec in group] for group in decision.limits] == [
        ["a-budget/0", "a-budget/1"],
        ["z"],
    ]
    only = limited.evaluate(req("agent-1", amount=500))  # a-budget's condition fails
    assert only.rules == ("z-count",)
    assert only.limits == ((LimitSpec("z-count", "z", "count", 5.0, 10.0, "principal"),),)


def test_an_unlimited_rule_that_applies_means_nothing_to_spend(limited: PolicySet) -> None:
    decision = limited.evaluate(req("agent-1", "free:1", amount=10))
    assert decision.rules == ("a-budget", "m-free", "z-count")
    assert decision.allowed and decision.limits == ()


def test_denials_and_holds_carry_no_limits(limited: PolicySet) -> None:
    denied = limited.evaluate(req("agent-1", "x:1", amount=10))
    assert (denied.reason, denied.limits) == (Reason.DENIED_BY_RULE, ())
    held = limited.evaluate(req("agent-1", amount=200000))
    assert (held.reason, held.limits) == (Reason.ESCALATED_BY_RULE, ())
    nothing = limited.evaluate(req("agent-9", amount=500))
    assert (nothing.reason, nothing.limits) == (Reason.NO_MATCHING_RULE, ())


def test_the_evaluator_never_denies_for_a_limit(limited: PolicySet) -> None:
    """A sum the intake could not count (missing param) is still the policy's allow."""
    decision = limited.evaluate(req("agent-1"))
    assert decision.allowed and decision.rules == ("z-count",)
    assert decision.limits[0][0].name == "z"


def test_decisions_with_limits_are_built_once(limited: PolicySet) -> None:
    """The hot path's cost is unchanged: the decision (limits included) is a cached value."""
    first = limited.evaluate(req("agent-1", amount=10))
    again = limited.evaluate(req("agent-2", "acct:2", amount=20))
    assert first is again
    assert limited.explain(req("agent-1", amount=10)).decision is first


def test_explain_traces_show_each_rules_limits(limited: PolicySet) -> None:
    traces = {t.rule.id: t for t in limited.explain(req("agent-1", amount=10)).rules}
    assert [s.name for s in traces["a-budget"].rule.limits] == ["a-budget/0", "a-budget/1"]
    assert traces["m-free"].rule.limits == ()


def test_shipped_examples_carry_their_limits() -> None:
    policies = load_policies(POLICIES)
    search = Request("agent-2", "tools.search", "", {"q": "x"})
    assert [[s.name for s in g] for g in policies.evaluate(search).limits] == [
        ["agent-2-search-rate"]
    ]
    for other in ("agent-1", "agent-3", "agent-7"):
        decision = policies.evaluate(msgspec.structs.replace(search, principal=other))
        assert decision.rules == ("search-for-all",) and decision.limits == ()
    transfer = Request(
        "agent-7", "payments.transfer", "account:a", {"amount": 10, "currency": "EUR"}
    )
    (group,) = policies.evaluate(transfer).limits
    assert [(s.name, s.kind, s.max, s.window_s, s.param) for s in group] == [
        ("payments-hourly-budget", "sum", 10000.0, 3600.0, "amount")
    ]


# --------------------------------------------------------- limit_key / limit_amount

COUNT = LimitSpec("r", "r/0", "count", 5.0, 10.0, "principal")
SUM = LimitSpec("r", "r/1", "sum", 100.0, 60.0, "principal", param="amount")


def test_exported_for_the_intake() -> None:
    assert {"limit_key", "limit_amount"} <= set(bus_guard.policy.__all__)


@pytest.mark.parametrize(
    ("per", "group", "request_", "key"),
    [
        ("principal", "", Request("agent-1", "a", "res:1", {}), "agent-1"),
        ("group", "payers", Request("agent-1", "a", "res:1", {}), "payers"),
        ("resource", "", Request("agent-1", "a", "res:1", {}), "res:1"),
        ("resource", "", Request("agent-1", "a", "", {}), ""),
        ("lineage_root", "", Request("agent-1", "a", "r", {}, lineage_root="agent-9"), "agent-9"),
        ("lineage_root", "", Request("agent-1", "a", "r", {}), "agent-1"),  # a root: itself
    ],
)
def test_limit_key(per: Any, group: str, request_: Request, key: str) -> None:
    assert limit_key(msgspec.structs.replace(COUNT, per=per, group=group), request_) == key


def test_a_count_costs_one_whatever_the_params() -> None:
    for params in ({}, {"amount": -5}, {"amount": "x"}):
        assert limit_amount(COUNT, Request("a", "b", "c", params)) == 1.0


ERROR = "params.amount must be a finite number >= 0"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"amount": 12.5}, 12.5),
        ({"amount": 7}, 7.0),
        ({"amount": 0}, 0.0),
        ({"amount": 0.0}, 0.0),
        ({"amount": 2**1023 - 1}, float(2**1023 - 1)),
        ({"amount": 1e308}, 1e308),
        ({}, f"{ERROR} (it is missing)"),
        ({"amount": None}, f"{ERROR} (it is missing)"),
        ({"other": 5}, f"{ERROR} (it is missing)"),
        ({"amount": -1}, f"{ERROR} (it is -1)"),
        ({"amount": -0.5}, f"{ERROR} (it is -0.5)"),
        ({"amount": math.nan}, f"{ERROR} (it is nan)"),
        ({"amount": math.inf}, f"{ERROR} (it is inf)"),
        ({"amount": -math.inf}, f"{ERROR} (it is -inf)"),
        ({"amount": True}, f"{ERROR} (it is true)"),
        ({"amount": False}, f"{ERROR} (it is false)"),
        ({"amount": "12"}, f"{ERROR} (it is a string)"),
        ({"amount": [1]}, f"{ERROR} (it is a list)"),
        ({"amount": {"v": 1}}, f"{ERROR} (it is an object)"),
        ({"amount": 10**400}, f"{ERROR} (it is too large)"),
        ({"amount": 2**1023}, f"{ERROR} (it is too large)"),
    ],
)
def test_limit_amount(params: dict[str, Any], expected: float | str) -> None:
    got = limit_amount(SUM, Request("a", "b", "c", params))
    assert got == expected and type(got) is type(expected)


def test_negative_zero_costs_zero() -> None:
    got = limit_amount(SUM, Request("a", "b", "c", {"amount": -0.0}))
    assert isinstance(got, float) and math.copysign(1.0, got) == 1.0


def test_params_that_are_not_a_mapping_are_an_error_not_a_crash() -> None:
    odd = Request("a", "b", "c", None)  # type: ignore[arg-type]
    assert limit_amount(SUM, odd) == f"{ERROR} (it is missing)"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=5)
    | st.integers(-(10**400), 10**400),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=5,
)


@given(st.dictionaries(st.sampled_from(["amount", "x"]), json_values))
def test_limit_amount_is_total(params: dict[str, Any]) -> None:
    got = limit_amount(SUM, Request("a", "b", "c", params))
    if isinstance(got, str):
        assert got.startswith(ERROR + " (")
    else:
        assert type(got) is float and 0.0 <= got < math.inf
        assert got == params["amount"]


# ----------------------------------------------------------- explain and policy test


def explained(subject: str, payload: dict[str, Any], policies: Path = POLICIES) -> str:
    out = io.StringIO()
    body = json.dumps({"id": "i1", "resource": "", "ts": DEFAULT_NOW, **payload}).encode()
    assert explain(load_policies(policies), subject, body, now=DEFAULT_NOW, out=out) == 0
    return out.getvalue()


def test_explain_prints_the_limits_with_key_and_amount() -> None:
    text = explained(
        "guard.in.agent-7.payments.transfer",
        {
            "action": "payments.transfer",
            "resource": "account:acct-1",
            "params": {"amount": 120.5, "currency": "USD"},
        },
    )
    assert (
        "    limit payments-hourly-budget: sum params.amount max 10000 per 1h per principal\n"
        in text
    )
    assert text.endswith(
        "  carrying limits=[payments-hourly-budget]\n"
        "  limits to spend (at run time: the first rule whose limits all have room; if none"
        " has, rate_limited / budget_exceeded):\n"
        "    rule transfer-small:\n"
        "      payments-hourly-budget: sum params.amount max 10000 per 1h per principal:"
        ' key "agent-7", amount 120.5\n'
    )
    search = explained("guard.in.agent-2.tools.search", {"action": "tools.search"})
    assert search.endswith(
        '      agent-2-search-rate: count 5 per 10s per principal: key "agent-2", amount 1\n'
    )
    unlimited = explained("guard.in.agent-1.tools.search", {"action": "tools.search"})
    # agent-2's rule is listed (its action matched), with its limit; nothing is spent.
    assert "allow    search-rate-limited  (" in unlimited and "does not apply" in unlimited
    assert "limits to spend" not in unlimited and "carrying" not in unlimited


def test_explain_says_why_nothing_is_spent_and_what_cannot_be_counted(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(
        bundle(
            """\
            - {id: capped, effect: allow, principals: [group:payers], actions: [pay.transfer],
               limits: [{sum: amount, max: 10, window: 1m, per: group}]}
            - {id: open, effect: allow, actions: [pay.transfer], resources: ["free:*"]}
            """
        )
    )
    odd = explained(
        "guard.in.agent-1.pay.transfer", {"action": "pay.transfer", "params": {}}, tmp_path
    )
    assert odd.endswith(
        "    rule capped:\n"
        '      capped/0: sum params.amount max 10 per 1m per group payers: key "payers",'
        f" cannot count: {ERROR} (it is missing)\n"
    )
    free = explained(
        "guard.in.agent-1.pay.transfer",
        {"action": "pay.transfer", "resource": "free:1", "params": {"amount": 5}},
        tmp_path,
    )
    assert free.endswith(
        "  no limits to spend: open allows without limits (so capped's are not spent)\n"
    )


def test_policy_test_checks_the_limits_carried(tmp_path: Path) -> None:
    cases = [
        {
            "name": "right",
            "subject": "guard.in.agent-2.tools.search",
            "intent": {"id": "a", "action": "tools.search", "resource": ""},
            "expect": {"effect": "allow", "limits": ["agent-2-search-rate"]},
        },
        {
            "name": "wrong",
            "subject": "guard.in.agent-2.tools.search",
            "intent": {"id": "b", "action": "tools.search", "resource": ""},
            "expect": {"effect": "allow", "limits": []},
        },
    ]
    tests = tmp_path / "cases.yaml"
    tests.write_text(yaml.safe_dump({"cases": cases}))
    out = io.StringIO()
    assert run_policy_tests(POLICIES, tests, out=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == "PASS cases.yaml: right"
    assert lines[1:5] == [
        "FAIL cases.yaml: wrong",
        "     expected allow (any reason) (any rules) limits=[]",
        "     got      allow allowed_by_rule [search-rate-limited]: allowed by rule"
        " search-rate-limited",
        "     carrying limits=[agent-2-search-rate]",
    ]
