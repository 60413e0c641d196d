"""The pipeline: intent bytes → decision → what to publish. Pure: no NATS, no clock.

Every mode runs these steps, and the embedding API is their first half::

    >>> policies = load_policies("policies")
    >>> d = decide(policies, "guard.in.agent-7.payments.transfer", payload)
    >>> d.effect, d.reason, d.rules

* :func:`authorize` is the decision core: pure, synchronous and total. It has no
  ``await``, no clock and no environment (the caller passes ``now``); a bug in evaluation
  becomes ``deny internal_error``, never an exception and never an allow.
* :func:`evaluate` / :func:`decide`: subject → decode → authorize; every input ends in a
  :class:`~bus_guard.decision.Decision`.
* :func:`outputs_of`: the exec / deny / hold messages of a decision that stands. Pure and
  deterministic: the same record and the same intent message give the same subjects, bytes
  and headers, whichever gateway builds them and however often. That is what lets a
  redelivered intent *adopt* a decision recorded before a crash: its outputs are published
  again byte for byte, with ``Nats-Msg-Id`` = the decision id, so JetStream stores them once.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeAlias, TypeVar

import msgspec

from bus_guard.decision import (
    POLICY_REASONS,
    Decision,
    Effect,
    LimitUse,
    Lineage,
    Mode,
    Reason,
    Request,
)
from bus_guard.intent import Intent, Malformed, Subject, decode_intent, parse_subject, wire_safe
from bus_guard.settings import MAX_NESTING_DEPTH, MAX_PAYLOAD_BYTES, Checks, Settings
from bus_guard.subjects import DEFAULT_PREFIX, Subjects
from bus_guard.verify import (
    ARTIFACT_HEADER,
    DECISION_HEADER,
    ArtifactClaims,
    JwkEntry,
    payload_digest,
)

__all__ = (
    "DEFAULT_CHECKS",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "UNREADABLE_HEADERS",
    "Checks",
    "DecisionRecord",
    "Decoded",
    "Evaluation",
    "HeaderValue",
    "Outcome",
    "Output",
    "PolicySetLike",
    "Standing",
    "authorize",
    "claims_of",
    "content_type",
    "decide",
    "decision_record",
    "decode",
    "decode_message",
    "deny",
    "encode_record",
    "evaluate",
    "failed",
    "forwarded_headers",
    "header_problem",
    "judge",
    "limited",
    "outcome_of",
    "outputs_of",
    "payload_excerpt",
    "reply_allowed",
    "request_of",
    "traceparent_of",
    "unsigned_allow",
)


# --- the decision core ------------------------------------------------------------------

log = logging.getLogger(__name__)


class PolicySetLike(Protocol):
    """What the core needs of a compiled policy set (see :mod:`bus_guard.policy`)."""

    @property
    def digest(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def mode(self) -> Mode: ...
    def evaluate(self, request: Request) -> Decision: ...
    def approver_key(self, kid: str) -> tuple[str, JwkEntry] | None:
        """The approver id and key for an approval signed with *kid* (``None``: no
        approver of the set has it); the caller checks ``entry.usable_at(now)``."""
        ...


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
        decision = policies.evaluate(request_of(subject, intent, lineage))
        if not isinstance(decision, Decision):  # fail closed on a contract breach
            return deny(Reason.INTERNAL_ERROR, "evaluator returned no decision", policies)
        if decision.effect is Effect.ALLOW:
            return decision
        return _observed(decision, policies)
    except Exception as exc:  # the boundary: sync code, nothing here can be cancelled
        log.exception("evaluation failed for intent %s", intent.id)
        return deny(Reason.INTERNAL_ERROR, f"evaluation failed: {type(exc).__name__}", policies)


def request_of(subject: Subject, intent: Intent, lineage: Lineage | None) -> Request:
    """What the policy sees of *intent* on *subject*, a child of *lineage* (``None``: a root:
    depth 0, its own principal as root, no labels, no parents)."""
    principal = subject.principal
    depth, root, labels, parents = (
        (0, principal, _NO_LABELS, ())
        if lineage is None
        else (lineage.depth, lineage.root or principal, lineage.labels, lineage.parents)
    )
    # Positional, in Request's field order (as Outcome: a fraction of the keyword cost).
    return Request(
        principal,
        subject.action,
        intent.resource,
        intent.params,
        intent.id,
        intent.parents,
        depth,
        root,
        labels,
        parents,
    )


def limited(
    decision: Decision, uses: tuple[LimitUse, ...], ok: bool, policies: PolicySetLike
) -> Decision:
    """An allow whose limits were checked: *ok*, it stands with what it spent (*uses*);
    else the denial of the first full limit (*uses*: that one): ``rate_limited`` for a
    count, ``budget_exceeded`` for a sum, naming the rule (observe mode: allowed, marked)."""
    if ok:
        return msgspec.structs.replace(decision, limits=(), limit_use=uses)
    use = uses[0]
    per = f"per {use.per} {use.key!r}"
    if use.kind == "count":
        reason = Reason.RATE_LIMITED
        message = (
            f"rate limit {use.limit} of rule {use.rule}: {use.max:g} per {use.window_s:g}s "
            f"{per}; {use.used:g} used"
        )
    else:
        reason = Reason.BUDGET_EXCEEDED
        message = (
            f"budget {use.limit} of rule {use.rule}: {use.max:g} per {use.window_s:g}s {per}; "
            f"{use.used:g} spent, this intent {use.amount:g}"
        )
    denial = msgspec.structs.replace(
        deny(reason, message, policies), rules=(use.rule,), limit_use=uses
    )
    return _observed(denial, policies)


def _observed(decision: Decision, policies: PolicySetLike) -> Decision:
    if policies.mode == "observe" and decision.reason in POLICY_REASONS:
        # Observe mode lets policy outcomes through, marked; integrity failures
        # (spoofing, malformed, stale, errors) are denied in every mode.
        return msgspec.structs.replace(decision, effect=Effect.ALLOW, would_deny=True)
    return decision


# --- bytes to a decision ----------------------------------------------------------------


# An intake message as the pipeline reads it, before any policy: ``(subject, intent)``, the
# subject ``None`` when it is not an intent subject (and the intent ``None`` then too).
# A plain tuple, unpacked by its readers: a NamedTuple costs a Python-level ``__new__`` and
# a type of its own per intent (callgrind, core mode: ~4.5k of ~850k cycles per intent).
Decoded: TypeAlias = tuple[Subject | None, Intent | Malformed | None]


# Inbound headers: bounded and validated before anything else (they are forwarded to exec
# and must fit the server's limits there; SPEC §2: other headers pass through).
MAX_HEADERS: Final = 32
MAX_HEADER_BYTES: Final = 8192  # names + values + ": " and CRLF per header
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # RFC 7230 token
# Control characters (tab allowed), DEL, and lone surrogates (bytes that were not UTF-8).
_BAD_VALUE: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
# The NATS status protocol's names: a message carrying them is taken for a server status
# (no responders, heartbeat, flow control) by clients, nats-py included.
_RESERVED: Final = frozenset({"status", "description"})


# Set by the gateway's client (bus_guard.intake) when nats-py would not read the raw header
# block faithfully (it drops or rewrites what it cannot decode); its value says why. Not a
# name any message can carry: a header name never holds a NUL.
UNREADABLE_HEADERS: Final = "\x00unreadable-headers"


def header_problem(headers: Mapping[str, str]) -> str | None:
    """Why inbound *headers* cannot be accepted (and forwarded); ``None`` if they can."""
    unreadable = headers.get(UNREADABLE_HEADERS)
    if unreadable is not None:
        return unreadable
    if len(headers) > MAX_HEADERS:
        return f"{len(headers)} headers (at most {MAX_HEADERS})"
    size = 0
    for name, value in headers.items():
        if _TOKEN.fullmatch(name) is None:
            return f"header name {wire_safe(name)[:64]!r} is not an RFC 7230 token"
        if name.lower() in _RESERVED:
            return f"header {name!r} is reserved for NATS status messages"
        if _BAD_VALUE.search(value) is not None:
            return f"header {name!r} has a control character in its value"
        size += len(name) + len(value.encode("utf-8")) + 4
    if size > MAX_HEADER_BYTES:
        return f"{size} bytes of headers (at most {MAX_HEADER_BYTES})"
    return None


# A reply subject is chosen by the agent and published to with the gateway's credentials:
# only inbox-shaped subjects of plain tokens, so that no reply lands in exec/deny, the $JS
# API, or (with ``principal``) another agent's inbox.
_REPLY: Final = re.compile(r"(?:_R_|_INBOX)(?:\.[A-Za-z0-9_-]{1,64}){1,8}")


def reply_allowed(reply: str, principal: str | None, *, inbox: str = "principal") -> bool:
    """Whether a decision may be sent to *reply*, the reply subject of an intent by
    *principal* (``None``: the subject did not parse). ``_R_.`` is the alias the server
    substitutes for replies that cross accounts (the compose topology): clients cannot
    forge a working one. *inbox* ``principal``: ``_INBOX.<principal>.`` only (agents connect
    with ``inbox_prefix="_INBOX.<principal>"``); ``any``: every ``_INBOX.`` subject."""
    if len(reply) > 256 or _REPLY.fullmatch(reply) is None:
        return False
    if reply.startswith("_R_.") or inbox == "any":
        return True
    return principal is not None and reply.startswith(f"_INBOX.{principal}.")


def content_type(headers: Mapping[str, str] | None) -> str | None:
    """The ``Content-Type`` header, whatever its case; ``None`` without one."""
    if headers:
        for key, value in headers.items():
            if key.lower() == "content-type":
                return value
    return None


def decode(
    subject: str,
    payload: bytes,
    ctype: str | None,
    *,
    headers: Mapping[str, str] | None = None,
    prefix: str = DEFAULT_PREFIX,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    max_nesting_depth: int = MAX_NESTING_DEPTH,
) -> Decoded:
    """Parse the subject and, for an intent subject, check the message's *headers* and
    decode the payload strictly. Total: any input gives a value."""
    parsed = parse_subject(subject, prefix)
    if parsed is None:
        return (None, None)
    if headers and (problem := header_problem(headers)) is not None:
        return (parsed, Malformed(Reason.MALFORMED, problem))
    intent = decode_intent(payload, ctype, max_bytes=max_payload_bytes, max_depth=max_nesting_depth)
    return (parsed, intent)


def decode_message(
    subject: str, payload: bytes, headers: Mapping[str, str] | None, settings: Settings
) -> Decoded:
    """:func:`decode` of a message as an intake receives it, with the gateway's bounds."""
    # decode's steps, not a call to it with five keywords: once per intent, and most
    # intents carry no headers (no call to learn there is no Content-Type either).
    parsed = parse_subject(subject, settings.prefix)
    if parsed is None:
        return (None, None)
    ctype = None
    if headers:
        if (problem := header_problem(headers)) is not None:
            return (parsed, Malformed(Reason.MALFORMED, problem))
        ctype = content_type(headers)
    intent = decode_intent(
        payload,
        ctype,
        max_bytes=settings.max_payload_bytes,
        max_depth=settings.max_nesting_depth,
    )
    return (parsed, intent)


