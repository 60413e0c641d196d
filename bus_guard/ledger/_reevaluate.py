"""Deciding a recorded intent again, and saying whether it comes out the same. Pure.

``bus-guard replay`` (one decision, under the set that made it) and ``bus-guard policy
impact`` (a window of decisions, under a candidate set) both run :func:`redecide` on a
:class:`~bus_guard.ledger._intents.Retained` intent: the recorded bytes, decoded as the
gateway decoded them, judged at the recorded time (the skew checks see the same clock),
with the lineage the caller rebuilt from the ledger (``None``: a root). What the pure
decision cannot know is taken from the record, and said so:

* **limits**: an allow whose rule has limits is judged against the recorded use of the
  window (``used`` before it, its ``amount``, the ``max``): room → allowed, none →
  ``rate_limited`` / ``budget_exceeded``. Without a recorded use of the same limits (the
  record spent nothing, or the candidate's limits are other ones) the limits are **not
  re-evaluated**: the allow stands as the rules give it, and :attr:`Redecision.notes` say so;
* **replays** (``replay``: the intent id was decided before) and **poison intents /
  failures** (``internal_error``) are the intake's state, not the policy's: not
  re-evaluated (the recorded decision is reported as it was, with a note);
* **stale sets** (``policy_stale``): the recorded set was past its maximum age; the
  re-decision is the stale set's (every intent ``policy_stale``);
* **approvals**: a hold is re-decided as a hold (rules, approvers); the votes and the
  resolution that followed are decisions of their own and are not re-evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from bus_guard.decision import Decision, Effect, LimitUse, Lineage, Reason
from bus_guard.ledger._intents import Retained, RetainedDecision
from bus_guard.pipeline import PolicySetLike, decode, judge, limited
from bus_guard.settings import Checks

__all__ = ("CONSTITUTION_LAYER", "Redecision", "differences", "layer_of", "redecide")

CONSTITUTION_LAYER: Final = "constitution/"  # as bus_guard.policy's (not imported: pure)
# Reasons that are the intake's state, never the policy's: reported as recorded.
_STATE_REASONS: Final = frozenset({Reason.REPLAY.value, Reason.INTERNAL_ERROR.value})


@dataclass(frozen=True, slots=True)
class Redecision:
    """A recorded intent decided again."""

    decision: Decision
    notes: tuple[str, ...] = ()  # what was taken from the record, or not re-evaluated
    re_evaluated: bool = True  # False: the recorded decision is the intake's state


def layer_of(policy_version: str) -> str:
    """Which layer made a decision: ``constitution`` or ``policy``."""
    return "constitution" if policy_version.startswith(CONSTITUTION_LAYER) else "policy"


def redecide(
    retained: Retained,
    policies: PolicySetLike,
    *,
    prefix: str,
    checks: Checks,
    lineage: Lineage | None,
    recorded_limits: Sequence[LimitUse] = (),
) -> Redecision:
    """Decide *retained* again under *policies* (see the module docstring)."""
    recorded = retained.decision
    if recorded.reason in _STATE_REASONS:
        kept = Decision(
            Effect(recorded.effect),
            Reason(recorded.reason),
            rules=recorded.rules,
            policy_digest=recorded.policy_digest,
            policy_version=recorded.policy_version,
        )
        note = f"{recorded.reason}: the intake's state when it decided, not re-evaluated"
        return Redecision(kept, (note,), re_evaluated=False)
    decoded = decode(recorded.subject, retained.payload, retained.content_type, prefix=prefix)
    decision = judge(
        recorded.subject, decoded, policies, now=recorded.ts, checks=checks, lineage=lineage
    )
    notes: list[str] = []
    if lineage is not None and lineage.violation is None and lineage.parents:
        notes.append(f"lineage rebuilt from {len(lineage.parents)} recorded parent(s)")
    if decision.effect is Effect.ALLOW and decision.limits:
        decision, note = _limits(decision, tuple(recorded_limits), policies)
        notes.append(note)
    return Redecision(decision, tuple(notes))


def _limits(
    decision: Decision, recorded: tuple[LimitUse, ...], policies: PolicySetLike
) -> tuple[Decision, str]:
    """An allow with limits, judged against the recorded use of the same limits."""
    names = {(spec.rule, spec.name) for group in decision.limits for spec in group}
    if not recorded or any((use.rule, use.limit) not in names for use in recorded):
        plain = msgspec.structs.replace(decision, limits=())
        return plain, "limit state: not re-evaluated (no recorded use of these limits)"
    room = all(use.used + use.amount <= use.max for use in recorded)
    shown = ", ".join(f"{u.limit} {u.used:g}+{u.amount:g} of {u.max:g}" for u in recorded)
    return limited(decision, recorded, room, policies), f"limit state from the record: {shown}"


def differences(recorded: RetainedDecision, decision: Decision) -> list[str]:
    """What differs between the recorded decision and *decision*: effect, reason, rules,
    layer (empty: it reproduces)."""
    out = []
    if decision.effect.value != recorded.effect:
        out.append(f"effect {recorded.effect} -> {decision.effect.value}")
    if decision.reason.value != recorded.reason:
        out.append(f"reason {recorded.reason} -> {decision.reason.value}")
    if tuple(decision.rules) != tuple(recorded.rules):
        out.append(f"rules {list(recorded.rules)} -> {list(decision.rules)}")
    old, new = layer_of(recorded.policy_version), layer_of(decision.policy_version)
    if old != new:
        out.append(f"layer {old} -> {new}")
    return out
