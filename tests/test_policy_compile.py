"""Loading and compiling policies: every compile error names file and rule, all at once."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from bus_guard.cli import _policy as policytest
from bus_guard.decision import HoldTerms, LimitSpec, Request
from bus_guard.errors import PolicyError
from bus_guard.policy import _approvers as approvers
from bus_guard.policy import _conditions as conditions
from bus_guard.policy import _evaluator as compiler
from bus_guard.policy import _lineage as lineage
from bus_guard.policy import _load as policy
from bus_guard.policy import _model as policy_model
from bus_guard.policy import _patterns as patterns
from bus_guard.policy import _regex as regex
from bus_guard.policy import _rules as rules
from bus_guard.policy import _types as policy_types
from bus_guard.policy._load import PolicySet, load_policies, load_policy_sources, policy_json_schema
from bus_guard.policy._model import OPERATORS
from bus_guard.verify import load_jwks

from .conftest import POLICIES

HEAD = """\
bundle: {name}
version: "1.0.0"
groups:
  payments: [agent-7, agent-9]
  ops: [agent-1]
principals:
  agent-7: {{team: treasury, tier: 2, roles: [payer, viewer]}}
schemas:
  payments.transfer: {{amount: number, currency: string, count: integer, meta: object}}
rules:
"""


def bundle(rules: str, name: str = "b") -> str:
    return HEAD.format(name=name) + textwrap.indent(textwrap.dedent(rules), "  ")


def write(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def problems_of(tmp_path: Path, files: dict[str, str]) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policies(write(tmp_path, files))
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def only_problem(tmp_path: Path, rules: str) -> str:
    problems = problems_of(tmp_path, {"b.yaml": bundle(rules)})
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------- the shipped examples


def test_shipped_policies_load() -> None:
    policies = load_policies(POLICIES)
    assert isinstance(policies, PolicySet)
    assert policies.bundles == ("payments", "tools")
    assert policies.version == "payments@1.2.0,tools@1.2.0"
    assert policies.mode == "enforce"
    assert policies.rule_count == 8
    assert {r.id for r in policies.rules} == {
        "transfer-small",
        "transfer-large",
        "sanctioned-accounts",
        "search-for-all",
        "search-rate-limited",
        "no-shell",
        "http-get-api",
        "no-payments-from-untrusted-input",
    }
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", policies.digest)
    # The example approvers: both must approve a large transfer, within a day.
    assert policies.approvers == ("alice", "bob")
    (large,) = [r for r in policies.rules if r.id == "transfer-large"]
    assert large.hold == HoldTerms(("alice", "bob"), 2, 86400.0)
    (fetch,) = [r for r in policies.rules if r.id == "http-get-api"]
    assert fetch.taints == ("untrusted-input",)
    # agent-2's searches: 5 per 10 s; the payments group: 10,000 of amount an hour each.
    by_id = {r.id: r for r in policies.rules}
    assert by_id["search-rate-limited"].limits == (
        LimitSpec("search-rate-limited", "agent-2-search-rate", "count", 5.0, 10.0, "principal"),
    )
    assert by_id["transfer-small"].limits == (
        LimitSpec(
            "transfer-small",
            "payments-hourly-budget",
            "sum",
            10000.0,
            3600.0,
            "principal",
            param="amount",
        ),
    )
    assert [r.id for r in policies.rules if r.limits] == ["search-rate-limited", "transfer-small"]
    for name in ("alice", "bob"):
        (entry,) = load_jwks(POLICIES / "approvers" / f"{name}.jwks.json").entries
        assert policies.approver_key(entry.kid) == (name, entry)


def test_directory_load_skips_subdirectories(tmp_path: Path) -> None:
    write(tmp_path, {"b.yaml": bundle("- {id: r1, effect: allow, actions: [a.b]}")})
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "cases.yaml").write_text("cases: [this is not a bundle")
    (tmp_path / "notes.txt").write_text("not yaml: [")
    assert load_policies(tmp_path).rule_count == 1


def test_yml_files_and_single_file(tmp_path: Path) -> None:
    write(tmp_path, {"a.yml": bundle("- {id: r1, effect: allow, actions: [a]}", name="a")})
    write(tmp_path, {"b.yaml": bundle("- {id: r2, effect: allow, actions: [b]}", name="b")})
    assert load_policies(tmp_path).bundles == ("a", "b")
    assert load_policies(tmp_path / "b.yaml").bundles == ("b",)


def test_digest_is_deterministic_and_binds_names_and_bytes(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(POLICIES, copy)
    first = load_policies(POLICIES).digest
    assert load_policies(copy).digest == first  # the directory's location does not count
    text = (copy / "tools.yaml").read_text()
    (copy / "tools.yaml").write_text(text + "\n# a comment is still a change\n")
    assert load_policies(copy).digest != first
    (copy / "tools.yaml").write_text(text)
    (copy / "tools.yaml").rename(copy / "tools2.yaml")
    assert load_policies(copy).digest != first
    sources = {p.name: p.read_bytes() for p in POLICIES.glob("*.yaml")}
    reversed_sources = dict(reversed(list(sources.items())))
    keys = {f"approvers/{p.name}": p.read_bytes() for p in (POLICIES / "approvers").iterdir()}
    assert load_policy_sources(reversed_sources, files=keys).digest == first


def test_policy_set_is_immutable() -> None:
    policies = load_policies(POLICIES)
    with pytest.raises(AttributeError):
        policies.mode = "observe"
    with pytest.raises(AttributeError):
        policies.digest = "sha256:0"
    assert policies.mode == "enforce"


@pytest.mark.parametrize(
    "module",
    [
        policy,
        policy_model,
        policy_types,
        compiler,
        conditions,
        patterns,
        regex,
        rules,
        approvers,
        lineage,
        policytest,
    ],
)
def test_public_surface(module: Any) -> None:
    assert isinstance(module.__all__, tuple)
    assert list(module.__all__) == sorted(set(module.__all__), key=module.__all__.index)
    for name in module.__all__:
        assert hasattr(module, name), name


def test_policy_module_exports_the_contract() -> None:
    assert {"load_policies", "policy_json_schema", "PolicySet", "Explanation"} <= set(
        policy.__all__
    )
    assert policy.PolicySet is compiler.PolicySet


# ---------------------------------------------------------------- file-level problems


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no policy files"):
        load_policies(tmp_path)


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file"):
        load_policies(tmp_path / "nope")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = 'bundle: b\nversion: "1"\nrules:\n  - id: r1\n    effect: allow\n   actions: [a]\n'
    (problem,) = problems_of(tmp_path, {"broken.yaml": text})
    assert problem.startswith(f"{tmp_path / 'broken.yaml'}: line 6: invalid YAML")


def test_duplicate_yaml_keys_are_an_error(tmp_path: Path) -> None:
    text = bundle("- id: r1\n  effect: allow\n  effect: deny\n  actions: [a]\n")
    (problem,) = problems_of(tmp_path, {"b.yaml": text})
    assert "duplicate key 'effect'" in problem
    assert "b.yaml: line" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("- just\n- a list\n", "expected a mapping with bundle, version and rules"),
        ('bundle: b\nversion: "1"\n', "missing required key 'rules'"),
        ("bundle: b\nversion: 1.0\nrules: []\n", "version: expected a string, got number 1.0"),
        ('bundle: b\nversion: "1"\nmode: audit\nrules: []\n', "mode: expected 'enforce' or"),
        ('bundle: b\nversion: "1"\nrulez: []\nrules: []\n', "unknown key 'rulez'"),
        ('bundle: "a b"\nversion: "1"\nrules: []\n', "bundle: 'a b' is not a valid name"),
        ('bundle: b\nversion: "1"\ngroups: {g: []}\nrules: []\n', "groups.g: must not be empty"),
    ],
)
def test_bundle_level_problems(tmp_path: Path, text: str, expected: str) -> None:
    (problem,) = problems_of(tmp_path, {"b.yaml": text})
    assert problem.startswith(str(tmp_path / "b.yaml") + ": ")
    assert expected in problem
    assert "rule " not in problem.split(": ")[1]


# ---------------------------------------------------------------- rule-level problems

RULE_PROBLEMS = [
    pytest.param(
        "- {id: r1, effect: allow, principals: ['group:nope'], actions: [a]}",
        "principals[0]: unknown group 'nope' (groups: ops, payments)",
        id="unknown-group",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, matches: '(('}}",
        "when.matches: invalid regular expression '(('",
        id="bad-regex",
    ),
    # What the linear-time engine (RE2) cannot run is refused at compile time, with why.
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, matches: 'a(?=b)'}}",
        "when.matches: invalid regular expression 'a(?=b)': regex uses lookahead '(?=...)',"
        " which the linear-time engine (RE2) does not support",
        id="regex-lookahead",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, matches: '(?<!a)b'}}",
        "regex uses negative lookbehind '(?<!...)', which the linear-time engine",
        id="regex-lookbehind",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, matches: '(a)\\1'}}",
        "regex uses a backreference '\\1', which the linear-time engine (RE2) does not support",
        id="regex-backreference",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, matches: 'a{,3}'}}",
        "'{,n}' at position 1 is literal text in RE2 but a repetition in Python",
        id="regex-open-minimum",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: resource, matches: 'x\\Z'}}",
        "'\\Z' is not supported; write '\\z' for the end of the text",
        id="regex-python-end",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, le: '1000'}}",
        "when.le: expected a number, got string '1000'",
        id="ordering-string",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, gt: true}}",
        "when.gt: expected a number, got boolean true",
        id="ordering-bool",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, in: USD}}",
        "when.in: expected a list like [a, b], got string 'USD'",
        id="in-not-list",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, not_in: []}}",
        "when.not_in: the list is empty",
        id="not-in-empty",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [payments.transfer],"
        " when: {field: params.currency, le: 5}}",
        "when: 'le' compares numbers, but params.currency is a string in schema",
        id="schema-ordering-on-string",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [payments.transfer],"
        " when: {field: params.amont, le: 5}}",
        "when: param 'amont' is not declared in the schema (did you mean 'amount'?",
        id="schema-unknown-param",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [payments.transfer],"
        " when: {field: params.amount, eq: '5'}}",
        "the value '5' is a string, but params.amount is a number in schema",
        id="schema-eq-type",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [payments.transfer],"
        " when: {field: params.count, in: [1, 2.5]}}",
        "the value 2.5 is not whole, but params.count is an integer",
        id="schema-integer",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [payments.transfer],"
        " when: {field: params.currency.code, eq: x}}",
        "params.currency is a string in schema 'payments.transfer'; it has no field 'code'",
        id="schema-nested-on-scalar",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: resource, ge: 1}}",
        "'ge' compares numbers, but resource is a string",
        id="ordering-on-resource",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: principal.teem, eq: x}}",
        "no principal has attribute 'teem' (roles, team, tier)",
        id="unknown-attribute",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: principal.team, gt: 1}}",
        "'gt' compares numbers, but principal.team is never of that type",
        id="attribute-type",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: lineage.labels, eq: x}}",
        "lineage.labels supports in / not_in with strings",
        id="labels-op",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: param.x, eq: 1}}",
        "when.field: unknown field 'param.x'",
        id="unknown-field",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, lte: 1}}",
        "unknown operator 'lte' (did you mean 'lt' or 'le'?)",
        id="unknown-operator",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {field: params.x, ge: 1, le: 2}}",
        "one operator per comparison, got le, ge; combine comparisons with all:",
        id="two-operators",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: {all: []}}",
        "when.all: must not be empty",
        id="empty-all",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], when: [x]}",
        "when: expected a condition",
        id="condition-not-mapping",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a.>.b]}",
        "actions[0]: in action pattern 'a.>.b', '>' must be the last token",
        id="gt-not-last",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a..b]}",
        "action pattern 'a..b' has an empty token",
        id="empty-token",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: ['pay*']}",
        "token 'pay*' mixes a wildcard with text",
        id="partial-wildcard",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: []}",
        "actions: must not be empty",
        id="no-actions",
    ),
    pytest.param(
        "- {id: r1, effect: allow, principals: ['agent 7'], actions: [a]}",
        "principals[0]: 'agent 7' is not a valid principal pattern",
        id="bad-principal",
    ),
    pytest.param(
        "- {id: r1, effect: allow, principals: ['group:'], actions: [a]}",
        "'group:' is not a valid principal pattern",
        id="bad-group-pattern",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], resources: ['']}",
        "resources[0]: '' is not a valid resource pattern",
        id="bad-resource",
    ),
    pytest.param(
        "- {id: r1, effect: permit, actions: [a]}",
        "effect: expected 'allow', 'deny' or 'escalate', got string 'permit'",
        id="bad-effect",
    ),
    pytest.param(
        "- {id: r1, effect: allow, actions: [a], limits: {rate: 5}}",
        "limits: expected a list, got a mapping",
        id="limits-a-list",
    ),
    pytest.param(
        "- {id: r1, actions: [a]}",
        "missing required key 'effect'",
        id="missing-effect",
    ),
]


@pytest.mark.parametrize(("rules", "expected"), RULE_PROBLEMS)
def test_rule_problems_name_file_rule_and_message(
    tmp_path: Path, rules: str, expected: str
) -> None:
    problem = only_problem(tmp_path, rules)
    assert problem.startswith(f"{tmp_path / 'b.yaml'}: rule r1: "), problem
    assert expected in problem
    assert re.search(r"\(line \d+\)$", problem)


def test_rule_without_id_is_named_by_position(tmp_path: Path) -> None:
    rules = "- {id: r1, effect: allow, actions: [a]}\n- {effect: allow, actions: [b]}"
    assert ": rule #2: missing required key 'id'" in only_problem(tmp_path, rules)


def test_valid_conditions_of_every_kind_compile(tmp_path: Path) -> None:
    rules = """\
    - id: r1
      effect: allow
      actions: [payments.transfer]
      when:
        all:
          - {field: params.amount, ge: 1}
          - {field: params.currency, in: [USD, NO]}
          - {field: params.count, eq: 3}
          - {field: params.meta.origin, eq: web}
          - any:
              - {field: principal.team, eq: treasury}
              - {field: principal.roles, in: [payer]}
              - {field: lineage.labels, not_in: [tainted]}
              - {field: lineage.depth, le: 3}
          - not: {field: params.currency, matches: "^X"}
          - {field: resource, exists: true}
    """
    policies = load_policies(write(tmp_path, {"b.yaml": bundle(rules)}))
    assert policies.rule_count == 1


def test_norway_is_a_string_not_false(tmp_path: Path) -> None:
    rules = "- {id: r1, effect: allow, actions: [a], when: {field: params.c, in: [NO, yes, on]}}"
    policies = load_policies(write(tmp_path, {"b.yaml": bundle(rules)}))
    (rule,) = policies.rules
    assert rule.condition is not None
    assert getattr(rule.condition, "value", None) == ["NO", "yes", "on"]


def test_integers_beyond_a_float_are_numbers_not_a_crash(tmp_path: Path) -> None:
    """``math.isfinite(10**400)`` raises OverflowError, which pydantic does not catch: such
    a literal crashed the load. An integer is a finite number however long; a duration
    that long is simply too long."""
    huge = "1" + "0" * 400
    rules = f"- {{id: r1, effect: allow, actions: [a], when: {{field: params.n, lt: {huge}}}}}"
    policies = load_policies(write(tmp_path, {"b.yaml": bundle(rules)}))
    (rule,) = policies.rules
    assert getattr(rule.condition, "value", None) == 10**400
    problem = only_problem(
        tmp_path, f"- {{id: r1, effect: escalate, actions: [a], approval: {{ttl: {huge}}}}}"
    )
    assert "approval.ttl: must be more than 0 and at most 30 days, got number 1000" in problem


def test_duplicate_rule_id_in_one_file(tmp_path: Path) -> None:
    rules = "- {id: r1, effect: allow, actions: [a]}\n- {id: r1, effect: allow, actions: [b]}"
    problem = only_problem(tmp_path, rules)
    assert "rule r1: id: duplicate rule id, first defined in" in problem


def test_duplicate_rule_id_across_files(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        {
            "a.yaml": bundle("- {id: shared, effect: allow, actions: [a]}", name="a"),
            "b.yaml": bundle("- {id: shared, effect: allow, actions: [b]}", name="b"),
        },
    )
    assert problems == [
        f"{tmp_path / 'b.yaml'}: rule shared: id: duplicate rule id, first defined in"
        f" {tmp_path / 'a.yaml'} (line 11)"
    ]


def test_duplicate_bundle_name_across_files(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        {
            "a.yaml": bundle("- {id: r1, effect: allow, actions: [a]}", name="same"),
            "b.yaml": bundle("- {id: r2, effect: allow, actions: [b]}", name="same"),
        },
    )
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'b.yaml'}: bundle: bundle name 'same'")


def test_mixed_modes_name_the_files(tmp_path: Path) -> None:
    observe = bundle("- {id: r2, effect: allow, actions: [b]}", name="b").replace(
        'version: "1.0.0"', 'version: "1.0.0"\nmode: observe'
    )
    problems = problems_of(
        tmp_path,
        {"a.yaml": bundle("- {id: r1, effect: allow, actions: [a]}", name="a"), "b.yaml": observe},
    )
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'b.yaml'}: mode: mode 'observe' differs")
    assert str(tmp_path / "a.yaml") in problems[0]


def test_observe_mode_when_all_agree(tmp_path: Path) -> None:
    text = bundle("- {id: r1, effect: allow, actions: [a]}").replace(
        'version: "1.0.0"', 'version: "1.0.0"\nmode: observe'
    )
    assert load_policies(write(tmp_path, {"b.yaml": text})).mode == "observe"


def test_a_comparison_compiled_once_is_reported_for_every_rule(tmp_path: Path) -> None:
    # A bundle compiles each distinct comparison once (in one scope) and reuses it; its
    # problems are still each rule's own, at each rule's place, and where the schemas
    # covering a rule differ, the comparison is checked again.
    problems = problems_of(
        tmp_path,
        {
            "b.yaml": bundle(
                """\
                - {id: first, effect: allow, actions: [a], when: {field: principal.team, lt: 3}}
                - {id: second, effect: allow, actions: [b],
                   when: {all: [{field: params.n, gt: 0}, {field: principal.team, lt: 3}]}}
                - {id: third, effect: allow, actions: [payments.transfer],
                   when: {field: params.amount, eq: "x"}}
                - {id: fourth, effect: allow, actions: [c], when: {field: params.amount, eq: "x"}}
                """
            )
        },
    )
    assert len(problems) == 3, problems
    assert "rule first: when: 'lt' compares numbers" in problems[0]
    assert "rule second: when.all[1]: 'lt' compares numbers" in problems[1]
    assert "rule third: when: the value 'x' is a string" in problems[2]


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    a = bundle(
        """\
        - {id: bad-type, effect: allow, actions: [a], when: {field: params.x, le: "1"}}
        - {id: bad-group, effect: allow, principals: ["group:ghost"], actions: [a]}
        - {id: bad-regex, effect: deny, actions: [a], when: {field: params.u, matches: "["}}
        - {id: block, effect: deny, actions: [">"]}
        - {id: dead, effect: allow, principals: [agent-1], actions: [x.y]}
        """,
        name="a",
    )
    b = 'bundle: b\nversion: "1"\nrules:\n  - {id: bad-action, effect: allow, actions: [">.x"]}\n'
    problems = problems_of(tmp_path, {"a.yaml": a, "b.yaml": b, "c.yaml": "rules: ["})
    joined = "\n".join(problems)
    for rule_id in ("bad-type", "bad-group", "bad-regex", "dead"):
        assert f"a.yaml: rule {rule_id}: " in joined, rule_id
    assert "b.yaml: rule bad-action: actions[0]" in joined
    assert "c.yaml: line" in joined
    # problems are grouped by file, each file's in source order
    files = [p.split(": ", 1)[0] for p in problems]
    assert files == sorted(files)
    assert "rule block:" not in joined  # the deny that shadows is fine itself


# ---------------------------------------------------------------- unreachable rules

SHADOWED = [
    pytest.param(
        "- {id: block, effect: deny, actions: ['>']}\n"
        "- {id: r1, effect: allow, principals: [agent-7], actions: [a.b], resources: [x]}",
        "deny rule 'block'",
        id="star-everything",
    ),
    pytest.param(
        "- {id: block, effect: deny, actions: [payments.*]}\n"
        "- {id: r1, effect: allow, actions: [payments.transfer],"
        " when: {field: params.amount, le: 10}}",
        "deny rule 'block'",
        id="conditional-allow-under-wildcard",
    ),
    pytest.param(
        "- {id: block, effect: deny, actions: ['>'], resources: ['account:*']}\n"
        "- {id: r1, effect: allow, actions: [a], resources: ['account:acct-1',"
        " 'account:sanctioned-*']}",
        "deny rule 'block'",
        id="resource-glob-covers",
    ),
    pytest.param(
        "- {id: block, effect: deny, principals: ['group:payments'], actions: ['tools.>']}\n"
        "- {id: r1, effect: escalate, principals: ['group:payments'], actions: [tools.a.b]}",
        "deny rule 'block'",
        id="escalate-same-group",
    ),
    pytest.param(
        "- {id: block, effect: deny, principals: ['agent-*'], actions: ['*.x']}\n"
        "- {id: r1, effect: allow, principals: [agent-7, 'agent-9*'], actions: [a.x]}",
        "deny rule 'block'",
        id="principal-glob-covers",
    ),
    pytest.param(
        "- {id: hold-all, effect: escalate, actions: ['tools.>']}\n"
        "- {id: r1, effect: allow, actions: [tools.search]}",
        "escalate rule 'hold-all'",
        id="allow-under-escalate",
    ),
]


@pytest.mark.parametrize(("rules", "by"), SHADOWED)
def test_unreachable_rules_are_rejected(tmp_path: Path, rules: str, by: str) -> None:
    problem = only_problem(tmp_path, rules)
    assert problem.startswith(f"{tmp_path / 'b.yaml'}: rule r1: unreachable: {by}")


REACHABLE = [
    pytest.param(
        "- {id: d, effect: deny, actions: ['>'], when: {field: params.x, exists: true}}\n"
        "- {id: r1, effect: allow, actions: [a]}",
        id="conditional-deny",
    ),
    pytest.param(
        "- {id: d, effect: deny, actions: [a], resources: ['account:sanctioned-*']}\n"
        "- {id: r1, effect: allow, actions: [a], resources: ['account:*']}",
        id="narrower-resources",
    ),
    pytest.param(
        "- {id: d, effect: deny, principals: ['group:ops'], actions: [a]}\n"
        "- {id: r1, effect: allow, principals: ['group:payments'], actions: [a]}",
        id="other-group",
    ),
    pytest.param(
        "- {id: d, effect: deny, actions: [payments.*]}\n"
        "- {id: r1, effect: allow, actions: [payments.>]}",
        id="star-does-not-cover-gt",
    ),
    pytest.param(
        "- {id: d, effect: deny, principals: ['agent-*'], actions: [a]}\n"
        "- {id: r1, effect: allow, actions: [a]}",
        id="glob-does-not-cover-star",
    ),
    pytest.param(
        "- {id: d, effect: deny, actions: [a]}\n- {id: r1, effect: allow, actions: [a, b]}",
        id="one-of-two-actions",
    ),
    pytest.param(
        "- {id: d, effect: deny, actions: ['>']}\n- {id: r1, effect: deny, actions: [a]}",
        id="deny-under-deny-is-not-dead",
    ),
]


@pytest.mark.parametrize("rules", REACHABLE)
def test_rules_that_can_still_apply_are_accepted(tmp_path: Path, rules: str) -> None:
    assert load_policies(write(tmp_path, {"b.yaml": bundle(rules)})).rule_count == 2


def test_shadowing_across_files(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        {
            "a.yaml": bundle("- {id: lockdown, effect: deny, actions: ['>']}", name="a"),
            "b.yaml": bundle("- {id: r1, effect: allow, actions: [x]}", name="b"),
        },
    )
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'b.yaml'}: rule r1: unreachable: deny rule")
    assert str(tmp_path / "a.yaml") in problems[0]


def _counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Count the calls of ``module.name`` (a one-element list holding the count)."""
    count = [0]
    real = getattr(module, name)

    def counted(*args: Any) -> Any:
        count[0] += 1
        return real(*args)

    monkeypatch.setattr(module, name, counted)
    return count


