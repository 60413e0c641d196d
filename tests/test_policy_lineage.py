"""Taints and lineage constraints in policy: labels on allow rules become the decision's
taints and the children's inherited labels; ``max_depth``, ``requires_parent`` and
``within_parent`` limit what an allow rule allows, and an intent that only they stop is
denied ``lineage_violation``, not ``no_matching_rule``."""

from __future__ import annotations

import io
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus_guard.cli._policy import DEFAULT_NOW, explain, run_policy_tests
from bus_guard.decision import Decision, Effect, Lineage, ParentView, Reason, Request
from bus_guard.errors import PolicyError
from bus_guard.ledger import LedgerRecord, lineage_of
from bus_guard.ledger._lineage import MAX_LABELS
from bus_guard.ledger._records import DECISION
from bus_guard.pipeline import decide, decode, outcome_of
from bus_guard.policy import PolicySet, load_policies, load_policy_sources
from bus_guard.policy._conditions import _member_test, _not_member_test
from bus_guard.policy._lineage import within_resource

from .conftest import POLICIES

HEAD = """\
bundle: lin
version: "1"
schemas:
  pay.send: {amount: number, currency: string, count: integer}
rules:
"""


def compile_rules(rules: str) -> PolicySet:
    text = HEAD + textwrap.indent(textwrap.dedent(rules), "  ")
    return load_policy_sources({"lin.yaml": text.encode()})


def parent(
    action: str = "invoice.approve", resource: str = "acct", pid: str = "P1", **scope: float
) -> ParentView:
    return ParentView(pid, action, resource, dict(scope))


def req(
    action: str = "pay.send",
    resource: str = "acct",
    parents: tuple[ParentView, ...] = (),
    depth: int | None = None,
    labels: frozenset[str] = frozenset(),
    principal: str = "agent-1",
    **params: Any,
) -> Request:
    return Request(
        principal,
        action,
        resource,
        params,
        lineage_depth=(1 if parents else 0) if depth is None else depth,
        labels=labels,
        lineage_parents=parents,
    )


def decided(policies: PolicySet, request: Request) -> Decision:
    """evaluate(), checked against explain(): both must decide the same."""
    decision = policies.evaluate(request)
    assert policies.explain(request).decision == decision
    return decision


def outcome(decision: Decision) -> tuple[Effect, Reason, tuple[str, ...]]:
    return decision.effect, decision.reason, decision.rules


ALLOW, DENY = Effect.ALLOW, Effect.DENY
VIOLATION = Reason.LINEAGE_VIOLATION


# ---------------------------------------------------------------- taints


def test_an_allow_rules_labels_are_the_decisions_taints() -> None:
    policies = compile_rules(
        """\
        - {id: fetch, effect: allow, actions: [web.get], labels: [untrusted-input, web]}
        - {id: fetch-2, effect: allow, actions: [web.*], labels: [external, web],
           when: {field: params.external, eq: true}}
        - {id: search, effect: allow, actions: [web.search]}
        - {id: block, effect: deny, actions: [web.get], when: {field: params.bad, eq: true}}
        """
    )
    one = decided(policies, req("web.get"))
    assert outcome(one) == (ALLOW, Reason.ALLOWED_BY_RULE, ("fetch",))
    assert one.taints == ("untrusted-input", "web")
    two = decided(policies, req("web.get", external=True))
    assert two.rules == ("fetch", "fetch-2")
    assert two.taints == ("external", "untrusted-input", "web")  # sorted union
    assert decided(policies, req("web.search")).taints == ()
    denied = decided(policies, req("web.get", bad=True))
    assert outcome(denied) == (DENY, Reason.DENIED_BY_RULE, ("block",))
    assert denied.taints == ()


