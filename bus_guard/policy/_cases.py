"""Policy test cases: known answers a policy set must give (``bus-guard policy test``).

A test file (``<policy dir>/tests/*.yaml``) reads like ``opa test``; see
:mod:`bus_guard.cli._policy` for the format. This module is the pure part that the CLI,
the bundle compiler (:mod:`bus_guard.policy._bundle`: a set whose cases fail never
becomes active) and the gateway's canaries share: the case model, reading a file, deciding
a case exactly as :func:`bus_guard.pipeline.decide` does, and comparing the answer.

A case whose subject's principal is :data:`CANARY_PRINCIPAL` is a **canary**: besides
being checked when the set is compiled, a running gateway sends it through its whole path
on a schedule (:mod:`bus_guard.intake._canary`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bus_guard.decision import Decision, Lineage, ParentView, Reason
from bus_guard.pipeline import PolicySetLike, decide
from bus_guard.policy._load import load_yaml

__all__ = (
    "CANARY_ACTION",
    "CANARY_PRINCIPAL",
    "DEFAULT_NOW",
    "Case",
    "CaseLineage",
    "CaseResults",
    "Expect",
    "Suite",
    "check_cases",
    "compare",
    "decide_case",
    "is_canary",
    "limit_names",
    "read_suite",
    "show",
    "show_expect",
)

DEFAULT_NOW: Final = 1_750_000_000.0  # a fixed clock makes test runs reproducible

# The reserved canary identity (README, "Canaries"): no agent is given this principal, and
# executors never act on its exec subjects.
CANARY_PRINCIPAL: Final = "guard-canary"
CANARY_ACTION: Final = "guard.canary"


class Expect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    effect: Literal["allow", "deny", "hold"]
    reason: Reason | None = None
    rules: list[str] | None = None
    would_deny: bool | None = None
    taints: list[str] | None = None
    limits: list[str] | None = None
    approvers: list[str] | None = None
    quorum: int | None = None


class _Parent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = ""
    action: str = Field(min_length=1)
    resource: str = ""
    scope: dict[str, int | float] = Field(default_factory=dict)


class CaseLineage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int | None = Field(None, ge=0)
    root: str = ""
    labels: list[str] = Field(default_factory=list)
    parents: list[_Parent] = Field(default_factory=list)

    def lineage(self) -> Lineage:
        parents = tuple(
            ParentView(p.id or f"parent-{i + 1}", p.action, p.resource, dict(p.scope))
            for i, p in enumerate(self.parents)
        )
        depth = self.depth if self.depth is not None else 1 if parents else 0
        return Lineage(depth, self.root, frozenset(self.labels), parents=parents)


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    subject: str
    intent: dict[str, Any] | None = None
    payload: str | None = None
    content_type: str | None = None
    lineage: CaseLineage | None = None
    expect: Expect

    @model_validator(mode="after")
    def _one_input(self) -> Case:
        if (self.intent is None) == (self.payload is None):
            raise ValueError("give exactly one of 'intent' (a mapping) or 'payload' (text)")
        return self


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    now: float = DEFAULT_NOW
    prefix: str = "guard"
    cases: list[Case] = Field(min_length=1)


def is_canary(suite: Suite, case: Case) -> bool:
    """Whether *case* is a canary: its subject is ``<prefix>.in.guard-canary.<action>``."""
    return case.subject.startswith(f"{suite.prefix}.in.{CANARY_PRINCIPAL}.")


def read_suite(name: str, data: bytes) -> Suite | list[str]:
    """The test file *name* (its bytes), or every problem found in it, each naming the
    file, the case and the field."""
    try:
        raw = load_yaml(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        return [f"{name}: cannot read test file: {exc}"]
    try:
        return Suite.model_validate(raw)
    except ValidationError as exc:
        problems = []
        cases = raw.get("cases") if isinstance(raw, dict) else None
        for error in exc.errors(include_url=False):
            loc = error["loc"]
            where = ".".join(str(p) for p in loc) or "top level"
            if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int):
                case = cases[loc[1]] if isinstance(cases, list) else None
                label = case.get("name") if isinstance(case, dict) else None
                text = f"case #{loc[1] + 1}" + (f" ({label})" if isinstance(label, str) else "")
                where = ": ".join(x for x in (text, ".".join(map(str, loc[2:]))) if x)
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {where}: {message}")
        return problems


def case_payload(suite: Suite, case: Case, *, now: float | None = None) -> bytes:
    """The intent bytes of *case* (``ts`` defaults to the suite's clock, or *now*)."""
    if case.intent is not None:
        return json.dumps({"ts": suite.now if now is None else now, **case.intent}).encode()
    return (case.payload or "").encode()


def decide_case(policies: PolicySetLike, suite: Suite, case: Case) -> Decision:
    return decide(
        policies,
        case.subject,
        case_payload(suite, case),
        now=suite.now,
        prefix=suite.prefix,
        content_type=case.content_type,
        lineage=None if case.lineage is None else case.lineage.lineage(),
    )


def compare(expect: Expect, got: Decision) -> str | None:
    """``None`` if *got* is what *expect* says, else the first field that differs."""
    if got.effect.value != expect.effect:
        return "effect"
    if expect.reason is not None and got.reason is not expect.reason:
        return "reason"
    if expect.rules is not None and sorted(set(expect.rules)) != sorted(got.rules):
        return "rules"
    if expect.would_deny is not None and got.would_deny != expect.would_deny:
        return "would_deny"
    if expect.taints is not None and sorted(set(expect.taints)) != list(got.taints):
        return "taints"
    if expect.limits is not None and sorted(set(expect.limits)) != limit_names(got):
        return "limits"
    hold = got.hold
    if expect.approvers is not None and (
        hold is None or sorted(set(expect.approvers)) != list(hold.approvers)
    ):
        return "approvers"
    if expect.quorum is not None and (hold is None or hold.quorum != expect.quorum):
        return "quorum"
    return None


def show_expect(expect: Expect) -> str:
    parts = [expect.effect, expect.reason.value if expect.reason else "(any reason)"]
    parts.append("(any rules)" if expect.rules is None else f"[{', '.join(sorted(expect.rules))}]")
    if expect.would_deny is not None:
        parts.append(f"would_deny={str(expect.would_deny).lower()}")
    if expect.taints is not None:
        parts.append(f"taints=[{', '.join(sorted(expect.taints))}]")
    if expect.limits is not None:
        parts.append(f"limits=[{', '.join(sorted(set(expect.limits)))}]")
    if expect.approvers is not None:
        parts.append(f"approvers=[{', '.join(sorted(expect.approvers))}]")
    if expect.quorum is not None:
        parts.append(f"quorum={expect.quorum}")
    return " ".join(parts)


def show(decision: Decision) -> str:
    text = f"{decision.effect.value} {decision.reason.value} [{', '.join(decision.rules)}]"
    return text + (" would_deny=true" if decision.would_deny else "")


def limit_names(decision: Decision) -> list[str]:
    return sorted({spec.name for group in decision.limits for spec in group})


@dataclass(frozen=True, slots=True)
class CaseResults:
    """What :func:`check_cases` found: cases passed, what failed (one line each, naming
    the file and the case), and the canaries (suite, case) to run live."""

    passed: int
    failures: tuple[str, ...]
    canaries: tuple[tuple[Suite, Case], ...]


def check_cases(policies: PolicySetLike, tests: Mapping[str, bytes]) -> CaseResults:
    """Run every case of every test file in *tests* (name → bytes) against *policies*."""
    passed = 0
    failures: list[str] = []
    canaries: list[tuple[Suite, Case]] = []
    for name in sorted(tests):
        suite = read_suite(name, tests[name])
        if isinstance(suite, list):
            failures += suite
            continue
        for case in suite.cases:
            got = decide_case(policies, suite, case)
            field = compare(case.expect, got)
            if field is None:
                passed += 1
                if is_canary(suite, case):
                    canaries.append((suite, case))
            else:
                failures.append(
                    f"{name}: case {case.name!r}: expected {show_expect(case.expect)}, "
                    f"got {show(got)} ({field} differs): {got.message}"
                )
    return CaseResults(passed, tuple(failures), tuple(canaries))
