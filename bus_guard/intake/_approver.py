"""The approver's side of approvals (SPEC §10): list the open holds, vote on one.

:func:`approve` and :func:`reject` look the hold up in the ledger, sign an approval token
(:mod:`bus_guard.approval`) over the hold's decision id and the held payload's digest, and
store it with a JetStream publish on ``<prefix>.approve.<hold id>``: the PubAck says the
approve stream holds it, and the gateway takes it from there. It verifies the token against
the approvers the policy names, records the vote as a decision whose parent is the hold,
and releases or denies the hold. Before signing anything they refuse
(:class:`~bus_guard.errors.ApprovalRefused`) what the ledger already shows the gateway
would refuse: an id that is no hold, a hold resolved or expired, an approver the hold does
not name, a second vote by the same approver.

:func:`open_holds` lists the holds not yet resolved: the hold stream within a time window,
each hold's ledger record (approvers, quorum, expiry), its votes and its resolution.

The ledger is read with direct gets only (no consumer), so an approver's credentials need
no more than: publish on ``<prefix>.approve.>``, ``$JS.API.DIRECT.GET`` on the ledger and
hold streams, and (for ``wait_s``) subscribe to ``<prefix>.ledger.*.d.*``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Final, cast

import anyio
import msgspec
import nats
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from bus_guard.approval import ApprovalClaims, ApprovalError, Verdict, read_approval, sign_approval
from bus_guard.decision import Reason, approval_decision_id, resolution_decision_id
from bus_guard.errors import ApprovalRefused, GatewayError
from bus_guard.intake._gateway import round_trip
from bus_guard.intake._jetstream import first_seq_since, last_by_subject, read
from bus_guard.ledger._records import DECISION, LedgerRecord, Stored, decode_record
from bus_guard.pipeline import DecisionRecord
from bus_guard.signing._keys import kid_for
from bus_guard.subjects import DEFAULT_PREFIX, Subjects

__all__ = (
    "Holds",
    "OpenHold",
    "Vote",
    "approve",
    "check_vote",
    "open_holds",
    "reject",
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S: Final = 5.0
# A decision id is one subject token: the gateway's are 26 Crockford base32 characters.
_DECISION_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_TOKEN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ACTION: Final = re.compile(r"(?:[A-Za-z0-9_-]+|\*)(?:\.(?:[A-Za-z0-9_-]+|\*))*(?:\.>)?|>")
_PLACEHOLDER_DIGEST: Final = "A" * 43
_hold_decoder: Final = msgspec.json.Decoder(DecisionRecord)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _claims(
    hold: str, digest: str, approver: str, verdict: Verdict, reason: str, iat: float
) -> ApprovalClaims:
    """The claims, checked as the gateway's reader checks them (``msgspec.convert``
    applies the field constraints a constructor call does not)."""
    fields = {
        "hold": hold,
        "payload_sha256": digest,
        "approver": approver,
        "verdict": verdict,
        "iat": iat,
        "reason": reason,
    }
    try:
        return msgspec.convert(fields, ApprovalClaims)
    except msgspec.ValidationError as exc:
        raise ValueError(f"cannot make an approval token: {exc}") from None


def check_vote(decision_id: str, approver: str, reason: str = "") -> None:
    """:class:`ValueError` if a vote on *decision_id* by *approver* with *reason* could not
    be made into a token (what :func:`approve` checks before any I/O)."""
    if not _DECISION_ID.fullmatch(decision_id):
        raise ValueError(f"{decision_id!r} is not a decision id (1-128 of A-Z a-z 0-9 _ -)")
    _claims(decision_id, _PLACEHOLDER_DIGEST, approver, "approve", reason, 0.0)


@dataclass(frozen=True, slots=True)
class Vote:
    """A vote stored in the approve stream, and what the gateway made of it if waited for."""

    token: str  # the compact JWS published (the message body)
    claims: ApprovalClaims
    kid: str  # of the approver's key
    subject: str  # <prefix>.approve.<hold id>
    stream: str  # the stream that stored it (PubAck) ...
    seq: int  # ... and where
    hold: LedgerRecord  # the hold's ledger record, as looked up before signing
    # With ``wait_s``: the gateway's record of the vote (effect approve / reject, or deny
    # when it refused it, with the reason) and the hold's resolution if there is one yet.
    recorded: LedgerRecord | None = None
    resolution: LedgerRecord | None = None


async def approve(
    nc: Client,
    decision_id: str,
    key: Ed25519PrivateKey,
    *,
    approver: str | None = None,
    reason: str = "",
    prefix: str = DEFAULT_PREFIX,
    wait_s: float = 0.0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Vote:
    """Approve the hold *decision_id*: sign a vote with *key* and store it.

    *approver* is the ``approver`` claim, by default the key's ``kid`` (the gateway maps a
    kid to the approver the policy names; the policy's id works too). With *wait_s*, wait
    that long for the gateway's record of the vote (:attr:`Vote.recorded`).

    Raises :class:`ValueError` (the id, approver or reason cannot make a token),
    :class:`~bus_guard.errors.ApprovalRefused` (no open hold this approver can vote on;
    nothing published) and :class:`~bus_guard.errors.GatewayError` (no ledger or approve
    stream, no answer: the vote may then be stored or not).
    """
    return await _vote(nc, decision_id, key, "approve", approver, reason, prefix, wait_s, timeout_s)


async def reject(
    nc: Client,
    decision_id: str,
    key: Ed25519PrivateKey,
    *,
    approver: str | None = None,
    reason: str = "",
    prefix: str = DEFAULT_PREFIX,
    wait_s: float = 0.0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Vote:
    """Reject the hold *decision_id*; as :func:`approve` otherwise."""
    return await _vote(nc, decision_id, key, "reject", approver, reason, prefix, wait_s, timeout_s)


async def _vote(
    nc: Client,
    decision_id: str,
    key: Ed25519PrivateKey,
    verdict: Verdict,
    approver: str | None,
    reason: str,
    prefix: str,
    wait_s: float,
    timeout_s: float,
) -> Vote:
    kid = kid_for(key.public_key())
    who = kid if approver is None else approver
    check_vote(decision_id, who, reason)
    subjects = Subjects(prefix)
    ledger = _Ledger(nc.jetstream(timeout=timeout_s), subjects)
    hold = await _open_hold(ledger, decision_id, who, kid)
    claims = _claims(decision_id, hold.payload_sha256, who, verdict, reason, time.time())
    token = sign_approval(key, kid, claims)
    try:
        read_approval(token.encode("ascii"))  # never publish what the gateway cannot read
    except ApprovalError as exc:
        raise ValueError(f"cannot make an approval token: {exc}") from None
    subject = subjects.subject("approve", decision_id)
    watch = _VoteWatch(subjects, decision_id, who) if wait_s > 0 else None
    if watch is not None:
        await watch.start(nc)
    try:
        stream, seq = await _publish(ledger.js, subject, token, subjects, timeout_s)
        vote = Vote(token, claims, kid, subject, stream, seq, hold)
        if watch is None:
            return vote
        started = time.monotonic()
        recorded = await watch.recorded(stream, seq, wait_s)
        if recorded is not None and await _completes(ledger, hold, recorded):
            # the gateway records the resolution right after the vote that completes it
            await watch.resolved(max(0.0, wait_s - (time.monotonic() - started)))
    finally:
        if watch is not None:
            await watch.stop()
    if recorded is None:
        return vote
    resolution = watch.resolution
    if resolution is None:
        try:
            resolution = await ledger.get(resolution_decision_id(prefix, decision_id))
        except GatewayError as exc:  # the vote is stored and recorded: say that much
            log.warning("cannot look up the resolution of hold %s: %s", decision_id, exc)
    return Vote(token, claims, kid, subject, stream, seq, hold, recorded, resolution)


async def _publish(
    js: JetStreamContext, subject: str, token: str, subjects: Subjects, timeout_s: float
) -> tuple[str, int]:
    stream = subjects.streams.approve
    try:
        ack = await js.publish(subject, token.encode("ascii"), timeout=timeout_s)
    except nats.js.errors.NoStreamResponseError:
        raise GatewayError(
            f"no stream stores {subject}: votes need the {stream} stream, which a stream-mode "
            f"gateway with prefix {subjects.prefix!r} creates"
        ) from None
    except nats.js.errors.APIError as exc:
        raise GatewayError(f"the vote was refused by the stream: {exc.description}") from None
    except nats.errors.TimeoutError:
        raise GatewayError(
            f"no acknowledgement within {timeout_s:g}s: the vote may or may not be stored "
            "(`bus-guard holds` shows the votes counted)"
        ) from None
    except nats.errors.Error as exc:
        raise GatewayError(f"publishing the vote failed: {exc}") from None
    return ack.stream, ack.seq


class _Ledger:
    """Decision records by id, from the ledger stream (direct gets)."""

    def __init__(self, js: JetStreamContext, subjects: Subjects) -> None:
        self.js = js
        self.prefix = subjects.prefix
        self.stream = subjects.streams.ledger
        self._subjects = subjects.ledger()

    async def get(self, decision_id: str) -> LedgerRecord | None:
        """The record of *decision_id*, ``None`` if there is none; GatewayError if the
        ledger cannot be read."""
        try:
            stored = await last_by_subject(
                self.js, self.stream, self._subjects.any_decision(decision_id)
            )
        except nats.errors.NoRespondersError:
            raise GatewayError(
                f"no ledger stream {self.stream} answers: holds are recorded by stream-mode "
                f"gateways with prefix {self.prefix!r}"
            ) from None
        except nats.errors.Error as exc:
            raise GatewayError(f"cannot read the ledger {self.stream}: {exc!r}") from None
        if stored is None:
            return None
        try:
            record = decode_record(stored.data)
        except msgspec.DecodeError:
            log.warning("ledger message %d is not a record; ignored", stored.seq)
            return None
        if record.kind != DECISION or record.decision_id != decision_id:
            return None
        return record


def _resolved(record: LedgerRecord) -> str:
    if record.effect == "allow":
        return f"released ({record.reason}) at {_when(record.ts)}"
    return f"denied ({record.reason}) at {_when(record.ts)}"


async def _open_hold(ledger: _Ledger, hold_id: str, approver: str, kid: str) -> LedgerRecord:
    """The ledger record of the hold *hold_id*, if *approver* may still vote on it."""
    prefix = ledger.prefix
    hold = await ledger.get(hold_id)
    if hold is None:
        raise ApprovalRefused(
            Reason.UNKNOWN_HOLD, f"no decision {hold_id} in the ledger {ledger.stream}"
        )
    if hold.effect != "hold":
        raise ApprovalRefused(
            Reason.UNKNOWN_HOLD,
            f"decision {hold_id} is not a hold: it is {hold.effect} ({hold.reason})",
        )
    if not hold.payload_sha256:
        raise ApprovalRefused(Reason.UNKNOWN_HOLD, f"hold {hold_id} names no payload digest")
    resolution = await ledger.get(resolution_decision_id(prefix, hold_id))
    if resolution is not None:
        raise ApprovalRefused(
            Reason.HOLD_RESOLVED, f"hold {hold_id} is already resolved: {_resolved(resolution)}"
        )
    if hold.expires and time.time() >= hold.expires:
        raise ApprovalRefused(
            Reason.EXPIRED,
            f"hold {hold_id} expired at {_when(hold.expires)} (the gateway denies it, expired)",
        )
    # A kid is mapped to an approver id by the gateway's policy, which is not at hand here.
    if hold.approvers and approver != kid and approver not in hold.approvers:
        raise ApprovalRefused(
            Reason.APPROVER_NOT_ALLOWED,
            f"{approver} may not vote on hold {hold_id}; its approvers: "
            + ", ".join(hold.approvers),
        )
    earlier = await ledger.get(approval_decision_id(prefix, hold_id, approver))
    if earlier is not None and earlier.effect in ("approve", "reject"):
        raise ApprovalRefused(
            Reason.DUPLICATE_APPROVAL,
            f"{approver} already voted on hold {hold_id}: {earlier.effect} "
            f"(decision {earlier.decision_id})",
        )
    return hold


async def _completes(ledger: _Ledger, hold: LedgerRecord, vote: LedgerRecord) -> bool:
    """Whether the recorded *vote* resolves *hold*: a rejection, or the approval that
    brings the approvals to the quorum."""
    if vote.effect == "reject":
        return True
    if vote.effect != "approve":
        return False
    approvals = 0
    for approver in hold.approvers:
        other = await ledger.get(approval_decision_id(ledger.prefix, hold.decision_id, approver))
        approvals += other is not None and other.effect == "approve"
    return approvals >= max(1, hold.quorum)


class _VoteWatch:
    """The gateway's records about one hold, as they are stored (a subscription to every
    decision record, made before the vote is published, so none can be missed).

    The vote's record is told from other approvers' by its ``approver`` (the claim), or by
    ``intake`` naming the approve stream's message (when the gateway records the vote under
    the policy's id for a kid).
    """

    def __init__(self, subjects: Subjects, hold_id: str, approver: str) -> None:
        self._filter = subjects.ledger().any_decision("*")
        self._hold = hold_id
        self._approver = approver
        self._vote_id = approval_decision_id(subjects.prefix, hold_id, approver)
        self._resolution_id = resolution_decision_id(subjects.prefix, hold_id)
        # Only a record naming the hold can matter: a byte search skips the rest unread.
        self._needle = b'"hold":' + json.dumps(hold_id).encode()
        self._votes: list[LedgerRecord] = []
        self._arrived = anyio.Event()
        self._sub: Subscription | None = None
        self.resolution: LedgerRecord | None = None

    async def start(self, nc: Client) -> None:
        self._sub = await nc.subscribe(self._filter, cb=self._on_record)
        await round_trip(nc)

    async def stop(self) -> None:
        if self._sub is not None:
            with anyio.CancelScope(shield=True):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_record(self, msg: Msg) -> None:
        if self._needle not in msg.data:
            return
        try:
            record = decode_record(msg.data)
        except msgspec.DecodeError:
            return
        if record.hold != self._hold:
            return
        if record.decision_id == self._resolution_id:
            self.resolution = record
        else:  # a vote counted (``approver`` set) or refused (told by its ``intake``)
            self._votes.append(record)
        self._arrived.set()

    def _ours(self, record: LedgerRecord, stream: str, seq: int) -> bool:
        return (
            record.decision_id == self._vote_id
            or record.approver == self._approver
            or record.intake.startswith(f"{stream}/{seq}/")
        )

    async def resolved(self, wait_s: float) -> LedgerRecord | None:
        """The hold's resolution, waiting up to *wait_s* for it to be recorded."""
        with anyio.move_on_after(wait_s):
            while self.resolution is None:
                self._arrived = anyio.Event()
                await self._arrived.wait()
        return self.resolution

    async def recorded(self, stream: str, seq: int, wait_s: float) -> LedgerRecord | None:
        """The record of the vote stored as *stream* / *seq*, waiting up to *wait_s*."""
        with anyio.move_on_after(wait_s):
            while True:
                for record in self._votes:
                    if self._ours(record, stream, seq):
                        return record
                self._votes.clear()
                self._arrived = anyio.Event()
                await self._arrived.wait()
        return None