def test_taints_reach_the_outcome_and_the_childrens_labels() -> None:
    """The whole loop: allowed with a label → recorded as taints → the child's lineage
    carries it → a deny rule on lineage.labels stops the child."""
    policies = compile_rules(
        """\
        - {id: fetch, effect: allow, actions: [web.get], labels: [untrusted-input]}
        - {id: pay, effect: allow, actions: [pay.send]}
        - {id: no-tainted-pay, effect: deny, actions: [pay.send],
           when: {field: lineage.labels, in: [untrusted-input]}}
        """
    )
    subject = "guard.in.agent-1.web.get"
    payload = json.dumps(
        {"id": "i1", "action": "web.get", "resource": "u", "ts": DEFAULT_NOW, "params": {"n": 3}}
    ).encode()
    decision = decide(policies, subject, payload, now=DEFAULT_NOW)
    record = outcome_of(
        "P1", subject, payload, decode(subject, payload, None), decision, gateway="g", now=1.0
    )
    assert record.taints == ("untrusted-input",) and record.scope == {"n": 3}
    ledger = LedgerRecord(kind=DECISION, seq=1, prev="", **_fields(record))
    lineage = lineage_of("agent-2", ["P1"], {"P1": ledger}, max_depth=8)
    assert lineage.labels == {"untrusted-input", "web.get"}
    child = json.dumps(
        {"id": "i2", "action": "pay.send", "resource": "r", "ts": DEFAULT_NOW, "params": {}}
    ).encode()
    denied = decide(policies, "guard.in.agent-2.pay.send", child, now=DEFAULT_NOW, lineage=lineage)
    assert outcome(denied) == (DENY, Reason.DENIED_BY_RULE, ("no-tainted-pay",))
    root = decide(policies, "guard.in.agent-2.pay.send", child, now=DEFAULT_NOW)
    assert outcome(root) == (ALLOW, Reason.ALLOWED_BY_RULE, ("pay",))


def _fields(record: Any) -> dict[str, Any]:
    names = set(LedgerRecord.__struct_fields__)
    return {k: v for k, v in msgspec.structs.asdict(record).items() if k in names}


# ---------------------------------------------------------------- lineage_of


def ledger(
    did: str, action: str, *, effect: str = "allow", depth: int = 0, **fields: Any
) -> LedgerRecord:
    return LedgerRecord(
        kind=DECISION,
        gateway="g",
        seq=1,
        prev="",
        ts=1.0,
        decision_id=did,
        effect=effect,
        principal="agent-1",
        action=action,
        lineage_depth=depth,
        **fields,
    )


def test_lineage_of_inherits_labels_taints_and_actions_and_views_the_parents() -> None:
    found = {
        "A": ledger(
            "A",
            "web.get",
            resource="url:x",
            labels=("tools.search",),
            taints=("untrusted-input",),
            scope={"n": 2},
        ),
        "B": ledger("B", "invoice.approve", resource="acct:1", depth=2, scope={"amount": 50}),
    }
    lineage = lineage_of("agent-9", ["A", "B"], found, max_depth=8)
    assert lineage.violation is None
    assert lineage.depth == 3 and lineage.root == "agent-1"
    assert lineage.labels == {"tools.search", "untrusted-input", "web.get", "invoice.approve"}
    assert lineage.parents == (
        ParentView("A", "web.get", "url:x", {"n": 2}),
        ParentView("B", "invoice.approve", "acct:1", {"amount": 50}),
    )
    assert lineage_of("agent-9", [], found, max_depth=8) == Lineage(0, "agent-9")


def test_lineage_of_refuses_more_labels_than_it_keeps() -> None:
    """A truncated label set could drop the taint a deny rule looks for: fail closed."""
    many = tuple(f"label-{i:03}" for i in range(MAX_LABELS))
    found = {"A": ledger("A", "a.b", labels=many[:-1]), "B": ledger("B", "c.d", taints=many[-2:])}
    fits = lineage_of("agent-9", ["A"], found, max_depth=8)
    assert fits.violation is None and len(fits.labels) == MAX_LABELS
    over = lineage_of("agent-9", ["A", "B"], found, max_depth=8)
    # 63 labels and a.b from A; label-063 (a taint) and c.d from B
    assert over.violation == f"lineage carries {MAX_LABELS + 2} inherited labels (at most 64)"


# ---------------------------------------------------------------- lineage constraints


CHILD_PAY = """\
- {id: child-pay, effect: allow, actions: [pay.send, pay.any],
   lineage: {max_depth: 2, requires_parent: [invoice.*], within_parent: [params.amount, resource]}}
"""