def judge(
    subject: str,
    decoded: Decoded,
    policies: PolicySetLike,
    *,
    now: float,
    checks: Checks = DEFAULT_CHECKS,
    lineage: Lineage | None = None,
) -> Decision:
    """The decision on a decoded message (*subject* as received, for the message)."""
    parsed, intent = decoded
    if parsed is None:
        return deny(Reason.BAD_SUBJECT, f"not an intent subject: {subject!r}", policies)
    if not isinstance(intent, Intent):
        if intent is None:  # cannot happen (decode gives an intent subject a payload)
            return deny(Reason.INTERNAL_ERROR, "intent subject without a payload", policies)
        return deny(intent.reason, intent.message, policies)
    return authorize(parsed, intent, policies, now=now, checks=checks, lineage=lineage)


@dataclass(frozen=True, slots=True)
class Evaluation:
    decision: Decision
    subject: Subject | None  # None when the subject itself was not an intent subject
    intent: Intent | None  # None when the payload did not decode


def evaluate(
    subject: str,
    payload: bytes,
    ctype: str | None,
    policies: PolicySetLike,
    *,
    now: float,
    prefix: str = DEFAULT_PREFIX,
    checks: Checks = DEFAULT_CHECKS,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    max_nesting_depth: int = MAX_NESTING_DEPTH,
    lineage: Lineage | None = None,
) -> Evaluation:
    """:func:`decode` then :func:`judge`, with what was decoded (``policy explain``)."""
    decoded = decode(
        subject,
        payload,
        ctype,
        prefix=prefix,
        max_payload_bytes=max_payload_bytes,
        max_nesting_depth=max_nesting_depth,
    )
    decision = judge(subject, decoded, policies, now=now, checks=checks, lineage=lineage)
    parsed, intent = decoded
    return Evaluation(decision, parsed, intent if isinstance(intent, Intent) else None)