# --- open holds ---------------------------------------------------------------------------


class OpenHold(msgspec.Struct, frozen=True, kw_only=True):
    """A hold not yet resolved: what it holds, who may release it, the votes so far."""

    decision_id: str
    subject: str  # the intake subject
    principal: str
    action: str
    resource: str
    rules: tuple[str, ...]
    ts: float  # when it was decided
    payload_sha256: str
    approvers: tuple[str, ...] = ()  # who may approve it ((): not in its ledger record)
    quorum: int = 0
    expires: float = 0.0  # unix s; 0: the record names no expiry
    approved_by: tuple[str, ...] = ()  # approvers whose approval is recorded
    rejected_by: tuple[str, ...] = ()
    in_ledger: bool = True  # False: a hold message without a ledger record (no vote counts)


@dataclass(frozen=True, slots=True)
class Holds:
    """:func:`open_holds`' answer: the open holds, oldest first, and whether there are more
    than the limit (``more``)."""

    holds: list[OpenHold]
    more: bool


async def _first_seq(nc: Client, stream: str, subject: str, since: float, timeout_s: float) -> int:
    """The stream sequence of the first message on *subject* stored at or after *since*;
    0 when there is none."""
    try:
        return await first_seq_since(nc, stream, subject, since, timeout_s=timeout_s)
    except nats.errors.NoRespondersError:
        raise GatewayError(
            f"no hold stream {stream} answers: holds are published by stream-mode gateways"
        ) from None
    except nats.errors.Error as exc:
        raise GatewayError(f"cannot read the hold stream {stream}: {exc!r}") from None