@pytest.fixture(scope="module")
def child_pay() -> PolicySet:
    return compile_rules(CHILD_PAY)


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (req(parents=(parent(amount=100),), amount=100), None),  # equal is within
        (req(parents=(parent(amount=100),), amount=99.5), None),
        (req(resource="acct/sub", parents=(parent(amount=100),), amount=1), None),
        (req(resource="acct:sub:x", parents=(parent(amount=100),), amount=1), None),
        (req(parents=(parent(amount=100),), depth=2, amount=1), None),
        (
            req(parents=(parent(amount=100), parent("x.y", pid="P2", amount=5)), amount=5),
            None,  # one parent's action is enough; both scopes are met
        ),
        (
            req(parents=(parent(amount=100),), depth=3, amount=1),
            "max_depth 2 (lineage depth 3)",
        ),
        (
            req(amount=1),
            "requires_parent [invoice.*] (a root intent has no parent)",
        ),
        (
            req(parents=(parent("invoice.approve.final", amount=100),), amount=1),
            "requires_parent [invoice.*] (no parent's action matches)",
        ),
        (
            req(parents=(parent(amount=100),), amount=100.01),
            "within_parent params.amount (params.amount is 100.01; parent P1 has 100)",
        ),
        (
            req(parents=(parent(amount=100), parent(pid="P2", amount=5)), amount=6),
            "within_parent params.amount (params.amount is 6; parent P2 has 5)",
        ),
        (
            req(parents=(parent(),), amount=1),
            "within_parent params.amount (params.amount is 1; parent P1 has none)",
        ),
        (
            req(parents=(parent(amount=100),)),
            "within_parent params.amount (params.amount is not a number)",
        ),
        # pay.any has no schema: other types reach the rules (pay.send's are malformed)
        (
            req("pay.any", parents=(parent(amount=100),), amount=True),
            "within_parent params.amount (params.amount is not a number)",
        ),
        (
            req("pay.any", parents=(parent(amount=100),), amount="1"),
            "within_parent params.amount (params.amount is not a number)",
        ),
        (
            req(resource="acct2", parents=(parent(amount=100),), amount=1),
            "within_parent resource (not within parent P1's)",
        ),
        (
            req(resource="ac", parents=(parent(amount=100),), amount=1),
            "within_parent resource (not within parent P1's)",
        ),
        (
            req(
                resource="acct:1",
                parents=(parent(amount=9), parent(resource="acct:2", pid="P2", amount=9)),
                amount=1,
            ),
            "within_parent resource (not within parent P2's)",
        ),
    ],
)
def test_each_constraint_passes_and_fails(
    child_pay: PolicySet, request_: Request, why: str | None
) -> None:
    decision = decided(child_pay, request_)
    if why is None:
        assert outcome(decision) == (ALLOW, Reason.ALLOWED_BY_RULE, ("child-pay",))
    else:
        assert outcome(decision) == (DENY, VIOLATION, ("child-pay",))
        assert decision.message == f"lineage constraints not met: rule child-pay: {why}"


@pytest.mark.parametrize(
    ("lineage", "root_ok"),
    [
        ("{max_depth: 0}", True),
        ("{requires_parent: ['>']}", False),
        ("{within_parent: [params.amount]}", False),  # a root has no scope to stay within
        ("{within_parent: [resource]}", False),
    ],
)
def test_root_intents(lineage: str, root_ok: bool) -> None:
    policies = compile_rules(f"- {{id: r, effect: allow, actions: [pay.send], lineage: {lineage}}}")
    decision = decided(policies, req(amount=1))
    assert decision.effect is (ALLOW if root_ok else DENY)
    child = decided(policies, req(parents=(parent("any.thing", amount=5),), amount=1))
    assert child.effect is (DENY if lineage == "{max_depth: 0}" else ALLOW)


def test_lineage_violation_only_when_the_rule_matched_in_all_but_lineage() -> None:
    policies = compile_rules(
        """\
        - {id: child-pay, effect: allow, actions: [pay.send], resources: ["acct*"],
           when: {field: params.currency, eq: USD}, lineage: {requires_parent: [invoice.*]}}
        """
    )
    # lineage fails, all else matches: lineage_violation naming the rule
    usd = decided(policies, req(currency="USD"))
    assert outcome(usd) == (DENY, VIOLATION, ("child-pay",))
    # the condition fails too: nothing was written for this intent
    gbp = decided(policies, req(currency="GBP"))
    assert outcome(gbp) == (DENY, Reason.NO_MATCHING_RULE, ())
    assert gbp.message == "no rule allows agent-1 pay.send with this resource and params"
    # the resource does not match
    other = decided(policies, req(resource="bucket", currency="USD"))
    assert outcome(other) == (DENY, Reason.NO_MATCHING_RULE, ())
    # another action: the rule is not a candidate
    assert outcome(decided(policies, req("pay.refund"))) == (DENY, Reason.NO_MATCHING_RULE, ())


