"""bus_guard: pre-execution authorization for agent actions on NATS.

The embedding API::

    import bus_guard
    policies = bus_guard.load_policies("policies")
    decision = bus_guard.decide(policies, "guard.in.agent-7.payments.transfer", payload)
    decision.effect, decision.reason, decision.rules

and, for an approver's tool, a vote on a held intent (a JetStream publish; see README,
"Approvals")::

    vote = await bus_guard.approve(nc, hold_decision_id, approver_private_key)

Names are imported lazily, so that ``import bus_guard.verify`` in an executor pulls in
neither NATS nor the policy compiler.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = (
    "ApprovalRefused",
    "ConfigError",
    "Decision",
    "Effect",
    "GatewayError",
    "GuardError",
    "PolicyError",
    "Reason",
    "Request",
    "ServerError",
    "SigningError",
    "VerificationError",
    "__version__",
    "approve",
    "decide",
    "evaluate",
    "load_policies",
    "reject",
)

_LAZY = {
    "decide": "pipeline",
    "evaluate": "pipeline",
    "load_policies": "policy",
    "approve": "intake",
    "reject": "intake",
    "Decision": "decision",
    "Effect": "decision",
    "Reason": "decision",
    "Request": "decision",
    "ApprovalRefused": "errors",
    "ConfigError": "errors",
    "GatewayError": "errors",
    "GuardError": "errors",
    "PolicyError": "errors",
    "ServerError": "errors",
    "SigningError": "errors",
    "VerificationError": "errors",
}

if TYPE_CHECKING:
    from bus_guard.decision import Decision, Effect, Reason, Request
    from bus_guard.errors import (
        ApprovalRefused,
        ConfigError,
        GatewayError,
        GuardError,
        PolicyError,
        ServerError,
        SigningError,
        VerificationError,
    )
    from bus_guard.intake import approve, reject
    from bus_guard.pipeline import decide, evaluate
    from bus_guard.policy._load import load_policies


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bus_guard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
