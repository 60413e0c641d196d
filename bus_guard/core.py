"""Core intake mode: a queue-group subscription, at-most-once like core NATS itself.

The handler is total: nats-py hands callback exceptions to ``error_cb``, which only logs,
so every path here catches, counts and records a denial. Nothing is forwarded to ``exec``
unless the decision is ``allow`` *and* its artifact was signed. Core mode keeps no ledger,
so an intent naming parents cannot have them checked: it is denied ``lineage_violation``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg

from .api import Evaluation, evaluate
from .artifacts import Signer, payload_digest
from .authorize import PolicySetLike, deny
from .decision import Decision, Effect, Lineage, Reason
from .messages import (
    DecisionRecord,
    Intent,
    encode_record,
    new_decision_id,
    parse_subject,
    payload_excerpt,
)
from .outputs import INVALID_TOKEN, forwarded_headers
from .settings import Settings
from .state import State
from .verify import ArtifactClaims

__all__ = ("CoreCounters", "CoreIntake")

log = logging.getLogger(__name__)

# Replies go only to inboxes: a reply subject is chosen by the agent, and the gateway's
# credentials could otherwise be used to publish into exec/deny or the $JS API.
# ``_R_.`` is the alias the server substitutes for replies that cross accounts (the
# compose/ topology); clients cannot forge it.
_REPLY_PREFIXES: Final = ("_INBOX.", "_R_.")
_NO_LEDGER: Final = Lineage(violation="core mode keeps no ledger: parents cannot be checked")


class CoreCounters(Protocol):
    received: int
    allowed: int
    denied: int
    held: int
    would_deny: int
    internal_errors: int
    publish_failures: int
    replies_sent: int
    replies_refused: int


@dataclass
class CoreIntake:
    """The core-mode message path; :meth:`on_intent` is the subscription callback."""

    nc: Client
    settings: Settings
    policies: Callable[[], PolicySetLike]
    signer: Signer
    state: State
    clock: Callable[[], float]
    counters: CoreCounters

    def __post_init__(self) -> None:
        p = self.settings.prefix
        self._in_prefix_len = len(p) + 4  # "<prefix>.in."
        self._exec, self._deny, self._hold = f"{p}.exec.", f"{p}.deny.", f"{p}.hold."

    async def on_intent(self, msg: Msg) -> None:
        self.counters.received += 1
        policies = self.policies()  # one read: a swap mid-message cannot mix bundles
        try:
            await self._handle(msg, policies)
        except Exception:  # total handler: record a denial, never forward
            log.exception("handler failed for %s", msg.subject)
            self.counters.internal_errors += 1
            try:
                failed = deny(Reason.INTERNAL_ERROR, "gateway handler failed", policies)
                ev = Evaluation(failed, parse_subject(msg.subject, self.settings.prefix), None)
                await self._record(msg, ev, new_decision_id(), self.clock())
            except Exception:
                self.counters.publish_failures += 1
                log.exception("could not record the denial for %s", msg.subject)

    async def _handle(self, msg: Msg, policies: PolicySetLike) -> None:
        s = self.settings
        now = self.clock()
        headers = msg.headers
        ev = evaluate(
            msg.subject,
            msg.data,
            _header(headers, "content-type") if headers else None,
            policies,
            self.state,
            now=now,
            prefix=s.prefix,
            checks=s.checks,
            max_payload_bytes=s.max_payload_bytes,
            max_nesting_depth=s.max_nesting_depth,
            lineage=_core_lineage,
        )
        decision_id = new_decision_id()
        if ev.decision.effect is Effect.ALLOW:
            failure = await self._forward(msg, ev, decision_id, now, policies)
            if failure is None:
                self.counters.allowed += 1
                if ev.decision.would_deny:
                    # Observe mode: operators see on the deny stream what enforcement
                    # would block; the record's effect says it was allowed.
                    self.counters.would_deny += 1
                    await self._publish_record(msg, ev, decision_id, now)
                await self._reply(msg, ev, decision_id, now)
                return
            ev = Evaluation(failure, ev.subject, ev.intent)
        await self._record(msg, ev, decision_id, now)

    async def _forward(
        self, msg: Msg, ev: Evaluation, decision_id: str, now: float, policies: PolicySetLike
    ) -> Decision | None:
        """Sign and publish to exec; ``None`` when forwarded, else the denial to record."""
        intent, subject = ev.intent, ev.subject
        if intent is None or subject is None:  # an allow always has both; fail closed
            return deny(Reason.INTERNAL_ERROR, "allow without a decoded intent", policies)
        exec_subject = self._exec + msg.subject[self._in_prefix_len :]
        decision = ev.decision
        try:
            token = self.signer.sign(
                ArtifactClaims(
                    iss=self.signer.issuer,
                    sub=subject.principal,
                    aud=exec_subject,
                    iat=int(now),
                    nbf=int(now),
                    exp=int(now + self.signer.ttl_s),
                    jti=decision_id,
                    action=subject.action,
                    resource=intent.resource,
                    intent_id=intent.id,
                    payload_sha256=payload_digest(msg.data),
                    policy_digest=decision.policy_digest,
                    policy_version=decision.policy_version,
                    rules=decision.rules,
                    mode=decision.mode,
                    would_deny=decision.would_deny,
                    parents=intent.parents,
                    lineage_depth=0,
                    lineage_root=subject.principal,
                )
            )
        except Exception as exc:
            log.exception("signing failed for intent %s", intent.id)
            self.counters.internal_errors += 1
            return deny(Reason.INTERNAL_ERROR, f"signing failed: {exc}", policies)
        out = forwarded_headers(msg.headers)
        out["Guard-Artifact"] = token
        out["Guard-Decision"] = decision_id
        out["Nats-Msg-Id"] = decision_id
        try:
            await self.nc.publish(exec_subject, msg.data, headers=out)
        except Exception as exc:
            log.exception("exec publish failed for intent %s", intent.id)
            self.counters.publish_failures += 1
            return deny(Reason.INTERNAL_ERROR, f"exec publish failed: {exc}", policies)
        return None

    async def _record(self, msg: Msg, ev: Evaluation, decision_id: str, now: float) -> None:
        """Publish a deny or hold record (and the reply): never an allow."""
        if ev.decision.effect is Effect.ALLOW:  # an allow reaches here only without artifact
            failed = deny(Reason.INTERNAL_ERROR, "allow without artifact", self.policies())
            ev = Evaluation(failed, ev.subject, ev.intent)
        if ev.decision.effect is Effect.HOLD:
            self.counters.held += 1
        else:
            self.counters.denied += 1
        await self._publish_record(msg, ev, decision_id, now)
        await self._reply(msg, ev, decision_id, now)

    def _make_record(
        self, msg: Msg, ev: Evaluation, decision_id: str, now: float, *, excerpt: int
    ) -> DecisionRecord:
        decision = ev.decision
        s = self.settings
        extra: dict[str, Any] = payload_excerpt(msg.data, excerpt) if excerpt > 0 else {}
        return DecisionRecord(
            decision_id=decision_id,
            effect=str(decision.effect),
            reason=str(decision.reason),
            message=decision.message,
            subject=msg.subject,
            principal=ev.subject.principal if ev.subject is not None else "",
            action=ev.subject.action if ev.subject is not None else "",
            rules=decision.rules,
            policy_digest=decision.policy_digest,
            policy_version=decision.policy_version,
            mode=decision.mode,
            would_deny=decision.would_deny,
            intent_id=ev.intent.id if ev.intent is not None else "",
            resource=ev.intent.resource if ev.intent is not None else "",
            payload_sha256=payload_digest(msg.data),
            gateway=s.gateway_id,
            ts=now,
            **extra,
        )

    async def _publish_record(self, msg: Msg, ev: Evaluation, decision_id: str, now: float) -> None:
        # A hold keeps the whole payload: an approval forwards exactly those bytes later.
        held = ev.decision.effect is Effect.HOLD
        if ev.subject is not None:
            target = (self._hold if held else self._deny) + msg.subject[self._in_prefix_len :]
        else:
            target = self._deny + INVALID_TOKEN
        excerpt = self.settings.max_payload_bytes if held else self.settings.deny_payload_bytes
        record = self._make_record(msg, ev, decision_id, now, excerpt=excerpt)
        try:
            await self.nc.publish(target, encode_record(record))
        except Exception:
            self.counters.publish_failures += 1
            log.exception("could not publish %s record for %s", ev.decision.effect, msg.subject)

    async def _reply(self, msg: Msg, ev: Evaluation, decision_id: str, now: float) -> None:
        if not msg.reply:
            return
        if not msg.reply.startswith(_REPLY_PREFIXES):
            self.counters.replies_refused += 1
            log.warning("refused reply to %r for %s", msg.reply, msg.subject)
            return
        # The reply omits the payload: the requester already has it.
        record = self._make_record(msg, ev, decision_id, now, excerpt=0)
        try:
            await self.nc.publish(msg.reply, encode_record(record))
            self.counters.replies_sent += 1
        except Exception:
            self.counters.publish_failures += 1
            log.exception("could not reply to %s", msg.reply)


def _header(headers: dict[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _core_lineage(intent: Intent) -> Lineage | None:
    return _NO_LEDGER if intent.parents else None