def test_the_unreachable_rule_check_compares_few_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2,000 unconditional denies for anyone and any action, each on its own prefix, over
    # 2,000 allows: every deny covers every allow's principal and action, so comparing
    # all pairs (as before) was 4 million resource comparisons; indexed by resource, an
    # allow meets the few denies whose prefix could cover its resources. The check still
    # finds the one allow a deny covers.
    compared = _counting(monkeypatch, rules, "_covers")
    data = {
        "bundle": "many",
        "version": "1",
        "rules": [
            *(
                {"id": f"d{i}", "effect": "deny", "actions": [">"], "resources": [f"zone{i}/*"]}
                for i in range(2000)
            ),
            *(
                {
                    "id": f"a{i}",
                    "effect": "allow",
                    "principals": [f"agent-{i}"],
                    "actions": ["app.read"],
                    "resources": [f"home{i}/*", f"zone{i}x"],
                }
                for i in range(2000)
            ),
            {"id": "dead", "effect": "allow", "actions": ["app.read"], "resources": ["zone7/a*"]},
        ],
    }
    with pytest.raises(PolicyError) as caught:
        load_policy_sources({"many.yaml": yaml.safe_dump(data).encode()})
    (problem,) = caught.value.problems
    assert "rule dead: unreachable: deny rule 'd7'" in problem
    assert compared[0] <= 2 * len(data["rules"])


