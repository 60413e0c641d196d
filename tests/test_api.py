"""The embedding API and the declared public surface."""

from __future__ import annotations

import msgspec
import pytest

import bus_guard
from bus_guard import Effect, Reason, decide, load_policies

from .conftest import POLICIES


def test_decide_is_the_gateway_pipeline_in_process() -> None:
    policies = load_policies(POLICIES)
    payload = msgspec.json.encode(
        {
            "id": "i-1",
            "action": "payments.transfer",
            "resource": "account:acct-1",
            "params": {"amount": 10, "currency": "USD"},
            "ts": 1000.0,
        }
    )
    d = decide(policies, "guard.in.agent-7.payments.transfer", payload, now=1000.0)
    assert d.effect is Effect.ALLOW and d.reason is Reason.ALLOWED_BY_RULE
    assert d.rules == ("transfer-small",) and d.policy_digest == policies.digest
    # The same bytes from a principal outside the group: default deny.
    d = decide(policies, "guard.in.agent-2.payments.transfer", payload, now=1000.0)
    assert d.effect is Effect.DENY and d.reason is Reason.NO_MATCHING_RULE
    # Too old for the default skew bound.
    d = decide(policies, "guard.in.agent-7.payments.transfer", payload, now=5000.0)
    assert d.reason is Reason.EXPIRED
    # Any bytes: a decision, never an exception.
    assert decide(policies, "guard.in.agent-7.x", b"\x00\xff").reason is Reason.MALFORMED


def test_package_all_matches_what_is_exported() -> None:
    for name in bus_guard.__all__:
        assert getattr(bus_guard, name) is not None
    with pytest.raises(AttributeError):
        _ = bus_guard.does_not_exist


# Every public module's and subpackage's __all__ (not only the top-level modules'): see
# tests/test_layout.py, test_every_public_module_declares_a_true_all.