def test_another_allow_rule_deny_and_escalate_take_precedence() -> None:
    policies = compile_rules(
        """\
        - {id: child-pay, effect: allow, actions: [pay.send],
           lineage: {requires_parent: [invoice.*]}, labels: [child]}
        - {id: small-pay, effect: allow, actions: [pay.send], when: {field: params.amount, le: 10},
           labels: [small]}
        - {id: big-pay, effect: escalate, actions: [pay.send],
           when: {field: params.amount, gt: 1000}}
        - {id: no-gbp, effect: deny, actions: [pay.send], when: {field: params.currency, eq: GBP}}
        """
    )
    assert outcome(decided(policies, req(amount=50))) == (DENY, VIOLATION, ("child-pay",))
    small = decided(policies, req(amount=5))
    assert outcome(small) == (ALLOW, Reason.ALLOWED_BY_RULE, ("small-pay",))
    assert small.taints == ("small",)  # the failing rule neither allows nor taints
    both = decided(policies, req(parents=(parent(),), amount=5))
    assert both.rules == ("child-pay", "small-pay") and both.taints == ("child", "small")
    held = decided(policies, req(amount=5000))
    assert outcome(held) == (Effect.HOLD, Reason.ESCALATED_BY_RULE, ("big-pay",))
    denied = decided(policies, req(amount=50, currency="GBP"))
    assert outcome(denied) == (DENY, Reason.DENIED_BY_RULE, ("no-gbp",))


def test_candidates_name_each_rule_once(child_pay: PolicySet) -> None:
    assert child_pay.candidates("agent-1", "pay.send") == ("child-pay",)


def test_several_failing_rules_are_all_named() -> None:
    policies = compile_rules(
        """\
        - {id: b-rule, effect: allow, actions: [pay.send], lineage: {max_depth: 0}}
        - {id: a-rule, effect: allow, actions: [pay.*], lineage: {requires_parent: [invoice.*]}}
        - {id: c-rule, effect: allow, actions: [pay.send], when: {field: params.count, eq: 1},
           lineage: {max_depth: 0}}
        """
    )
    decision = decided(policies, req(parents=(parent("other.thing"),), amount=1))
    assert outcome(decision) == (DENY, VIOLATION, ("a-rule", "b-rule"))
    assert decision.message == (
        "lineage constraints not met:"
        " rule a-rule: requires_parent [invoice.*] (no parent's action matches);"
        " rule b-rule: max_depth 0 (lineage depth 1)"
    )


def test_observe_mode_reports_a_lineage_violation() -> None:
    text = 'bundle: o\nversion: "1"\nmode: observe\nrules:\n'
    text += "  - {id: r, effect: allow, actions: [a], lineage: {max_depth: 0}}\n"
    policies = load_policy_sources({"o.yaml": text.encode()})
    payload = json.dumps({"id": "i", "action": "a", "resource": "r", "ts": DEFAULT_NOW}).encode()
    deep = Lineage(depth=1, root="x", parents=(parent("b"),))
    decision = decide(policies, "guard.in.agent-1.a", payload, now=DEFAULT_NOW, lineage=deep)
    assert (decision.effect, decision.reason, decision.would_deny) == (ALLOW, VIOLATION, True)


def test_the_pipeline_hands_the_ledgers_parents_to_the_rules(child_pay: PolicySet) -> None:
    payload = json.dumps(
        {"id": "i", "action": "pay.send", "resource": "acct", "ts": DEFAULT_NOW, "params": {}}
    )

    def with_amount(amount: float, lineage: Lineage | None) -> Decision:
        data = payload.replace("{}", json.dumps({"amount": amount})).encode()
        return decide(
            child_pay, "guard.in.agent-1.pay.send", data, now=DEFAULT_NOW, lineage=lineage
        )

    lineage = Lineage(depth=1, root="agent-0", parents=(parent(amount=10),))
    assert with_amount(10, lineage).effect is ALLOW
    assert outcome(with_amount(11, lineage)) == (DENY, VIOLATION, ("child-pay",))
    assert outcome(with_amount(1, None)) == (DENY, VIOLATION, ("child-pay",))


