"""Approvers in policy: who may release a hold (with their public keys), how many of them,
for how long; compile errors name file, rule and field; hold terms on every hold."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus_guard.decision import Effect, HoldTerms, Reason, Request
from bus_guard.errors import PolicyError
from bus_guard.policy import PolicySet, load_policies, load_policy_sources
from bus_guard.signing import public_jwk
from bus_guard.verify import load_jwks


def jwks(*keys: Ed25519PrivateKey, **extra: Any) -> str:
    return json.dumps({"keys": [{**public_jwk(k), **extra} for k in keys]})


KEYS = {name: Ed25519PrivateKey.generate() for name in ("alice", "bob", "carol", "dave")}


def key_files(tmp_path: Path, names: tuple[str, ...] = ("alice", "bob", "carol")) -> None:
    (tmp_path / "approvers").mkdir(exist_ok=True)
    for name in names:
        (tmp_path / "approvers" / f"{name}.json").write_text(jwks(KEYS[name]))


APPROVERS = """\
approvers:
  members:
    alice: approvers/alice.json
    bob: [approvers/bob.json]
    carol: approvers/carol.json
  groups:
    leads: [alice, bob]
"""


def bundle(rules: str, *, approvers: str = APPROVERS, name: str = "b") -> str:
    head = f'bundle: {name}\nversion: "1"\n{approvers}rules:\n'
    return head + textwrap.indent(textwrap.dedent(rules), "  ")


def compiled(tmp_path: Path, rules: str, **kw: Any) -> PolicySet:
    key_files(tmp_path)
    (tmp_path / "b.yaml").write_text(bundle(rules, **kw))
    return load_policies(tmp_path)


def problems_of(tmp_path: Path, files: dict[str, str], keys: bool = True) -> list[str]:
    if keys:
        key_files(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    return info.value.problems


def only_problem(tmp_path: Path, rules: str, **kw: Any) -> str:
    problems = problems_of(tmp_path, {"b.yaml": bundle(rules, **kw)})
    assert len(problems) == 1, problems
    assert re.search(r"\(line \d+\)$", problems[0]), problems[0]
    return problems[0]


ESCALATE = "- {id: r1, effect: escalate, actions: [pay]"


# ---------------------------------------------------------------- hold terms


def hold_of(policies: PolicySet, action: str = "pay", **params: Any) -> HoldTerms | None:
    decision = policies.evaluate(Request("agent-1", action, "r", params))
    assert decision.effect is Effect.HOLD, decision
    return decision.hold


def test_default_approval_is_any_one_approver_of_the_bundle_for_a_day(tmp_path: Path) -> None:
    policies = compiled(tmp_path, ESCALATE + "}")
    assert hold_of(policies) == HoldTerms(("alice", "bob", "carol"), 1, 86400.0)


@pytest.mark.parametrize(
    ("approval", "terms"),
    [
        ("{approvers: [leads], quorum: 2}", HoldTerms(("alice", "bob"), 2, 86400.0)),
        ("{approvers: [carol, leads], ttl: 15m}", HoldTerms(("alice", "bob", "carol"), 1, 900.0)),
        ("{approvers: [bob, leads, bob]}", HoldTerms(("alice", "bob"), 1, 86400.0)),
        ("{quorum: 3, ttl: 90}", HoldTerms(("alice", "bob", "carol"), 3, 90.0)),
        ("{ttl: 90s}", HoldTerms(("alice", "bob", "carol"), 1, 90.0)),
        ("{ttl: 1.5h}", HoldTerms(("alice", "bob", "carol"), 1, 5400.0)),
        ("{ttl: 7d}", HoldTerms(("alice", "bob", "carol"), 1, 7 * 86400.0)),
        ("{ttl: 30d}", HoldTerms(("alice", "bob", "carol"), 1, 30 * 86400.0)),
        ("{ttl: 0.5}", HoldTerms(("alice", "bob", "carol"), 1, 0.5)),
    ],
)
def test_approval_sets_the_hold_terms(tmp_path: Path, approval: str, terms: HoldTerms) -> None:
    policies = compiled(tmp_path, ESCALATE + f", approval: {approval}}}")
    assert hold_of(policies) == terms


def test_several_escalate_rules_need_every_rule_met(tmp_path: Path) -> None:
    """Approvers all rules accept (intersection), the largest quorum, the shortest ttl."""
    policies = compiled(
        tmp_path,
        """\
        - {id: big, effect: escalate, actions: [pay], when: {field: params.n, gt: 10},
           approval: {approvers: [leads], quorum: 1, ttl: 1h}}
        - {id: huge, effect: escalate, actions: [pay], when: {field: params.n, gt: 100},
           approval: {approvers: [bob, carol], quorum: 2, ttl: 7d}}
        - {id: odd, effect: escalate, actions: [pay], when: {field: params.odd, eq: true},
           approval: {approvers: [carol], ttl: 10m}}
        """,
    )
    assert hold_of(policies, n=50) == HoldTerms(("alice", "bob"), 1, 3600.0)
    decision = policies.evaluate(Request("agent-1", "pay", "r", {"n": 500}))
    assert decision.rules == ("big", "huge")
    assert decision.hold == HoldTerms(("bob",), 2, 3600.0)
    # No approver is accepted by every rule: such a hold can only expire.
    assert hold_of(policies, n=500, odd=True) == HoldTerms((), 2, 600.0)
    # explain decides (and carries) the same
    request = Request("agent-1", "pay", "r", {"n": 500})
    assert policies.explain(request).decision == policies.evaluate(request)


def test_only_holds_carry_hold_terms(tmp_path: Path) -> None:
    policies = compiled(
        tmp_path,
        """\
        - {id: hold-it, effect: escalate, actions: [pay], when: {field: params.n, gt: 10}}
        - {id: stop-it, effect: deny, actions: [pay], when: {field: params.n, gt: 100}}
        - {id: allow-it, effect: allow, actions: [pay]}
        """,
    )
    for n, effect in ((1, Effect.ALLOW), (500, Effect.DENY), (None, Effect.ALLOW)):
        decision = policies.evaluate(Request("agent-1", "pay", "r", {"n": n}))
        assert decision.effect is effect and decision.hold is None
    assert policies.evaluate(Request("agent-1", "nope", "r", {})).hold is None
    assert hold_of(policies, n=50) == HoldTerms(("alice", "bob", "carol"), 1, 86400.0)


def test_a_bundle_without_approvers_holds_until_expiry(tmp_path: Path) -> None:
    """Allowed, documented: no approvers, quorum 1; such holds can only expire."""
    policies = compiled(tmp_path, ESCALATE + "}", approvers="")
    assert hold_of(policies) == HoldTerms((), 1, 86400.0)
    assert policies.approvers == ()
    policies = compiled(tmp_path, ESCALATE + ", approval: {ttl: 1h}}", approvers="")
    assert hold_of(policies) == HoldTerms((), 1, 3600.0)


def test_approvers_of_one_bundle_do_not_approve_another_bundles_holds(tmp_path: Path) -> None:
    key_files(tmp_path)
    (tmp_path / "a.yaml").write_text(bundle(ESCALATE + "}", name="a"))
    other = "approvers:\n  members: {dave: approvers/dave.json}\n"
    key_files(tmp_path, ("dave",))
    (tmp_path / "c.yaml").write_text(
        bundle("- {id: r2, effect: escalate, actions: [ship]}", approvers=other, name="c")
    )
    policies = load_policies(tmp_path)
    assert hold_of(policies) == HoldTerms(("alice", "bob", "carol"), 1, 86400.0)
    assert hold_of(policies, "ship") == HoldTerms(("dave",), 1, 86400.0)
    assert policies.approvers == ("alice", "bob", "carol", "dave")


# ---------------------------------------------------------------- keys


def test_approver_key_finds_the_approver_of_a_kid(tmp_path: Path) -> None:
    key_files(tmp_path)
    # bob signs with two keys, one of them retired: both are his, the caller checks use
    second = Ed25519PrivateKey.generate()
    (tmp_path / "approvers" / "bob2.json").write_text(jwks(second, not_after=1000))
    text = APPROVERS.replace("[approvers/bob.json]", "[approvers/bob.json, approvers/bob2.json]")
    (tmp_path / "b.yaml").write_text(bundle(ESCALATE + "}", approvers=text))
    policies = load_policies(tmp_path)
    for name in ("alice", "bob", "carol"):
        (entry,) = load_jwks(tmp_path / "approvers" / f"{name}.json").entries
        assert policies.approver_key(entry.kid) == (name, entry)
    (retired,) = load_jwks(tmp_path / "approvers" / "bob2.json").entries
    found = policies.approver_key(retired.kid)
    assert found is not None and found[0] == "bob"
    assert found[1].usable_at(999) and not found[1].usable_at(1000)
    assert policies.approver_key("no-such-kid") is None
    assert policies.approvers == ("alice", "bob", "carol")


def test_the_same_approver_in_two_bundles_with_the_same_files(tmp_path: Path) -> None:
    key_files(tmp_path)
    (tmp_path / "a.yaml").write_text(bundle(ESCALATE + "}", name="a"))
    (tmp_path / "c.yaml").write_text(
        bundle("- {id: r2, effect: escalate, actions: [ship]}", name="c")
    )
    policies = load_policies(tmp_path)
    assert policies.approvers == ("alice", "bob", "carol")


def test_the_digest_covers_the_key_files(tmp_path: Path) -> None:
    policies = compiled(tmp_path, ESCALATE + "}")
    (tmp_path / "approvers" / "carol.json").write_text(jwks(KEYS["dave"]))
    assert load_policies(tmp_path).digest != policies.digest
    # ... and is the same whether the files are read from disk or given in memory
    sources = {"b.yaml": (tmp_path / "b.yaml").read_bytes()}
    files = {f"approvers/{p.name}": p.read_bytes() for p in (tmp_path / "approvers").iterdir()}
    in_memory = load_policy_sources(sources, files=files)
    assert in_memory.digest == load_policies(tmp_path).digest
    assert in_memory.approvers == ("alice", "bob", "carol")


def test_in_memory_sources_need_their_key_files() -> None:
    text = bundle(ESCALATE + "}")
    with pytest.raises(PolicyError) as info:
        load_policy_sources({"b.yaml": text.encode()})
    assert (
        "b.yaml: approvers.members.alice: approvers/alice.json: not found: no files were given"
        in info.value.problems[0]
    )
    with pytest.raises(PolicyError) as info:
        load_policy_sources({"b.yaml": text.encode()}, files={})
    assert "approvers/alice.json: not found among the policy files" in info.value.problems[0]


# ---------------------------------------------------------------- compile errors


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param(
            "- {id: r1, effect: allow, actions: [pay], approval: {quorum: 1}}",
            "rule r1: approval: approval is for escalate rules (who may release a hold);"
            " this rule's effect is allow",
            id="approval-on-allow",
        ),
        pytest.param(
            "- {id: r1, effect: deny, actions: [pay], approval: {ttl: 1h}}",
            "rule r1: approval: approval is for escalate rules",
            id="approval-on-deny",
        ),
        pytest.param(
            ESCALATE + ", approval: {approvers: [alice, mallory]}}",
            "rule r1: approval.approvers[1]: unknown approver or group 'mallory'"
            " (approvers: alice, bob, carol; groups: leads)",
            id="unknown-approver",
        ),
        pytest.param(
            ESCALATE + ", approval: {approvers: []}}",
            "rule r1: approval.approvers: must not be empty",
            id="empty-approvers",
        ),
        pytest.param(
            ESCALATE + ", approval: {approvers: ['al ice']}}",
            "rule r1: approval.approvers[0]: 'al ice' is not a valid approver id",
            id="bad-approver-id",
        ),
        pytest.param(
            ESCALATE + ", approval: {quorum: 0}}",
            "rule r1: approval.quorum: must be at least 1, got 0",
            id="quorum-zero",
        ),
        pytest.param(
            ESCALATE + ", approval: {quorum: '2'}}",
            "rule r1: approval.quorum: expected a whole number, got string '2' (quoted numbers",
            id="quorum-string",
        ),
        pytest.param(
            ESCALATE + ", approval: {quorum: 1.5}}",
            "rule r1: approval.quorum: expected a whole number, got number 1.5",
            id="quorum-float",
        ),
        pytest.param(
            ESCALATE + ", approval: {approvers: [leads], quorum: 3}}",
            "rule r1: approval.quorum: quorum 3 needs more distinct approvers than the 2"
            " eligible (alice, bob)",
            id="quorum-above-eligible",
        ),
        pytest.param(
            ESCALATE + ", approval: {quorum: 4}}",
            "quorum 4 needs more distinct approvers than the 3 eligible (alice, bob, carol)",
            id="quorum-above-members",
        ),
        pytest.param(
            ESCALATE + ", approval: {ttl: 0}}",
            "rule r1: approval.ttl: must be more than 0 and at most 30 days, got number 0",
            id="ttl-zero",
        ),
        pytest.param(
            ESCALATE + ", approval: {ttl: -5}}",
            "approval.ttl: must be more than 0 and at most 30 days, got number -5",
            id="ttl-negative",
        ),
        pytest.param(
            ESCALATE + ", approval: {ttl: 31d}}",
            "approval.ttl: must be more than 0 and at most 30 days, got string '31d'",
            id="ttl-too-long",
        ),
        pytest.param(
            ESCALATE + ", approval: {ttl: 2w}}",
            'approval.ttl: expected seconds or a duration like "90s", "15m", "24h", "7d",'
            " got string '2w'",
            id="ttl-unit",
        ),
        pytest.param(
            ESCALATE + ", approval: {ttl: true}}",
            "approval.ttl: expected seconds or a duration like",
            id="ttl-bool",
        ),
        pytest.param(
            ESCALATE + ", approval: {quorom: 2}}",
            "rule r1: approval: unknown key 'quorom' (did you mean 'quorum'?)",
            id="unknown-key",
        ),
    ],
)
def test_approval_problems_name_file_rule_and_field(
    tmp_path: Path, rules: str, expected: str
) -> None:
    problem = only_problem(tmp_path, rules)
    assert problem.startswith(f"{tmp_path / 'b.yaml'}: rule r1: "), problem
    assert expected in problem, problem


def test_quorum_needs_approvers(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, ESCALATE + ", approval: {quorum: 2}}", approvers="")
    assert "rule r1: approval.quorum: quorum 2 needs more distinct approvers than the 0" in problem


@pytest.mark.parametrize(
    ("approvers", "expected"),
    [
        pytest.param(
            "approvers:\n  members: {alice: approvers/alice.json}\n  groups: {alice: [alice]}\n",
            "approvers.groups.alice: 'alice' is both an approver and a group of approvers;"
            " rename one",
            id="member-and-group",
        ),
        pytest.param(
            "approvers:\n  members: {alice: approvers/alice.json}\n"
            "  groups: {leads: [alice, mallory]}\n",
            "approvers.groups.leads[1]: unknown approver 'mallory' (approvers: alice)",
            id="group-unknown-member",
        ),
        pytest.param(
            "approvers:\n  members: {alice: approvers/nope.json}\n",
            "approvers.members.alice: approvers/nope.json: JWKS file not found",
            id="missing-file",
        ),
        pytest.param(
            "approvers:\n  members: {alice: [approvers/alice.json, approvers/nope.json]}\n",
            "approvers.members.alice[1]: approvers/nope.json: JWKS file not found",
            id="missing-second-file",
        ),
        pytest.param(
            "approvers:\n  members: {alice: approvers/empty.json}\n",
            "approvers.members.alice: approvers/empty.json: JWKS has no keys",
            id="no-keys",
        ),
        pytest.param(
            "approvers:\n  members: {alice: approvers/garbage.json}\n",
            "approvers.members.alice: approvers/garbage.json: not valid JSON",
            id="not-json",
        ),
        pytest.param(
            "approvers:\n  members: {alice: approvers/private.json}\n",
            "approvers/private.json: keys[0]: contains a private key (member 'd')",
            id="private-key",
        ),
        pytest.param(
            "approvers:\n  members: {alice: approvers/rsa.json}\n",
            "approvers/rsa.json: keys[0]: not an Ed25519 key (kty/crv must be OKP/Ed25519)",
            id="not-ed25519",
        ),
        pytest.param(
            "approvers:\n  members: {alice: ../alice.json}\n",
            "approvers.members.alice: '../alice.json' is not a relative path inside the policy"
            " directory",
            id="path-escapes",
        ),
        pytest.param(
            "approvers:\n  members: {alice: /etc/alice.json}\n",
            "'/etc/alice.json' is not a relative path inside the policy directory",
            id="path-absolute",
        ),
        pytest.param(
            "approvers:\n  members: {alice: []}\n",
            "approvers.members.alice: the list is empty",
            id="no-files",
        ),
        pytest.param(
            "approvers:\n  members:\n"
            "    {alice: approvers/alice.json, bob: approvers/alice-copy.json}\n",
            "approvers.members.bob: key '"
            + load_jwks(json.loads(jwks(KEYS["alice"]))).entries[0].kid
            + "' is also a key of approver 'alice'",
            id="kid-of-two-approvers",
        ),
        pytest.param(
            "approvers:\n  members: {alice: [approvers/alice.json, approvers/alice-other.json]}\n",
            "key '"
            + load_jwks(json.loads(jwks(KEYS["alice"]))).entries[0].kid
            + "' of approver 'alice' is given twice, with different key material",
            id="kid-twice-different-keys",
        ),
        pytest.param(
            "approvers:\n  member: {alice: approvers/alice.json}\n",
            "approvers: unknown key 'member' (did you mean 'members'?)",
            id="unknown-key",
        ),
    ],
)
def test_approver_problems_name_file_and_field(
    tmp_path: Path, approvers: str, expected: str
) -> None:
    key_files(tmp_path)
    folder = tmp_path / "approvers"
    (folder / "empty.json").write_text('{"keys": []}')
    (folder / "garbage.json").write_text("{nope")
    private = {**public_jwk(KEYS["alice"]), "d": "AAAA"}
    (folder / "private.json").write_text(json.dumps({"keys": [private]}))
    (folder / "rsa.json").write_text(json.dumps({"keys": [{"kty": "RSA", "kid": "r"}]}))
    (folder / "alice-copy.json").write_text(jwks(KEYS["alice"]))
    other = {**public_jwk(KEYS["bob"]), "kid": public_jwk(KEYS["alice"])["kid"]}
    (folder / "alice-other.json").write_text(json.dumps({"keys": [other]}))
    problems = problems_of(tmp_path, {"b.yaml": bundle(ESCALATE + "}", approvers=approvers)})
    assert len(problems) == 1, problems
    (problem,) = problems
    assert problem.startswith(f"{tmp_path / 'b.yaml'}: approvers"), problem
    assert expected in problem, problem
    assert re.search(r"\(line \d+\)$", problem), problem


def test_the_same_kid_for_two_approvers_across_bundles(tmp_path: Path) -> None:
    key_files(tmp_path)
    (tmp_path / "approvers" / "mallory.json").write_text(jwks(KEYS["alice"]))
    (tmp_path / "a.yaml").write_text(bundle(ESCALATE + "}", name="a"))
    mallory = "approvers:\n  members: {mallory: approvers/mallory.json}\n"
    (tmp_path / "c.yaml").write_text(
        bundle("- {id: r2, effect: escalate, actions: [ship]}", approvers=mallory, name="c")
    )
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{tmp_path / 'c.yaml'}: approvers.members.mallory: key '")
    assert f"is also a key of approver 'alice' ({tmp_path / 'a.yaml'})" in problem


def test_the_same_approver_with_other_key_files_in_another_bundle(tmp_path: Path) -> None:
    key_files(tmp_path, ("alice", "bob", "carol", "dave"))
    (tmp_path / "a.yaml").write_text(bundle(ESCALATE + "}", name="a"))
    imposter = "approvers:\n  members: {alice: approvers/dave.json}\n"
    (tmp_path / "c.yaml").write_text(
        bundle("- {id: r2, effect: escalate, actions: [ship]}", approvers=imposter, name="c")
    )
    with pytest.raises(PolicyError) as info:
        load_policies(tmp_path)
    (problem,) = info.value.problems
    assert problem.startswith(
        f"{tmp_path / 'c.yaml'}: approvers.members.alice: approver 'alice' has other key"
        f" files in {tmp_path / 'a.yaml'} (approvers/alice.json)"
    ), problem


def test_every_approver_problem_is_reported_at_once(tmp_path: Path) -> None:
    approvers = (
        "approvers:\n  members: {alice: approvers/nope.json, bob: approvers/bob.json}\n"
        "  groups: {bob: [bob], leads: [zed]}\n"
    )
    rules = f"""\
    {ESCALATE}, approval: {{approvers: [nobody], quorum: 5}}}}
    - {{id: r2, effect: allow, actions: [x], approval: {{ttl: 1h}}}}
    """
    problems = problems_of(tmp_path, {"b.yaml": bundle(rules, approvers=approvers)})
    assert len(problems) == 6, problems
    text = "\n".join(problems)
    for expected in (
        "approvers.members.alice: approvers/nope.json: JWKS file not found",
        "approvers.groups.bob: 'bob' is both an approver and a group",
        "approvers.groups.leads[0]: unknown approver 'zed'",
        "rule r1: approval.approvers[0]: unknown approver or group 'nobody'",
        "rule r1: approval.quorum: quorum 5 needs more distinct approvers",
        "rule r2: approval: approval is for escalate rules",
    ):
        assert expected in text, text


def test_the_shipped_example_needs_both_treasury_leads() -> None:
    from .conftest import POLICIES

    policies = load_policies(POLICIES)
    decision = policies.evaluate(
        Request("agent-7", "payments.transfer", "account:acct-1", {"amount": 5000})
    )
    assert (decision.effect, decision.reason) == (Effect.HOLD, Reason.ESCALATED_BY_RULE)
    assert decision.hold == HoldTerms(("alice", "bob"), 2, 86400.0)
