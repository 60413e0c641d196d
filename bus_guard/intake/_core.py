"""Core intake mode: a queue-group subscription, at-most-once like core NATS itself.

The handler is total: nats-py hands callback exceptions to ``error_cb``, which only logs,
so every path here catches, counts and records a denial. Nothing is forwarded to ``exec``
unless the decision is ``allow`` *and* its artifact was signed. Core mode keeps no ledger,
so an intent naming parents cannot have them checked: it is denied ``lineage_violation``.

Batched artifacts (``Settings.artifacts == "batched"``): the callback decides each intent
and appends it -- allowed or not, to keep outputs in intake order -- to one bounded pending
batch; a single flusher task (:meth:`CoreIntake.run_flusher`) signs the allowed intents of a
batch with one :meth:`~bus_guard.signing.BatchSigner.sign_batch` and only then publishes every
output of the batch in order. A batch closes when it holds ``batch_max`` intents, when no
further intent is waiting in the subscription's queue, or ``batch_delay_ms`` after its
first intent, whichever comes first; the callback waits while the batch is full (so the
subscription's bounded queue, and its drop counting, stay the back-pressure). A signing
failure denies every intent of the batch ``internal_error``: nothing of it is forwarded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus_guard.decision import Decision, Effect, Lineage, Reason, new_decision_id
from bus_guard.intent import Intent, parse_subject
from bus_guard.pipeline import (
    INVALID_TOKEN,
    DecisionRecord,
    Evaluation,
    HeaderValue,
    PolicySetLike,
    deny,
    encode_record,
    evaluate,
    forwarded_headers,
    payload_excerpt,
)
from bus_guard.settings import Settings
from bus_guard.signing._batch import BatchSigner
from bus_guard.signing._signer import Signer, payload_digest
from bus_guard.verify import ArtifactClaims

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
    artifact_batches: int


@dataclass(slots=True)
class _Entry:
    """One decided intent on its way out: allowed ones carry their claims until signed."""

    msg: Msg
    ev: Evaluation
    decision_id: str
    now: float
    policies: PolicySetLike
    exec_subject: str = ""
    claims: ArtifactClaims | None = None
    token: str = ""


@dataclass
class CoreIntake:
    """The core-mode message path; :meth:`on_intent` is the subscription callback, and in
    batched mode :meth:`run_flusher` the one task that signs and publishes batches."""

    nc: Client
    settings: Settings
    policies: Callable[[], PolicySetLike]
    signer: Signer
    clock: Callable[[], float]
    counters: CoreCounters

    def __post_init__(self) -> None:
        p = self.settings.prefix
        self._in_prefix_len = len(p) + 4  # "<prefix>.in."
        self._exec, self._deny, self._hold = f"{p}.exec.", f"{p}.deny.", f"{p}.hold."
        s = self.settings
        self.batched = s.artifacts == "batched"
        self.sub: Subscription | None = None  # set once subscribed: its queue tells idleness
        self._batcher = BatchSigner(self.signer, max_batch=s.batch_max) if self.batched else None
        self._batch: list[_Entry] = []
        self._batch_started = 0.0  # monotonic time of the batch's first intent
        self._delay_s = s.batch_delay_ms / 1000
        self._has_batch = asyncio.Event()  # the batch is not empty
        self._close_now = asyncio.Event()  # full, intake idle, or closing: sign now
        self._room = asyncio.Event()  # the flusher took the batch
        self._closing = False

    async def on_intent(self, msg: Msg) -> None:
        self.counters.received += 1
        policies = self.policies()  # one read: a swap mid-message cannot mix bundles
        if self.batched:
            await self._enqueue(msg, policies)
            return
        try:
            await self._handle(msg, policies)
        except Exception:  # total handler: record a denial, never forward
            log.exception("handler failed for %s", msg.subject)
            await self._fail(msg, policies)

    async def _fail(self, msg: Msg, policies: PolicySetLike) -> None:
        self.counters.internal_errors += 1
        try:
            failed = deny(Reason.INTERNAL_ERROR, "gateway handler failed", policies)
            ev = Evaluation(failed, parse_subject(msg.subject, self.settings.prefix), None)
            await self._record(msg, ev, new_decision_id(), self.clock())
        except Exception:
            self.counters.publish_failures += 1
            log.exception("could not record the denial for %s", msg.subject)

    # -- batched artifacts -----------------------------------------------------------

    async def _enqueue(self, msg: Msg, policies: PolicySetLike) -> None:
        try:
            entry = self._decide(msg, policies)
        except Exception:  # total: a denial, in its place in the batch (intake order)
            log.exception("handler failed for %s", msg.subject)
            self.counters.internal_errors += 1
            failed = deny(Reason.INTERNAL_ERROR, "gateway handler failed", policies)
            ev = Evaluation(failed, parse_subject(msg.subject, self.settings.prefix), None)
            entry = _Entry(msg, ev, new_decision_id(), self.clock(), policies)
        batch_max = self.settings.batch_max
        while len(self._batch) >= batch_max:  # bounded: wait for the flusher to take it
            self._room.clear()
            self._close_now.set()
            await self._room.wait()
        batch = self._batch
        batch.append(entry)
        if len(batch) == 1:
            self._batch_started = time.monotonic()
            self._has_batch.set()
        sub = self.sub
        if sub is None or sub.pending_msgs == 0:
            self._close_now.set()  # intake idle: this callback returns to an empty queue
        elif not self._close_now.is_set() and (
            len(batch) >= batch_max or time.monotonic() - self._batch_started >= self._delay_s
        ):
            # Full, or its first intent has waited batch_delay_ms, while intents keep
            # coming: nats-py runs this callback for every queued message without yielding,
            # so yield once to let the flusher sign and publish the batch now (else a busy
            # intake holds every batch until it is full: a latency of up to batch_max
            # decisions, not batch_delay_ms).
            self._close_now.set()
            await asyncio.sleep(0)

    async def run_flusher(self) -> None:
        """Sign and publish batches until :meth:`close`; returns once every intent taken
        by :meth:`on_intent` is published (or recorded as denied)."""
        delay_s = self._delay_s
        while True:
            if not self._batch:
                if self._closing:
                    return
                self._has_batch.clear()
                await self._has_batch.wait()
                continue
            if not self._close_now.is_set():
                left = delay_s - (time.monotonic() - self._batch_started)
                if left > 0:
                    try:
                        async with asyncio.timeout(left):
                            await self._close_now.wait()
                    except TimeoutError:
                        pass
            self._close_now.clear()
            batch, self._batch = self._batch, []
            self._room.set()
            await self._flush(batch)

    async def close(self) -> None:
        """Let the flusher publish what is pending, then stop (it returns)."""
        self._closing = True
        self._close_now.set()
        self._has_batch.set()

    async def _flush(self, batch: list[_Entry]) -> None:
        allowed = [e for e in batch if e.claims is not None]
        if allowed and self._batcher is not None:
            try:
                tokens = self._batcher.sign_batch(
                    [e.claims for e in allowed if e.claims is not None], now=self.clock()
                )
            # Synchronous and wrapped in SigningError by sign_batch: never a cancellation.
            except Exception as exc:
                log.exception("signing a batch of %d artifacts failed", len(allowed))
                self.counters.internal_errors += len(allowed)
                for e in allowed:
                    failed = deny(Reason.INTERNAL_ERROR, f"signing failed: {exc}", e.policies)
                    e.ev, e.claims = Evaluation(failed, e.ev.subject, e.ev.intent), None
            else:
                self.counters.artifact_batches += 1
                for e, token in zip(allowed, tokens, strict=True):
                    e.token = token
        for e in batch:
            try:
                await self._complete(e)
            except Exception:  # total: record a denial, never forward
                log.exception("handler failed for %s", e.msg.subject)
                await self._fail(e.msg, e.policies)

    # -- one intent ------------------------------------------------------------------

    async def _handle(self, msg: Msg, policies: PolicySetLike) -> None:
        entry = self._decide(msg, policies)
        if entry.claims is not None:
            try:
                entry.token = self.signer.sign(entry.claims)
            except Exception as exc:
                log.exception("signing failed for intent %s", entry.claims.intent_id)
                self.counters.internal_errors += 1
                failed = deny(Reason.INTERNAL_ERROR, f"signing failed: {exc}", policies)
                entry.ev = Evaluation(failed, entry.ev.subject, entry.ev.intent)
        await self._complete(entry)

    def _decide(self, msg: Msg, policies: PolicySetLike) -> _Entry:
        """Evaluate; for an allow, the artifact's claims (signed later)."""
        s = self.settings
        now = self.clock()
        headers = msg.headers
        ev = evaluate(
            msg.subject,
            msg.data,
            _header(headers, "content-type") if headers else None,
            policies,
            now=now,
            prefix=s.prefix,
            checks=s.checks,
            max_payload_bytes=s.max_payload_bytes,
            max_nesting_depth=s.max_nesting_depth,
            lineage=_core_lineage,
        )
        entry = _Entry(msg, ev, new_decision_id(), now, policies)
        if ev.decision.effect is Effect.ALLOW:
            intent, subject = ev.intent, ev.subject
            if intent is None or subject is None:  # an allow always has both; fail closed
                failed = deny(Reason.INTERNAL_ERROR, "allow without a decoded intent", policies)
                entry.ev = Evaluation(failed, subject, intent)
                return entry
            exec_subject = self._exec + msg.subject[self._in_prefix_len :]
            decision = ev.decision
            entry.exec_subject = exec_subject
            entry.claims = self.signer.build_claims(
                now=now,
                sub=subject.principal,
                aud=exec_subject,
                jti=entry.decision_id,
                action=subject.action,
                resource=intent.resource,
                intent_id=intent.id,
                payload=msg.data,
                policy_digest=decision.policy_digest,
                policy_version=decision.policy_version,
                rules=decision.rules,
                mode=decision.mode,
                would_deny=decision.would_deny,
                parents=intent.parents,
                lineage_root=subject.principal,
            )
        return entry

    async def _complete(self, e: _Entry) -> None:
        """Publish an entry's outputs: exec only with its signed artifact, else a record."""
        msg, ev = e.msg, e.ev
        if e.token:
            failure = await self._forward(e)
            if failure is None:
                self.counters.allowed += 1
                # The claims hold the payload's digest: the records need not hash it again.
                digest = e.claims.payload_sha256 if e.claims is not None else None
                if ev.decision.would_deny:
                    # Observe mode: operators see on the deny stream what enforcement
                    # would block; the record's effect says it was allowed.
                    self.counters.would_deny += 1
                    await self._publish_record(msg, ev, e.decision_id, e.now, digest)
                await self._reply(msg, ev, e.decision_id, e.now, digest)
                return
            ev = Evaluation(failure, ev.subject, ev.intent)
        await self._record(msg, ev, e.decision_id, e.now)

    async def _forward(self, e: _Entry) -> Decision | None:
        """Publish to exec; ``None`` when forwarded, else the denial to record."""
        out = forwarded_headers(e.msg.headers)
        decision_id = HeaderValue(e.decision_id)  # see HeaderValue: cheaper for nats-py
        out["Guard-Artifact"] = HeaderValue(e.token)
        out["Guard-Decision"] = decision_id
        out["Nats-Msg-Id"] = decision_id
        try:
            await self.nc.publish(e.exec_subject, e.msg.data, headers=out)
        except Exception as exc:
            log.exception("exec publish failed for %s", e.msg.subject)
            self.counters.publish_failures += 1
            return deny(Reason.INTERNAL_ERROR, f"exec publish failed: {exc}", e.policies)
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
        digest = payload_digest(msg.data)  # once for the record and the reply
        await self._publish_record(msg, ev, decision_id, now, digest)
        await self._reply(msg, ev, decision_id, now, digest)

    def _make_record(
        self,
        msg: Msg,
        ev: Evaluation,
        decision_id: str,
        now: float,
        digest: str | None,
        *,
        excerpt: int,
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
            payload_sha256=payload_digest(msg.data) if digest is None else digest,
            gateway=s.gateway_id,
            ts=now,
            **extra,
        )

    async def _publish_record(
        self, msg: Msg, ev: Evaluation, decision_id: str, now: float, digest: str | None = None
    ) -> None:
        # A hold keeps the whole payload: an approval forwards exactly those bytes later.
        held = ev.decision.effect is Effect.HOLD
        if ev.subject is not None:
            target = (self._hold if held else self._deny) + msg.subject[self._in_prefix_len :]
        else:
            target = self._deny + INVALID_TOKEN
        excerpt = self.settings.max_payload_bytes if held else self.settings.deny_payload_bytes
        record = self._make_record(msg, ev, decision_id, now, digest, excerpt=excerpt)
        try:
            await self.nc.publish(target, encode_record(record))
        except Exception:
            self.counters.publish_failures += 1
            log.exception("could not publish %s record for %s", ev.decision.effect, msg.subject)

    async def _reply(
        self, msg: Msg, ev: Evaluation, decision_id: str, now: float, digest: str | None = None
    ) -> None:
        if not msg.reply:
            return
        if not msg.reply.startswith(_REPLY_PREFIXES):
            self.counters.replies_refused += 1
            log.warning("refused reply to %r for %s", msg.reply, msg.subject)
            return
        # The reply omits the payload: the requester already has it.
        record = self._make_record(msg, ev, decision_id, now, digest, excerpt=0)
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
