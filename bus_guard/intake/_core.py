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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus_guard.decision import Decision, Lineage, Reason, new_decision_id
from bus_guard.intake._limits import Limited, LimitStore
from bus_guard.intake._retain import IntentRetainer
from bus_guard.intent import Intent, parse_subject, wire_safe
from bus_guard.pipeline import (
    Decoded,
    Outcome,
    PolicySetLike,
    Standing,
    claims_of,
    decision_record,
    decode_message,
    deny,
    failed,
    judge,
    outcome_of,
    outputs_of,
    reply_allowed,
    traceparent_of,
)
from bus_guard.settings import Settings
from bus_guard.signing import BatchSigner, Signer

__all__ = ("CoreCounters", "CoreIntake")

log = logging.getLogger(__name__)

# An allow with limits to spend: (decoded, decision, now), finished by CoreIntake._spend.
_ToSpend = tuple[Decoded, Decision, float]

_NO_LEDGER: Final = Lineage(violation="core mode keeps no ledger: parents cannot be checked")


def _set_artifact(outcome: Outcome, token: str) -> None:
    """Complete a fresh *outcome* with its signed artifact, in place.

    Only for an outcome this module has just built and handed to no one yet (the decision
    it carries is settled; the artifact is the last field written): an Outcome is frozen
    for everyone else. In place, not ``msgspec.structs.replace``: a copy of 31 fields and
    a second Outcome per allowed intent (callgrind: ~2.5k of ~850k cycles per intent)."""
    msgspec.structs.force_setattr(outcome, "artifact", token)


class CoreCounters(Protocol):
    received: int
    internal_errors: int
    publish_failures: int
    replies_sent: int
    replies_refused: int
    artifact_batches: int


# (principal, intent id) pairs a core-mode gateway remembers (~150 B each: ~40 MiB).
RECENT_INTENTS: Final = 262_144


class RecentIntents:
    """The (principal, intent id) pairs decided within the last *window_s*, at most
    *capacity* of them (beyond it the oldest are forgotten early, counted in ``evicted``):
    core mode's replay guard, per gateway process."""

    def __init__(self, window_s: float, capacity: int) -> None:
        self.window_s = window_s
        self.capacity = capacity
        self.evicted = 0
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def first(self, key: tuple[str, str], now: float) -> bool:
        """Whether *key* is new in the window (then it is remembered from *now*)."""
        seen, horizon = self._seen, now - self.window_s
        while seen:
            oldest = next(iter(seen.values()))
            if oldest > horizon:
                break
            seen.popitem(last=False)
        if key in seen:
            return False
        seen[key] = now
        if len(seen) > self.capacity:
            seen.popitem(last=False)
            self.evicted += 1
        return True


