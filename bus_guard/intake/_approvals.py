"""Approvals (stream mode): approvers' votes on holds, recorded; holds released or denied once.

Votes arrive on ``<prefix>.approve.<hold decision id>`` and are stored in the approve stream
(a work queue), pulled through a durable consumer shared by every replica, and acked only
once everything they cause is stored: a gateway killed anywhere in between leaves the vote
to be redelivered, and every step below is idempotent.

For one vote:

1. **read** the token (:func:`bus_guard.approval.read_approval`), find the hold's ledger
   record, and check, in this order: the vote is for that hold and its bytes; the key
   belongs to an approver the active policy names (and is not revoked); the signature; the
   approver is one the hold's rules accept; the hold is neither resolved nor expired.
   Anything wrong is a **refused vote**: a ledger decision (``deny`` with the reason) keyed
   by the vote message, published on the hold's deny subject (``<prefix>.deny.~invalid``
   when there is no hold to name);
2. **record** the vote under :func:`~bus_guard.decision.approval_decision_id` (hold,
   approver): created once, so an approver counts once on every replica; a second vote by
   the same approver is refused ``duplicate_approval`` (a redelivery of the same vote
   adopts its record instead);
3. **tally**: read each eligible approver's vote from the stream leader (every vote
   committed before this one's commit is seen): a rejection resolves the hold as denied
   ``rejected``; approvals reaching the quorum release it;
4. **resolve** under :func:`~bus_guard.decision.resolution_decision_id`: created once, so
   a hold is resolved exactly once whichever replica gets there first; the loser adopts
   the winner's record. A release forwards the held bytes (from the hold stream, checked
   against the hold's digest) to ``exec`` with an artifact whose claims name the hold and
   the votes counted; a rejection or expiry is published as a denial. Outputs carry the
   resolution's decision id as ``Nats-Msg-Id``: publishing them again stores nothing new.

Expiry: every ``hold_sweep_s`` the gateway reads the holds stored since the oldest open
one and resolves every unresolved hold past its ``expires`` as denied ``expired``.

Core mode keeps no ledger and does not take votes (README, "Approvals").
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from bus_guard.approval import ApprovalError, ReadApproval, check_signature, read_approval
from bus_guard.decision import (
    Effect,
    Reason,
    approval_decision_id,
    message_decision_id,
    resolution_decision_id,
)
from bus_guard.intake._jetstream import (
    Puller,
    Rejected,
    find_by_msg_id,
    first_seq_since,
    read,
)
from bus_guard.intake._publisher import OutputPublisher, not_yet_published
from bus_guard.intake._recorder import Recorder
from bus_guard.intake._work import intake_of
from bus_guard.intent import Intent
from bus_guard.ledger import LedgerRecord
from bus_guard.pipeline import (
    DecisionRecord,
    Outcome,
    PolicySetLike,
    decode_message,
    forwarded_headers,
    outputs_of,
    scope_of,
)
from bus_guard.policy._types import MAX_TTL_S
from bus_guard.settings import Settings
from bus_guard.verify import payload_digest

__all__ = ("ApprovalCounters", "Approvals", "approve_consumer")

log = logging.getLogger(__name__)

_HOLD_ID: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")
_PULL: Final = 16  # votes per pull: a human's pace; each is decided on its own
_HOLD_RECORD: Final = msgspec.json.Decoder(DecisionRecord)


@dataclass(slots=True)
class ApprovalCounters:
    votes: int = 0  # votes recorded (approve or reject)
    refused: int = 0  # votes refused (each a recorded denial)
    released: int = 0  # holds released at quorum (by this gateway)
    rejected: int = 0  # holds denied by a rejection
    expired: int = 0  # holds denied at expiry
    adopted: int = 0  # resolutions another replica (or an earlier attempt) recorded first
    forged: int = 0  # resolutions in the ledger that do not verify: never forwarded
    errors: int = 0  # votes nak'd after an error: redelivered


class _Refused(Exception):
    """A vote that changes nothing: recorded as a denial with *reason*."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.approver = ""  # who the vote claims to be, once its token could be read


class _Retry(Exception):
    """A vote that cannot be settled now (a lookup failed): nak'd, redelivered."""


