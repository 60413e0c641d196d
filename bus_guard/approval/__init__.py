"""Human approval of held intents: the approver's signed vote (:mod:`._token`).

An escalate rule holds an intent; approvers the policy names vote on it with an approval
token on ``<prefix>.approve.<hold decision id>``; the gateway records every vote as a
decision whose parent is the hold and, at quorum, releases the held bytes (README,
"Approvals"). Pure: no NATS.
"""

from bus_guard.approval._token import (
    APPROVAL_TYP,
    MAX_APPROVAL_BYTES,
    MAX_REASON_CHARS,
    ApprovalClaims,
    ApprovalError,
    ReadApproval,
    Verdict,
    check_signature,
    read_approval,
    sign_approval,
)

__all__ = (
    "APPROVAL_TYP",
    "MAX_APPROVAL_BYTES",
    "MAX_REASON_CHARS",
    "ApprovalClaims",
    "ApprovalError",
    "ReadApproval",
    "Verdict",
    "check_signature",
    "read_approval",
    "sign_approval",
)
