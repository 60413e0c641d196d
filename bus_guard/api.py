"""The in-process embedding API, and the one pipeline both it and the gateway run.

    >>> policies = load_policies("policies")
    >>> d = decide(policies, "guard.in.agent-7.payments.transfer", payload)
    >>> d.effect, d.reason, d.rules

``evaluate`` is the pure step the gateway calls per message: subject → decode → authorize.
It never raises: every input ends in a :class:`~bus_guard.decision.Decision`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .authorize import DEFAULT_CHECKS, Checks, PolicySetLike, authorize, deny
from .decision import Decision, Lineage, Reason
from .messages import Intent, Malformed, Subject, decode_intent, parse_subject
from .policy import PolicySet, load_policies
from .state import State

__all__ = ("Evaluation", "decide", "evaluate", "load_policies")

_MAX_PAYLOAD_BYTES: Final = 65536
_MAX_NESTING_DEPTH: Final = 8


@dataclass(frozen=True, slots=True)
class Evaluation:
    decision: Decision
    subject: Subject | None  # None when the subject itself was not an intent subject
    intent: Intent | None  # None when the payload did not decode


def evaluate(
    subject: str,
    payload: bytes,
    content_type: str | None,
    policies: PolicySetLike,
    state: State,
    *,
    now: float,
    prefix: str = "guard",
    checks: Checks = DEFAULT_CHECKS,
    max_payload_bytes: int = _MAX_PAYLOAD_BYTES,
    max_nesting_depth: int = _MAX_NESTING_DEPTH,
    lineage: Callable[[Intent], Lineage | None] | None = None,
) -> Evaluation:
    """*lineage* maps a decoded intent to what the ledger says about its parents."""
    parsed = parse_subject(subject, prefix)
    if parsed is None:
        return Evaluation(
            deny(Reason.BAD_SUBJECT, f"not an intent subject: {subject!r}", policies), None, None
        )
    intent = decode_intent(
        payload, content_type, max_bytes=max_payload_bytes, max_depth=max_nesting_depth
    )
    if isinstance(intent, Malformed):
        return Evaluation(deny(intent.reason, intent.message, policies), parsed, None)
    found = lineage(intent) if lineage is not None else None
    decision = authorize(parsed, intent, policies, state, now=now, checks=checks, lineage=found)
    return Evaluation(decision, parsed, intent)


def decide(
    policies: PolicySet,
    subject: str,
    payload: bytes,
    *,
    now: float | None = None,
    prefix: str = "guard",
    content_type: str | None = None,
    state: State | None = None,
    checks: Checks = DEFAULT_CHECKS,
) -> Decision:
    """Decide one intent in-process, exactly as the gateway would (stateless by default)."""
    # evaluate's steps, without the Evaluation it would build only for us to drop.
    parsed = parse_subject(subject, prefix)
    if parsed is None:
        return deny(Reason.BAD_SUBJECT, f"not an intent subject: {subject!r}", policies)
    intent = decode_intent(
        payload, content_type, max_bytes=_MAX_PAYLOAD_BYTES, max_depth=_MAX_NESTING_DEPTH
    )
    if isinstance(intent, Malformed):
        return deny(intent.reason, intent.message, policies)
    return authorize(
        parsed,
        intent,
        policies,
        state if state is not None else State(),
        now=time.time() if now is None else now,
        checks=checks,
    )