def test_within_resource() -> None:
    assert within_resource("a", "a")
    assert within_resource("a/b", "a") and within_resource("a:b", "a")
    assert not within_resource("ab", "a") and not within_resource("a.b", "a")
    assert not within_resource("b", "a/b") and not within_resource("", "a")
    assert within_resource("", "")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["invoice.approve", "invoice.x", "other.y", "invoice"]),
            st.sampled_from(["acct", "acct:1", "acct/2", "bank"]),
            st.one_of(st.none(), st.integers(-2, 5), st.sampled_from([2.5, 0.0])),
        ),
        max_size=3,
    ),
    st.integers(0, 4),
    st.sampled_from(["acct", "acct:1", "acct:1:z", "acct/2", "acctx", "bank"]),
    st.one_of(st.none(), st.integers(-2, 5), st.sampled_from([2.5, True, "1"])),
)
def test_the_fast_predicate_agrees_with_the_reasons(
    parents: list[tuple[str, str, float | None]],
    depth: int,
    resource: str,
    amount: Any,
) -> None:
    """The compiled closure (hot path) and the step-by-step failure (slow path) agree."""
    policies = compile_rules(CHILD_PAY)
    (rule,) = policies.rules
    assert rule.lineage is not None and rule.check is not None
    views = tuple(
        parent(a, r, f"P{i}", **({} if s is None else {"amount": s}))
        for i, (a, r, s) in enumerate(parents)
    )
    params = {} if amount is None else {"amount": amount}
    request = Request("p", "pay.send", resource, params, lineage_depth=depth, lineage_parents=views)
    assert rule.check(request) is (rule.lineage.failure(request) is None)
    assert rule.lineage.holds(request) is all(c.held for c in rule.lineage.trace(request))


label_values = st.sampled_from(["t", "u", "1", "true", ""]) | st.integers(0, 2) | st.booleans()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(label_values, min_size=1, max_size=4),
    st.frozensets(st.sampled_from(["t", "u", "v", "1", "true", ""]) | st.integers(0, 2)),
)
def test_label_sets_are_tested_like_lists(literals: list[Any], labels: frozenset[Any]) -> None:
    """``in`` / ``not_in`` on a frozenset (lineage.labels) take a set operation; the
    element-wise test of lists is the slow path it replaces."""
    for test in (_member_test(literals), _not_member_test(literals)):
        assert test(labels) is test(list(labels))