def decide(
    policies: PolicySetLike,
    subject: str,
    payload: bytes,
    *,
    now: float | None = None,
    prefix: str = DEFAULT_PREFIX,
    content_type: str | None = None,
    checks: Checks = DEFAULT_CHECKS,
    lineage: Lineage | None = None,
) -> Decision:
    """Decide one intent in-process, exactly as the gateway would; *lineage*: what the
    ledger says of its parents (``None``: a root)."""
    decoded = decode(subject, payload, content_type, prefix=prefix)
    now = time.time() if now is None else now
    return judge(subject, decoded, policies, now=now, checks=checks, lineage=lineage)


# --- a decision that stands -------------------------------------------------------------


class Outcome(msgspec.Struct, frozen=True):
    """A decision with everything its outputs and its artifact need: what core mode
    publishes, and what stream mode records (a ledger record is an outcome with a place
    in its gateway's chain). Field names are the ledger record's.

    Built once per intent, positionally: msgspec builds it from 23 positional arguments
    in ~0.1 µs, from keywords in ~0.9 µs (``python /tmp`` timings in the commit)."""

    decision_id: str
    effect: str
    reason: str
    message: str
    rules: tuple[str, ...]
    policy_digest: str
    policy_version: str
    mode: str
    would_deny: bool
    subject: str  # the intake subject, as received
    principal: str
    action: str
    resource: str
    intent_id: str
    payload_sha256: str
    parents: tuple[str, ...]
    lineage_depth: int
    lineage_root: str
    labels: tuple[str, ...]
    gateway: str
    ts: float
    artifact: str = ""  # allow: the signed Guard-Artifact, once signed
    first_decision: str = ""  # replay: the decision the intent id already had
    # allow: the labels its rules add (children inherit them with ``labels`` and the
    # action), and its numeric top-level params (a child may not exceed them: "scope")
    taints: tuple[str, ...] = ()
    scope: dict[str, int | float] = {}
    # hold: who may approve it (approver ids), how many, and when it expires (unix s)
    approvers: tuple[str, ...] = ()
    quorum: int = 0
    expires: float = 0.0
    # an approver's vote (approve / reject / refused) and a hold's resolution: the hold
    hold: str = ""
    approver: str = ""  # a vote: the approver's id
    approvals: tuple[str, ...] = ()  # a release: the decision ids of the votes counted
    # limits: what an allow spent, or the limit a rate_limited / budget_exceeded found full
    limits: tuple[LimitUse, ...] = ()
    # the agent's W3C trace context (its ``traceparent`` header), when it sent a valid one
    traceparent: str = ""


