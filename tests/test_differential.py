"""SCENARIOS S16: the compiled evaluator against a small reference interpreter.

Hypothesis draws random bundles (one or two files, each with its own groups, principal
attributes and approvers, dumped to YAML so the real loader, models and compiler run) and
random requests (with lineage: depth, labels and parents); every pair is decided by
``PolicySet.evaluate`` and by :func:`tests.reference.reference`, a direct reading of SPEC
§4-§5 and the README ("Decisions", "Conditions", "Approvals, taints and lineage
constraints") with its own matching code: no index, no cache, no compiled closures.
Effect, reason, the rule ids, an allow's taints and limits (one group per allowing rule,
none when an unlimited rule allows too) and a hold's terms must agree. Some bundles
declare ``params.n`` a number (for ``sum`` limits), so a request whose ``n`` is another
type is ``malformed``. Bundles the compiler rejects as having an unreachable rule are
skipped (``assume``); any other rejection fails the test, since the generator only writes
valid, type-correct policies.

``test_policy_set_agrees_with_the_reference_interpreter`` is the CI-sized run;
``test_differential_soak`` (``-m slow``) covers more than 10^5 (policy, request) pairs and
prints how many and how many disagreed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bus_guard.decision import ParentView, Reason, Request
from bus_guard.errors import PolicyError
from bus_guard.policy._evaluator import PRODUCT_LIMIT
from bus_guard.policy._load import PolicySet, load_policy_sources
from bus_guard.signing import public_jwk
from tests.reference import RefBundle, kind, reference

# -- generators ------------------------------------------------------------------------

IDS = ["agent-1", "agent-2", "agent-12", "bot-1", "bot-x", "svc", "x"]
PRINCIPAL_GLOBS = ["agent-*", "agent-?", "*-1", "bot*", "?", "a*2", "*", "**", "s?c"]
GROUPS = ["g0", "g1", "g2"]
ATTRS = ["team", "tier", "roles", "flag"]
STRINGS = ["x", "y", "xy", "", "agent-1", "a.b", "1", "true", "t"]
REGEXES = ["^x", "y$", "^$", "x|y", "^[xy]+$", "1", r"\.", "^agent-", "t"]
LABELS = ["t", "u", "v", "w:x"]
APPROVERS = ["ann", "ben", "cat"]
APPROVER_GROUPS = ["leads", "all"]
TTLS: list[Any] = [60, 0.5, "90s", "15m", "24h", "1.5h", "7d"]
# One key per approver, one file each, the same in every bundle (an approver id names one
# person across the set); the private halves are never used.
KEY_FILES = {
    f"approvers/{name}.json": json.dumps(
        {"keys": [public_jwk(Ed25519PrivateKey.generate())]}
    ).encode()
    for name in APPROVERS
}
ACTION_TOKENS = ["a", "b"]
RESOURCE_CHARS = ["x", "y", ".", "[", "]", "+", ":"]

strings = st.sampled_from(STRINGS)
numbers = st.integers(-2, 3) | st.sampled_from([0.5, 1.0, 2.5, -0.0])
scalars = strings | numbers | st.booleans()
wholes = st.integers(-1, 3) | st.sampled_from([1.0, 2.0])


def literal_list(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(elements, min_size=1, max_size=3)


# Per kind of field: the operators and literals the compiler's type check admits.
LITERALS: dict[str, list[tuple[str, st.SearchStrategy[Any]]]] = {
    "any": [
        ("eq", scalars),
        ("ne", scalars),
        ("lt", numbers),
        ("le", numbers),
        ("gt", numbers),
        ("ge", numbers),
        ("in", literal_list(scalars)),
        ("not_in", literal_list(scalars)),
        ("matches", st.sampled_from(REGEXES)),
        ("exists", st.booleans()),
    ],
    "string": [
        ("eq", strings),
        ("ne", strings),
        ("in", literal_list(strings)),
        ("not_in", literal_list(strings)),
        ("matches", st.sampled_from(REGEXES)),
        ("exists", st.booleans()),
    ],
    "number": [
        ("eq", numbers),
        ("ne", numbers),
        ("lt", numbers),
        ("le", numbers),
        ("gt", numbers),
        ("ge", numbers),
        ("in", literal_list(numbers)),
        ("not_in", literal_list(numbers)),
        ("exists", st.booleans()),
    ],
    "integer": [
        ("eq", wholes),
        ("ne", wholes),
        ("lt", numbers),
        ("ge", numbers),
        ("in", literal_list(wholes)),
        ("not_in", literal_list(wholes)),
        ("exists", st.booleans()),
    ],
    "boolean": [
        ("eq", st.booleans()),
        ("ne", st.booleans()),
        ("in", literal_list(st.booleans())),
        ("not_in", literal_list(st.booleans())),
        ("exists", st.booleans()),
    ],
    "list": [
        ("in", literal_list(scalars)),
        ("not_in", literal_list(scalars)),
        ("exists", st.booleans()),
    ],
    "labels": [
        ("in", literal_list(st.sampled_from(LABELS))),
        ("not_in", literal_list(st.sampled_from(LABELS))),
    ],
}

FIXED_FIELDS = {
    "resource": "string",
    "action": "string",
    "principal": "string",
    "lineage.root": "string",
    "lineage.depth": "integer",
    "lineage.labels": "labels",
}
PARAM_FIELDS = ["params.n", "params.s", "params.l", "params.o.k", "params.o.o.k"]


@st.composite
def leaf(
    draw: st.DrawFn, attributes: Mapping[str, Mapping[str, Any]], typed: bool = False
) -> dict[str, Any]:
    declared: dict[str, set[str]] = {}
    for attrs in attributes.values():
        for name, value in attrs.items():
            declared.setdefault(name, set()).add("list" if isinstance(value, list) else kind(value))
    choices = [*PARAM_FIELDS, *FIXED_FIELDS, *(f"principal.{a}" for a in sorted(declared))]
    field = draw(st.sampled_from(choices))
    if field == "params.n" and typed:  # declared a number in the bundle's schemas
        field_kind = "number"
    elif field.startswith("params."):
        field_kind = "any"
    elif field in FIXED_FIELDS:
        field_kind = FIXED_FIELDS[field]
    else:  # an attribute: a kind some principal of the bundle has
        field_kind = draw(st.sampled_from(sorted(declared[field.removeprefix("principal.")])))
    op, literal = draw(st.sampled_from(LITERALS[field_kind]))
    return {"field": field, op: draw(literal)}


@st.composite
def condition(
    draw: st.DrawFn, attributes: Mapping[str, Mapping[str, Any]], typed: bool, depth: int = 0
) -> dict[str, Any]:
    """A comparison, or up to two levels of ``not`` / ``all`` / ``any`` around some."""
    roll = draw(st.integers(0, 9)) if depth < 2 else 9
    if roll == 0:
        return {"not": draw(condition(attributes, typed, depth + 1))}
    if roll < 5:
        key = "all" if roll < 3 else "any"
        n = draw(st.integers(1, 3))
        return {key: [draw(condition(attributes, typed, depth + 1)) for _ in range(n)]}
    return draw(leaf(attributes, typed))


action_patterns = st.builds(
    lambda head, last: ".".join([*head, last]),
    st.lists(st.sampled_from([*ACTION_TOKENS, "*", "*"]), max_size=2),
    st.sampled_from([*ACTION_TOKENS, "*", ">", ">"]),
)
resource_patterns = st.sampled_from(
    ["*", "*", "*", "*", "x*", "*y", "?", "x?y", "[x]", "x.y", "x+*"]
) | st.lists(st.sampled_from([*RESOURCE_CHARS, "*", "?"]), min_size=1, max_size=4).map("".join)
attribute_values = scalars | st.lists(scalars, min_size=1, max_size=3)


@st.composite
def bundle(draw: st.DrawFn, name: str) -> dict[str, Any]:
    groups = draw(
        st.dictionaries(
            st.sampled_from(GROUPS),
            st.lists(st.sampled_from(IDS), min_size=1, max_size=3, unique=True),
            max_size=3,
        )
    )
    attributes = draw(
        st.dictionaries(
            st.sampled_from(IDS),
            st.dictionaries(st.sampled_from(ATTRS), attribute_values, min_size=1, max_size=3),
            max_size=4,
        )
    )
    principal_patterns = st.sampled_from(
        [*IDS, *PRINCIPAL_GLOBS, "*", "*", "*", *(f"group:{g}" for g in sorted(groups))]
    )
    members = draw(st.lists(st.sampled_from(APPROVERS), max_size=3, unique=True))
    approver_groups = (
        draw(
            st.dictionaries(
                st.sampled_from(APPROVER_GROUPS),
                st.lists(st.sampled_from(sorted(members)), min_size=1, max_size=3, unique=True),
                max_size=2,
            )
        )
        if members
        else {}
    )
    # Some bundles declare params.n a number: their allow rules may sum it.
    typed = draw(st.integers(0, 2)) == 0
    # A big bundle (one in five) draws its rules' principals and actions from a few
    # patterns, so that many rules share an index bucket (principal class, action) and the
    # evaluator indexes the bucket's resources instead of testing them in turn.
    big = draw(st.integers(0, 4)) == 0
    if big:
        principal_patterns = st.sampled_from(["*", "*", "agent-*", IDS[0], *sorted(groups)[:1]])
        principal_patterns = principal_patterns.map(lambda p: f"group:{p}" if p in GROUPS else p)
    actions = st.sampled_from(["a.b", "a.>", ">"]) if big else action_patterns
    rules = []
    for i in range(draw(st.integers(12, 30) if big else st.integers(1, 8))):
        effect = draw(st.sampled_from(["allow", "allow", "deny", "escalate"]))
        rule: dict[str, Any] = {
            "id": f"{name}-r{i}",
            "effect": effect,
            "principals": draw(st.lists(principal_patterns, min_size=1, max_size=2)),
            "actions": draw(st.lists(actions, min_size=1, max_size=2)),
            "resources": draw(st.lists(resource_patterns, min_size=1, max_size=2)),
        }
        if draw(st.integers(0, 19)) == 0:
            # Wide: more (principal class, action) pairs than the index files one by one.
            rule["principals"] = sorted({*IDS, *PRINCIPAL_GLOBS[:3]} - {"x"})
            rule["actions"] = ["a", "b", "c", "a.b", "b.a", "a.*", "*.b", "b.>"]
        # Unconditional denies and escalates are what make other rules unreachable.
        if draw(st.integers(0, 9)) < (5 if effect == "allow" else 9 if big else 8):
            rule["when"] = draw(condition(attributes, typed))
        if effect == "allow":
            if draw(st.booleans()):
                rule["labels"] = draw(
                    st.lists(st.sampled_from(LABELS), min_size=1, max_size=2, unique=True)
                )
            if draw(st.integers(0, 2)) > 0:
                rule["lineage"] = draw(lineage_constraints())
            if draw(st.booleans()):
                if groups and draw(st.integers(0, 2)) == 0:  # so that per: group is drawn
                    rule["principals"] = [f"group:{draw(st.sampled_from(sorted(groups)))}"]
                rule["limits"] = draw(limits(rule, typed))
        elif effect == "escalate" and draw(st.booleans()):
            rule["approval"] = draw(approval(members, approver_groups))
        rules.append(rule)
        if "limits" in rule and draw(st.integers(0, 3)) == 0:
            # An unlimited twin: wherever the limited rule allows, nothing is to be spent.
            twin = {k: v for k, v in rule.items() if k != "limits"}
            rules.append({**twin, "id": f"{rule['id']}-twin"})
    data: dict[str, Any] = {"bundle": name, "version": "1", "rules": rules}
    if groups:
        data["groups"] = groups
    if attributes:
        data["principals"] = attributes
    if typed:
        data["schemas"] = {">": {"n": "number", "s": "any", "l": "any", "o": "any"}}
    if members:
        data["approvers"] = {
            "members": {m: f"approvers/{m}.json" for m in members},
            "groups": approver_groups,
        }
    return data


@st.composite
def limits(draw: st.DrawFn, rule: dict[str, Any], typed: bool) -> list[dict[str, Any]]:
    """1-3 valid limits: counts, sums of params.n (typed bundles), every valid per; names
    given (unique: rule id and index) or left to the default."""
    pers = ["principal", "resource", "lineage_root"]
    principals = rule["principals"]
    if len(principals) == 1 and principals[0].startswith("group:"):
        pers.append("group")
    out = []
    for j in range(draw(st.integers(1, 3))):
        limit: dict[str, Any]
        if typed and draw(st.booleans()):
            limit = {"sum": "n", "max": draw(st.sampled_from([0.5, 1, 100, 1e6]))}
        else:
            limit = {"count": draw(st.integers(1, 10))}
        limit["window"] = draw(st.sampled_from(TTLS))
        if draw(st.booleans()):
            limit["per"] = draw(st.sampled_from(pers))
        if draw(st.booleans()):
            limit["name"] = f"{rule['id']}.limit-{j}"
        out.append(limit)
    return out


@st.composite
def lineage_constraints(draw: st.DrawFn) -> dict[str, Any]:
    """A non-empty set of constraints."""
    out: dict[str, Any] = {}
    while not out:
        if draw(st.booleans()):
            out["max_depth"] = draw(st.integers(0, 3))
        if draw(st.booleans()):
            out["requires_parent"] = draw(st.lists(action_patterns, min_size=1, max_size=2))
        if draw(st.booleans()):
            out["within_parent"] = draw(
                st.lists(st.sampled_from(["params.n", "resource"]), min_size=1, unique=True)
            )
    return out


@st.composite
def approval(
    draw: st.DrawFn, members: list[str], groups: Mapping[str, list[str]]
) -> dict[str, Any]:
    """A valid approval: known names, a quorum the eligible approvers can reach."""
    out: dict[str, Any] = {}
    eligible = set(members)
    if bool(members) and draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(sorted([*members, *groups])), min_size=1, max_size=3))
        out["approvers"] = names
        eligible = {m for n in names for m in groups.get(n, [n])}
    if bool(eligible) and draw(st.booleans()):
        out["quorum"] = draw(st.integers(1, len(eligible)))
    if draw(st.booleans()):
        out["ttl"] = draw(st.sampled_from(TTLS))
    return out


param_leaves = scalars | st.none() | st.lists(scalars | st.none(), max_size=3)
param_values = param_leaves | st.fixed_dictionaries(
    {}, optional={"k": param_leaves, "o": st.fixed_dictionaries({}, optional={"k": param_leaves})}
)


parent_views = st.builds(
    ParentView,
    st.sampled_from(["P1", "P2"]),
    st.lists(st.sampled_from([*ACTION_TOKENS, "c"]), min_size=1, max_size=3).map(".".join),
    st.sampled_from(["x", "x:y", "x/y", "", "xy", "y"]),
    st.fixed_dictionaries({}, optional={"n": numbers}),
)


@st.composite
def request(draw: st.DrawFn) -> Request:
    depth = draw(st.integers(0, 3))
    return Request(
        principal=draw(st.sampled_from([*IDS, "stranger", "agent-7"])),
        action=".".join(
            draw(st.lists(st.sampled_from([*ACTION_TOKENS, "c"]), min_size=1, max_size=3))
        ),
        resource=draw(
            st.sampled_from(["x", "y", "xy", "x.y", "[x]", "x+y", "", "x\ny", "*"])
            | st.lists(st.sampled_from([*RESOURCE_CHARS, "*", "?", "\n"]), max_size=5).map("".join)
        ),
        params=draw(
            st.fixed_dictionaries(
                {},
                # n: a number half the time (bundles that declare it one deny the rest)
                optional={"n": numbers | param_values} | {k: param_values for k in ("s", "l", "o")},
            )
        ),
        lineage_depth=depth,
        lineage_root=draw(st.sampled_from(["", "agent-1", "x"])) if depth else "",
        labels=frozenset(draw(st.lists(st.sampled_from(LABELS), max_size=2))),
        lineage_parents=tuple(draw(st.lists(parent_views, max_size=2))) if depth else (),
    )


def compile_or_skip(bundles: list[dict[str, Any]]) -> PolicySet:
    sources = {f"{b['bundle']}.yaml": yaml.safe_dump(b, sort_keys=False).encode() for b in bundles}
    try:
        return load_policy_sources(sources, files=KEY_FILES)
    except PolicyError as exc:
        problems = exc.problems
        # The generator writes only valid, type-correct bundles; an unreachable rule is
        # the one rejection it cannot avoid cheaply.
        assert all("unreachable" in p for p in problems), "\n".join(problems)
        assume(False)
        raise


@dataclass
class Tally:
    pairs: int = 0
    disagreements: int = 0
    bundles: int = 0
    outcomes: dict[Reason, int] | None = None
    constrained_allows: int = 0  # allowed by a rule with lineage constraints
    tainted: int = 0  # allows carrying taints
    approvers_held: int = 0  # holds with approvers to ask
    limited: int = 0  # allows carrying limits
    unlimited_over_limited: int = 0  # a limited rule allowed, but so did an unlimited one
    indexed: int = 0  # policy sets with a bucket big enough to index its resources
    by_param: int = 0  # ... and rules in it found by a param's value
    wide: int = 0  # policy sets with a rule filed under one side (principals or actions)


def instance(pattern: str, wild: str, one: str) -> str:
    """A concrete value the pattern matches: ``*``/``>`` -> ``wild``, ``?`` -> ``one``."""
    return "".join(wild if c in "*>" else one if c == "?" else c for c in pattern)


def aimed(bundles: list[dict[str, Any]], requests: list[Request]) -> list[Request]:
    """Besides the drawn requests, one per rule aimed at its first action and resource, so
    that rules apply often and their conditions decide (random requests mostly miss)."""
    out = list(requests)
    rules = [rule for b in bundles for rule in b["rules"]]
    for i, rule in enumerate(rules):
        base = requests[i % len(requests)]
        token = "ab"[i % 2]
        action = ".".join(token if t in ("*", ">") else t for t in rule["actions"][0].split("."))
        resource = instance(rule["resources"][0], "x" * (i % 3), "y")
        out.append(msgspec.structs.replace(base, action=action, resource=resource))
    return out


def check(bundles: list[dict[str, Any]], requests: list[Request], tally: Tally) -> None:
    policies = compile_or_skip(bundles)
    ref = [
        RefBundle(
            b.get("groups", {}),
            b.get("principals", {}),
            b["rules"],
            b.get("approvers", {}),
            b.get("schemas", {}),
        )
        for b in bundles
    ]
    constrained = {r["id"] for b in bundles for r in b["rules"] if "lineage" in r}
    limited = {r["id"] for b in bundles for r in b["rules"] if "limits" in r}
    tally.bundles += 1
    tally.outcomes = tally.outcomes or {}
    buckets = [b for by_action in policies._index.values() for b in by_action.values()]
    big = [b for b in buckets if not isinstance(b, tuple)]
    tally.indexed += bool(big)
    tally.by_param += any(b.by_param for b in big)
    tally.wide += any(len(r.principals) * len(r.actions) > PRODUCT_LIMIT for r in policies.rules)
    mismatches = []
    for base in aimed(bundles, requests):
        # Every request as every principal: groups, globs and attributes all get exercised.
        for principal in (*IDS, "stranger"):
            r = msgspec.structs.replace(base, principal=principal)
            expected = reference(ref, r)
            decision = policies.evaluate(r)
            got = (
                decision.effect,
                decision.reason,
                decision.rules,
                decision.taints,
                decision.hold,
                decision.limits,
            )
            tally.pairs += 1
            tally.outcomes[expected[1]] = tally.outcomes.get(expected[1], 0) + 1
            if expected[1] is Reason.ALLOWED_BY_RULE:
                tally.constrained_allows += bool(constrained & set(expected[2]))
                tally.tainted += bool(expected[3])
                tally.limited += bool(expected[5])
                tally.unlimited_over_limited += not expected[5] and bool(limited & set(expected[2]))
            if expected[4] is not None and expected[4].approvers:
                tally.approvers_held += 1
            if got != expected:
                tally.disagreements += 1
                mismatches.append((r, got, expected))
    assert not mismatches, f"{len(mismatches)} disagreements, first: {mismatches[0]}"
    # explain() decides by its own linear scan: it must agree as well.
    for r in aimed(bundles, requests):
        assert policies.explain(r).decision == policies.evaluate(r)


bundle_sets = st.lists(st.just(0), min_size=1, max_size=2).flatmap(
    lambda xs: st.tuples(*(bundle(f"b{i}") for i in range(len(xs)))).map(list)
)

CI = Tally()


@settings(
    max_examples=120,  # limits and typed params: more to cover than 60 reliably reach
    # The same examples on every machine (a fresh clone has no example database): the
    # coverage check below judges this data, and a random draw left an outcome out once.
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(bundle_sets, st.lists(request(), min_size=1, max_size=6))
def test_policy_set_agrees_with_the_reference_interpreter(
    bundles: list[dict[str, Any]], requests: list[Request]
) -> None:
    check(bundles, requests, CI)


def test_the_ci_run_exercised_every_outcome() -> None:
    """Runs after the property above (file order): the data was not degenerate."""
    if CI.outcomes is None:
        pytest.skip("run together with the differential test")
    assert set(CI.outcomes) == {
        Reason.MALFORMED,
        Reason.ALLOWED_BY_RULE,
        Reason.DENIED_BY_RULE,
        Reason.ESCALATED_BY_RULE,
        Reason.NO_MATCHING_RULE,
        Reason.LINEAGE_VIOLATION,
    }, CI.outcomes
    assert CI.constrained_allows and CI.tainted and CI.approvers_held, CI
    assert CI.limited and CI.unlimited_over_limited, CI
    assert CI.indexed and CI.by_param and CI.wide, CI
    assert CI.disagreements == 0
    print(
        f"\nS16 CI run: bundles={CI.bundles} pairs={CI.pairs} outcomes={CI.outcomes}"
        f" constrained_allows={CI.constrained_allows} tainted={CI.tainted}"
        f" approvers_held={CI.approvers_held} limited={CI.limited}"
        f" unlimited_over_limited={CI.unlimited_over_limited} indexed={CI.indexed}"
        f" by_param={CI.by_param}"
        f" wide={CI.wide}"
    )


SOAK = Tally()


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(bundle_sets, st.lists(request(), min_size=1, max_size=10))
def _soak(bundles: list[dict[str, Any]], requests: list[Request]) -> None:
    check(bundles, requests, SOAK)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_differential_soak() -> None:
    try:
        _soak()
    finally:
        print(
            f"\nS16 differential: bundles={SOAK.bundles} pairs={SOAK.pairs}"
            f" disagreements={SOAK.disagreements} outcomes={SOAK.outcomes}"
        )
    assert SOAK.pairs >= 100_000
    assert SOAK.disagreements == 0
