"""Decision values: what the pure core returns and what every output names.

A decision is a value, never an exception. The reason codes form a closed set: a reason
that is not in :class:`Reason` cannot be produced, and every consumer may ``match`` on it.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Final, Literal

import msgspec

__all__ = (
    "Decision",
    "Effect",
    "HoldTerms",
    "LimitSpec",
    "LimitUse",
    "Lineage",
    "Mode",
    "ParentView",
    "Reason",
    "Request",
    "approval_decision_id",
    "crockford_128",
    "intent_decision_id",
    "message_decision_id",
    "new_decision_id",
    "resolution_decision_id",
)

Mode = Literal["enforce", "observe"]


class Effect(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    HOLD = "hold"
    APPROVE = "approve"  # an approver's vote for a hold (a ledger decision, never forwarded)
    REJECT = "reject"  # an approver's vote against a hold


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
    APPROVED = "approved"  # approvers approved a hold (their vote; and the release at quorum)
    REJECTED = "rejected"  # an approver rejected a hold (the vote, and the hold's denial)
    BAD_SIGNATURE = "bad_signature"  # an approval whose JWS does not verify
    APPROVER_NOT_ALLOWED = "approver_not_allowed"  # unknown/revoked key, or not the rule's
    UNKNOWN_HOLD = "unknown_hold"  # an approval for a decision that is not a hold
    HOLD_RESOLVED = "hold_resolved"  # an approval for a hold already released or denied
    DUPLICATE_APPROVAL = "duplicate_approval"  # the approver already voted on this hold


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


class ParentView(msgspec.Struct, frozen=True):
    """What a child's lineage constraints (``requires_parent``, ``within_parent``) see of
    one parent: its ledger record's action, resource and scope, never the agent's claims."""

    decision_id: str
    action: str
    resource: str
    scope: dict[str, int | float] = {}  # the parent's numeric top-level params


class Request(msgspec.Struct, frozen=True):
    """What the policy sees of one intent; identity comes from the subject.

    A frozen msgspec Struct: built once per intent, it costs ~0.15 µs against ~2 µs for a
    frozen dataclass, whose ``__init__`` goes through ``object.__setattr__`` per field
    (``python -m bench.decide`` measures the path it is on)."""

    principal: str
    action: str
    resource: str
    params: dict[str, Any]
    intent_id: str = ""
    parents: tuple[str, ...] = ()
    lineage_depth: int = 0
    lineage_root: str = ""
    labels: frozenset[str] = frozenset()
    # the parents as the ledger knows them (a root has none), for lineage constraints
    lineage_parents: tuple[ParentView, ...] = ()


class Lineage(msgspec.Struct, frozen=True):
    """An intent's place among the decisions that caused it, as found in the ledger.

    ``violation`` says why the intent may not descend from its parents (unknown, denied or
    held parent, too deep); it is then denied ``lineage_violation`` before any rule.
    """

    depth: int = 0
    root: str = ""
    labels: frozenset[str] = frozenset()
    violation: str | None = None
    parents: tuple[ParentView, ...] = ()  # one per parent named, in the intent's order


class HoldTerms(msgspec.Struct, frozen=True):
    """Who may release a hold and until when: from the escalate rules that held it (several
    rules: the approvers every one of them names, the largest quorum, the shortest ttl)."""

    approvers: tuple[str, ...]  # approver ids (groups expanded), sorted
    quorum: int
    ttl_s: float


LimitKind = Literal["count", "sum"]
LimitPer = Literal["principal", "group", "resource", "lineage_root"]


class LimitSpec(msgspec.Struct, frozen=True):
    """One limit of an allow rule, as compiled: at most *max* requests (``count``) or at
    most *max* of the numeric param *param* summed (``sum``) per sliding window of
    *window_s* seconds, per value of *per* (the intent's principal, the rule's group
    *group*, its resource, or its lineage root)."""

    rule: str  # the allow rule's id
    name: str  # unique in its policy set: "<rule id>/<index>" unless the rule names it
    kind: LimitKind
    max: float  # count: a whole number
    window_s: float
    per: LimitPer
    group: str = ""  # per group: the group's name (every intent of the rule shares it)
    param: str = ""  # sum: the param whose values are summed


class LimitUse(msgspec.Struct, frozen=True):
    """What one limit said about one intent: recorded with the decision (an allow: what it
    spent; a ``rate_limited`` / ``budget_exceeded`` denial: the limit that was full)."""

    limit: str  # LimitSpec.name
    rule: str
    kind: LimitKind
    max: float
    window_s: float
    per: LimitPer
    key: str  # the value of *per* this intent counts against
    used: float  # spent in the window before this intent
    amount: float  # what this intent costs (count: 1)
    at: float = 0.0  # the window's time of the check (its end; the spend's time in the log)


class Decision(msgspec.Struct, frozen=True):
    effect: Effect
    reason: Reason
    rules: tuple[str, ...] = ()
    message: str = ""
    policy_digest: str = ""
    policy_version: str = ""
    mode: Mode = "enforce"
    would_deny: bool = False
    # allow: the labels the allowing rules add to the intent's lineage (its children inherit)
    taints: tuple[str, ...] = ()
    hold: HoldTerms | None = None  # hold: who may approve it, how many, until when
    # allow: the limits to spend before it stands, one group per applicable allow rule
    # that has limits, sorted by rule id; () when nothing is to be spent (no applicable
    # allow rule has limits, or one has none). The intake spends the first group that has
    # room (all its limits) and turns the allow into rate_limited / budget_exceeded when
    # none has; the pure evaluator never does.
    limits: tuple[tuple[LimitSpec, ...], ...] = ()
    # after the limits were checked: what was spent (allow) or which limit was full (deny)
    limit_use: tuple[LimitUse, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.effect is Effect.ALLOW


# --- decision ids -------------------------------------------------------------------------

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every 10-bit value as its two Crockford characters: the 80 random bits are 8 lookups.
_PAIRS: Final = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)
_HIGH_SHIFTS: Final = tuple(range(70, 10, -10))  # the random part's first 60 bits
_TIME_SHIFTS: Final = tuple(range(45, -5, -5))


def crockford_128(data: bytes) -> str:
    """16 bytes as 26 Crockford base32 characters: exactly what RFC 4648 base32 (unpadded)
    followed by the Crockford alphabet gives, as 13 table lookups (the stdlib's
    ``b32encode`` is a Python-level loop: ~5 µs a decision id in stream mode's profile)."""
    # Three 40-bit chunks (four character pairs each) and the last byte with two zero bits
    # of padding (one pair): small-int arithmetic, no 130-bit shifts.
    p, frm = _PAIRS, int.from_bytes
    a, b, c = frm(data[0:5], "big"), frm(data[5:10], "big"), frm(data[10:15], "big")
    return (
        f"{p[a >> 30]}{p[a >> 20 & 1023]}{p[a >> 10 & 1023]}{p[a & 1023]}"
        f"{p[b >> 30]}{p[b >> 20 & 1023]}{p[b >> 10 & 1023]}{p[b & 1023]}"
        f"{p[c >> 30]}{p[c >> 20 & 1023]}{p[c >> 10 & 1023]}{p[c & 1023]}{p[data[15] << 2]}"
    )


class _Ulids:
    """Monotonic ULIDs (the spec's "monotonicity" section): the 80 random bits are drawn
    once a millisecond and incremented for every further id in that millisecond, so an
    id costs a counter step and two table lookups (the first 22 characters change only
    every 2**20 ids) instead of a ``getrandom`` call and 13 lookups; the ids of a
    single-threaded process sort in the order they were made. Unique across threads too:
    ``next()`` on an :class:`itertools.count` is atomic under the GIL and the cached state
    is swapped as whole tuples."""

    __slots__ = ("_head", "_now")

    def __init__(self) -> None:
        self._now: tuple[int, str, Iterator[int]] = (-1, "", itertools.count())
        self._head: tuple[str, int, str] = ("", -1, "")  # (time prefix, value >> 20, head)

    def __call__(self) -> str:
        ms = time.time_ns() // 1_000_000
        now = self._now
        if now[0] != ms:
            prefix = "".join([_CROCKFORD[(ms >> s) & 31] for s in _TIME_SHIFTS])
            now = self._now = (ms, prefix, itertools.count(int.from_bytes(os.urandom(10), "big")))
        _, prefix, count = now
        value = next(count)
        if value >> 80:  # 2**80 ids in one millisecond: a fresh draw (never happens)
            self._now = (-1, "", count)
            return self()
        pairs, high = _PAIRS, value >> 20
        head = self._head
        if head[1] != high or head[0] is not prefix:
            mid = "".join([pairs[(value >> shift) & 1023] for shift in _HIGH_SHIFTS])
            head = self._head = (prefix, high, prefix + mid)
        return head[2] + pairs[(value >> 10) & 1023] + pairs[value & 1023]


# A ULID: 48-bit millisecond time + 80 random bits, Crockford base32 (26 chars); monotonic
# within a process (see _Ulids). The bound method itself, not a function calling it: one
# Python frame less per decision id (core mode makes one per intent).
new_decision_id: Final[Callable[[], str]] = _Ulids().__call__


def _derived_id(*parts: str) -> str:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()[:16]
    # 128 bits in 26 Crockford base32 characters, like a ULID (but not time-ordered).
    return crockford_128(digest)


def intent_decision_id(prefix: str, principal: str, intent_id: str) -> str:
    """The decision id of an intent: the same on every replica, for every delivery."""
    return _derived_id("guard-intent", prefix, principal, intent_id)


def message_decision_id(prefix: str, intake: str) -> str:
    """The decision id for a stored message that has no intent of its own to key on
    (malformed, bad subject) or whose intent id was decided before (replay)."""
    return _derived_id("guard-message", prefix, intake)


def approval_decision_id(prefix: str, hold_id: str, approver: str) -> str:
    """The decision id of *approver*'s vote on the hold *hold_id*: one per approver and hold,
    on every replica (a second vote cannot be recorded: ``duplicate_approval``)."""
    return _derived_id("guard-approval", prefix, hold_id, approver)


def resolution_decision_id(prefix: str, hold_id: str) -> str:
    """The decision id of the hold *hold_id*'s resolution (released at quorum, rejected or
    expired): one per hold, whichever replica gets there first."""
    return _derived_id("guard-resolution", prefix, hold_id)