MAX_SCOPE: Final = 16  # numeric params kept per allowed intent for its children's scope


_NO_SCOPE: Final[dict[str, int | float]] = {}  # shared, never written (Outcome is frozen)


def scope_of(params: Mapping[str, Any]) -> dict[str, int | float]:
    """The numeric top-level params of an allowed intent, the first :data:`MAX_SCOPE` in
    the payload's order (the same bytes, the same scope): what a ``within_parent``
    constraint compares a child's params with."""
    out: dict[str, int | float] = {}
    for name, value in params.items():
        if type(value) is int or type(value) is float:
            out[name] = value
            if len(out) == MAX_SCOPE:
                break
    return out


def outcome_of(
    decision_id: str,
    subject: str,
    payload: bytes,
    decoded: Decoded,
    decision: Decision,
    *,
    gateway: str,
    now: float,
    lineage: Lineage | None = None,
    first_decision: str = "",
    traceparent: str = "",
) -> Outcome:
    """The outcome of *decision* on the message (*subject*, *payload*) as *decoded*;
    *traceparent*: the agent's trace context (:func:`traceparent_of` its headers)."""
    parsed, decoded_intent = decoded
    intent = decoded_intent if isinstance(decoded_intent, Intent) else None
    principal = parsed.principal if parsed is not None else ""
    labels: tuple[str, ...] = ()
    if lineage is None:  # a root: depth 0, its own principal as root, no labels
        depth, root = 0, principal
    else:
        depth, root = lineage.depth, lineage.root
        if lineage.labels:
            labels = tuple(sorted(lineage.labels))
    effect = decision.effect
    taints: tuple[str, ...] = ()
    scope: dict[str, int | float] = _NO_SCOPE
    approvers: tuple[str, ...] = ()
    quorum, expires = 0, 0.0
    if effect is Effect.ALLOW:
        taints = decision.taints
        if intent is not None and (params := intent.params):
            # scope_of(params), inline: one call less per allowed intent (see below).
            scope = {}
            for name, value in params.items():
                if type(value) is int or type(value) is float:
                    scope[name] = value
                    if len(scope) == MAX_SCOPE:
                        break
    elif effect is Effect.HOLD and (terms := decision.hold) is not None:
        approvers, quorum, expires = terms.approvers, terms.quorum, now + terms.ttl_s
    # Positional, in Outcome's field order (see Outcome: a fraction of the keyword cost).
    # ``_value_``, not ``value``: the enum's ``value`` is a Python-level property (two
    # Python calls per read), ``_value_`` the plain attribute behind it. wire_safe and
    # scope_of inline (ASCII subjects are returned as they are): two Python frames less per
    # intent (callgrind, core mode, with the other inlined calls of commit "core per-message
    # path: ... frames less": ~0.7k instructions each).
    outcome = Outcome(
        decision_id,
        effect._value_,
        decision.reason._value_,
        decision.message,
        decision.rules,
        decision.policy_digest,
        decision.policy_version,
        decision.mode,
        decision.would_deny,
        subject if subject.isascii() else wire_safe(subject),
        principal,
        parsed.action if parsed is not None else "",
        intent.resource if intent is not None else "",
        intent.id if intent is not None else "",
        payload_digest(payload),
        intent.parents if intent is not None else (),
        depth,
        root,
        labels,
        gateway,
        now,
        "",
        first_decision,
        taints,
        scope,
        approvers,
        quorum,
        expires,
    )
    if decision.limit_use:  # rare: set on the fresh value (no keyword Outcome per intent)
        msgspec.structs.force_setattr(outcome, "limits", decision.limit_use)
    if traceparent:  # as rare, so far: the same
        msgspec.structs.force_setattr(outcome, "traceparent", traceparent)
    return outcome