# ---------------------------------------------------------------- compile errors


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param(
            "- {id: r1, effect: deny, actions: [a], labels: [x]}",
            "rule r1: labels: labels is for allow rules (labels taint what the rule allows);"
            " this rule's effect is deny",
            id="labels-on-deny",
        ),
        pytest.param(
            "- {id: r1, effect: escalate, actions: [a], labels: [x]}",
            "rule r1: labels: labels is for allow rules",
            id="labels-on-escalate",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], labels: ['a b']}",
            "rule r1: labels[0]: 'a b' is not a valid label (1-64 of A-Z a-z 0-9 _ . : -)",
            id="bad-label",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], labels: []}",
            "rule r1: labels: must not be empty",
            id="empty-labels",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], labels: [" + "x" * 65 + "]}",
            "is not a valid label",
            id="long-label",
        ),
        pytest.param(
            "- {id: r1, effect: deny, actions: [a], lineage: {max_depth: 1}}",
            "rule r1: lineage: lineage is for allow rules (lineage constraints limit what the"
            " rule allows); this rule's effect is deny",
            id="lineage-on-deny",
        ),
        pytest.param(
            "- {id: r1, effect: escalate, actions: [a], lineage: {max_depth: 1}}",
            "rule r1: lineage: lineage is for allow rules",
            id="lineage-on-escalate",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], lineage: {}}",
            "rule r1: lineage: give at least one of max_depth, requires_parent, within_parent",
            id="lineage-empty",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], lineage: {max_depth: -1}}",
            "rule r1: lineage.max_depth: must be at least 0, got -1",
            id="negative-depth",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], lineage: {max_depth: '3'}}",
            "rule r1: lineage.max_depth: expected a whole number, got string '3'",
            id="string-depth",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], lineage: {requires_parent: [a..b]}}",
            "rule r1: lineage.requires_parent[0]: action pattern 'a..b' has an empty token",
            id="bad-parent-pattern",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], lineage: {requires_parent: []}}",
            "rule r1: lineage.requires_parent: must not be empty",
            id="empty-requires-parent",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], lineage: {within_parent: [params.a.b]}}",
            "rule r1: lineage.within_parent[0]: 'params.a.b': within_parent compares top-level"
            " params only",
            id="nested-param",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], lineage: {within_parent: [principal]}}",
            "rule r1: lineage.within_parent[0]: 'principal' is not params.<name> or resource",
            id="within-principal",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a],"
            " lineage: {within_parent: [resource, resource]}}",
            "rule r1: lineage: within_parent lists a field twice",
            id="within-twice",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [pay.send],"
            " lineage: {within_parent: [params.currency]}}",
            "rule r1: lineage.within_parent[0]: within_parent compares numbers, but"
            " params.currency is declared string in schema 'pay.send'",
            id="within-string-param",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [pay.send],"
            " lineage: {within_parent: [params.amont]}}",
            "rule r1: lineage.within_parent[0]: param 'amont' is not declared in the schema"
            " (declared: amount, count, currency)",
            id="within-undeclared-param",
        ),
        pytest.param(
            "- {id: r1, effect: allow, actions: [a], lineage: {max_dept: 1}}",
            "rule r1: lineage: unknown key 'max_dept' (did you mean 'max_depth'?)",
            id="unknown-key",
        ),
    ],
)
def test_label_and_lineage_problems_name_file_rule_and_field(
    tmp_path: Path, rules: str, expected: str
) -> None:
    (tmp_path / "lin.yaml").write_text(HEAD + "  " + rules + "\n")
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tmp_path / 'lin.yaml'}: rule r1: "), problems[0]
    assert expected in problems[0], problems[0]
    assert re.search(r"\(line \d+\)$", problems[0])


def test_numeric_params_compile_in_within_parent() -> None:
    policies = compile_rules(
        """\
        - {id: r1, effect: allow, actions: [pay.send],
           lineage: {within_parent: [params.amount, params.count]}}
        - {id: r2, effect: allow, actions: [other], lineage: {within_parent: [params.anything]}}
        """
    )
    assert {r.id for r in policies.rules} == {"r1", "r2"}


# ---------------------------------------------------------------- policy test and explain


def test_policy_test_cases_give_lineage_and_expect_taints(tmp_path: Path) -> None:
    (tmp_path / "lin.yaml").write_text(
        HEAD
        + textwrap.indent(
            CHILD_PAY + "- {id: fetch, effect: allow, actions: [web.get], labels: [untrusted]}\n",
            "  ",
        )
    )
    cases = """\
    cases:
      - name: a child within its invoice
        subject: guard.in.agent-1.pay.send
        intent: {id: c1, action: pay.send, resource: "acct:1", params: {amount: 5}}
        lineage:
          parents: [{id: INV, action: invoice.approve, resource: acct, scope: {amount: 5}}]
        expect: {effect: allow, rules: [child-pay], taints: []}
      - name: too deep
        subject: guard.in.agent-1.pay.send
        intent: {id: c2, action: pay.send, resource: "acct:1", params: {amount: 5}}
        lineage:
          depth: 3
          parents: [{action: invoice.approve, resource: acct, scope: {amount: 5}}]
        expect: {effect: deny, reason: lineage_violation, rules: [child-pay]}
      - name: a root
        subject: guard.in.agent-1.pay.send
        intent: {id: c3, action: pay.send, resource: "acct", params: {amount: 5}}
        expect: {effect: deny, reason: lineage_violation}
      - name: a fetch is tainted
        subject: guard.in.agent-1.web.get
        intent: {id: c4, action: web.get, resource: ""}
        expect: {effect: allow, taints: [untrusted]}
      - name: WRONG taints
        subject: guard.in.agent-1.web.get
        intent: {id: c5, action: web.get, resource: ""}
        expect: {effect: allow, taints: []}
      - name: WRONG parent scope
        subject: guard.in.agent-1.pay.send
        intent: {id: c6, action: pay.send, resource: "acct", params: {amount: 6}}
        lineage:
          parents: [{action: invoice.approve, resource: acct, scope: {amount: 5}}]
        expect: {effect: allow}
    """
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "cases.yaml").write_text(textwrap.dedent(cases))
    out = io.StringIO()
    assert run_policy_tests(tmp_path, out=out) == 1
    text = out.getvalue()
    assert "4 passed, 2 failed" in text, text
    assert [line for line in text.splitlines() if line.startswith("FAIL")] == [
        "FAIL cases.yaml: WRONG taints",
        "FAIL cases.yaml: WRONG parent scope",
    ]
    assert "     carrying taints=[untrusted]" in text
    assert "within_parent params.amount (params.amount is 6; parent parent-1 has 5)" in text


