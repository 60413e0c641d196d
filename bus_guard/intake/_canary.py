"""Canaries: known answers a running gateway checks on itself, on a schedule (README,
"Canaries").

A canary is a policy test case whose subject's principal is the reserved
``guard-canary`` (:data:`~bus_guard.policy._cases.CANARY_PRINCIPAL`); the active set's own
test cases say which there are and what they must give (a set whose cases fail never
became active). Without any, one built-in canary is run: an intent of ``guard-canary`` for
the action ``guard.canary``, which must be denied.

Every ``interval_s`` each canary goes through the gateway's whole path with the set it
decides with *now*: the intent bytes (``ts`` now) are decoded and authorized
(:func:`~bus_guard.pipeline.judge`), an allow is signed with the gateway's signer, the
outputs are built (:func:`~bus_guard.pipeline.outputs_of`) and published on the control
connection, to ``<prefix>.canary.<gateway id>`` (never to exec or deny: no executor, stream
or ledger sees a canary), received back, and an exec output's artifact is verified as an
executor would, with the JWKS the gateway published (:class:`~bus_guard.verify.LiveVerifier`),
against the exec subject it names. A wrong effect, reason or rules, an artifact that does
not verify, or an output that does not come back within ``timeout_s`` makes the gateway
not ready (:meth:`~bus_guard.intake._gateway.Gateway.hold_readiness`), is counted and
logged, and raises an alert: a denial record ``internal_error`` on
``<prefix>.deny.guard-canary.<action>`` naming the canary and what went wrong, where
operators watching denials see it. A round in which every canary passes makes it ready
again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from bus_guard.decision import new_decision_id
from bus_guard.errors import VerificationError
from bus_guard.intake._control import control_connection
from bus_guard.intake._gateway import Gateway, round_trip
from bus_guard.pipeline import (
    DecisionRecord,
    claims_of,
    decode,
    encode_record,
    judge,
    outcome_of,
    outputs_of,
)
from bus_guard.policy._cases import (
    CANARY_ACTION,
    CANARY_PRINCIPAL,
    Case,
    Suite,
    case_payload,
    compare,
    show,
    show_expect,
)
from bus_guard.settings import Settings
from bus_guard.signing._signer import Signer
from bus_guard.verify import DECISION_HEADER, LiveVerifier, Verifier, load_jwks, verify_message

__all__ = ("DEFAULT_CANARY", "Canary", "CanaryStatistics", "canary_on", "open_canary")

log = logging.getLogger(__name__)

_READINESS: Final = "canary"

DEFAULT_CANARY: Final = Suite.model_validate(
    {
        "cases": [
            {
                "name": "built-in canary: the reserved principal is denied",
                "subject": f"guard.in.{CANARY_PRINCIPAL}.{CANARY_ACTION}",
                "intent": {"id": "canary", "action": CANARY_ACTION, "resource": "canary"},
                "expect": {"effect": "deny"},
            }
        ]
    }
)


@dataclass(frozen=True, slots=True)
class CanaryStatistics:
    rounds: int  # rounds run
    passed: int  # canaries that gave the known answer, all the way
    failed: int  # canaries that did not (each alerted)
    ready: bool  # the last round passed
    last_failure: str = ""


class Canary:
    """Runs the active set's canaries through a gateway's path: see the module docstring."""

    def __init__(
        self,
        nc: Client,
        gateway: Gateway,
        signer: Signer,
        cases: Callable[[], tuple[tuple[Suite, Case], ...]],
        verifier: LiveVerifier | None,
        *,
        interval_s: float = 10.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        scheduled: bool = True,
    ) -> None:
        """*scheduled*: run a round at once and every *interval_s* while :meth:`running`
        (``False``: only when :meth:`run_round` is called)."""
        if not (math.isfinite(interval_s) and interval_s > 0 and timeout_s > 0):
            raise ValueError("the canary interval and timeout must be positive")
        self._nc = nc
        self._gateway = gateway
        self._signer = signer
        self._cases = cases
        self._verifier = verifier
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._scheduled = scheduled
        s = gateway.settings
        self._subject = s.subjects.subject("canary", s.gateway_id)
        self._back: dict[str, Msg] = {}
        self._arrived = anyio.Event()
        self._rounds = self._passed = self._failed = 0
        self._ready = True
        self._last_failure = ""

    def statistics(self) -> CanaryStatistics:
        return CanaryStatistics(
            self._rounds, self._passed, self._failed, self._ready, self._last_failure
        )

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Canary]:
        sub: Subscription | None = None
        try:
            sub = await self._nc.subscribe(self._subject, cb=self._on_back)
            await round_trip(self._nc)
        except Exception as exc:  # the bus is going: the rounds fail, and say so
            log.warning("canary: not subscribed to its outputs: %r", exc)
        try:
            async with anyio.create_task_group() as tg:
                if self._scheduled:
                    tg.start_soon(self._loop)
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            if sub is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await sub.unsubscribe()
                    except Exception:  # the connection may be gone already
                        log.debug("canary: unsubscribe failed", exc_info=True)

    async def _on_back(self, msg: Msg) -> None:
        decision = (msg.headers or {}).get(DECISION_HEADER) or (msg.headers or {}).get(
            "Nats-Msg-Id", ""
        )
        self._back[decision] = msg
        self._arrived.set()

    async def _loop(self) -> None:
        while True:
            await self.run_round()
            await anyio.sleep(self.interval_s)

    async def run_round(self) -> bool:
        """Every canary once, now; whether all passed (readiness follows)."""
        cases = self._cases() or tuple((DEFAULT_CANARY, c) for c in DEFAULT_CANARY.cases)
        failures = []
        for suite, case in cases:
            try:
                why = await self._check(suite, case)
            except Exception as exc:  # a bug or a lost connection is a failed canary
                why = f"{type(exc).__name__}: {exc}"
            if why is None:
                self._passed += 1
            else:
                self._failed += 1
                failures.append(why)
                await self._alert(suite, case, why)
        self._rounds += 1
        ready = not failures
        if ready != self._ready:
            log.log(
                logging.INFO if ready else logging.ERROR,
                "canary: %s",
                "all passed: ready again" if ready else "failed: not ready; " + "; ".join(failures),
            )
        self._ready = ready
        if failures:
            self._last_failure = failures[-1]
        self._gateway.hold_readiness(_READINESS, None if ready else "; ".join(failures))
        return ready

    async def _check(self, suite: Suite, case: Case) -> str | None:
        """``None`` if *case* gave its known answer through the whole path, else why not."""
        s = self._gateway.settings
        subject = case.subject.replace(f"{suite.prefix}.in.", f"{s.prefix}.in.", 1)
        now = self._clock()
        payload = case_payload(suite, case, now=now)
        policies = self._gateway.policies  # the set the intake decides with now
        decoded = decode(subject, payload, case.content_type, prefix=s.prefix)
        lineage = None if case.lineage is None else case.lineage.lineage()
        decision = judge(subject, decoded, policies, now=now, checks=s.checks, lineage=lineage)
        if (field := compare(case.expect, decision)) is not None:
            return (
                f"canary {case.name!r}: expected {show_expect(case.expect)}, got "
                f"{show(decision)} ({field} differs): {decision.message}"
            )
        decision_id = new_decision_id()
        outcome = outcome_of(
            decision_id, subject, payload, decoded, decision, gateway=s.gateway_id, now=now
        )
        if outcome.effect == "allow":
            claims = claims_of(
                outcome, issuer=self._signer.issuer, ttl_s=self._signer.ttl_s, subjects=s.subjects
            )
            outcome = msgspec.structs.replace(outcome, artifact=self._signer.sign(claims))
        outputs = outputs_of(
            outcome,
            payload,
            None,
            subjects=s.subjects,
            deny_payload_bytes=s.deny_payload_bytes,
            max_payload_bytes=s.max_payload_bytes,
        )
        role, target, data, headers = outputs[0]
        self._back.pop(decision_id, None)
        await self._nc.publish(self._subject, data, headers=dict(headers))
        with anyio.move_on_after(self.timeout_s):
            while decision_id not in self._back:
                self._arrived = anyio.Event()
                await self._arrived.wait()
        msg = self._back.pop(decision_id, None)
        if msg is None:
            return (
                f"canary {case.name!r}: its {role} output did not come back in {self.timeout_s:g}s"
            )
        if msg.data != data:
            return f"canary {case.name!r}: its {role} output came back changed"
        if role == "exec":
            try:
                await self._verify(target, msg)
            except VerificationError as exc:
                return f"canary {case.name!r}: its artifact does not verify: {exc}"
        return None

    async def _verify(self, exec_subject: str, msg: Msg) -> None:
        """As an executor would: with the JWKS the gateway published (without a bucket:
        its signing key's public half)."""
        if self._verifier is not None:
            await self._verifier.verify_message(
                subject=exec_subject, headers=msg.headers, payload=msg.data
            )
        else:
            own = Verifier(load_jwks(self._signer.jwks()))
            verify_message(own, subject=exec_subject, headers=msg.headers, payload=msg.data)

    async def _alert(self, suite: Suite, case: Case, why: str) -> None:
        """A denial record on the deny subject, where operators watch (never raises)."""
        s = self._gateway.settings
        action = case.subject.removeprefix(f"{suite.prefix}.in.{CANARY_PRINCIPAL}.")
        subject = s.subjects.intent(CANARY_PRINCIPAL, action)
        policies = self._gateway.policies
        record = DecisionRecord(
            decision_id=new_decision_id(),
            effect="deny",
            reason="internal_error",
            message=f"gateway {s.gateway_id} not ready: {why}",
            subject=subject,
            principal=CANARY_PRINCIPAL,
            action=action,
            policy_digest=policies.digest,
            policy_version=policies.version,
            mode=policies.mode,
            gateway=s.gateway_id,
            ts=self._clock(),
        )
        log.error("canary failed: %s", why)
        try:
            await self._nc.publish(s.subjects.output("deny", subject), encode_record(record))
        except Exception as exc:  # the bus is gone: the log line above is the alert
            log.warning("canary: the alert could not be published: %r", exc)


async def canary_on(
    nc: Client,
    settings: Settings,
    gateway: Gateway,
    signer: Signer,
    cases: Callable[[], tuple[tuple[Suite, Case], ...]],
    *,
    interval_s: float,
) -> Canary:
    """A :class:`Canary` on the control connection *nc* (opened before the gateway
    started), verifying with the JWKS bucket when there is one (else the signing key)."""
    verifier: LiveVerifier | None
    try:
        js = nc.jetstream(timeout=max(settings.connect_timeout_s, 2.0))
        verifier = LiveVerifier(
            await js.key_value(settings.subjects.streams.jwks_bucket), refresh_s=5.0
        )
        await verifier.refresh()
    except Exception as exc:  # no JetStream, no bucket: the signing key verifies
        log.info("canary: verifying with the signing key (no JWKS bucket: %r)", exc)
        verifier = None
    return Canary(nc, gateway, signer, cases, verifier, interval_s=interval_s)


@asynccontextmanager
async def open_canary(
    settings: Settings,
    gateway: Gateway,
    signer: Signer,
    cases: Callable[[], tuple[tuple[Suite, Case], ...]],
    *,
    interval_s: float,
) -> AsyncIterator[Canary]:
    """A running :class:`Canary` on a control connection of its own."""
    async with control_connection(settings, purpose="canary") as nc:
        canary = await canary_on(nc, settings, gateway, signer, cases, interval_s=interval_s)
        async with canary.running():
            yield canary