async def open_holds(
    nc: Client,
    *,
    prefix: str = DEFAULT_PREFIX,
    since: float,
    limit: int,
    principal: str | None = None,
    action: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Holds:
    """The holds published since *since* (unix s) that have no resolution in the ledger,
    oldest first, at most *limit* (both bounds are the caller's: the hold stream keeps
    every hold ever made); *principal* and *action* (NATS wildcards allowed) narrow the
    hold subjects read on the server."""
    if principal is not None and not _TOKEN.fullmatch(principal):
        raise ValueError(f"{principal!r} is not a principal (1-64 of A-Z a-z 0-9 _ -)")
    if action is not None and not _ACTION.fullmatch(action):
        raise ValueError(f"{action!r} is not an action (dotted tokens; * and a final > allowed)")
    if limit < 1:
        raise ValueError("limit must be at least 1")
    subjects = Subjects(prefix)
    stream = subjects.streams.hold
    wanted = subjects.subject("hold", principal or "*", action or ">")
    ledger = _Ledger(nc.jetstream(timeout=timeout_s), subjects)
    first = await _first_seq(nc, stream, wanted, since, timeout_s)
    found: list[OpenHold] = []
    seen: set[str] = set()
    if not first:
        return Holds(found, more=False)
    # read() is an async generator (annotated as the iterator it is used as): closed here,
    # it unsubscribes at once when the limit stops the loop early.
    messages = cast(
        AsyncGenerator[Stored, None],
        read(nc, stream, wanted, start_seq=first, timeout_s=timeout_s),
    )
    try:
        async with contextlib.aclosing(messages):
            async for stored in messages:
                try:
                    message = _hold_decoder.decode(stored.data)
                except msgspec.DecodeError:
                    log.warning("hold message %d is not a decision record; ignored", stored.seq)
                    continue
                if message.effect != "hold" or message.decision_id in seen:
                    continue
                seen.add(message.decision_id)
                hold = await _still_open(ledger, message)
                if hold is None:
                    continue
                if len(found) == limit:
                    return Holds(found, more=True)
                found.append(hold)
    except nats.errors.Error as exc:  # TimeoutError, APIError: the read stopped
        raise GatewayError(f"cannot read the hold stream {stream}: {exc!r}") from None
    return Holds(found, more=False)


async def _still_open(ledger: _Ledger, message: DecisionRecord) -> OpenHold | None:
    """*message*'s hold with its votes, or ``None`` if the ledger shows it resolved."""
    hold_id, prefix = message.decision_id, ledger.prefix
    if not _DECISION_ID.fullmatch(hold_id):
        return None
    if await ledger.get(resolution_decision_id(prefix, hold_id)) is not None:
        return None
    record = await ledger.get(hold_id)
    if record is None or record.effect != "hold":
        return OpenHold(
            decision_id=hold_id,
            subject=message.subject,
            principal=message.principal,
            action=message.action,
            resource=message.resource,
            rules=message.rules,
            ts=message.ts,
            payload_sha256=message.payload_sha256,
            in_ledger=False,
        )
    approved: list[str] = []
    rejected: list[str] = []
    for approver in record.approvers:
        vote = await ledger.get(approval_decision_id(prefix, hold_id, approver))
        if vote is not None and vote.effect == "approve":
            approved.append(approver)
        elif vote is not None and vote.effect == "reject":
            rejected.append(approver)
    return OpenHold(
        decision_id=hold_id,
        subject=record.subject,
        principal=record.principal,
        action=record.action,
        resource=record.resource,
        rules=record.rules,
        ts=record.ts,
        payload_sha256=record.payload_sha256,
        approvers=record.approvers,
        quorum=record.quorum,
        expires=record.expires,
        approved_by=tuple(approved),
        rejected_by=tuple(rejected),
    )