def test_attribute_conditions_do_not_scan_every_principal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each condition on a principal attribute used to read every principal's attributes
    # (its own lookup table, and the kinds for the type check): 2,000 rules x 2,000
    # principals. Now the bundle's attributes are read once.
    kinds = _counting(monkeypatch, conditions, "_kind")
    people = {f"p{i}": {"dept": f"d{i % 40}", "level": i % 5} for i in range(2000)}
    data = {
        "bundle": "abac",
        "version": "1",
        "principals": people,
        "rules": [
            {
                "id": f"r{i}",
                "effect": "allow",
                "actions": [f"docs.r{i}"],
                "when": {
                    "all": [
                        {"field": "principal.dept", "eq": f"d{i % 40}"},
                        {"field": "principal.level", "ge": i % 5},
                    ]
                },
            }
            for i in range(2000)
        ],
    }
    policies = load_policy_sources({"abac.yaml": yaml.safe_dump(data).encode()})
    assert kinds[0] <= 3 * (len(people) * 2 + len(data["rules"]) * 2)
    allowed = policies.evaluate(Request("p41", "docs.r1", "x", {}))
    assert allowed.rules == ("r1",)


# ---------------------------------------------------------------- JSON Schema


def _mini_validate(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str) -> None:
    """Just the JSON Schema keywords the bundle schema uses, to check shipped files."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return _mini_validate(value, root["$defs"][name], root, path)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            fits = 0
            for option in schema[key]:
                try:
                    _mini_validate(value, option, root, path)
                    fits += 1
                except AssertionError:
                    pass
            assert fits == 1 if key == "oneOf" else fits >= 1, f"{path}: {key} ({fits} fit)"
    if "not" in schema:
        try:
            _mini_validate(value, schema["not"], root, path)
        except AssertionError:
            pass
        else:
            raise AssertionError(f"{path}: matches what 'not' excludes")
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        python: dict[str, type | tuple[type, ...]] = {
            "object": dict,
            "array": list,
            "string": str,
            "number": (int, float),
            "integer": int,
            "boolean": bool,
        }
        assert any(
            isinstance(value, python[k]) and not (k in ("number", "integer") and value is True)
            for k in kinds
        ), f"{path}: {value!r} is not {kinds}"
    if "enum" in schema:
        assert value in schema["enum"], path
    if "const" in schema:
        assert value == schema["const"], path
    if "pattern" in schema:
        assert re.search(schema["pattern"], value), f"{path}: {value!r} !~ {schema['pattern']}"
    if isinstance(value, dict):
        assert len(value) >= schema.get("minProperties", 0), path
        assert len(value) <= schema.get("maxProperties", 10**9), path
        for key in schema.get("required", ()):
            assert key in value, f"{path}: missing {key}"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                _mini_validate(item, props[key], root, f"{path}.{key}")
            elif extra is False:
                raise AssertionError(f"{path}: extra {key}")
            elif isinstance(extra, dict):
                _mini_validate(item, extra, root, f"{path}.{key}")
        if "propertyNames" in schema:
            for key in value:
                _mini_validate(key, schema["propertyNames"], root, f"{path}.<{key}>")
    if isinstance(value, list):
        assert len(value) >= schema.get("minItems", 0), path
        for i, item in enumerate(value):
            if "items" in schema:
                _mini_validate(item, schema["items"], root, f"{path}[{i}]")
    return None


def shipped_documents() -> list[Any]:
    return [policy.load_yaml(p.read_text()) for p in sorted(POLICIES.glob("*.yaml"))]


def test_json_schema_describes_the_language() -> None:
    schema = policy_json_schema()
    json.dumps(schema)  # serialisable
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "bus_guard policy bundle"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"bundle", "version", "rules"}
    rule = schema["$defs"]["Rule"]
    assert rule["additionalProperties"] is False
    assert set(rule["properties"]) == {
        "id",
        "effect",
        "description",
        "principals",
        "actions",
        "resources",
        "when",
        "approval",
        "labels",
        "lineage",
        "limits",
    }
    assert rule["properties"]["effect"]["enum"] == ["allow", "deny", "escalate"]
    assert all("description" in rule["properties"][k] for k in ("principals", "actions"))
    leaf = schema["$defs"]["Leaf"]
    assert set(leaf["properties"]) == {"field", *OPERATORS}
    assert leaf["minProperties"] == leaf["maxProperties"] == 2
    text = json.dumps(leaf)  # optional means absent, never null
    assert '"type": "null"' not in text
    assert '"default": null' not in text


def test_shipped_files_validate_against_the_schema() -> None:
    schema = policy_json_schema()
    for document in shipped_documents():
        _mini_validate(document, schema, schema, "$")
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:
        return
    for document in shipped_documents():  # pragma: no cover - only with jsonschema installed
        jsonschema.validate(document, schema)


@pytest.mark.parametrize(
    "broken",
    [
        {"rules": [{"id": "r", "effect": "permit", "actions": ["a"]}]},
        {"rules": [{"id": "r", "effect": "allow", "actions": ["a"], "limits": {}}]},
        {"rules": [{"id": "r", "effect": "allow", "actions": ["a.>.b"]}]},
        {"rules": [{"id": "r", "effect": "allow", "actions": ["a"], "when": {"field": "x"}}]},
        {
            "rules": [
                {
                    "id": "r",
                    "effect": "allow",
                    "actions": ["a"],
                    "when": {"field": "params.a", "le": 1, "ge": 0},
                }
            ]
        },
    ],
)
def test_schema_rejects_what_the_loader_rejects(broken: dict[str, Any]) -> None:
    schema = policy_json_schema()
    document = {"bundle": "b", "version": "1", **broken}
    with pytest.raises(AssertionError):
        _mini_validate(document, schema, schema, "$")
    with pytest.raises(PolicyError):
        load_policy_sources({"b.yaml": yaml.safe_dump(document).encode()})