@dataclass
class Approvals:
    """Stream mode's vote intake and hold sweeper; :meth:`run` until the gateway stops."""

    nc: Client
    settings: Settings
    recorder: Recorder
    publisher: OutputPublisher
    policies: Callable[[], PolicySetLike]
    clock: Callable[[], float]

    def __post_init__(self) -> None:
        s = self.settings
        self.counters = ApprovalCounters()
        self._streams = s.subjects.streams
        self._puller = Puller(
            self.nc,
            self._streams.approve,
            approve_consumer(s),
            batch=_PULL,
            expires_s=s.stream.fetch_timeout_s,
            heartbeat_s=s.stream.heartbeat_s,
        )
        self._swept_at = -float("inf")
        self._sweep_from = 1  # hold stream seq of the oldest hold that may still be open
        self._resolved: set[str] = set()  # holds known resolved (bounded, see _sweep)

    async def start(self) -> None:
        await self._puller.start()
        # Sweep only the holds that can still be open: none outlives the longest ttl a
        # policy may give (older ones are denied when a vote for them comes).
        s = self.settings
        since = self.clock() - MAX_TTL_S - 86400.0
        hold_stream, holds = self._streams.hold, s.subjects.wildcard("hold")
        try:
            first = await first_seq_since(
                self.nc, hold_stream, holds, since, timeout_s=s.stream.publish_timeout_s
            )
            if first == 0:  # none since: start after the last message of the stream
                info = await self.nc.jetstream().stream_info(hold_stream)
                first = info.state.last_seq + 1
        except Exception as exc:  # the first sweep then reads the whole hold stream
            log.warning("cannot find where the open holds start (%s); sweeping from 1", exc)
            first = 1
        self._sweep_from = max(1, first)

    async def stop(self) -> None:
        """Stop pulling votes (votes taken and not acked come back to a replica)."""
        try:
            await self._puller.stop()
        except Exception as exc:  # a closed connection has no subscription to end
            log.warning("stopping the vote intake: %s", exc)

    async def run(self, stop: anyio.Event) -> None:
        s = self.settings.stream
        while not stop.is_set():
            # First thing after a start (holds that expired while no gateway ran), then
            # every hold_sweep_s.
            if self.clock() - self._swept_at >= s.hold_sweep_s:
                try:
                    await self._sweep()
                except Exception:  # the next sweep tries again; nothing is released
                    log.exception("hold expiry sweep failed")
                self._swept_at = self.clock()
            msgs = await self._puller.pull(_PULL, s.fetch_timeout_s)
            for msg in msgs:
                await self._take(msg)

    # -- one vote --------------------------------------------------------------------

    async def _take(self, msg: Msg) -> None:
        try:
            await self.vote(msg)
        except Exception as exc:  # total: an unsettled vote comes back, nothing released
            self.counters.errors += 1
            if not isinstance(exc, _Retry):
                log.exception("vote on %r failed; it will be redelivered", msg.subject)
            else:
                log.warning("vote on %r not settled (%s); redelivered", msg.subject, exc)
            try:
                await msg.nak(delay=self.settings.stream.nak_delay_s)
            except Exception as nak_exc:
                log.warning("nak failed: %s", nak_exc)
            return
        await msg.ack()

    async def vote(self, msg: Msg) -> None:
        """Settle the vote in *msg*: recorded (and the hold resolved at quorum or on a
        rejection), or refused; raises if it cannot be settled now."""
        intake, _ = intake_of(msg)
        hold_id = msg.subject.rpartition(".")[2]
        hold: LedgerRecord | None = None
        try:
            if _HOLD_ID.fullmatch(hold_id) is None or msg.subject != self._subject(hold_id):
                raise _Refused(Reason.MALFORMED, "not a vote subject: <prefix>.approve.<hold id>")
            hold = await self._lookup(hold_id)
            if hold is None or hold.effect != Effect.HOLD.value:
                what = "no decision" if hold is None else f"a decision of effect {hold.effect}"
                hold = None
                raise _Refused(Reason.UNKNOWN_HOLD, f"{hold_id} is {what}, not a hold")
            token, approver = self._check(msg.data, hold_id, hold)
        except _Refused as refused:
            await self._refuse(intake, msg.data, hold_id, hold, refused)
            return
        vote = await self._record_vote(intake, msg.data, hold, token, approver)
        if vote is None:
            return
        await self._tally(hold)

    def _subject(self, hold_id: str) -> str:
        return self.settings.subjects.subject("approve", hold_id)

    def _check(self, body: bytes, hold_id: str, hold: LedgerRecord) -> tuple[ReadApproval, str]:
        """The token and the approver id, or :class:`_Refused` saying what is wrong."""
        try:
            token = read_approval(body)
        except ApprovalError as exc:
            raise _Refused(Reason.MALFORMED, str(exc)) from None
        try:
            return token, self._checked(token, hold_id, hold)
        except _Refused as refused:
            refused.approver = token.claims.approver  # as claimed: shown, never trusted
            raise

    def _checked(self, token: ReadApproval, hold_id: str, hold: LedgerRecord) -> str:
        claims = token.claims
        if claims.hold != hold_id:
            raise _Refused(Reason.MALFORMED, f"the vote names hold {claims.hold}, not {hold_id}")
        if claims.payload_sha256 != hold.payload_sha256:
            raise _Refused(Reason.MALFORMED, "the vote is for other bytes than the held intent's")
        found = self.policies().approver_key(token.kid)
        if found is None:
            raise _Refused(Reason.APPROVER_NOT_ALLOWED, f"key {token.kid} is no approver's")
        approver, entry = found
        if not entry.usable_at(self.clock()):
            raise _Refused(Reason.APPROVER_NOT_ALLOWED, f"key {token.kid} is revoked or expired")
        if not check_signature(token, entry.public_key):
            raise _Refused(Reason.BAD_SIGNATURE, f"signature does not verify with {token.kid}")
        if claims.approver not in (approver, token.kid):
            raise _Refused(
                Reason.APPROVER_NOT_ALLOWED,
                f"the vote claims approver {claims.approver}; key {token.kid} is {approver}'s",
            )
        if approver not in hold.approvers:
            raise _Refused(
                Reason.APPROVER_NOT_ALLOWED,
                f"{approver} is not among the hold's approvers {list(hold.approvers)}",
            )
        return approver

    async def _record_vote(
        self, intake: str, body: bytes, hold: LedgerRecord, token: ReadApproval, approver: str
    ) -> LedgerRecord | None:
        """The vote's record (recorded now, or by an earlier delivery of this message);
        ``None`` when it was refused instead."""
        prefix = self.settings.prefix
        vote_id = approval_decision_id(prefix, hold.decision_id, approver)
        existing = await self._lookup(vote_id)
        if existing is not None:
            if existing.intake == intake:
                return existing  # a redelivery: recorded before; the tally may not be
            await self._refuse(
                intake,
                body,
                hold.decision_id,
                hold,
                _duplicate(approver, hold.decision_id, existing.decision_id),
            )
            return None
        resolution = await self._lookup(resolution_decision_id(prefix, hold.decision_id))
        refusal = None
        if resolution is not None:
            forged = self._forged(resolution, hold)
            refusal = _Refused(
                Reason.HOLD_RESOLVED,
                f"{hold.decision_id} was resolved: {resolution.effect} ({resolution.reason})"
                if forged is None
                else f"{hold.decision_id} can no longer be resolved: its resolution id holds "
                f"a record that does not verify ({forged})",
            )
        elif hold.expires and self.clock() >= hold.expires:
            refusal = _Refused(Reason.EXPIRED, f"{hold.decision_id} expired")
        if refusal is not None:
            await self._refuse(intake, body, hold.decision_id, hold, refusal)
            if refusal.reason is Reason.EXPIRED:
                await self._resolve(hold, expired=True)
            return None
        verdict = token.claims.verdict
        effect, reason = (
            (Effect.APPROVE, Reason.APPROVED)
            if verdict == "approve"
            else (Effect.REJECT, Reason.REJECTED)
        )
        outcome = self._outcome(
            hold,
            vote_id,
            effect.value,
            reason,
            f"{approver} {verdict}s: {token.claims.reason}"
            if token.claims.reason
            else f"{approver} {verdict}s",
            parents=(hold.decision_id,),
            approver=approver,
        )
        result = await self.recorder.record_outcomes([outcome], [intake], self.clock())
        if isinstance(result, Rejected):  # taken meanwhile: another delivery or replica
            raise _Retry(f"vote {vote_id} was recorded concurrently")
        self.counters.votes += 1
        log.info("%s: %s %ss", hold.decision_id, approver, verdict)
        return result[0]

    async def _tally(self, hold: LedgerRecord) -> None:
        """Resolve *hold* if its votes say so (read from the stream leader)."""
        prefix = self.settings.prefix
        approvals: list[LedgerRecord] = []
        for approver in hold.approvers:
            vote = await self._lookup(
                approval_decision_id(prefix, hold.decision_id, approver), direct=False
            )
            if vote is None:
                continue
            if vote.effect == Effect.REJECT.value:
                await self._resolve(hold, rejection=vote)
                return
            if vote.effect == Effect.APPROVE.value:
                approvals.append(vote)
        if len(approvals) >= max(1, hold.quorum):
            await self._resolve(hold, approvals=approvals)

    # -- resolving a hold ------------------------------------------------------------

    async def _resolve(
        self,
        hold: LedgerRecord,
        *,
        approvals: Sequence[LedgerRecord] = (),
        rejection: LedgerRecord | None = None,
        expired: bool = False,
    ) -> None:
        """Record the hold's one resolution (or adopt the one recorded) and publish it."""
        prefix = self.settings.prefix
        resolution_id = resolution_decision_id(prefix, hold.decision_id)
        existing = await self._lookup(resolution_id)
        if existing is not None:
            await self._adopt(existing, hold)
            return
        payload = b""
        scope: dict[str, int | float] = {}
        headers: dict[str, str] = {}
        if approvals:
            held = await self._held_payload(hold)
            if held is None:
                outcome = self._outcome(
                    hold,
                    resolution_id,
                    Effect.DENY.value,
                    Reason.INTERNAL_ERROR,
                    "approved, but the held intent is not in the hold stream: not forwarded",
                    parents=hold.parents,
                    approvals=tuple(v.decision_id for v in approvals),
                )
            else:
                payload, scope, headers = held
                counted = tuple(sorted(v.approver for v in approvals))
                outcome = self._outcome(
                    hold,
                    resolution_id,
                    Effect.ALLOW.value,
                    Reason.APPROVED,
                    f"released: approved by {', '.join(counted)}",
                    parents=hold.parents,
                    approvals=tuple(v.decision_id for v in approvals),
                    scope=scope,
                )
        elif rejection is not None:
            outcome = self._outcome(
                hold,
                resolution_id,
                Effect.DENY.value,
                Reason.REJECTED,
                f"rejected by {rejection.approver}: {rejection.message}",
                parents=hold.parents,
                approvals=(rejection.decision_id,),
            )
        else:
            assert expired
            outcome = self._outcome(
                hold,
                resolution_id,
                Effect.DENY.value,
                Reason.EXPIRED,
                "hold expired before its quorum of approvals",
                parents=hold.parents,
            )
        intake = f"{self._streams.hold}/resolution/{hold.decision_id}"
        result = await self.recorder.record_outcomes([outcome], [intake], self.clock())
        if isinstance(result, Rejected):  # another replica resolved it first: adopt that
            existing = await self._lookup(resolution_id)
            if existing is None:
                raise _Retry(f"resolution {resolution_id} refused but not found")
            await self._adopt(existing, hold)
            return
        record = result[0]
        if record.effect == Effect.ALLOW.value:
            self.counters.released += 1
        elif record.reason == Reason.REJECTED.value:
            self.counters.rejected += 1
        elif record.reason == Reason.EXPIRED.value:
            self.counters.expired += 1
        log.info("hold %s resolved: %s (%s)", hold.decision_id, record.effect, record.reason)
        self._resolved.add(hold.decision_id)
        await self._publish(record, hold, payload, headers)

    async def _adopt(self, resolution: LedgerRecord, hold: LedgerRecord) -> None:
        """Publish the outputs of a resolution recorded before (by another replica, or by
        an attempt that did not finish): a release only if it verifies as the gateways'
        own. A forged one (whoever can write the ledger) is never forwarded; it holds the
        resolution's id, so the hold can no longer be resolved: logged and counted."""
        if self._forged(resolution, hold) is not None:
            return
        self.counters.adopted += 1
        await self._publish(resolution, hold)

    def _forged(self, resolution: LedgerRecord, hold: LedgerRecord) -> str | None:
        """Why the release *resolution* is not the gateways' own (logged and counted), or
        ``None``: a denial needs no signature (it can only deny), a release must verify."""
        if resolution.effect != Effect.ALLOW.value:
            return None
        why = self.recorder.parents.unverified(resolution)
        if why is None and resolution.hold != hold.decision_id:
            why = f"it releases {resolution.hold!r}, not {hold.decision_id}"
        if why is not None:
            self.counters.forged += 1
            log.error(
                "the resolution of hold %s does not verify (%s): nothing is forwarded, and "
                "the hold can no longer be resolved",
                hold.decision_id,
                why,
            )
        return why

    async def _held_payload(
        self, hold: LedgerRecord
    ) -> tuple[bytes, dict[str, int | float], dict[str, str]] | None:
        """The held intent's exact bytes, its scope and the headers it came with (those an
        allow forwards), from the hold stream: ``None`` if the bytes are not there intact."""
        s = self.settings
        stored = await find_by_msg_id(
            self.nc,
            self._streams.hold,
            s.subjects.output("hold", hold.subject),
            hold.decision_id,
            since=hold.ts - 60.0,
            until=self.clock() + 60.0,
            timeout_s=s.stream.publish_timeout_s,
        )
        if stored is None:
            return None
        try:
            held = _HOLD_RECORD.decode(stored.data)
        except msgspec.DecodeError:
            return None
        if held.payload_truncated:
            return None
        if held.payload is not None:
            payload = held.payload.encode("utf-8")
        elif held.payload_b64 is not None:
            payload = base64.b64decode(held.payload_b64)
        else:
            return None
        if payload_digest(payload) != hold.payload_sha256:
            return None
        headers = forwarded_headers(held.headers)
        _, intent = decode_message(hold.subject, payload, headers or None, s)
        scope = scope_of(intent.params) if isinstance(intent, Intent) else {}
        return payload, scope, headers

    async def _publish(
        self,
        record: LedgerRecord,
        hold: LedgerRecord,
        payload: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish a resolution's outputs (stored once: ``Nats-Msg-Id`` is its id); a
        release forwards the held bytes with the headers the intent came with."""
        s = self.settings
        if record.effect == Effect.ALLOW.value and not payload:
            held = await self._held_payload(hold)
            if held is None:
                raise _Retry(f"the held intent of {hold.decision_id} is not in the hold stream")
            payload, _, headers = held
        outs = outputs_of(
            record,
            payload,
            headers or None,
            subjects=s.subjects,
            deny_payload_bytes=s.deny_payload_bytes,
            max_payload_bytes=s.max_payload_bytes,
        )
        if self.clock() - record.ts > s.stream.retry_horizon_s:
            # Beyond de-duplication's window: look for the first copy before sending again.
            outs = await not_yet_published(
                self.nc, self._streams.exec, record.decision_id, record.ts, outs, now=self.clock()
            )
        published = await self.publisher.publish([outs])
        if not published.stored[0]:
            raise _Retry(f"outputs of {record.decision_id} not stored")

    async def _refuse(
        self,
        intake: str,
        body: bytes,
        hold_id: str,
        hold: LedgerRecord | None,
        refused: _Refused,
    ) -> None:
        """Record a refused vote (keyed by its message) and publish its denial."""
        s = self.settings
        decision_id = message_decision_id(s.prefix, intake)
        existing = await self._lookup(decision_id)
        if existing is None:
            parents = (hold_id,) if _HOLD_ID.fullmatch(hold_id) else ()
            outcome = self._outcome(
                hold,
                decision_id,
                Effect.DENY.value,
                refused.reason,
                refused.message,
                parents=parents,
                hold_id=hold_id if hold is not None else "",
                payload=body,
                approver=refused.approver,
            )
            result = await self.recorder.record_outcomes([outcome], [intake], self.clock())
            if isinstance(result, Rejected):
                raise _Retry(f"refusal {decision_id} was recorded concurrently")
            existing = result[0]
            self.counters.refused += 1
            log.warning("vote refused (%s): %s", refused.reason.value, refused.message)
        outs = outputs_of(
            existing,
            body,
            None,
            subjects=s.subjects,
            deny_payload_bytes=s.deny_payload_bytes,
            max_payload_bytes=s.max_payload_bytes,
        )
        published = await self.publisher.publish([outs])
        if not published.stored[0]:
            raise _Retry(f"denial of vote {decision_id} not stored")

    def _outcome(
        self,
        hold: LedgerRecord | None,
        decision_id: str,
        effect: str,
        reason: Reason,
        message: str,
        *,
        parents: tuple[str, ...],
        approver: str = "",
        approvals: tuple[str, ...] = (),
        scope: dict[str, int | float] | None = None,
        hold_id: str | None = None,
        payload: bytes = b"",
    ) -> Outcome:
        """A vote's or resolution's outcome: the held intent's fields, this decision's."""
        policies = self.policies()
        h = hold
        return Outcome(
            decision_id,
            effect,
            reason.value,
            message,
            h.rules if h is not None else (),
            policies.digest,
            policies.version,
            policies.mode,
            False,
            h.subject if h is not None else "",
            h.principal if h is not None else "",
            h.action if h is not None else "",
            h.resource if h is not None else "",
            h.intent_id if h is not None else "",
            h.payload_sha256 if h is not None else payload_digest(payload),
            parents,
            h.lineage_depth if h is not None else 0,
            h.lineage_root if h is not None else "",
            h.labels if h is not None else (),
            self.settings.gateway_id,
            self.clock(),
            scope=scope or {},
            hold=(h.decision_id if h is not None else "") if hold_id is None else hold_id,
            approver=approver,
            approvals=approvals,
        )

    async def _lookup(self, decision_id: str, *, direct: bool = True) -> LedgerRecord | None:
        try:
            return await self.recorder.lookup(decision_id, direct=direct)
        except msgspec.DecodeError:
            return None  # not a record: as good as unknown (the audit says why)
        except Exception as exc:
            raise _Retry(f"ledger lookup of {decision_id} failed: {exc!r}") from exc

    # -- expiry ----------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Deny every unresolved hold past its expiry; remember where open holds start."""
        s = self.settings
        now = self.clock()
        oldest_open: int | None = None
        last = self._sweep_from - 1
        async for stored in read(
            self.nc,
            self._streams.hold,
            s.subjects.wildcard("hold"),
            start_seq=self._sweep_from,
            timeout_s=s.stream.publish_timeout_s,
        ):
            last = stored.seq
            try:
                held = _HOLD_RECORD.decode(stored.data)
            except msgspec.DecodeError:
                continue
            hold_id = held.decision_id
            # A hold without an expiry (held under a policy set that gave it no terms)
            # never expires: it must not keep every later sweep reading from it.
            if held.effect != Effect.HOLD.value or hold_id in self._resolved or not held.expires:
                continue
            if now < held.expires:
                oldest_open = stored.seq if oldest_open is None else oldest_open
                continue
            if await self._lookup(resolution_decision_id(s.prefix, hold_id)) is None:
                hold = await self._lookup(hold_id)
                if hold is not None and hold.effect == Effect.HOLD.value:
                    await self._resolve(hold, expired=True)
            self._resolved.add(hold_id)
        self._sweep_from = oldest_open if oldest_open is not None else last + 1
        if len(self._resolved) > 100_000:
            self._resolved.clear()


def _duplicate(approver: str, hold_id: str, first: str) -> _Refused:
    refused = _Refused(
        Reason.DUPLICATE_APPROVAL, f"{approver} already voted on {hold_id} ({first})"
    )
    refused.approver = approver
    return refused


def approve_consumer(settings: Settings) -> str:
    """The durable consumer every replica pulls votes from (preflight creates it)."""
    return f"{settings.queue}-approve"
