"""The gateway: the only module that talks to NATS.

NATS in → decode → authorize → sign → publish (exec | deny | hold) → reply.

Core intake mode: a queue-group subscription on ``<prefix>.in.>``, at-most-once like core
NATS itself. The handler is total: nats-py hands callback exceptions to ``error_cb``, which
only logs, so every path here catches, counts and records a denial. Nothing is forwarded
to ``exec`` unless the decision is ``allow`` *and* its artifact was signed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import anyio
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .api import Evaluation, evaluate
from .artifacts import Signer, payload_digest
from .authorize import PolicySetLike, deny
from .decision import Decision, Effect, Reason
from .errors import GatewayError
from .messages import (
    DecisionRecord,
    encode_record,
    new_decision_id,
    parse_subject,
    payload_excerpt,
)
from .settings import Settings
from .state import State
from .verify import ArtifactClaims

__all__ = ("Gateway", "GatewayStatistics", "round_trip")

log = logging.getLogger(__name__)

INVALID_TOKEN: Final = "~invalid"  # deny-subject token for intents on a malformed subject
_UNTRUSTED: Final = ("nats-", "guard-")
# Replies go only to inboxes: a reply subject is chosen by the agent, and the gateway's
# credentials could otherwise be used to publish into exec/deny or the $JS API.
# ``_R_.`` is the alias the server substitutes for replies that cross accounts (the
# compose/ topology); clients cannot forge it.
_REPLY_PREFIXES: Final = ("_INBOX.", "_R_.")


@dataclass(frozen=True, slots=True)
class GatewayStatistics:
    received: int = 0
    allowed: int = 0
    denied: int = 0
    held: int = 0
    would_deny: int = 0
    internal_errors: int = 0  # handler or signing failures, each recorded as a denial
    publish_failures: int = 0  # outputs that could not be handed to NATS
    replies_sent: int = 0
    replies_refused: int = 0  # reply subjects outside the allowed inbox prefixes
    slow_consumer_drops: int = 0  # intents the server or client dropped: never decided
    reconnects: int = 0


@dataclass(slots=True)
class _Counters:
    received: int = 0
    allowed: int = 0
    denied: int = 0
    held: int = 0
    would_deny: int = 0
    internal_errors: int = 0
    publish_failures: int = 0
    replies_sent: int = 0
    replies_refused: int = 0
    slow_consumer_drops: int = 0
    reconnects: int = 0


class Gateway:
    """One gateway process's worth of intake. An async context manager.

    Entering connects, subscribes and confirms the subscription with the server (ready);
    leaving drains: intents already received are decided before the connection closes.
    ``closed`` is set when the connection is gone for good (the reconnect budget ran out).
    """

    def __init__(
        self,
        settings: Settings,
        policies: PolicySetLike,
        signer: Signer,
        *,
        state: State | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._policies = policies
        self._signer = signer
        self._state = state if state is not None else State()
        self._clock = clock
        self._nc: Client | None = None
        self._sub: Subscription | None = None
        self._counters = _Counters()
        self._closing = False
        self.closed = anyio.Event()
        p = settings.prefix
        self._in_prefix_len = len(p) + 4  # "<prefix>.in."
        self._exec, self._deny, self._hold = f"{p}.exec.", f"{p}.deny.", f"{p}.hold."

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        s = self.settings
        try:
            self._nc = await nats.connect(
                [u.strip() for u in s.nats_url.split(",") if u.strip()],
                name=f"bus-guard {s.gateway_id}",
                user_credentials=s.creds_file,
                connect_timeout=max(1, round(s.connect_timeout_s)),
                reconnect_time_wait=s.reconnect_wait_s,
                max_reconnect_attempts=s.max_reconnect_attempts,
                drain_timeout=max(1, round(s.drain_timeout_s)),
                error_cb=self._on_error,
                closed_cb=self._on_closed,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        except Exception as exc:
            raise GatewayError(f"cannot connect to {s.nats_url}: {exc}") from exc
        try:
            self._sub = await self._nc.subscribe(
                f"{s.prefix}.in.>",
                queue=s.queue,
                cb=self._on_intent,
                pending_msgs_limit=s.pending_msgs_limit,
                pending_bytes_limit=s.pending_bytes_limit,
            )
            await round_trip(self._nc, timeout_s=s.connect_timeout_s)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._nc.close()
            raise
        log.info("gateway %s ready on %s.in.> (queue %s)", s.gateway_id, s.prefix, s.queue)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drain: stop taking intents, decide those received, flush outputs, close."""
        nc = self._nc
        if nc is None or self._closing:
            return
        self._closing = True  # the handler keeps its connection while draining
        with anyio.CancelScope(shield=True):
            if not nc.is_closed:
                try:
                    # One round trip first: everything the server routed to us before it
                    # is then read into the pending queue, which drain() processes. Without
                    # it nats-py's drain was seen to close with routed intents unread.
                    with anyio.move_on_after(self.settings.drain_timeout_s):
                        await round_trip(nc)
                    await nc.drain()
                except Exception:
                    log.exception("drain failed; closing")
                    await nc.close()
        log.info("gateway %s stopped: %s", self.settings.gateway_id, self.statistics())

    def statistics(self) -> GatewayStatistics:
        return GatewayStatistics(**dataclasses.asdict(self._counters))

    @property
    def policies(self) -> PolicySetLike:
        return self._policies

    def swap_policies(self, policies: PolicySetLike) -> None:
        """Replace the active policy set; each message reads the reference once (atomic)."""
        self._policies = policies

    # -- connection events -----------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self._counters.slow_consumer_drops += 1
            log.warning("slow consumer: intent on %s dropped undecided", exc.subject)
        else:
            log.warning("nats error: %s", exc)

    async def _on_closed(self) -> None:
        self.closed.set()

    async def _on_disconnected(self) -> None:
        log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self._counters.reconnects += 1
        log.info("reconnected to NATS")

    # -- the message path ------------------------------------------------------------

    async def _on_intent(self, msg: Msg) -> None:
        self._counters.received += 1
        policies = self._policies  # one read: a swap mid-message cannot mix bundles
        try:
            await self._handle(msg, policies)
        except Exception:  # total handler: record a denial, never forward
            log.exception("handler failed for %s", msg.subject)
            self._counters.internal_errors += 1
            try:
                failed = deny(Reason.INTERNAL_ERROR, "gateway handler failed", policies)
                ev = Evaluation(failed, parse_subject(msg.subject, self.settings.prefix), None)
                await self._record(msg, ev, new_decision_id(), self._clock())
            except Exception:
                self._counters.publish_failures += 1
                log.exception("could not record the denial for %s", msg.subject)

    async def _handle(self, msg: Msg, policies: PolicySetLike) -> None:
        s = self.settings
        now = self._clock()
        headers = msg.headers
        ev = evaluate(
            msg.subject,
            msg.data,
            _header(headers, "content-type") if headers else None,
            policies,
            self._state,
            now=now,
            prefix=s.prefix,
            checks=s.checks,
            max_payload_bytes=s.max_payload_bytes,
            max_nesting_depth=s.max_nesting_depth,
        )
        decision_id = new_decision_id()
        if ev.decision.effect is Effect.ALLOW:
            failure = await self._forward(msg, ev, decision_id, now, policies)
            if failure is None:
                self._counters.allowed += 1
                if ev.decision.would_deny:
                    # Observe mode: operators see on the deny stream what enforcement
                    # would block; the record's effect says it was allowed.
                    self._counters.would_deny += 1
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
            token = self._signer.sign(
                ArtifactClaims(
                    iss=self._signer.issuer,
                    sub=subject.principal,
                    aud=exec_subject,
                    iat=int(now),
                    nbf=int(now),
                    exp=int(now + self._signer.ttl_s),
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
            self._counters.internal_errors += 1
            return deny(Reason.INTERNAL_ERROR, f"signing failed: {exc}", policies)
        out = _forwarded_headers(msg.headers)
        out["Guard-Artifact"] = token
        out["Guard-Decision"] = decision_id
        out["Nats-Msg-Id"] = decision_id
        try:
            assert self._nc is not None
            await self._nc.publish(exec_subject, msg.data, headers=out)
        except Exception as exc:
            log.exception("exec publish failed for intent %s", intent.id)
            self._counters.publish_failures += 1
            return deny(Reason.INTERNAL_ERROR, f"exec publish failed: {exc}", policies)
        return None

    async def _record(self, msg: Msg, ev: Evaluation, decision_id: str, now: float) -> None:
        """Publish a deny or hold record (and the reply): never an allow."""
        if ev.decision.effect is Effect.ALLOW:  # an allow reaches here only without artifact
            failed = deny(Reason.INTERNAL_ERROR, "allow without artifact", self._policies)
            ev = Evaluation(failed, ev.subject, ev.intent)
        if ev.decision.effect is Effect.HOLD:
            self._counters.held += 1
        else:
            self._counters.denied += 1
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
        assert self._nc is not None
        # A hold keeps the whole payload: an approval forwards exactly those bytes later.
        held = ev.decision.effect is Effect.HOLD
        if ev.subject is not None:
            target = (self._hold if held else self._deny) + msg.subject[self._in_prefix_len :]
        else:
            target = self._deny + INVALID_TOKEN
        excerpt = self.settings.max_payload_bytes if held else self.settings.deny_payload_bytes
        record = self._make_record(msg, ev, decision_id, now, excerpt=excerpt)
        try:
            await self._nc.publish(target, encode_record(record))
        except Exception:
            self._counters.publish_failures += 1
            log.exception("could not publish %s record for %s", ev.decision.effect, msg.subject)

    async def _reply(self, msg: Msg, ev: Evaluation, decision_id: str, now: float) -> None:
        if not msg.reply:
            return
        if not msg.reply.startswith(_REPLY_PREFIXES):
            self._counters.replies_refused += 1
            log.warning("refused reply to %r for %s", msg.reply, msg.subject)
            return
        assert self._nc is not None
        # The reply omits the payload: the requester already has it.
        record = self._make_record(msg, ev, decision_id, now, excerpt=0)
        try:
            await self._nc.publish(msg.reply, encode_record(record))
            self._counters.replies_sent += 1
        except Exception:
            self._counters.publish_failures += 1
            log.exception("could not reply to %s", msg.reply)


async def round_trip(nc: Client, *, timeout_s: float = 5.0) -> None:
    """A barrier: when it returns, the server has processed everything sent before it.

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands still
    in the client's pending buffer, so one PONG does not prove a SUB or PUB arrived. The
    first flush yields to the flusher task (which writes the buffer); the second PING then
    follows everything buffered before the call.
    """
    timeout = max(1, round(timeout_s))
    await nc.flush(timeout=timeout)
    await nc.flush(timeout=timeout)


def _header(headers: dict[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _forwarded_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """Inbound ``Nats-*`` and ``Guard-*`` headers are never trusted nor forwarded."""
    if not headers:
        return {}
    return {k: v for k, v in headers.items() if not k.lower().startswith(_UNTRUSTED)}