@dataclass
class CoreIntake:
    """The core-mode message path; :meth:`on_intent` is the subscription callback, and in
    batched mode :meth:`run_flusher` the one task that signs and publishes batches.

    Core mode is the pipeline's outputs without a ledger: each intent is decided
    (:func:`~bus_guard.pipeline.judge`), becomes an :class:`~bus_guard.pipeline.Outcome`
    with a fresh decision id, is signed if allowed, and its
    :func:`~bus_guard.pipeline.outputs_of` are published, exactly as stream mode publishes
    a recorded decision's."""

    nc: Client
    settings: Settings
    policies: Callable[[], PolicySetLike]
    signer: Signer
    clock: Callable[[], float]
    counters: CoreCounters
    on_decided: Callable[[Standing], None]
    limits: LimitStore | None = None  # None: an allow with limits is denied (cannot spend)
    # Retains every decided intent's bytes after its outputs (README, "Replay"); None: off.
    retainer: IntentRetainer | None = None

    def __post_init__(self) -> None:
        s = self.settings
        # Replays: an intent id decided here is denied for as long as its ts would still
        # be accepted (older ones are refused as expired anyway).
        self.recent = RecentIntents(
            s.checks.max_past_skew_s + s.checks.max_future_skew_s, RECENT_INTENTS
        )
        self.batched = s.artifacts == "batched"
        self.sub: Subscription | None = None  # set once subscribed: its queue tells idleness
        self._batcher = BatchSigner(self.signer, max_batch=s.batch_max) if self.batched else None
        self._batch: list[tuple[Msg, Outcome]] = []
        self._batch_started = 0.0  # monotonic time of the batch's first intent
        self._delay_s = s.batch_delay_ms / 1000
        self._has_batch = asyncio.Event()  # the batch is not empty
        self._close_now = asyncio.Event()  # full, intake idle, or closing: sign now
        self._room = asyncio.Event()  # the flusher took the batch
        self._closing = False

    async def on_intent(self, msg: Msg) -> None:
        self.counters.received += 1
        policies = self.policies()  # one read: a swap mid-message cannot mix bundles
        try:
            decided = self._decide(msg, policies)
            # An allow with limits (rare: an attribute test on the way) spends them first.
            outcome = (
                decided
                if isinstance(decided, Outcome)
                else await self._spend(msg, policies, *decided)
            )
        except Exception:  # total handler: a recorded denial, never a forward
            log.exception("handler failed for %s", msg.subject)
            self.counters.internal_errors += 1
            outcome = self._failure(msg, policies)
        if self.batched:
            await self._enqueue(msg, outcome)
            return
        if outcome.effect == "allow":
            outcome = self._sign(outcome)
        await self._complete(msg, outcome)

    # Core mode keeps no ledger: each outcome has a fresh decision id (new_decision_id).

    def _decide(self, msg: Msg, policies: PolicySetLike) -> Outcome | _ToSpend:
        s = self.settings
        now = self.clock()
        subject, data = msg.subject, msg.data
        decoded = decode_message(subject, data, msg.headers, s)
        parsed, intent = decoded
        if (
            isinstance(intent, Intent)
            and parsed is not None
            and not self.recent.first((parsed.principal, intent.id), now)
        ):
            decision = deny(
                Reason.REPLAY,
                f"intent {intent.id!r} of {parsed.principal!r} was decided by this gateway "
                f"in the last {self.recent.window_s:g} s",
                policies,
            )
            return outcome_of(
                new_decision_id(), subject, data, decoded, decision, gateway=s.gateway_id, now=now
            )
        lineage = _NO_LEDGER if isinstance(intent, Intent) and intent.parents else None
        decision = judge(subject, decoded, policies, now=now, checks=s.checks, lineage=lineage)
        if decision.limits:
            return (decoded, decision, now)
        return outcome_of(
            new_decision_id(),
            subject,
            data,
            decoded,
            decision,
            gateway=s.gateway_id,
            now=now,
            traceparent=traceparent_of(msg.headers) if msg.headers else "",
        )

    async def _spend(
        self, msg: Msg, policies: PolicySetLike, decoded: Decoded, decision: Decision, now: float
    ) -> Outcome:
        """An allow with limits: spent in the limit store first (the decision that stands
        may be rate_limited, budget_exceeded, or internal_error if the store cannot say)."""
        decision_id = new_decision_id()
        subject, intent = decoded
        assert subject is not None and isinstance(intent, Intent)  # an allow has both
        if self.limits is None:
            decision = deny(Reason.INTERNAL_ERROR, "limits unavailable: no limit store", policies)
        else:
            item = Limited(decision_id, decision, subject, intent, None)
            [decision] = await self.limits.settle([item], policies)
        s = self.settings
        return outcome_of(
            decision_id,
            msg.subject,
            msg.data,
            decoded,
            decision,
            gateway=s.gateway_id,
            now=now,
            traceparent=traceparent_of(msg.headers) if msg.headers else "",
        )

    def _failure(self, msg: Msg, policies: PolicySetLike) -> Outcome:
        s = self.settings
        decoded: Decoded = (parse_subject(msg.subject, s.prefix), None)
        decision = deny(Reason.INTERNAL_ERROR, "gateway handler failed", policies)
        return outcome_of(
            new_decision_id(),
            msg.subject,
            msg.data,
            decoded,
            decision,
            gateway=s.gateway_id,
            now=self.clock(),
            traceparent=traceparent_of(msg.headers) if msg.headers else "",
        )

    def _sign(self, outcome: Outcome) -> Outcome:
        signer = self.signer
        try:
            claims = claims_of(
                outcome, issuer=signer.issuer, ttl_s=signer.ttl_s, subjects=self.settings.subjects
            )
            token = signer.sign(claims)
        # Synchronous (and wrapped in SigningError by sign): never a cancellation.
        except Exception as exc:
            log.exception("signing failed for intent %s", outcome.intent_id)
            self.counters.internal_errors += 1
            return failed(outcome, f"signing failed: {exc}")
        msgspec.structs.force_setattr(outcome, "artifact", token)  # _set_artifact, inline
        return outcome

    # -- batched artifacts -----------------------------------------------------------

    async def _enqueue(self, msg: Msg, outcome: Outcome) -> None:
        # Every outcome joins the batch, allowed or not, to keep outputs in intake order.
        batch_max = self.settings.batch_max
        while len(self._batch) >= batch_max:  # bounded: wait for the flusher to take it
            self._room.clear()
            self._close_now.set()
            await self._room.wait()
        batch = self._batch
        batch.append((msg, outcome))
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

    def _sign_batch(self, batch: list[tuple[Msg, Outcome]]) -> list[tuple[Msg, Outcome]]:
        """*batch* with every allow signed, one tree head for all; a signing failure
        denies every allow of the batch ``internal_error``: nothing of it is forwarded."""
        allowed = [i for i, (_, o) in enumerate(batch) if o.effect == "allow"]
        if not allowed or self._batcher is None:
            return batch
        out = list(batch)
        try:
            signer, subjects = self.signer, self.settings.subjects
            claims = [
                claims_of(batch[i][1], issuer=signer.issuer, ttl_s=signer.ttl_s, subjects=subjects)
                for i in allowed
            ]
            tokens = self._batcher.sign_batch(claims, now=self.clock())
        # Synchronous and wrapped in SigningError by sign_batch: never a cancellation.
        except Exception as exc:
            log.exception("signing a batch of %d artifacts failed", len(allowed))
            self.counters.internal_errors += len(allowed)
            for i in allowed:
                msg, outcome = batch[i]
                out[i] = (msg, failed(outcome, f"signing failed: {exc}"))
            return out
        self.counters.artifact_batches += 1
        for i, token in zip(allowed, tokens, strict=True):
            msg, outcome = batch[i]
            _set_artifact(outcome, token)
            out[i] = (msg, outcome)
        return out

    async def _flush(self, batch: list[tuple[Msg, Outcome]]) -> None:
        for msg, outcome in self._sign_batch(batch):
            await self._complete(msg, outcome)

    # -- publishing ------------------------------------------------------------------

    async def _complete(self, msg: Msg, outcome: Outcome) -> None:
        """Publish an outcome's outputs, count it, reply. Total: never raises, and if the
        exec message cannot be handed to NATS the intent is denied instead."""
        try:
            outcome = await self._publish(msg, outcome)
        except Exception:  # a bug: record a denial, never forward
            log.exception("handler failed for %s", msg.subject)
            self.counters.internal_errors += 1
            outcome = failed(outcome, "gateway handler failed")
            await self._publish(msg, outcome)
        self.on_decided(outcome)
        if self.retainer is not None:
            await self._retain(msg, outcome, self.retainer)
        if msg.reply:
            await self._reply(msg, outcome)

    async def _retain(self, msg: Msg, outcome: Outcome, retainer: IntentRetainer) -> None:
        """Publish the retained intent, not waiting for its PubAck (core mode is at most
        once: so is its retention). Never raises."""
        out = retainer.retained(outcome, msg.data, msg.headers, self.policies())
        if out is None:
            return
        try:
            _, subject, data, headers = out
            await self.nc.publish(subject, data, headers=headers)
        except Exception:
            retainer.failures += 1
            log.exception("could not retain the intent of %s", outcome.decision_id)

    async def _publish(self, msg: Msg, outcome: Outcome) -> Outcome:
        """Publish the outputs; the outcome that stands afterwards."""
        s = self.settings
        # An unsigned allow (pipeline.unsigned_allow, inline: one call less per intent)
        # cannot happen: _sign and _sign_batch deny instead.
        if outcome.effect == "allow" and not outcome.artifact:
            self.counters.internal_errors += 1
        outputs = outputs_of(
            outcome,
            msg.data,
            msg.headers,
            subjects=s.subjects,
            deny_payload_bytes=s.deny_payload_bytes,
            max_payload_bytes=s.max_payload_bytes,
        )
        for role, subject, data, headers in outputs:
            try:
                await self.nc.publish(subject, data, headers=headers)
            except Exception as exc:
                self.counters.publish_failures += 1
                if role != "exec":
                    log.exception("could not publish %s record for %s", role, msg.subject)
                    continue
                log.exception("exec publish failed for %s", msg.subject)
                denied = failed(outcome, f"exec publish failed: {exc}")
                await self._publish(msg, denied)  # its deny record: no exec output left
                return denied
        return outcome

    async def _reply(self, msg: Msg, outcome: Outcome) -> None:
        if not msg.reply:
            return
        principal = outcome.principal or None
        if not reply_allowed(msg.reply, principal, inbox=self.settings.reply_inbox):
            self.counters.replies_refused += 1
            log.warning("refused reply to %r for %s", wire_safe(msg.reply), outcome.subject)
            return
        # The reply omits the payload: the requester already has it.
        data = decision_record(outcome, msg.data, 0)
        try:
            await self.nc.publish(msg.reply, data)
            self.counters.replies_sent += 1
        except Exception:
            self.counters.publish_failures += 1
            log.exception("could not reply to %s", msg.reply)
