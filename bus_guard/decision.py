"""Decision values: what the pure core returns and what every output names.

A decision is a value, never an exception. The reason codes form a closed set: a reason
that is not in :class:`Reason` cannot be produced, and every consumer may ``match`` on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal

__all__ = ("Decision", "Effect", "Lineage", "Mode", "Reason", "Request", "build_request")

Mode = Literal["enforce", "observe"]


class Effect(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    HOLD = "hold"


class Reason(enum.StrEnum):
    """The closed set of reason codes (documented in the README)."""

    ALLOWED_BY_RULE = "allowed_by_rule"  # an allow rule applied (and its limits had room)
    ESCALATED_BY_RULE = "escalated_by_rule"  # an escalate rule applied: held for a human
    NO_MATCHING_RULE = "no_matching_rule"  # default deny
    DENIED_BY_RULE = "denied_by_rule"  # a deny rule applied
    MALFORMED = "malformed"  # payload failed strict decoding / validation
    BAD_SUBJECT = "bad_subject"  # subject is not guard.in.<principal>.<action...>
    PRINCIPAL_MISMATCH = "principal_mismatch"  # payload principal != subject principal
    ACTION_MISMATCH = "action_mismatch"  # payload action != subject action
    EXPIRED = "expired"  # intent ts older than the accepted skew
    CLOCK_SKEW = "clock_skew"  # intent ts too far in the future
    REPLAY = "replay"  # intent id seen before
    RATE_LIMITED = "rate_limited"
    BUDGET_EXCEEDED = "budget_exceeded"
    LINEAGE_VIOLATION = "lineage_violation"
    POLICY_STALE = "policy_stale"  # active bundle older than the configured max age
    INTERNAL_ERROR = "internal_error"  # evaluation, signing or publishing failed
    APPROVED = "approved"  # a human approved a hold
    REJECTED = "rejected"  # a human rejected a hold


# Reasons that observe mode may turn into ``allow`` + ``would_deny``: only policy outcomes.
# Integrity failures (malformed, spoofing, replay, errors) are denied in every mode.
POLICY_REASONS = frozenset(
    {
        Reason.NO_MATCHING_RULE,
        Reason.DENIED_BY_RULE,
        Reason.ESCALATED_BY_RULE,
        Reason.RATE_LIMITED,
        Reason.BUDGET_EXCEEDED,
        Reason.LINEAGE_VIOLATION,
    }
)


@dataclass(frozen=True, slots=True)
class Request:
    """What the policy sees of one intent; identity comes from the subject."""

    principal: str
    action: str
    resource: str
    params: dict[str, Any]
    intent_id: str = ""
    parents: tuple[str, ...] = ()
    lineage_depth: int = 0
    lineage_root: str = ""
    labels: frozenset[str] = field(default_factory=frozenset)


_REQUEST_FIELDS: Final = (
    "principal",
    "action",
    "resource",
    "params",
    "intent_id",
    "parents",
    "lineage_depth",
    "lineage_root",
    "labels",
)
assert tuple(f.name for f in fields(Request)) == _REQUEST_FIELDS  # build_request's order
(
    _set_principal,
    _set_action,
    _set_resource,
    _set_params,
    _set_intent_id,
    _set_parents,
    _set_depth,
    _set_root,
    _set_labels,
) = (Request.__dict__[name].__set__ for name in _REQUEST_FIELDS)
_new_object: Final = object.__new__


def build_request(
    principal: str,
    action: str,
    resource: str,
    params: dict[str, Any],
    intent_id: str,
    parents: tuple[str, ...],
    lineage_depth: int,
    lineage_root: str,
    labels: frozenset[str],
) -> Request:
    """``Request(...)`` with every field given, at half the cost: a frozen dataclass's
    ``__init__`` goes through ``object.__setattr__`` once per field; this sets the slots
    directly (the same object; the gateway builds one per intent)."""
    request = _new_object(Request)
    _set_principal(request, principal)
    _set_action(request, action)
    _set_resource(request, resource)
    _set_params(request, params)
    _set_intent_id(request, intent_id)
    _set_parents(request, parents)
    _set_depth(request, lineage_depth)
    _set_root(request, lineage_root)
    _set_labels(request, labels)
    return request


@dataclass(frozen=True, slots=True)
class Lineage:
    """An intent's place among the decisions that caused it, as found in the ledger.

    ``violation`` says why the intent may not descend from its parents (unknown, denied or
    held parent, too deep); it is then denied ``lineage_violation`` before any rule.
    """

    depth: int = 0
    root: str = ""
    labels: frozenset[str] = field(default_factory=frozenset)
    violation: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    effect: Effect
    reason: Reason
    rules: tuple[str, ...] = ()
    message: str = ""
    policy_digest: str = ""
    policy_version: str = ""
    mode: Mode = "enforce"
    would_deny: bool = False

    @property
    def allowed(self) -> bool:
        return self.effect is Effect.ALLOW
