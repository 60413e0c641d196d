"""The exceptions bus_guard raises.

Outcomes are values, not exceptions: a denial is a :class:`~bus_guard.decision.Decision`.
Exceptions are reserved for real failures, in one small tree::

    GuardError                   base of everything bus_guard raises on purpose
    ├── ConfigError              bad settings, key file or JWKS given at the edge
    ├── PolicyError              a policy bundle failed to load or compile
    │                            (``.file``, ``.rule``, ``.problems``)
    ├── SigningError             an artifact could not be signed
    ├── VerificationError        an artifact did not verify (``.reason``)
    ├── ServerError              the embedded nats-server failed to start or stop
    ├── GatewayError             the gateway could not start or lost the bus
    ├── ApprovalRefused          a vote not sent: the decision is no open hold (``.reason``)
    └── BundleRefused            a policy bundle that must not become active (``.reason``)
"""

from __future__ import annotations

__all__ = (
    "ApprovalRefused",
    "BundleRefused",
    "ConfigError",
    "GatewayError",
    "GuardError",
    "PolicyError",
    "ServerError",
    "SigningError",
    "VerificationError",
)


class GuardError(Exception):
    """Base class of every exception bus_guard raises on purpose."""


class ConfigError(GuardError):
    """Settings, a key file or a JWKS given at the edge are unusable."""


class PolicyError(GuardError):
    """A policy bundle failed to load, validate or compile.

    ``problems`` lists every problem found (``file: rule: message`` each), so that one run
    reports all of them rather than the first.
    """

    def __init__(self, problems: list[str] | str, *, file: str = "", rule: str = "") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.file = file
        self.rule = rule
        super().__init__("\n".join(self.problems))


class SigningError(GuardError):
    """An authorization artifact could not be signed."""


class VerificationError(GuardError):
    """An authorization artifact did not verify; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}" if message else reason)


class ServerError(GuardError):
    """The embedded nats-server could not be started or stopped."""


class GatewayError(GuardError):
    """The gateway could not start, or lost the bus beyond its reconnect budget."""


class ApprovalRefused(GuardError):
    """An approver's vote was not published: the decision is not an open hold the approver
    can vote on. ``reason`` is the code the gateway would record for such a vote
    (:class:`~bus_guard.decision.Reason`: ``unknown_hold``, ``hold_resolved``, ``expired``,
    ``duplicate_approval``, ``approver_not_allowed``)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class BundleRefused(GuardError):
    """A policy bundle (or a directory's policy set) that must not become active:
    unsigned, signed by an unknown or revoked key, not newer than the active one, too
    large, for another deployment, broken, failing its test cases, or not fetchable.
    ``reason`` is one of :data:`bus_guard.policy._bundle.REFUSALS`."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")
