"""``policy test`` / ``explain`` / ``check`` on the shipped examples and on broken inputs."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bus_guard.cli._main import main
from bus_guard.cli._policy import DEFAULT_NOW, check_policies, explain, run_policy_tests
from bus_guard.cli._safe import safe
from bus_guard.pipeline import decide
from bus_guard.policy._load import load_policies, load_yaml

from .conftest import POLICIES
from .helpers import HOSTILE, terminal_safe


def run(policies: Path, tests: Path | None = None) -> tuple[int, str]:
    out = io.StringIO()
    status = run_policy_tests(policies, tests, out=out)
    return status, out.getvalue()


def shipped_cases() -> list[dict[str, Any]]:
    cases = []
    for file in sorted((POLICIES / "tests").glob("*.yaml")):
        cases.extend(load_yaml(file.read_text())["cases"])
    return cases


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A copy of the shipped policies, tests included, to break."""
    shutil.copytree(POLICIES, tmp_path / "policies")
    return tmp_path / "policies"


def test_shipped_examples_pass() -> None:
    status, output = run(POLICIES)
    lines = output.splitlines()
    count = len(shipped_cases())
    assert status == 0, output
    assert lines[-1] == f"{count} passed, 0 failed"
    assert sum(line.startswith("PASS ") for line in lines) == count
    assert not any(line.startswith(("FAIL", "ERROR")) for line in lines)


def test_shipped_cases_cover_every_rule_and_outcome() -> None:
    policies = load_policies(POLICIES)
    named: set[str] = set()
    outcomes: set[str] = set()
    for case in shipped_cases():
        named.update(case["expect"].get("rules", ()))
        outcomes.add(case["expect"].get("reason", ""))
    assert named == {rule.id for rule in policies.rules}
    assert {"allowed_by_rule", "denied_by_rule", "escalated_by_rule", "no_matching_rule"} <= (
        outcomes
    )


def test_a_failing_case_fails_the_run(workdir: Path) -> None:
    tests = workdir / "tests" / "payments.yaml"
    text = tests.read_text()
    # Claim the sanctioned account is fine: the runner must disagree.
    broken = text.replace(
        "expect: {effect: deny, reason: denied_by_rule, rules: [sanctioned-accounts]}",
        "expect: {effect: allow, reason: allowed_by_rule, rules: [transfer-small]}",
        1,
    )
    assert broken != text
    tests.write_text(broken)
    status, output = run(workdir)
    assert status == 1
    fail_lines = [line for line in output.splitlines() if line.startswith("FAIL ")]
    assert fail_lines == ["FAIL payments.yaml: the sanctioned-account deny beats the allow"]
    assert "expected allow allowed_by_rule [transfer-small]" in output
    assert "got      deny denied_by_rule [sanctioned-accounts]: denied by rule" in output
    total = len(shipped_cases())
    assert output.splitlines()[-1] == f"{total - 1} passed, 1 failed"


@pytest.mark.parametrize(
    ("expect", "passes"),
    [
        ("{effect: allow}", True),
        ("{effect: allow, rules: [transfer-small]}", True),
        ("{effect: allow, reason: allowed_by_rule, rules: []}", False),
        ("{effect: allow, reason: no_matching_rule}", False),
        ("{effect: allow, would_deny: false}", True),
        ("{effect: allow, would_deny: true}", False),
        ("{effect: hold}", False),
    ],
)
def test_optional_expectations(tmp_path: Path, expect: str, passes: bool) -> None:
    (tmp_path / "t.yaml").write_text(
        "cases:\n"
        "  - name: c\n"
        "    subject: guard.in.agent-7.payments.transfer\n"
        "    intent: {id: i1, action: payments.transfer, resource: 'account:a',"
        " params: {amount: 5, currency: USD}}\n"
        f"    expect: {expect}\n"
    )
    status, output = run(POLICIES, tmp_path / "t.yaml")
    assert status == (0 if passes else 1), output
    assert output.splitlines()[0].startswith("PASS" if passes else "FAIL")


