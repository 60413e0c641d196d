"""Every reason code, from bytes to decision, on the pure path: no server, no clock.

One row per outcome the pure pipeline can produce (``bus_guard.pipeline.evaluate``: subject,
payload bytes, ``now``, the policies). The table, plus the reasons only the intake or a
future feature produces, must be all of :class:`Reason`: a new reason without a row fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from bus_guard import decide
from bus_guard.decision import Decision, Effect, Lineage, Mode, Reason, Request
from bus_guard.pipeline import evaluate
from bus_guard.policy import PolicySet, load_policy_sources
from bus_guard.settings import Checks
from bus_guard.verify import JwkEntry

BUNDLE = """
bundle: reasons
version: "1.0.0"
mode: {mode}
rules:
  - id: read-docs
    effect: allow
    principals: [agent-1]
    actions: [docs.read]
  - id: wire-held
    effect: escalate
    principals: [agent-1]
    actions: [payments.wire]
  - id: no-delete
    effect: deny
    actions: [docs.delete]
"""


def _policies(mode: Mode) -> PolicySet:
    return load_policy_sources({"reasons.yaml": BUNDLE.format(mode=mode).encode()})


class _Raising:
    """A policy set whose evaluator fails: the core must deny, not raise."""

    digest = "sha256:raising"
    version = "raising@1"
    mode: Mode = "enforce"

    def evaluate(self, request: Request) -> Decision:
        raise RuntimeError("evaluator bug")

    def approver_key(self, kid: str) -> tuple[str, JwkEntry] | None:
        return None


@dataclass(frozen=True)
class _LooksAllowed:
    """Not a :class:`Decision`, but with an allow's attributes."""

    effect: Effect = Effect.ALLOW
    reason: Reason = Reason.ALLOWED_BY_RULE
    rules: tuple[str, ...] = ("read-docs",)


class _NoDecision(_Raising):
    """A policy set whose evaluator breaks its contract: what it returns looks like an
    allow but is no Decision. The core fails closed."""

    def evaluate(self, request: Request) -> Decision:
        return _LooksAllowed()  # type: ignore[return-value]  # the contract breach under test


POLICIES: Mapping[str, PolicySet | _Raising] = {
    "enforce": _policies("enforce"),
    "observe": _policies("observe"),
    "raising": _Raising(),
    "no-decision": _NoDecision(),
}

NOW = 1_000_000.0
# Not the defaults: the bounds the caller passes are the ones applied.
CHECKS = Checks(max_past_skew_s=120.0, max_future_skew_s=10.0)
assert Checks() != CHECKS
OLDEST = NOW - CHECKS.max_past_skew_s  # the oldest ts accepted
NEWEST = NOW + CHECKS.max_future_skew_s  # the furthest-ahead ts accepted


def intent(action: str = "docs.read", *, ts: float = NOW, **extra: Any) -> bytes:
    return msgspec.json.encode(
        {"id": "i-1", "action": action, "resource": "doc:1", "ts": ts, "params": {}, **extra}
    )


@dataclass(frozen=True)
class Row:
    id: str
    subject: str
    payload: bytes
    effect: Effect
    reason: Reason
    rules: tuple[str, ...] = ()
    now: float = NOW
    policies: str = "enforce"
    lineage: Lineage | None = None
    would_deny: bool = False
    content_type: str | None = None


SUBJECT = "guard.in.agent-1.docs.read"

