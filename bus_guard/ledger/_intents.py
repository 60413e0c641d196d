"""Retained intents: the bytes of every decided intent, kept for re-evaluation. Pure.

``bus-guard replay`` and ``bus-guard policy impact`` decide recorded intents again, so
the exact bytes a gateway decided must outlive the intake (a work queue: an intent is
gone once acked) and the deny records (4 KiB excerpts, and nothing for allows). Every
decision (allow, deny, hold; stream and core mode) is retained as one message in the
key-value bucket ``<prefix>-intents`` (its stream ``KV_<prefix>-intents``, one value per
key, ``max_age`` the retention, ``bus-guard run --intent-retention``, 7 days by default):

* key: the decision id (subject ``$KV.<prefix>-intents.<decision id>``);
* data: the intent's payload, byte for byte (never re-encoded);
* ``Content-Type``: the intent's, when it had one (msgpack intents decode as msgpack);
* ``Guard-Retained``: :class:`RetainedDecision` as JSON: what was decided (effect, reason,
  rules, the policy digest and version, the constitution in force), on which subject,
  by which gateway, when, with which parents and limits. Core mode has no ledger: this is
  its only record; in stream mode the ledger record stands and this one says the same.

The payload's SHA-256 is in the ledger record (stream mode) and in the header: a retained
message whose bytes do not hash to it is refused by the readers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from bus_guard.decision import LimitUse
from bus_guard.ledger._records import LedgerRecord
from bus_guard.pipeline import HeaderValue, Outcome, Output, content_type
from bus_guard.verify import payload_digest

__all__ = (
    "DEFAULT_RETENTION_S",
    "RETAINED_HEADER",
    "Retained",
    "RetainedDecision",
    "intents_bucket",
    "read_retained",
    "retained_output",
    "retained_subject",
)

RETAINED_HEADER: Final = "Guard-Retained"
DEFAULT_RETENTION_S: Final = 7 * 86400.0
ROLE: Final = "intent"  # the output role of a retained intent (the publisher groups by role)


class RetainedDecision(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What was decided about a retained intent (the ``Guard-Retained`` header)."""

    decision_id: str
    effect: str
    reason: str
    subject: str  # the intake subject
    ts: float  # when it was decided: what "now" was for the skew checks
    gateway: str
    mode: str = "enforce"
    would_deny: bool = False
    rules: tuple[str, ...] = ()
    policy_digest: str = ""
    policy_version: str = ""
    # The layers in force when it was decided: the constitution's digest and the ordinary
    # set's ("" without a constitution): a decision names only the layer that made it.
    constitution: str = ""
    ordinary: str = ""
    core: bool = False  # decided by a core-mode gateway (no ledger record, no lineage)
    principal: str = ""
    action: str = ""
    resource: str = ""
    intent_id: str = ""
    payload_sha256: str = ""
    parents: tuple[str, ...] = ()
    limits: tuple[LimitUse, ...] = ()
    hold: str = ""  # a vote or resolution: its hold (not an intent of its own)


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(RetainedDecision)


def intents_bucket(prefix: str) -> str:
    """``<prefix>-intents`` (dots as dashes, like every bucket of the prefix)."""
    return f"{prefix.replace('.', '-')}-intents"


def retained_subject(bucket: str, decision_id: str) -> str:
    return f"$KV.{bucket}.{decision_id}"


def retained_output(
    record: Outcome | LedgerRecord,
    payload: bytes,
    headers: Mapping[str, str] | None,
    *,
    bucket: str,
    layers: tuple[str, str] = ("", ""),
) -> Output:
    """The message that retains *record*'s intent *payload* (its intake *headers* give the
    ``Content-Type``); *layers*: the digests of the constitution and of the ordinary set in
    force (``("", "")`` without a constitution)."""
    summary = RetainedDecision(
        decision_id=record.decision_id,
        effect=record.effect,
        reason=record.reason,
        subject=record.subject,
        ts=record.ts,
        gateway=record.gateway,
        mode=record.mode or "enforce",
        would_deny=record.would_deny,
        rules=record.rules,
        policy_digest=record.policy_digest,
        policy_version=record.policy_version,
        constitution=layers[0],
        ordinary=layers[1],
        core=not isinstance(record, LedgerRecord),
        principal=record.principal,
        action=record.action,
        resource=record.resource,
        intent_id=record.intent_id,
        payload_sha256=record.payload_sha256,
        parents=record.parents,
        limits=record.limits,
        hold=record.hold,
    )
    # No Nats-Msg-Id: the key is the decision id and the bucket keeps one value per key, so
    # retaining an intent again (a redelivery adopting its decision) writes the same value
    # over itself, and the server keeps no de-duplication state per intent.
    out: dict[str, str] = {RETAINED_HEADER: HeaderValue(_encoder.encode(summary).decode())}
    ctype = content_type(headers)
    if ctype is not None:
        out["Content-Type"] = HeaderValue(ctype)
    return (ROLE, retained_subject(bucket, record.decision_id), payload, out)


@dataclass(frozen=True, slots=True)
class Retained:
    """A retained intent as read back: what was decided, the bytes, their content type."""

    decision: RetainedDecision
    payload: bytes
    content_type: str | None


def read_retained(data: bytes, headers: Mapping[str, str] | None) -> Retained:
    """A retained message; ``ValueError`` saying why if it is not one (no or a malformed
    ``Guard-Retained`` header, or bytes that are not the ones decided)."""
    raw = (headers or {}).get(RETAINED_HEADER)
    if raw is None:
        raise ValueError(f"no {RETAINED_HEADER} header: not a retained intent")
    try:
        decision = _decoder.decode(raw.encode())
    except msgspec.DecodeError as exc:
        raise ValueError(f"{RETAINED_HEADER}: {exc}") from None
    if decision.payload_sha256 and payload_digest(data) != decision.payload_sha256:
        raise ValueError(
            f"retained bytes of {decision.decision_id} do not hash to the decided "
            f"{decision.payload_sha256}"
        )
    return Retained(decision, data, content_type(headers))