# W3C Trace Context, version 00 as any later version is read (``traceparent``):
# version-traceid-parentid-flags in lower-case hex; ff is no version, all-zero ids are none.
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACE_HEADERS: Final = ("traceparent", "Traceparent", "TRACEPARENT")


def traceparent_of(headers: Mapping[str, str] | None) -> str:
    """The agent's ``traceparent`` header if it is a valid W3C trace context, else ``""``.

    It is recorded (deny/hold record, ledger, artifact claims) so that a decision can be
    found from the agent's trace; it is never authority, so an invalid one is not a denial,
    only not recorded. Only the first 55 characters of a later version are kept (its
    version 00 fields): what follows is that version's own."""
    if not headers:
        return ""
    for name in _TRACE_HEADERS:
        value = headers.get(name)
        if value is not None:
            break
    else:
        return ""
    value = value.strip()
    if (m := _TRACEPARENT.match(value)) is None:
        return ""
    version, trace_id, parent_id, _ = m.groups()
    if version == "ff" or trace_id == "0" * 32 or parent_id == "0" * 16:
        return ""
    if version == "00" and len(value) != 55:
        return ""
    return value[:55]


def claims_of(
    outcome: Outcome, *, issuer: str, ttl_s: float, subjects: Subjects, ledger_seq: int = 0
) -> ArtifactClaims:
    """The artifact claims of an allowed *outcome*, valid from ``int(ts)`` for *ttl_s*."""
    now = outcome.ts
    # Positional, in ArtifactClaims' field order (as Outcome: keywords cost ~0.8 µs more).
    return ArtifactClaims(
        issuer,
        outcome.principal,
        subjects.output("exec", outcome.subject),
        int(now),
        int(now),
        int(now + ttl_s),
        outcome.decision_id,
        outcome.action,
        outcome.resource,
        outcome.intent_id,
        outcome.payload_sha256,
        outcome.policy_digest,
        outcome.policy_version,
        outcome.rules,
        outcome.mode,
        outcome.would_deny,
        outcome.parents,
        outcome.lineage_depth,
        outcome.lineage_root,
        ledger_seq,
        outcome.labels,
        outcome.taints,
        outcome.scope,
        outcome.hold,
        outcome.approvals,
        outcome.traceparent,
    )