ROWS = (
    Row("allowed", SUBJECT, intent(), Effect.ALLOW, Reason.ALLOWED_BY_RULE, ("read-docs",)),
    Row(
        "escalated",
        "guard.in.agent-1.payments.wire",
        intent("payments.wire"),
        Effect.HOLD,
        Reason.ESCALATED_BY_RULE,
        ("wire-held",),
    ),
    Row(
        "no-matching-rule",
        "guard.in.agent-2.docs.read",
        intent(),
        Effect.DENY,
        Reason.NO_MATCHING_RULE,
    ),
    Row(
        "denied",
        "guard.in.agent-1.docs.delete",
        intent("docs.delete"),
        Effect.DENY,
        Reason.DENIED_BY_RULE,
        ("no-delete",),
    ),
    Row("malformed-json", SUBJECT, b'{"id": "i-1", ', Effect.DENY, Reason.MALFORMED),
    Row(
        "malformed-unknown-field",
        SUBJECT,
        intent(extra_field=1),
        Effect.DENY,
        Reason.MALFORMED,
    ),
    Row(
        "malformed-content-type",
        SUBJECT,
        intent(),
        Effect.DENY,
        Reason.MALFORMED,
        content_type="text/plain",
    ),
    Row("bad-subject", "guard.out.agent-1.docs.read", intent(), Effect.DENY, Reason.BAD_SUBJECT),
    Row("bad-subject-no-action", "guard.in.agent-1", intent(), Effect.DENY, Reason.BAD_SUBJECT),
    Row(
        "principal-mismatch",
        SUBJECT,
        intent(principal="agent-2"),
        Effect.DENY,
        Reason.PRINCIPAL_MISMATCH,
    ),
    Row(
        "action-mismatch",
        SUBJECT,
        intent("docs.delete"),
        Effect.DENY,
        Reason.ACTION_MISMATCH,
    ),
    # The skew bounds are inclusive: exactly at the limit is accepted, a step beyond is not.
    Row(
        "oldest-accepted",
        SUBJECT,
        intent(ts=OLDEST),
        Effect.ALLOW,
        Reason.ALLOWED_BY_RULE,
        ("read-docs",),
    ),
    Row(
        "expired",
        SUBJECT,
        intent(ts=math.nextafter(OLDEST, -math.inf)),
        Effect.DENY,
        Reason.EXPIRED,
    ),
    Row(
        "newest-accepted",
        SUBJECT,
        intent(ts=NEWEST),
        Effect.ALLOW,
        Reason.ALLOWED_BY_RULE,
        ("read-docs",),
    ),
    Row(
        "clock-skew",
        SUBJECT,
        intent(ts=math.nextafter(NEWEST, math.inf)),
        Effect.DENY,
        Reason.CLOCK_SKEW,
    ),
    Row(
        "lineage-violation",
        SUBJECT,
        intent(parents=["p-0"]),
        Effect.DENY,
        Reason.LINEAGE_VIOLATION,
        lineage=Lineage(violation="parent p-0 was denied"),
    ),
    Row(
        "internal-error",
        SUBJECT,
        intent(),
        Effect.DENY,
        Reason.INTERNAL_ERROR,
        policies="raising",
    ),
    Row(
        "internal-error-no-decision",
        SUBJECT,
        intent(),
        Effect.DENY,
        Reason.INTERNAL_ERROR,
        policies="no-decision",
    ),
    # Observe mode lets policy outcomes through, marked would_deny; the reason stays.
    Row(
        "observe-denied",
        "guard.in.agent-1.docs.delete",
        intent("docs.delete"),
        Effect.ALLOW,
        Reason.DENIED_BY_RULE,
        ("no-delete",),
        policies="observe",
        would_deny=True,
    ),
    Row(
        "observe-no-matching-rule",
        "guard.in.agent-2.docs.read",
        intent(),
        Effect.ALLOW,
        Reason.NO_MATCHING_RULE,
        policies="observe",
        would_deny=True,
    ),
    Row(
        "observe-lineage-violation",
        SUBJECT,
        intent(parents=["p-0"]),
        Effect.ALLOW,
        Reason.LINEAGE_VIOLATION,
        policies="observe",
        lineage=Lineage(violation="parent p-0 is unknown"),
        would_deny=True,
    ),
    # ... but integrity failures are denied in every mode.
    Row(
        "observe-principal-mismatch",
        SUBJECT,
        intent(principal="agent-2"),
        Effect.DENY,
        Reason.PRINCIPAL_MISMATCH,
        policies="observe",
    ),
    Row("observe-malformed", SUBJECT, b"[]", Effect.DENY, Reason.MALFORMED, policies="observe"),
    Row(
        "observe-allowed",
        SUBJECT,
        intent(),
        Effect.ALLOW,
        Reason.ALLOWED_BY_RULE,
        ("read-docs",),
        policies="observe",
    ),
)

# Reasons the pure path does not produce, and why. With ROWS they must make all of Reason.
NOT_ON_THE_PURE_PATH = {
    Reason.REPLAY: "stream intake: an intent id already decided (tests/test_replay.py)",
    Reason.RATE_LIMITED: "not produced yet (limits)",
    Reason.BUDGET_EXCEEDED: "not produced yet (limits)",
    Reason.POLICY_STALE: "not produced yet (bundle max age)",
    Reason.APPROVED: "approvals: a vote, and a hold released at quorum (tests/test_approvals.py)",
    Reason.REJECTED: "approvals: a vote against, and the hold's denial (tests/test_approvals.py)",
    Reason.BAD_SIGNATURE: "approvals: a vote whose JWS does not verify (tests/test_approvals.py)",
    Reason.APPROVER_NOT_ALLOWED: "approvals: a key or approver the rule does not name",
    Reason.UNKNOWN_HOLD: "approvals: a vote for a decision that is not a hold",
    Reason.HOLD_RESOLVED: "approvals: a vote for a hold already resolved",
    Reason.DUPLICATE_APPROVAL: "approvals: a second vote by the same approver",
}


def test_every_reason_has_a_row_or_a_documented_producer() -> None:
    covered = {row.reason for row in ROWS}
    assert covered.isdisjoint(NOT_ON_THE_PURE_PATH), "a row covers a reason listed as not pure"
    assert covered | set(NOT_ON_THE_PURE_PATH) == set(Reason)


def test_row_ids_are_unique() -> None:
    assert len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_reason(row: Row) -> None:
    policies = POLICIES[row.policies]

    evaluation = evaluate(
        row.subject,
        row.payload,
        row.content_type,
        policies,
        now=row.now,
        checks=CHECKS,
        lineage=row.lineage,
    )
    d = evaluation.decision
    assert (d.effect, d.reason, d.rules, d.would_deny) == (
        row.effect,
        row.reason,
        row.rules,
        row.would_deny,
    ), d.message
    assert d.policy_digest == policies.digest  # every decision names the active bundle
    assert d.mode == policies.mode
    assert d.allowed is (row.effect is Effect.ALLOW)
    if row.lineage is None:  # the embedding API is the same pipeline
        same = decide(
            policies,
            row.subject,
            row.payload,
            now=row.now,
            content_type=row.content_type,
            checks=CHECKS,
        )
        assert same == d
