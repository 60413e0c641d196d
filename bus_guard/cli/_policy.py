"""``policy test``, ``policy explain`` and ``policy check``: functions the CLI wires up.

Each writes to the ``out`` stream it is given and returns an exit status; none prints
elsewhere. A test file (``policies/tests/*.yaml`` by default) reads like ``opa test``::

    now: 1750000000            # optional: the clock the cases run at
    cases:
      - name: small transfer by a group member is allowed
        subject: guard.in.agent-7.payments.transfer
        intent: {id: t1, action: payments.transfer, resource: "account:acct-1",
                 params: {amount: 120.5, currency: USD}}     # ts defaults to `now`
        expect: {effect: allow, reason: allowed_by_rule, rules: [transfer-small]}

``payload:`` (raw text) may replace ``intent:`` to test malformed input. ``reason``,
``rules`` (compared as a set) and ``would_deny`` are optional in ``expect``, and so are
what a decision carries: ``taints`` and ``limits`` (allow: the names of the limits it
would spend, as a set; ``[]`` for none), ``approvers`` and ``quorum`` (hold). Each case
runs through :func:`bus_guard.pipeline.decide`, i.e. exactly what the gateway decides
before it spends limits: an intent under a limited rule is ``allow`` here, whatever the
limit's state at run time (``rate_limited`` / ``budget_exceeded`` are the gateway's).

A case may give the intent's lineage, as the gateway would have found it in the ledger
(without it, the intent is a root)::

      lineage:
        depth: 1                       # default: 1 with parents, else 0
        root: agent-1                  # default: the intent's principal
        labels: [untrusted-input]      # the inherited labels
        parents:                       # what lineage constraints see of each parent
          - {id: P1, action: payments.approve-invoice, resource: "account:acct-1",
             scope: {amount: 500}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import yaml
from pydantic import ValidationError

from bus_guard.cli._safe import say
from bus_guard.decision import Decision, LimitSpec, Lineage
from bus_guard.errors import PolicyError
from bus_guard.pipeline import evaluate, request_of
from bus_guard.policy._cases import DEFAULT_NOW, read_suite
from bus_guard.policy._cases import CaseLineage as _Lineage
from bus_guard.policy._cases import Suite as _Suite
from bus_guard.policy._cases import compare as _compare
from bus_guard.policy._cases import decide_case as _decide
from bus_guard.policy._cases import limit_names as _limit_names
from bus_guard.policy._cases import show as _show
from bus_guard.policy._cases import show_expect as _show_expect
from bus_guard.policy._conditions import ConditionTrace
from bus_guard.policy._evaluator import Explanation, PolicySet, RuleTrace
from bus_guard.policy._limits import limit_amount, limit_key
from bus_guard.policy._load import load_policies, load_yaml

__all__ = ("DEFAULT_NOW", "check_policies", "explain", "read_lineage", "run_policy_tests")


def read_lineage(path: Path, text: str) -> Lineage:
    """The lineage in *text* (YAML or JSON, the shape of a test case's ``lineage:``), for
    ``policy explain --lineage``; :class:`~bus_guard.errors.ConfigError` names what is wrong."""
    from bus_guard.errors import ConfigError

    try:
        data = load_yaml(text)
        return _Lineage.model_validate(data).lineage()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or 'lineage'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def run_policy_tests(
    policies_dir: Path,
    tests_path: Path | None = None,
    *,
    out: TextIO,
    exit_invalid: int = 1,
) -> int:
    """Run every case of every test file; 0 iff all pass (and there was something to run);
    *exit_invalid* if the policies do not compile."""
    try:
        policies = load_policies(policies_dir)
    except PolicyError as exc:
        _problems(f"policies in {policies_dir} do not compile", exc, out)
        return exit_invalid
    path = Path(tests_path) if tests_path is not None else Path(policies_dir) / "tests"
    files = _test_files(path)
    if not files:
        say(out, f"no test files (*.yaml, *.yml) at {path}")
        return 1
    passed = failed = broken = 0
    for file in files:
        suite = _read_suite(file, out)
        if suite is None:
            broken += 1
            continue
        for case in suite.cases:
            got = _decide(policies, suite, case)
            problem = _compare(case.expect, got)
            if problem is None:
                passed += 1
                say(out, f"PASS {file.name}: {case.name}")
            else:
                failed += 1
                say(out, f"FAIL {file.name}: {case.name}")
                say(out, f"     expected {_show_expect(case.expect)}")
                say(out, f"     got      {_show(got)}: {got.message}")
                if carries := _carries(got):
                    say(out, f"     carrying {carries}")
    summary = f"{passed} passed, {failed} failed"
    if broken:
        summary += f", {broken} test file{'s' if broken > 1 else ''} with errors"
    say(out, summary)
    return 0 if failed == 0 and broken == 0 else 1


def _test_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(f for f in path.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
    return [path] if path.is_file() else []


def _read_suite(file: Path, out: TextIO) -> _Suite | None:
    try:
        data = file.read_bytes()
    except OSError as exc:
        say(out, f"ERROR {file}: cannot read test file: {exc}")
        return None
    suite = read_suite(str(file), data)
    if isinstance(suite, list):
        for problem in suite:
            say(out, f"ERROR {problem}")
        return None
    return suite


def _carries(decision: Decision) -> str:
    """What an allow or a hold carries besides its rules ("" for nothing)."""
    parts = []
    if decision.taints:
        parts.append(f"taints=[{', '.join(decision.taints)}]")
    if decision.limits:
        parts.append(f"limits=[{', '.join(_limit_names(decision))}]")
    if decision.hold is not None:
        terms = decision.hold
        parts.append(
            f"approvers=[{', '.join(terms.approvers)}] quorum={terms.quorum} ttl={terms.ttl_s:g}s"
        )
    return " ".join(parts)


def _window(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _limit_text(spec: LimitSpec) -> str:
    """``count 5 per 10s per principal`` / ``sum params.amount max 10000 per 1h per group
    payments``."""
    what = (
        f"count {spec.max:g}"
        if spec.kind == "count"
        else f"sum params.{spec.param} max {spec.max:g}"
    )
    per = f"group {spec.group}" if spec.per == "group" else spec.per
    return f"{spec.name}: {what} per {_window(spec.window_s)} per {per}"


def explain(
    policies: PolicySet,
    subject: str,
    payload: bytes,
    *,
    now: float,
    out: TextIO,
    lineage: Lineage | None = None,
    limit_state: Mapping[tuple[str, str], float] | None = None,
) -> int:
    """Print which rules were considered for one intent, how each fared, and the decision.
    *lineage*: what the ledger says of the intent's parents (``None``: a root);
    *limit_state*: what each (limit name, key) has used now (``--nats``; see
    :func:`limits_of`)."""
    result = evaluate(subject, payload, None, policies, now=now, lineage=lineage)
    if result.subject is None or result.intent is None:
        say(out, f"not evaluated against the rules: {_show(result.decision)}")
        say(out, f"  {result.decision.message}")
        return 0
    # The Request authorize() builds: identity from the subject, the rest from the payload,
    # lineage from the ledger.
    explanation = policies.explain(request_of(result.subject, result.intent, lineage))
    _render(explanation, out, limit_state)
    final = result.decision
    if (final.effect, final.reason, final.rules) != (
        explanation.decision.effect,
        explanation.decision.reason,
        explanation.decision.rules,
    ) or final.would_deny:
        # Checks before the rules (spoofing, clock) or observe mode changed the outcome.
        say(out, f"final decision: {_show(final)}: {final.message}")
    return 0


def limits_of(
    policies: PolicySet,
    subject: str,
    payload: bytes,
    *,
    now: float,
    lineage: Lineage | None = None,
) -> list[tuple[LimitSpec, str]]:
    """The (limit, key) pairs an allow of this intent would spend (for ``--nats``)."""
    result = evaluate(subject, payload, None, policies, now=now, lineage=lineage)
    if result.subject is None or result.intent is None:
        return []
    request = request_of(result.subject, result.intent, lineage)
    decision = policies.evaluate(request)
    return [(spec, limit_key(spec, request)) for group in decision.limits for spec in group]


def _render(
    explanation: Explanation,
    out: TextIO,
    limit_state: Mapping[tuple[str, str], float] | None = None,
) -> None:
    request = explanation.request
    say(out, f"intent {request.intent_id}: {request.principal} {request.action}")
    say(out, f"  resource: {request.resource}")
    say(out, f"  params:   {json.dumps(request.params, sort_keys=True, default=repr)}")
    labels = json.dumps(sorted(request.labels))
    say(
        out,
        f"  lineage:  depth {request.lineage_depth}, root {request.lineage_root}, labels {labels}",
    )
    if not request.lineage_parents:
        say(out, "  parents:  none (a root intent)")
    for parent in request.lineage_parents:
        scope = json.dumps(parent.scope, sort_keys=True)
        say(
            out,
            f"  parent:   {parent.decision_id} {parent.action} {json.dumps(parent.resource)}"
            f" scope {scope}",
        )
    say(out, f"rules considered: {len(explanation.rules)}")
    for rule_trace in explanation.rules:
        _render_rule(rule_trace, out)
    decision = explanation.decision
    say(out, f"policy decision: {_show(decision)}: {decision.message}")
    if carries := _carries(decision):
        say(out, f"  carrying {carries}")
    _render_limits(explanation, out, limit_state)


def _render_limits(
    explanation: Explanation,
    out: TextIO,
    limit_state: Mapping[tuple[str, str], float] | None = None,
) -> None:
    """The limits an allow would spend, with this intent's key and amount under each."""
    decision, request = explanation.decision, explanation.request
    if not decision.allowed:
        return
    if not decision.limits:
        limited = [t.rule.id for t in explanation.rules if t.applies and t.rule.limits]
        if limited:
            free = [r for r in decision.rules if r not in limited]
            say(
                out,
                f"  no limits to spend: {', '.join(free)} allow{'s' if len(free) == 1 else ''}"
                f" without limits (so {', '.join(limited)}'s are not spent)",
            )
        return
    say(
        out,
        "  limits to spend (at run time: the first rule whose limits all have room; if none"
        " has, rate_limited / budget_exceeded):",
    )
    for group in decision.limits:
        say(out, f"    rule {group[0].rule}:")
        for spec in group:
            amount = limit_amount(spec, request)
            cost = f"amount {amount:g}" if isinstance(amount, float) else f"cannot count: {amount}"
            key = limit_key(spec, request)
            state = ""
            if limit_state is not None:
                used = limit_state.get((spec.name, key), 0.0)
                fits = isinstance(amount, float) and used + amount <= spec.max
                state = f"; used now {used:g} of {spec.max:g} ({'room' if fits else 'FULL'})"
            say(out, f"      {_limit_text(spec)}: key {json.dumps(key)}, {cost}{state}")


def _render_rule(t: RuleTrace, out: TextIO) -> None:
    rule = t.rule
    verdict = "APPLIES" if t.applies else "does not apply"
    say(out, f"  {rule.effect:<8} {rule.id}  ({rule.file})  {verdict}")

    def mark(ok: bool, patterns: tuple[str, ...]) -> str:
        return f"{'yes' if ok else 'NO'} ({', '.join(patterns)})"

    say(
        out,
        f"    principal {mark(t.principal, rule.principals)}"
        f"  action {mark(t.action, rule.actions)}"
        f"  resource {mark(t.resource, rule.resources)}",
    )
    if t.condition is not None:
        _render_condition(t.condition, 2, out)
    for spec in rule.limits:
        say(out, f"    limit {_limit_text(spec)}")
    for constraint in t.lineage or ():
        status = "holds" if constraint.held else "fails"
        actual = json.dumps(constraint.actual, sort_keys=True, default=repr)
        say(out, f"    {status}  lineage {constraint.text}  (actual: {actual})")


def _render_condition(node: ConditionTrace, depth: int, out: TextIO) -> None:
    pad = "  " * depth
    status = "holds" if node.held else "fails"
    if node.children:
        say(out, f"{pad}{status}  {node.text}:")
        for child in node.children:
            _render_condition(child, depth + 1, out)
        return
    actual = json.dumps(node.actual, default=repr) if node.present else "missing"
    say(out, f"{pad}{status}  {node.text}  (actual: {actual})")


def check_policies(path: Path | str, *, out: TextIO, exit_invalid: int = 1) -> int:
    """Compile the policies; print the bundles and digest (0) or every problem
    (*exit_invalid*: the CLI's 2, a configuration error)."""
    try:
        policies = load_policies(path)
    except PolicyError as exc:
        _problems(f"{path}: policies do not compile", exc, out)
        return exit_invalid
    bundles = len(policies.bundles)
    say(
        out,
        f"{policies.rule_count} rules in {bundles} bundle{'s' if bundles != 1 else ''},"
        f" mode {policies.mode}",
    )
    for info in policies.bundle_info:
        say(out, f"  {info.name}@{info.version}: {info.rule_count} rules ({info.file})")
    say(out, f"digest {policies.digest}")
    return 0


def _problems(title: str, exc: PolicyError, out: TextIO) -> None:
    count = len(exc.problems)
    say(out, f"{title} ({count} problem{'s' if count != 1 else ''}):")
    for problem in exc.problems:
        say(out, f"  {problem}")
