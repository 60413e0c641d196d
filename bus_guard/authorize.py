"""The decision core: pure, synchronous, total.

``authorize`` has no ``await``, no clock and no environment: the gateway passes ``now``.
Whatever happens inside, the caller gets a :class:`~bus_guard.decision.Decision`; a bug
in evaluation becomes ``deny internal_error``, never an exception and never an allow.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Final, Protocol

from .decision import (
    POLICY_REASONS,
    Decision,
    Effect,
    Lineage,
    Mode,
    Reason,
    Request,
    build_request,
)
from .messages import Intent, Subject
from .state import State

__all__ = ("DEFAULT_CHECKS", "Checks", "PolicySetLike", "authorize", "deny")

log = logging.getLogger(__name__)


class PolicySetLike(Protocol):
    """What the core needs of a compiled policy set (see :mod:`bus_guard.policy`)."""

    @property
    def digest(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def mode(self) -> Mode: ...
    def evaluate(self, request: Request, state: State) -> Decision: ...


@dataclass(frozen=True, slots=True)
class Checks:
    """Bounds the core applies before policy; part of the settings."""

    max_past_skew_s: float = 300.0  # older intents are ``expired``
    max_future_skew_s: float = 30.0  # intents from further ahead are ``clock_skew``


DEFAULT_CHECKS: Final = Checks()
_NO_LABELS: Final[frozenset[str]] = frozenset()


def deny(reason: Reason, message: str, policies: PolicySetLike | None = None) -> Decision:
    """A denial naming the active bundle (if any)."""
    if policies is None:
        return Decision(Effect.DENY, reason, message=message)
    return Decision(
        Effect.DENY,
        reason,
        message=message,
        policy_digest=policies.digest,
        policy_version=policies.version,
        mode=policies.mode,
    )


def authorize(
    subject: Subject,
    intent: Intent,
    policies: PolicySetLike,
    state: State,
    *,
    now: float,
    checks: Checks = DEFAULT_CHECKS,
    lineage: Lineage | None = None,
) -> Decision:
    """Decide one decoded intent. Never raises.

    *lineage* is what the ledger says about the intent's parents; without it the intent is
    a root (depth 0, its own principal as root) whatever parents it names.
    """
    try:
        # Identity comes from the bus: the subject token is what NATS permissions bind to.
        principal = subject.principal
        if intent.principal is not None and intent.principal != principal:
            return deny(
                Reason.PRINCIPAL_MISMATCH,
                f"payload principal {intent.principal!r} is not the subject's {principal!r}",
                policies,
            )
        action = subject.action
        if intent.action != action:
            return deny(
                Reason.ACTION_MISMATCH,
                f"payload action {intent.action!r} is not the subject's {action!r}",
                policies,
            )
        ts = intent.ts
        if ts < now - checks.max_past_skew_s:
            return deny(
                Reason.EXPIRED,
                f"intent ts is {now - ts:.1f}s old (limit {checks.max_past_skew_s:g}s)",
                policies,
            )
        if ts > now + checks.max_future_skew_s:
            return deny(
                Reason.CLOCK_SKEW,
                f"intent ts is {ts - now:.1f}s ahead (limit {checks.max_future_skew_s:g}s)",
                policies,
            )
        if lineage is not None and lineage.violation is not None:
            return _observed(deny(Reason.LINEAGE_VIOLATION, lineage.violation, policies), policies)
        # A root (no lineage): depth 0, its own principal as root, no labels.
        depth, root, labels = (
            (0, principal, _NO_LABELS)
            if lineage is None
            else (lineage.depth, lineage.root or principal, lineage.labels)
        )
        # build_request: Request's fields in order, without the frozen __init__'s cost.
        request = build_request(
            principal,
            action,
            intent.resource,
            intent.params,
            intent.id,
            intent.parents,
            depth,
            root,
            labels,
        )
        decision = policies.evaluate(request, state)
        if not isinstance(decision, Decision):  # fail closed on a contract breach
            return deny(Reason.INTERNAL_ERROR, "evaluator returned no decision", policies)
        if decision.effect is Effect.ALLOW:
            return decision
        return _observed(decision, policies)
    except Exception as exc:  # the boundary: sync code, nothing here can be cancelled
        log.exception("evaluation failed for intent %s", intent.id)
        return deny(Reason.INTERNAL_ERROR, f"evaluation failed: {type(exc).__name__}", policies)


def _observed(decision: Decision, policies: PolicySetLike) -> Decision:
    if policies.mode == "observe" and decision.reason in POLICY_REASONS:
        # Observe mode lets policy outcomes through, marked; integrity failures
        # (spoofing, malformed, stale, errors) are denied in every mode.
        return dataclasses.replace(decision, effect=Effect.ALLOW, would_deny=True)
    return decision
