"""What a recorded decision publishes, derived from its ledger record and the intent message.

Pure and deterministic: the same record and the same stored intent give the same subjects,
bytes and headers, whichever gateway builds them and however often. That is what lets a
redelivered intent *adopt* a decision recorded before a crash: its outputs are published
again byte for byte, with ``Nats-Msg-Id`` = the decision id, so JetStream stores them once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .ledger import LedgerRecord
from .messages import DecisionRecord, encode_record, parse_subject, payload_excerpt
from .verify import ARTIFACT_HEADER, DECISION_HEADER

__all__ = (
    "INVALID_TOKEN",
    "HeaderValue",
    "Output",
    "forwarded_headers",
    "outputs_of",
)

INVALID_TOKEN: Final = "~invalid"  # deny-subject token for intents on a malformed subject
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


@dataclass(frozen=True, slots=True)
class Output:
    role: str  # "exec" | "deny" | "hold"
    subject: str
    data: bytes
    headers: Mapping[str, str]


def forwarded_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Inbound ``Nats-*`` and ``Guard-*`` headers are never trusted nor forwarded."""
    if not headers:
        return {}
    return {k: HeaderValue(v) for k, v in headers.items() if not k.lower().startswith(_UNTRUSTED)}


def _record(record: LedgerRecord, payload: bytes, excerpt: int) -> bytes:
    extra: dict[str, Any] = payload_excerpt(payload, excerpt) if excerpt > 0 else {}
    return encode_record(
        DecisionRecord(
            decision_id=record.decision_id,
            effect=record.effect,
            reason=record.reason,
            message=record.message,
            subject=record.subject,
            principal=record.principal,
            action=record.action,
            rules=record.rules,
            policy_digest=record.policy_digest,
            policy_version=record.policy_version,
            mode=record.mode or "enforce",
            would_deny=record.would_deny,
            intent_id=record.intent_id,
            resource=record.resource,
            payload_sha256=record.payload_sha256,
            gateway=record.gateway,
            ts=record.ts,
            **extra,
        )
    )


def outputs_of(
    record: LedgerRecord,
    payload: bytes,
    headers: Mapping[str, str] | None,
    *,
    prefix: str,
    deny_payload_bytes: int,
    max_payload_bytes: int,
) -> list[Output]:
    """The exec / deny / hold messages of a recorded decision on the intent *payload*."""
    decision_id = HeaderValue(record.decision_id)
    msg_id = {"Nats-Msg-Id": decision_id}
    tail = record.subject[len(prefix) + 4 :]  # after "<prefix>.in."
    valid = parse_subject(record.subject, prefix) is not None
    out = []
    if record.effect == "allow":
        if not record.artifact:  # never forward without an artifact (fail closed)
            raise ValueError(f"allow {record.decision_id} has no artifact")
        forwarded = forwarded_headers(headers)
        forwarded[ARTIFACT_HEADER] = HeaderValue(record.artifact)
        forwarded[DECISION_HEADER] = decision_id
        forwarded.update(msg_id)
        out.append(Output("exec", f"{prefix}.exec.{tail}", payload, forwarded))
        if record.would_deny:  # observe mode: operators see what enforcement would block
            data = _record(record, payload, deny_payload_bytes)
            out.append(Output("deny", f"{prefix}.deny.{tail}", data, msg_id))
    elif record.effect == "hold" and valid:
        # A hold keeps the whole payload: an approval forwards exactly those bytes later.
        data = _record(record, payload, max_payload_bytes)
        out.append(Output("hold", f"{prefix}.hold.{tail}", data, msg_id))
    else:
        target = f"{prefix}.deny.{tail}" if valid else f"{prefix}.deny.{INVALID_TOKEN}"
        out.append(Output("deny", target, _record(record, payload, deny_payload_bytes), msg_id))
    return out