_OutcomeT = TypeVar("_OutcomeT", bound=msgspec.Struct)


def failed(outcome: _OutcomeT, message: str) -> _OutcomeT:
    """*outcome* as a denial ``internal_error`` (signing or publishing failed): fail closed."""
    return msgspec.structs.replace(
        outcome,
        effect=Effect.DENY.value,
        reason=Reason.INTERNAL_ERROR.value,
        message=message,
        would_deny=False,
        artifact="",
    )


# --- what a decision publishes ----------------------------------------------------------


class DecisionRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Published on ``deny.`` / ``hold.`` subjects and sent as the reply to a requester."""

    decision_id: str
    effect: str
    reason: str
    message: str
    subject: str
    principal: str
    action: str
    rules: tuple[str, ...] = ()
    policy_digest: str = ""
    policy_version: str = ""
    mode: str = "enforce"
    would_deny: bool = False
    intent_id: str = ""
    resource: str = ""
    payload_sha256: str = ""
    payload: str | None = None  # the original payload, when it is UTF-8 text
    payload_b64: str | None = None  # ... or base64 of it when it is not
    payload_truncated: bool = False
    gateway: str = ""
    ts: float = 0.0
    # a hold: who may approve it, how many, until when; a vote or resolution: its hold
    approvers: tuple[str, ...] = ()
    quorum: int = 0
    expires: float = 0.0
    hold: str = ""
    approver: str = ""
    approvals: tuple[str, ...] = ()
    limits: tuple[LimitUse, ...] = ()  # the limit that was full (or what an allow spent)
    traceparent: str = ""  # the agent's W3C trace context, if it sent one
    # a hold: the intent's own headers (not ``Nats-*`` / ``Guard-*``), forwarded on release
    headers: dict[str, str] = {}


_json_enc: Final = msgspec.json.Encoder()


def encode_record(record: DecisionRecord) -> bytes:
    return _json_enc.encode(record)


def payload_excerpt(payload: bytes, limit: int) -> dict[str, Any]:
    """The original payload for a deny/hold record, up to ``limit`` bytes."""
    cut = payload[:limit]
    out: dict[str, Any] = {"payload_truncated": len(payload) > limit}
    try:
        out["payload"] = cut.decode("utf-8")
    except UnicodeDecodeError:
        out["payload_b64"] = base64.b64encode(cut).decode("ascii")
    return out


_UNTRUSTED: Final = ("nats-", "guard-")


class HeaderValue(str):
    """A header value as the gateway hands it to nats-py: the same string, cheaper to send.

    nats-py sanitises every header value on every publish: ``value.strip()`` and then
    ``translate`` of CR/LF over the whole value. ``str.translate`` with a dict table costs
    ~2 µs even for a decision id, and ~6 µs for a batched artifact (~1.4 KiB, a character
    at a time): with three to five headers per output, the largest single cost in the
    gateway's profiles. These two overrides return exactly what :class:`str`'s methods
    return; they only skip the work when it provably changes nothing: no whitespace at
    either end, no character the table maps (a ``memchr`` scan per table key: two for
    nats-py's CR/LF table). Any other table or argument takes :class:`str`'s own path, so
    wrapping any value, an agent's too, changes no byte on the wire.
    """

    __slots__ = ()

    def strip(self, chars: str | None = None, /) -> str:
        if chars is None and self and not self[0].isspace() and not self[-1].isspace():
            return self
        return str.strip(self, chars)

    def translate(self, table: Any, /) -> str:
        if type(table) is dict:
            for k in table:
                if type(k) is not int or not 0 <= k <= 0x10FFFF or chr(k) in self:
                    break
            else:
                return self
        return str.translate(self, table)


class Standing(Protocol):
    """A decision that stands, as far as its outputs need it: a ledger record (stream mode)
    or the unrecorded outcome of core mode."""

    @property
    def decision_id(self) -> str: ...
    @property
    def effect(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def subject(self) -> str: ...
    @property
    def principal(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def rules(self) -> tuple[str, ...]: ...
    @property
    def policy_digest(self) -> str: ...
    @property
    def policy_version(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def would_deny(self) -> bool: ...
    @property
    def intent_id(self) -> str: ...
    @property
    def resource(self) -> str: ...
    @property
    def payload_sha256(self) -> str: ...
    @property
    def gateway(self) -> str: ...
    @property
    def ts(self) -> float: ...
    @property
    def artifact(self) -> str: ...
    @property
    def approvers(self) -> tuple[str, ...]: ...
    @property
    def quorum(self) -> int: ...
    @property
    def expires(self) -> float: ...
    @property
    def hold(self) -> str: ...
    @property
    def approver(self) -> str: ...
    @property
    def approvals(self) -> tuple[str, ...]: ...
    @property
    def limits(self) -> tuple[LimitUse, ...]: ...
    @property
    def traceparent(self) -> str: ...


# One message to publish: ``(role, subject, data, headers)``, the role ``exec``, ``deny`` or
# ``hold``, the headers as nats-py takes them (not copied per publish). A plain tuple,
# unpacked by its readers, as :data:`Decoded` (callgrind, core mode: ~4k cycles per intent).
Output: TypeAlias = tuple[str, str, bytes, dict[str, str]]


def forwarded_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Inbound ``Nats-*`` and ``Guard-*`` headers are never trusted nor forwarded."""
    if not headers:
        return {}
    return {k: HeaderValue(v) for k, v in headers.items() if not k.lower().startswith(_UNTRUSTED)}


_NO_ARTIFACT: Final = "allowed, but no artifact was signed: denied, not forwarded"


def unsigned_allow(record: Standing) -> bool:
    """An allow without its artifact: it is never forwarded (:func:`outputs_of` denies it
    ``internal_error`` on the deny subject instead)."""
    return record.effect == "allow" and not record.artifact


def decision_record(
    record: Standing,
    payload: bytes,
    excerpt: int,
    *,
    fail_closed: bool = False,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """The JSON record published on the deny / hold subjects and sent as a reply, with up
    to *excerpt* bytes of *payload*; *fail_closed*: as the denial of an unsigned allow;
    *headers*: the intent's, kept (those :func:`forwarded_headers` passes) by a hold."""
    extra: dict[str, Any] = payload_excerpt(payload, excerpt) if excerpt > 0 else {}
    if headers and (kept := forwarded_headers(headers)):
        extra["headers"] = {str(k): str(v) for k, v in kept.items()}
    return encode_record(
        DecisionRecord(
            decision_id=record.decision_id,
            effect="deny" if fail_closed else record.effect,
            reason=Reason.INTERNAL_ERROR.value if fail_closed else record.reason,
            message=_NO_ARTIFACT if fail_closed else record.message,
            subject=record.subject,
            principal=record.principal,
            action=record.action,
            rules=record.rules,
            policy_digest=record.policy_digest,
            policy_version=record.policy_version,
            mode=record.mode or "enforce",
            would_deny=record.would_deny and not fail_closed,
            intent_id=record.intent_id,
            resource=record.resource,
            payload_sha256=record.payload_sha256,
            gateway=record.gateway,
            ts=record.ts,
            approvers=record.approvers,
            quorum=record.quorum,
            expires=record.expires,
            hold=record.hold,
            approver=record.approver,
            approvals=record.approvals,
            limits=record.limits,
            traceparent=record.traceparent,
            **extra,
        )
    )


def outputs_of(
    record: Standing,
    payload: bytes,
    headers: Mapping[str, str] | None,
    *,
    subjects: Subjects,
    deny_payload_bytes: int,
    max_payload_bytes: int,
) -> list[Output]:
    """The exec / deny / hold messages of a decision that stands, on the intent *payload*.

    Total: an allow without its artifact yields its denial (``internal_error``) on the
    deny subject, never an exec message.
    """
    decision_id = HeaderValue(record.decision_id)
    subject = record.subject
    if record.effect == "allow" and (artifact := record.artifact):
        # The exec headers in one dict: the inbound ones (most intents have none: no call),
        # then the gateway's, in the order nats-py writes them.
        forwarded = forwarded_headers(headers) if headers else {}
        forwarded[ARTIFACT_HEADER] = HeaderValue(artifact)
        forwarded[DECISION_HEADER] = decision_id
        forwarded["Nats-Msg-Id"] = decision_id
        exec_output: Output = ("exec", subjects.output("exec", subject), payload, forwarded)
        if not record.would_deny:
            return [exec_output]
        # observe mode: operators see what enforcement would block
        data = decision_record(record, payload, deny_payload_bytes)
        deny_subject = subjects.output("deny", subject)
        return [exec_output, ("deny", deny_subject, data, {"Nats-Msg-Id": decision_id})]
    msg_id: dict[str, str] = {"Nats-Msg-Id": decision_id}
    if record.effect == "hold" and parse_subject(subject, subjects.prefix) is not None:
        # A hold keeps the whole payload and the headers an allow would forward: an
        # approval forwards exactly those later.
        data = decision_record(record, payload, max_payload_bytes, headers=headers)
        return [("hold", subjects.output("hold", subject), data, msg_id)]
    valid = parse_subject(subject, subjects.prefix) is not None
    target = subjects.output("deny", subject) if valid else subjects.deny_invalid
    data = decision_record(record, payload, deny_payload_bytes, fail_closed=unsigned_allow(record))
    return [("deny", target, data, msg_id)]