def test_ts_defaults_to_the_suite_clock(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        "now: 1800000000\n"
        "cases:\n"
        "  - name: fresh\n"
        "    subject: guard.in.agent-1.tools.search\n"
        "    intent: {id: i1, action: tools.search, resource: ''}\n"
        "    expect: {effect: allow}\n"
        "  - name: stale\n"
        "    subject: guard.in.agent-1.tools.search\n"
        f"    intent: {{id: i2, action: tools.search, resource: '', ts: {DEFAULT_NOW}}}\n"
        "    expect: {effect: deny, reason: expired}\n"
    )
    status, output = run(POLICIES, tmp_path)
    assert status == 0, output
    assert output.splitlines()[-1] == "2 passed, 0 failed"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cases: []\n", "cases: List should have at least 1 item"),
        (
            "cases:\n  - name: a\n    subject: s\n    expect: {effect: allow}\n",
            "case #1 (a): give exactly one of 'intent' (a mapping) or 'payload' (text)",
        ),
        (
            "cases:\n  - {name: x, subject: s, payload: '{}', expect: {effect: permit}}\n",
            "case #1 (x): expect.effect:",
        ),
        (
            "cases:\n  - {name: x, subject: s, payload: '{}', expect: {effect: deny},"
            " surprise: 1}\n",
            "case #1 (x): surprise: Extra inputs are not permitted",
        ),
        (
            "cases:\n  - {name: x, subject: s, payload: '{}', expect: {effect: deny,"
            " reason: nope}}\n",
            "case #1 (x): expect.reason:",
        ),
        ("cases: [\n", "cannot read test file"),
    ],
)
def test_bad_test_files_name_file_and_case(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    status, output = run(POLICIES, tmp_path)
    assert status == 1
    assert f"ERROR {tmp_path / 'bad.yaml'}: " in output
    assert expected in output
    assert output.splitlines()[-1] == "0 passed, 0 failed, 1 test file with errors"


def test_a_bad_file_does_not_hide_good_ones(tmp_path: Path) -> None:
    shutil.copy(POLICIES / "tests" / "tools.yaml", tmp_path / "good.yaml")
    (tmp_path / "bad.yaml").write_text("cases: 5\n")
    status, output = run(POLICIES, tmp_path)
    assert status == 1
    assert "PASS good.yaml: anyone may search" in output
    assert output.splitlines()[-1].endswith("0 failed, 1 test file with errors")


def test_policies_that_do_not_compile(workdir: Path) -> None:
    (workdir / "extra.yaml").write_text('bundle: x\nversion: "1"\nrules: [{id: r, effect: no}]\n')
    status, output = run(workdir)
    assert status == 1
    assert "do not compile" in output
    assert "extra.yaml: rule r: effect: expected 'allow', 'deny' or 'escalate'" in output
    assert "PASS" not in output


def test_no_test_files(tmp_path: Path) -> None:
    status, output = run(POLICIES, tmp_path)
    assert status == 1
    assert f"no test files (*.yaml, *.yml) at {tmp_path}" in output


def test_a_case_runs_exactly_what_decide_returns() -> None:
    payload = json.dumps(
        {
            "id": "x1",
            "action": "payments.transfer",
            "resource": "account:acct-1",
            "ts": DEFAULT_NOW,
            "params": {"amount": 5000, "currency": "USD"},
        }
    ).encode()
    policies = load_policies(POLICIES)
    decision = decide(policies, "guard.in.agent-7.payments.transfer", payload, now=DEFAULT_NOW)
    assert decision.rules == ("transfer-large",)


# ---------------------------------------------------------------- explain


def intent(**fields: Any) -> bytes:
    base = {"id": "e1", "resource": "account:acct-1", "ts": DEFAULT_NOW}
    return json.dumps({**base, **fields}).encode()


def explained(subject: str, payload: bytes, now: float = DEFAULT_NOW) -> str:
    out = io.StringIO()
    assert explain(load_policies(POLICIES), subject, payload, now=now, out=out) == 0
    return out.getvalue()


def test_explain_shows_candidates_conditions_and_decision() -> None:
    text = explained(
        "guard.in.agent-7.payments.transfer",
        intent(action="payments.transfer", params={"amount": 1500, "currency": "USD"}),
    )
    assert "rules considered: 4" in text
    assert "  lineage:  depth 0, root agent-7, labels []\n  parents:  none (a root intent)" in text
    assert 'fails  lineage.labels in ["untrusted-input"]  (actual: [])' in text
    assert "escalate transfer-large" in text and "APPLIES" in text
    assert "allow    transfer-small  (" in text
    assert "fails  params.amount le 1000  (actual: 1500)" in text
    assert 'holds  params.currency in ["USD", "EUR"]  (actual: "USD")' in text
    assert 'fails  resource matches "(?i)^account:sanctioned-"  (actual: "account:acct-1")' in text
    assert text.rstrip().endswith(
        "policy decision: hold escalated_by_rule [transfer-large]:"
        " held for approval by rule transfer-large\n"
        "  carrying approvers=[alice, bob] quorum=2 ttl=86400s"
    )
    assert "tools" not in text  # rules for other actions and principals are not listed
    assert "final decision" not in text


def test_explain_shows_missing_values() -> None:
    text = explained(
        "guard.in.agent-3.tools.http.get", intent(action="tools.http.get", resource="")
    )
    assert "fails  params.url matches" in text
    assert "(actual: missing)" in text
    assert "policy decision: deny no_matching_rule []" in text


def test_explain_shows_checks_before_the_rules() -> None:
    stale = explained(
        "guard.in.agent-1.tools.search",
        intent(action="tools.search", ts=DEFAULT_NOW - 3600),
    )
    assert "policy decision: allow allowed_by_rule [search-for-all]" in stale
    assert "final decision: deny expired []" in stale
    malformed = explained("guard.in.agent-1.tools.search", b"{nope")
    assert malformed.startswith("not evaluated against the rules: deny malformed []")
    bad_subject = explained("somewhere.else", intent(action="tools.search"))
    assert "deny bad_subject" in bad_subject


# ---------------------------------------------------------------- check


def test_check_reports_bundles_and_digest() -> None:
    out = io.StringIO()
    assert check_policies(POLICIES, out=out) == 0
    text = out.getvalue()
    policies = load_policies(POLICIES)
    assert text.splitlines()[0] == "8 rules in 2 bundles, mode enforce"
    assert "  payments@1.2.0: 4 rules (" in text
    assert "  tools@1.2.0: 4 rules (" in text
    assert text.splitlines()[-1] == f"digest {policies.digest}"


def test_check_lists_every_problem(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        'bundle: a\nversion: "1"\nrules:\n'
        "  - {id: r1, effect: allow, principals: ['group:ghost'], actions: [a]}\n"
        "  - {id: r2, effect: allow, actions: [a], when: {field: params.x, matches: '['}}\n"
    )
    out = io.StringIO()
    assert check_policies(tmp_path, out=out) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == f"{tmp_path}: policies do not compile (2 problems):"
    assert lines[1].startswith(f"  {tmp_path / 'a.yaml'}: rule r1: principals[0]: unknown group")
    assert lines[2].startswith(f"  {tmp_path / 'a.yaml'}: rule r2: when.matches: invalid regular")
    assert "digest" not in out.getvalue()


# ---------------------------------------------------------------- what agents wrote, escaped


def test_explain_escapes_the_intent_it_echoes() -> None:
    payload = intent(action="tools.http.get", resource="api:x", params={"url": HOSTILE})
    text = explained("guard.in.agent-3.tools.http.get", payload)
    terminal_safe(text)
    assert "\\r\\nALLOW agent-7" in text and "\\u202e" in text
    # A resource outside its canonical form is refused before any rule; its message names
    # the offending character, never echoes it.
    refused = explained(
        "guard.in.agent-3.tools.http.get", intent(action="tools.http.get", resource=HOSTILE)
    )
    assert "U+001B" in refused and "malformed" in terminal_safe(refused)[0]
    # A subject is checked before anything else: a bad one is named, escaped.
    for subject in (f"guard.in.agent-1{HOSTILE}.tools.search", "guard.in.\udcff.x"):
        bad = explained(subject, intent(action="tools.search"))
        assert "bad_subject" in terminal_safe(bad, 2)[0]
    malformed = explained("guard.in.agent-1.tools.search", HOSTILE.encode())
    assert "malformed" in terminal_safe(malformed, 2)[0]


def test_policy_test_escapes_case_names_and_what_it_got(tmp_path: Path) -> None:
    name = json.dumps(f"case {HOSTILE}")  # YAML reads JSON strings, escapes and all
    (tmp_path / "t.yaml").write_text(
        "cases:\n"
        f"  - name: {name}\n"
        f"    subject: {json.dumps('guard.in.agent-1.tools.search' + HOSTILE)}\n"
        "    payload: '{}'\n"
        "    expect: {effect: allow}\n"
        f"  - name: {name}\n"
        "    subject: s\n"
        "    payload: '{}'\n"
        "    expect: {effect: deny}\n"
    )
    (tmp_path / "bad.yaml").write_text(f"cases:\n  - {{name: {name}, subject: s}}\n")
    status, output = run(POLICIES, tmp_path)
    assert status == 1
    lines = terminal_safe(output, 6)
    assert lines[0].startswith("ERROR ") and f"case #1 ({safe('case ' + HOSTILE)})" in lines[0]
    assert lines[1] == f"FAIL t.yaml: {safe('case ' + HOSTILE)}"
    assert lines[3].startswith("     got      deny bad_subject [")
    assert lines[4] == f"PASS t.yaml: {safe('case ' + HOSTILE)}"


def test_explain_takes_the_lineage_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`policy explain --lineage FILE`: the intent as a child, with the lineage the ledger
    would give it; a bad file is a configuration error (exit 2) naming the field."""
    payload = tmp_path / "intent.json"
    payload.write_bytes(
        intent(action="payments.transfer", params={"amount": 10, "currency": "USD"})
    )
    lineage = tmp_path / "lineage.yaml"
    lineage.write_text(
        "labels: [untrusted-input]\n"
        "parents: [{id: P1, action: tools.http.get, resource: 'tool:http'}]\n"
    )
    argv = ["policy", "explain", "--policies", str(POLICIES)]
    argv += ["--subject", "guard.in.agent-7.payments.transfer", "--payload", str(payload)]
    argv += ["--now", str(DEFAULT_NOW)]
    out = io.StringIO()
    assert main([*argv, "--lineage", str(lineage)], out=out) == 0
    text = out.getvalue()
    assert 'lineage:  depth 1, root agent-7, labels ["untrusted-input"]' in text
    assert "P1" in text and "tools.http.get" in text
    assert "denied_by_rule [no-payments-from-untrusted-input]" in text
    lineage.write_text("parents: [{resource: x}]\n")
    capsys.readouterr()
    assert main([*argv, "--lineage", str(lineage)], out=io.StringIO()) == 2
    assert "lineage.yaml: parents.0.action: Field required" in capsys.readouterr().err