def test_policy_test_expects_hold_terms(tmp_path: Path) -> None:
    cases = """\
    cases:
      - name: right terms
        subject: guard.in.agent-7.payments.transfer
        intent: {id: h1, action: payments.transfer, resource: "account:a", params: {amount: 5000}}
        expect: {effect: hold, approvers: [bob, alice], quorum: 2}
      - name: WRONG quorum
        subject: guard.in.agent-7.payments.transfer
        intent: {id: h2, action: payments.transfer, resource: "account:a", params: {amount: 5000}}
        expect: {effect: hold, quorum: 1}
      - name: WRONG approvers
        subject: guard.in.agent-7.payments.transfer
        intent: {id: h3, action: payments.transfer, resource: "account:a", params: {amount: 5000}}
        expect: {effect: hold, approvers: [alice]}
      - name: WRONG not a hold
        subject: guard.in.agent-7.payments.transfer
        intent: {id: h4, action: payments.transfer, resource: "account:a", params: {amount: 5}}
        expect: {effect: allow, quorum: 1}
    """
    (tmp_path / "cases.yaml").write_text(textwrap.dedent(cases))
    out = io.StringIO()
    assert run_policy_tests(POLICIES, tmp_path / "cases.yaml", out=out) == 1
    text = out.getvalue()
    assert "1 passed, 3 failed" in text, text
    assert "     expected hold (any reason) (any rules) quorum=1" in text
    assert "     carrying approvers=[alice, bob] quorum=2 ttl=86400s" in text


def test_explain_shows_the_lineage_it_used() -> None:
    policies = compile_rules(CHILD_PAY)
    payload = json.dumps(
        {
            "id": "e1",
            "action": "pay.send",
            "resource": "acct:1",
            "ts": DEFAULT_NOW,
            "params": {"amount": 70},
        }
    ).encode()
    lineage = Lineage(
        depth=1,
        root="agent-0",
        labels=frozenset({"invoice.approve"}),
        parents=(parent(amount=60),),
    )
    out = io.StringIO()
    subject = "guard.in.agent-1.pay.send"
    assert explain(policies, subject, payload, now=DEFAULT_NOW, out=out, lineage=lineage) == 0
    text = out.getvalue()
    assert '  lineage:  depth 1, root agent-0, labels ["invoice.approve"]' in text
    assert '  parent:   P1 invoice.approve "acct" scope {"amount": 60}' in text
    assert "    holds  lineage max_depth 2  (actual: 1)" in text
    assert '    holds  lineage requires_parent [invoice.*]  (actual: ["invoice.approve"])' in text
    assert (
        '    fails  lineage within_parent params.amount  (actual: {"parents": [60], "value": 70})'
        in text
    )
    assert (
        '    holds  lineage within_parent resource  (actual: {"parents": ["acct"], "value":'
        ' "acct:1"})' in text
    )
    assert text.rstrip().endswith(
        "policy decision: deny lineage_violation [child-pay]: lineage constraints not met:"
        " rule child-pay: within_parent params.amount (params.amount is 70; parent P1 has 60)"
    )
    root = io.StringIO()
    assert explain(policies, subject, payload, now=DEFAULT_NOW, out=root) == 0
    assert "  parents:  none (a root intent)" in root.getvalue()
    assert "fails  lineage requires_parent [invoice.*]  (actual: [])" in root.getvalue()
